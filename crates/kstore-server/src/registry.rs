//! The node's registry of local partition copies: what ingest and the state updater publish
//! and what reads and gossip consult. Each copy carries its store, its role, its position
//! (as a watch channel, so that a read with a position bound can wait for it) and the
//! input's end offset. Copies that cannot serve reads (opening, bootstrapping, failed) are
//! listed apart, with the error of a failed one, so that Metadata and metrics show them. The
//! registry also holds what the node says of itself in gossip: its status, the
//! consumer-group generation it last saw, and the reads it is answering; and what is wrong
//! with the node as a whole (a thread that died), which turns its health NOT_SERVING.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use kstore_proto::v1::{NodeStatus, Role};
use tokio::sync::{Notify, watch};

use crate::store::{PartitionStore, Position};

/// One local copy of a partition's store.
#[derive(Debug)]
pub struct PartitionCopy {
    /// The partition.
    pub partition: i32,
    /// Its store.
    pub store: Arc<PartitionStore>,
    role: AtomicU8,
    position: watch::Sender<Position>,
    /// The input partition's end offset as last seen, and when (ms since the Unix epoch).
    input_end: std::sync::Mutex<(i64, i64)>,
    /// Why the copy's input waits while the copy still serves reads, if it does (an
    /// active whose module is an earlier version of its partition's).
    held: std::sync::Mutex<Option<String>>,
}

impl PartitionCopy {
    /// Returns the copy's role.
    pub fn role(&self) -> Role {
        Role::try_from(i32::from(self.role.load(Ordering::Acquire))).unwrap_or(Role::Unspecified)
    }

    /// Returns the position the store has applied.
    pub fn position(&self) -> Position {
        *self.position.borrow()
    }

    /// Returns a receiver that sees every new position.
    pub fn watch_position(&self) -> watch::Receiver<Position> {
        self.position.subscribe()
    }

    /// Returns the input partition's end offset as last seen (before the first look, what
    /// the copy reflects), and never less than what the copy already reflects.
    pub fn input_end(&self) -> i64 {
        self.input_end_seen().0.max(self.position().input_next)
    }

    /// Whether the input partition's end has been looked up since the copy was opened.
    pub fn input_end_known(&self) -> bool {
        self.input_end_seen().0 >= 0
    }

    /// Returns the input partition's end offset as last seen, and when it was seen (ms
    /// since the Unix epoch; -1 and 0 before the first look).
    pub fn input_end_seen(&self) -> (i64, i64) {
        *self
            .input_end
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes why the copy's input waits although the copy serves reads (`None`: it does
    /// not wait).
    pub fn hold(&self, reason: Option<String>) {
        *self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = reason;
    }

    /// Returns why the copy's input waits, if it does.
    pub fn held(&self) -> Option<String> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Returns how many input records the copy does not reflect yet.
    pub fn lag(&self) -> i64 {
        self.lag_at(self.position())
    }

    /// Returns how many input records a copy at `position` does not reflect yet.
    pub fn lag_at(&self, position: Position) -> i64 {
        self.lag_and_seen_at(position).0
    }

    /// Returns how many input records a copy at `position` does not reflect as of the last
    /// look at the input's end, and when that look was (ms since the Unix epoch, 0 before
    /// the first), both from one look: a lag from one look stated with the time of a later
    /// one would understate it.
    pub fn lag_and_seen_at(&self, position: Position) -> (i64, i64) {
        let (end, seen_ms) = self.input_end_seen();
        let end = end.max(self.position().input_next);
        ((end - position.input_next).max(0), seen_ms)
    }
}

/// A local copy that cannot serve reads yet, or any more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCopy {
    /// Opening, bootstrapping or failed.
    pub role: Role,
    /// Why it failed (for a failed copy).
    pub error: Option<String>,
    /// Since when it is in this role.
    pub since: SystemTime,
}

