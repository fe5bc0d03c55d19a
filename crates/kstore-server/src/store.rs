//! Stores: one RocksDB per (store, partition), sharing one block cache and one write buffer
//! manager so that the node's memory stays inside its budget however many partitions it
//! holds.
//!
//! A store is a prefix of its committed changelog: every write batch carries the data and
//! the store's position (the next changelog offset to apply and the next input offset it
//! reflects), so a crash at any moment leaves data and position in agreement.
//!
//! There is no write-ahead log: the changelog in Kafka is the log. Writes go to memtables,
//! and memtables reach disk only in flushes that are atomic across the column families
//! (`atomic_flush`), so what is on disk is always some batch's data together with that
//! batch's position. A crash (even `kill -9`) loses the memtables and leaves the store at its
//! last flush, consistent, from which the changelog is replayed. Flushes happen when
//! memtables fill, at a clean close, before a checkpoint or backup, and every
//! `store-flush-interval-ms` for a copy that has changed, which bounds that replay. Without
//! a WAL a store on disk is its SST files and little else (a WAL would hold nearly every
//! update of a small store, which rarely flushes).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use kstore_core::scan::KeyRange;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options,
    WriteBatch, WriteBufferManager,
};

use crate::config::MemoryConfig;
use crate::input_offsets::InputOffsets;
use crate::processor::versions::ModuleHistory;

/// The column family that holds the store's position, apart from the user's keys.
const META_CF: &str = "kstore-meta";
const CHANGELOG_OFFSET_KEY: &[u8] = b"changelog-next-offset";
const INPUT_OFFSET_KEY: &[u8] = b"input-next-offset";
/// The next offset per input topic (`crate::input_offsets`), behind `input-next-offset`.
const INPUT_OFFSETS_KEY: &[u8] = b"input-next-offsets";
/// Which module versions folded which input (`processor::versions`).
const MODULE_HISTORY_KEY: &[u8] = b"module-history";

/// Where a store stands: what it has applied, in changelog and in input terms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    /// The next changelog offset to apply (0 for an empty store).
    pub changelog_next: i64,
    /// The next input offset: every input record before it is reflected (0 if none).
    pub input_next: i64,
}

/// A store could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// RocksDB failed.
    #[error("rocksdb error in store {path}: {source}")]
    Rocks {
        /// The store's directory.
        path: String,
        /// RocksDB's error.
        source: rocksdb::Error,
    },
    /// The store's directory could not be prepared.
    #[error("store {path}: {message}")]
    Io {
        /// The store's directory.
        path: String,
        /// What failed.
        message: String,
    },
    /// A file of the store failed its checksum check, or is missing.
    #[error("store {path} is damaged: {message}")]
    Damaged {
        /// The store's directory.
        path: String,
        /// What RocksDB found.
        message: String,
    },
    /// The stored module history does not parse.
    #[error("store {path} holds a corrupt module history: {reason}")]
    CorruptModuleHistory {
        /// The store's directory.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The stored position is not 8 bytes of a non-negative offset.
    #[error("store {path} holds a corrupt position under {key}")]
    CorruptPosition {
        /// The store's directory.
        path: String,
        /// Which position key.
        key: String,
    },
}

impl StoreError {
    /// Whether RocksDB found the store's files damaged (a checksum that does not match, a
    /// file cut short or missing): the copy must be recovered, not retried.
    pub fn is_corruption(&self) -> bool {
        match self {
            StoreError::Rocks { source, .. } => source.kind() == rocksdb::ErrorKind::Corruption,
            StoreError::Damaged { .. }
            | StoreError::CorruptPosition { .. }
            | StoreError::CorruptModuleHistory { .. } => true,
            StoreError::Io { .. } => false,
        }
    }
}

/// The memory that every store of a node shares.
#[derive(Clone)]
pub struct SharedMemory {
    cache: Cache,
    write_buffers: WriteBufferManager,
}

impl std::fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMemory").finish_non_exhaustive()
    }
}

impl SharedMemory {
    /// Creates the shared block cache and write buffer manager. Memtables are charged to
    /// the cache, so `block_cache_bytes` bounds both together.
    pub fn new(config: &MemoryConfig) -> Self {
        let cache = Cache::new_lru_cache(config.block_cache_bytes as usize);
        let write_buffers = WriteBufferManager::new_write_buffer_manager_with_cache(
            config.write_buffer_bytes as usize,
            false,
            cache.clone(),
        );
        SharedMemory {
            cache,
            write_buffers,
        }
    }

