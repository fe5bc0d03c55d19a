//! `kstore-bench`: kstore's benchmarks and chaos scenarios, each against a real broker and
//! real `kstore-node` processes. Run it through `cargo xtask bench …` and `cargo xtask
//! chaos …`, which install what the build needs first and build it with the binaries it
//! runs.
//!
//! - `ingest | get | cluster | client | restore | scan | compare` measure ingest rate, read
//!   latency, standbys and gossip, the smart client, restore, scans, and kstore beside the
//!   Kafka Streams baseline;
//! - `report` runs the suite once and writes one Markdown report with charts (`docs/bench/`);
//! - `chaos` injects faults into a cluster under load and reports what reads saw.

mod bench;
mod binaries;
mod chaos;
mod client_bench;
mod cluster_bench;
mod compare_bench;
mod ghz;
mod paused_bench;
mod report;
mod restore_bench;
mod scan_bench;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask bench",
    about = "kstore's benchmarks and chaos scenarios"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One node's sustained ingest rate, exactly-once and at-least-once, and its RSS.
    Ingest(bench::IngestBench),
    /// Get latency at a fixed rate (open loop), idle and while ingesting; MultiGet of 100 keys.
    /// With `--paused-node`: Get through kstore-client on a 3-node cluster, with no fault and
    /// while one node is SIGSTOPped, per read policy, with and without hedging.
    Get(bench::GetBench),
    /// The state updater's catch-up rate, standby lag under ingest, and how soon a killed
    /// node is suspect and dead.
    Cluster(cluster_bench::ClusterBench),
    /// What the smart client adds to a read, against a raw tonic call to the right node.
    Client(client_bench::ClientBench),
    /// How fast a partition comes back: raw copy, changelog replay, backup, peer snapshot;
    /// and what a backup and an incremental backup cost.
    Restore(restore_bench::RestoreBench),
    /// Scans of a store of a million keys: the first page of a whole-store scan, a whole
    /// store through the client, and each partition through raw Scan calls.
    Scan(scan_bench::ScanBench),
    /// kstore beside the Kafka Streams baseline in one run: exactly-once ingest, Get
    /// latency idle and under ingest, failed reads, RSS, state size; a report and charts.
    Compare(compare_bench::CompareBench),
    /// The suite in one run (ingest, compare, get --paused-node, restore) and one Markdown
    /// report with charts, each figure beside its goal, in docs/bench/.
    Report(report::ReportBench),
    /// Runs fault scenarios (kill -9, SIGSTOP, rolling restart, scale-out, scale-in) on a
    /// 3-node cluster with events flowing and reads through every node; reports what the
    /// reads saw and whether the final state is exact.
    Chaos(chaos::Chaos),
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Ingest(bench) => bench::ingest(&bench).map(drop),
        Command::Get(bench) => bench::get(&bench),
        Command::Cluster(bench) => cluster_bench::cluster(&bench),
        Command::Client(bench) => client_bench::client(&bench),
        Command::Restore(bench) => restore_bench::restore(&bench).map(drop),
        Command::Scan(bench) => scan_bench::scan(&bench),
        Command::Compare(bench) => compare_bench::compare(&bench).map(drop),
        Command::Report(options) => report::report(&options),
        Command::Chaos(options) => chaos::run(&options),
    }
}