/// Every local copy, by partition.
#[derive(Debug)]
pub struct Registry {
    node_id: String,
    partitions: u32,
    copies: RwLock<HashMap<i32, Arc<PartitionCopy>>>,
    pending: RwLock<HashMap<i32, PendingCopy>>,
    /// What is wrong with the node as a whole, by what noticed it; health is NOT_SERVING
    /// while it is not empty.
    problems: watch::Sender<BTreeMap<&'static str, String>>,
    /// Why the node must stop, once something node-wide failed (the state directory gone).
    fatal: std::sync::Mutex<Option<String>>,
    ready: AtomicBool,
    ready_notify: Notify,
    group_generation: AtomicI32,
    reads_in_flight: AtomicU32,
}

/// Counts a read as in flight while it lives.
#[derive(Debug)]
pub struct ReadInFlight<'a>(&'a AtomicU32);

impl Drop for ReadInFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Registry {
    /// Returns an empty registry for a node whose input has `partitions` partitions.
    pub fn new(node_id: impl Into<String>, partitions: u32) -> Self {
        Registry {
            node_id: node_id.into(),
            partitions,
            copies: RwLock::new(HashMap::new()),
            pending: RwLock::new(HashMap::new()),
            problems: watch::Sender::new(BTreeMap::new()),
            fatal: std::sync::Mutex::new(None),
            ready: AtomicBool::new(false),
            ready_notify: Notify::new(),
            group_generation: AtomicI32::new(0),
            reads_in_flight: AtomicU32::new(0),
        }
    }

