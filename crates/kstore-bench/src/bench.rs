//! `cargo xtask bench ingest | get`: one `kstore-node`'s sustained ingest rate, and its read
//! latency at a fixed request rate.
//!
//! For each processing guarantee: create a fresh input topic, fill it with generated order
//! events (not timed), start one node with an empty state directory, and watch the group's
//! committed offsets. The rate is the records committed between the first commit and the
//! moment every record is committed, divided by that time, so JVM warm-up of the broker,
//! group join and topic creation are left out. RSS is read from /proc just before SIGTERM.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kstore_cli::generator::{GeneratorConfig, OrderGenerator};
use kstore_cli::produce::{ProduceOptions, produce};
use kstore_testkit::TestKafka;
use kstore_testkit::broker::{Broker, DEFAULT_PORT, Started};
use kstore_testkit::process::TestProcess;

/// What `bench ingest` measures.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestBench {
    /// Events to ingest per guarantee.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Partitions of the input topic.
    #[arg(long, default_value_t = 12)]
    pub partitions: u32,
    /// Customers the events spread over.
    #[arg(long, default_value_t = 100_000)]
    pub customers: u32,
    /// Which guarantees to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "exactly-once,at-least-once"
    )]
    pub guarantees: Vec<String>,
    /// Nodes that ingest together (gossiping as one cluster, with one standby per partition
    /// when there are several).
    #[arg(long, default_value_t = 1)]
    pub nodes: u16,
    /// The broker's port.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// A node setting, `key=value`, for every node (repeatable): for example
    /// `--set processor.wasm=features.wasm --set processor.outputs.alerts=alerts` measures
    /// the features processor as a WebAssembly module.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub settings: Vec<String>,
}

struct Measurement {
    guarantee: String,
    events_per_second: f64,
    measured_records: i64,
    seconds: f64,
    rss_kib: u64,
    peak_rss_kib: u64,
}

/// Runs the bench (see the module documentation), prints its table and returns its rows.
pub fn ingest(bench: &IngestBench) -> Result<serde_json::Value> {
    let node_binary = crate::binaries::locate()?.node;
    let broker = Broker::on_port(bench.port);
    let (started, _lease) = broker.start_leased()?;
    let kafka = TestKafka::at(&broker.bootstrap());
    let runtime = tokio::runtime::Runtime::new()?;
    let mut results = Vec::new();
    for guarantee in &bench.guarantees {
        results.push(measure(&runtime, &kafka, &node_binary, bench, guarantee)?);
    }
    if started == Started::New {
        broker.stop()?;
    }

    println!();
    println!(
        "ingest, {} node(s), {} partitions, {} events over {} customers, broker on the same machine",
        bench.nodes, bench.partitions, bench.events, bench.customers
    );
    println!(
        "{:<15} {:>12} {:>10} {:>9} {:>10} {:>10}",
        "guarantee", "events/s", "measured", "seconds", "RSS MiB", "peak MiB"
    );
    for m in &results {
        println!(
            "{:<15} {:>12.0} {:>10} {:>9.1} {:>10.0} {:>10.0}",
            m.guarantee,
            m.events_per_second,
            m.measured_records,
            m.seconds,
            m.rss_kib as f64 / 1024.0,
            m.peak_rss_kib as f64 / 1024.0
        );
    }
    Ok(serde_json::json!({
        "nodes": bench.nodes,
        "partitions": bench.partitions,
        "events": bench.events,
        "customers": bench.customers,
        "settings": bench.settings,
        "guarantees": results
            .iter()
            .map(|m| serde_json::json!({
                "guarantee": m.guarantee,
                "events_per_second": m.events_per_second,
                "measured_records": m.measured_records,
                "seconds": m.seconds,
                "rss_bytes": m.rss_kib * 1024,
                "peak_rss_bytes": m.peak_rss_kib * 1024,
            }))
            .collect::<Vec<_>>(),
    }))
}

