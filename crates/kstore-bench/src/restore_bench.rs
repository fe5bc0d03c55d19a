//! `cargo xtask bench restore`: how fast a partition comes back. One partition's store is
//! filled through the real pipeline (events, exactly-once ingest, changelog), backed up,
//! changed by 1% of its keys and backed up again (incremental); then the same partition is
//! brought up on a fresh node four ways: a raw copy of its directory (the physical limit),
//! full changelog replay, the newest backup plus the changelog's tail, and a peer's snapshot.
//! Every node is drained when it stops, so the partition moves at once to the next one.
//! Last, the Kafka Streams baseline restores the same changelog topic with an empty state
//! directory (its store and kstore's write the same key and value bytes to a topic of the
//! same name): the time from its start to RUNNING and to its first answered query.
//!
//! Before the source node stops, the bench reads a sample of keys from it; each way that
//! serves reads (replay, backup, Kafka Streams) is timed from its process's start to its
//! first answer, and to the first moment it answers every sampled key with that value.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kstore_cli::backup::{AdminTarget, create, format_bytes};
use kstore_cli::generator::GeneratorConfig;
use kstore_cli::produce::{ProduceOptions, produce};
use kstore_proto::v1::query_client::QueryClient;
use kstore_proto::v1::{GetRequest, GetResponse, get_response};
use kstore_testkit::TestKafka;
use kstore_testkit::baseline::{Baseline, BaselineOptions, build_jar};
use kstore_testkit::broker::{Broker, DEFAULT_PORT, Started};
use kstore_testkit::process::{TestProcess, wait_until};

/// What `bench restore` measures.
#[derive(Debug, Clone, clap::Args)]
pub struct RestoreBench {
    /// Customers (keys) in the partition's store.
    /// About 90 bytes each on disk once compacted: the default fills the store to about 1 GB
    /// (1,011 to 1,020 MiB).
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
    /// For the ways that serve reads: when the process answered (see [`Answered`]).
    answered: Option<Answered>,
}

/// Keys read from the filled store before it stopped, with their value bytes.
type Sample = Vec<(Vec<u8>, Vec<u8>)>;

/// Keys the sample asks for: spread over the customers, those the store holds are kept.
const SAMPLE_KEYS: u32 = 200;

/// The value bytes of an answer: a raw value, or a typed one's encoded message.
fn value_bytes(response: &GetResponse) -> Option<Vec<u8>> {
    if !response.found {
        return None;
    }
    match response.value.as_ref()? {
        get_response::Value::Raw(bytes) => Some(bytes.clone()),
        get_response::Value::Message(any) => Some(any.value.clone()),
    }
}

fn get_request(key: &[u8]) -> GetRequest {
    GetRequest {
        store: "features".into(),
        key: key.to_vec(),
        partition: None,
        options: None,
    }
}

/// Reads `SAMPLE_KEYS` keys from the node at `address`; keeps those it holds.
fn read_sample(runtime: &tokio::runtime::Runtime, address: &str, customers: u32) -> Result<Sample> {
    let step = (customers / SAMPLE_KEYS).max(1);
    let sample = runtime.block_on(async {
        let mut client = QueryClient::connect(format!("http://{address}")).await?;
        let mut sample = Vec::new();
        for i in 0..SAMPLE_KEYS.min(customers) {
            let key = kstore_cli::generator::OrderGenerator::customer_id(i * step).into_bytes();
            let answer = client.get(get_request(&key)).await?.into_inner();
            if let Some(value) = value_bytes(&answer) {
                sample.push((key, value));
            }
        }
        anyhow::Ok(sample)
    })?;
    if sample.is_empty() {
        bail!("the filled store answered none of {SAMPLE_KEYS} sampled keys");
    }
    Ok(sample)
}

/// When a process brought up on an empty state directory answered, in seconds from its
/// start: its first answer of any kind (a read served while restoring may be behind), and
/// the first moment every sampled key answered with the value the filled store held.
#[derive(Debug, Clone, Copy)]
struct Answered {
    first: f64,
    exact: f64,
}

