//! Local copies and their lifecycle: the one place where a partition's store is opened,
//! handed between ingest and the state updater, failed, retried and retired.
//!
//! A copy is *opening* while its files are opened and checked, *bootstrapping* while a new
//! or damaged copy is filled from a peer's snapshot or a backup, *restoring* while the state
//! updater brings it to the end of its changelog before it turns *active* (ingest folds the
//! partition's input into it), and *standby* while the updater keeps it current for reads
//! (placement puts a standby here, or the partition was revoked and its new active is not
//! running yet). Opening, checking and bootstrapping run on a thread of their own per copy,
//! never on a caller's: a rebalance callback or placement only records what it wants and
//! returns, so a long snapshot transfer stalls neither ingest nor revokes.
//!
//! A copy that fails (a damaged file, a failed restore or bootstrap, a store that cannot be
//! written, a processor that cannot run) turns *failed*, with its error, and is retried with
//! capped backoff by the lifecycle thread; the node's other copies are untouched. A failed
//! active's input waits (ingest pauses it, so nothing is folded twice or lost) and its
//! standbys elsewhere answer its reads. Kafka's consumer group cannot move one partition
//! away from a live member (librdkafka has no custom assignor), so the partition stays
//! assigned here until its copy is rebuilt, a rebalance moves it, or the node drains.
//!
//! A retired copy is closed and its directory kept for `standby-retention-ms`, so that a
//! quick return starts warm; then it is deleted. Every change of a copy's role happens under
//! one lock, held only for bookkeeping, so ingest (assign, revoke), placement (open, retire)
//! and the preparations never cross.

mod lifecycle;
pub mod placement;
pub mod updater;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kstore_proto::v1::Role;

use crate::backup::Backups;
use crate::config::NodeConfig;
use crate::registry::Registry;
use crate::snapshot::SnapshotFetcher;
use crate::store::{PartitionStore, Position, SharedMemory, StoreError};
pub use lifecycle::Want;
use lifecycle::{Lifecycles, Next};
use updater::{Follow, StateUpdater};

/// A file in a retired copy's directory that holds when it was retired (milliseconds since
/// the Unix epoch).
pub const RETIRED_MARKER: &str = "kstore-retired-at";

/// Copies opened, as standbys or for ingest.
pub const COPIES_OPENED: &str = "kstore_copies_opened_total";
/// Copies retired (closed, their directories kept for the retention period).
pub const COPIES_RETIRED: &str = "kstore_copies_retired_total";
/// Retired copies' directories deleted after the retention period.
pub const COPIES_DELETED: &str = "kstore_copies_deleted_total";
/// Damaged copies found (a checksum or file RocksDB rejects), moved aside and recovered; by
/// `source`: `peer` or `backup` (then the changelog's tail), or `changelog` (all of it).
pub const COPIES_RECOVERED: &str = "kstore_copies_recovered_total";
/// Damaged copies found by the background check, by `role`.
pub const COPIES_DAMAGED: &str = "kstore_copies_damaged_total";
/// Copies new here or damaged, filled by `source`: `peer` (a snapshot), `backup` or
/// `changelog` (no snapshot or backup could be had: the changelog from its start).
pub const COPIES_BOOTSTRAPPED: &str = "kstore_copies_bootstrapped_total";
/// Copies that failed (and are retried), by what they were wanted as: `active` or `standby`.
pub const COPY_FAILURES: &str = "kstore_copy_failures_total";

/// Where a copy that is new here, or damaged, gets its state from before the changelog
/// supplies the rest: a peer's snapshot, then the newest good backup.
#[derive(Debug, Default)]
pub struct Bootstrap {
    /// Snapshots from the other nodes' copies.
    pub peers: Option<SnapshotFetcher>,
    /// The backups, if a location is configured.
    pub backups: Option<Arc<Backups>>,
}

