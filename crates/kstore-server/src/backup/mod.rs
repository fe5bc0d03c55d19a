//! Backups: an incremental RocksDB backup of each partition's store, taken from a
//! consistent checkpoint so that the catalog states exactly which changelog and input
//! offsets it contains; verification of every file's checksum; restore of the newest good
//! backup when a copy is damaged (the changelog then supplies the rest, as for any copy).
//!
//! A backup set per (app, store, partition) lives at the backup location under
//! `<app>/<store>/<partition>/`: BackupEngine's own directories (`meta/`, `private/`,
//! `shared_checksum/`, whose files later backups share) and the catalog (`catalog/`).
//! Taking a backup locks the set's `kstore-backup.lock`, so two nodes that both think they
//! are a partition's backup source (views differ for a moment) never write one set at once.

pub mod catalog;
pub mod location;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kstore_core::cluster::ClusterView;
use kstore_proto::v1::Role;
use rocksdb::backup::{BackupEngine, BackupEngineOptions, RestoreOptions};
use tokio::sync::watch;

use crate::config::{BackupConfig, NodeConfig};
use crate::registry::Registry;
use crate::store::{PartitionStore, SharedMemory, StoreError};
pub use catalog::CatalogEntry;
use location::{BackupLocation, BackupSet, LocalDirectory};

/// Backups made.
pub const BACKUPS_CREATED: &str = "kstore_backups_created_total";
/// Backups that could not be made.
pub const BACKUP_FAILURES: &str = "kstore_backup_failures_total";
/// Seconds a backup took, checkpoint to catalog entry.
pub const BACKUP_SECONDS: &str = "kstore_backup_seconds";
/// Bytes that backups added to their sets (files no earlier backup had).
pub const BACKUP_ADDED_BYTES: &str = "kstore_backup_added_bytes_total";
/// Backups passed over for a restore: damaged files, or made for another app, store or
/// partition count.
pub const BACKUPS_REJECTED: &str = "kstore_backups_rejected_total";

/// When each partition's newest backup was made, in seconds since the Unix epoch (0 if it
/// has none), as the node last read the catalog (every minute, by every node that backs up
/// on a schedule). Its age is `time() - kstore_backup_newest_timestamp_seconds`.
pub const BACKUP_NEWEST_TIMESTAMP: &str = "kstore_backup_newest_timestamp_seconds";
/// `backup.interval-ms`, in seconds: how often each partition is backed up.
pub const BACKUP_INTERVAL: &str = "kstore_backup_interval_seconds";

/// How often the node reads the catalog for [`BACKUP_NEWEST_TIMESTAMP`].
const NEWEST_INTERVAL: Duration = Duration::from_secs(60);

/// The lock file of a backup set.
const LOCK_FILE: &str = "kstore-backup.lock";

/// A backup could not be made, listed, checked or restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// Another backup of the same set runs (on this node or another).
    #[error("another backup of partition {partition} is running")]
    Busy {
        /// The partition.
        partition: u32,
    },
    /// A file or directory at the location or in the state directory failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// BackupEngine failed.
    #[error("{what}: {source}")]
    Engine {
        /// What was being done.
        what: String,
        /// RocksDB's error.
        source: rocksdb::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The partition is not below the partition count.
    #[error("partition {partition} does not exist (the input has {partitions} partitions)")]
    UnknownPartition {
        /// The partition asked for.
        partition: u32,
        /// The partition count.
        partitions: u32,
    },
    /// A backup restored, but not to the offsets its catalog entry states.
    #[error(
        "backup {backup_id} of partition {partition} restored to changelog offset {restored}, \
         but its catalog says {expected}"
    )]
    Mismatch {
        /// The partition.
        partition: u32,
        /// The backup.
        backup_id: u32,
        /// What the catalog says.
        expected: i64,
        /// What the restored copy holds.
        restored: i64,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
    let what = what.into();
    move |source| BackupError::Io { what, source }
}

fn engine_error(what: impl Into<String>) -> impl FnOnce(rocksdb::Error) -> BackupError {
    let what = what.into();
    move |source| BackupError::Engine { what, source }
}