    fn options(&self) -> Options {
        let mut block = BlockBasedOptions::default();
        block.set_block_cache(&self.cache);
        block.set_bloom_filter(10.0, false);
        block.set_cache_index_and_filter_blocks(true);
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_block_based_table_factory(&block);
        options.set_write_buffer_manager(&self.write_buffers);
        options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        options.set_max_background_jobs(2);
        // No WAL (see the module's comment): data and position reach disk together.
        options.set_atomic_flush(true);
        // RocksDB's own info logs and preallocated manifest space, kept small.
        options.set_keep_log_file_num(2);
        options.set_max_log_file_size(1 << 20);
        options.set_manifest_preallocation_size(64 << 10);
        options
    }
}

/// The outcome of a read that may only use memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryRead<T> {
    /// Answered from memtables and the block cache.
    Answered(T),
    /// Answering needs a read from disk.
    NeedsDisk,
}

/// Read options that let RocksDB answer from memtables and the block cache only.
fn memory_only() -> rocksdb::ReadOptions {
    let mut options = rocksdb::ReadOptions::default();
    options.set_read_tier(rocksdb::ReadTier::BlockCache);
    options
}

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// The values of several keys (`None`: not found), in the order asked.
pub type Values = Vec<Option<Vec<u8>>>;

/// One page of a scan: keys and values in the scan's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// The keys and their values.
    pub entries: Vec<KeyValue>,
    /// Whether the range holds keys past the page.
    pub more: bool,
}

/// Values read together with the position of the store they were read from, in one
/// snapshot: they reflect exactly the input before `position.input_next` (data and position
/// are written in one batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Positioned<T> {
    /// What was read.
    pub value: T,
    /// The store's position in the same snapshot.
    pub position: Position,
}

/// What [`PartitionStore::apply_with_meta`] writes beside the updates and the position.
#[derive(Debug, Clone, Copy, Default)]
pub struct MetaUpdate<'a> {
    /// The next offset per input topic, if it changed (`position.input_next` is their sum).
    pub inputs: Option<&'a InputOffsets>,
    /// The partition's module history, if it changed.
    pub modules: Option<&'a ModuleHistory>,
}

