//! `cargo xtask bench compare`: kstore and the Kafka Streams baseline
//! (`bench/kafka-streams-baseline`) side by side, in one run, on one machine, against one
//! broker. Each system in turn gets a fresh input topic with the same events (a few of them
//! malformed), then:
//!
//! 1. exactly-once ingest: events/s from its first commit to every partition committed;
//! 2. Get latency, idle: an open-loop generator at a fixed rate sends plain gRPC
//!    `kstore.v1.Query/Get` calls to its nodes in turn (any node answers any key: kstore
//!    forwards, the baseline forwards to the owner `queryMetadataForKey` names);
//! 3. Get latency while `kstore produce` sends events at `--ingest-rate`;
//! 4. failed reads, and the RSS of its processes (JVM included) sampled throughout: peak, and
//!    steady (the median while idle);
//! 5. the same Get phases measured by ghz, an independent gRPC load tool (see [`crate::ghz`]),
//!    and on kstore ghz's `grpc.health.v1.Health/Check` (a call that does no work: the
//!    node's floor);
//! 6. its state's size on disk right after the ingest, once the system has stopped (each
//!    flushes its memtables at close), and after a full compaction of every RocksDB store
//!    found in its state directory (opened offline with the options it wrote).
//!
//! It writes `target/bench/compare.json`, `compare.md` (the table) and two SVG charts: read
//! latency over time for both, and ingest throughput.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kstore_cli::generator::GeneratorConfig;
use kstore_cli::produce::{ProduceOptions, produce};
use kstore_testkit::TestKafka;
use kstore_testkit::baseline::{Baseline, BaselineOptions, build_jar};
use kstore_testkit::broker::{Broker, DEFAULT_PORT, Started};
use kstore_testkit::process::TestProcess;
use serde_json::json;

use crate::bench::{GetBench, Latencies, ReadTarget, open_loop, rss};
use crate::ghz::{self, Call, Ghz, GhzLatencies};

/// What `bench compare` measures.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareBench {
    /// Nodes (kstore) and instances (Kafka Streams) per system: 1, or 3 with one standby
    /// replica of every partition.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=3))]
    pub nodes: u32,
    /// Events in the input before each system starts (the ingest measurement).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Customers (keys) the events spread over.
    #[arg(long, default_value_t = 50_000)]
    pub customers: u32,
    /// Partitions of the input topic.
    #[arg(long, default_value_t = 12)]
    pub partitions: u32,
    /// Events per second produced while reads are measured under ingest.
    #[arg(long, default_value_t = 20_000)]
    pub ingest_rate: u64,
    /// Get requests per second.
    #[arg(long, default_value_t = 2_000)]
    pub read_rate: u64,
    /// Seconds per read phase.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// The broker's port.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
}

/// Malformed records among the events, one in this many (the same ones for both systems).
const MALFORMED_EVERY: u64 = 10_000;

/// What one system measured.
struct SystemResult {
    name: &'static str,
    ingest_events_per_second: f64,
    ingest_seconds: f64,
    idle: Latencies,
    under_ingest: Latencies,
    /// Events the producer sent during the ingest phase, and whether the system had
    /// committed them all within 30 s after.
    ingest_phase_events: i64,
    caught_up_after_ingest_ms: Option<u64>,
    peak_rss_bytes: u64,
    steady_rss_bytes: u64,
    state_bytes: u64,
    /// The state's size once the system stopped, and after compacting it offline.
    stopped_state_bytes: u64,
    compacted_state_bytes: u64,
    /// ghz's measurements, if ghz is installed.
    ghz: Option<GhzPhases>,
}

/// What ghz measured of one system.
struct GhzPhases {
    get_idle: GhzLatencies,
    get_under_ingest: GhzLatencies,
    /// Health/Check, idle (kstore only: the baseline serves no health service).
    health_idle: Option<GhzLatencies>,
    /// kstore only (the baseline serves Get alone), at a tenth of the Get rate: MultiGet of
    /// [`MULTI_GET_KEYS`] keys and one Scan page of [`SCAN_PAGE`] entries, each (idle, under
    /// ingest).
    multi_get: Option<(GhzLatencies, GhzLatencies)>,
    scan_page: Option<(GhzLatencies, GhzLatencies)>,
}

/// Keys per MultiGet, and entries per Scan page, that ghz asks kstore for.
const MULTI_GET_KEYS: usize = 100;
const SCAN_PAGE: u32 = 100;