/// What re-reading a backup's files found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Files read.
    pub files_checked: u32,
    /// Bytes read.
    pub bytes_checked: u64,
    /// Each file that is missing or whose size or checksum differs from the catalog.
    pub problems: Vec<String>,
}

impl Verification {
    /// Whether every file matched.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What backing up a node's copies did.
#[derive(Debug, Default)]
pub struct BackupRound {
    /// Backups made.
    pub created: Vec<CatalogEntry>,
    /// Partitions not backed up here, and why.
    pub skipped: Vec<(u32, String)>,
    /// Partitions whose backup failed.
    pub failed: Vec<(u32, BackupError)>,
}

/// The node's backups of one store.
#[derive(Debug)]
pub struct Backups {
    location: Arc<dyn BackupLocation>,
    app: String,
    store: String,
    partitions: u32,
    node_id: String,
    /// Where checkpoints are made: next to the stores, so that they are hard links.
    scratch: PathBuf,
    memory: SharedMemory,
    config: BackupConfig,
}

impl Backups {
    /// The backups of the node's store at the configured location, or `None` when no
    /// location is configured.
    pub fn from_config(
        config: &NodeConfig,
        partitions: u32,
        memory: SharedMemory,
    ) -> Option<Arc<Self>> {
        if !config.backup.enabled() {
            return None;
        }
        let scratch = config
            .store_dir(0)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| config.state_dir.clone());
        Some(Arc::new(Backups {
            location: Arc::new(LocalDirectory::new(&config.backup.dir)),
            app: config.app_id.clone(),
            store: config.store.clone(),
            partitions,
            node_id: config.node_id.clone(),
            scratch,
            memory,
            config: config.backup.clone(),
        }))
    }

    /// The input's partition count.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Says where the backups are.
    pub fn location(&self) -> String {
        self.location.describe()
    }

    fn set(&self, partition: u32) -> BackupSet {
        BackupSet {
            app: self.app.clone(),
            store: self.store.clone(),
            partition,
        }
    }

    fn check_partition(&self, partition: u32) -> Result<(), BackupError> {
        if partition >= self.partitions {
            return Err(BackupError::UnknownPartition {
                partition,
                partitions: self.partitions,
            });
        }
        Ok(())
    }

    fn open_engine(set_dir: &Path) -> Result<BackupEngine, BackupError> {
        let options =
            BackupEngineOptions::new(set_dir).map_err(engine_error("backup engine options"))?;
        let env = rocksdb::Env::new().map_err(engine_error("RocksDB environment"))?;
        BackupEngine::open(&options, &env).map_err(engine_error(format!(
            "opening the backup set {}",
            set_dir.display()
        )))
    }

    /// Takes a backup of `store`, a copy of `partition` in `role`: a checkpoint first (the
    /// copy keeps working meanwhile), whose offsets the catalog records, then an
    /// incremental backup of the checkpoint; then the checkpoint goes.
    pub fn create(
        &self,
        partition: u32,
        store: &PartitionStore,
        role: Role,
    ) -> Result<CatalogEntry, BackupError> {
        self.check_partition(partition)?;
        let started = Instant::now();
        let set = self.set(partition);
        let set_dir = self.location.set_dir(&set).map_err(io(format!(
            "preparing the backup set of partition {partition}"
        )))?;
        let lock = std::fs::File::create(set_dir.join(LOCK_FILE))
            .map_err(io("creating the backup set's lock"))?;
        if lock.try_lock().is_err() {
            return Err(BackupError::Busy { partition });
        }

        let checkpoint_dir = self.scratch.join(format!(".backup-checkpoint-{partition}"));
        if checkpoint_dir.exists() {
            std::fs::remove_dir_all(&checkpoint_dir)
                .map_err(io("removing an earlier checkpoint"))?;
        }
        store.checkpoint(&checkpoint_dir)?;
        let result = self.back_up_checkpoint(partition, &set, &set_dir, &checkpoint_dir, role);
        if let Err(error) = std::fs::remove_dir_all(&checkpoint_dir) {
            tracing::warn!(%error, dir = %checkpoint_dir.display(), "cannot remove a checkpoint");
        }
        match &result {
            Ok(entry) => {
                metrics::counter!(BACKUPS_CREATED).increment(1);
                metrics::counter!(BACKUP_ADDED_BYTES).increment(entry.added_bytes);
                metrics::histogram!(BACKUP_SECONDS).record(started.elapsed().as_secs_f64());
                tracing::info!(
                    partition,
                    backup_id = entry.backup_id,
                    changelog_offset = entry.changelog_next,
                    input_offset = entry.input_next,
                    size_bytes = entry.size_bytes,
                    added_bytes = entry.added_bytes,
                    took_ms = started.elapsed().as_millis() as u64,
                    "backed up a partition"
                );
            }
            Err(error) => {
                metrics::counter!(BACKUP_FAILURES).increment(1);
                tracing::warn!(partition, %error, "a backup failed");
            }
        }
        result
    }