/// What ingest hears about the copies of the partitions it owns.
#[derive(Debug)]
pub enum CopyEvent {
    /// The copy has applied its changelog up to the end: it can turn active.
    Restored {
        /// The partition.
        partition: i32,
        /// Which assignment of the partition it was restored for.
        generation: u64,
        /// How many changelog records this restore applied (a standby that was promoted
        /// applies only the tail it had not applied yet).
        records: u64,
        /// The store's position afterwards.
        position: Position,
    },
    /// The copy failed: ingest pauses the partition until it is restored again.
    Failed {
        /// The partition.
        partition: i32,
        /// Which assignment of the partition it failed in.
        generation: u64,
        /// Why.
        reason: String,
    },
}

/// What the lifecycle thread is told.
#[derive(Debug)]
pub enum Work {
    /// Prepare the copy of the partition (open, check, bootstrap) on a thread of its own.
    Prepare(i32),
    /// The copy failed; retry it after the backoff. `damaged`: its files are damaged.
    Failed {
        /// The partition.
        partition: i32,
        /// Why.
        reason: String,
        /// Whether its files are damaged (the retry moves them aside and rebuilds it).
        damaged: bool,
    },
    /// Stop the thread.
    Stop,
}

/// The state behind the lifecycle lock.
#[derive(Debug, Default)]
struct State {
    lifecycles: Lifecycles,
    /// Stores that may still be open (a read or the updater may hold one after it was
    /// retired): opening such a partition again reuses the instance, since RocksDB allows
    /// one per directory.
    open: HashMap<i32, Weak<PartitionStore>>,
    /// Stores of copies that failed: the copy is reopened only once nobody holds them, since
    /// a new instance cannot lock the directory (or, after the directory moved aside, would
    /// share it) while an old one lives.
    failed: HashMap<i32, Weak<PartitionStore>>,
    /// Copies opened (and, found on disk, checked) in this process.
    checked: HashSet<i32>,
}

/// Every local copy's lifecycle.
#[derive(Debug)]
pub struct Copies {
    config: Arc<NodeConfig>,
    registry: Arc<Registry>,
    memory: SharedMemory,
    updater: StateUpdater,
    bootstrap: Bootstrap,
    state: Mutex<State>,
    /// To the lifecycle thread.
    work: Sender<Work>,
    /// To ingest.
    events: Sender<CopyEvent>,
}

impl Copies {
    /// Returns the lifecycle of the node's copies and starts its thread, which prepares
    /// copies and retries failed ones, taking `work` (whose sender the state updater got to
    /// report failures). Ingest hears about its copies on `events`.
    pub fn start(
        config: Arc<NodeConfig>,
        registry: Arc<Registry>,
        memory: SharedMemory,
        updater: StateUpdater,
        bootstrap: Bootstrap,
        events: Sender<CopyEvent>,
        work: (Sender<Work>, Receiver<Work>),
    ) -> std::io::Result<(Arc<Copies>, JoinHandle<()>)> {
        let copies = Arc::new(Copies {
            config,
            registry,
            memory,
            updater,
            bootstrap,
            state: Mutex::new(State::default()),
            work: work.0,
            events,
        });
        let thread = {
            let copies = copies.clone();
            let work = work.1;
            std::thread::Builder::new()
                .name("kstore-copies".into())
                .spawn(move || copies.run(&work))?
        };
        Ok((copies, thread))
    }

    /// Stops the lifecycle thread (preparations under way finish on their own threads).
    pub fn stop(&self) {
        let _ = self.work.send(Work::Stop);
    }

    /// Returns the registry the copies are published in.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The lifecycle thread: prepares copies, records failures and retries them when due.
    fn run(self: Arc<Self>, work: &Receiver<Work>) {
        let watchdog = crate::registry::Watchdog::new(self.registry.clone(), "copy lifecycle");
        self.serve(work);
        watchdog.ended_as_asked();
    }