/// Samples the summed RSS of a set of processes in the background.
struct RssSampler {
    samples: Arc<std::sync::Mutex<Vec<(Instant, u64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> Self {
        let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (samples, stop) = (samples.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let kib: u64 = pids
                        .iter()
                        .filter_map(|&pid| rss(pid).ok())
                        .map(|r| r.0)
                        .sum();
                    samples
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((Instant::now(), kib * 1024));
                    std::thread::sleep(Duration::from_millis(250));
                }
            })
        };
        RssSampler {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// The peak, and the median of the samples between `from` and `to`.
    fn finish(mut self, from: Instant, to: Instant) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
        let mut steady: Vec<u64> = samples
            .iter()
            .filter(|(at, _)| *at >= from && *at <= to)
            .map(|s| s.1)
            .collect();
        steady.sort_unstable();
        (peak, steady.get(steady.len() / 2).copied().unwrap_or(0))
    }
}

/// Shows how far a phase is, as a bar on one line.
fn progress(system: &str, phase: &str, done: f64) {
    let width = 30;
    let filled = ((done.clamp(0.0, 1.0)) * width as f64) as usize;
    eprint!(
        "\r[{system:<13}] {phase:<26} [{}{}] {:>3.0}%",
        "#".repeat(filled),
        ".".repeat(width - filled),
        done.clamp(0.0, 1.0) * 100.0
    );
    if done >= 1.0 {
        eprintln!();
    }
}

/// Runs `phase` while a bar fills over `seconds`.
async fn with_bar<T>(
    system: &str,
    phase: &str,
    seconds: f64,
    work: impl std::future::Future<Output = T>,
) -> T {
    let started = Instant::now();
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => {
                progress(system, phase, 1.0);
                return out;
            }
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                progress(system, phase, started.elapsed().as_secs_f64() / seconds);
            }
        }
    }
}

/// Fills a fresh topic with the events: the generator's, with one malformed record in
/// every [`MALFORMED_EVERY`].
fn fill_topic(
    kafka: &TestKafka,
    runtime: &tokio::runtime::Runtime,
    topic: &str,
    bench: &CompareBench,
) -> Result<()> {
    runtime.block_on(kafka.create_topic(topic, bench.partitions))?;
    produce(&ProduceOptions {
        bootstrap: kafka.bootstrap().into(),
        topic: topic.into(),
        count: bench.events,
        skip: 0,
        rate: 0,
        generator: generator(bench),
        kafka: Vec::new(),
    })?;
    let producer = kafka.producer()?;
    runtime.block_on(async {
        for n in 0..bench.events / MALFORMED_EVERY {
            let key = format!("customer-{:06}", n % u64::from(bench.customers));
            let record = rdkafka::producer::FutureRecord::to(topic)
                .key(key.as_bytes())
                .payload("{\"not\": \"an order\"");
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(error, _)| error)
                .context("producing a malformed record")?;
        }
        anyhow::Ok(())
    })
}

fn generator(bench: &CompareBench) -> GeneratorConfig {
    GeneratorConfig {
        customers: bench.customers,
        ..GeneratorConfig::default()
    }
}