fn measure(
    runtime: &tokio::runtime::Runtime,
    kafka: &TestKafka,
    node_binary: &Path,
    bench: &IngestBench,
    guarantee: &str,
) -> Result<Measurement> {
    let app = kafka.unique_name(&format!("bench-{guarantee}"));
    let input = format!("{app}-orders");
    runtime.block_on(kafka.create_topic(&input, bench.partitions))?;
    eprintln!("bench: producing {} events to {input}", bench.events);
    let summary = produce(&ProduceOptions {
        bootstrap: kafka.bootstrap().into(),
        topic: input.clone(),
        count: bench.events,
        skip: 0,
        rate: 0,
        generator: GeneratorConfig {
            customers: bench.customers,
            ..GeneratorConfig::default()
        },
        kafka: Vec::new(),
    })?;
    eprintln!(
        "bench: produced in {:.1}s; starting kstore-node ({guarantee})",
        summary.elapsed.as_secs_f64()
    );

    let dir = tempfile::tempdir()?;
    let mut nodes: Vec<TestProcess> = Vec::new();
    let mut seeds = Vec::new();
    for i in 1..=bench.nodes.max(1) {
        let node_dir = dir.path().join(format!("node-{i}"));
        std::fs::create_dir_all(&node_dir)?;
        let mut extra = vec![
            format!("processing-guarantee={guarantee}"),
            format!("node-id=bench-node-{i}"),
            format!("seeds={}", seeds.join(",")),
        ];
        extra.extend(bench.settings.iter().cloned());
        let mut node = start_bench_node(node_binary, kafka, &app, &input, &node_dir, &extra)?;
        seeds.push(node.logged_address("gossiping", Duration::from_secs(60))?);
        nodes.push(node);
    }

    let end: i64 = kafka.end_offsets(&input, bench.partitions)?.iter().sum();
    let committed = || -> Result<i64> {
        Ok(kafka
            .committed_offsets(&app, &input, bench.partitions)?
            .iter()
            .map(|c| c.max(&0))
            .sum())
    };
    let deadline = Instant::now() + Duration::from_secs(1800);
    let all_alive = |nodes: &mut Vec<TestProcess>| -> Result<()> {
        nodes
            .iter_mut()
            .try_for_each(|node| check_alive(node, deadline))
    };
    let (first_at, first_committed) = loop {
        let now = committed()?;
        if now > 0 {
            break (Instant::now(), now);
        }
        all_alive(&mut nodes)?;
        std::thread::sleep(Duration::from_millis(20));
    };
    loop {
        if committed()? >= end {
            break;
        }
        all_alive(&mut nodes)?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let seconds = first_at.elapsed().as_secs_f64();
    let (mut rss_kib, mut peak_rss_kib) = (0, 0);
    for node in &nodes {
        let (rss, peak) = rss(node.pid())?;
        rss_kib += rss;
        peak_rss_kib += peak;
    }
    for node in &mut nodes {
        let status = node.terminate(Duration::from_secs(60))?;
        if !status.success() {
            bail!("kstore-node exited with {status}:\n{}", node.tail());
        }
    }
    kafka.delete_topics_with_prefix(&format!("{app}-"), Some(&app))?;
    let measured_records = end - first_committed;
    Ok(Measurement {
        guarantee: guarantee.into(),
        events_per_second: measured_records as f64 / seconds,
        measured_records,
        seconds,
        rss_kib,
        peak_rss_kib,
    })
}

fn check_alive(node: &mut TestProcess, deadline: Instant) -> Result<()> {
    if let Some(status) = node.try_exit()? {
        bail!("kstore-node exited with {status}:\n{}", node.tail());
    }
    if Instant::now() > deadline {
        bail!("kstore-node did not finish within 30 minutes");
    }
    Ok(())
}

/// Starts one node for a benchmark: its state in `dir`, ephemeral gRPC and gossip ports
/// (logged as `serving gRPC address=…`), no metrics port, a cluster of its own.
pub(crate) fn start_bench_node(
    node_binary: &Path,
    kafka: &TestKafka,
    app: &str,
    input: &str,
    dir: &Path,
    extra: &[String],
) -> Result<TestProcess> {
    let settings = [
        "node-id=bench-node".to_owned(),
        format!("app-id={app}"),
        format!("input-topic={input}"),
        format!("state-dir={}", dir.join("state").display()),
        "grpc-address=127.0.0.1:0".to_owned(),
        "metrics-address=".to_owned(),
        "gossip-address=127.0.0.1:0".to_owned(),
        format!("cluster-id={app}"),
        format!("kafka.bootstrap.servers={}", kafka.bootstrap()),
    ];
    let args: Vec<String> = settings
        .iter()
        .chain(extra)
        .flat_map(|setting| ["--set".to_owned(), setting.clone()])
        .collect();
    TestProcess::start("kstore-node", node_binary, &args, &dir.join("node.log"))
}

/// Returns VmRSS and VmHWM (peak) in KiB.
pub(crate) fn rss(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// What `bench get` measures.
#[derive(Debug, Clone, clap::Args)]
pub struct GetBench {
    /// Get requests per second.
    #[arg(long, default_value_t = 5_000)]
    pub rate: u64,
    /// Seconds per phase.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Events per second produced during the ingest phase.
    #[arg(long, default_value_t = 20_000)]
    pub ingest_rate: u64,
    /// Customers (keys) in the store.
    #[arg(long, default_value_t = 50_000)]
    pub customers: u32,
    /// Partitions of the input topic.
    #[arg(long, default_value_t = 12)]
    pub partitions: u32,
    /// Run the broker and the ingest phase's producer at this niceness (for example 10),
    /// standing in for a Kafka cluster and producers on machines of their own.
    #[arg(long)]
    pub remote_nice: Option<i32>,
    /// The broker's port.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Measure a running cluster instead (nodes this bench did not start): gRPC addresses
    /// of some of its nodes, comma-separated. Reads go through kstore-client, as a caller's
    /// would; `--customers` must match the keys the cluster holds.
    #[arg(long, value_delimiter = ',')]
    pub seeds: Vec<String>,
    /// With `--seeds`: the client's read policy (default prefer-active). With
    /// `--paused-node`: measure this policy only (default: prefer-active and any-replica).
    #[arg(long, value_enum)]
    pub policy: Option<BenchPolicy>,
    /// With `--seeds`: hedge a read after this many milliseconds (0: never). With
    /// `--paused-node`: the hedged configurations' delay (0: the client's default, after the
    /// p99 of recent latency, 5–50 ms).
    #[arg(long, default_value_t = 0)]
    pub hedge_ms: u64,
    /// Start a 3-node cluster (one standby per partition) and measure Get through
    /// kstore-client for PreferActive and AnyReplica, each without and with hedging: with no
    /// fault, and while one node is SIGSTOPped (see `--pause-seconds`).
    #[arg(long, conflicts_with_all = ["seeds", "remote_nice"])]
    pub paused_node: bool,
    /// With `--paused-node`: how long the node stays stopped in each fault phase (from a
    /// quarter of `--seconds` in).
    #[arg(long, default_value_t = 5)]
    pub pause_seconds: u64,
}

/// The read policies `bench get --seeds` can use.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum BenchPolicy {
    ActiveOnly,
    PreferActive,
    AnyReplica,
}

/// One latency run's result.
pub(crate) struct Latencies {
    pub(crate) phase: String,
    /// Microseconds from each request's scheduled start to its answer (open-loop response
    /// time: a generator or client that falls behind shows here too).
    pub(crate) response: hdrhistogram::Histogram<u64>,
    /// Microseconds from each request's actual start to its answer.
    service: hdrhistogram::Histogram<u64>,
    /// How late requests started against the schedule, p99.
    start_lag_p99_ms: f64,
    /// The node's own p99 for Get (a histogram bucket bound), if measured.
    server_p99_ms: Option<f64>,
    pub(crate) errors: u64,
    pub(crate) sent: u64,
    pub(crate) seconds: f64,
    /// (seconds from the phase's start to the request's scheduled start, response time in
    /// microseconds) of every answered request, for latency-over-time charts.
    pub(crate) timeline: Vec<(f64, u64)>,
}

/// How long `bench get` waits after loading before it measures.
const SETTLE: Duration = Duration::from_secs(15);

/// Measures Get latency at a fixed rate, idle and while ingesting, and MultiGet of 100 keys.
/// With `--seeds`, measures a running cluster through the smart client instead; with
/// `--paused-node`, a cluster of its own through the smart client, under a paused node.
pub fn get(bench: &GetBench) -> Result<()> {
    if bench.paused_node {
        return crate::paused_bench::run(bench).map(drop);
    }
    if !bench.seeds.is_empty() {
        return get_through_client(bench);
    }
    let binaries = crate::binaries::locate()?;
    let broker = Broker::on_port(bench.port);
    let (started, _lease) = broker.start_leased()?;
    let kafka = TestKafka::at(&broker.bootstrap());
    if let Some(nice) = bench.remote_nice {
        renice_broker(&broker, nice)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;

    let app = kafka.unique_name("bench-get");
    let input = format!("{app}-orders");
    runtime.block_on(kafka.create_topic(&input, bench.partitions))?;
    let generator = GeneratorConfig {
        customers: bench.customers,
        ..GeneratorConfig::default()
    };
    let preload = u64::from(bench.customers) * 4;
    eprintln!(
        "bench: loading {preload} events over {} customers",
        bench.customers
    );
    produce(&ProduceOptions {
        bootstrap: kafka.bootstrap().into(),
        topic: input.clone(),
        count: preload,
        skip: 0,
        rate: 0,
        generator: generator.clone(),
        kafka: Vec::new(),
    })?;

    let dir = tempfile::tempdir()?;
    // The node's own read-latency histogram tells server time from client and network time.
    let extra = ["metrics-address=127.0.0.1:0".to_owned()];
    let mut node = start_bench_node(&binaries.node, &kafka, &app, &input, dir.path(), &extra)?;
    let metrics_address =
        node.logged_address("serving Prometheus metrics", Duration::from_secs(120))?;
    let caught_up = |node: &mut TestProcess, timeout: Duration| -> Result<Duration> {
        let started = Instant::now();
        let end: i64 = kafka.end_offsets(&input, bench.partitions)?.iter().sum();
        loop {
            let committed: i64 = kafka
                .committed_offsets(&app, &input, bench.partitions)?
                .iter()
                .map(|c| *c.max(&0))
                .sum();
            if committed >= end {
                return Ok(started.elapsed());
            }
            check_alive(node, started + timeout)?;
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    caught_up(&mut node, Duration::from_secs(600))?;
    let uri = format!(
        "http://{}",
        node.logged_address("serving gRPC", Duration::from_secs(10))?
    );
    let channel = ReadTarget::Nodes(vec![
        runtime.block_on(tonic::transport::Channel::from_shared(uri)?.connect())?,
    ]);

    // Let the preload's compactions (RocksDB's and the broker's) finish, then warm the
    // connection and the block cache with a short unrecorded run.
    eprintln!("bench: settling for {}s, then warming up", SETTLE.as_secs());
    std::thread::sleep(SETTLE);
    let warm_up = GetBench {
        seconds: 3,
        ..bench.clone()
    };
    runtime.block_on(open_loop("warm-up", &channel, &warm_up, 1))?;

    let mut results = Vec::new();
    eprintln!(
        "bench: Get at {}/s for {}s, idle",
        bench.rate, bench.seconds
    );
    let before = server_get_buckets(&metrics_address)?;
    let mut idle = runtime.block_on(open_loop("Get, idle", &channel, bench, 1))?;
    idle.server_p99_ms = server_p99_ms(&before, &server_get_buckets(&metrics_address)?);
    results.push(idle);

    eprintln!(
        "bench: Get at {}/s while ingesting {} events/s",
        bench.rate, bench.ingest_rate
    );
    let end_before: i64 = kafka.end_offsets(&input, bench.partitions)?.iter().sum();
    let mut producer = start_ingest_producer(&binaries.cli, &kafka, &input, bench, dir.path())?;
    std::thread::sleep(Duration::from_secs(3));
    let before = server_get_buckets(&metrics_address)?;
    let mut under_ingest = runtime.block_on(open_loop("Get, ingesting", &channel, bench, 1))?;
    under_ingest.server_p99_ms = server_p99_ms(&before, &server_get_buckets(&metrics_address)?);
    results.push(under_ingest);
    let produced = producer.wait_exit(Duration::from_secs(120))?;
    if !produced.success() {
        bail!(
            "kstore produce exited with {produced}:\n{}",
            producer.tail()
        );
    }
    let ingested = kafka
        .end_offsets(&input, bench.partitions)?
        .iter()
        .sum::<i64>()
        - end_before;

    // Whether ingest kept up while reads had the CPU first.
    let catch_up = caught_up(&mut node, Duration::from_secs(120))?;
    let multi = GetBench {
        rate: (bench.rate / 10).max(1),
        ..bench.clone()
    };
    eprintln!(
        "bench: MultiGet of 100 keys at {}/s, after ingest",
        multi.rate
    );
    results.push(runtime.block_on(open_loop("MultiGet 100, idle", &channel, &multi, 100))?);

    let status = node.terminate(Duration::from_secs(60))?;
    if !status.success() {
        bail!("kstore-node exited with {status}");
    }
    kafka.delete_topics_with_prefix(&format!("{app}-"), Some(&app))?;
    if started == Started::New {
        broker.stop()?;
    }

    println!();
    println!(
        "read latency, one node, {} partitions, {} customers; the ingest phase produced {ingested} \
         events at {}/s; broker and producer at niceness {}",
        bench.partitions,
        bench.customers,
        bench.ingest_rate,
        bench.remote_nice.unwrap_or(0)
    );
    println!(
        "the node had committed every input record {} ms after the producer's last one",
        catch_up.as_millis()
    );
    println!(
        "response time is measured from each request's scheduled start; 'from send' from its \
         actual start; 'node' is the server's own histogram (a bucket bound)"
    );
    println!(
        "{:<20} {:>7} {:>7} {:>8} {:>8} {:>9} {:>8} {:>6} {:>10} {:>10} {:>9}",
        "phase",
        "req/s",
        "sent",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "errors",
        "from send",
        "start lag",
        "node p99"
    );
    for r in &results {
        let ms = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{:<20} {:>7.0} {:>7} {:>8.3} {:>8.3} {:>9.3} {:>8.3} {:>6} {:>10.3} {:>10.3} {:>9}",
            r.phase,
            r.sent as f64 / r.seconds,
            r.sent,
            ms(&r.response, 0.5),
            ms(&r.response, 0.99),
            ms(&r.response, 0.999),
            r.response.max() as f64 / 1000.0,
            r.errors,
            ms(&r.service, 0.99),
            r.start_lag_p99_ms,
            r.server_p99_ms
                .map_or("-".to_owned(), |ms| format!("<= {ms}"))
        );
    }
    Ok(())
}

/// Starts `kstore produce` for the ingest phase, at the remote niceness if one is set.
fn start_ingest_producer(
    cli: &Path,
    kafka: &TestKafka,
    input: &str,
    bench: &GetBench,
    dir: &Path,
) -> Result<TestProcess> {
    let count = bench.ingest_rate * (bench.seconds + 5);
    let mut args: Vec<String> = Vec::new();
    let program = match bench.remote_nice {
        Some(nice) => {
            args.extend(["-n".into(), nice.to_string(), cli.display().to_string()]);
            Path::new("nice")
        }
        None => cli,
    };
    args.extend(
        [
            "produce",
            "--topic",
            input,
            "--bootstrap",
            kafka.bootstrap(),
            "--seed",
            "99",
        ]
        .map(str::to_owned),
    );
    args.extend(["--count".into(), count.to_string()]);
    args.extend(["--rate".into(), bench.ingest_rate.to_string()]);
    args.extend(["--customers".into(), bench.customers.to_string()]);
    TestProcess::start("kstore produce", program, &args, &dir.join("produce.log"))
}

/// Returns the node's cumulative Get latency buckets (upper bound in seconds, count), summed
/// over roles and outcomes, from its Prometheus endpoint.
fn server_get_buckets(address: &str) -> Result<Vec<(f64, u64)>> {
    let text = kstore_testkit::process::http_get(address, "/metrics")?;
    let mut buckets: std::collections::BTreeMap<String, (f64, u64)> = Default::default();
    let get_buckets = text.lines().filter(|l| {
        l.starts_with("kstore_read_latency_seconds_bucket{") && l.contains("method=\"get\"")
    });
    for line in get_buckets {
        // The `le` label comes last (and "role=" also ends in "le=").
        let le = line
            .rsplit_once(",le=\"")
            .and_then(|(_, r)| r.split('"').next())
            .unwrap_or("+Inf");
        let count: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let bound = le.parse().unwrap_or(f64::INFINITY);
        buckets.entry(le.to_owned()).or_insert((bound, 0)).1 += count;
    }
    let mut buckets: Vec<(f64, u64)> = buckets.into_values().collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(buckets)
}

/// Returns the bucket bound (ms) under which 99 % of the Get calls between two snapshots fell.
fn server_p99_ms(before: &[(f64, u64)], after: &[(f64, u64)]) -> Option<f64> {
    let count_before = |bound: f64| before.iter().find(|b| b.0 == bound).map_or(0, |b| b.1);
    let deltas: Vec<(f64, u64)> = after
        .iter()
        .map(|(bound, n)| (*bound, n.saturating_sub(count_before(*bound))))
        .collect();
    let total = deltas.last()?.1;
    let wanted = (total as f64 * 0.99).ceil() as u64;
    deltas
        .iter()
        .find(|(_, n)| *n >= wanted)
        .map(|(bound, _)| bound * 1000.0)
}

/// Sets the niceness of every process in the broker's process group.
fn renice_broker(broker: &Broker, nice: i32) -> Result<()> {
    let pid = broker
        .status()
        .pid
        .context("no broker started by kstore to renice")?;
    // The broker (and its supervisor, if any) lead a process group of their own.
    let group = std::fs::read_to_string(format!("/proc/{pid}/stat"))?
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(2).map(str::to_owned))
        .context("reading the broker's process group")?;
    let tasks: Vec<String> = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|name| name.chars().all(|c| c.is_ascii_digit()))
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|stat| {
                stat.rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().nth(2))
                    == Some(&group)
            })
        })
        .flat_map(|p| {
            std::fs::read_dir(format!("/proc/{p}/task"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|t| t.file_name().to_str().map(str::to_owned))
        })
        .collect();
    let status = Command::new("renice")
        .arg("-n")
        .arg(nice.to_string())
        .arg("-p")
        .args(&tasks)
        .stdout(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        bail!("renice of the broker's {} threads failed", tasks.len());
    }
    eprintln!(
        "bench: the broker's {} threads run at niceness {nice}",
        tasks.len()
    );
    Ok(())
}

