//! The smart client against a real 3-node cluster (12 partitions, one standby): one hop in
//! steady state with no server-side forwarding, fallback to the standby when an active is
//! killed, hedging past a paused node, failover past a paused active with the default
//! settings (and by a node forwarding for a plain client), and a stale view corrected on the
//! fly.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{Node, Scenario, expected_features, run_async, wait_for_agreement};
use kstore_cli::generator::{GeneratorConfig, OrderGenerator};
use kstore_client::{Answer, Client, Hedge, ReadError, ReadPolicy, Role, Sent};
use kstore_core::orders::OrderEvent;
use kstore_core::partitioner::partition_for_key;
use kstore_proto::v1::{
    CustomerFeatures, GetRequest, GetResponse, MultiGetRequest, ReadOptions, get_response,
};
use kstore_testkit::process::http_get;
use prost::Message as _;

const PARTITIONS: u32 = 12;
const CUSTOMERS: u32 = 300;

/// A settled cluster with events ingested.
struct Settled {
    scenario: Scenario,
    nodes: Vec<Node>,
    metrics: Vec<String>,
    events: Vec<OrderEvent>,
}

async fn settled(name: &str) -> Result<Settled> {
    let mut scenario = Scenario::new(name, PARTITIONS).await?;
    scenario.extra.push("metrics-address=127.0.0.1:0".into());
    let generator = GeneratorConfig {
        customers: CUSTOMERS,
        seed: 13,
        ..GeneratorConfig::default()
    };
    let events: Vec<OrderEvent> = OrderGenerator::new(generator.clone()).take(3_000).collect();
    scenario.produce(&generator, 3_000)?;
    let mut nodes = Vec::new();
    let mut metrics = Vec::new();
    for id in ["node-1", "node-2", "node-3"] {
        let mut node = Node::start(&scenario, id, "only").await?;
        metrics.push(scenario.metrics_address(&mut node.process)?);
        nodes.push(node);
    }
    scenario.wait_committed(Duration::from_secs(120), || Ok(()))?;
    {
        let mut refs: Vec<&mut Node> = nodes.iter_mut().collect();
        wait_for_agreement(
            &mut refs,
            &["node-1", "node-2", "node-3"],
            Duration::from_secs(120),
        )
        .await?;
    }
    Ok(Settled {
        scenario,
        nodes,
        metrics,
        events,
    })
}

fn customers() -> Vec<String> {
    (0..CUSTOMERS).map(OrderGenerator::customer_id).collect()
}