    fn serve(self: &Arc<Self>, work: &Receiver<Work>) {
        loop {
            let wait = self
                .lock()
                .lifecycles
                .next_retry()
                .map_or(Duration::from_secs(1), |at| {
                    at.saturating_duration_since(Instant::now())
                });
            match work.recv_timeout(wait) {
                Ok(Work::Prepare(partition)) => self.spawn_preparation(partition),
                Ok(Work::Failed {
                    partition,
                    reason,
                    damaged,
                }) => self.fail(partition, &reason, damaged),
                Ok(Work::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
            let due = {
                let mut state = self.lock();
                let due = state.lifecycles.due(Instant::now());
                for &partition in &due {
                    self.registry.set_pending(partition, Role::Opening, None);
                }
                due
            };
            for partition in due {
                tracing::info!(partition, "retrying a failed copy");
                self.spawn_preparation(partition);
            }
        }
    }

    fn spawn_preparation(self: &Arc<Self>, partition: i32) {
        let copies = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("kstore-copy-{partition}"))
            .spawn(move || copies.prepare(partition));
        if let Err(error) = spawned {
            self.fail(partition, &format!("starting its thread: {error}"), false);
        }
    }

    /// Opens the partition's copy (bootstrapping it if it is new here or damaged), then
    /// hands it to what the node wants of it by now.
    fn prepare(&self, partition: i32) {
        let started = Instant::now();
        let opened = self.open_copy(partition);
        let mut state = self.lock();
        let store = match opened {
            Ok(store) => store,
            Err(error) => {
                drop(state);
                self.fail(partition, &error.to_string(), error.is_corruption());
                return;
            }
        };
        state.open.insert(partition, Arc::downgrade(&store));
        state.failed.remove(&partition);
        let want = state.lifecycles.prepared(partition);
        let position = match store.position() {
            Ok(position) => position,
            Err(error) => {
                drop(state);
                self.fail(partition, &error.to_string(), error.is_corruption());
                return;
            }
        };
        let took_ms = started.elapsed().as_millis() as u64;
        match want {
            Some(Want::Active { generation }) => {
                self.registry
                    .track(partition, store.clone(), Role::Restoring, position);
                self.updater
                    .follow(partition, store, Follow::Restore { generation });
                tracing::info!(
                    partition,
                    took_ms,
                    changelog_offset = position.changelog_next,
                    input_offset = position.input_next,
                    "copy ready; restoring its changelog tail"
                );
            }
            Some(Want::Standby) => {
                self.registry
                    .track(partition, store.clone(), Role::Standby, position);
                self.updater.follow(partition, store, Follow::Standby);
                tracing::info!(
                    partition,
                    took_ms,
                    changelog_offset = position.changelog_next,
                    "following a standby copy"
                );
            }
            None => {
                // Nobody wants it any more: close it, keep its directory for a while.
                self.registry.clear_pending(partition);
                drop(store);
                self.mark_retired(partition);
            }
        }
    }

    /// Returns the partition's store: the instance still open if there is one, else the
    /// store in its directory, opened (created if missing, filled first from a peer or a
    /// backup if it is new here) and, found on disk for the first time in this process,
    /// checked. A damaged copy is moved aside and rebuilt.
    fn open_copy(&self, partition: i32) -> Result<Arc<PartitionStore>, StoreError> {
        let dir = self.config.store_dir(partition);
        let io_error = |error: std::io::Error| StoreError::Io {
            path: dir.display().to_string(),
            message: error.to_string(),
        };
        let (open, in_use, check, damaged) = {
            let state = self.lock();
            (
                state.open.get(&partition).and_then(Weak::upgrade),
                state
                    .failed
                    .get(&partition)
                    .is_some_and(|store| store.strong_count() > 0),
                !state.checked.contains(&partition),
                state
                    .lifecycles
                    .failure(partition)
                    .is_some_and(|failure| failure.damaged),
            )
        };
        if in_use {
            return Err(StoreError::Io {
                path: dir.display().to_string(),
                message: "the failed copy is still in use; it is reopened once it is let go".into(),
            });
        }
        if let Some(store) = open {
            return Ok(store);
        }
        if damaged {
            self.move_aside(partition, &dir, "damaged")?;
        }
        std::fs::create_dir_all(&dir).map_err(io_error)?;
        let warm = dir.join("CURRENT").exists();
        if !warm {
            self.bootstrap(
                partition,
                &dir,
                if damaged { "damaged" } else { "new here" },
            );
        }
        let opened = PartitionStore::open(&dir, &self.memory).and_then(|store| {
            if warm && check && self.config.verify_checksums_on_open {
                store.verify_checksums()?;
            }
            Ok(store)
        });
        let store = match opened {
            Ok(store) => store,
            Err(damage) if damage.is_corruption() => {
                tracing::error!(partition, %damage, "a local copy is damaged");
                self.move_aside(partition, &dir, "damaged")?;
                std::fs::create_dir_all(&dir).map_err(io_error)?;
                let source = self.bootstrap(partition, &dir, "damaged");
                metrics::counter!(COPIES_RECOVERED, "source" => source).increment(1);
                PartitionStore::open(&dir, &self.memory)?
            }
            Err(error) => return Err(error),
        };
        if damaged {
            metrics::counter!(COPIES_RECOVERED, "source" => "retry").increment(1);
        }
        // Opened again: no longer retired.
        let _ = std::fs::remove_file(dir.join(RETIRED_MARKER));
        self.lock().checked.insert(partition);
        metrics::counter!(COPIES_OPENED).increment(1);
        tracing::info!(partition, warm, "opened a local copy");
        Ok(store)
    }

    /// Moves a damaged copy's directory aside (never deletes it) as
    /// `<partition>.damaged-<millis>`, for inspection.
    fn move_aside(&self, partition: i32, dir: &Path, why: &str) -> Result<(), StoreError> {
        if !dir.exists() {
            return Ok(());
        }
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let aside = dir.with_file_name(format!("{partition}.{why}-{millis}"));
        tracing::error!(
            partition,
            moved_to = %aside.display(),
            "moving a damaged copy aside; it is rebuilt"
        );
        std::fs::rename(dir, &aside).map_err(|error| StoreError::Io {
            path: dir.display().to_string(),
            message: format!("moving it aside to {}: {error}", aside.display()),
        })
    }

    /// Fills `dir` (missing or empty) for a copy of `partition` that is `why` (new here, or
    /// damaged): from a peer's snapshot, else the newest good backup, else nothing (the
    /// changelog from its start). Returns the source. Each failure is logged and the next
    /// source tried.
    fn bootstrap(&self, partition: i32, dir: &Path, why: &str) -> &'static str {
        self.registry
            .set_pending(partition, Role::Bootstrapping, None);
        let started = Instant::now();
        let source = if let Some((peer, manifest)) = self
            .bootstrap
            .peers
            .as_ref()
            .and_then(|peers| peers.bootstrap(partition as u32, dir))
        {
            tracing::info!(partition, why, %peer, changelog_offset = manifest.changelog_offset,
                "recovering from a peer's snapshot and the changelog after it");
            "peer"
        } else if let Some(entry) = self.bootstrap.backups.as_ref().and_then(|backups| {
            backups
                .restore_newest_good(partition as u32, dir)
                .unwrap_or_else(|error| {
                    tracing::error!(partition, %error, "restoring a backup failed");
                    let _ = std::fs::remove_dir_all(dir);
                    None
                })
        }) {
            tracing::info!(
                partition,
                why,
                backup_id = entry.backup_id,
                changelog_offset = entry.changelog_next,
                "recovering from a backup and the changelog after it"
            );
            "backup"
        } else {
            tracing::info!(
                partition,
                why,
                "no snapshot or good backup; recovering from the whole changelog"
            );
            "changelog"
        };
        metrics::counter!(COPIES_BOOTSTRAPPED, "source" => source).increment(1);
        if source != "changelog" {
            tracing::info!(
                partition,
                source,
                took_ms = started.elapsed().as_millis() as u64,
                "copy bootstrapped"
            );
        }
        self.registry.set_pending(partition, Role::Opening, None);
        source
    }

