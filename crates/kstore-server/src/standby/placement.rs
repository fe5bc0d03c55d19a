//! Copies follow placement: a thread that compares the standby placement of the current
//! cluster view with the local copies, opens the standbys this node should hold, and
//! retires the standby copies it should no longer hold once their partition's active runs
//! on a live node. Retired directories are deleted after the retention period.
//!
//! The view moves while a rebalance settles, so a change must hold for [`CHANGE_DELAY`]
//! before it is acted on, and a partition whose active is unknown for a moment keeps its
//! last known active in the computation.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kstore_core::cluster::{ClusterView, Liveness, NodeStatus};
use kstore_core::placement::place_standbys;
use tokio::sync::watch;

use super::Copies;

/// How often placement is compared with the local copies.
const TICK: Duration = Duration::from_millis(250);

/// How long a change of placement must hold before copies move.
const CHANGE_DELAY: Duration = Duration::from_secs(1);

/// How long after start the node leaves directories from an earlier run alone, so that the
/// consumer group can hand its partitions back first.
const STARTUP_GRACE: Duration = Duration::from_secs(60);

/// How often retired directories are looked at.
const SWEEP_INTERVAL: Duration = Duration::from_secs(15);

/// Starts the thread; it stops when `shutdown` is set.
pub fn spawn(
    copies: Arc<Copies>,
    node_id: String,
    standbys_per_partition: usize,
    view: watch::Receiver<Arc<ClusterView>>,
    shutdown: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    let mut follower = Follower {
        copies,
        node_id,
        standbys_per_partition,
        last_active: HashMap::new(),
        wanted_since: HashMap::new(),
        unwanted_since: HashMap::new(),
        started: Instant::now(),
        last_sweep: Instant::now(),
    };
    std::thread::Builder::new()
        .name("kstore-placement".into())
        .spawn(move || {
            let watchdog = crate::registry::Watchdog::new(
                follower.copies.registry().clone(),
                "standby placement",
            );
            while !shutdown.load(Ordering::Relaxed) {
                let current = view.borrow().clone();
                follower.tick(&current, Instant::now());
                std::thread::sleep(TICK);
            }
            watchdog.ended_as_asked();
        })
}

struct Follower {
    copies: Arc<Copies>,
    node_id: String,
    standbys_per_partition: usize,
    /// The last node seen holding each partition's active copy.
    last_active: HashMap<u32, String>,
    /// Since when placement has put a standby here that is not open.
    wanted_since: HashMap<u32, Instant>,
    /// Since when a standby copy here is no longer placed here.
    unwanted_since: HashMap<u32, Instant>,
    started: Instant,
    last_sweep: Instant,
}

impl Follower {
    fn tick(&mut self, view: &ClusterView, now: Instant) {
        let registry = self.copies.registry().clone();
        let me = view
            .nodes
            .iter()
            .find(|n| n.node_id == self.node_id && n.liveness == Liveness::Live);
        // Until the node sees itself in its view it knows nothing of the others; while it
        // leaves, its standbys are placed elsewhere and it opens none.
        if me.is_none_or(|me| me.status == NodeStatus::Leaving) {
            return;
        }
        let members = view.placement_members();
        let partitions = registry.partitions();
        for (partition, active) in view.actives(partitions).into_iter().enumerate() {
            if let Some(node) = active {
                self.last_active.insert(partition as u32, node.to_owned());
            }
        }
        // Between a revoke and the new active's first publish nobody claims the partition:
        // assume the last one seen, if it is still a member.
        let actives: Vec<Option<&str>> = (0..partitions)
            .map(|partition| {
                self.last_active
                    .get(&partition)
                    .map(String::as_str)
                    .filter(|node| members.contains(node))
            })
            .collect();
        let placement = place_standbys(&members, &actives, self.standbys_per_partition);
        let wanted = |partition: u32| placement[partition as usize].contains(&self.node_id);

        for partition in 0..partitions {
            let copy = registry.get(partition as i32);
            if wanted(partition) && copy.is_none() {
                let since = *self.wanted_since.entry(partition).or_insert(now);
                if now.duration_since(since) >= CHANGE_DELAY {
                    self.wanted_since.remove(&partition);
                    self.copies.open_standby(partition as i32);
                }
            } else {
                self.wanted_since.remove(&partition);
            }

            // A standby here: open, or still being prepared or retried.
            let standby = self.copies.is_standby(partition as i32);
            // A copy no longer placed here goes once the partition is served elsewhere: its
            // active runs on a live node (until then it answers reads, with its lag).
            let served_elsewhere = view.active(partition).is_some_and(|active| {
                active.node.node_id != self.node_id && active.node.liveness == Liveness::Live
            });
            if standby && !wanted(partition) && served_elsewhere {
                let since = *self.unwanted_since.entry(partition).or_insert(now);
                if now.duration_since(since) >= CHANGE_DELAY {
                    self.unwanted_since.remove(&partition);
                    self.copies.retire(partition as i32);
                }
            } else {
                self.unwanted_since.remove(&partition);
            }
        }

        if now.duration_since(self.last_sweep) >= SWEEP_INTERVAL {
            self.last_sweep = now;
            if now.duration_since(self.started) >= STARTUP_GRACE {
                self.copies
                    .mark_unopened_retired(&|partition| wanted(partition as u32));
            }
            self.copies.delete_expired();
        }
    }
}