/// Waits until the group has committed the whole topic; returns events/s from the first
/// commit to the last, and the seconds that took.
fn measure_ingest(
    kafka: &TestKafka,
    group: &str,
    topic: &str,
    bench: &CompareBench,
    system: &str,
    alive: &mut dyn FnMut() -> Result<()>,
) -> Result<(f64, f64)> {
    let end = kafka.end_offsets(topic, bench.partitions)?;
    let total: i64 = end.iter().sum();
    let deadline = Instant::now() + Duration::from_secs(1_800);
    let mut first: Option<(Instant, i64)> = None;
    loop {
        alive()?;
        let committed: Vec<i64> = kafka.committed_offsets(group, topic, bench.partitions)?;
        let done: i64 = committed.iter().map(|c| (*c).max(0)).sum();
        if first.is_none() && done > 0 {
            first = Some((Instant::now(), done));
        }
        progress(system, "exactly-once ingest", done as f64 / total as f64);
        if committed.iter().zip(&end).all(|(c, e)| c >= e || *e == 0) {
            eprintln!();
            let (at, base) = first.context("nothing was committed")?;
            let seconds = at.elapsed().as_secs_f64().max(1e-3);
            return Ok(((total - base) as f64 / seconds, seconds));
        }
        if Instant::now() > deadline {
            bail!("{system} did not ingest the topic within 30 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The bytes of every file under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The processes of one system under test.
#[derive(Debug)]
enum Nodes {
    Kstore(Vec<TestProcess>),
    Streams(Vec<Baseline>),
}

impl Nodes {
    fn pids(&self) -> Vec<u32> {
        match self {
            Nodes::Kstore(nodes) => nodes.iter().map(TestProcess::pid).collect(),
            Nodes::Streams(nodes) => nodes.iter().map(|n| n.process.pid()).collect(),
        }
    }

    fn check_alive(&mut self) -> Result<()> {
        let processes: Vec<&mut TestProcess> = match self {
            Nodes::Kstore(nodes) => nodes.iter_mut().collect(),
            Nodes::Streams(nodes) => nodes.iter_mut().map(|n| &mut n.process).collect(),
        };
        for process in processes {
            if let Some(status) = process.try_exit()? {
                bail!(
                    "a process under test exited with {status}:\n{}",
                    process.tail()
                );
            }
        }
        Ok(())
    }

    fn stop(&mut self) {
        let processes: Vec<&mut TestProcess> = match self {
            Nodes::Kstore(nodes) => nodes.iter_mut().collect(),
            Nodes::Streams(nodes) => nodes.iter_mut().map(|n| &mut n.process).collect(),
        };
        for process in processes {
            let _ = process.terminate(Duration::from_secs(60));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn start_kstore(
    node_binary: &Path,
    kafka: &TestKafka,
    app: &str,
    input: &str,
    dir: &Path,
    bench: &CompareBench,
) -> Result<(Nodes, Vec<String>)> {
    let mut nodes = Vec::new();
    let mut grpc = Vec::new();
    let mut seeds: Vec<String> = Vec::new();
    for i in 1..=bench.nodes {
        let node_dir = dir.join(format!("kstore-{i}"));
        std::fs::create_dir_all(&node_dir)?;
        let settings = vec![
            format!("node-id=node-{i}"),
            format!("num-standbys={}", if bench.nodes > 1 { 1 } else { 0 }),
            format!("seeds={}", seeds.join(",")),
        ];
        let mut node =
            crate::bench::start_bench_node(node_binary, kafka, app, input, &node_dir, &settings)?;
        grpc.push(node.logged_address("serving gRPC", Duration::from_secs(120))?);
        seeds.push(node.logged_address("gossiping", Duration::from_secs(120))?);
        nodes.push(node);
    }
    Ok((Nodes::Kstore(nodes), grpc))
}

fn start_streams(
    jar: &Path,
    kafka: &TestKafka,
    app: &str,
    input: &str,
    dir: &Path,
    bench: &CompareBench,
) -> Result<(Nodes, Vec<String>)> {
    // Started together, so that the group's first rebalance spreads the partitions.
    let mut handles = Vec::new();
    for i in 1..=bench.nodes {
        let options = BaselineOptions {
            bootstrap: kafka.bootstrap().into(),
            input_topic: input.into(),
            application_id: app.into(),
            instance_id: format!("instance-{i}"),
            state_dir: dir.join(format!("streams-{i}")),
            standbys: if bench.nodes > 1 { 1 } else { 0 },
            extra: Vec::new(),
        };
        let (jar, log) = (jar.to_path_buf(), dir.join(format!("streams-{i}.log")));
        handles.push(std::thread::spawn(move || {
            Baseline::start(&jar, &options, &log, Duration::from_secs(600))
        }));
    }
    let mut nodes = Vec::new();
    for handle in handles {
        nodes.push(
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("starting an instance panicked"))??,
        );
    }
    let grpc = nodes.iter().map(|n| n.grpc_address.clone()).collect();
    Ok((Nodes::Streams(nodes), grpc))
}

#[allow(clippy::too_many_arguments)]
fn measure_system(
    name: &'static str,
    nodes: &mut Nodes,
    grpc: &[String],
    group: &str,
    input: &str,
    state_dirs: &[PathBuf],
    kafka: &TestKafka,
    runtime: &tokio::runtime::Runtime,
    cli: &Path,
    bench: &CompareBench,
    dir: &Path,
) -> Result<SystemResult> {
    let sampler = RssSampler::start(nodes.pids());
    let (ingest_events_per_second, ingest_seconds) =
        measure_ingest(kafka, group, input, bench, name, &mut || {
            nodes.check_alive()
        })?;
    let state_bytes: u64 = state_dirs.iter().map(|d| dir_bytes(d)).sum();

    let channels = runtime.block_on(async {
        let mut channels = Vec::new();
        for address in grpc {
            channels.push(
                tonic::transport::Channel::from_shared(format!("http://{address}"))?
                    .connect()
                    .await?,
            );
        }
        anyhow::Ok(channels)
    })?;
    let target = ReadTarget::Nodes(channels);
    let reads = GetBench {
        rate: bench.read_rate,
        seconds: bench.seconds,
        ingest_rate: bench.ingest_rate,
        customers: bench.customers,
        partitions: bench.partitions,
        remote_nice: None,
        port: bench.port,
        seeds: Vec::new(),
        policy: None,
        hedge_ms: 0,
        paused_node: false,
        pause_seconds: 0,
    };
    let warm_up = GetBench {
        seconds: 3,
        ..reads.clone()
    };
    runtime.block_on(with_bar(
        name,
        "warm-up reads",
        3.0,
        open_loop("warm-up", &target, &warm_up, 1),
    ))?;
    let idle_from = Instant::now();
    let idle = runtime.block_on(with_bar(
        name,
        "Get, idle",
        bench.seconds as f64,
        open_loop("Get, idle", &target, &reads, 1),
    ))?;
    let idle_to = Instant::now();
    let ghz_target = &grpc[0];
    let ghz_keys: Vec<String> = (0..1_000u32)
        .map(|i| {
            kstore_cli::generator::OrderGenerator::customer_id(i * (bench.customers / 1_000).max(1))
        })
        .collect();
    let run_ghz = |ghz: &Ghz, call: Call, phase: &str| -> Result<GhzLatencies> {
        let rps = match call {
            Call::MultiGet { .. } | Call::ScanPage { .. } => (bench.read_rate / 10).max(1),
            Call::Get | Call::HealthCheck => bench.read_rate,
        };
        let load = ghz::Load {
            rps,
            duration: Duration::from_secs(bench.seconds),
            concurrency: GHZ_CONCURRENCY,
        };
        let run = || ghz.run(call, ghz_target, load, &ghz_keys, dir);
        runtime.block_on(with_bar(name, phase, bench.seconds as f64, async {
            tokio::task::block_in_place(run)
        }))
    };
    let found_ghz = Ghz::find_or_install();
    let kstore = name == "kstore";
    let multi_get = Call::MultiGet {
        keys_per_call: MULTI_GET_KEYS,
    };
    let scan_page = Call::ScanPage {
        limit: SCAN_PAGE,
        partitions: bench.partitions,
    };
    let ghz_idle = match &found_ghz {
        Some(ghz) => {
            let get = run_ghz(ghz, Call::Get, "ghz Get, idle")?;
            let kstore_only = match kstore {
                true => Some((
                    run_ghz(ghz, Call::HealthCheck, "ghz Health/Check, idle")?,
                    run_ghz(ghz, multi_get, "ghz MultiGet, idle")?,
                    run_ghz(ghz, scan_page, "ghz Scan page, idle")?,
                )),
                false => None,
            };
            Some((get, kstore_only))
        }
        None => None,
    };

    let end_before: i64 = kafka.end_offsets(input, bench.partitions)?.iter().sum();
    // Long enough for every phase under ingest: the own generator's and ghz's.
    let phases = match (&found_ghz, kstore) {
        (None, _) => 1,
        (Some(_), false) => 2,
        (Some(_), true) => 4,
    };
    let count = bench.ingest_rate * (phases * bench.seconds + 2);
    let args: Vec<String> = [
        "produce",
        "--topic",
        input,
        "--bootstrap",
        kafka.bootstrap(),
        "--seed",
        "99",
        "--skip",
        &bench.events.to_string(),
        "--count",
        &count.to_string(),
        "--rate",
        &bench.ingest_rate.to_string(),
        "--customers",
        &bench.customers.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let mut producer = TestProcess::start(
        "kstore produce",
        cli,
        &args,
        &dir.join(format!("{name}-produce.log")),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let under_ingest = runtime.block_on(with_bar(
        name,
        "Get, under ingest",
        bench.seconds as f64,
        open_loop("Get, under ingest", &target, &reads, 1),
    ))?;
    let ghz = match (&found_ghz, ghz_idle) {
        (Some(ghz), Some((get_idle, kstore_only))) => {
            let get_under_ingest = run_ghz(ghz, Call::Get, "ghz Get, under ingest")?;
            let (health_idle, multi_get, scan_page) = match kstore_only {
                Some((health, multi_get_idle, scan_idle)) => (
                    Some(health),
                    Some((
                        multi_get_idle,
                        run_ghz(ghz, multi_get, "ghz MultiGet, under ingest")?,
                    )),
                    Some((
                        scan_idle,
                        run_ghz(ghz, scan_page, "ghz Scan page, under ingest")?,
                    )),
                ),
                None => (None, None, None),
            };
            Some(GhzPhases {
                get_idle,
                get_under_ingest,
                health_idle,
                multi_get,
                scan_page,
            })
        }
        _ => None,
    };
    let produced = producer.wait_exit(Duration::from_secs(120))?;
    if !produced.success() {
        bail!(
            "kstore produce exited with {produced}:\n{}",
            producer.tail()
        );
    }
    let end = kafka.end_offsets(input, bench.partitions)?;
    let ingest_phase_events = end.iter().sum::<i64>() - end_before;
    let producer_done = Instant::now();
    let mut caught_up_after_ingest_ms = None;
    while producer_done.elapsed() < Duration::from_secs(30) {
        let committed = kafka.committed_offsets(group, input, bench.partitions)?;
        if committed.iter().zip(&end).all(|(c, e)| c >= e || *e == 0) {
            caught_up_after_ingest_ms = Some(producer_done.elapsed().as_millis() as u64);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (peak_rss_bytes, steady_rss_bytes) = sampler.finish(idle_from, idle_to);
    nodes.check_alive()?;
    nodes.stop();
    let stopped_state_bytes: u64 = state_dirs.iter().map(|d| dir_bytes(d)).sum();
    for state_dir in state_dirs {
        compact_offline(state_dir)?;
    }
    let compacted_state_bytes: u64 = state_dirs.iter().map(|d| dir_bytes(d)).sum();
    Ok(SystemResult {
        name,
        ingest_events_per_second,
        ingest_seconds,
        idle,
        under_ingest,
        ingest_phase_events,
        caught_up_after_ingest_ms,
        peak_rss_bytes,
        steady_rss_bytes,
        state_bytes,
        stopped_state_bytes,
        compacted_state_bytes,
        ghz,
    })
}

/// Workers ghz calls from (over one connection): enough for the read rate at a few
/// milliseconds per call.
const GHZ_CONCURRENCY: u32 = 16;

/// Compacts every RocksDB database under `dir` fully, each opened with the options and
/// column families its OPTIONS file records (so each system's own compression and table
/// settings are kept).
fn compact_offline(dir: &Path) -> Result<()> {
    if dir.join("CURRENT").is_file() {
        let (options, families) = rocksdb::Options::load_latest(
            dir,
            rocksdb::Env::new()?,
            true,
            rocksdb::Cache::new_lru_cache(8 << 20),
        )
        .with_context(|| format!("reading the RocksDB options of {}", dir.display()))?;
        let names: Vec<String> = families.iter().map(|f| f.name().to_owned()).collect();
        let db = rocksdb::DB::open_cf_descriptors(&options, dir, families)
            .with_context(|| format!("opening {} to compact it", dir.display()))?;
        for name in &names {
            let family = db.cf_handle(name).context("a column family just opened")?;
            db.compact_range_cf(&family, None::<&[u8]>, None::<&[u8]>);
        }
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_type()?.is_dir() {
            compact_offline(&entry.path())?;
        }
    }
    Ok(())
}

/// Runs the bench (see the module documentation), writes its report beside the build, and
/// returns what `compare.json` holds.
pub fn compare(bench: &CompareBench) -> Result<serde_json::Value> {
    let binaries = crate::binaries::locate()?;
    eprintln!("bench: building the Kafka Streams baseline (Maven, when its sources changed)");
    let jar = build_jar()?;
    let broker = Broker::on_port(bench.port);
    let (started, _lease) = broker.start_leased()?;
    let kafka = TestKafka::at(&broker.bootstrap());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let dir = tempfile::Builder::new()
        .prefix("kstore-bench-compare")
        .tempdir_in(std::env::temp_dir())?;
    let report_dir = binaries.report_dir("bench");
    std::fs::create_dir_all(&report_dir)?;

    let mut results = Vec::new();
    let mut prefixes = Vec::new();
    let outcome = (|| -> Result<()> {
        // kstore
        let app = kafka.unique_name("compare-kstore");
        prefixes.push(app.clone());
        let input = format!("{app}-orders");
        eprintln!(
            "bench: kstore: filling {input} with {} events",
            bench.events
        );
        fill_topic(&kafka, &runtime, &input, bench)?;
        let (mut nodes, grpc) =
            start_kstore(&binaries.node, &kafka, &app, &input, dir.path(), bench)?;
        let state_dirs: Vec<PathBuf> = (1..=bench.nodes)
            .map(|i| dir.path().join(format!("kstore-{i}")).join("state"))
            .collect();
        let result = measure_system(
            "kstore",
            &mut nodes,
            &grpc,
            &app,
            &input,
            &state_dirs,
            &kafka,
            &runtime,
            &binaries.cli,
            bench,
            dir.path(),
        );
        nodes.stop();
        results.push(result?);

        // Kafka Streams
        let app = kafka.unique_name("compare-streams");
        prefixes.push(app.clone());
        let input = format!("{app}-orders");
        eprintln!(
            "bench: Kafka Streams: filling {input} with {} events",
            bench.events
        );
        fill_topic(&kafka, &runtime, &input, bench)?;
        let (mut nodes, grpc) = start_streams(&jar, &kafka, &app, &input, dir.path(), bench)?;
        let state_dirs: Vec<PathBuf> = (1..=bench.nodes)
            .map(|i| dir.path().join(format!("streams-{i}")))
            .collect();
        let result = measure_system(
            "Kafka Streams",
            &mut nodes,
            &grpc,
            &app,
            &input,
            &state_dirs,
            &kafka,
            &runtime,
            &binaries.cli,
            bench,
            dir.path(),
        );
        nodes.stop();
        results.push(result?);
        Ok(())
    })();
    for prefix in &prefixes {
        if let Err(error) = kafka.delete_topics_with_prefix(&format!("{prefix}-"), Some(prefix)) {
            eprintln!("bench: could not delete the topics of {prefix}: {error:#}");
        }
    }
    if started == Started::New {
        broker.stop()?;
    }
    outcome?;
    report(bench, &results, &report_dir)
}

fn ms(h: &hdrhistogram::Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn report(bench: &CompareBench, results: &[SystemResult], dir: &Path) -> Result<serde_json::Value> {
    let [k, s] = results else {
        bail!("expected two systems' results");
    };
    // (row, kstore, Kafka Streams, unit, higher is better)
    let mut rows: Vec<(String, f64, f64, &str, bool)> = vec![(
        "exactly-once ingest".into(),
        k.ingest_events_per_second,
        s.ingest_events_per_second,
        "events/s",
        true,
    )];
    for (phase, of) in [
        (
            "idle",
            (|r: &SystemResult| &r.idle) as fn(&SystemResult) -> &Latencies,
        ),
        ("under ingest", |r: &SystemResult| &r.under_ingest),
    ] {
        for (name, q) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
            rows.push((
                format!("Get {name}, {phase}"),
                ms(&of(k).response, q),
                ms(&of(s).response, q),
                "ms",
                false,
            ));
        }
    }
    rows.extend([
        (
            "failed reads".into(),
            (k.idle.errors + k.under_ingest.errors) as f64,
            (s.idle.errors + s.under_ingest.errors) as f64,
            "",
            false,
        ),
        (
            "peak RSS".into(),
            mib(k.peak_rss_bytes),
            mib(s.peak_rss_bytes),
            "MiB",
            false,
        ),
        (
            "steady RSS".into(),
            mib(k.steady_rss_bytes),
            mib(s.steady_rss_bytes),
            "MiB",
            false,
        ),
        (
            "state on disk, after the ingest".into(),
            mib(k.state_bytes),
            mib(s.state_bytes),
            "MiB",
            false,
        ),
        (
            "state on disk, stopped".into(),
            mib(k.stopped_state_bytes),
            mib(s.stopped_state_bytes),
            "MiB",
            false,
        ),
        (
            "state on disk, compacted".into(),
            mib(k.compacted_state_bytes),
            mib(s.compacted_state_bytes),
            "MiB",
            false,
        ),
    ]);
    if let (Some(kg), Some(sg)) = (&k.ghz, &s.ghz) {
        for (phase, of) in [
            (
                "idle",
                (|g: &GhzPhases| &g.get_idle) as fn(&GhzPhases) -> &GhzLatencies,
            ),
            ("under ingest", |g: &GhzPhases| &g.get_under_ingest),
        ] {
            for (name, at) in [
                (
                    "p50",
                    (|l: &GhzLatencies| l.p50_ms) as fn(&GhzLatencies) -> f64,
                ),
                ("p99", |l: &GhzLatencies| l.p99_ms),
                ("p99.9", |l: &GhzLatencies| l.p999_ms),
            ] {
                rows.push((
                    format!("ghz: Get {name}, {phase}"),
                    at(of(kg)),
                    at(of(sg)),
                    "ms",
                    false,
                ));
            }
        }
        rows.push((
            "ghz: failed reads".into(),
            (kg.get_idle.errors + kg.get_under_ingest.errors) as f64,
            (sg.get_idle.errors + sg.get_under_ingest.errors) as f64,
            "",
            false,
        ));
    }
    let mut table = String::new();
    table.push_str(&format!(
        "{} node(s) each, {} partitions, {} events over {} customers (1 in {MALFORMED_EVERY} \
         malformed), reads at {}/s for {} s per phase, ingest phase at {} events/s; broker, \
         systems and load generators on one machine\n\n",
        bench.nodes,
        bench.partitions,
        bench.events,
        bench.customers,
        bench.read_rate,
        bench.seconds,
        bench.ingest_rate
    ));
    table.push_str(
        "| measurement | kstore | Kafka Streams | kstore vs Kafka Streams |\n|---|---|---|---|\n",
    );
    for (row, kv, sv, unit, higher_better) in &rows {
        let ratio = if *higher_better {
            if *sv > 0.0 {
                format!("{:.2}× the throughput", kv / sv)
            } else {
                "-".into()
            }
        } else if *kv > 0.0 && *sv > 0.0 {
            format!("{:.2}× (kstore ÷ Kafka Streams)", kv / sv)
        } else {
            "-".into()
        };
        let value = |v: f64| {
            if unit.is_empty() {
                format!("{v:.0}")
            } else if *unit == "events/s" {
                format!("{v:.0} {unit}")
            } else {
                format!("{v:.2} {unit}")
            }
        };
        table.push_str(&format!(
            "| {row} | {} | {} | {ratio} |\n",
            value(*kv),
            value(*sv)
        ));
    }
    match (&k.ghz, &s.ghz) {
        (Some(kg), Some(_)) => {
            table.push_str(&format!(
                "\nghz {} ({} workers over one connection, {} calls/s, the same keys in turn): \
                 kstore's Health/Check (no work) idle p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms; \
                 its Get p99 idle is {:.2}× that, and under ingest {:.2}× its idle p99.\n",
                ghz::VERSION,
                GHZ_CONCURRENCY,
                bench.read_rate,
                kg.health_idle.as_ref().map_or(0.0, |h| h.p50_ms),
                kg.health_idle.as_ref().map_or(0.0, |h| h.p99_ms),
                kg.health_idle.as_ref().map_or(0.0, |h| h.p999_ms),
                kg.get_idle.p99_ms / kg.health_idle.as_ref().map_or(f64::NAN, |h| h.p99_ms),
                kg.get_under_ingest.p99_ms / kg.get_idle.p99_ms,
            ));
            for (call, pair) in [
                (format!("MultiGet of {MULTI_GET_KEYS} keys"), &kg.multi_get),
                (format!("Scan page of {SCAN_PAGE} entries"), &kg.scan_page),
            ] {
                let Some((idle, under_ingest)) = pair else {
                    continue;
                };
                table.push_str(&format!(
                    "ghz, kstore only, {call} at {} calls/s: idle p50 {:.2} / p99 {:.2} / p99.9 \
                     {:.2} ms ({} of {} failed); under ingest p50 {:.2} / p99 {:.2} / p99.9 \
                     {:.2} ms ({} of {} failed).\n",
                    (bench.read_rate / 10).max(1),
                    idle.p50_ms,
                    idle.p99_ms,
                    idle.p999_ms,
                    idle.errors,
                    idle.count,
                    under_ingest.p50_ms,
                    under_ingest.p99_ms,
                    under_ingest.p999_ms,
                    under_ingest.errors,
                    under_ingest.count,
                ));
            }
        }
        _ => table.push_str(&format!(
            "\nghz was not found, so no independent tool checked the read latencies; install \
             it with `{}` and run again.\n",
            ghz::install_command()
        )),
    }
    for r in results {
        for (call, l) in r.ghz.iter().flat_map(|g| {
            let mut calls = vec![
                ("Get idle", &g.get_idle),
                ("Get under ingest", &g.get_under_ingest),
            ];
            if let Some((idle, busy)) = &g.multi_get {
                calls.extend([("MultiGet idle", idle), ("MultiGet under ingest", busy)]);
            }
            if let Some((idle, busy)) = &g.scan_page {
                calls.extend([("Scan page idle", idle), ("Scan page under ingest", busy)]);
            }
            calls
        }) {
            if l.errors > 0 {
                table.push_str(&format!(
                    "\n{}: ghz {call}: {} of {} calls failed: {}",
                    r.name, l.errors, l.count, l.error_kinds
                ));
            }
        }
        table.push_str(&format!(
            "\n{}: ingest phase sent {} events; {}",
            r.name,
            r.ingest_phase_events,
            match r.caught_up_after_ingest_ms {
                Some(ms) => format!("all committed {ms} ms after the producer's last"),
                None => "not all committed 30 s after the producer's last (it fell behind)".into(),
            }
        ));
    }
    table.push('\n');
    println!("\n{table}");
    std::fs::write(dir.join("compare.md"), &table)?;

    let system_json = |r: &SystemResult| {
        let latency = |l: &Latencies| {
            json!({
                "sent": l.sent,
                "errors": l.errors,
                "p50_ms": ms(&l.response, 0.5),
                "p99_ms": ms(&l.response, 0.99),
                "p999_ms": ms(&l.response, 0.999),
                "max_ms": l.response.max() as f64 / 1000.0,
            })
        };
        json!({
            "system": r.name,
            "ingest_events_per_second": r.ingest_events_per_second,
            "ingest_seconds": r.ingest_seconds,
            "get_idle": latency(&r.idle),
            "get_under_ingest": latency(&r.under_ingest),
            "ingest_phase_events": r.ingest_phase_events,
            "caught_up_after_ingest_ms": r.caught_up_after_ingest_ms,
            "peak_rss_bytes": r.peak_rss_bytes,
            "steady_rss_bytes": r.steady_rss_bytes,
            "state_bytes": r.state_bytes,
            "stopped_state_bytes": r.stopped_state_bytes,
            "compacted_state_bytes": r.compacted_state_bytes,
            "ghz": r.ghz.as_ref().map(|g| {
                let latency = |l: &GhzLatencies| json!({
                    "calls": l.count,
                    "errors": l.errors,
                    "error_kinds": l.error_kinds,
                    "p50_ms": l.p50_ms,
                    "p99_ms": l.p99_ms,
                    "p999_ms": l.p999_ms,
                });
                json!({
                    "version": ghz::VERSION,
                    "get_idle": latency(&g.get_idle),
                    "get_under_ingest": latency(&g.get_under_ingest),
                    "health_check_idle": g.health_idle.as_ref().map(latency),
                    "multi_get_idle": g.multi_get.as_ref().map(|(idle, _)| latency(idle)),
                    "multi_get_under_ingest": g.multi_get.as_ref().map(|(_, busy)| latency(busy)),
                    "multi_get_keys": MULTI_GET_KEYS,
                    "scan_page_idle": g.scan_page.as_ref().map(|(idle, _)| latency(idle)),
                    "scan_page_under_ingest": g.scan_page.as_ref().map(|(_, busy)| latency(busy)),
                    "scan_page_entries": SCAN_PAGE,
                })
            }),
        })
    };
    let report = json!({
        "nodes": bench.nodes,
        "events": bench.events,
        "customers": bench.customers,
        "partitions": bench.partitions,
        "read_rate": bench.read_rate,
        "ingest_rate": bench.ingest_rate,
        "seconds_per_phase": bench.seconds,
        "systems": results.iter().map(system_json).collect::<Vec<_>>(),
    });
    std::fs::write(
        dir.join("compare.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    latency_chart(results, &dir.join("compare-latency.svg"))?;
    throughput_chart(results, &dir.join("compare-throughput.svg"))?;
    println!(
        "wrote {}/compare.json, compare.md, compare-latency.svg, compare-throughput.svg",
        dir.display()
    );
    Ok(report)
}

/// Per-second p99 of a phase's answers: (second, ms).
fn p99_per_second(latencies: &Latencies, offset: f64) -> Vec<(f64, f64)> {
    let mut points = Vec::new();
    let mut second = 0usize;
    let mut bucket: Vec<u64> = Vec::new();
    let mut flush = |second: usize, bucket: &mut Vec<u64>| {
        if !bucket.is_empty() {
            bucket.sort_unstable();
            let p99 = bucket[(bucket.len() * 99 / 100).min(bucket.len() - 1)];
            points.push((offset + second as f64 + 0.5, p99 as f64 / 1000.0));
            bucket.clear();
        }
    };
    for &(at, micros) in &latencies.timeline {
        let this = at as usize;
        if this != second {
            flush(second, &mut bucket);
            second = this;
        }
        bucket.push(micros);
    }
    flush(second, &mut bucket);
    points
}

fn latency_chart(results: &[SystemResult], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    // (system, (second, p99 ms) points, colour)
    type Series<'a> = (&'a str, Vec<(f64, f64)>, RGBColor);
    let series: Vec<Series<'_>> = results
        .iter()
        .zip([RGBColor(0x1f, 0x77, 0xb4), RGBColor(0xd6, 0x27, 0x28)])
        .map(|(r, color)| {
            let mut points = p99_per_second(&r.idle, 0.0);
            points.extend(p99_per_second(&r.under_ingest, r.idle.seconds.ceil()));
            (r.name, points, color)
        })
        .collect();
    let x_max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let y_max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Get p99 per second: idle, then under ingest",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds (idle phase, then ingest phase)")
        .y_desc("p99 ms")
        .draw()?;
    for (name, points, color) in series {
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}

fn throughput_chart(results: &[SystemResult], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let y_max = results
        .iter()
        .map(|r| r.ingest_events_per_second)
        .fold(1.0, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (600, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("exactly-once ingest, events/s", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..results.len() as f64, 0.0..y_max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("events/s")
        .draw()?;
    for (i, (r, color)) in results
        .iter()
        .zip([RGBColor(0x1f, 0x77, 0xb4), RGBColor(0xd6, 0x27, 0x28)])
        .enumerate()
    {
        let x = i as f64;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x + 0.2, 0.0), (x + 0.8, r.ingest_events_per_second)],
            color.filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{}: {:.0}", r.name, r.ingest_events_per_second),
            (x + 0.22, r.ingest_events_per_second * 1.03),
            ("sans-serif", 15),
        )))?;
    }
    root.present()?;
    Ok(())
}
