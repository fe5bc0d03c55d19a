//! `cargo xtask bench cluster`: what standbys and gossip cost and deliver, on this machine.
//!
//! 1. Catch-up: one node ingests `--events` events alone; a second node joins and its state
//!    updater brings the copies it receives (standbys, and partitions it takes over) from
//!    zero to the end of their changelogs. The apply rate is its
//!    `kstore_updater_records_total` over that time.
//! 2. Standby lag: with a third node and one standby per partition, `kstore produce` sends
//!    `--ingest-rate` events/s for `--seconds`; every 100 ms the bench reads one key of every
//!    partition from its standby's node and its active's node (each answer states the copy's
//!    input position) and asks for that input partition's end offset right after (about a
//!    millisecond later): lag = end − position, a slight overestimate.
//! 3. Failure detection: `kill -9` of the third node; the time until each other node's view
//!    says it is suspect, and dead.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kstore_cli::generator::GeneratorConfig;
use kstore_cli::produce::{ProduceOptions, produce};
use kstore_core::cluster::{ClusterView, Liveness, Role};
use kstore_core::partitioner::partition_for_key;
use kstore_proto::v1::query_client::QueryClient;
use kstore_proto::v1::{GetRequest, MetadataRequest, ReadOptions};
use kstore_testkit::TestKafka;
use kstore_testkit::broker::{Broker, DEFAULT_PORT, Started};
use kstore_testkit::process::TestProcess;
use rdkafka::consumer::Consumer as _;
use tonic::transport::Channel;

/// What `bench cluster` measures.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterBench {
    /// Events the first node ingests alone, which the second node's copies then catch up on.
    #[arg(long, default_value_t = 500_000)]
    pub events: u64,
    /// Customers the events spread over.
    #[arg(long, default_value_t = 50_000)]
    pub customers: u32,
    /// Partitions of the input topic.
    #[arg(long, default_value_t = 12)]
    pub partitions: u32,
    /// Events per second while standby lag is measured.
    #[arg(long, default_value_t = 20_000)]
    pub ingest_rate: u64,
    /// Seconds of ingest while standby lag is measured.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// The broker's port.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
}

/// A node of the benchmark's cluster.
pub(crate) struct Node {
    pub(crate) id: String,
    pub(crate) process: TestProcess,
    pub(crate) client: QueryClient<Channel>,
    pub(crate) metrics: String,
    pub(crate) gossip: String,
    pub(crate) grpc: String,
}

pub fn cluster(bench: &ClusterBench) -> Result<()> {
    let binaries = crate::binaries::locate()?;
    let broker = Broker::on_port(bench.port);
    let (started, _lease) = broker.start_leased()?;
    let kafka = TestKafka::at(&broker.bootstrap());
    let runtime = tokio::runtime::Runtime::new()?;
    let app = kafka.unique_name("bench-cluster");
    let input = format!("{app}-orders");
    runtime.block_on(kafka.create_topic(&input, bench.partitions))?;
    let dir = tempfile::tempdir()?;
    let result = runtime.block_on(measure(
        bench,
        &binaries.node,
        &binaries.cli,
        &kafka,
        &app,
        &input,
        dir.path(),
    ));
    kafka.delete_topics_with_prefix(&format!("{app}-"), Some(&app))?;
    if started == Started::New {
        broker.stop()?;
    }
    let report = result?;
    println!();
    println!(
        "cluster: {} partitions, one standby each, {} customers; broker, nodes, producer and \
         bench on this machine",
        bench.partitions, bench.customers
    );
    for line in report {
        println!("{line}");
    }
    Ok(())
}

