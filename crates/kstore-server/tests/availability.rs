//! Availability under change, as `cargo xtask chaos` measures it, shortened: a 3-node
//! cluster (12 partitions, one standby) with events flowing and a reader that asks every
//! node in turn for a fixed set of customers, through `kill -9`, SIGSTOP, a rolling restart,
//! scale-out and scale-in. Every read must be answered, every answer must be exactly the
//! fold of its key's events before the position it states (and its lag not understated),
//! nothing may be folded twice or duplicated in the input, and every customer's final state
//! must equal a recomputation from the events sent.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, ensure};
use common::run_async;
use kstore_testkit::chaos::{self, ChaosOptions, ChaosReport, Fault};

fn options(dir: &tempfile::TempDir) -> ChaosOptions {
    let mut options = ChaosOptions::new(
        PathBuf::from(env!("CARGO_BIN_EXE_kstore-node")),
        dir.path().to_path_buf(),
    );
    options.rate = 1_000;
    options.customers = 1_000;
    options.read_keys = 100;
    options.read_rate = 400;
    options.before_fault = Duration::from_secs(5);
    options.after_fault = Duration::from_secs(5);
    options
}

/// Runs a scenario and checks what every scenario must give: every read answered and exact
/// for its stated position, no double fold, the final state exact.
fn scenario(fault: Fault) -> Result<ChaosReport> {
    run_async(async {
        let dir = tempfile::tempdir()?;
        let report = chaos::run(kstore_testkit::kafka(), &options(&dir), fault).await?;
        eprintln!(
            "{}: {}/{} reads answered, {} answers audited, longest gap {:?}, p99 in fault {:?}, \
             max lag {}, max time behind {:?}, notes {:?}",
            fault.name(),
            report.reads_answered,
            report.reads_issued,
            report.audit.answers,
            report.longest_gap,
            report.read_p99_during_fault,
            report.max_lag,
            report.audit.max_time_behind,
            report.notes
        );
        ensure!(report.reads_issued > 0, "no reads");
        ensure!(
            report.audit.answers == report.reads_answered,
            "{} answers audited of {}",
            report.audit.answers,
            report.reads_answered
        );
        let problems = report.problems();
        ensure!(problems.is_empty(), "{}: {problems:#?}", fault.name());
        Ok(report)
    })
}

#[test]
fn every_read_answers_through_a_kill_9_and_the_state_stays_exact() -> Result<()> {
    let report = scenario(Fault::Kill)?;
    ensure!(
        report
            .notes
            .iter()
            .any(|(what, _)| what.contains("processing elsewhere"))
    );
    Ok(())
}

#[test]
fn every_read_answers_through_a_pause_and_nothing_is_lost_or_doubled() -> Result<()> {
    scenario(Fault::Pause).map(drop)
}

#[test]
fn a_rolling_restart_keeps_the_assignment_replays_nothing_and_every_read_answers() -> Result<()> {
    // The scenario itself fails if the assignment moved or a partition replayed from zero.
    scenario(Fault::RollingRestart).map(drop)
}

#[test]
fn every_read_answers_through_scale_out_and_scale_in_with_a_drain() -> Result<()> {
    scenario(Fault::ScaleOut)?;
    scenario(Fault::ScaleIn).map(drop)
}

#[test]
fn a_full_disk_fails_one_nodes_copies_until_space_returns_and_every_read_answers_exactly()
-> Result<()> {
    scenario(Fault::FullDisk).map(drop)
}

#[test]
fn a_copy_damaged_under_a_running_node_is_rebuilt_and_every_read_answers_exactly() -> Result<()> {
    scenario(Fault::DamageCopy).map(drop)
}

#[test]
fn a_short_random_soak_answers_every_read_exactly_and_ends_exact() -> Result<()> {
    run_async(async {
        let dir = tempfile::tempdir()?;
        let mut options = options(&dir);
        options.soak.duration = Duration::from_secs(60);
        options.soak.seed = 7;
        let report = chaos::run(kstore_testkit::kafka(), &options, Fault::Random).await?;
        for (what, value) in &report.notes {
            eprintln!("random: {what}: {value}");
        }
        eprintln!(
            "random: {}/{} reads answered, {} audited, longest gap {:?}, max lag {}, max time \
             behind {:?}",
            report.reads_answered,
            report.reads_issued,
            report.audit.answers,
            report.longest_gap,
            report.max_lag,
            report.audit.max_time_behind
        );
        ensure!(
            report
                .notes
                .iter()
                .any(|(what, _)| what.starts_with("move ")),
            "the nemesis injected nothing"
        );
        let problems = report.problems();
        ensure!(problems.is_empty(), "random: {problems:#?}");
        Ok(())
    })
}
