//! `cargo xtask chaos --scenario <kill|pause|rolling-restart|scale-out|scale-in|all|random>`:
//! runs each scenario of `kstore_testkit::chaos` on a fresh 3-node cluster (12 partitions,
//! one standby) with events flowing and a reader asking every node in turn; prints a table,
//! the schedule a random soak ran, and what the audit of every answer found, and writes a
//! JSON report under `target/chaos/`.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use kstore_testkit::TestKafka;
use kstore_testkit::broker::{Broker, DEFAULT_PORT, Started};
use kstore_testkit::chaos::{self, ChaosOptions, ChaosReport, Fault, RestartPace};
use serde_json::json;

/// What `chaos` runs.
#[derive(Debug, Clone, clap::Args)]
pub struct Chaos {
    /// kill, pause, rolling-restart, scale-out, scale-in, all (each of those), or random (a
    /// randomized nemesis for --duration, scheduled by --seed).
    #[arg(long, default_value = "all")]
    pub scenario: String,
    /// How long the random soak injects faults, such as 90s, 30m or 2h.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub duration: std::time::Duration,
    /// The seed of the random soak's schedule: the same seed replays the same schedule.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Order events per second.
    #[arg(long, default_value_t = 2_000)]
    pub rate: u64,
    /// Reads per second.
    #[arg(long, default_value_t = 1_000)]
    pub read_rate: u64,
    /// Rounds of the rolling restart: every node is restarted once per round, and the
    /// assignment is compared before and after each.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// When the rolling restart stops the next node: a duration after the previous node was
    /// started again (as a supervisor does, without waiting for the cluster), or `settle`
    /// (once every partition has a live active and standby again).
    #[arg(long, default_value = "5s", value_parser = parse_pace)]
    pub pace: RestartPace,
    /// How long the rolling restart keeps each stopped node down before starting it again
    /// (0s: at once; beyond the 10 s session timeout its partitions move, and must come back).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub downtime: std::time::Duration,
    /// Stop each node of the rolling restart with kill -9 (a crash) instead of SIGTERM.
    #[arg(long)]
    pub kill: bool,
    /// A setting every node gets, as `kstore-node --set` takes it (repeatable), such as
    /// `kafka.debug=cgrp` (librdkafka's debug lines show with `KSTORE_LOG=info,librdkafka=debug`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub node_settings: Vec<String>,
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
                "unknown scenario {:?}; choose kill, pause, rolling-restart, scale-out, scale-in, all or random",
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
    settings.soak.duration = options.duration;
    settings.soak.seed = options.seed;
    settings.rolling.rounds = options.rounds.max(1);
    settings.rolling.pace = options.pace;
    settings.rolling.downtime = options.downtime;
    settings.rolling.kill = options.kill;
    settings.node_settings = options.node_settings.clone();

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
    let failed: Vec<String> = reports
        .iter()
        .flat_map(|r| {
            r.problems()
                .into_iter()
                .map(move |problem| format!("{}: {problem}", r.fault.name()))
        })
        .collect();
    if !failed.is_empty() {
        bail!("{}", failed.join("\n"));
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
        "{:<16} {:>8} {:>9} {:>8} {:>12} {:>14} {:>8} {:>12} {:>6} {:>6} {:>6} {:>7}",
        "scenario",
        "reads",
        "answered",
        "percent",
        "longest gap",
        "p99 in fault",
        "max lag",
        "max behind",
        "wrong",
        "lag<",
        "twice",
        "exact"
    );
    for r in reports {
        println!(
            "{:<16} {:>8} {:>9} {:>7.3}% {:>9} ms {:>11.1} ms {:>8} {:>9} ms {:>6} {:>6} {:>6} {:>7}",
            r.fault.name(),
            r.reads_issued,
            r.reads_answered,
            100.0 * r.reads_answered as f64 / r.reads_issued.max(1) as f64,
            r.longest_gap.0.as_millis(),
            r.read_p99_during_fault.as_secs_f64() * 1000.0,
            r.max_lag,
            r.audit.max_time_behind.as_millis(),
            r.audit.wrong_answers,
            r.audit.understated_lags,
            r.violations
                + r.redelivered
                + r.audit.duplicate_inputs
                + r.audit.duplicate_changelog_inputs,
            if r.state_exact { "yes" } else { "NO" }
        );
    }
    println!(
        "(wrong: answers not exactly the fold of their key's events before the position they \
         state; lag<: answers whose stated lag was below the true lag as of their node's look \
         at the input's end; twice: exactly-once violations, records handed over again, \
         duplicated inputs and changelog records repeating an input offset)"
    );
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
        for example in &r.audit.examples {
            println!("  {}: {example}", r.fault.name());
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
        "answers_audited": r.audit.answers,
        "wrong_answers": r.audit.wrong_answers,
        "understated_lags": r.audit.understated_lags,
        "max_time_behind_ms": r.audit.max_time_behind.as_millis() as u64,
        "exactly_once_violations": r.violations,
        "redelivered_records": r.redelivered,
        "duplicate_inputs": r.audit.duplicate_inputs,
        "missing_inputs": r.audit.missing_inputs,
        "duplicate_changelog_inputs": r.audit.duplicate_changelog_inputs,
        "audit_examples": r.audit.examples,
        "notes": r.notes.iter().map(|(k, v)| json!({"what": k, "value": v})).collect::<Vec<_>>(),
    })
}

/// Parses a duration written as a number and a unit: `90s`, `30m`, `2h` (or plain seconds).
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, "s"), |at| text.split_at(at));
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 90s, 30m or 2h"))?;
    let seconds = match unit {
        "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        other => return Err(format!("unknown unit {other:?} in {text:?}; use s, m or h")),
    };
    Ok(std::time::Duration::from_secs(seconds))
}

/// Parses the rolling restart's pace: `settle`, or a duration.
fn parse_pace(text: &str) -> Result<RestartPace, String> {
    if text.trim() == "settle" {
        return Ok(RestartPace::Settle);
    }
    parse_duration(text).map(RestartPace::After)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pace_is_settle_or_a_duration() {
        assert_eq!(parse_pace("settle"), Ok(RestartPace::Settle));
        assert_eq!(
            parse_pace("5s"),
            Ok(RestartPace::After(std::time::Duration::from_secs(5)))
        );
        assert!(parse_pace("soon").is_err());
    }

    #[test]
    fn durations_read_as_a_user_writes_them() {
        assert_eq!(
            parse_duration("90s"),
            Ok(std::time::Duration::from_secs(90))
        );
        assert_eq!(
            parse_duration("30m"),
            Ok(std::time::Duration::from_secs(1800))
        );
        assert_eq!(
            parse_duration("2h"),
            Ok(std::time::Duration::from_secs(7200))
        );
        assert_eq!(parse_duration("45"), Ok(std::time::Duration::from_secs(45)));
        assert!(parse_duration("ten minutes").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