    fn back_up_checkpoint(
        &self,
        partition: u32,
        set: &BackupSet,
        set_dir: &Path,
        checkpoint_dir: &Path,
        role: Role,
    ) -> Result<CatalogEntry, BackupError> {
        let mut engine = Self::open_engine(set_dir)?;
        let known: HashSet<u32> = engine
            .get_backup_info()
            .iter()
            .map(|b| b.backup_id)
            .collect();
        let (position, input_offsets) = {
            let checkpoint = PartitionStore::open(checkpoint_dir, &self.memory)?;
            let position = checkpoint.position()?;
            let input_offsets = checkpoint.stored_input_offsets()?;
            checkpoint.back_up(&mut engine)?;
            (position, input_offsets)
        };
        let backup_id = engine
            .get_backup_info()
            .iter()
            .map(|b| b.backup_id)
            .filter(|id| !known.contains(id))
            .max()
            .ok_or_else(|| BackupError::Io {
                what: format!("backing up partition {partition}"),
                source: std::io::Error::other("the backup engine reports no new backup"),
            })?;

        let meta_path = format!("meta/{backup_id}");
        let meta = std::fs::read_to_string(set_dir.join(&meta_path))
            .map_err(io(format!("reading {meta_path} of partition {partition}")))?;
        let mut paths = catalog::files_in_backup_meta(&meta);
        paths.push(meta_path);
        let (earlier, _) = catalog::read_entries(set_dir);
        let shared: HashSet<&str> = earlier
            .iter()
            .flat_map(|e| e.files.iter().map(|f| f.path.as_str()))
            .collect();
        let mut files = Vec::with_capacity(paths.len());
        let (mut size_bytes, mut added_bytes) = (0, 0);
        for path in paths {
            let (bytes, xxh3) = catalog::checksum_file(&set_dir.join(&path))
                .map_err(io(format!("checksumming {path}")))?;
            size_bytes += bytes;
            if !shared.contains(path.as_str()) {
                added_bytes += bytes;
            }
            files.push(catalog::FileChecksum { path, bytes, xxh3 });
        }
        let entry = CatalogEntry {
            backup_id,
            app: self.app.clone(),
            store: self.store.clone(),
            partition,
            partition_count: self.partitions,
            changelog_next: position.changelog_next,
            input_next: position.input_next,
            input_offsets: input_offsets.map(|o| o.to_map()).unwrap_or_default(),
            node_id: self.node_id.clone(),
            source_role: role_name(role).to_owned(),
            created_at_ms: millis_since_epoch(SystemTime::now()),
            size_bytes,
            added_bytes,
            files,
        };
        let mut written: Vec<String> = entry.files.iter().map(|f| f.path.clone()).collect();
        written.push(catalog::write_entry(set_dir, &entry).map_err(io(format!(
            "writing the catalog entry of partition {partition}"
        )))?);
        self.location
            .published(set, &written)
            .map_err(io("publishing the backup"))?;
        Ok(entry)
    }

    /// The complete backups of `partition`, oldest first, with the catalog entries that
    /// could not be read.
    pub fn list(&self, partition: u32) -> Result<(Vec<CatalogEntry>, Vec<String>), BackupError> {
        self.check_partition(partition)?;
        let set_dir = self
            .location
            .set_dir(&self.set(partition))
            .map_err(io(format!(
                "opening the backup set of partition {partition}"
            )))?;
        Ok(catalog::read_entries(&set_dir))
    }