/// Asks `address` for the sample's first key every 10 ms until it answers at all, then for
/// every sampled key in rounds (every 250 ms for the first 10 s, then every second: reads
/// take CPU from the restore they wait for) until one round answers them all as the filled
/// store held them. Errors and other values are asked again.
fn wait_answers(
    runtime: &tokio::runtime::Runtime,
    address: &str,
    sample: &Sample,
    since: Instant,
    alive: &mut dyn FnMut() -> Result<()>,
) -> Result<Answered> {
    let get = |key: &[u8]| {
        runtime.block_on(async {
            let mut client = QueryClient::connect(format!("http://{address}")).await?;
            anyhow::Ok(value_bytes(
                &client.get(get_request(key)).await?.into_inner(),
            ))
        })
    };
    let first = loop {
        if get(&sample[0].0).is_ok() {
            break since.elapsed().as_secs_f64();
        }
        alive()?;
        if since.elapsed() > Duration::from_secs(3_600) {
            bail!("{address} answered no read within an hour");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    loop {
        // One connection per round; a key whose read fails counts as wrong.
        let wrong = runtime
            .block_on(async {
                let mut client = QueryClient::connect(format!("http://{address}")).await?;
                let mut wrong = 0;
                for (key, value) in sample {
                    let answer = client.get(get_request(key)).await;
                    if answer
                        .ok()
                        .and_then(|a| value_bytes(&a.into_inner()))
                        .as_ref()
                        != Some(value)
                    {
                        wrong += 1;
                    }
                }
                anyhow::Ok(wrong)
            })
            .unwrap_or(sample.len());
        if wrong == 0 {
            return Ok(Answered {
                first,
                exact: since.elapsed().as_secs_f64(),
            });
        }
        alive()?;
        if since.elapsed() > Duration::from_secs(3_600) {
            bail!(
                "{address} still answered {wrong} of {} sampled keys with another value than \
                 the filled store held after an hour",
                sample.len()
            );
        }
        std::thread::sleep(if since.elapsed() < Duration::from_secs(10) {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(1)
        });
    }
}

/// Waits until the consumer group `group` has no members: kstore's nodes are static members,
/// which stay in the group after they stop until their session times out, and a group with
/// kstore's members refuses Kafka Streams' (another protocol).
fn wait_group_empty(kafka: &TestKafka, group: &str) -> Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .create()?;
    wait_until(
        Duration::from_secs(120),
        "kstore's nodes to leave their consumer group",
        || {
            let groups = consumer.fetch_group_list(Some(group), Duration::from_secs(5))?;
            Ok(groups.groups().iter().all(|g| g.members().is_empty()))
        },
    )
}

/// Runs the bench (see the module documentation), writes `restore.json` beside the build,
/// and returns what it wrote.
pub fn restore(bench: &RestoreBench) -> Result<serde_json::Value> {
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
        Ok(report)
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
        let summary = runtime.block_on(create(&target, "", &[0]))?;
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
    let sample = read_sample(runtime, &address, bench.customers)?;
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
        answered: None,
    });
    std::fs::remove_dir_all(&copy_dir)?;

    // A fresh node alone takes the partition: the time from its assignment to processing,
    // and from its start to its answers.
    let activation = |node_id: &str, extra: &[String]| -> Result<(f64, Answered)> {
        let started = Instant::now();
        let mut node = start_node(node_binary, kafka, app, input, dir, node_id, extra)?;
        let address = node.logged_address("serving gRPC", Duration::from_secs(120))?;
        let answered = wait_answers(runtime, &address, &sample, started, &mut || match node
            .try_exit()?
        {
            Some(status) => bail!("the node exited with {status}:\n{}", node.tail()),
            None => Ok(()),
        })?;
        let ready_ms = wait_logged(
            &mut node,
            "restore finished",
            "ready_in_ms",
            Duration::from_secs(3_600),
        )?;
        node.terminate(Duration::from_secs(300))?;
        std::fs::remove_dir_all(dir.join(node_id))?;
        Ok((ready_ms as f64 / 1000.0, answered))
    };
    eprintln!("bench: full changelog replay on a fresh node");
    let (seconds, answered) = activation("replay", &[])?;
    ways.push(Way {
        name: "full changelog replay",
        seconds,
        measured: "assignment to processing".into(),
        answered: Some(answered),
    });
    eprintln!("bench: newest backup on a fresh node");
    let (seconds, answered) = activation("from-backup", &with_backups)?;
    ways.push(Way {
        name: "newest backup + changelog tail",
        seconds,
        measured: "assignment to processing (verify, restore, tail)".into(),
        answered: Some(answered),
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
        answered: None,
    });
    let _ = peer.terminate(Duration::from_secs(300));
    let _ = source.terminate(Duration::from_secs(300));

    // The baseline's store writes the same key and value bytes to `<app>-features-changelog`,
    // so with kstore's app id as its application id it restores kstore's changelog. Its
    // input is a topic of its own with nothing in it: it only restores.
    eprintln!("bench: Kafka Streams restoring the same changelog (empty state directory)");
    let jar = build_jar()?;
    wait_group_empty(kafka, app)?;
    let streams_input = format!("{app}-streams-orders");
    runtime.block_on(kafka.create_topic(&streams_input, 1))?;
    let options = BaselineOptions {
        bootstrap: kafka.bootstrap().into(),
        input_topic: streams_input,
        application_id: app.into(),
        instance_id: "restore".into(),
        state_dir: dir.join("streams"),
        standbys: 0,
        extra: Vec::new(),
    };
    let started = Instant::now();
    let mut streams = Baseline::start(
        &jar,
        &options,
        &dir.join("streams.log"),
        Duration::from_secs(3_600),
    )?;
    let running = started.elapsed().as_secs_f64();
    let answered = wait_answers(
        runtime,
        &streams.grpc_address,
        &sample,
        started,
        &mut || match streams.process.try_exit()? {
            Some(status) => bail!(
                "the Kafka Streams baseline exited with {status}:\n{}",
                streams.process.tail()
            ),
            None => Ok(()),
        },
    )?;
    ways.push(Way {
        name: "Kafka Streams, same changelog",
        seconds: running,
        measured: "JVM start to RUNNING (restore included)".into(),
        answered: Some(answered),
    });
    let _ = streams.process.terminate(Duration::from_secs(300));

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
        "{:<32} {:>9} {:>10} {:>12} {:>13} {:>13}  measured",
        "way", "seconds", "MiB/s", "vs replay", "first answer", "all exact"
    );
    for way in &ways {
        println!(
            "{:<32} {:>9.2} {:>10.0} {:>11.1}x {:>13} {:>13}  {}",
            way.name,
            way.seconds,
            store_bytes as f64 / (1 << 20) as f64 / way.seconds.max(1e-6),
            replay / way.seconds.max(1e-6),
            way.answered
                .map_or("-".to_owned(), |a| format!("{:.2} s", a.first)),
            way.answered
                .map_or("-".to_owned(), |a| format!("{:.2} s", a.exact)),
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
        "sampled_keys": sample.len(),
        "ways": ways
            .iter()
            .map(|w| serde_json::json!({
                "way": w.name,
                "seconds": w.seconds,
                "measured": w.measured,
                "first_answer_seconds": w.answered.map(|a| a.first),
                "all_exact_seconds": w.answered.map(|a| a.exact),
            }))
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
