//! `cargo xtask bench get --paused-node`: reads through kstore-client while one node of a
//! 3-node cluster is SIGSTOPped, against the same reads with no fault.
//!
//! The bench starts a 3-node cluster (one standby per partition), loads `--customers`
//! customers, and for each read policy (PreferActive and AnyReplica, or the one `--policy`
//! names), without and with hedging
//! (`--hedge-ms`, or the client's default: after the p99 of recent latency, 5–50 ms),
//! builds a fresh client and runs two phases of `--seconds` at `--rate` Gets/s, open loop as
//! in `bench get`: no fault, then node-1 SIGSTOPped `--pause-seconds` from a quarter of the
//! phase in, then resumed. node-1 holds the active of about a third of the partitions and a
//! standby of another third. Reads go out on schedule whatever the answers do, so a read that
//! waits on the paused node shows in the percentiles. The p99 of the reads sent in the
//! pause's first two seconds (before and while gossip marks the node suspect), and of those
//! sent after the node is resumed, are shown apart. Figures are reported, never asserted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kstore_cli::generator::GeneratorConfig;
use kstore_cli::produce::{ProduceOptions, produce};
use kstore_client::{Client, Hedge, ReadPolicy};
use kstore_core::cluster::{Liveness, Role};
use kstore_testkit::TestKafka;
use kstore_testkit::broker::{Broker, Started};

use crate::bench::{BenchPolicy, GetBench, Latencies, ReadTarget, open_loop};
use crate::cluster_bench::{self, Node};

/// The node that is paused.
const PAUSED: &str = "node-1";

/// How long the reads sent first in a pause count as its start.
const PAUSE_START: Duration = Duration::from_secs(2);

/// One configuration's figures.
struct Row {
    policy: &'static str,
    hedge: String,
    calm: Latencies,
    paused: Latencies,
    /// The 1-minute load average after each phase (the machine is shared).
    load: (f64, f64),
    /// p99 of the reads sent in the pause's first two seconds, in microseconds.
    pause_start_p99: Option<u64>,
    /// p99 of the reads sent after the node was resumed, in microseconds.
    resumed_p99: Option<u64>,
    /// Hedges won and sent, and failovers, over the fault phase.
    hedges_won: u64,
    hedges_sent: u64,
    failovers: u64,
}

/// Runs the bench (see the module documentation), prints its table and returns its rows.
pub(crate) fn run(bench: &GetBench) -> Result<serde_json::Value> {
    if bench.pause_seconds == 0 || bench.pause_seconds >= bench.seconds {
        bail!(
            "--pause-seconds {} must be above 0 and below --seconds {}",
            bench.pause_seconds,
            bench.seconds
        );
    }
    let binaries = crate::binaries::locate()?;
    let broker = Broker::on_port(bench.port);
    let (started, _lease) = broker.start_leased()?;
    let kafka = TestKafka::at(&broker.bootstrap());
    // One worker, as in `bench get`: the client's reads share it with the pacing of the
    // open loop, as in a small service.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let app = kafka.unique_name("bench-paused");
    let input = format!("{app}-orders");
    runtime.block_on(kafka.create_topic(&input, bench.partitions))?;
    let events = u64::from(bench.customers) * 2;
    eprintln!(
        "bench: loading {events} events over {} customers",
        bench.customers
    );
    produce(&ProduceOptions {
        bootstrap: kafka.bootstrap().into(),
        topic: input.clone(),
        count: events,
        skip: 0,
        rate: 0,
        generator: GeneratorConfig {
            customers: bench.customers,
            ..GeneratorConfig::default()
        },
        kafka: Vec::new(),
    })?;
    let dir = tempfile::tempdir()?;
    let mut nodes = Vec::new();
    let result = measure(
        bench,
        &runtime,
        &mut nodes,
        &binaries.node,
        &kafka,
        &app,
        &input,
        dir.path(),
    );
    for node in &mut nodes {
        let _ = node.process.terminate(Duration::from_secs(60));
    }
    kafka.delete_topics_with_prefix(&format!("{app}-"), Some(&app))?;
    if started == Started::New {
        broker.stop()?;
    }
    let (held, rows) = result?;
    print_rows(bench, &held, &rows);
    Ok(rows_json(bench, &held, &rows))
}