    /// Returns when each partition's newest backup was made, in milliseconds since the Unix
    /// epoch (`None`: no backup; partitions whose catalog cannot be read are left out).
    pub fn newest(&self) -> Vec<(u32, Option<u64>)> {
        (0..self.partitions)
            .filter_map(|partition| match self.list(partition) {
                Ok((entries, _)) => {
                    Some((partition, entries.iter().map(|e| e.created_at_ms).max()))
                }
                Err(error) => {
                    tracing::warn!(partition, %error, "cannot read the backup catalog");
                    None
                }
            })
            .collect()
    }

    /// Publishes when each partition's newest backup was made ([`BACKUP_NEWEST_TIMESTAMP`],
    /// 0 for none).
    pub fn publish_newest(&self) {
        for (partition, newest_ms) in self.newest() {
            metrics::gauge!(
                BACKUP_NEWEST_TIMESTAMP,
                "store" => self.store.clone(),
                "partition" => partition.to_string()
            )
            .set(newest_ms.unwrap_or(0) as f64 / 1000.0);
        }
    }

    /// Re-reads every file of a backup and compares its size and checksum with the catalog.
    pub fn verify(&self, entry: &CatalogEntry) -> Result<Verification, BackupError> {
        self.check_partition(entry.partition)?;
        let set = self.set(entry.partition);
        let set_dir = self
            .location
            .set_dir(&set)
            .map_err(io("opening a backup set"))?;
        let paths: Vec<String> = entry.files.iter().map(|f| f.path.clone()).collect();
        self.location
            .fetch(&set, &paths)
            .map_err(io("fetching a backup's files"))?;
        let mut verification = Verification {
            files_checked: 0,
            bytes_checked: 0,
            problems: Vec::new(),
        };
        for file in &entry.files {
            verification.files_checked += 1;
            match catalog::checksum_file(&set_dir.join(&file.path)) {
                Err(error) => verification
                    .problems
                    .push(format!("{}: cannot read: {error}", file.path)),
                Ok((bytes, xxh3)) => {
                    verification.bytes_checked += bytes;
                    if bytes != file.bytes {
                        verification.problems.push(format!(
                            "{}: {bytes} bytes, the catalog says {}",
                            file.path, file.bytes
                        ));
                    } else if xxh3 != file.xxh3 {
                        verification.problems.push(format!(
                            "{}: checksum {xxh3}, the catalog says {}",
                            file.path, file.xxh3
                        ));
                    }
                }
            }
        }
        Ok(verification)
    }

    /// Why a catalog entry must not be restored here, if it must not.
    pub fn foreign(&self, entry: &CatalogEntry, partition: u32) -> Option<String> {
        if entry.app != self.app || entry.store != self.store {
            return Some(format!(
                "it belongs to app {:?} store {:?}, not {:?} {:?}",
                entry.app, entry.store, self.app, self.store
            ));
        }
        if entry.partition != partition {
            return Some(format!("it is of partition {}", entry.partition));
        }
        if entry.partition_count != self.partitions {
            return Some(format!(
                "it was made when the input had {} partitions, not {}",
                entry.partition_count, self.partitions
            ));
        }
        None
    }

    /// Restores the newest backup of `partition` whose files all pass their checksums into
    /// `target` (which must not hold a store). Older backups are tried when newer ones are
    /// damaged or foreign; each one passed over is logged and counted. `None` if no good
    /// backup exists.
    pub fn restore_newest_good(
        &self,
        partition: u32,
        target: &Path,
    ) -> Result<Option<CatalogEntry>, BackupError> {
        let (entries, problems) = self.list(partition)?;
        for problem in problems {
            metrics::counter!(BACKUPS_REJECTED).increment(1);
            tracing::warn!(partition, %problem, "a catalog entry cannot be read");
        }
        for entry in entries.into_iter().rev() {
            if let Some(reason) = self.foreign(&entry, partition) {
                metrics::counter!(BACKUPS_REJECTED).increment(1);
                tracing::warn!(partition, backup_id = entry.backup_id, %reason,
                    "refusing a backup");
                continue;
            }
            let verification = self.verify(&entry)?;
            if !verification.ok() {
                metrics::counter!(BACKUPS_REJECTED).increment(1);
                tracing::error!(
                    partition,
                    backup_id = entry.backup_id,
                    problems = ?verification.problems,
                    "a backup is damaged; trying an older one"
                );
                continue;
            }
            self.restore(&entry, target)?;
            return Ok(Some(entry));
        }
        Ok(None)
    }

