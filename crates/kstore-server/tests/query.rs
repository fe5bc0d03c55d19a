//! The Query API of a `kstore-node` process against a real broker: answers with their
//! staleness, read-your-writes, partition-direct reads, bad requests, MultiGet, Metadata,
//! Admin, health, reflection and the metrics endpoint; and the limits that keep Gets
//! answering while other callers abuse the node.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{Scenario, expected_features, run_async};
use kstore_cli::generator::{GeneratorConfig, OrderGenerator};
use kstore_core::orders::OrderEvent;
use kstore_core::partitioner::partition_for_key;
use kstore_proto::v1::admin_client::AdminClient;
use kstore_proto::v1::query_client::QueryClient;
use kstore_proto::v1::{
    CustomerFeatures, GetRequest, GetResponse, MetadataRequest, MultiGetRequest,
    PartitionStatusRequest, ReadOptions, Role, get_response,
};
use kstore_testkit::process::{TestProcess, http_get};
use prost::Message as _;
use rdkafka::producer::FutureRecord;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const PARTITIONS: u32 = 4;
const STORE: &str = "features";

/// A node with some customers' events ingested, and a client for it.
struct Served {
    scenario: Scenario,
    node: TestProcess,
    client: QueryClient<Channel>,
    uri: String,
    events: Vec<OrderEvent>,
    metrics_address: String,
}

async fn serve(name: &str) -> Result<Served> {
    serve_with(name, |_| Ok(())).await
}

/// Like [`serve`], with `prepare` run on the scenario before the node starts.
async fn serve_with(
    name: &str,
    prepare: impl FnOnce(&mut Scenario) -> Result<()>,
) -> Result<Served> {
    let mut scenario = Scenario::new(name, PARTITIONS).await?;
    scenario.extra.push("metrics-address=127.0.0.1:0".into());
    prepare(&mut scenario)?;
    let generator = GeneratorConfig {
        customers: 200,
        seed: 3,
        ..GeneratorConfig::default()
    };
    let count = 5_000;
    scenario.produce(&generator, count)?;
    let events: Vec<OrderEvent> = OrderGenerator::new(generator)
        .take(count as usize)
        .collect();
    let mut node = scenario.start_node("node-1", "only")?;
    let uri = scenario.grpc_uri(&mut node)?;
    let metrics_address = scenario.metrics_address(&mut node)?;
    scenario.wait_caught_up(&mut node, Duration::from_secs(120))?;
    let client = QueryClient::connect(uri.clone()).await?;
    Ok(Served {
        scenario,
        node,
        client,
        uri,
        events,
        metrics_address,
    })
}

fn get(key: &str) -> GetRequest {
    GetRequest {
        store: STORE.into(),
        key: key.as_bytes().to_vec(),
        partition: None,
        options: None,
    }
}

fn features(response: &GetResponse) -> Result<CustomerFeatures> {
    match &response.value {
        Some(get_response::Value::Message(any)) => {
            ensure!(
                any.type_url == kstore_proto::CUSTOMER_FEATURES_TYPE_URL,
                "type {}",
                any.type_url
            );
            Ok(CustomerFeatures::decode(any.value.as_slice())?)
        }
        other => anyhow::bail!("expected a typed value, got {other:?}"),
    }
}

#[test]
fn get_answers_with_features_and_staleness_and_misses_are_not_errors() -> Result<()> {
    run_async(async {
        let mut served = serve("get").await?;
        let expected = expected_features(&served.events);
        let end = served
            .scenario
            .kafka
            .end_offsets(&served.scenario.input, PARTITIONS)?;
        for customer in ["customer-000000", "customer-000007", "customer-000150"] {
            let response = served.client.get(get(customer)).await?.into_inner();
            ensure!(response.found, "{customer} not found");
            ensure!(
                features(&response)? == expected[customer],
                "{customer}'s features"
            );
            let read = response.read.context("read metadata")?;
            let partition = partition_for_key(customer.as_bytes(), PARTITIONS);
            ensure!(read.partition == partition, "partition");
            ensure!(read.node_id == "node-1", "node id");
            ensure!(read.role() == Role::Active, "role {:?}", read.role());
            ensure!(
                read.input_offset == end[partition as usize],
                "input offset {}",
                read.input_offset
            );
            ensure!(read.lag == 0, "lag {}", read.lag);
            ensure!(read.changelog_offset > 0, "changelog offset");
        }
        let missing = served
            .client
            .get(get("customer-that-never-ordered"))
            .await?
            .into_inner();
        ensure!(
            !missing.found && missing.value.is_none(),
            "a missing key is found=false"
        );
        ensure!(missing.read.is_some(), "a miss still states its staleness");
        served.node.terminate(Duration::from_secs(60))?;
        Ok(())
    })
}