/// The rows as JSON: one entry per policy, hedging and phase, latencies in milliseconds.
fn rows_json(bench: &GetBench, held: &str, rows: &[Row]) -> serde_json::Value {
    let ms = |us: u64| us as f64 / 1000.0;
    let phases: Vec<serde_json::Value> = rows
        .iter()
        .flat_map(|row| {
            [
                ("no fault", &row.calm, row.load.0),
                ("node paused", &row.paused, row.load.1),
            ]
            .map(|(phase, latencies, load)| {
                let h = &latencies.response;
                let paused = phase == "node paused";
                serde_json::json!({
                    "policy": row.policy,
                    "hedging": row.hedge,
                    "phase": phase,
                    "sent": latencies.sent,
                    "errors": latencies.errors,
                    "p50_ms": ms(h.value_at_quantile(0.5)),
                    "p99_ms": ms(h.value_at_quantile(0.99)),
                    "p999_ms": ms(h.value_at_quantile(0.999)),
                    "max_ms": ms(h.max()),
                    "pause_start_p99_ms": row.pause_start_p99.filter(|_| paused).map(ms),
                    "resumed_p99_ms": row.resumed_p99.filter(|_| paused).map(ms),
                    "hedges_won": paused.then_some(row.hedges_won),
                    "hedges_sent": paused.then_some(row.hedges_sent),
                    "failovers": paused.then_some(row.failovers),
                    "load_average": load,
                })
            })
        })
        .collect();
    serde_json::json!({
        "rate": bench.rate,
        "seconds_per_phase": bench.seconds,
        "pause_seconds": bench.pause_seconds,
        "customers": bench.customers,
        "partitions": bench.partitions,
        "paused_node_held": held,
        "phases": phases,
    })
}

#[allow(clippy::too_many_arguments)]
fn measure(
    bench: &GetBench,
    runtime: &tokio::runtime::Runtime,
    nodes: &mut Vec<Node>,
    node_binary: &std::path::Path,
    kafka: &TestKafka,
    app: &str,
    input: &str,
    dir: &std::path::Path,
) -> Result<(String, Vec<Row>)> {
    let mut seeds = Vec::new();
    for id in [PAUSED, "node-2", "node-3"] {
        eprintln!("bench: starting {id}");
        let node = runtime.block_on(cluster_bench::start(
            node_binary,
            kafka,
            app,
            input,
            dir,
            id,
            &seeds,
        ))?;
        seeds.push(node.gossip.clone());
        nodes.push(node);
    }
    eprintln!("bench: waiting for one active and one caught-up standby per partition");
    let view = runtime.block_on(cluster_bench::wait_settled(
        &mut nodes[0],
        bench.partitions,
        3,
    ))?;
    let paused_node = view
        .nodes
        .iter()
        .find(|n| n.node_id == PAUSED)
        .context("node-1 in the view")?;
    let count = |role| paused_node.copies.iter().filter(|c| c.role == role).count();
    let held = format!(
        "{PAUSED} holds {} actives and {} standbys of {} partitions",
        count(Role::Active),
        count(Role::Standby),
        bench.partitions
    );
    let addresses: Vec<String> = nodes.iter().map(|n| n.grpc.clone()).collect();
    let hedged = match bench.hedge_ms {
        0 => Hedge::default(),
        ms => Hedge::After(Duration::from_millis(ms)),
    };
    let max_lag = 10_000;
    let policies = match bench.policy {
        None => vec![BenchPolicy::PreferActive, BenchPolicy::AnyReplica],
        Some(policy) => vec![policy],
    };
    let configs = policies.into_iter().flat_map(|policy| {
        let (name, policy) = match policy {
            BenchPolicy::ActiveOnly => ("ActiveOnly", ReadPolicy::ActiveOnly),
            BenchPolicy::PreferActive => ("PreferActive", ReadPolicy::PreferActive { max_lag }),
            BenchPolicy::AnyReplica => ("AnyReplica", ReadPolicy::AnyReplica { max_lag }),
        };
        [(name, policy, Hedge::Off), (name, policy, hedged)]
    });
    let mut rows = Vec::new();
    for (name, policy, hedge) in configs {
        let client = runtime.block_on(
            Client::builder()
                .seeds(addresses.clone())
                .read_policy(policy)
                .hedge(hedge)
                .build(),
        )?;
        let client = Arc::new(client);
        let target = ReadTarget::Client(client.clone());
        eprintln!("bench: {name}, hedging {}: warming up", describe(hedge));
        let warm_up = GetBench {
            seconds: 3,
            ..bench.clone()
        };
        runtime.block_on(open_loop("warm-up", &target, &warm_up, 1))?;
        eprintln!(
            "bench: no fault, {} Gets/s for {} s",
            bench.rate, bench.seconds
        );
        let calm = runtime.block_on(open_loop("no fault", &target, bench, 1))?;
        let load_calm = load_average();
        let before = client.stats();
        let pause_at = Duration::from_secs(bench.seconds) / 4;
        eprintln!(
            "bench: {PAUSED} SIGSTOPped for {} s from {:?} in",
            bench.pause_seconds, pause_at
        );
        let paused = pause_during(runtime, &mut nodes[0], bench, pause_at, &target)?;
        let load_paused = load_average();
        let after = client.stats();
        wait_live(&client)?;
        let pause_start_p99 = window_p99(&paused, pause_at, PAUSE_START);
        let resumed_at = pause_at + Duration::from_secs(bench.pause_seconds);
        let resumed_p99 = window_p99(
            &paused,
            resumed_at,
            Duration::from_secs(bench.seconds).saturating_sub(resumed_at),
        );
        rows.push(Row {
            policy: name,
            hedge: describe(hedge),
            calm,
            paused,
            load: (load_calm, load_paused),
            pause_start_p99,
            resumed_p99,
            hedges_won: after.hedges_won - before.hedges_won,
            hedges_sent: after.hedges_sent - before.hedges_sent,
            failovers: after.failovers - before.failovers,
        });
    }
    Ok((held, rows))
}