fn forwarded_reads(metrics: &str) -> Result<f64> {
    let text = http_get(metrics, "/metrics")?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("kstore_forwarded_reads_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

#[test]
fn reads_take_one_hop_then_fall_back_past_a_paused_and_a_killed_node() -> Result<()> {
    run_async(async {
        let Settled {
            scenario,
            mut nodes,
            metrics,
            events,
        } = settled("client-fallback").await?;
        let expected = expected_features(&events);
        let seed = nodes[0]
            .process
            .logged_address("serving gRPC", Duration::from_secs(5))?;
        let timeout = Duration::from_secs(2);
        let client = Client::builder()
            .seeds([seed])
            .cluster_id(scenario.app.clone())
            .read_policy(ReadPolicy::PreferActive { max_lag: 1_000_000 })
            .hedge(Hedge::After(Duration::from_millis(50)))
            .hedge_budget(1.0)
            .request_timeout(timeout)
            .build()
            .await?;

        // Steady state: every read answered by the first node asked, no node forwards.
        for customer in customers() {
            let answer = client
                .get_as::<CustomerFeatures>(customer.as_bytes())
                .await?;
            ensure!(
                answer.value.as_ref() == expected.get(&customer),
                "{customer}"
            );
        }
        let stats = client.stats();
        ensure!(
            stats.first_hop_answers == stats.reads && stats.fallback_answers == 0,
            "{stats:?}"
        );
        for address in &metrics {
            ensure!(
                forwarded_reads(address)? == 0.0,
                "{address} forwarded reads"
            );
        }
        // Bad keys fail locally, before any network call.
        let reads = client.stats().reads;
        ensure!(matches!(client.get(b"").await, Err(ReadError::EmptyKey)));
        ensure!(matches!(
            client.get(&vec![b'k'; 70_000]).await,
            Err(ReadError::KeyTooLarge { len: 70_000, .. })
        ));
        ensure!(client.stats().reads == reads, "bad keys were sent");

        // A paused node: hedges answer, no read waits for the request timeout.
        let paused = nodes[2].process.pid();
        std::process::Command::new("kill")
            .args(["-STOP", &paused.to_string()])
            .status()?;
        let mut slowest = Duration::ZERO;
        let outcome: Result<()> = async {
            for customer in customers() {
                let started = Instant::now();
                let answer = client
                    .get_as::<CustomerFeatures>(customer.as_bytes())
                    .await?;
                slowest = slowest.max(started.elapsed());
                ensure!(
                    answer.value.as_ref() == expected.get(&customer),
                    "{customer}"
                );
            }
            Ok(())
        }
        .await;
        std::process::Command::new("kill")
            .args(["-CONT", &paused.to_string()])
            .status()?;
        outcome?;
        ensure!(
            slowest < timeout / 2,
            "a read took {slowest:?} with node-3 paused"
        );
        let stats = client.stats();
        ensure!(
            stats.hedges_won > 0 || stats.fallback_answers > 0,
            "{stats:?}"
        );

        // kill -9 of a node: its partitions' keys answer from their standbys.
        nodes[1].process.kill9()?;
        for customer in customers() {
            match client.get_as::<CustomerFeatures>(customer.as_bytes()).await {
                Ok(answer) => {
                    ensure!(
                        answer.read.node_id != "node-2",
                        "{customer} from the dead node"
                    );
                    ensure!(
                        answer.value.as_ref() == expected.get(&customer),
                        "{customer}"
                    );
                }
                Err(error) => bail!("{customer}: {error}"),
            }
        }
        for node in [0, 2] {
            let status = nodes[node].process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "exit: {status}");
        }
        Ok(())
    })
}

fn counter(metrics: &str, name: &str) -> Result<f64> {
    let text = http_get(metrics, "/metrics")?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// The features in a node's raw answer.
fn features_of(response: &GetResponse) -> Result<Option<CustomerFeatures>> {
    match &response.value {
        Some(get_response::Value::Message(any)) => {
            Ok(Some(CustomerFeatures::decode(any.value.as_slice())?))
        }
        Some(get_response::Value::Raw(bytes)) => {
            Ok(Some(CustomerFeatures::decode(bytes.as_slice())?))
        }
        None => Ok(None),
    }
}

/// Checks an answer the client got while `paused` (the active of the key's partition) was
/// stopped: the exact value, from `standby`, after asking the paused node first, in time.
fn check_passed_over(
    what: &str,
    customer: &str,
    answer: &Answer<Vec<u8>>,
    expected: &CustomerFeatures,
    (paused, standby): (&str, &str),
) -> Result<()> {
    let value = answer
        .value
        .as_deref()
        .map(CustomerFeatures::decode)
        .transpose()?;
    ensure!(
        value.as_ref() == Some(expected),
        "{what}: {customer}: {value:?}"
    );
    ensure!(
        answer.read.node_id == standby && answer.read.role == Role::Standby,
        "{what}: {customer} answered by {} ({:?})",
        answer.read.node_id,
        answer.read.role
    );
    let attempts = &answer.route.attempts;
    ensure!(
        attempts
            .first()
            .is_some_and(|a| a.node_id == paused && a.sent == Sent::First),
        "{what}: {customer}: the paused active was not asked first: {attempts:?}"
    );
    let last = attempts.last().context("an answering attempt")?;
    ensure!(
        matches!(last.sent, Sent::Hedge | Sent::AfterStall) && last.error.is_none(),
        "{what}: {customer}: {attempts:?}"
    );
    Ok(())
}

/// Runs `future`, and says how long it took.
async fn timed<T>(future: impl std::future::Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let output = future.await;
    (output, started.elapsed())
}

#[test]
fn a_paused_active_is_passed_over_by_default_for_get_multi_get_and_forwarded_reads() -> Result<()> {
    run_async(async {
        let Settled {
            scenario,
            mut nodes,
            metrics,
            events,
        } = settled("client-paused").await?;
        let expected = expected_features(&events);
        let layout = common::Layout::of(&nodes[0].metadata().await?);
        let ids = ["node-1", "node-2", "node-3"];
        // node-1 is paused; the keys whose partitions it is the active of must be answered
        // by their standbys.
        let paused_id = "node-1";
        let paused_partitions: Vec<u32> = (0..PARTITIONS)
            .filter(|p| layout.actives[p] == [paused_id])
            .collect();
        ensure!(
            !paused_partitions.is_empty(),
            "node-1 is active for nothing: {layout:?}"
        );
        let standby_of = |p: u32| -> Result<String> {
            layout.standbys[&p]
                .iter()
                .next()
                .cloned()
                .context("a standby")
        };
        let customers = customers();
        let partition_of = |c: &String| partition_for_key(c.as_bytes(), PARTITIONS);
        let on_paused: Vec<&String> = customers
            .iter()
            .filter(|c| paused_partitions.contains(&partition_of(c)))
            .take(20)
            .collect();
        let single = on_paused[0].clone();
        // A node that holds no copy of the single key's partition forwards a plain read.
        let single_partition = partition_of(&single);
        let forwarder = ids
            .iter()
            .position(|id| {
                *id != paused_id
                    && !layout.standbys[&single_partition].contains(*id)
                    && layout.actives[&single_partition] != [*id]
            })
            .context("a node without a copy")?;
        let forwarder_id = ids[forwarder];
        // Keys of every partition the forwarder holds no copy of, for a forwarded MultiGet.
        let not_held: Vec<&String> = customers
            .iter()
            .filter(|c| {
                let p = partition_of(c);
                layout.actives[&p] != [forwarder_id] && !layout.standbys[&p].contains(forwarder_id)
            })
            .take(40)
            .collect();

        let seed = nodes[1]
            .process
            .logged_address("serving gRPC", Duration::from_secs(5))?;
        let timeout = Duration::from_secs(1);
        // The defaults: PreferActive, adaptive hedging, a 1 s timeout.
        let default = Client::builder()
            .seeds([seed.clone()])
            .cluster_id(scenario.app.clone())
            .build()
            .await?;
        // No hedging: only the share of the deadline passes a stalled copy over.
        let no_hedge = Client::builder()
            .seeds([seed.clone()])
            .hedge(Hedge::Off)
            .build()
            .await?;
        let active_only = Client::builder()
            .seeds([seed])
            .read_policy(ReadPolicy::ActiveOnly)
            .build()
            .await?;
        // Warm up: connections open, latencies recorded, every answer exact.
        for client in [&default, &no_hedge, &active_only] {
            for customer in &customers {
                let answer = client
                    .get_as::<CustomerFeatures>(customer.as_bytes())
                    .await?;
                ensure!(
                    answer.value.as_ref() == expected.get(customer),
                    "{customer}"
                );
            }
        }
        let mut forwarding = nodes[forwarder].client.clone();
        let stalls_before = counter(&metrics[forwarder], "kstore_forward_stalls_total")?;

        // Pause the active and read at once, before gossip can call it suspect.
        let paused = nodes[0].process.pause()?;
        let started = Instant::now();
        let single_bytes = single.as_bytes().to_vec();
        let multi_keys: Vec<Vec<u8>> = on_paused
            .iter()
            .chain(customers.iter().take(20).collect::<Vec<_>>().iter())
            .map(|c| c.as_bytes().to_vec())
            .collect();
        let get_request = || {
            let mut request = tonic::Request::new(GetRequest {
                store: "features".into(),
                key: single_bytes.clone(),
                partition: None,
                options: None,
            });
            request.set_timeout(timeout);
            request
        };
        let mut multi_get_request = tonic::Request::new(MultiGetRequest {
            store: "features".into(),
            keys: not_held.iter().map(|c| c.as_bytes().to_vec()).collect(),
            options: Some(ReadOptions::default()),
        });
        multi_get_request.set_timeout(timeout);
        let mut forwarding_get = forwarding.clone();
        let multi_refs: Vec<&[u8]> = multi_keys.iter().map(Vec::as_slice).collect();
        let (
            get_default,
            get_no_hedge,
            get_active_only,
            multi_default,
            multi_no_hedge,
            forwarded_get,
            forwarded_multi_get,
        ) = tokio::join!(
            timed(default.get(&single_bytes)),
            timed(no_hedge.get(&single_bytes)),
            timed(active_only.get(&single_bytes)),
            timed(default.multi_get(&multi_refs)),
            timed(no_hedge.multi_get(&multi_refs)),
            timed(forwarding_get.get(get_request())),
            timed(forwarding.multi_get(multi_get_request)),
        );
        let all_done = started.elapsed();
        paused.resume()?;

        let standby = standby_of(single_partition)?;
        let expected_single = &expected[&single];
        let pair = (paused_id, standby.as_str());
        // Well within the deadline: the default hedges (after at most 50 ms); without
        // hedging, the paused copy gets half the deadline. The bounds leave room for a busy
        // machine: what they tell apart is waiting on the paused node until the deadline
        // (the answer would not come at all) or for its share (not with the default).
        let (answer, took_get) = get_default;
        check_passed_over("default Get", &single, &answer?, expected_single, pair)?;
        ensure!(took_get < timeout / 2, "default Get took {took_get:?}");
        let (answer, took_get_no_hedge) = get_no_hedge;
        let answer = answer?;
        check_passed_over("Get, no hedging", &single, &answer, expected_single, pair)?;
        ensure!(
            took_get_no_hedge < timeout * 3 / 4,
            "Get without hedging took {took_get_no_hedge:?}"
        );
        ensure!(
            answer.route.attempts.last().map(|a| a.sent) == Some(Sent::AfterStall),
            "{:?}",
            answer.route
        );
        ensure!(no_hedge.stats().failovers >= 1, "{:?}", no_hedge.stats());
        let mut took_multi = Vec::new();
        for (what, (results, took), limit) in [
            ("default MultiGet", &multi_default, timeout / 2),
            ("MultiGet, no hedging", &multi_no_hedge, timeout * 3 / 4),
        ] {
            ensure!(*took < limit, "{what} took {took:?}");
            took_multi.push(*took);
            ensure!(results.len() == multi_keys.len());
            for (key, result) in multi_keys.iter().zip(results) {
                let customer = String::from_utf8(key.clone())?;
                let answer = result
                    .as_ref()
                    .map_err(|error| anyhow::anyhow!("{what}: {customer}: {error}"))?;
                let p = partition_of(&customer);
                if paused_partitions.contains(&p) {
                    let standby = standby_of(p)?;
                    let pair = (paused_id, standby.as_str());
                    check_passed_over(what, &customer, answer, &expected[&customer], pair)?;
                } else {
                    let value = answer
                        .value
                        .as_deref()
                        .map(CustomerFeatures::decode)
                        .transpose()?;
                    ensure!(
                        value.as_ref() == expected.get(&customer),
                        "{what}: {customer}"
                    );
                    ensure!(answer.read.node_id != paused_id, "{what}: {customer}");
                }
            }
        }

        // ActiveOnly has nothing to fail over to: the whole deadline, one wording.
        let (result, took_active_only) = get_active_only;
        let error = result
            .err()
            .context("ActiveOnly answered with its active paused")?;
        let message = error.to_string();
        ensure!(matches!(error, ReadError::TimedOut { .. }), "{error:?}");
        ensure!(
            message.contains("before the deadline")
                && !message.contains("Timeout expired")
                && !message.contains("Cancelled")
                && error.attempts().len() == 1
                && error.attempts()[0].node_id == paused_id,
            "{message}"
        );
        ensure!(
            took_active_only >= timeout && took_active_only < timeout * 2,
            "ActiveOnly failed after {took_active_only:?}"
        );

        // A plain client reading through a node without a copy: the node's forward passes
        // the paused holder over within the deadline too.
        let (answer, took_forwarded) = forwarded_get;
        let answer = answer?.into_inner();
        let read = answer.read.clone().context("read metadata")?;
        ensure!(
            read.node_id == standby,
            "forwarded Get answered by {}",
            read.node_id
        );
        ensure!(
            features_of(&answer)?.as_ref() == Some(expected_single),
            "forwarded {single}"
        );
        ensure!(
            took_forwarded < timeout * 3 / 4,
            "forwarded Get took {took_forwarded:?}"
        );
        let (answer, took_forwarded_multi) = forwarded_multi_get;
        let answer = answer?.into_inner();
        ensure!(answer.results.len() == not_held.len());
        let mut from_standbys = 0;
        for (result, customer) in answer.results.iter().zip(&not_held) {
            ensure!(
                result.error == 0,
                "forwarded MultiGet: {customer}: {:?}",
                result.error()
            );
            let response = result.result.as_ref().context("a result")?;
            ensure!(
                features_of(response)?.as_ref() == expected.get(*customer),
                "forwarded MultiGet: {customer}"
            );
            let node = &response.read.as_ref().context("read metadata")?.node_id;
            ensure!(
                node != paused_id,
                "forwarded MultiGet: {customer} from the paused node"
            );
            if paused_partitions.contains(&partition_of(customer)) {
                ensure!(
                    *node == standby_of(partition_of(customer))?,
                    "{customer} from {node}"
                );
                from_standbys += 1;
            }
        }
        ensure!(
            from_standbys > 0,
            "no forwarded key was of the paused node's partitions"
        );
        ensure!(
            took_forwarded_multi < timeout * 3 / 4,
            "forwarded MultiGet took {took_forwarded_multi:?}"
        );
        let stalls = counter(&metrics[forwarder], "kstore_forward_stalls_total")? - stalls_before;
        ensure!(
            stalls >= 2.0,
            "{forwarder_id} passed over {stalls} stalled calls"
        );
        eprintln!(
            "{paused_id} paused, timeout {timeout:?}: Get {:?} (default), {:?} (no hedging); \
             MultiGet {:?} (default), {:?} (no hedging); ActiveOnly failed after \
             {took_active_only:?}; through {forwarder_id}: Get {took_forwarded:?}, MultiGet \
             {took_forwarded_multi:?}; all within {all_done:?}",
            took_get, took_get_no_hedge, took_multi[0], took_multi[1],
        );

        for node in &mut nodes {
            let status = node.process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "{} exit: {status}", node.id);
        }
        Ok(())
    })
}

#[test]
fn a_restarted_node_on_another_port_is_found_again_without_a_failed_read() -> Result<()> {
    run_async(async {
        let Settled {
            scenario,
            mut nodes,
            events,
            ..
        } = settled("client-stale").await?;
        let expected = expected_features(&events);
        let seeds: Vec<String> = nodes
            .iter_mut()
            .map(|n| {
                n.process
                    .logged_address("serving gRPC", Duration::from_secs(5))
            })
            .collect::<Result<_>>()?;
        let client = Client::builder()
            .seeds(seeds)
            .read_policy(ReadPolicy::PreferActive { max_lag: 1_000_000 })
            .hedge(Hedge::After(Duration::from_millis(50)))
            .request_timeout(Duration::from_secs(2))
            .build()
            .await?;
        let before = client.view();
        let old = before
            .nodes
            .iter()
            .find(|n| n.node_id == "node-2")
            .context("node-2 in the view")?
            .grpc_address
            .clone();

        // node-2 restarts on another port; the client reads throughout.
        let status = nodes[1].process.terminate(Duration::from_secs(60))?;
        ensure!(status.success());
        let restarted = Node::start(&scenario, "node-2", "second").await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            for customer in customers() {
                let answer = client
                    .get_as::<CustomerFeatures>(customer.as_bytes())
                    .await
                    .map_err(|error: ReadError| anyhow::anyhow!("{customer}: {error}"))?;
                ensure!(
                    answer
                        .value
                        .is_none_or(|v| v.orders_total <= expected[&customer].orders_total),
                    "{customer}"
                );
            }
            let view = client.view();
            let now = view
                .nodes
                .iter()
                .find(|n| n.node_id == "node-2" && n.grpc_address != old);
            if now.is_some_and(|n| n.copies.iter().any(|c| c.role == Role::Active)) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the client never saw node-2's new address"
            );
        }
        nodes.push(restarted);
        for (index, node) in nodes.iter_mut().enumerate() {
            if index == 1 {
                continue;
            }
            let status = node.process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "exit: {status}");
        }
        Ok(())
    })
}

#[test]
fn bad_keys_and_unreachable_seeds_fail_before_any_read() -> Result<()> {
    run_async(async {
        // Port 1 on loopback: nothing listens there, connections are refused.
        let free = "127.0.0.1:1".to_owned();
        let error = Client::builder()
            .seeds([free.clone()])
            .connect_timeout(Duration::from_millis(200))
            .build()
            .await
            .unwrap_err();
        ensure!(error.to_string().contains(&free), "{error}");
        ensure!(Client::builder().build().await.is_err(), "no seeds");
        Ok(())
    })
}