/// One partition's store.
pub struct PartitionStore {
    db: DB,
    path: String,
    /// Written since its last flush.
    dirty: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for PartitionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl PartitionStore {
    /// Opens (or creates) the store in `dir`. Existing state is always reused.
    pub fn open(dir: &Path, memory: &SharedMemory) -> Result<Arc<Self>, StoreError> {
        let path = dir.display().to_string();
        let options = memory.options();
        let families = [
            ColumnFamilyDescriptor::new(rocksdb::DEFAULT_COLUMN_FAMILY_NAME, memory.options()),
            ColumnFamilyDescriptor::new(META_CF, memory.options()),
        ];
        let db = DB::open_cf_descriptors(&options, dir, families).map_err(|source| {
            StoreError::Rocks {
                path: path.clone(),
                source,
            }
        })?;
        Ok(Arc::new(PartitionStore {
            db,
            path,
            dirty: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    fn rocks(&self) -> impl Fn(rocksdb::Error) -> StoreError + '_ {
        |source| StoreError::Rocks {
            path: self.path.clone(),
            source,
        }
    }

    /// Returns a key's value. May read from disk.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get(key).map_err(self.rocks())
    }

    /// Returns a key's value and the store's position, from one snapshot, if RocksDB can
    /// answer from memory (memtables and block cache), or [`MemoryRead::NeedsDisk`] without
    /// waiting if it would have to read from disk. Such a read never blocks on I/O, so it
    /// may run on an async worker.
    pub fn get_from_memory(
        &self,
        key: &[u8],
    ) -> Result<MemoryRead<Positioned<Option<Vec<u8>>>>, StoreError> {
        Ok(match self.read_positioned(&[key], true)? {
            MemoryRead::Answered(read) => MemoryRead::Answered(first(read)),
            MemoryRead::NeedsDisk => MemoryRead::NeedsDisk,
        })
    }

    /// Returns a key's value and the store's position, from one snapshot. May read from
    /// disk.
    pub fn get_positioned(&self, key: &[u8]) -> Result<Positioned<Option<Vec<u8>>>, StoreError> {
        match self.read_positioned(&[key], false)? {
            MemoryRead::Answered(read) => Ok(first(read)),
            MemoryRead::NeedsDisk => unreachable!("a read that may use the disk answers"),
        }
    }

    /// Reads `keys` and the position from one snapshot; from memory only if `memory_only`.
    fn read_positioned(
        &self,
        keys: &[&[u8]],
        memory_only_read: bool,
    ) -> Result<MemoryRead<Positioned<Values>>, StoreError> {
        let snapshot = self.db.snapshot();
        let mut options = if memory_only_read {
            memory_only()
        } else {
            rocksdb::ReadOptions::default()
        };
        options.set_snapshot(&snapshot);
        let mut values = Vec::with_capacity(keys.len());
        for key in keys {
            match self.get_with(key, &options)? {
                MemoryRead::Answered(value) => values.push(value),
                MemoryRead::NeedsDisk => return Ok(MemoryRead::NeedsDisk),
            }
        }
        Ok(match self.position_in(&options)? {
            MemoryRead::Answered(position) => MemoryRead::Answered(Positioned {
                value: values,
                position,
            }),
            MemoryRead::NeedsDisk => MemoryRead::NeedsDisk,
        })
    }

    /// Reads the store's position with `options` (their snapshot, their read tier).
    fn position_in(
        &self,
        options: &rocksdb::ReadOptions,
    ) -> Result<MemoryRead<Position>, StoreError> {
        let meta = self.meta_cf();
        let mut offsets = [0i64; 2];
        for (slot, key) in [CHANGELOG_OFFSET_KEY, INPUT_OFFSET_KEY].iter().enumerate() {
            let stored = match self.db.get_cf_opt(meta, key, options) {
                Ok(stored) => stored,
                Err(error) if error.kind() == rocksdb::ErrorKind::Incomplete => {
                    return Ok(MemoryRead::NeedsDisk);
                }
                Err(error) => return Err(self.rocks()(error)),
            };
            offsets[slot] = self.stored_offset(key, stored)?;
        }
        Ok(MemoryRead::Answered(Position {
            changelog_next: offsets[0],
            input_next: offsets[1],
        }))
    }

    fn get_with(
        &self,
        key: &[u8],
        options: &rocksdb::ReadOptions,
    ) -> Result<MemoryRead<Option<Vec<u8>>>, StoreError> {
        match self.db.get_opt(key, options) {
            Ok(value) => Ok(MemoryRead::Answered(value)),
            Err(error) if error.kind() == rocksdb::ErrorKind::Incomplete => {
                Ok(MemoryRead::NeedsDisk)
            }
            Err(error) => Err(self.rocks()(error)),
        }
    }

    /// Returns the values of several keys, in the order given, and the store's position,
    /// all from one snapshot. May read from disk.
    pub fn multi_get(&self, keys: &[&[u8]]) -> Result<Positioned<Values>, StoreError> {
        match self.read_positioned(keys, false)? {
            MemoryRead::Answered(read) => Ok(read),
            MemoryRead::NeedsDisk => unreachable!("a read that may use the disk answers"),
        }
    }

    /// Like [`PartitionStore::multi_get`], from memory only: [`MemoryRead::NeedsDisk`] if
    /// any of the keys would need a read from disk. Point reads of one snapshot, not
    /// RocksDB's MultiGet: that does not honour the block-cache-only read tier in every case
    /// (it may read the disk anyway, or report a key it could not read as missing).
    pub fn multi_get_from_memory(
        &self,
        keys: &[&[u8]],
    ) -> Result<MemoryRead<Positioned<Values>>, StoreError> {
        self.read_positioned(keys, true)
    }

    /// Returns RocksDB's estimate of the number of keys.
    pub fn estimated_keys(&self) -> Result<u64, StoreError> {
        let estimate = self.db.property_int_value("rocksdb.estimate-num-keys");
        Ok(estimate.map_err(self.rocks())?.unwrap_or(0))
    }

    /// Returns the size of the store's live SST files, in bytes.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        let size = self.db.property_int_value("rocksdb.live-sst-files-size");
        Ok(size.map_err(self.rocks())?.unwrap_or(0))
    }

    /// Returns the store's position.
    pub fn position(&self) -> Result<Position, StoreError> {
        Ok(Position {
            changelog_next: self.read_offset(CHANGELOG_OFFSET_KEY)?,
            input_next: self.read_offset(INPUT_OFFSET_KEY)?,
        })
    }

    /// Returns the next offset per input topic the store reflects. A store that keeps none
    /// (written before kstore kept them, when it read one topic) reflects its input position
    /// in `first_topic`, the first of its input topics.
    pub fn input_offsets(&self, first_topic: &str) -> Result<InputOffsets, StoreError> {
        match self.stored_input_offsets()? {
            Some(offsets) => Ok(offsets),
            None => Ok(InputOffsets::single(
                first_topic,
                self.read_offset(INPUT_OFFSET_KEY)?,
            )),
        }
    }

    /// Returns the next offset per input topic, if the store keeps them.
    pub fn stored_input_offsets(&self) -> Result<Option<InputOffsets>, StoreError> {
        let stored = self
            .db
            .get_cf(self.meta_cf(), INPUT_OFFSETS_KEY)
            .map_err(self.rocks())?;
        stored
            .map(|bytes| {
                InputOffsets::decode(&bytes).map_err(|_| StoreError::CorruptPosition {
                    path: self.path.clone(),
                    key: String::from_utf8_lossy(INPUT_OFFSETS_KEY).into_owned(),
                })
            })
            .transpose()
    }

    /// Returns which module versions folded the store's input (none for a store whose
    /// processor has no versions).
    pub fn module_history(&self) -> Result<ModuleHistory, StoreError> {
        let stored = self
            .db
            .get_cf(self.meta_cf(), MODULE_HISTORY_KEY)
            .map_err(self.rocks())?;
        ModuleHistory::decode(stored.as_deref().unwrap_or_default()).map_err(|error| {
            StoreError::CorruptModuleHistory {
                path: self.path.clone(),
                reason: error.to_string(),
            }
        })
    }

    fn read_offset(&self, key: &[u8]) -> Result<i64, StoreError> {
        let meta = self.meta_cf();
        let stored = self.db.get_cf(meta, key).map_err(self.rocks())?;
        self.stored_offset(key, stored)
    }

    /// Decodes a stored offset ([`decode_offset`]); none stored is 0.
    fn stored_offset(&self, key: &[u8], stored: Option<Vec<u8>>) -> Result<i64, StoreError> {
        match stored {
            None => Ok(0),
            Some(bytes) => decode_offset(&bytes).ok_or_else(|| StoreError::CorruptPosition {
                path: self.path.clone(),
                key: String::from_utf8_lossy(key).into_owned(),
            }),
        }
    }

    fn meta_cf(&self) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(META_CF)
            .expect("the meta column family is created on open")
    }

    /// Writes updates (`None` deletes) and the new position in one atomic batch.
    pub fn apply(
        &self,
        updates: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
        position: Position,
    ) -> Result<(), StoreError> {
        self.apply_with_meta(updates, position, MetaUpdate::default())
    }

    /// As [`PartitionStore::apply`], and the store's next offset per input topic and its
    /// module history become those given, in the same batch.
    pub fn apply_with_meta(
        &self,
        updates: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
        position: Position,
        update: MetaUpdate<'_>,
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for (key, value) in updates {
            match value {
                Some(value) => batch.put(key, value),
                None => batch.delete(key),
            }
        }
        let meta = self.meta_cf();
        batch.put_cf(
            meta,
            CHANGELOG_OFFSET_KEY,
            encode_offset(position.changelog_next),
        );
        batch.put_cf(meta, INPUT_OFFSET_KEY, encode_offset(position.input_next));
        if let Some(inputs) = update.inputs {
            batch.put_cf(meta, INPUT_OFFSETS_KEY, inputs.encode());
        }
        if let Some(modules) = update.modules {
            batch.put_cf(meta, MODULE_HISTORY_KEY, modules.encode());
        }
        let mut options = rocksdb::WriteOptions::default();
        options.disable_wal(true);
        self.db.write_opt(batch, &options).map_err(self.rocks())?;
        self.dirty.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Writes the memtables to SST files, if anything was written since the last flush,
    /// and waits for it: everything applied so far survives a crash from then on.
    pub fn flush_if_dirty(&self) -> Result<(), StoreError> {
        if self.dirty.swap(false, std::sync::atomic::Ordering::AcqRel)
            && let Err(error) = self.flush()
        {
            self.dirty.store(true, std::sync::atomic::Ordering::Release);
            return Err(error);
        }
        Ok(())
    }

    /// Writes the memtables to SST files (atomically across the column families) and waits
    /// for it.
    pub fn flush(&self) -> Result<(), StoreError> {
        let families = [
            self.db
                .cf_handle(rocksdb::DEFAULT_COLUMN_FAMILY_NAME)
                .expect("the default column family always exists"),
            self.meta_cf(),
        ];
        self.db
            .flush_cfs_opt(&families, &rocksdb::FlushOptions::default())
            .map_err(self.rocks())
    }

    /// Reads every SST file of the store from disk (never from the block cache, which may
    /// hold a block as it was before the disk went bad) and checks every block's checksum.
    /// Fails with a damage error ([`StoreError::is_corruption`]) at the first damaged file.
    #[allow(unsafe_code)]
    pub fn verify_checksums(&self) -> Result<(), StoreError> {
        use rocksdb::AsRawPtr;
        let mut error: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: the database handle belongs to `self.db`, which outlives the call. RocksDB
        // leaves `error` null, or sets it to a C string it allocated, which is read once and
        // freed with RocksDB's own `rocksdb_free`.
        let message = unsafe {
            librocksdb_sys::rocksdb_verify_checksum(self.db.as_raw_ptr(), &mut error);
            if error.is_null() {
                None
            } else {
                let message = std::ffi::CStr::from_ptr(error)
                    .to_string_lossy()
                    .into_owned();
                librocksdb_sys::rocksdb_free(error.cast());
                Some(message)
            }
        };
        match message {
            None => Ok(()),
            Some(message) => Err(StoreError::Damaged {
                path: self.path.clone(),
                message,
            }),
        }
    }

    /// Makes a consistent snapshot of the store in `dir` (which must not exist yet), hard
    /// linking its files where the file system allows.
    pub fn checkpoint(&self, dir: &Path) -> Result<(), StoreError> {
        rocksdb::checkpoint::Checkpoint::new(&self.db)
            .and_then(|checkpoint| checkpoint.create_checkpoint(dir))
            .map_err(self.rocks())
    }

    /// Adds an incremental backup of the store to `engine`, flushing its memtables first.
    pub fn back_up(&self, engine: &mut rocksdb::backup::BackupEngine) -> Result<(), StoreError> {
        engine
            .create_new_backup_flush(&self.db, true)
            .map_err(self.rocks())
    }

    /// Returns the first keys of `range` in key order (from its end, if `descending`), with
    /// their values and the store's position, all from one snapshot: at most `limit` keys,
    /// and no more once their keys and values reach `max_bytes` (at least one key is always
    /// returned). `more` says whether the range holds keys past the page. May read from disk.
    pub fn scan_page(
        &self,
        range: &KeyRange,
        descending: bool,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Positioned<ScanPage>, StoreError> {
        let snapshot = self.db.snapshot();
        let mut options = rocksdb::ReadOptions::default();
        options.set_snapshot(&snapshot);
        let mode = match (descending, &range.from, &range.to) {
            (false, Some(from), _) => IteratorMode::From(from, Direction::Forward),
            (false, None, _) => IteratorMode::Start,
            (true, _, Some(to)) => IteratorMode::From(to, Direction::Reverse),
            (true, _, None) => IteratorMode::End,
        };
        let mut page = ScanPage::default();
        let mut bytes = 0;
        let mut iterate = rocksdb::ReadOptions::default();
        iterate.set_snapshot(&snapshot);
        for item in self.db.iterator_opt(mode, iterate) {
            let (key, value) = item.map_err(self.rocks())?;
            if !range.contains(&key) {
                let before_the_range = if descending {
                    range.to.as_deref().is_some_and(|to| &*key >= to)
                } else {
                    range.from.as_deref().is_some_and(|from| &*key < from)
                };
                if before_the_range {
                    continue;
                }
                break;
            }
            if is_reserved(&key) {
                continue;
            }
            if page.entries.len() >= limit || (bytes >= max_bytes && !page.entries.is_empty()) {
                page.more = true;
                break;
            }
            bytes += key.len() + value.len();
            page.entries.push((key.to_vec(), value.to_vec()));
        }
        match self.position_in(&options)? {
            MemoryRead::Answered(position) => Ok(Positioned {
                value: page,
                position,
            }),
            MemoryRead::NeedsDisk => unreachable!("a read that may use the disk answers"),
        }
    }

    /// Returns every key and value, in key order. For tests and small stores only.
    pub fn scan(&self) -> Result<Vec<KeyValue>, StoreError> {
        self.db
            .iterator(rocksdb::IteratorMode::Start)
            .map(|item| {
                item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(self.rocks())
            })
            .filter(|item| item.as_ref().map_or(true, |(key, _)| !is_reserved(key)))
            .collect()
    }
}

impl Drop for PartitionStore {
    /// Flushes what was written since the last flush: without a WAL, memtables are all that
    /// holds it (RocksDB would flush them at close too; this says so when it fails).
    fn drop(&mut self) {
        if let Err(error) = self.flush_if_dirty() {
            tracing::warn!(path = %self.path, %error, "flushing a store as it closes");
        }
    }
}

/// Whether a key is kstore's own (a changelog record an older kstore applied as a key), not
/// a user's: scans skip it.
fn is_reserved(key: &[u8]) -> bool {
    key.starts_with(kstore_core::keys::RESERVED_KEY_PREFIX)
}

/// The one value of a one-key read.
fn first(read: Positioned<Values>) -> Positioned<Option<Vec<u8>>> {
    Positioned {
        value: read.value.into_iter().next().flatten(),
        position: read.position,
    }
}

/// Encodes a stored offset: 8 bytes, big-endian.
fn encode_offset(offset: i64) -> [u8; 8] {
    offset.to_be_bytes()
}

/// Decodes [`encode_offset`]: exactly 8 bytes of an offset that is not negative (offsets
/// start at 0), else `None`.
fn decode_offset(bytes: &[u8]) -> Option<i64> {
    let offset = i64::from_be_bytes(bytes.try_into().ok()?);
    (offset >= 0).then_some(offset)
}

/// Whether `name` is a plain file name as RocksDB and its BackupEngine write them
/// (`000012.sst`, `CURRENT`, `MANIFEST-000005`, `shared_checksum`): ASCII letters, digits,
/// `.`, `_` and `-`, not starting with a dot (so never `.` or `..`), at most 255 bytes.
/// Nothing else can name a file outside its directory or surprise a file system.
///
/// ```
/// use kstore_server::store::plain_file_name;
/// assert!(plain_file_name("000012.sst"));
/// assert!(!plain_file_name("../CURRENT"));
/// assert!(!plain_file_name("/etc/passwd"));
/// assert!(!plain_file_name(""));
/// ```
pub fn plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Small shared memory for unit tests.
#[cfg(test)]
pub(crate) fn test_memory() -> SharedMemory {
    SharedMemory::new(&MemoryConfig {
        block_cache_bytes: 8 << 20,
        write_buffer_bytes: 4 << 20,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_and_position_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let memory = test_memory();
        {
            let store = PartitionStore::open(dir.path(), &memory).unwrap();
            assert_eq!(store.position().unwrap(), Position::default());
            let mut updates = BTreeMap::new();
            updates.insert(b"a".to_vec(), Some(b"1".to_vec()));
            updates.insert(b"b".to_vec(), Some(b"2".to_vec()));
            store
                .apply(
                    &updates,
                    Position {
                        changelog_next: 2,
                        input_next: 7,
                    },
                )
                .unwrap();
            let mut updates = BTreeMap::new();
            updates.insert(b"a".to_vec(), None);
            store
                .apply(
                    &updates,
                    Position {
                        changelog_next: 3,
                        input_next: 9,
                    },
                )
                .unwrap();
        }
        let store = PartitionStore::open(dir.path(), &memory).unwrap();
        assert_eq!(
            store.position().unwrap(),
            Position {
                changelog_next: 3,
                input_next: 9
            }
        );
        assert_eq!(store.get(b"a").unwrap(), None);
        assert_eq!(store.scan().unwrap(), vec![(b"b".to_vec(), b"2".to_vec())]);
    }

    #[test]
    fn the_module_history_and_input_offsets_are_kept_apart_from_the_keys_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let memory = test_memory();
        let history = ModuleHistory::decode(b"0 aa\n120 bb\n").unwrap();
        let mut inputs = InputOffsets::single("orders", 3);
        inputs.set("refunds", 2);
        let at = |n| Position {
            changelog_next: n,
            input_next: n,
        };
        {
            let store = PartitionStore::open(dir.path(), &memory).unwrap();
            assert_eq!(store.module_history().unwrap(), ModuleHistory::default());
            // A store written before per-topic offsets: its position is the first topic's.
            store.apply(&BTreeMap::new(), at(2)).unwrap();
            assert_eq!(store.stored_input_offsets().unwrap(), None);
            assert_eq!(
                store.input_offsets("orders").unwrap(),
                InputOffsets::single("orders", 2)
            );
            let updates = BTreeMap::from([(b"k".to_vec(), Some(b"v".to_vec()))]);
            let meta = MetaUpdate {
                inputs: Some(&inputs),
                modules: Some(&history),
            };
            store.apply_with_meta(&updates, at(5), meta).unwrap();
            // A batch without a history leaves it as it is.
            store.apply(&BTreeMap::new(), at(6)).unwrap();
            store.flush().unwrap();
        }
        let store = PartitionStore::open(dir.path(), &memory).unwrap();
        assert_eq!(store.module_history().unwrap(), history);
        assert_eq!(store.input_offsets("orders").unwrap(), inputs);
        assert_eq!(store.scan().unwrap(), vec![(b"k".to_vec(), b"v".to_vec())]);
        assert_eq!(store.position().unwrap(), at(6));

        // The history record as an older kstore applies it, as a key: scans skip it.
        let reserved =
            BTreeMap::from([(b"\0kstore-module-history".to_vec(), Some(history.encode()))]);
        store.apply(&reserved, at(7)).unwrap();
        assert_eq!(store.scan().unwrap(), vec![(b"k".to_vec(), b"v".to_vec())]);
        let page = store
            .scan_page(&KeyRange::default(), false, 1, usize::MAX)
            .unwrap();
        assert_eq!(page.value.entries, vec![(b"k".to_vec(), b"v".to_vec())]);
        assert!(!page.value.more, "a reserved key counted as more");
    }

    #[test]
    fn memory_reads_say_when_they_need_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<Vec<u8>> = (0..100)
            .map(|i| format!("key-{i:03}").into_bytes())
            .collect();
        let at = Position {
            changelog_next: 100,
            input_next: 250,
        };
        let answered = |value| {
            MemoryRead::Answered(Positioned {
                value,
                position: at,
            })
        };
        {
            let store = PartitionStore::open(dir.path(), &test_memory()).unwrap();
            let updates = keys
                .iter()
                .map(|k| (k.clone(), Some(k.repeat(100))))
                .collect();
            store.apply(&updates, at).unwrap();
            // A memtable answers from memory.
            assert_eq!(
                store.get_from_memory(&keys[7]).unwrap(),
                answered(Some(keys[7].repeat(100)))
            );
            store.flush().unwrap();
        }
        // Reopened with an empty block cache: the data is only in an SST file on disk.
        let store = PartitionStore::open(dir.path(), &test_memory()).unwrap();
        // Values of 700 bytes: the keys are spread over many data blocks.
        let wanted: Vec<&[u8]> = [50, 80, 95].iter().map(|&i| keys[i].as_slice()).collect();
        let wanted_values: Vec<Option<Vec<u8>>> =
            wanted.iter().map(|k| Some(k.repeat(100))).collect();
        assert_eq!(
            store.get_from_memory(&keys[7]).unwrap(),
            MemoryRead::NeedsDisk
        );
        assert_eq!(
            store.multi_get_from_memory(&wanted).unwrap(),
            MemoryRead::NeedsDisk
        );
        // A read from disk answers and fills the block cache, so memory answers next time,
        // also for a key that does not exist.
        assert_eq!(
            store.get_positioned(&keys[7]).unwrap(),
            Positioned {
                value: Some(keys[7].repeat(100)),
                position: at
            }
        );
        assert_eq!(
            store.multi_get(&wanted).unwrap(),
            Positioned {
                value: wanted_values.clone(),
                position: at
            }
        );
        assert_eq!(
            store.get_from_memory(&keys[7]).unwrap(),
            answered(Some(keys[7].repeat(100)))
        );
        assert_eq!(
            store.multi_get_from_memory(&wanted).unwrap(),
            MemoryRead::Answered(Positioned {
                value: wanted_values,
                position: at
            })
        );
        assert_eq!(store.get_from_memory(b"key-0071").unwrap(), answered(None));
    }

    #[test]
    fn a_read_states_exactly_the_position_its_values_reflect() {
        let dir = tempfile::tempdir().unwrap();
        let store = PartitionStore::open(dir.path(), &test_memory()).unwrap();
        let put = |value: &str, input_next| {
            let updates = BTreeMap::from([(b"k".to_vec(), Some(value.as_bytes().to_vec()))]);
            let position = Position {
                changelog_next: input_next,
                input_next,
            };
            store.apply(&updates, position).unwrap();
        };
        put("one", 1);
        // Reads racing writes: every answer's value is the one written with its position.
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for i in 2..2_000 {
                    put(&format!("v{i}"), i);
                }
            });
            for _ in 0..2_000 {
                let read = store.get_positioned(b"k").unwrap();
                let expected = match read.position.input_next {
                    1 => "one".to_owned(),
                    i => format!("v{i}"),
                };
                assert_eq!(read.value, Some(expected.into_bytes()));
            }
        });
    }

    #[test]
    fn a_damaged_file_is_found_even_while_its_blocks_are_cached() {
        let dir = tempfile::tempdir().unwrap();
        let store = PartitionStore::open(dir.path(), &test_memory()).unwrap();
        let updates = (0..2_000)
            .map(|i| (format!("key-{i:05}").into_bytes(), Some(vec![b'v'; 200])))
            .collect();
        store.apply(&updates, Position::default()).unwrap();
        store.flush().unwrap();
        store.verify_checksums().unwrap();
        // Every block in the cache, then the disk under it flips a byte.
        assert_eq!(store.scan().unwrap().len(), 2_000);
        let sst = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "sst"))
            .unwrap();
        let mut bytes = std::fs::read(&sst).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x5a;
        std::fs::write(&sst, bytes).unwrap();
        let damage = store.verify_checksums().unwrap_err();
        assert!(damage.is_corruption(), "{damage}");
    }

    proptest::proptest! {
        #[test]
        fn stored_offsets_round_trip_and_any_other_bytes_are_refused(
            offset in 0..=i64::MAX,
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..16),
        ) {
            proptest::prop_assert_eq!(decode_offset(&encode_offset(offset)), Some(offset));
            match decode_offset(&bytes) {
                Some(decoded) => {
                    proptest::prop_assert_eq!(bytes.len(), 8);
                    proptest::prop_assert!(decoded >= 0);
                }
                None => proptest::prop_assert!(bytes.len() != 8 || bytes[0] & 0x80 != 0),
            }
        }
    }

    #[test]
    fn a_scan_pages_through_its_range_in_order_with_the_position_of_its_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = PartitionStore::open(dir.path(), &test_memory()).unwrap();
        let keys: Vec<Vec<u8>> = (0u32..50)
            .map(|i| format!("k{i:03}").into_bytes())
            .collect();
        let updates = keys
            .iter()
            .map(|k| (k.clone(), Some(k.repeat(2))))
            .chain([(b"other".to_vec(), Some(b"x".to_vec()))])
            .collect();
        let position = Position {
            changelog_next: 7,
            input_next: 51,
        };
        store.apply(&updates, position).unwrap();
        for descending in [false, true] {
            let range = KeyRange::with_prefix(b"k0");
            let mut seen = Vec::new();
            let mut rest = range.clone();
            loop {
                let page = store.scan_page(&rest, descending, 7, usize::MAX).unwrap();
                assert_eq!(page.position, position);
                for (key, value) in &page.value.entries {
                    assert_eq!(value, &key.repeat(2));
                }
                seen.extend(page.value.entries.iter().map(|(k, _)| k.clone()));
                if !page.value.more {
                    break;
                }
                assert_eq!(page.value.entries.len(), 7);
                rest = range.after(seen.last().unwrap(), descending);
            }
            let mut expected = keys.clone();
            if descending {
                expected.reverse();
            }
            assert_eq!(seen, expected, "descending: {descending}");
        }
        // A byte budget ends a page early, but never before its first key.
        let page = store
            .scan_page(&KeyRange::between(b"k010", b"k020").unwrap(), false, 100, 1)
            .unwrap();
        assert_eq!(page.value.entries.len(), 1);
        assert!(page.value.more);
        let empty = store
            .scan_page(&KeyRange::with_prefix(b"zz"), true, 10, usize::MAX)
            .unwrap();
        assert_eq!(empty.value, ScanPage::default());
    }

    #[test]
    fn a_store_with_a_corrupt_position_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let memory = test_memory();
        let store = PartitionStore::open(dir.path(), &memory).unwrap();
        for bytes in [&b"short"[..], &(-5i64).to_be_bytes(), &[0u8; 9]] {
            store
                .db
                .put_cf(store.meta_cf(), INPUT_OFFSET_KEY, bytes)
                .unwrap();
            assert!(
                matches!(store.position(), Err(StoreError::CorruptPosition { .. })),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn a_store_is_locked_by_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let memory = test_memory();
        let _store = PartitionStore::open(dir.path(), &memory).unwrap();
        let second = PartitionStore::open(dir.path(), &memory).unwrap_err();
        assert!(second.to_string().contains("lock"), "{second}");
    }
}
