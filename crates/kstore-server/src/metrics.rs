//! Prometheus metrics (names, histogram buckets) and the HTTP server of the metrics port,
//! which also serves the probes (`/startupz`, `/readyz`, `/livez`; see [`crate::probes`]).
//! Its routes are one table, [`ROUTES`]: a page or an endpoint more is one line there.
//!
//! Counters that ingest keeps as atomics (for its logs) are published as Prometheus counters
//! by the lag tracker, so there is one source of truth for each number.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::console::{Console, ConsoleRefused};
use crate::ingest::IngestMetrics;
use crate::probes::Probes;
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
/// 1 for an active copy whose input waits because this node's module is an earlier version
/// of its partition's (`processor::versions`), else 0, by partition.
pub const PARTITION_HELD: &str = "kstore_partition_held";
/// Reads (a Get, or a MultiGet's keys of one partition) that the block cache and memtables
/// could not answer, so they read from disk on the blocking pool. A steady rise means the
/// block cache is too small for the keys being read.
pub const DISK_READS: &str = "kstore_disk_reads_total";
/// Seconds to answer a read, by method, role and outcome.
pub const READ_LATENCY: &str = "kstore_read_latency_seconds";

/// Every metric the node exports, for the dashboards' and alerting rules' test: a name
/// that a dashboard uses and this list lacks is a name the node never exports. (A unit test
/// checks that every `kstore_` name in the server's source is here.)
pub const ALL: &[&str] = &[
    INGEST_RECORDS,
    PROCESSED_RECORDS,
    DEAD_LETTERS,
    PARTITION_MISMATCHES,
    COMMITS,
    ABORTS,
    REDELIVERED_RECORDS,
    EXACTLY_ONCE_VIOLATIONS,
    UPDATER_RECORDS,
    UPDATER_FAILURES,
    ACTIVATION_TIME,
    COMMIT_LATENCY,
    PARTITION_LAG,
    PARTITION_ROLE,
    PARTITION_HELD,
    DISK_READS,
    READ_LATENCY,
    crate::drain::LEAVE_FALLBACKS,
    crate::grpc::forward::FORWARDED_READS,
    crate::grpc::forward::FORWARD_STALLS,
    crate::tls::TLS_RELOADS,
    crate::tls::TLS_HANDSHAKE_FAILURES,
    crate::gossip::MEMBERS,
    crate::gossip::VIEW_VERSION,
    crate::gossip::BAD_VALUES,
    crate::gossip::BAD_DATAGRAMS,
    crate::gossip::FOREIGN_CLUSTER_MESSAGES,
    crate::gossip::UNAUTHENTICATED_DATAGRAMS,
    crate::standby::COPIES_OPENED,
    crate::standby::COPIES_RETIRED,
    crate::standby::COPIES_DELETED,
    crate::standby::COPIES_RECOVERED,
    crate::standby::COPIES_DAMAGED,
    crate::standby::COPIES_BOOTSTRAPPED,
    crate::standby::COPY_FAILURES,
    crate::snapshot::SNAPSHOTS_SENT,
    crate::snapshot::SNAPSHOT_BYTES_RECEIVED,
    crate::snapshot::SNAPSHOTS_FETCHED,
    crate::snapshot::SNAPSHOT_REFUSALS,
    crate::standby::updater::BAD_HEADERS,
    crate::grpc::limits::REFUSED,
    crate::backup::BACKUPS_CREATED,
    crate::backup::BACKUP_FAILURES,
    crate::backup::BACKUP_SECONDS,
    crate::backup::BACKUP_ADDED_BYTES,
    crate::backup::BACKUPS_REJECTED,
    crate::backup::BACKUP_NEWEST_TIMESTAMP,
    crate::backup::BACKUP_INTERVAL,
];

/// The histograms among [`ALL`]: Prometheus shows each as `_bucket`, `_sum` and `_count`
/// series.
pub const HISTOGRAMS: &[&str] = &[
    ACTIVATION_TIME,
    COMMIT_LATENCY,
    READ_LATENCY,
    crate::backup::BACKUP_SECONDS,
];

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

