//! `cargo xtask bench restore`: how fast a partition comes back. One partition's store is
//! filled through the real pipeline (events, exactly-once ingest, changelog), backed up,
//! changed by 1% of its keys and backed up again (incremental); then the same partition is
//! brought up on a fresh node four ways: a raw copy of its directory (the physical limit),
//! full changelog replay, the newest backup plus the changelog's tail, and a peer's snapshot.
//! Every node is drained when it stops, so the partition moves at once to the next one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kstore_cli::backup::{AdminTarget, create, format_bytes};
use kstore_cli::generator::GeneratorConfig;
use kstore_cli::produce::{ProduceOptions, produce};
use kstore_testkit::TestKafka;
use kstore_testkit::broker::{Broker, DEFAULT_PORT, Started};
use kstore_testkit::process::{TestProcess, wait_until};

/// What `bench restore` measures.
#[derive(Debug, Clone, clap::Args)]
pub struct RestoreBench {
    /// Customers (keys) in the partition's store.
    /// About 90 bytes each on disk once compacted: the default fills the store past 1 GiB.
    #[arg(long, default_value_t = 12_000_000)]
    pub customers: u32,
    /// Events produced to fill the store (spread over the customers at random).
    #[arg(long, default_value_t = 16_000_000)]
    pub events: u64,
    /// The broker's port.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
}

/// One way of bringing the partition up.
#[derive(Debug)]
struct Way {
    name: &'static str,
    seconds: f64,
    /// What the seconds cover.
    measured: String,
}

pub fn restore(bench: &RestoreBench) -> Result<()> {
    let binaries = crate::binaries::locate()?;
    let broker = Broker::on_port(bench.port);
    let (started, _lease) = broker.start_leased()?;
    let kafka = TestKafka::at(&broker.bootstrap());
    let app = kafka.unique_name("bench-restore");
    let input = format!("{app}-orders");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(kafka.create_topic(&input, 1))?;
    let dir = tempfile::Builder::new()
        .prefix("kstore-bench-restore")
        .tempdir_in(std::env::temp_dir())?;
    let report_dir = binaries.report_dir("bench");
    let result = run(
        bench,
        &binaries.node,
        &kafka,
        &app,
        &input,
        dir.path(),
        &runtime,
    )
    .and_then(|report| {
        std::fs::create_dir_all(&report_dir)?;
        let out = report_dir.join("restore.json");
        std::fs::write(&out, serde_json::to_vec_pretty(&report)?)?;
        println!("wrote {}", out.display());
        Ok(())
    });
    kafka.delete_topics_with_prefix(&format!("{app}-"), Some(&app))?;
    if started == Started::New {
        broker.stop()?;
    }
    result
}

/// A node of this bench: node id, its own state directory, drained on SIGTERM.
fn start_node(
    node_binary: &Path,
    kafka: &TestKafka,
    app: &str,
    input: &str,
    dir: &Path,
    node_id: &str,
    extra: &[String],
) -> Result<TestProcess> {
    let node_dir = dir.join(node_id);
    std::fs::create_dir_all(&node_dir)?;
    let mut settings = vec![
        format!("node-id={node_id}"),
        format!("state-dir={}", node_dir.join("state").display()),
        // A drain hands the partition over at once (no session timeout to wait for); the
        // next node starts only after this one stopped, so the drain need not wait for it.
        "drain-on-shutdown=true".to_owned(),
        "drain-timeout-ms=1000".to_owned(),
        "kafka.session.timeout.ms=10000".to_owned(),
        // The partition's store is large: a wider memory budget, as production would give.
        "memory.block-cache-bytes=536870912".to_owned(),
    ];
    settings.extend(extra.iter().cloned());
    crate::bench::start_bench_node(node_binary, kafka, app, input, &node_dir, &settings)
}

fn store_dir(dir: &Path, node_id: &str, app: &str) -> PathBuf {
    dir.join(node_id)
        .join("state")
        .join(app)
        .join("features")
        .join("0")
}

/// The bytes of the files in a directory (not recursive: a store directory is flat).
fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut bytes = 0;
    for entry in std::fs::read_dir(dir)? {
        let metadata = entry?.metadata()?;
        if metadata.is_file() {
            bytes += metadata.len();
        }
    }
    Ok(bytes)
}