/// Where `bench get` sends its reads: one node over a raw channel, or a cluster through
/// the smart client.
#[derive(Clone)]
pub(crate) enum ReadTarget {
    /// Raw Gets over these channels, one node after the other.
    Nodes(Vec<tonic::transport::Channel>),
    Client(std::sync::Arc<kstore_client::Client>),
}

/// Sends requests on a fixed schedule (open loop): a pacing thread sleeps until each
/// request's scheduled time and starts it on the runtime without waiting for earlier
/// answers. Response time is measured from the scheduled time, service time from the actual
/// start, and how late starts were against the schedule is recorded too (start lag).
pub(crate) async fn open_loop(
    phase: &str,
    target: &ReadTarget,
    bench: &GetBench,
    keys_per_request: usize,
) -> Result<Latencies> {
    use kstore_proto::v1::query_client::QueryClient;
    use kstore_proto::v1::{GetRequest, MultiGetRequest};
    use std::sync::{Arc, Mutex};

    let new_histogram = || hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3);
    // (response time, service time, timeline)
    let histograms = Arc::new(Mutex::new((new_histogram()?, new_histogram()?, Vec::new())));
    let mut start_lag = new_histogram()?;
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let total = bench.rate * bench.seconds;
    let runtime = tokio::runtime::Handle::current();
    let start = Instant::now();
    // The pacing thread: a thread of its own for each phase, so that its real-time policy
    // ends with it.
    let paced = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                run_pacer_real_time();
                let mut tasks = Vec::with_capacity(total as usize);
                for i in 0..total {
                    let scheduled = start + Duration::from_secs_f64(i as f64 / bench.rate as f64);
                    // Sleeping here, off the runtime's worker, paces requests finely
                    // without holding up the requests themselves.
                    if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let _ = start_lag.record((scheduled.elapsed().as_micros() as u64).max(1));
                    let target = target.clone();
                    let histograms = histograms.clone();
                    let errors = errors.clone();
                    let customers = bench.customers;
                    tasks.push(runtime.spawn(async move {
                        let key = |n: u64| {
                            let customer =
                                (n.wrapping_mul(2_654_435_761) % u64::from(customers)) as u32;
                            OrderGenerator::customer_id(customer).into_bytes()
                        };
                        let began = Instant::now();
                        // Found or not, an answer is a success; only failed calls are errors.
                        let keys: Vec<Vec<u8>> = if keys_per_request == 1 {
                            vec![key(i)]
                        } else {
                            (0..keys_per_request as u64)
                                .map(|k| key(i * 1000 + k))
                                .collect()
                        };
                        let ok = match (&target, keys_per_request) {
                            (ReadTarget::Nodes(channels), 1) => {
                                let channel = &channels[i as usize % channels.len()];
                                let request = GetRequest {
                                    store: "features".into(),
                                    key: keys[0].clone(),
                                    partition: None,
                                    options: None,
                                };
                                QueryClient::new(channel.clone()).get(request).await.is_ok()
                            }
                            (ReadTarget::Nodes(channels), _) => {
                                let channel = &channels[i as usize % channels.len()];
                                let request = MultiGetRequest {
                                    store: "features".into(),
                                    keys,
                                    options: None,
                                };
                                QueryClient::new(channel.clone())
                                    .multi_get(request)
                                    .await
                                    .is_ok()
                            }
                            (ReadTarget::Client(client), 1) => client.get(&keys[0]).await.is_ok(),
                            (ReadTarget::Client(client), _) => {
                                let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
                                client.multi_get(&refs).await.iter().all(Result::is_ok)
                            }
                        };
                        let (response, service) = (scheduled.elapsed(), began.elapsed());
                        if ok {
                            let mut histograms = histograms
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                            let _ = histograms.0.record((response.as_micros() as u64).max(1));
                            let _ = histograms.1.record((service.as_micros() as u64).max(1));
                            histograms.2.push((
                                scheduled.duration_since(start).as_secs_f64(),
                                response.as_micros() as u64,
                            ));
                        } else {
                            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }));
                }
                tasks
            })
            .join()
    });
    let tasks = paced.map_err(|_| anyhow::anyhow!("the pacing thread panicked"))?;
    for task in tasks {
        task.await?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let (response, service, mut timeline) = histograms
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    timeline.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(Latencies {
        phase: phase.into(),
        response,
        service,
        start_lag_p99_ms: start_lag.value_at_quantile(0.99) as f64 / 1000.0,
        server_p99_ms: None,
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        sent: total,
        seconds,
        timeline,
    })
}

