//! Local copies and their lifecycle: the one place where a partition's store is opened,
//! handed between ingest and the state updater, and retired.
//!
//! A copy is active while ingest folds the partition's input into it; restoring while the
//! state updater brings it to the end of its changelog before it turns active; standby while
//! the updater keeps it current for reads (because placement puts a standby here, or
//! because the partition was revoked and its new active is not running yet). A retired copy
//! is closed and its directory kept for `standby-retention-ms`, so that a quick return starts
//! warm; then it is deleted. Every change of a copy's role happens under one lock, so ingest
//! (assign, revoke) and placement (open, retire) never cross.

pub mod placement;
pub mod updater;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kstore_proto::v1::Role;

use crate::backup::Backups;
use crate::config::NodeConfig;
use crate::registry::Registry;
use crate::snapshot::SnapshotFetcher;
use crate::store::{PartitionStore, Position, SharedMemory, StoreError};
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

/// Where a copy that is new here, or damaged, gets its state from before the changelog
/// supplies the rest: a peer's snapshot, then the newest good backup.
#[derive(Debug, Default)]
pub struct Bootstrap {
    /// Snapshots from the other nodes' copies.
    pub peers: Option<SnapshotFetcher>,
    /// The backups, if a location is configured.
    pub backups: Option<Arc<Backups>>,
}

/// Every local copy's lifecycle.
#[derive(Debug)]
pub struct Copies {
    config: Arc<NodeConfig>,
    registry: Arc<Registry>,
    memory: SharedMemory,
    updater: StateUpdater,
    bootstrap: Bootstrap,
    /// Stores that may still be open (a read or the updater may hold one after it was
    /// retired): opening such a partition again reuses the instance, since RocksDB allows
    /// one per directory. Guarded with the lifecycle: every change of a copy holds it.
    open: Mutex<HashMap<i32, Weak<PartitionStore>>>,
}

