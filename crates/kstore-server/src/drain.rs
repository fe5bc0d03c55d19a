//! Draining, for scale-in and planned maintenance: the node stops ingesting, removes its
//! static member from the consumer group so that the other members take its partitions over
//! at once (not after `session.timeout.ms`), keeps answering reads from its copies until
//! their new actives run, then stops.
//!
//! Leaving the group goes over the node's own Kafka security settings (TLS, SASL). If it
//! cannot (settings kstore's connections do not speak, brokers that refuse or cannot be
//! reached), the partitions move only once the session timeout passes: the drain logs that
//! as a warning and counts it in [`LEAVE_FALLBACKS`], never silently.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kstore_core::cluster::{ClusterView, Liveness};
use tokio::sync::watch;

use crate::config::NodeConfig;
use crate::group::{self, LeaveError};
use crate::kafka::connect::Connector;

/// How long removing the member from the group may take.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// librdkafka's default `session.timeout.ms`.
const DEFAULT_SESSION_TIMEOUT_MS: u64 = 45_000;

/// Drains that could not remove the node's static member from the consumer group, so that
/// its partitions moved only after the session timeout, by reason: `settings` (the
/// `kafka.*` security settings are not ones kstore's own connections speak) or `broker`
/// (no broker could be reached, or one refused).
pub const LEAVE_FALLBACKS: &str = "kstore_drain_leave_fallbacks_total";

/// The switch that Admin Drain (or SIGTERM with `drain-on-shutdown`) turns.
#[derive(Debug)]
pub struct Drain {
    shutdown: Arc<AtomicBool>,
    requested: AtomicBool,
}

impl Drain {
    /// Returns the switch of a node that stops when `shutdown` is set.
    pub fn new(shutdown: Arc<AtomicBool>, on_shutdown: bool) -> Self {
        Drain {
            shutdown,
            requested: AtomicBool::new(on_shutdown),
        }
    }

    /// Starts a drain. Returns `false` if the node drains or shuts down already.
    pub fn start(&self) -> bool {
        if self.shutdown.load(Ordering::Acquire) || self.requested.swap(true, Ordering::AcqRel) {
            return false;
        }
        tracing::info!("drain requested: ingest stops and the partitions move to the others");
        self.shutdown.store(true, Ordering::Release);
        true
    }

    /// Whether the node drains when it stops.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }
}

