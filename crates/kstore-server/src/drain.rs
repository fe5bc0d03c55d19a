//! Draining, for scale-in and planned maintenance: the node stops ingesting, removes its
//! static member from the consumer group so that the other members take its partitions over
//! at once (not after `session.timeout.ms`), keeps answering reads from its copies until
//! their new actives run, then stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kstore_core::cluster::{ClusterView, Liveness};
use tokio::sync::watch;

use crate::config::NodeConfig;
use crate::group;

/// How long removing the member from the group may take.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);

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
    let security = config.kafka.get("security.protocol").map(String::as_str);
    match group::remove_static_member(
        bootstrap,
        security,
        config.group_id(),
        &config.node_id,
        LEAVE_TIMEOUT,
    ) {
        Ok(()) => tracing::info!(
            ?owned,
            "left the consumer group; the other members take the partitions over"
        ),
        Err(error) => tracing::warn!(%error, "cannot leave the consumer group"),
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