/// Installs the Prometheus recorder and serves the metrics port on `listener` (bound by
/// the caller, so that port 0 works and the bound address can be told): `GET /metrics` and
/// the probes. Runs until the task is dropped.
pub fn install(listener: TcpListener, probes: Arc<Probes>) -> Result<ConsoleSlot, BuildError> {
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(READ_LATENCY.into()), READ_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(COMMIT_LATENCY.into()), COMMIT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(ACTIVATION_TIME.into()), ACTIVATION_BUCKETS)?
        .install_recorder()?;
    let upkeep = prometheus.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            interval.tick().await;
            upkeep.run_upkeep();
        }
    });
    let console = ConsoleSlot::default();
    tokio::spawn(serve(
        listener,
        Arc::new(Served {
            prometheus,
            probes,
            console: console.clone(),
        }),
    ));
    Ok(console)
}

/// Where the web console's state goes once the node's gossip and gRPC service are up; the
/// console answers 503 until then.
pub type ConsoleSlot = Arc<OnceLock<Console>>;

/// What the metrics port's routes answer from.
#[derive(Debug)]
struct Served {
    prometheus: PrometheusHandle,
    probes: Arc<Probes>,
    console: ConsoleSlot,
}

async fn serve(listener: TcpListener, served: Arc<Served>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "accepting a metrics connection");
                continue;
            }
        };
        let served = served.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let served = served.clone();
            async move { Ok::<_, std::convert::Infallible>(answer(&request, &served).await) }
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

/// A route's handler: answers a request from what the port serves.
type Handler = fn(&Request<Incoming>, &Served) -> Response<Full<Bytes>>;

/// The metrics port's routes, all `GET`; a page or an endpoint more (a console, a JSON view
/// of the cluster) is one line here, and a field of [`Served`] if it needs more than the
/// probes and the metrics.
///
/// | path | answer |
/// |---|---|
/// | `/metrics` | Prometheus' text format |
/// | `/startupz` | 200 once the first assignment's stores are open, else 503 |
/// | `/readyz` | 200 while the node answers reads within `probes.max-lag`, else 503 |
/// | `/livez` | 200 unless a loop of the node stalled or stopped, else 503 |
/// | `/console` | the web console's page ([`crate::console`]) |
/// | `/console/cluster.json?store=…` | the cluster as this node's view of a store sees it |
/// | `/console/lookup?key=…&store=…` | a key's routing and value (loopback metrics address only) |
///
/// Probes answer with a line per thing checked.
const ROUTES: &[(&str, Handler)] = &[
    ("/metrics", |_, served| prometheus_text(served)),
    ("/startupz", |_, served| probe(served.probes.startup())),
    ("/readyz", |_, served| probe(served.probes.readiness())),
    ("/livez", |_, served| probe(served.probes.liveness())),
    ("/console", |_, _| {
        let mut response = text(StatusCode::OK, crate::console::PAGE.to_owned());
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        response
    }),
    ("/console/cluster.json", |request, served| {
        match served.console.get() {
            Some(console) => match console.cluster_json(request.uri().query()) {
                Ok(cluster) => json_response(StatusCode::OK, &cluster),
                Err(refused) => console_refused(&refused),
            },
            None => console_starting(),
        }
    }),
];

/// The console's key lookup: the one route that waits on a read.
const LOOKUP_PATH: &str = "/console/lookup";

/// The paths the metrics port answers; the manifests' test checks that every probe in
/// `deploy/k8s/` asks one of them.
pub fn paths() -> impl Iterator<Item = &'static str> {
    ROUTES
        .iter()
        .map(|(path, _)| *path)
        .chain(std::iter::once(LOOKUP_PATH))
}