#[test]
fn a_read_bounded_by_the_produced_offset_includes_that_event() -> Result<()> {
    run_async(async {
        let mut served = serve("ryw").await?;
        let customer = "customer-000042";
        let before = features(&served.client.get(get(customer)).await?.into_inner())?;

        let mut event = served.events[0].clone();
        event.customer_id = customer.into();
        event.order_id = "order-ryw".into();
        event.amount_cents = 12_345;
        event.event_time_ms = before.last_seen_ms + 1_000;
        let payload = serde_json::to_vec(&event)?;
        let producer = served.scenario.kafka.producer()?;
        let record = FutureRecord::to(&served.scenario.input)
            .key(customer)
            .payload(&payload);
        let delivery = producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)?;
        ensure!(delivery.partition as u32 == partition_for_key(customer.as_bytes(), PARTITIONS));

        let mut request = tonic::Request::new(GetRequest {
            options: Some(ReadOptions {
                min_input_offset: Some(delivery.offset),
                no_forward: false,
            }),
            ..get(customer)
        });
        request.set_timeout(Duration::from_secs(10));
        let response = served.client.get(request).await?.into_inner();
        let after = features(&response)?;
        ensure!(
            after.orders_total == before.orders_total + 1,
            "the produced order is reflected"
        );
        ensure!(
            after.amount_total_cents == before.amount_total_cents + 12_345,
            "its amount too"
        );
        ensure!(
            response.read.context("read")?.input_offset > delivery.offset,
            "position"
        );

        // A bound the copy cannot reach: a distinct error, with the copy's position.
        let mut request = tonic::Request::new(GetRequest {
            options: Some(ReadOptions {
                min_input_offset: Some(delivery.offset + 1_000_000),
                no_forward: false,
            }),
            ..get(customer)
        });
        request.set_timeout(Duration::from_millis(300));
        let status = served
            .client
            .get(request)
            .await
            .expect_err("the bound is out of reach");
        ensure!(
            status.code() == Code::FailedPrecondition,
            "code {:?}",
            status.code()
        );
        let info = status.get_details_error_info().context("error info")?;
        ensure!(
            info.reason == "POSITION_NOT_REACHED",
            "reason {}",
            info.reason
        );
        ensure!(
            info.metadata.get("input_offset") == Some(&(delivery.offset + 1).to_string()),
            "the error carries the copy's position: {:?}",
            info.metadata
        );
        served.node.terminate(Duration::from_secs(60))?;
        Ok(())
    })
}

#[test]
fn get_reads_only_the_store_of_the_keys_partition() -> Result<()> {
    run_async(async {
        let mut served = serve("direct").await?;
        // A producer with another partitioner puts a key on a partition where kstore would
        // never look for it. With the default `warn` policy the node stores it there.
        let key = "customer-misrouted";
        let home = partition_for_key(key.as_bytes(), PARTITIONS) as i32;
        let elsewhere = (home + 1) % PARTITIONS as i32;
        let mut event = served.events[0].clone();
        event.customer_id = key.into();
        let payload = serde_json::to_vec(&event)?;
        let producer = served.scenario.kafka.producer()?;
        let record = FutureRecord::to(&served.scenario.input)
            .key(key)
            .payload(&payload)
            .partition(elsewhere);
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)?;
        served
            .scenario
            .wait_caught_up(&mut served.node, Duration::from_secs(60))?;

        // The key is in the store of `elsewhere`, so a read that scanned other stores would
        // find it; a partition-direct read does not.
        let response = served.client.get(get(key)).await?.into_inner();
        ensure!(!response.found, "Get looked beyond the key's partition");
        ensure!(
            response.read.context("read")?.partition == home as u32,
            "read the home partition"
        );
        let status = served
            .client
            .get(GetRequest {
                partition: Some(elsewhere as u32),
                ..get(key)
            })
            .await
            .expect_err("the wrong partition is refused");
        ensure!(status.code() == Code::InvalidArgument);
        ensure!(status.get_details_error_info().context("info")?.reason == "WRONG_PARTITION");
        ensure!(
            served
                .node
                .output()
                .contains("key arrived on another partition"),
            "mismatch logged"
        );
        served.node.terminate(Duration::from_secs(60))?;
        Ok(())
    })
}