    /// Restores one backup into `target` and checks that the copy holds the offsets the
    /// catalog states.
    pub fn restore(&self, entry: &CatalogEntry, target: &Path) -> Result<(), BackupError> {
        let partition = entry.partition;
        let set_dir = self
            .location
            .set_dir(&self.set(partition))
            .map_err(io("opening a backup set"))?;
        let lock = std::fs::File::create(set_dir.join(LOCK_FILE))
            .map_err(io("creating the backup set's lock"))?;
        lock.lock_shared().map_err(io("locking the backup set"))?;
        let mut engine = Self::open_engine(&set_dir)?;
        std::fs::create_dir_all(target).map_err(io("creating the restore target"))?;
        let options = RestoreOptions::default();
        engine
            .restore_from_backup(target, target, &options, entry.backup_id)
            .map_err(engine_error(format!(
                "restoring backup {} of partition {partition}",
                entry.backup_id
            )))?;
        drop(engine);
        let restored = PartitionStore::open(target, &self.memory)?.position()?;
        if restored.changelog_next != entry.changelog_next {
            return Err(BackupError::Mismatch {
                partition,
                backup_id: entry.backup_id,
                expected: entry.changelog_next,
                restored: restored.changelog_next,
            });
        }
        tracing::info!(
            partition,
            backup_id = entry.backup_id,
            changelog_offset = entry.changelog_next,
            input_offset = entry.input_next,
            "restored a backup; the changelog supplies what came after it"
        );
        Ok(())
    }

    /// Deletes the backups of `partition` beyond the retention: the newest `keep-count`
    /// that are younger than `max-age-ms`, and always the newest one.
    pub fn purge(&self, partition: u32) -> Result<usize, BackupError> {
        let set_dir = self
            .location
            .set_dir(&self.set(partition))
            .map_err(io("opening a backup set"))?;
        let lock = std::fs::File::create(set_dir.join(LOCK_FILE))
            .map_err(io("creating the backup set's lock"))?;
        if lock.try_lock().is_err() {
            return Err(BackupError::Busy { partition });
        }
        let mut engine = Self::open_engine(&set_dir)?;
        let now = SystemTime::now();
        let max_age = Duration::from_millis(self.config.max_age_ms);
        let mut backups = engine.get_backup_info();
        backups.sort_by_key(|b| std::cmp::Reverse(b.backup_id));
        let young = backups
            .iter()
            .filter(|b| {
                let made = UNIX_EPOCH + Duration::from_secs(b.timestamp.max(0) as u64);
                now.duration_since(made).unwrap_or_default() <= max_age
            })
            .count();
        let keep = young.min(self.config.keep_count).max(1);
        if backups.len() <= keep {
            return Ok(0);
        }
        engine
            .purge_old_backups(keep)
            .map_err(engine_error("purging old backups"))?;
        let left: HashSet<u32> = engine
            .get_backup_info()
            .iter()
            .map(|b| b.backup_id)
            .collect();
        let (entries, _) = catalog::read_entries(&set_dir);
        for entry in entries.iter().filter(|e| !left.contains(&e.backup_id)) {
            catalog::remove_entry(&set_dir, entry.backup_id)
                .map_err(io("removing a catalog entry"))?;
        }
        let purged = backups.len() - left.len();
        tracing::info!(partition, purged, kept = left.len(), "purged old backups");
        Ok(purged)
    }