/// Runs the open loop while `node` is paused for `--pause-seconds` from `pause_at` in.
fn pause_during(
    runtime: &tokio::runtime::Runtime,
    node: &mut Node,
    bench: &GetBench,
    pause_at: Duration,
    target: &ReadTarget,
) -> Result<Latencies> {
    let pause = Duration::from_secs(bench.pause_seconds);
    let process = &mut node.process;
    std::thread::scope(|scope| {
        let pauser = scope.spawn(move || -> Result<()> {
            std::thread::sleep(pause_at);
            let paused = process.pause()?;
            std::thread::sleep(pause);
            paused.resume()
        });
        let latencies = runtime.block_on(open_loop("node paused", target, bench, 1));
        pauser
            .join()
            .map_err(|_| anyhow::anyhow!("the pausing thread panicked"))??;
        latencies
    })
}

/// Waits until the client sees every node live again, then a little longer. (The client's
/// view is kept by its own task on the runtime's worker.)
fn wait_live(client: &Client) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while client
        .view()
        .nodes
        .iter()
        .any(|n| n.liveness != Liveness::Live)
    {
        if Instant::now() > deadline {
            bail!("{PAUSED} was not live again within 60 s of SIGCONT");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    Ok(())
}

/// Returns the p99, in microseconds, of the answered reads scheduled in
/// `[from, from + length)` of the phase.
fn window_p99(latencies: &Latencies, from: Duration, length: Duration) -> Option<u64> {
    let (start, end) = (from.as_secs_f64(), (from + length).as_secs_f64());
    let mut window: Vec<u64> = latencies
        .timeline
        .iter()
        .filter(|(at, _)| *at >= start && *at < end)
        .map(|(_, us)| *us)
        .collect();
    if window.is_empty() {
        return None;
    }
    window.sort_unstable();
    Some(window[((window.len() - 1) as f64 * 0.99).round() as usize])
}

/// Returns the machine's 1-minute load average.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn describe(hedge: Hedge) -> String {
    match hedge {
        Hedge::Off => "off".into(),
        Hedge::After(delay) => format!("{} ms", delay.as_millis()),
        Hedge::Percentile { quantile, min, max } => format!(
            "p{:.0} ({}–{} ms)",
            quantile * 100.0,
            min.as_millis(),
            max.as_millis()
        ),
    }
}

fn print_rows(bench: &GetBench, held: &str, rows: &[Row]) {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    println!();
    println!(
        "Get through kstore-client, 3 nodes, {} partitions, one standby each, {} customers; \
         {} Gets/s for {} s per phase (open loop), request timeout 1 s; {held}; in the fault \
         phase it is SIGSTOPped for {} s from {:?} in. Broker, nodes and bench on this machine \
         ({cpus} CPUs, {memory}).",
        bench.partitions,
        bench.customers,
        bench.rate,
        bench.seconds,
        bench.pause_seconds,
        Duration::from_secs(bench.seconds) / 4,
    );
    println!(
        "{:<13} {:<15} {:<11} {:>8} {:>8} {:>9} {:>8} {:>7} {:>13} {:>12} {:>9} {:>9} {:>5}",
        "policy",
        "hedging",
        "phase",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "errors",
        "p99 pause 2s",
        "p99 resumed",
        "hedges",
        "failovers",
        "load"
    );
    let ms = |us: u64| us as f64 / 1000.0;
    for row in rows {
        for (phase, latencies, load) in [
            ("no fault", &row.calm, row.load.0),
            ("node paused", &row.paused, row.load.1),
        ] {
            let h = &latencies.response;
            let paused = phase == "node paused";
            let window = |p99: Option<u64>| match (paused, p99) {
                (true, Some(us)) => format!("{:.3}", ms(us)),
                _ => String::new(),
            };
            let (pause_start, resumed) = (window(row.pause_start_p99), window(row.resumed_p99));
            let (hedges, failovers) = if paused {
                (
                    format!("{}/{}", row.hedges_won, row.hedges_sent),
                    row.failovers.to_string(),
                )
            } else {
                (String::new(), String::new())
            };
            println!(
                "{:<13} {:<15} {:<11} {:>8.3} {:>8.3} {:>9.3} {:>8.3} {:>7} {:>13} {:>12} {:>9} {:>9} {:>5.1}",
                row.policy,
                row.hedge,
                phase,
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99)),
                ms(h.value_at_quantile(0.999)),
                ms(h.max()),
                latencies.errors,
                pause_start,
                resumed,
                hedges,
                failovers,
                load
            );
        }
    }
    println!(
        "(hedges: won/sent; failovers: copies asked because the one before had not answered \
         within its share of the deadline; both over the fault phase; load: the machine's \
         1-minute load average after the phase)"
    );
}