    /// The partition's copy failed (`damaged`: its files are damaged): it stops serving and
    /// being updated, shows as failed with `reason`, and is retried after the backoff. If
    /// ingest wants it active, ingest hears of it and pauses the partition. A copy the node
    /// no longer wants is just let go.
    pub fn fail(&self, partition: i32, reason: &str, damaged: bool) {
        let mut state = self.lock();
        let copy = self.registry.get(partition);
        if let Some(store) = state.open.remove(&partition) {
            state.failed.insert(partition, store);
        } else if let Some(copy) = &copy {
            state.failed.insert(partition, Arc::downgrade(&copy.store));
        }
        drop(copy);
        self.updater.stop(partition);
        let want = state.lifecycles.wanted(partition);
        let initial = Duration::from_millis(self.config.copy_retry_initial_ms);
        let max = Duration::from_millis(self.config.copy_retry_max_ms);
        let Some(failure) = state.lifecycles.fail(
            partition,
            reason.into(),
            damaged,
            Instant::now(),
            initial,
            max,
        ) else {
            self.registry.remove(partition);
            self.registry.clear_pending(partition);
            return;
        };
        let retry_in_ms = failure
            .retry_at
            .saturating_duration_since(Instant::now())
            .as_millis() as u64;
        let attempts = failure.attempts;
        self.registry
            .set_pending(partition, Role::Failed, Some(reason.into()));
        let wanted_as = match want {
            Some(Want::Active { .. }) => "active",
            _ => "standby",
        };
        metrics::counter!(COPY_FAILURES, "wanted" => wanted_as).increment(1);
        tracing::error!(
            partition,
            reason,
            damaged,
            attempts,
            retry_in_ms,
            wanted_as,
            "a copy failed; the node's other copies are untouched, and it is retried"
        );
        if !self.config.state_dir.exists() {
            self.registry.set_fatal(format!(
                "the state directory {} is gone",
                self.config.state_dir.display()
            ));
        }
        if let Some(Want::Active { generation }) = want {
            let _ = self.events.send(CopyEvent::Failed {
                partition,
                generation,
                reason: reason.into(),
            });
        }
    }

