//! Prometheus metrics: names, histogram buckets, and the exporter on the metrics port.
//!
//! Counters that ingest keeps as atomics (for its logs) are published as Prometheus counters
//! by the lag tracker, so there is one source of truth for each number.

use std::sync::atomic::Ordering;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::ingest::IngestMetrics;
use crate::registry::Registry;
use crate::standby::updater::UpdaterMetrics;

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
/// Records the consumer handed over again after they were folded (skipped, never folded
/// twice).
pub const REDELIVERED_RECORDS: &str = "kstore_redelivered_records_total";
/// Records the consumer handed over, as a copy turned active, below the input offset its
/// store already reflected (skipped, never folded twice): an exactly-once invariant
/// violation, which must stay 0.
pub const EXACTLY_ONCE_VIOLATIONS: &str = "kstore_exactly_once_violations_total";
/// Changelog records the state updater applied to standby and restoring copies.
pub const UPDATER_RECORDS: &str = "kstore_updater_records_total";
/// Standby copies the state updater stopped updating because their store failed.
pub const UPDATER_FAILURES: &str = "kstore_updater_failures_total";
/// Seconds from a partition's assignment to its processing: its restore (a promoted standby
/// replays only the tail it had not applied).
pub const ACTIVATION_TIME: &str = "kstore_partition_activation_seconds";
/// Seconds from the start of a commit to its updates being in RocksDB.
pub const COMMIT_LATENCY: &str = "kstore_commit_latency_seconds";
/// Input records a local copy does not reflect yet, by partition.
pub const PARTITION_LAG: &str = "kstore_partition_lag_records";
/// The role of a local copy, by partition: 1 active, 2 standby, 3 restoring, 4 opening, 5
/// bootstrapping, 6 failed (0: no copy here).
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

/// Activation buckets: from 10 ms (a warm standby) to 10 minutes (a replay from zero).
const ACTIVATION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Commit latency buckets: from 1 ms to 10 s.
const COMMIT_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How often histograms are folded in, so that samples do not pile up between scrapes.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the Prometheus recorder and serves `GET /metrics` on `listener` (bound by the
/// caller, so that port 0 works and the bound address can be told). Runs until the task is
/// dropped.
pub fn install(listener: TcpListener) -> Result<(), BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(READ_LATENCY.into()), READ_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(COMMIT_LATENCY.into()), COMMIT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(ACTIVATION_TIME.into()), ACTIVATION_BUCKETS)?
        .install_recorder()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            interval.tick().await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(serve(listener, handle));
    Ok(())
}

async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "accepting a metrics connection");
                continue;
            }
        };
        let handle = handle.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let handle = handle.clone();
            async move { Ok::<_, std::convert::Infallible>(answer(&request, &handle)) }
        });
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                tracing::debug!(%error, "serving a metrics connection");
            }
        });
    }
}

/// `GET /metrics` gets the metrics in Prometheus' text format; anything else a 404 or 405.
fn answer(request: &Request<Incoming>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    let (status, body) = if request.uri().path() != "/metrics" {
        (StatusCode::NOT_FOUND, String::new())
    } else if request.method() != Method::GET {
        (StatusCode::METHOD_NOT_ALLOWED, String::new())
    } else {
        (StatusCode::OK, handle.render())
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// Publishes ingest's and the state updater's counters, and each local copy's role and lag.
/// A partition without a local copy shows role 0 and lag 0.
pub fn publish(ingest: &IngestMetrics, updater: &UpdaterMetrics, registry: &Registry) {
    let counters = [
        (INGEST_RECORDS, &ingest.records_in),
        (PROCESSED_RECORDS, &ingest.records_processed),
        (DEAD_LETTERS, &ingest.dead_letters),
        (PARTITION_MISMATCHES, &ingest.partition_mismatches),
        (COMMITS, &ingest.commits),
        (ABORTS, &ingest.aborts),
        (REDELIVERED_RECORDS, &ingest.redelivered),
        (EXACTLY_ONCE_VIOLATIONS, &ingest.violations),
        (UPDATER_RECORDS, &updater.records),
        (UPDATER_FAILURES, &updater.failures),
    ];
    for (name, counter) in counters {
        metrics::counter!(name).absolute(counter.load(Ordering::Relaxed));
    }
    for partition in 0..registry.partitions() as i32 {
        let copy = registry.get(partition);
        let lag = copy.as_ref().map_or(0, |c| c.lag());
        let role = match &copy {
            Some(copy) => copy.role() as i32,
            None => registry.pending(partition).map_or(0, |p| p.role as i32),
        };
        let partition = partition.to_string();
        metrics::gauge!(PARTITION_LAG, "partition" => partition.clone()).set(lag as f64);
        metrics::gauge!(PARTITION_ROLE, "partition" => partition).set(f64::from(role));
    }
}
