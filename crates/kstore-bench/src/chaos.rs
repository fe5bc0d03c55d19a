//! `cargo xtask chaos --scenario <kill|pause|rolling-restart|scale-out|scale-in|all>`: runs
//! each scenario of `kstore_testkit::chaos` on a fresh 3-node cluster (12 partitions, one
//! standby) with events flowing and a reader asking every node in turn; prints a table and
//! writes a JSON report under `target/chaos/`.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use kstore_testkit::TestKafka;
use kstore_testkit::broker::{Broker, DEFAULT_PORT, Started};
use kstore_testkit::chaos::{self, ChaosOptions, ChaosReport, Fault};
use serde_json::json;

/// What `chaos` runs.
#[derive(Debug, Clone, clap::Args)]
pub struct Chaos {
    /// kill, pause, rolling-restart, scale-out, scale-in, or all.
    #[arg(long, default_value = "all")]
    pub scenario: String,
    /// Order events per second.
    #[arg(long, default_value_t = 2_000)]
    pub rate: u64,
    /// Reads per second.
    #[arg(long, default_value_t = 1_000)]
    pub read_rate: u64,
    /// The broker's port.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
}

pub fn run(options: &Chaos) -> Result<()> {
    let faults: Vec<Fault> = if options.scenario == "all" {
        Fault::ALL.to_vec()
    } else {
        vec![Fault::parse(&options.scenario).with_context(|| {
            format!(
                "unknown scenario {:?}; choose kill, pause, rolling-restart, scale-out, scale-in or all",
                options.scenario
            )
        })?]
    };
    let binaries = crate::binaries::locate()?;
    let broker = Broker::on_port(options.port);
    let (started, _lease) = broker.start_leased()?;
    let kafka = TestKafka::at(&broker.bootstrap());
    let runtime = tokio::runtime::Runtime::new()?;
    let target = binaries.report_dir("chaos");
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let dir = target.join(format!("run-{stamp}"));
    std::fs::create_dir_all(&dir)?;
    let mut settings = ChaosOptions::new(binaries.node.clone(), dir.clone());
    settings.rate = options.rate;
    settings.read_rate = options.read_rate;

    let mut reports = Vec::new();
    for fault in faults {
        eprintln!("chaos: {} ...", fault.name());
        match runtime.block_on(chaos::run(&kafka, &settings, fault)) {
            Ok(report) => {
                eprintln!("chaos: {} done", fault.name());
                reports.push(report);
            }
            Err(error) => {
                eprintln!(
                    "chaos: {} failed: {error:#} (logs in {})",
                    fault.name(),
                    dir.display()
                );
                if started == Started::New {
                    broker.stop()?;
                }
                bail!("scenario {} failed", fault.name());
            }
        }
    }
    if started == Started::New {
        broker.stop()?;
    }

    print_table(&settings, &reports);
    let json = json!({
        "partitions": settings.partitions,
        "nodes": 3,
        "standbys": 1,
        "events_per_second": settings.rate,
        "reads_per_second": settings.read_rate,
        "read_attempt_timeout_ms": chaos::ATTEMPT_TIMEOUT.as_millis() as u64,
        "scenarios": reports.iter().map(report_json).collect::<Vec<_>>(),
    });
    let file = target.join(format!("chaos-{stamp}.json"));
    std::fs::write(&file, serde_json::to_string_pretty(&json)?)?;
    println!(
        "\nreport: {} (node logs in {})",
        file.display(),
        dir.display()
    );
    if reports
        .iter()
        .any(|r| !r.state_exact || r.reads_answered < r.reads_issued)
    {
        bail!("a scenario lost reads or state");
    }
    Ok(())
}

fn print_table(settings: &ChaosOptions, reports: &[ChaosReport]) {
    println!();
    println!(
        "chaos: 3 nodes, {} partitions, 1 standby, {} events/s, {} reads/s over {} keys through \
         every node in turn (a read tries the next node after {} ms)",
        settings.partitions,
        settings.rate,
        settings.read_rate,
        settings.read_keys,
        chaos::ATTEMPT_TIMEOUT.as_millis()
    );
    println!(
        "{:<16} {:>8} {:>9} {:>8} {:>12} {:>14} {:>8} {:>7}",
        "scenario",
        "reads",
        "answered",
        "percent",
        "longest gap",
        "p99 in fault",
        "max lag",
        "exact"
    );
    for r in reports {
        println!(
            "{:<16} {:>8} {:>9} {:>7.3}% {:>9} ms {:>11.1} ms {:>8} {:>7}",
            r.fault.name(),
            r.reads_issued,
            r.reads_answered,
            100.0 * r.reads_answered as f64 / r.reads_issued.max(1) as f64,
            r.longest_gap.0.as_millis(),
            r.read_p99_during_fault.as_secs_f64() * 1000.0,
            r.max_lag,
            if r.state_exact { "yes" } else { "NO" }
        );
    }
    for r in reports {
        for (what, value) in &r.notes {
            println!("  {}: {what}: {value}", r.fault.name());
        }
        for failure in &r.failures {
            println!("  {}: failed read: {failure}", r.fault.name());
        }
        for mismatch in &r.mismatches {
            println!("  {}: state differs: {mismatch}", r.fault.name());
        }
    }
}

fn report_json(r: &ChaosReport) -> serde_json::Value {
    json!({
        "scenario": r.fault.name(),
        "reads_issued": r.reads_issued,
        "reads_answered": r.reads_answered,
        "longest_gap_ms": r.longest_gap.0.as_millis() as u64,
        "longest_gap_key": r.longest_gap.1,
        "read_p99_during_fault_ms": r.read_p99_during_fault.as_secs_f64() * 1000.0,
        "read_p99_ms": r.read_p99.as_secs_f64() * 1000.0,
        "max_lag": r.max_lag,
        "events": r.events,
        "state_exact": r.state_exact,
        "mismatches": r.mismatches,
        "failed_reads": r.failures,
        "notes": r.notes.iter().map(|(k, v)| json!({"what": k, "value": v})).collect::<Vec<_>>(),
    })
}