    /// Flushes every open copy that changed since its last flush. A copy whose flush fails
    /// (a full disk) fails: RocksDB takes no more writes after a failed flush, and its retry
    /// reopens it.
    pub fn flush_all(&self) {
        for copy in self.registry.all() {
            if let Err(error) = copy.store.flush_if_dirty() {
                let damaged = error.is_corruption();
                self.fail(
                    copy.partition,
                    &format!("flushing the copy to disk: {error}"),
                    damaged,
                );
            }
        }
    }

    /// Reads every block of every open copy and checks its checksum (the block cache is left
    /// as it is). A damaged copy fails: it is moved aside and rebuilt (a damaged active's
    /// input waits meanwhile, and its standbys answer its reads).
    pub fn scrub(&self, shutdown: &std::sync::atomic::AtomicBool) {
        let partitions: Vec<i32> = self.registry.all().iter().map(|c| c.partition).collect();
        for partition in partitions {
            if shutdown.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            // Only the check holds the copy: a damaged store must be let go of to be replaced.
            let (checked, role) = match self.registry.get(partition) {
                Some(copy) => (copy.store.verify_checksums(), copy.role()),
                None => continue,
            };
            match checked {
                Ok(()) => {}
                Err(damage) if damage.is_corruption() => {
                    metrics::counter!(COPIES_DAMAGED, "role" => crate::backup::role_name(role))
                        .increment(1);
                    self.fail(partition, &format!("damaged: {damage}"), true);
                }
                Err(error) => tracing::warn!(partition, %error, "cannot check a copy"),
            }
        }
    }