/// Starts node `id` of the cluster `app`, joining the gossip of `seeds`.
pub(crate) async fn start(
    node_binary: &Path,
    kafka: &TestKafka,
    app: &str,
    input: &str,
    dir: &Path,
    id: &str,
    seeds: &[String],
) -> Result<Node> {
    let node_dir = dir.join(id);
    std::fs::create_dir_all(&node_dir)?;
    let settings = [
        format!("node-id={id}"),
        format!("app-id={app}"),
        format!("cluster-id={app}"),
        format!("input-topic={input}"),
        format!("state-dir={}", node_dir.join("state").display()),
        "grpc-address=127.0.0.1:0".to_owned(),
        "metrics-address=127.0.0.1:0".to_owned(),
        "gossip-address=127.0.0.1:0".to_owned(),
        format!("seeds={}", seeds.join(",")),
        format!("kafka.bootstrap.servers={}", kafka.bootstrap()),
        "kafka.session.timeout.ms=10000".to_owned(),
    ];
    let args: Vec<String> = settings
        .iter()
        .flat_map(|setting| ["--set".to_owned(), setting.clone()])
        .collect();
    let mut process = TestProcess::start(id, node_binary, &args, &node_dir.join("node.log"))?;
    let grpc = process.logged_address("serving gRPC", Duration::from_secs(120))?;
    let metrics = process.logged_address("serving Prometheus metrics", Duration::from_secs(60))?;
    let gossip = process.logged_address("gossiping", Duration::from_secs(60))?;
    let client = QueryClient::connect(format!("http://{grpc}")).await?;
    Ok(Node {
        id: id.to_owned(),
        process,
        client,
        metrics,
        gossip,
        grpc,
    })
}

async fn view(node: &mut Node) -> Result<ClusterView> {
    if let Some(status) = node.process.try_exit()? {
        bail!("{} exited with {status}:\n{}", node.id, node.process.tail());
    }
    let answer = node.client.metadata(MetadataRequest {}).await?.into_inner();
    Ok(ClusterView::from_proto(&answer))
}

fn counter(address: &str, name: &str) -> Result<u64> {
    let text = kstore_testkit::process::http_get(address, "/metrics")?;
    Ok(text
        .lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64)
}

/// Per partition, its holders and their roles.
type Layout = Vec<Vec<(String, Role)>>;