/// Puts the calling (pacing) thread under the real-time FIFO policy where that is allowed,
/// so that the generator's own start delays do not count against the node: a load
/// generator on a machine of its own would not wait for a CPU. The pacer only sleeps and
/// starts requests; the requests themselves run on the runtime's normal worker.
fn run_pacer_real_time() {
    use thread_priority::{
        RealtimeThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    let priority = ThreadPriorityValue::try_from(10u8).map(ThreadPriority::Crossplatform);
    let real_time = priority.is_ok_and(|priority| {
        set_thread_priority_and_policy(
            thread_native_id(),
            priority,
            ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::Fifo),
        )
        .is_ok()
    });
    if !real_time {
        eprintln!(
            "bench: the pacing thread cannot run real-time here; its delays show as start lag"
        );
    }
}

/// `bench get --seeds`: Get and MultiGet latency of a running cluster through kstore-client,
/// at a fixed rate (open loop), with the client's routing counters.
fn get_through_client(bench: &GetBench) -> Result<()> {
    use kstore_client::{Client, Hedge, ReadPolicy};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let max_lag = 10_000;
    let chosen = bench.policy.unwrap_or(BenchPolicy::PreferActive);
    let policy = match chosen {
        BenchPolicy::ActiveOnly => ReadPolicy::ActiveOnly,
        BenchPolicy::PreferActive => ReadPolicy::PreferActive { max_lag },
        BenchPolicy::AnyReplica => ReadPolicy::AnyReplica { max_lag },
    };
    let hedge = match bench.hedge_ms {
        0 => Hedge::Off,
        ms => Hedge::After(Duration::from_millis(ms)),
    };
    let client = runtime.block_on(
        Client::builder()
            .seeds(bench.seeds.clone())
            .read_policy(policy)
            .hedge(hedge)
            .build(),
    )?;
    let view = client.view();
    eprintln!(
        "bench: {} nodes in the cluster's view; warming up",
        view.nodes.len()
    );
    let target = ReadTarget::Client(std::sync::Arc::new(client));
    let warm_up = GetBench {
        seconds: 3,
        ..bench.clone()
    };
    runtime.block_on(open_loop("warm-up", &target, &warm_up, 1))?;
    let ReadTarget::Client(client) = &target else {
        unreachable!("built as a client above")
    };
    let before = client.stats();
    eprintln!("bench: Get at {}/s for {}s", bench.rate, bench.seconds);
    let get = runtime.block_on(open_loop("Get", &target, bench, 1))?;
    let after_get = client.stats();
    let multi = GetBench {
        rate: (bench.rate / 10).max(1),
        ..bench.clone()
    };
    eprintln!("bench: MultiGet of 100 keys at {}/s", multi.rate);
    let multi_get = runtime.block_on(open_loop("MultiGet 100", &target, &multi, 100))?;

    println!();
    println!(
        "reads through kstore-client ({:?}, hedge {} ms) against {} nodes of a running cluster, \
         {} customers",
        chosen,
        bench.hedge_ms,
        view.nodes.len(),
        bench.customers
    );
    println!(
        "{:<14} {:>7} {:>7} {:>8} {:>8} {:>9} {:>8} {:>6}",
        "phase", "req/s", "sent", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "errors"
    );
    for r in [&get, &multi_get] {
        let ms = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{:<14} {:>7.0} {:>7} {:>8.3} {:>8.3} {:>9.3} {:>8.3} {:>6}",
            r.phase,
            r.sent as f64 / r.seconds,
            r.sent,
            ms(&r.response, 0.5),
            ms(&r.response, 0.99),
            ms(&r.response, 0.999),
            r.response.max() as f64 / 1000.0,
            r.errors
        );
    }
    let reads = after_get.reads - before.reads;
    println!(
        "Get routing: {reads} reads, {:.2}% answered by the first host, {} by a fallback, \
         {} hedges sent ({} won), {} failovers past a stalled copy, {} misroutes corrected, \
         {} metadata refreshes",
        100.0 * (after_get.first_hop_answers - before.first_hop_answers) as f64
            / reads.max(1) as f64,
        after_get.fallback_answers - before.fallback_answers,
        after_get.hedges_sent - before.hedges_sent,
        after_get.hedges_won - before.hedges_won,
        after_get.failovers - before.failovers,
        after_get.misroutes_corrected - before.misroutes_corrected,
        after_get.metadata_refreshes - before.metadata_refreshes
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_p99_comes_from_bucket_deltas() {
        let before = vec![(0.001, 10), (0.002, 10), (f64::INFINITY, 10)];
        // 100 more calls: 98 under 1 ms, 1 under 2 ms, 1 above.
        let after = vec![(0.001, 108), (0.002, 109), (f64::INFINITY, 110)];
        assert_eq!(server_p99_ms(&before, &after), Some(2.0));
        let fast = vec![(0.001, 110), (0.002, 110), (f64::INFINITY, 110)];
        assert_eq!(server_p99_ms(&before, &fast), Some(1.0));
    }
}