#[test]
fn bad_requests_are_invalid_arguments_and_the_node_keeps_serving() -> Result<()> {
    run_async(async {
        let mut served = serve("bad").await?;
        let client = &mut served.client;
        let cases: Vec<(GetRequest, &str)> = vec![
            (get(""), "EMPTY_KEY"),
            (
                GetRequest {
                    key: vec![b'k'; (64 << 10) + 1],
                    ..get("")
                },
                "KEY_TOO_LARGE",
            ),
            (
                GetRequest {
                    store: "no-such-store".into(),
                    ..get("customer-000001")
                },
                "UNKNOWN_STORE",
            ),
            (
                GetRequest {
                    partition: Some(PARTITIONS),
                    ..get("customer-000001")
                },
                "PARTITION_OUT_OF_RANGE",
            ),
        ];
        for (request, reason) in cases {
            let status = client.get(request).await.expect_err(reason);
            ensure!(
                status.code() == Code::InvalidArgument,
                "{reason}: {:?}",
                status.code()
            );
            let info = status.get_details_error_info().context("error info")?;
            ensure!(
                info.reason == reason,
                "expected {reason}, got {}",
                info.reason
            );
        }
        let too_many = MultiGetRequest {
            store: STORE.into(),
            keys: (0..1_001)
                .map(|i| format!("customer-{i:06}").into_bytes())
                .collect(),
            options: None,
        };
        let status = client
            .multi_get(too_many)
            .await
            .expect_err("oversized MultiGet");
        ensure!(status.code() == Code::InvalidArgument);
        ensure!(status.get_details_error_info().context("info")?.reason == "TOO_MANY_KEYS");
        let empty_key = MultiGetRequest {
            store: STORE.into(),
            keys: vec![Vec::new()],
            options: None,
        };
        ensure!(
            client
                .multi_get(empty_key)
                .await
                .expect_err("empty key")
                .code()
                == Code::InvalidArgument
        );

        ensure!(
            client.get(get("customer-000001")).await?.into_inner().found,
            "still serving"
        );
        ensure!(served.node.try_exit()?.is_none(), "the node is still up");
        served.node.terminate(Duration::from_secs(60))?;
        Ok(())
    })
}

#[test]
fn multi_get_answers_per_key_in_request_order() -> Result<()> {
    run_async(async {
        let mut served = serve("mget").await?;
        let expected = expected_features(&served.events);
        let keys: Vec<String> = (0..100)
            .map(|i| {
                if i % 10 == 9 {
                    format!("nobody-{i}")
                } else {
                    format!("customer-{:06}", i * 2)
                }
            })
            .collect();
        let request = MultiGetRequest {
            store: STORE.into(),
            keys: keys.iter().map(|k| k.clone().into_bytes()).collect(),
            options: None,
        };
        let response = served.client.multi_get(request).await?.into_inner();
        ensure!(response.results.len() == keys.len(), "one result per key");
        let mut partitions = HashMap::new();
        for (key, result) in keys.iter().zip(&response.results) {
            ensure!(result.key == key.as_bytes(), "request order");
            ensure!(result.error == 0, "{key}: error {}", result.error);
            let answer = result.result.as_ref().context("result")?;
            match expected.get(key) {
                Some(want) => ensure!(answer.found && &features(answer)? == want, "{key}"),
                None => ensure!(!answer.found, "{key} must be missing"),
            }
            let read = answer.read.as_ref().context("read")?;
            ensure!(
                read.partition == partition_for_key(key.as_bytes(), PARTITIONS),
                "{key} partition"
            );
            partitions.insert(read.partition, ());
        }
        ensure!(
            partitions.len() == PARTITIONS as usize,
            "the keys spread over every partition"
        );
        served.node.terminate(Duration::from_secs(60))?;
        Ok(())
    })
}