/// A field `name=value` of the first log line that contains `what` (and `partition=0`).
fn logged_field(node: &TestProcess, what: &str, name: &str) -> Option<u64> {
    let prefix = format!("{name}=");
    node.output()
        .lines()
        .find(|l| l.contains(what))?
        .split_whitespace()
        .find_map(|field| field.strip_prefix(prefix.as_str()))?
        .parse()
        .ok()
}

/// Waits for the node to log `what` with a `name=` field, and returns the field.
fn wait_logged(node: &mut TestProcess, what: &str, name: &str, timeout: Duration) -> Result<u64> {
    let mut value = None;
    wait_until(timeout, what, || {
        if let Some(status) = node.try_exit()? {
            bail!("the node exited with {status}:\n{}", node.tail());
        }
        value = logged_field(node, what, name);
        Ok(value.is_some())
    })?;
    value.context("logged")
}

fn wait_committed(kafka: &TestKafka, app: &str, input: &str, node: &mut TestProcess) -> Result<()> {
    let end = kafka.end_offsets(input, 1)?;
    wait_until(
        Duration::from_secs(3_600),
        "every input record to be committed",
        || {
            if let Some(status) = node.try_exit()? {
                bail!("the node exited with {status}:\n{}", node.tail());
            }
            Ok(kafka.committed_offsets(app, input, 1)? >= end)
        },
    )
}

