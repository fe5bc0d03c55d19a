//! Scans against a real 3-node cluster (12 partitions, one standby): whole-store pages merged
//! by the client in key order, prefix and descending ranges, every value exact against the
//! events sent; paging on while a node is killed, with no key missed or repeated; a plain
//! gRPC client's Scan forwarded by a node that holds no copy of the partition; bad tokens,
//! ranges and limits refused with what is wrong.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{Layout, Node, Scenario, expected_features, run_async, wait_for_agreement};
use kstore_cli::generator::{GeneratorConfig, OrderGenerator};
use kstore_client::{Client, ReadError, ReadOptions, ReadPolicy, Scan, ScanPage, ScanToken};
use kstore_core::orders::OrderEvent;
use kstore_core::partitioner::partition_for_key;
use kstore_proto::v1::{
    CustomerFeatures, ErrorReason, ReadOptions as WireReadOptions, ScanRequest,
};
use tonic_types::StatusExt as _;

const PARTITIONS: u32 = 12;
const CUSTOMERS: u32 = 500;
const EVENTS: u64 = 4_000;

/// What each customer's features must be, by key, in key order.
type Expected = BTreeMap<String, CustomerFeatures>;

/// Pages through `scan` from the first page to the last, `limit` keys a page; a page that
/// fails is asked again from the same token for up to 60 s (as `kstore scan --all` does).
/// `between_pages` runs after each page, with the number of pages so far. Returns the keys
/// and values in the order returned, and the nodes that answered each page.
async fn page_through(
    client: &Client,
    scan: &Scan,
    limit: usize,
    mut between_pages: impl FnMut(usize) -> Result<()>,
) -> Result<(Vec<(String, CustomerFeatures)>, Vec<BTreeSet<String>>)> {
    let mut seen = Vec::new();
    let mut answered_by = Vec::new();
    let mut token: Option<ScanToken> = None;
    let mut pages = 0;
    loop {
        let started = Instant::now();
        let page: ScanPage = loop {
            let page = match &token {
                Some(token) => {
                    client
                        .scan_next(token, limit, &ReadOptions::default())
                        .await
                }
                None => client.scan(scan, limit).await,
            };
            match page {
                Ok(page) => break page,
                Err(error) if started.elapsed() < Duration::from_secs(60) => {
                    eprintln!("page {pages}: {error}; asking again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => bail!("page {pages} failed for 60 s: {error}"),
            }
        };
        pages += 1;
        ensure!(page.entries.len() <= limit, "{} keys", page.entries.len());
        ensure!(
            !page.reads.is_empty() || page.entries.is_empty(),
            "a page with keys states no read"
        );
        for entry in &page.entries {
            let key = String::from_utf8(entry.key.clone())?;
            ensure!(
                entry.partition == partition_for_key(&entry.key, PARTITIONS),
                "{key} reported in partition {}",
                entry.partition
            );
            seen.push((key, entry.value_as::<CustomerFeatures>()?));
        }
        answered_by.push(page.reads.iter().map(|read| read.node_id.clone()).collect());
        between_pages(pages)?;
        match page.next {
            Some(next) => {
                // The token survives being printed and parsed, as a user passes it on.
                token = Some(next.to_string().parse()?);
            }
            None => return Ok((seen, answered_by)),
        }
    }
}

/// Reads a ScanStream call through `node` to its end. Returns the keys and values in the
/// order streamed, and per page the node that answered it and whether it said `more`.
async fn stream_through(
    node: &mut Node,
    request: ScanRequest,
) -> Result<(Vec<(String, CustomerFeatures)>, Vec<(String, bool)>)> {
    let mut stream = node.client.scan_stream(request).await?.into_inner();
    let mut seen = Vec::new();
    let mut pages = Vec::new();
    while let Some(page) = stream.message().await? {
        for entry in &page.entries {
            let key = String::from_utf8(entry.key.clone())?;
            let Some(kstore_proto::v1::scan_entry::Value::Message(any)) = &entry.value else {
                bail!("{key} streamed without a typed value");
            };
            seen.push((key, prost::Message::decode(any.value.as_slice())?));
        }
        let node = page.read.map(|read| read.node_id).unwrap_or_default();
        pages.push((node, page.more));
    }
    Ok((seen, pages))
}

/// Checks that `seen` is exactly `expected`'s keys in the scan's order, each once, each
/// with its expected value.
fn check_pages(
    seen: &[(String, CustomerFeatures)],
    expected: &Expected,
    descending: bool,
) -> Result<()> {
    let mut keys: Vec<&String> = expected.keys().collect();
    if descending {
        keys.reverse();
    }
    let got: Vec<&String> = seen.iter().map(|(key, _)| key).collect();
    if got != keys {
        let unique: BTreeSet<&String> = got.iter().copied().collect();
        let missing: Vec<&&String> = keys.iter().filter(|k| !unique.contains(**k)).collect();
        bail!(
            "{} keys returned ({} distinct), {} expected; missing {:?}",
            got.len(),
            unique.len(),
            keys.len(),
            missing.iter().take(5).collect::<Vec<_>>()
        );
    }
    for (key, features) in seen {
        ensure!(expected.get(key) == Some(features), "{key}: wrong features");
    }
    Ok(())
}

#[test]
fn whole_store_scans_page_in_key_order_exactly_and_keep_paging_through_a_kill() -> Result<()> {
    run_async(async {
        let scenario = Scenario::new("scan", PARTITIONS).await?;
        let generator = GeneratorConfig {
            customers: CUSTOMERS,
            seed: 17,
            ..GeneratorConfig::default()
        };
        let events: Vec<OrderEvent> = OrderGenerator::new(generator.clone())
            .take(EVENTS as usize)
            .collect();
        scenario.produce(&generator, EVENTS)?;
        let ids = ["node-1", "node-2", "node-3"];
        let mut nodes = Vec::new();
        for id in ids {
            nodes.push(Node::start(&scenario, id, "only").await?);
        }
        scenario.wait_committed(Duration::from_secs(120), || Ok(()))?;
        {
            let mut refs: Vec<&mut Node> = nodes.iter_mut().collect();
            wait_for_agreement(&mut refs, &ids, Duration::from_secs(120)).await?;
        }
        let expected: Expected = expected_features(&events).into_iter().collect();
        let seed = nodes[0]
            .process
            .logged_address("serving gRPC", Duration::from_secs(5))?;
        let client = Client::builder()
            .seeds([seed])
            .cluster_id(scenario.app.clone())
            .read_policy(ReadPolicy::PreferActive { max_lag: 1_000_000 })
            .request_timeout(Duration::from_secs(2))
            .build()
            .await?;

        // The whole store, ascending and descending, in pages that do not divide it.
        let (all, _) = page_through(&client, &Scan::all(), 37, |_| Ok(())).await?;
        check_pages(&all, &expected, false)?;
        let (down, _) = page_through(&client, &Scan::all().descending(), 101, |_| Ok(())).await?;
        check_pages(&down, &expected, true)?;

        // A prefix: the customers numbered 100 to 199.
        let prefix = OrderGenerator::customer_id(100);
        let prefix = &prefix[..prefix.len() - 2];
        let in_prefix: Expected = expected
            .iter()
            .filter(|(key, _)| key.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        ensure!(!in_prefix.is_empty(), "no customer starts with {prefix}");
        let (seen, _) = page_through(&client, &Scan::prefix(prefix), 9, |_| Ok(())).await?;
        check_pages(&seen, &in_prefix, false)?;

        // A range [from, to), descending, of one partition.
        let (from, to) = (
            OrderGenerator::customer_id(50),
            OrderGenerator::customer_id(350),
        );
        let partition = 5;
        let in_range: Expected = expected
            .iter()
            .filter(|(key, _)| {
                key.as_str() >= from.as_str()
                    && key.as_str() < to.as_str()
                    && partition_for_key(key.as_bytes(), PARTITIONS) == partition
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let scan = Scan::range(from.as_bytes(), to.as_bytes())
            .descending()
            .partition(partition);
        let (seen, _) = page_through(&client, &scan, 4, |_| Ok(())).await?;
        check_pages(&seen, &in_range, true)?;

        // A plain gRPC client asking a node that holds no copy of a partition: the node
        // forwards the page to a holder, unless asked not to.
        let layout = Layout::of(&nodes[0].metadata().await?);
        let elsewhere = (0..PARTITIONS)
            .find(|p| {
                let active = layout
                    .actives
                    .get(p)
                    .is_some_and(|a| a.iter().any(|n| n == "node-1"));
                let standby = layout.standbys.get(p).is_some_and(|s| s.contains("node-1"));
                !active && !standby
            })
            .context("node-1 holds a copy of every partition")?;
        let request = ScanRequest {
            store: "features".into(),
            partition: elsewhere,
            limit: 1_000,
            ..ScanRequest::default()
        };
        let page = nodes[0].client.scan(request.clone()).await?.into_inner();
        let read = page.read.clone().context("no read metadata")?;
        ensure!(read.node_id != "node-1", "node-1 answered for {elsewhere}");
        let keys: Vec<String> = page
            .entries
            .iter()
            .map(|entry| String::from_utf8_lossy(&entry.key).into_owned())
            .collect();
        let of_partition: Vec<&String> = expected
            .keys()
            .filter(|key| partition_for_key(key.as_bytes(), PARTITIONS) == elsewhere)
            .collect();
        ensure!(
            keys.iter().collect::<Vec<_>>() == of_partition && !page.more,
            "partition {elsewhere} forwarded: {} keys, {} expected",
            keys.len(),
            of_partition.len()
        );
        let refused = nodes[0]
            .client
            .scan(ScanRequest {
                options: Some(WireReadOptions {
                    no_forward: true,
                    ..WireReadOptions::default()
                }),
                ..request.clone()
            })
            .await
            .err()
            .context("a scan with no_forward of a partition not held was answered")?;
        let reason = refused.get_details_error_info().map(|info| info.reason);
        ensure!(
            reason.as_deref() == Some(ErrorReason::PartitionNotHosted.as_str_name()),
            "{refused:?}"
        );

        // The same partition streamed through node-1, five keys a page: every page
        // forwarded to a holder, every key once in order with its exact value; descending
        // with a limit, the last page says there is more.
        let of_partition: Expected = expected
            .iter()
            .filter(|(key, _)| partition_for_key(key.as_bytes(), PARTITIONS) == elsewhere)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let stream_request = ScanRequest {
            limit: 0,
            page_size: 5,
            ..request.clone()
        };
        let (seen, pages) = stream_through(&mut nodes[0], stream_request.clone()).await?;
        check_pages(&seen, &of_partition, false)?;
        let (last, before) = pages.split_last().context("no page streamed")?;
        ensure!(
            pages.len() == of_partition.len().div_ceil(5)
                && pages
                    .iter()
                    .all(|(node, _)| node != "node-1" && !node.is_empty())
                && before.iter().all(|(_, more)| *more)
                && !last.1,
            "{} keys streamed in pages {pages:?}",
            seen.len()
        );
        let (seen, pages) = stream_through(
            &mut nodes[0],
            ScanRequest {
                limit: 12,
                descending: true,
                ..stream_request.clone()
            },
        )
        .await?;
        let last_twelve: Expected = of_partition
            .iter()
            .rev()
            .take(12)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        check_pages(&seen, &last_twelve, true)?;
        ensure!(
            pages.iter().map(|(_, more)| *more).collect::<Vec<_>>() == [true, true, true],
            "{pages:?}"
        );
        let inverted = nodes[0]
            .client
            .scan_stream(ScanRequest {
                from: b"b".to_vec(),
                to: b"a".to_vec(),
                ..stream_request
            })
            .await
            .err()
            .context("an inverted range was streamed")?;
        ensure!(
            inverted.code() == tonic::Code::InvalidArgument,
            "{inverted:?}"
        );

        // Bad input is refused before any call, naming what is wrong.
        let error = client
            .scan(&Scan::range("b", "a"), 10)
            .await
            .err()
            .context("an inverted range was scanned")?;
        ensure!(
            matches!(error, ReadError::InvalidScan { what: "range", .. }),
            "{error}"
        );
        let error = client
            .scan(&Scan::all(), 0)
            .await
            .err()
            .context("limit 0")?;
        ensure!(
            matches!(error, ReadError::InvalidScan { what: "limit", .. }),
            "{error}"
        );
        let error = client
            .scan(&Scan::all().partition(PARTITIONS), 10)
            .await
            .err()
            .context("a partition past the last")?;
        ensure!(
            matches!(
                error,
                ReadError::InvalidScan {
                    what: "partition",
                    ..
                }
            ),
            "{error}"
        );
        ensure!("garbage".parse::<ScanToken>().is_err());

        // Paging on through kill -9 of a node after the first page: every key once, in
        // order, exact.
        let mut victim = Some(&mut nodes[1]);
        let (seen, answered_by) = page_through(&client, &Scan::all(), 23, |pages| {
            if pages == 1
                && let Some(node) = victim.take()
            {
                node.process.kill9()?;
            }
            Ok(())
        })
        .await?;
        check_pages(&seen, &expected, false)?;
        ensure!(
            answered_by[1..]
                .iter()
                .all(|nodes| !nodes.contains("node-2")),
            "the killed node answered: {answered_by:?}"
        );
        for node in [0, 2] {
            let status = nodes[node].process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "exit: {status}");
        }
        Ok(())
    })
}