/// Answers a request: the console's lookup, or a route of [`ROUTES`].
async fn answer(request: &Request<Incoming>, served: &Served) -> Response<Full<Bytes>> {
    if request.uri().path() != LOOKUP_PATH {
        return route(request, served);
    }
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, String::new());
    }
    let Some(console) = served.console.get() else {
        return console_starting();
    };
    match console.lookup(request.uri().query()).await {
        Ok(answer) => json_response(StatusCode::OK, &answer),
        Err(refused) => console_refused(&refused),
    }
}

/// A console request refused, as JSON with the reason.
fn console_refused(refused: &ConsoleRefused) -> Response<Full<Bytes>> {
    let status = match refused {
        ConsoleRefused::NotLoopback => StatusCode::FORBIDDEN,
        ConsoleRefused::NoKey => StatusCode::BAD_REQUEST,
        ConsoleRefused::UnknownStore { .. } => StatusCode::NOT_FOUND,
    };
    json_response(status, &serde_json::json!({"error": refused.message()}))
}

fn console_starting() -> Response<Full<Bytes>> {
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &serde_json::json!({"error": "the node is starting: its cluster view is not up yet"}),
    )
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = text(status, body.to_string());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Answers a request by its route: 404 for a path no route has, 405 for another method
/// than `GET`.
fn route(request: &Request<Incoming>, served: &Served) -> Response<Full<Bytes>> {
    match ROUTES
        .iter()
        .find(|(path, _)| *path == request.uri().path())
    {
        None => text(StatusCode::NOT_FOUND, String::new()),
        Some(_) if request.method() != Method::GET => {
            text(StatusCode::METHOD_NOT_ALLOWED, String::new())
        }
        Some((_, handler)) => handler(request, served),
    }
}

fn prometheus_text(served: &Served) -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::OK, served.prometheus.render());
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

fn probe(report: kstore_core::probes::ProbeReport) -> Response<Full<Bytes>> {
    let status = if report.pass {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text(status, report.text())
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Publishes a store's ingest and state updater counters, and each local copy's role and
/// lag, labelled with the store. A partition without a local copy shows role 0 and lag 0.
pub fn publish(store: &str, ingest: &IngestMetrics, updater: &UpdaterMetrics, registry: &Registry) {
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
        metrics::counter!(name, "store" => store.to_owned())
            .absolute(counter.load(Ordering::Relaxed));
    }
    for partition in 0..registry.partitions() as i32 {
        let copy = registry.get(partition);
        let lag = copy.as_ref().map_or(0, |c| c.lag());
        let role = match &copy {
            Some(copy) => copy.role() as i32,
            None => registry.pending(partition).map_or(0, |p| p.role as i32),
        };
        let held = copy.as_ref().is_some_and(|c| c.held().is_some());
        let partition = partition.to_string();
        metrics::gauge!(PARTITION_LAG, "store" => store.to_owned(), "partition" => partition.clone())
            .set(lag as f64);
        metrics::gauge!(PARTITION_ROLE, "store" => store.to_owned(), "partition" => partition.clone())
            .set(f64::from(role));
        metrics::gauge!(PARTITION_HELD, "store" => store.to_owned(), "partition" => partition)
            .set(if held { 1.0 } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `kstore_…` metric name written in the server's source, as a string literal.
    fn names_in_source() -> std::collections::BTreeSet<String> {
        let mut names = std::collections::BTreeSet::new();
        let mut dirs = vec![std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                for piece in text.split("\"kstore_").skip(1) {
                    let name: String = piece
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() && piece[name.len()..].starts_with('"') {
                        names.insert(format!("kstore_{name}"));
                    }
                }
            }
        }
        names
    }

    #[test]
    fn every_metric_name_in_the_source_is_listed() {
        let listed: std::collections::BTreeSet<String> =
            ALL.iter().map(|s| s.to_string()).collect();
        let missing: Vec<_> = names_in_source().difference(&listed).cloned().collect();
        assert!(missing.is_empty(), "add these to metrics::ALL: {missing:?}");
        assert!(HISTOGRAMS.iter().all(|h| ALL.contains(h)));
    }
}