    /// Ingest was assigned the partition: its copy (a standby's, a retired one's, or a new
    /// one) turns restoring, and the state updater brings it to the end of its changelog,
    /// then reports [`CopyEvent::Restored`] with `generation`. A copy that must be opened or
    /// bootstrapped first is prepared off the caller's thread; this returns at once.
    pub fn assign(&self, partition: i32, generation: u64) {
        let mut state = self.lock();
        let next = state
            .lifecycles
            .want(partition, Want::Active { generation });
        if let Some(copy) = self.registry.get(partition) {
            // A copy here already (a standby, or one restoring for an earlier assignment):
            // it restores the tail it has not applied.
            self.registry.set_role(partition, Role::Restoring);
            self.updater.follow(
                partition,
                copy.store.clone(),
                Follow::Restore { generation },
            );
            if next == Next::Prepare {
                // Nothing to prepare after all.
                state.lifecycles.prepared(partition);
            }
            return;
        }
        if next == Next::Prepare {
            self.registry.set_pending(partition, Role::Opening, None);
            let _ = self.work.send(Work::Prepare(partition));
        }
    }

    /// The restore of an assigned partition finished: the copy turns active at `position`.
    pub fn activate(&self, partition: i32, position: Position) {
        let _state = self.lock();
        self.registry.set_position(partition, position);
        self.registry.set_role(partition, Role::Active);
    }

    /// Ingest gave the partition up (after committing what was open): the copy stays open
    /// and readable as a standby, kept current by the updater, until placement retires it.
    /// A copy still being prepared, or failed, becomes a standby once it is ready.
    pub fn revoke(&self, partition: i32) {
        let mut state = self.lock();
        if state.lifecycles.wanted(partition).is_none() {
            return;
        }
        let next = state.lifecycles.want(partition, Want::Standby);
        if let Some(copy) = self.registry.get(partition) {
            self.registry.set_role(partition, Role::Standby);
            self.updater
                .follow(partition, copy.store.clone(), Follow::Standby);
            if next == Next::Prepare {
                // Nothing to prepare after all.
                state.lifecycles.prepared(partition);
            }
        } else if next == Next::Prepare {
            self.registry.set_pending(partition, Role::Opening, None);
            let _ = self.work.send(Work::Prepare(partition));
        }
    }

    /// Placement put a standby of the partition here: it is opened (warm from its directory
    /// if one is there) off the caller's thread, and the updater keeps it current. Does
    /// nothing if the copy is open or wanted already.
    pub fn open_standby(&self, partition: i32) {
        let mut state = self.lock();
        if state.lifecycles.wanted(partition).is_some() {
            return;
        }
        if state.lifecycles.want(partition, Want::Standby) == Next::Prepare {
            self.registry.set_pending(partition, Role::Opening, None);
            let _ = self.work.send(Work::Prepare(partition));
        }
    }

    /// Whether the node holds the partition's copy as a standby (open, or being prepared or
    /// retried), which placement may retire.
    pub fn is_standby(&self, partition: i32) -> bool {
        self.lock().lifecycles.wanted(partition) == Some(Want::Standby)
    }

    /// Retires a standby copy: the updater stops, reads no longer find it, and its
    /// directory is kept for the retention period. A copy being prepared is closed when it
    /// is ready. Copies wanted active are left alone (ingest may have claimed it meanwhile).
    /// Returns whether it was retired.
    pub fn retire(&self, partition: i32) -> bool {
        let mut state = self.lock();
        if state.lifecycles.wanted(partition) != Some(Want::Standby) {
            return false;
        }
        state.lifecycles.forget(partition);
        self.updater.stop(partition);
        self.registry.remove(partition);
        self.registry.clear_pending(partition);
        if !state.lifecycles.preparing(partition) {
            self.mark_retired(partition);
        }
        true
    }