fn run(
    bench: &RestoreBench,
    node_binary: &Path,
    kafka: &TestKafka,
    app: &str,
    input: &str,
    dir: &Path,
    runtime: &tokio::runtime::Runtime,
) -> Result<serde_json::Value> {
    let backups = dir.join("backups");
    let with_backups = [
        format!("backup.dir={}", backups.display()),
        "backup.interval-ms=0".to_owned(),
    ];
    let generator = GeneratorConfig {
        customers: bench.customers,
        ..GeneratorConfig::default()
    };
    let send = |skip: u64, count: u64| {
        produce(&ProduceOptions {
            bootstrap: kafka.bootstrap().into(),
            topic: input.into(),
            count,
            skip,
            rate: 0,
            generator: generator.clone(),
            kafka: Vec::new(),
        })
    };
    eprintln!(
        "bench: producing {} events over {} customers",
        bench.events, bench.customers
    );
    send(0, bench.events)?;

    eprintln!("bench: filling the store (exactly-once ingest)");
    let mut source = start_node(node_binary, kafka, app, input, dir, "source", &with_backups)?;
    let address = source.logged_address("serving gRPC", Duration::from_secs(120))?;
    wait_committed(kafka, app, input, &mut source)?;
    let target = AdminTarget {
        seeds: vec![address.clone()],
        token: None,
        tls: None,
        timeout: Duration::from_secs(1_800),
    };
    let backup = |label: &str| -> Result<(f64, kstore_proto::v1::BackupInfo)> {
        eprintln!("bench: {label}");
        let started = Instant::now();
        let summary = runtime.block_on(create(&target, &[0]))?;
        let seconds = started.elapsed().as_secs_f64();
        let info = summary
            .answers
            .into_iter()
            .find_map(|(_, answer)| answer.ok()?.backups.into_iter().next())
            .context("no backup was made")?;
        Ok((seconds, info))
    };
    let (first_seconds, first) = backup("first backup")?;
    let changed = u64::from(bench.customers) / 100;
    eprintln!("bench: {changed} events (at most 1% of the keys change)");
    send(bench.events, changed)?;
    wait_committed(kafka, app, input, &mut source)?;
    let (second_seconds, second) = backup("incremental backup")?;
    let store_bytes = dir_bytes(&store_dir(dir, "source", app))?;
    source.terminate(Duration::from_secs(300))?;

    let mut ways = Vec::new();

    eprintln!("bench: raw copy of the store's directory");
    let copy_dir = dir.join("raw-copy");
    std::fs::create_dir_all(&copy_dir)?;
    let started = Instant::now();
    for entry in std::fs::read_dir(store_dir(dir, "source", app))? {
        let entry = entry?;
        if entry.metadata()?.is_file() {
            let to = copy_dir.join(entry.file_name());
            std::fs::copy(entry.path(), &to)?;
            std::fs::File::open(&to)?.sync_all()?;
        }
    }
    ways.push(Way {
        name: "raw copy of the directory",
        seconds: started.elapsed().as_secs_f64(),
        measured: "copy every file, fsync".into(),
    });
    std::fs::remove_dir_all(&copy_dir)?;

    // A fresh node alone takes the partition: the time from its assignment to processing.
    let activation = |node_id: &str, extra: &[String]| -> Result<f64> {
        let mut node = start_node(node_binary, kafka, app, input, dir, node_id, extra)?;
        let ready_ms = wait_logged(
            &mut node,
            "restore finished",
            "ready_in_ms",
            Duration::from_secs(3_600),
        )?;
        node.terminate(Duration::from_secs(300))?;
        std::fs::remove_dir_all(dir.join(node_id))?;
        Ok(ready_ms as f64 / 1000.0)
    };
    eprintln!("bench: full changelog replay on a fresh node");
    ways.push(Way {
        name: "full changelog replay",
        seconds: activation("replay", &[])?,
        measured: "assignment to processing".into(),
    });
    eprintln!("bench: newest backup on a fresh node");
    ways.push(Way {
        name: "newest backup + changelog tail",
        seconds: activation("from-backup", &with_backups)?,
        measured: "assignment to processing (verify, restore, tail)".into(),
    });

    eprintln!("bench: a peer's snapshot on a fresh node");
    let mut source = start_node(node_binary, kafka, app, input, dir, "source", &[])?;
    let gossip = source.logged_address("gossiping", Duration::from_secs(120))?;
    wait_logged(
        &mut source,
        "restore finished",
        "ready_in_ms",
        Duration::from_secs(3_600),
    )?;
    let mut peer = start_node(
        node_binary,
        kafka,
        app,
        input,
        dir,
        "from-peer",
        &[format!("seeds={gossip}")],
    )?;
    let took_ms = wait_logged(
        &mut peer,
        "bootstrapped a copy from a peer's snapshot",
        "took_ms",
        Duration::from_secs(3_600),
    )?;
    ways.push(Way {
        name: "peer snapshot",
        seconds: took_ms as f64 / 1000.0,
        measured: "request to a verified copy on disk, opened".into(),
    });
    let _ = peer.terminate(Duration::from_secs(300));
    let _ = source.terminate(Duration::from_secs(300));

    let raw = ways[0].seconds;
    let replay = ways[1].seconds;
    println!();
    println!(
        "bringing up one partition: {} on disk ({} customers, {} events), node, broker and \
         peer on this machine",
        format_bytes(store_bytes),
        bench.customers,
        bench.events
    );
    println!(
        "{:<32} {:>9} {:>10} {:>12}  measured",
        "way", "seconds", "MiB/s", "vs replay"
    );
    for way in &ways {
        println!(
            "{:<32} {:>9.2} {:>10.0} {:>11.1}x  {}",
            way.name,
            way.seconds,
            store_bytes as f64 / (1 << 20) as f64 / way.seconds.max(1e-6),
            replay / way.seconds.max(1e-6),
            way.measured
        );
    }
    let peer_seconds = ways[3].seconds;
    println!(
        "peer snapshot: {:.1}x faster than replay, {:.0}% of the raw copy's speed",
        replay / peer_seconds.max(1e-6),
        100.0 * raw / peer_seconds.max(1e-6)
    );
    println!(
        "backup: first {:.2}s ({}), incremental after {changed} events {:.2}s, added {} of {}",
        first_seconds,
        format_bytes(first.size_bytes),
        second_seconds,
        format_bytes(second.added_bytes),
        format_bytes(second.size_bytes)
    );

    let report = serde_json::json!({
        "store_bytes": store_bytes,
        "customers": bench.customers,
        "events": bench.events,
        "ways": ways
            .iter()
            .map(|w| serde_json::json!({"way": w.name, "seconds": w.seconds, "measured": w.measured}))
            .collect::<Vec<_>>(),
        "first_backup": {"seconds": first_seconds, "size_bytes": first.size_bytes},
        "incremental_backup": {
            "seconds": second_seconds,
            "changed_events": changed,
            "added_bytes": second.added_bytes,
            "size_bytes": second.size_bytes,
        },
    });
    Ok(report)
}