#[test]
fn metadata_admin_health_reflection_and_metrics_answer() -> Result<()> {
    run_async(async {
        let mut served = serve("ops").await?;
        // The view is republished every publish interval: wait for the one after ingest
        // caught up.
        let caught_up = async {
            loop {
                let metadata = served
                    .client
                    .metadata(MetadataRequest {})
                    .await?
                    .into_inner();
                let copies = metadata.nodes.first().map(|n| n.copies.clone());
                if copies
                    .is_some_and(|c| c.len() == PARTITIONS as usize && c.iter().all(|c| c.lag == 0))
                {
                    return anyhow::Ok(metadata);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let metadata = tokio::time::timeout(Duration::from_secs(30), caught_up)
            .await
            .context("the view shows the caught-up copies")??;
        ensure!(metadata.node_id == "node-1");
        ensure!(
            metadata.cluster_id == served.scenario.app,
            "{}",
            metadata.cluster_id
        );
        ensure!(metadata.nodes.len() == 1, "{:?}", metadata.nodes);
        ensure!(
            metadata.nodes[0].liveness() == kstore_proto::v1::Liveness::Live
                && metadata.nodes[0].grpc_address == served.uri.trim_start_matches("http://"),
            "{:?}",
            metadata.nodes[0]
        );
        let store = metadata.stores.first().context("store")?;
        ensure!(store.partitions == PARTITIONS && store.value_type == "kstore.v1.CustomerFeatures");
        let copies = &metadata.nodes.first().context("node")?.copies;
        ensure!(
            copies.len() == PARTITIONS as usize,
            "{} copies",
            copies.len()
        );
        ensure!(
            copies
                .iter()
                .all(|c| c.role() == Role::Active && c.lag == 0),
            "{copies:?}"
        );

        let mut admin = AdminClient::connect(served.uri.clone()).await?;
        let status = admin
            .partition_status(PartitionStatusRequest::default())
            .await?
            .into_inner();
        ensure!(status.stores.len() == PARTITIONS as usize);
        let keys: u64 = status.stores.iter().map(|s| s.estimated_keys).sum();
        ensure!(keys > 0, "key estimates");

        let mut health = tonic_health::pb::health_client::HealthClient::new(
            Channel::from_shared(served.uri.clone())?.connect().await?,
        );
        let check = tonic_health::pb::HealthCheckRequest {
            service: "kstore.v1.Query".into(),
        };
        let serving = health.check(check).await?.into_inner();
        ensure!(
            serving.status() == tonic_health::pb::health_check_response::ServingStatus::Serving
        );

        let services = reflection_services(&served.uri).await?;
        for service in [
            "kstore.v1.Query",
            "kstore.v1.Admin",
            "grpc.health.v1.Health",
        ] {
            ensure!(
                services.iter().any(|s| s == service),
                "reflection lists {service}: {services:?}"
            );
        }

        let _ = served.client.get(get("customer-000001")).await?;
        // Ingest's counters are published on an interval (500 ms): wait for the last one.
        let mut text = String::new();
        kstore_testkit::process::wait_until(
            Duration::from_secs(10),
            "metrics to count every record",
            || {
                text = http_get(&served.metrics_address, "/metrics")?;
                Ok(text.contains("kstore_ingest_records_total{store=\"features\"} 5000"))
            },
        )?;
        for metric in [
            "kstore_read_latency_seconds_bucket",
            "kstore_ingest_records_total{store=\"features\"} 5000",
            "kstore_commit_latency_seconds_bucket",
            "kstore_partition_lag_records",
            "kstore_dead_letters_total{store=\"features\"} 0",
        ] {
            ensure!(text.contains(metric), "metrics lack {metric}");
        }
        served.node.terminate(Duration::from_secs(60))?;
        Ok(())
    })
}

/// Lists services through gRPC reflection, as grpcurl does.
async fn reflection_services(uri: &str) -> Result<Vec<String>> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut client =
        ServerReflectionClient::new(Channel::from_shared(uri.to_owned())?.connect().await?);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let requests = tokio_stream::iter([request]);
    let mut responses = client.server_reflection_info(requests).await?.into_inner();
    let response = responses.message().await?.context("a reflection answer")?;
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => anyhow::bail!("unexpected reflection answer {other:?}"),
    }
}

/// Fills partition 0's store, before the node first opens it, with about `mib` MiB of
/// incompressible filler under keys no customer has: a snapshot of it is then much larger
/// than every buffer between a sender and a receiver that stops reading.
fn fill_partition_0(scenario: &Scenario, mib: u32) -> Result<()> {
    use kstore_server::store::{PartitionStore, Position, SharedMemory};
    let config = scenario.config("node-1")?;
    let dir = config.store_dir(0);
    std::fs::create_dir_all(&dir)?;
    let store = PartitionStore::open(&dir, &SharedMemory::new(&config.memory))?;
    for batch in 0..mib {
        let updates = (0..1024u32)
            .map(|i| {
                let value: Vec<u8> = (0..64u32)
                    .flat_map(|j| {
                        xxhash_rust::xxh3::xxh3_128(&[batch, i, j].map(u32::to_be_bytes).concat())
                            .to_be_bytes()
                    })
                    .collect();
                (format!("filler-{batch}-{i}").into_bytes(), Some(value))
            })
            .collect();
        store.apply(&updates, Position::default())?;
    }
    store.flush()?;
    Ok(())
}

/// The reason in a status's ErrorInfo, if it has one.
fn reason_of(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// Reads every customer's features over and over until `stop`, each answer checked against
/// `expected`. Returns each read's latency.
async fn read_until(
    mut client: QueryClient<Channel>,
    expected: &HashMap<String, CustomerFeatures>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<Duration>> {
    let mut customers: Vec<&String> = expected.keys().collect();
    customers.sort();
    let mut latencies = Vec::new();
    while !*stop.borrow() {
        for customer in &customers {
            let started = std::time::Instant::now();
            let response = client
                .get(get(customer))
                .await
                .with_context(|| format!("reading {customer} during the abuse"))?
                .into_inner();
            latencies.push(started.elapsed());
            ensure!(
                response.found && features(&response)? == expected[*customer],
                "{customer}'s features during the abuse"
            );
        }
    }
    Ok(latencies)
}

/// Prints how many reads answered, and their latency (measured, never asserted).
fn report(what: &str, mut latencies: Vec<Duration>) {
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len().max(1) - 1) as f64 * q) as usize];
    if !latencies.is_empty() {
        eprintln!(
            "{what}: {} answered, p50 {:?}, p99 {:?}, max {:?}",
            latencies.len(),
            at(0.5),
            at(0.99),
            at(1.0)
        );
    }
}

