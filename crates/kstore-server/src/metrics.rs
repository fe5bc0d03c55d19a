//! Prometheus metrics: names, histogram buckets, and the exporter on the metrics port.
//!
//! Counters that ingest keeps as atomics (for its logs) are published as Prometheus counters
//! by the lag tracker, so there is one source of truth for each number.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

use crate::ingest::IngestMetrics;
use crate::registry::Registry;

/// Input records read.
pub const INGEST_RECORDS: &str = "kstore_ingest_records_total";
/// Input records folded into state.
pub const PROCESSED_RECORDS: &str = "kstore_processed_records_total";
/// Input records sent to the dead-letter topic.
pub const DEAD_LETTERS: &str = "kstore_dead_letters_total";
/// Input records whose key belongs to another partition.
pub const PARTITION_MISMATCHES: &str = "kstore_partition_mismatches_total";
/// Transactions committed and aborted.
pub const COMMITS: &str = "kstore_commits_total";
/// Transactions aborted.
pub const ABORTS: &str = "kstore_aborts_total";
/// Changelog records replayed by restores.
pub const RESTORED_RECORDS: &str = "kstore_restored_records_total";
/// Seconds from the start of a commit to its updates being in RocksDB.
pub const COMMIT_LATENCY: &str = "kstore_commit_latency_seconds";
/// Input records a local copy does not reflect yet, by partition.
pub const PARTITION_LAG: &str = "kstore_partition_lag_records";
/// The role of a local copy, by partition: 1 active, 2 standby, 3 restoring.
pub const PARTITION_ROLE: &str = "kstore_partition_role";
/// Reads (a Get, or a MultiGet's keys of one partition) that the block cache and memtables
/// could not answer, so they read from disk on the blocking pool. A steady rise means the
/// block cache is too small for the keys being read.
pub const DISK_READS: &str = "kstore_disk_reads_total";
/// Seconds to answer a read, by method, role and outcome.
pub const READ_LATENCY: &str = "kstore_read_latency_seconds";

/// Read latency buckets: from 50 µs (a cached point read) to 5 s (a read that waited for
/// its position bound).
const READ_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

/// Commit latency buckets: from 1 ms to 10 s.
const COMMIT_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Starts the Prometheus exporter on `address` (`GET /metrics`).
pub fn install(address: SocketAddr) -> Result<(), BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(address)
        .set_buckets_for_metric(Matcher::Full(READ_LATENCY.into()), READ_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(COMMIT_LATENCY.into()), COMMIT_BUCKETS)?
        .install()
}

/// Publishes ingest's counters and each local copy's lag.
pub fn publish(ingest: &IngestMetrics, registry: &Registry) {
    let counters = [
        (INGEST_RECORDS, &ingest.records_in),
        (PROCESSED_RECORDS, &ingest.records_processed),
        (DEAD_LETTERS, &ingest.dead_letters),
        (PARTITION_MISMATCHES, &ingest.partition_mismatches),
        (COMMITS, &ingest.commits),
        (ABORTS, &ingest.aborts),
        (RESTORED_RECORDS, &ingest.restored_records),
    ];
    for (name, counter) in counters {
        metrics::counter!(name).absolute(counter.load(Ordering::Relaxed));
    }
    for copy in registry.all() {
        let partition = copy.partition.to_string();
        metrics::gauge!(PARTITION_LAG, "partition" => partition.clone()).set(copy.lag() as f64);
        metrics::gauge!(PARTITION_ROLE, "partition" => partition)
            .set(f64::from(copy.role() as i32));
    }
}