    /// Backs up the node's copies of `wanted` partitions (all if empty) that this node is
    /// the backup source of in `view`: the least-lagging live standby, else the active. A
    /// node that is alone, or not in its own view yet, backs up its running copies.
    pub fn back_up_local(
        &self,
        registry: &Registry,
        view: &ClusterView,
        wanted: &[u32],
    ) -> BackupRound {
        let mut round = BackupRound::default();
        let partitions: Vec<u32> = if wanted.is_empty() {
            (0..self.partitions).collect()
        } else {
            wanted.to_vec()
        };
        let known_here = view.nodes.iter().any(|n| n.node_id == self.node_id);
        for partition in partitions {
            if let Err(error) = self.check_partition(partition) {
                round.failed.push((partition, error));
                continue;
            }
            let Some(copy) = registry.get(partition as i32) else {
                if !wanted.is_empty() {
                    round
                        .skipped
                        .push((partition, "this node holds no copy".to_owned()));
                }
                continue;
            };
            let role = copy.role();
            if role == Role::Restoring {
                round
                    .skipped
                    .push((partition, "the copy here is restoring".to_owned()));
                continue;
            }
            if known_here {
                match view.backup_source(partition) {
                    Some(source) if source == self.node_id => {}
                    Some(source) => {
                        round
                            .skipped
                            .push((partition, format!("node {source} backs it up")));
                        continue;
                    }
                    None => {}
                }
            }
            match self.create(partition, &copy.store, role) {
                Ok(entry) => round.created.push(entry),
                Err(error) => round.failed.push((partition, error)),
            }
        }
        round
    }
}

/// Backs up the node's copies every `backup.interval-ms` (those it is the backup source
/// of), then applies the retention, until `shutdown`.
pub fn spawn_schedule(
    backups: Arc<Backups>,
    registry: Arc<Registry>,
    view: watch::Receiver<Arc<ClusterView>>,
    shutdown: Arc<AtomicBool>,
) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
    if backups.config.interval_ms == 0 {
        return Ok(None);
    }
    let interval = Duration::from_millis(backups.config.interval_ms);
    metrics::gauge!(BACKUP_INTERVAL).set(interval.as_secs_f64());
    std::thread::Builder::new()
        .name("kstore-backup".into())
        .spawn(move || {
            let mut next = Instant::now() + interval;
            let mut next_newest = Instant::now();
            while !shutdown.load(Ordering::Relaxed) {
                if Instant::now() >= next_newest {
                    backups.publish_newest();
                    next_newest = Instant::now() + NEWEST_INTERVAL;
                }
                if Instant::now() < next {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                next = Instant::now() + interval;
                let current = view.borrow().clone();
                let round = backups.back_up_local(&registry, &current, &[]);
                for entry in &round.created {
                    if let Err(error) = backups.purge(entry.partition) {
                        tracing::warn!(partition = entry.partition, %error,
                            "cannot apply the backup retention");
                    }
                }
                if !round.created.is_empty() {
                    backups.publish_newest();
                }
            }
        })
        .map(Some)
}

pub use kstore_core::cluster::role_name;