#[test]
fn abusive_watchers_and_a_stalled_snapshot_reader_do_not_stop_gets() -> Result<()> {
    use kstore_proto::v1::FetchSnapshotRequest;
    use kstore_proto::v1::peer_client::PeerClient;
    use kstore_proto::v1::snapshot_part::Part;
    const WATCHERS: usize = 10_000;
    // The defaults of deploy/kstore-node.toml, but for a short send timeout.
    const MAX_WATCH_STREAMS: usize = 1_024;
    const MAX_SNAPSHOT_STREAMS: usize = 4;
    run_async(async {
        let mut served = serve_with("abuse", |scenario| {
            scenario
                .extra
                .push("limits.snapshot-send-timeout-ms=5000".into());
            fill_partition_0(scenario, 64)
        })
        .await?;
        let expected = expected_features(&served.events);
        let uri = served.uri.clone();

        // Gets alone first, for comparison.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let quiet = tokio::spawn({
            let client = QueryClient::connect(uri.clone()).await?;
            let expected = expected.clone();
            async move { read_until(client, &expected, stopped).await }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.send(true)?;
        report("Gets alone", quiet.await??);

        // Gets on a connection of their own, from before the abuse until after it.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let reads = tokio::spawn({
            let client = QueryClient::connect(uri.clone()).await?;
            let expected = expected.clone();
            async move { read_until(client, &expected, stopped).await }
        });

        // A snapshot reader that takes the manifest and stops reading, and more that never
        // read: the node sends at most MAX_SNAPSHOT_STREAMS at once and refuses the rest.
        let mut peer = PeerClient::connect(uri.clone()).await?;
        let fetch = || FetchSnapshotRequest {
            store: STORE.into(),
            partition: 0,
        };
        let mut stalled = peer.fetch_snapshot(fetch()).await?.into_inner();
        let manifest = stalled.message().await?.context("a manifest")?;
        let Some(Part::Manifest(manifest)) = manifest.part else {
            anyhow::bail!("the snapshot did not start with a manifest");
        };
        let bytes: u64 = manifest.files.iter().map(|f| f.bytes).sum();
        ensure!(
            bytes > 50 << 20,
            "partition 0's snapshot holds {bytes} bytes"
        );
        let mut silent = Vec::new();
        let mut snapshots_refused = 0;
        for _ in 0..MAX_SNAPSHOT_STREAMS + 2 {
            match peer.fetch_snapshot(fetch()).await {
                Ok(stream) => silent.push(stream.into_inner()),
                Err(status) => {
                    ensure!(
                        status.code() == Code::ResourceExhausted
                            && reason_of(&status) == "TOO_MANY_STREAMS",
                        "a snapshot refused with {status:?}"
                    );
                    snapshots_refused += 1;
                }
            }
        }
        ensure!(
            silent.len() == MAX_SNAPSHOT_STREAMS - 1 && snapshots_refused == 3,
            "{} more snapshots admitted, {snapshots_refused} refused",
            silent.len()
        );

        // 10,000 WatchMetadata streams at once, none read, over 20 connections: h2 closes
        // a connection on which more than about 2,000 small frames wait to be read at once
        // (GOAWAY ENHANCE_YOUR_CALM), whatever the node's limits, so a burst of 10,000 on
        // one connection only ends that connection.
        let mut clients = Vec::new();
        for _ in 0..20 {
            clients.push(QueryClient::new(
                Channel::from_shared(uri.clone())?.connect().await?,
            ));
        }
        let mut opened = tokio::task::JoinSet::new();
        for n in 0..WATCHERS {
            let mut client = clients[n % clients.len()].clone();
            opened.spawn(async move { client.watch_metadata(MetadataRequest {}).await });
        }
        let mut open_streams = Vec::new();
        let mut watches_refused = 0;
        while let Some(answer) = opened.join_next().await {
            match answer? {
                Ok(stream) => open_streams.push(stream.into_inner()),
                Err(status) => {
                    let info = status.get_details_error_info();
                    ensure!(
                        status.code() == Code::ResourceExhausted
                            && info.as_ref().is_some_and(|i| {
                                i.reason == "TOO_MANY_STREAMS"
                                    && i.metadata.get("method").map(String::as_str)
                                        == Some("WatchMetadata")
                            }),
                        "a watch refused with {status:?}; the node's log ends:\n{}",
                        served.node.tail()
                    );
                    watches_refused += 1;
                }
            }
        }
        ensure!(
            open_streams.len() == MAX_WATCH_STREAMS
                && watches_refused == WATCHERS - MAX_WATCH_STREAMS,
            "{} watches admitted, {watches_refused} refused",
            open_streams.len()
        );

        // The stalled snapshots are given up after the send timeout: a new one is admitted.
        let admitted = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match peer.fetch_snapshot(fetch()).await {
                    Ok(stream) => return anyhow::Ok(stream.into_inner()),
                    Err(status) if status.code() == Code::ResourceExhausted => {}
                    Err(status) => anyhow::bail!("a snapshot failed: {status:?}"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await
        .context("the stalled snapshots never gave their slots back")??;
        drop(admitted);

        // Gets answered, exactly, all along.
        stop.send(true)?;
        let latencies = reads.await??;
        ensure!(!latencies.is_empty(), "no Get answered");
        report("Gets during the abuse", latencies);

        // The abusers go; their slots come back.
        drop(open_streams);
        drop(silent);
        drop(stalled);
        let mut client = served.client.clone();
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if client.watch_metadata(MetadataRequest {}).await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .context("the watch slots never came back")?;

        // Every refusal counted (the wait above may have added a few).
        let text = http_get(&served.metrics_address, "/metrics")?;
        let counted = |metric: &str| -> f64 {
            text.lines()
                .find_map(|line| line.strip_prefix(metric)?.trim().parse().ok())
                .unwrap_or(0.0)
        };
        let watches = counted(
            "kstore_grpc_refused_total{method=\"WatchMetadata\",reason=\"TOO_MANY_STREAMS\"}",
        );
        ensure!(
            watches >= watches_refused as f64,
            "{watches} watch refusals counted"
        );
        let snapshots = counted(
            "kstore_grpc_refused_total{method=\"FetchSnapshot\",reason=\"TOO_MANY_STREAMS\"}",
        );
        ensure!(
            snapshots >= snapshots_refused as f64,
            "{snapshots} snapshot refusals counted"
        );
        let stalls = counted("kstore_snapshots_sent_total{outcome=\"receiver_stalled\"}");
        ensure!(stalls >= 1.0, "{stalls} stalled receivers counted");
        served.node.terminate(Duration::from_secs(60))?;
        Ok(())
    })
}