    fn mark_retired(&self, partition: i32) {
        let dir = self.config.store_dir(partition);
        if dir.exists()
            && let Err(error) = mark_retired(&dir, SystemTime::now())
        {
            tracing::warn!(%error, dir = %dir.display(), "cannot mark a retired copy");
        }
        metrics::counter!(COPIES_RETIRED).increment(1);
        tracing::info!(
            partition,
            "retired a standby copy; its directory is kept for a while"
        );
    }

    /// Whether the partition's copy is in use: open, wanted, or being prepared.
    fn in_use(&self, state: &State, partition: i32) -> bool {
        self.registry.get(partition).is_some()
            || state.lifecycles.wanted(partition).is_some()
            || state.lifecycles.preparing(partition)
            || state
                .open
                .get(&partition)
                .is_some_and(|w| w.strong_count() > 0)
            || state
                .failed
                .get(&partition)
                .is_some_and(|w| w.strong_count() > 0)
    }

    /// Marks the directories of copies that are not open (left by an earlier run) as
    /// retired now, unless they are marked already, so that the retention period counts for
    /// them too. `wanted` are the partitions that may still be opened soon.
    pub fn mark_unopened_retired(&self, wanted: &dyn Fn(i32) -> bool) {
        let state = self.lock();
        for (partition, dir) in self.store_dirs() {
            if self.in_use(&state, partition)
                || wanted(partition)
                || dir.join(RETIRED_MARKER).exists()
            {
                continue;
            }
            if let Err(error) = mark_retired(&dir, SystemTime::now()) {
                tracing::warn!(%error, dir = %dir.display(), "cannot mark an unused copy");
            }
        }
    }

    /// Deletes the directories of copies retired longer than `standby-retention-ms` ago that
    /// were not opened again.
    pub fn delete_expired(&self) {
        let retention = Duration::from_millis(self.config.standby_retention_ms);
        let mut state = self.lock();
        for (partition, dir) in self.store_dirs() {
            let expired = retired_at(&dir).is_some_and(|at| {
                SystemTime::now()
                    .duration_since(at)
                    .is_ok_and(|age| age >= retention)
            });
            if self.in_use(&state, partition) || !expired {
                continue;
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    state.open.remove(&partition);
                    state.checked.remove(&partition);
                    metrics::counter!(COPIES_DELETED).increment(1);
                    tracing::info!(
                        partition,
                        "deleted a copy retired longer than the retention"
                    );
                }
                Err(error) => {
                    tracing::warn!(%error, dir = %dir.display(), "cannot delete a retired copy");
                }
            }
        }
    }

    /// The partition directories under the store's directory, by partition.
    fn store_dirs(&self) -> Vec<(i32, std::path::PathBuf)> {
        let Some(root) = self.config.store_dir(0).parent().map(Path::to_path_buf) else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(&root) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| {
                let partition: i32 = entry.file_name().to_str()?.parse().ok()?;
                Some((partition, entry.path()))
            })
            .filter(|(partition, _)| {
                *partition >= 0 && (*partition as u32) < self.registry.partitions()
            })
            .collect()
    }
}

fn mark_retired(dir: &Path, at: SystemTime) -> std::io::Result<()> {
    let millis = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    std::fs::write(dir.join(RETIRED_MARKER), millis.to_string())
}

/// When the copy in `dir` was retired, if it is.
fn retired_at(dir: &Path) -> Option<SystemTime> {
    let text = std::fs::read_to_string(dir.join(RETIRED_MARKER)).ok()?;
    let millis: u64 = text.trim().parse().ok()?;
    Some(UNIX_EPOCH + Duration::from_millis(millis))
}