/// Hands the partitions this node was active for (`owned`) over, after ingest stopped:
/// removes the node's static member from the group, then waits until each of them runs on
/// another live node in the view, or `drain-timeout-ms` passes. Meanwhile the node's copies
/// keep answering reads.
pub fn hand_over(config: &NodeConfig, owned: &[i32], view: &watch::Receiver<Arc<ClusterView>>) {
    if owned.is_empty() {
        return;
    }
    let started = Instant::now();
    let bootstrap = config
        .kafka
        .get("bootstrap.servers")
        .map(String::as_str)
        .unwrap_or_default();
    let left = Connector::from_settings(&config.kafka)
        .map_err(LeaveError::from)
        .and_then(|connector| {
            group::remove_static_member(
                &connector,
                bootstrap,
                config.group_id(),
                &config.node_id,
                LEAVE_TIMEOUT,
            )
        });
    match left {
        Ok(()) => tracing::info!(
            ?owned,
            "left the consumer group; the other members take the partitions over"
        ),
        Err(error) => {
            let reason = match error {
                LeaveError::Settings(_) => "settings",
                LeaveError::Failed { .. } => "broker",
            };
            metrics::counter!(LEAVE_FALLBACKS, "reason" => reason).increment(1);
            let session_timeout_ms = config
                .kafka
                .get("session.timeout.ms")
                .and_then(|ms| ms.parse::<u64>().ok())
                .unwrap_or(DEFAULT_SESSION_TIMEOUT_MS);
            tracing::warn!(
                %error,
                session_timeout_ms,
                ?owned,
                "cannot leave the consumer group: the partitions move to the other members \
                 only once the session timeout passes"
            );
        }
    }
    let deadline = started + Duration::from_millis(config.drain_timeout_ms);
    loop {
        let waiting: Vec<i32> = {
            let view = view.borrow();
            owned
                .iter()
                .copied()
                .filter(|&partition| {
                    !view.active(partition as u32).is_some_and(|active| {
                        active.node.node_id != config.node_id
                            && active.node.liveness == Liveness::Live
                    })
                })
                .collect()
        };
        if waiting.is_empty() {
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "drained: every partition this node was active for runs on another node"
            );
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                ?waiting,
                "drain-timeout-ms passed before these partitions ran elsewhere; stopping anyway"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use metrics::{
        Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
    };

    use super::*;

    /// Keeps the counters a test's code increments, by name and labels.
    #[derive(Debug, Default)]
    struct Counters(Arc<Mutex<BTreeMap<String, u64>>>);

    #[derive(Debug)]
    struct One {
        name: String,
        counts: Arc<Mutex<BTreeMap<String, u64>>>,
    }

    impl CounterFn for One {
        fn increment(&self, value: u64) {
            *self
                .counts
                .lock()
                .unwrap()
                .entry(self.name.clone())
                .or_default() += value;
        }

        fn absolute(&self, value: u64) {
            self.counts.lock().unwrap().insert(self.name.clone(), value);
        }
    }

    impl Recorder for Counters {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            Counter::from_arc(Arc::new(One {
                name: format!("{}{{{}}}", key.name(), labels.join(",")),
                counts: self.0.clone(),
            }))
        }

        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }

        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    fn config(kafka: &[&str]) -> NodeConfig {
        let mut overrides = vec![
            "node-id=n1".to_owned(),
            "input-topic=orders".to_owned(),
            // Nothing to wait for once the LeaveGroup failed: the test is about that failure.
            "drain-timeout-ms=0".to_owned(),
        ];
        overrides.extend(kafka.iter().map(|k| format!("kafka.{k}")));
        NodeConfig::load(None, [], &overrides).unwrap()
    }

    /// Drains `config`'s node and returns the fallbacks it counted.
    fn fallbacks_of_a_drain(config: &NodeConfig) -> BTreeMap<String, u64> {
        let recorder = Counters::default();
        let (_sender, view) = watch::channel(Arc::new(ClusterView::default()));
        metrics::with_local_recorder(&recorder, || hand_over(config, &[0, 1], &view));
        recorder.0.lock().unwrap().clone()
    }

    #[test]
    fn a_drain_that_cannot_reach_a_broker_counts_a_fallback() {
        // Port 1 on loopback: refused at once.
        let config = config(&["bootstrap.servers=127.0.0.1:1"]);
        let counts = fallbacks_of_a_drain(&config);
        assert_eq!(
            counts.get(&format!("{LEAVE_FALLBACKS}{{reason=broker}}")),
            Some(&1),
            "{counts:?}"
        );
    }

    #[test]
    fn a_drain_with_settings_its_connection_does_not_speak_counts_a_fallback() {
        let config = config(&[
            "bootstrap.servers=127.0.0.1:1",
            "security.protocol=ssl",
            "ssl.keystore.location=/etc/kstore/kafka/node.p12",
        ]);
        let counts = fallbacks_of_a_drain(&config);
        assert_eq!(
            counts.get(&format!("{LEAVE_FALLBACKS}{{reason=settings}}")),
            Some(&1),
            "{counts:?}"
        );
    }

    #[test]
    fn a_node_without_partitions_has_nothing_to_hand_over() {
        let config = config(&["bootstrap.servers=127.0.0.1:1"]);
        let recorder = Counters::default();
        let (_sender, view) = watch::channel(Arc::new(ClusterView::default()));
        metrics::with_local_recorder(&recorder, || hand_over(&config, &[], &view));
        assert!(recorder.0.lock().unwrap().is_empty());
    }
}