    /// Returns this node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Returns the partition count.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Returns the copy of a partition, if this node holds one.
    pub fn get(&self, partition: i32) -> Option<Arc<PartitionCopy>> {
        self.copies
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&partition)
            .cloned()
    }

    /// Returns every copy, by partition.
    pub fn all(&self) -> Vec<Arc<PartitionCopy>> {
        let copies = self
            .copies
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut all: Vec<_> = copies.values().cloned().collect();
        all.sort_by_key(|c| c.partition);
        all
    }

    /// Publishes a copy (or updates the role and position of the one already there). It is
    /// no longer pending.
    pub fn track(
        &self,
        partition: i32,
        store: Arc<PartitionStore>,
        role: Role,
        position: Position,
    ) {
        self.clear_pending(partition);
        let mut copies = self
            .copies
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match copies.get(&partition) {
            Some(copy) if Arc::ptr_eq(&copy.store, &store) => {
                copy.role.store(role as u8, Ordering::Release);
                copy.position.send_replace(position);
            }
            _ => {
                let copy = PartitionCopy {
                    partition,
                    store,
                    role: AtomicU8::new(role as u8),
                    position: watch::Sender::new(position),
                    // Not looked up yet.
                    input_end: std::sync::Mutex::new((-1, 0)),
                    held: std::sync::Mutex::new(None),
                };
                copies.insert(partition, Arc::new(copy));
            }
        }
    }

    /// Forgets a copy: reads no longer find it.
    pub fn remove(&self, partition: i32) {
        self.copies
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&partition);
    }

    /// Lists a copy that cannot serve reads (opening, bootstrapping or failed), in place of
    /// any readable copy of the partition.
    pub fn set_pending(&self, partition: i32, role: Role, error: Option<String>) {
        self.remove(partition);
        let mut pending = self
            .pending
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let since = match pending.get(&partition) {
            Some(copy) if copy.role == role => copy.since,
            _ => SystemTime::now(),
        };
        pending.insert(partition, PendingCopy { role, error, since });
    }

    /// Stops listing a pending copy.
    pub fn clear_pending(&self, partition: i32) {
        self.pending
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&partition);
    }

    /// Returns the pending copy of a partition, if there is one.
    pub fn pending(&self, partition: i32) -> Option<PendingCopy> {
        self.pending
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&partition)
            .cloned()
    }

    /// Returns every pending copy, by partition.
    pub fn all_pending(&self) -> Vec<(i32, PendingCopy)> {
        let pending = self
            .pending
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut all: Vec<_> = pending.iter().map(|(p, c)| (*p, c.clone())).collect();
        all.sort_by_key(|(p, _)| *p);
        all
    }

    /// Records what is wrong with the node as a whole (`what` noticed it), which turns its
    /// health NOT_SERVING.
    pub fn set_problem(&self, what: &'static str, problem: String) {
        tracing::error!(what, problem, "the node is not healthy");
        self.problems.send_modify(|problems| {
            problems.insert(what, problem);
        });
    }

    /// Records that the node must stop, and why (the first reason wins): something
    /// node-wide failed. Ingest stops at its next turn and the node exits with the reason.
    pub fn set_fatal(&self, reason: String) {
        let mut fatal = self
            .fatal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if fatal.is_none() {
            tracing::error!(reason, "the node must stop");
            *fatal = Some(reason);
        }
    }

    /// Returns why the node must stop, once something node-wide failed.
    pub fn fatal(&self) -> Option<String> {
        self.fatal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Returns a receiver of what is wrong with the node (empty while nothing is).
    pub fn watch_problems(&self) -> watch::Receiver<BTreeMap<&'static str, String>> {
        self.problems.subscribe()
    }

    /// Sets a copy's role.
    pub fn set_role(&self, partition: i32, role: Role) {
        if let Some(copy) = self.get(partition) {
            copy.role.store(role as u8, Ordering::Release);
        }
    }

    /// Publishes a copy's new position, waking reads that wait for it.
    pub fn set_position(&self, partition: i32, position: Position) {
        if let Some(copy) = self.get(partition) {
            copy.position.send_replace(position);
        }
    }

    /// Publishes a new position of the copy whose store is `store`, if that copy is still
    /// registered (a copy that was retired, or replaced by another store, is left alone).
    pub fn set_position_of(&self, store: &Arc<PartitionStore>, position: Position) {
        let copies = self
            .copies
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(copy) = copies.values().find(|c| Arc::ptr_eq(&c.store, store)) {
            copy.position.send_replace(position);
        }
    }

    /// Records the input partition's end offset, as seen at `seen` (taken before asking).
    pub fn set_input_end(&self, partition: i32, end: i64, seen: SystemTime) {
        if let Some(copy) = self.get(partition) {
            let seen_ms = seen
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_millis() as i64);
            *copy
                .input_end
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = (end, seen_ms);
        }
    }

    /// Marks the node ready: its first assignment's stores are open.
    pub fn mark_ready(&self) {
        self.ready.store(true, Ordering::Release);
        self.ready_notify.notify_waiters();
    }

    /// Returns what the node is doing: starting until its first stores are open, then
    /// running.
    pub fn status(&self) -> NodeStatus {
        if self.ready.load(Ordering::Acquire) {
            NodeStatus::Running
        } else {
            NodeStatus::Starting
        }
    }

    /// Records the consumer-group generation the node saw last.
    pub fn set_group_generation(&self, generation: i32) {
        self.group_generation.store(generation, Ordering::Relaxed);
    }

    /// Returns the consumer-group generation the node saw last (0 before it joined).
    pub fn group_generation(&self) -> i32 {
        self.group_generation.load(Ordering::Relaxed)
    }

    /// Counts a read as in flight until the returned guard is dropped.
    pub fn read_started(&self) -> ReadInFlight<'_> {
        self.reads_in_flight.fetch_add(1, Ordering::Relaxed);
        ReadInFlight(&self.reads_in_flight)
    }

    /// Returns how many reads are in flight.
    pub fn reads_in_flight(&self) -> u32 {
        self.reads_in_flight.load(Ordering::Relaxed)
    }

    /// Waits until the node is ready.
    pub async fn wait_ready(&self) {
        loop {
            let notified = self.ready_notify.notified();
            if self.ready.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

/// Notices a thread of the node that dies: dropped while its thread panics, or before the
/// thread said it ended as asked, it records the problem in the registry (the node's health
/// turns NOT_SERVING, and the log says which thread and why).
#[derive(Debug)]
pub struct Watchdog {
    registry: Arc<Registry>,
    what: &'static str,
    armed: bool,
}

impl Watchdog {
    /// Watches the calling thread, which does `what` for the node.
    pub fn new(registry: Arc<Registry>, what: &'static str) -> Self {
        Watchdog {
            registry,
            what,
            armed: true,
        }
    }

    /// The thread ended because it was asked to.
    pub fn ended_as_asked(mut self) {
        self.armed = false;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if self.armed {
            let how = if std::thread::panicking() {
                "panicked"
            } else {
                "ended unasked"
            };
            self.registry
                .set_problem(self.what, format!("the {} thread {how}", self.what));
        }
    }
}