fn millis_since_epoch(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::{Position, test_memory};

    fn backups(root: &Path, scratch: &Path, partitions: u32) -> Backups {
        Backups {
            location: Arc::new(LocalDirectory::new(root)),
            app: "app".into(),
            store: "features".into(),
            partitions,
            node_id: "node-1".into(),
            scratch: scratch.to_path_buf(),
            memory: test_memory(),
            config: BackupConfig {
                dir: root.to_path_buf(),
                ..BackupConfig::default()
            },
        }
    }

    fn write(store: &PartitionStore, from: u32, to: u32, changelog_next: i64) {
        let updates: BTreeMap<Vec<u8>, Option<Vec<u8>>> = (from..to)
            .map(|i| {
                (
                    format!("key-{i:05}").into_bytes(),
                    Some(
                        (0..4u64)
                            .map(|n| {
                                let seed = format!("{i}-{changelog_next}-{n}");
                                format!("{:032x}", xxhash_rust::xxh3::xxh3_128(seed.as_bytes()))
                            })
                            .collect::<String>()
                            .into_bytes(),
                    ),
                )
            })
            .collect();
        store
            .apply(
                &updates,
                Position {
                    changelog_next,
                    input_next: changelog_next * 2,
                },
            )
            .unwrap();
    }

    #[test]
    fn a_backup_restores_to_the_offsets_its_catalog_states() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let backups = backups(root.path(), state.path(), 4);
        let store = PartitionStore::open(&state.path().join("2"), &test_memory()).unwrap();
        write(&store, 0, 20_000, 10);
        let first = backups.create(2, &store, Role::Standby).unwrap();
        assert_eq!((first.changelog_next, first.input_next), (10, 20));
        assert_eq!(first.source_role, "standby");
        assert_eq!(first.added_bytes, first.size_bytes);

        // 1% of the keys change: the next backup adds little.
        write(&store, 0, 200, 11);
        let second = backups.create(2, &store, Role::Active).unwrap();
        assert!(second.backup_id > first.backup_id);
        assert!(
            second.added_bytes < first.size_bytes / 10,
            "{} of {}",
            second.added_bytes,
            first.size_bytes
        );
        let (listed, problems) = backups.list(2).unwrap();
        assert!(problems.is_empty());
        assert_eq!(listed, [first.clone(), second.clone()]);
        // What kstore_backup_newest_timestamp_seconds publishes.
        assert_eq!(
            backups.newest(),
            [
                (0, None),
                (1, None),
                (2, Some(second.created_at_ms)),
                (3, None)
            ]
        );
        assert!(backups.verify(&second).unwrap().ok());

        let target = state.path().join("restored");
        let restored = backups.restore_newest_good(2, &target).unwrap().unwrap();
        assert_eq!(restored.backup_id, second.backup_id);
        let copy = PartitionStore::open(&target, &test_memory()).unwrap();
        assert_eq!(copy.scan().unwrap(), store.scan().unwrap());
        assert_eq!(copy.position().unwrap(), store.position().unwrap());
    }

    #[test]
    fn a_damaged_backup_is_passed_over_for_an_older_good_one() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let backups = backups(root.path(), state.path(), 1);
        let store = PartitionStore::open(&state.path().join("0"), &test_memory()).unwrap();
        write(&store, 0, 500, 5);
        let good = backups.create(0, &store, Role::Active).unwrap();
        let expected = store.scan().unwrap();
        write(&store, 0, 500, 6);
        let newest = backups.create(0, &store, Role::Active).unwrap();

        // Damage a file only the newest backup has: one flipped byte.
        let older: HashSet<&str> = good.files.iter().map(|f| f.path.as_str()).collect();
        let only_newest = newest
            .files
            .iter()
            .find(|f| f.path.ends_with(".sst") && !older.contains(f.path.as_str()))
            .expect("the newest backup has an SST file of its own");
        let path = root.path().join("app/features/0").join(&only_newest.path);
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();

        let verification = backups.verify(&newest).unwrap();
        assert_eq!(verification.problems.len(), 1, "{verification:?}");
        assert!(verification.problems[0].contains(&only_newest.path));

        let target = state.path().join("restored");
        let restored = backups.restore_newest_good(0, &target).unwrap().unwrap();
        assert_eq!(restored.backup_id, good.backup_id);
        let copy = PartitionStore::open(&target, &test_memory()).unwrap();
        assert_eq!(copy.scan().unwrap(), expected);
        assert_eq!(copy.position().unwrap().changelog_next, 5);
    }

    #[test]
    fn foreign_backups_are_refused_and_retention_keeps_the_newest() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let store = PartitionStore::open(&state.path().join("1"), &test_memory()).unwrap();
        write(&store, 0, 100, 3);
        let made_with_4 = backups(root.path(), state.path(), 4);
        made_with_4.create(1, &store, Role::Active).unwrap();
        // The input now has 8 partitions: the backup's keys hash elsewhere.
        let now_8 = backups(root.path(), state.path(), 8);
        let target = state.path().join("restored");
        assert_eq!(now_8.restore_newest_good(1, &target).unwrap(), None);

        let mut keep_two = backups(root.path(), state.path(), 4);
        keep_two.config.keep_count = 2;
        for offset in 4..8 {
            write(&store, 0, 10, offset);
            keep_two.create(1, &store, Role::Active).unwrap();
        }
        assert_eq!(keep_two.purge(1).unwrap(), 3);
        let (left, _) = keep_two.list(1).unwrap();
        let offsets: Vec<i64> = left.iter().map(|e| e.changelog_next).collect();
        assert_eq!(offsets, [6, 7]);
        assert!(left.iter().all(|e| keep_two.verify(e).unwrap().ok()));
    }
}