/// Waits until every partition has had one live active and one live standby, both caught
/// up with the input (lag 0 in `node`'s view), on the same nodes for three seconds, and
/// returns the view.
pub(crate) async fn wait_settled(
    node: &mut Node,
    partitions: u32,
    nodes: usize,
) -> Result<ClusterView> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut stable_since: Option<(Instant, Layout)> = None;
    loop {
        let view = view(node).await?;
        let live = view
            .nodes
            .iter()
            .filter(|n| n.liveness == Liveness::Live)
            .count();
        let settled = live == nodes
            && (0..partitions).all(|p| {
                let holders = view.holders(p);
                let count = |role| {
                    holders
                        .iter()
                        .filter(|h| h.copy.role == role && h.routable() && h.copy.lag == 0)
                        .count()
                };
                count(Role::Active) == 1 && count(Role::Standby) == 1
            });
        let layout: Layout = (0..partitions)
            .map(|p| {
                view.holders(p)
                    .iter()
                    .map(|h| (h.node.node_id.clone(), h.copy.role))
                    .collect()
            })
            .collect();
        match &stable_since {
            Some((since, same)) if settled && *same == layout => {
                if since.elapsed() >= Duration::from_secs(3) {
                    return Ok(view);
                }
            }
            _ => stable_since = settled.then(|| (Instant::now(), layout)),
        }
        if Instant::now() > deadline {
            bail!("the cluster did not settle within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn percentile(sorted: &[i64], q: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    bench: &ClusterBench,
    node_binary: &Path,
    cli: &Path,
    kafka: &TestKafka,
    app: &str,
    input: &str,
    dir: &Path,
) -> Result<Vec<String>> {
    let mut report = Vec::new();
    let generator = GeneratorConfig {
        customers: bench.customers,
        ..GeneratorConfig::default()
    };
    eprintln!("bench: producing {} events", bench.events);
    produce(&ProduceOptions {
        bootstrap: kafka.bootstrap().into(),
        topic: input.into(),
        count: bench.events,
        skip: 0,
        rate: 0,
        generator: generator.clone(),
        kafka: Vec::new(),
    })?;

    // 1. One node ingests everything; a second one's copies catch up from zero.
    eprintln!("bench: node-1 ingests alone");
    let mut node1 = start(node_binary, kafka, app, input, dir, "node-1", &[]).await?;
    let end: i64 = kafka.end_offsets(input, bench.partitions)?.iter().sum();
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let committed: i64 = kafka
            .committed_offsets(app, input, bench.partitions)?
            .iter()
            .map(|c| *c.max(&0))
            .sum();
        if committed >= end {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "node-1 did not ingest within 30 minutes"
        );
        if let Some(status) = node1.process.try_exit()? {
            bail!("node-1 exited with {status}:\n{}", node1.process.tail());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("bench: node-2 joins and catches up");
    let seeds = vec![node1.gossip.clone()];
    let mut node2 = start(node_binary, kafka, app, input, dir, "node-2", &seeds).await?;
    let mut first: Option<(Instant, u64)> = None;
    let mut last = (Instant::now(), 0);
    loop {
        let applied = counter(&node2.metrics, "kstore_updater_records_total")?;
        let now = Instant::now();
        if applied > 0 && first.is_none() {
            first = Some((now, applied));
        }
        if applied > last.1 {
            last = (now, applied);
        }
        let view = view(&mut node2).await?;
        let mine = view.nodes.iter().find(|n| n.node_id == "node-2");
        let caught_up = mine.is_some_and(|n| {
            !n.copies.is_empty()
                && n.copies
                    .iter()
                    .all(|c| c.lag == 0 && c.role != Role::Restoring)
        });
        if caught_up && first.is_some() && now.duration_since(last.0) > Duration::from_secs(2) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "node-2 did not catch up within 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (t0, c0) = first.context("node-2's updater applied nothing")?;
    let seconds = last.0.duration_since(t0).as_secs_f64().max(1e-3);
    report.push(format!(
        "state updater catching up from zero: {} changelog records in {seconds:.1} s = {:.0} records/s",
        last.1 - c0,
        (last.1 - c0) as f64 / seconds
    ));

    // 2. Standby lag while the actives ingest.
    eprintln!("bench: node-3 joins");
    let seeds = vec![node1.gossip.clone(), node2.gossip.clone()];
    let mut node3 = start(node_binary, kafka, app, input, dir, "node-3", &seeds).await?;
    let settled = wait_settled(&mut node1, bench.partitions, 3).await?;
    // One key per partition, read from its standby's node and its active's node.
    let mut probes: BTreeMap<u32, (String, String, Vec<u8>)> = BTreeMap::new();
    for customer in 0..bench.customers {
        let key = kstore_cli::generator::OrderGenerator::customer_id(customer).into_bytes();
        let partition = partition_for_key(&key, bench.partitions);
        if probes.contains_key(&partition) {
            continue;
        }
        let holders = settled.holders(partition);
        let node_of = |role| {
            holders
                .iter()
                .find(|h| h.copy.role == role)
                .map(|h| h.node.node_id.clone())
        };
        if let (Some(active), Some(standby)) = (node_of(Role::Active), node_of(Role::Standby)) {
            probes.insert(partition, (active, standby, key));
        }
    }
    ensure!(
        probes.len() == bench.partitions as usize,
        "keys for every partition"
    );
    eprintln!(
        "bench: {} events/s for {} s; sampling every copy's lag every 100 ms",
        bench.ingest_rate, bench.seconds
    );
    let count = bench.ingest_rate * bench.seconds;
    let mut producer = TestProcess::start(
        "kstore produce",
        cli,
        &[
            "produce".into(),
            "--topic".into(),
            input.into(),
            "--bootstrap".into(),
            kafka.bootstrap().into(),
            "--seed".into(),
            "77".into(),
            "--count".into(),
            count.to_string(),
            "--rate".into(),
            bench.ingest_rate.to_string(),
            "--customers".into(),
            bench.customers.to_string(),
        ],
        &dir.join("produce.log"),
    )?;
    let mut standby_lags = Vec::new();
    let mut active_lags = Vec::new();
    let watermarks: rdkafka::consumer::BaseConsumer = kafka.client_config().create()?;
    let mut nodes: Vec<&mut Node> = vec![&mut node1, &mut node2, &mut node3];
    let sampling = Instant::now();
    while producer.try_exit()?.is_none() {
        ensure!(
            sampling.elapsed() < Duration::from_secs(bench.seconds * 3 + 60),
            "the producer did not finish"
        );
        for (partition, (active, standby, key)) in &probes {
            for (holder, lags) in [(standby, 0), (active, 1)] {
                let node = nodes.iter_mut().find(|n| &n.id == holder).context("node")?;
                let answer = node
                    .client
                    .get(GetRequest {
                        store: "features".into(),
                        key: key.clone(),
                        partition: None,
                        options: Some(ReadOptions {
                            min_input_offset: None,
                            no_forward: true,
                        }),
                    })
                    .await;
                // A copy that moved (placement settling) is skipped in this sample.
                let Ok(answer) = answer else { continue };
                let read = answer.into_inner().read.context("read metadata")?;
                ensure!(
                    read.role()
                        == if lags == 0 {
                            Role::Standby
                        } else {
                            Role::Active
                        },
                    "{holder} answered as {:?} for partition {partition}",
                    read.role()
                );
                let (_, end) = watermarks.fetch_watermarks(
                    input,
                    *partition as i32,
                    Duration::from_secs(5),
                )?;
                let lag = (end - read.input_offset).max(0);
                if lags == 0 {
                    standby_lags.push(lag);
                } else {
                    active_lags.push(lag);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    standby_lags.sort_unstable();
    active_lags.sort_unstable();
    let per_partition_rate = bench.ingest_rate as f64 / f64::from(bench.partitions);
    for (what, lags) in [("standby", &standby_lags), ("active", &active_lags)] {
        let (p50, p99, max) = (
            percentile(lags, 0.5),
            percentile(lags, 0.99),
            lags.last().copied().unwrap_or(0),
        );
        report.push(format!(
            "{what} lag at {} events/s ({} samples): p50 {p50} records, p99 {p99}, max {max} \
             (p99 ≈ {:.0} ms of input at {per_partition_rate:.0} events/s per partition)",
            bench.ingest_rate,
            lags.len(),
            p99 as f64 / per_partition_rate * 1000.0
        ));
    }

    // 3. kill -9 of node-3: when do the others see it suspect, and dead?
    eprintln!("bench: kill -9 of node-3");
    let [node1, node2, node3] = <[&mut Node; 3]>::try_from(nodes)
        .ok()
        .context("three nodes")?;
    node3.process.kill9()?;
    let killed = Instant::now();
    let mut seen: BTreeMap<(String, Liveness), Duration> = BTreeMap::new();
    while seen.len() < 4 {
        ensure!(
            killed.elapsed() < Duration::from_secs(120),
            "node-3 still live in a view after 2 minutes: {seen:?}"
        );
        for node in [&mut *node1, &mut *node2] {
            let view = view(node).await?;
            let liveness = view
                .nodes
                .iter()
                .find(|n| n.node_id == "node-3")
                .map_or(Liveness::Dead, |n| n.liveness);
            for reached in [Liveness::Suspect, Liveness::Dead] {
                if liveness >= reached {
                    seen.entry((node.id.clone(), reached))
                        .or_insert(killed.elapsed());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let slowest = |reached| {
        seen.iter()
            .filter(|((_, l), _)| *l == reached)
            .map(|(_, d)| *d)
            .max()
            .unwrap_or_default()
    };
    report.push(format!(
        "kill -9 of a node: every other node saw it suspect after {} ms, dead after {} ms \
         (dead-after-ms 10000)",
        slowest(Liveness::Suspect).as_millis(),
        slowest(Liveness::Dead).as_millis()
    ));
    for node in [node1, node2] {
        node.process.terminate(Duration::from_secs(60))?;
    }
    Ok(report)
}
