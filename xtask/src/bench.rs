//! `cargo xtask bench ingest`: the sustained ingest rate of one `kstore-node`.
//!
//! For each processing guarantee: create a fresh input topic, fill it with generated order
//! events (not timed), start one node with an empty state directory, and watch the group's
//! committed offsets. The rate is the records committed between the first commit and the
//! moment every record is committed, divided by that time, so JVM warm-up of the broker,
//! group join and topic creation are left out. RSS is read from /proc just before SIGTERM.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kstore_cli::generator::GeneratorConfig;
use kstore_cli::produce::{ProduceOptions, produce};
use kstore_testkit::TestKafka;
use kstore_testkit::broker::{Broker, Started};
use kstore_testkit::process::TestProcess;

/// What `bench ingest` measures.
#[derive(Debug, Clone)]
pub struct IngestBench {
    pub port: u16,
    pub events: u64,
    pub partitions: u32,
    pub customers: u32,
    pub guarantees: Vec<String>,
}

struct Measurement {
    guarantee: String,
    events_per_second: f64,
    measured_records: i64,
    seconds: f64,
    rss_kib: u64,
    peak_rss_kib: u64,
}

pub fn ingest(bench: &IngestBench) -> Result<()> {
    let node_binary = build_node()?;
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
        "ingest, one node, {} partitions, {} events over {} customers, broker on the same machine",
        bench.partitions, bench.events, bench.customers
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
    Ok(())
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
    let args: Vec<String> = [
        "node-id=bench-node".to_owned(),
        format!("app-id={app}"),
        format!("input-topic={input}"),
        format!("state-dir={}", dir.path().join("state").display()),
        format!("processing-guarantee={guarantee}"),
        format!("kafka.bootstrap.servers={}", kafka.bootstrap()),
    ]
    .into_iter()
    .flat_map(|a| ["--set".to_owned(), a])
    .collect();
    let mut node = TestProcess::start(
        "kstore-node",
        node_binary,
        &args,
        &dir.path().join("node.log"),
    )?;

    let end: i64 = kafka.end_offsets(&input, bench.partitions)?.iter().sum();
    let committed = || -> Result<i64> {
        Ok(kafka
            .committed_offsets(&app, &input, bench.partitions)?
            .iter()
            .map(|c| c.max(&0))
            .sum())
    };
    let deadline = Instant::now() + Duration::from_secs(1800);
    let (first_at, first_committed) = loop {
        let now = committed()?;
        if now > 0 {
            break (Instant::now(), now);
        }
        check_alive(&mut node, deadline)?;
        std::thread::sleep(Duration::from_millis(20));
    };
    loop {
        if committed()? >= end {
            break;
        }
        check_alive(&mut node, deadline)?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let seconds = first_at.elapsed().as_secs_f64();
    let (rss_kib, peak_rss_kib) = rss(node.pid())?;
    let status = node.terminate(Duration::from_secs(60))?;
    if !status.success() {
        bail!("kstore-node exited with {status}:\n{}", node.tail());
    }
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

/// Returns VmRSS and VmHWM (peak) in KiB.
fn rss(pid: u32) -> Result<(u64, u64)> {
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

/// Builds `kstore-node` with the workspace's profile and returns its path.
fn build_node() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args([
            "build",
            "--package",
            "kstore-server",
            "--bin",
            "kstore-node",
        ])
        .status()?;
    if !status.success() {
        bail!("building kstore-node failed");
    }
    let metadata = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()?;
    let metadata: serde_json::Value = serde_json::from_slice(&metadata.stdout)?;
    let target = metadata["target_directory"]
        .as_str()
        .context("no target_directory")?;
    Ok(Path::new(target).join("debug").join("kstore-node"))
}