impl Copies {
    /// Returns the lifecycle of the node's copies.
    pub fn new(
        config: Arc<NodeConfig>,
        registry: Arc<Registry>,
        memory: SharedMemory,
        updater: StateUpdater,
        bootstrap: Bootstrap,
    ) -> Self {
        Copies {
            config,
            registry,
            memory,
            updater,
            bootstrap,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Returns the registry the copies are published in.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    fn lifecycle(&self) -> MutexGuard<'_, HashMap<i32, Weak<PartitionStore>>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Returns the partition's store: the local copy's if there is one, else the store in
    /// its directory, opened (and created if missing).
    fn open_store(
        &self,
        open: &mut HashMap<i32, Weak<PartitionStore>>,
        partition: i32,
    ) -> Result<Arc<PartitionStore>, StoreError> {
        if let Some(copy) = self.registry.get(partition) {
            return Ok(copy.store.clone());
        }
        if let Some(store) = open.get(&partition).and_then(Weak::upgrade) {
            return Ok(store);
        }
        let dir = self.config.store_dir(partition);
        std::fs::create_dir_all(&dir).map_err(|error| StoreError::Io {
            path: dir.display().to_string(),
            message: error.to_string(),
        })?;
        let warm = dir.join("CURRENT").exists();
        if !warm {
            self.bootstrap(partition, &dir, "new here");
        }
        // A copy found on disk is checked once per process, when it is first opened; later
        // the background check covers it.
        let found_at_start = warm && !open.contains_key(&partition);
        let opened = PartitionStore::open(&dir, &self.memory).and_then(|store| {
            if found_at_start && self.config.verify_checksums_on_open {
                store.verify_checksums()?;
            }
            Ok(store)
        });
        let store = match opened {
            Ok(store) => store,
            Err(error) if error.is_corruption() => self.recover(partition, &dir, &error)?,
            Err(error) => return Err(error),
        };
        // Opened again: no longer retired.
        let _ = std::fs::remove_file(dir.join(RETIRED_MARKER));
        open.insert(partition, Arc::downgrade(&store));
        metrics::counter!(COPIES_OPENED).increment(1);
        tracing::info!(partition, warm, "opened a local copy");
        Ok(store)
    }

    /// The copy in `dir` is damaged (and closed): moves it aside (never deletes it), fills
    /// its place from a peer's snapshot or the newest good backup if it can, and opens that
    /// (or an empty store). The state updater then replays the changelog from the copy's
    /// position, as for any copy; meanwhile other nodes' copies serve the partition's keys.
    fn recover(
        &self,
        partition: i32,
        dir: &Path,
        damage: &StoreError,
    ) -> Result<Arc<PartitionStore>, StoreError> {
        let io_error = |error: std::io::Error| StoreError::Io {
            path: dir.display().to_string(),
            message: error.to_string(),
        };
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let aside = dir.with_file_name(format!("{partition}.damaged-{millis}"));
        tracing::error!(
            partition,
            %damage,
            moved_to = %aside.display(),
            "a local copy is damaged; moving it aside and recovering it"
        );
        std::fs::rename(dir, &aside).map_err(io_error)?;
        let source = self.bootstrap(partition, dir, "damaged");
        std::fs::create_dir_all(dir).map_err(io_error)?;
        metrics::counter!(COPIES_RECOVERED, "source" => source).increment(1);
        PartitionStore::open(dir, &self.memory)
    }

    /// Reads every block of every open copy and checks its checksum (the block cache is left
    /// as it is). A damaged standby is replaced at once: moved aside and rebuilt (from a peer,
    /// a backup or its changelog). A damaged active keeps serving and is reported, since
    /// ingest writes to it; the node's next start rebuilds it.
    pub fn scrub(&self, shutdown: &std::sync::atomic::AtomicBool) {
        let partitions: Vec<i32> = self.registry.all().iter().map(|c| c.partition).collect();
        for partition in partitions {
            if shutdown.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            // Only the check holds the copy: a damaged store must be let go of to be replaced.
            let checked = match self.registry.get(partition) {
                Some(copy) => copy.store.verify_checksums(),
                None => continue,
            };
            match checked {
                Ok(()) => {}
                Err(damage) if damage.is_corruption() => self.replace_damaged(partition, &damage),
                Err(error) => tracing::warn!(partition, %error, "cannot check a copy"),
            }
        }
    }

    fn replace_damaged(&self, partition: i32, damage: &StoreError) {
        let mut open = self.lifecycle();
        let Some(copy) = self.registry.get(partition) else {
            return;
        };
        let role = copy.role();
        metrics::counter!(COPIES_DAMAGED, "role" => crate::backup::role_name(role)).increment(1);
        if role != Role::Standby {
            tracing::error!(
                partition,
                %damage,
                role = crate::backup::role_name(role),
                "an open copy is damaged; it keeps serving until the node restarts, which \
                 moves it aside and rebuilds it"
            );
            return;
        }
        self.updater.stop(partition);
        self.registry.remove(partition);
        open.remove(&partition);
        // The damaged store must be closed before its directory moves: RocksDB keeps writing
        // to the path it opened, which would be the new copy's. The updater lets go of it
        // on its next turn, reads in flight when they finish.
        let damaged = copy.store.clone();
        drop(copy);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while Arc::strong_count(&damaged) > 1 {
            if std::time::Instant::now() > deadline {
                tracing::error!(
                    partition,
                    "a damaged standby is still in use after 30 s; it keeps serving, and the \
                     next check tries again"
                );
                let position = damaged.position().unwrap_or_default();
                open.insert(partition, Arc::downgrade(&damaged));
                self.registry
                    .track(partition, damaged.clone(), Role::Standby, position);
                self.updater.follow(partition, damaged, Follow::Standby);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(damaged);
        let dir = self.config.store_dir(partition);
        let store = match self.recover(partition, &dir, damage) {
            Ok(store) => store,
            Err(error) => {
                tracing::error!(partition, %error, "rebuilding a damaged standby failed");
                return;
            }
        };
        let position = match store.position() {
            Ok(position) => position,
            Err(error) => {
                tracing::error!(partition, %error, "rebuilding a damaged standby failed");
                return;
            }
        };
        open.insert(partition, Arc::downgrade(&store));
        self.registry
            .track(partition, store.clone(), Role::Standby, position);
        self.updater.follow(partition, store, Follow::Standby);
    }

    /// Fills `dir` (missing or empty) for a copy of `partition` that is `why` (new here, or
    /// damaged): from a peer's snapshot, else the newest good backup, else nothing (the
    /// changelog from its start). Returns the source. Each failure is logged and the next
    /// source tried.
    fn bootstrap(&self, partition: i32, dir: &Path, why: &str) -> &'static str {
        let started = std::time::Instant::now();
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
        source
    }

    /// Ingest was assigned the partition: its copy (a standby's, a retired one's, or a new
    /// one) turns restoring, and the state updater brings it to the end of its changelog,
    /// then reports [`updater::UpdaterEvent::Restored`] with `generation`.
    pub fn assign(
        &self,
        partition: i32,
        generation: u64,
    ) -> Result<(Arc<PartitionStore>, Position), StoreError> {
        let mut open = self.lifecycle();
        let store = self.open_store(&mut open, partition)?;
        let position = store.position()?;
        self.registry
            .track(partition, store.clone(), Role::Restoring, position);
        self.updater
            .follow(partition, store.clone(), Follow::Restore { generation });
        Ok((store, position))
    }

    /// The restore of an assigned partition finished: the copy turns active at `position`.
    pub fn activate(&self, partition: i32, position: Position) {
        let _open = self.lifecycle();
        self.registry.set_position(partition, position);
        self.registry.set_role(partition, Role::Active);
    }

    /// Ingest gave the partition up (after committing what was open): the copy stays open
    /// and readable as a standby, kept current by the updater, until placement retires it.
    pub fn revoke(&self, partition: i32) {
        let _open = self.lifecycle();
        let Some(copy) = self.registry.get(partition) else {
            return;
        };
        self.registry.set_role(partition, Role::Standby);
        self.updater
            .follow(partition, copy.store.clone(), Follow::Standby);
    }

    /// Placement put a standby of the partition here: opens it (warm from its directory if
    /// one is there) and has the updater keep it current. Does nothing if a copy is open.
    pub fn open_standby(&self, partition: i32) -> Result<(), StoreError> {
        let mut open = self.lifecycle();
        if self.registry.get(partition).is_some() {
            return Ok(());
        }
        let store = self.open_store(&mut open, partition)?;
        let position = store.position()?;
        self.registry
            .track(partition, store.clone(), Role::Standby, position);
        self.updater.follow(partition, store, Follow::Standby);
        tracing::info!(
            partition,
            changelog_offset = position.changelog_next,
            "following a standby copy"
        );
        Ok(())
    }

    /// Retires a standby copy: the updater stops, reads no longer find it, and its
    /// directory is kept for the retention period. Copies in any other role are left alone
    /// (ingest may have claimed it meanwhile). Returns whether it was retired.
    pub fn retire(&self, partition: i32) -> bool {
        let _open = self.lifecycle();
        let Some(copy) = self.registry.get(partition) else {
            return false;
        };
        if copy.role() != Role::Standby {
            return false;
        }
        self.updater.stop(partition);
        self.registry.remove(partition);
        let dir = self.config.store_dir(partition);
        if let Err(error) = mark_retired(&dir, SystemTime::now()) {
            tracing::warn!(%error, dir = %dir.display(), "cannot mark a retired copy");
        }
        metrics::counter!(COPIES_RETIRED).increment(1);
        tracing::info!(
            partition,
            "retired a standby copy; its directory is kept for a while"
        );
        true
    }

    /// Marks the directories of copies that are not open (left by an earlier run) as
    /// retired now, unless they are marked already, so that the retention period counts for
    /// them too. `wanted` are the partitions that may still be opened soon.
    pub fn mark_unopened_retired(&self, wanted: &dyn Fn(i32) -> bool) {
        let open = self.lifecycle();
        for (partition, dir) in self.store_dirs() {
            let in_use = self.registry.get(partition).is_some()
                || open.get(&partition).is_some_and(|w| w.strong_count() > 0);
            if in_use || wanted(partition) || dir.join(RETIRED_MARKER).exists() {
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
        let mut open = self.lifecycle();
        for (partition, dir) in self.store_dirs() {
            let in_use = self.registry.get(partition).is_some()
                || open.get(&partition).is_some_and(|w| w.strong_count() > 0);
            let expired = retired_at(&dir).is_some_and(|at| {
                SystemTime::now()
                    .duration_since(at)
                    .is_ok_and(|age| age >= retention)
            });
            if in_use || !expired {
                continue;
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    open.remove(&partition);
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
