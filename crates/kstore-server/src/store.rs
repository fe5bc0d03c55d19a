//! Stores: one RocksDB per (store, partition), sharing one block cache and one write buffer
//! manager so that the node's memory stays inside its budget however many partitions it
//! holds.
//!
//! A store is a prefix of its committed changelog: every write batch carries the data and
//! the store's position (the next changelog offset to apply and the next input offset it
//! reflects), so a crash at any moment leaves data and position in agreement.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteBufferManager,
};

use crate::config::MemoryConfig;

/// The column family that holds the store's position, apart from the user's keys.
const META_CF: &str = "kstore-meta";
const CHANGELOG_OFFSET_KEY: &[u8] = b"changelog-next-offset";
const INPUT_OFFSET_KEY: &[u8] = b"input-next-offset";

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
        matches!(self, StoreError::Rocks { source, .. }
            if source.kind() == rocksdb::ErrorKind::Corruption)
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

/// One partition's store.
pub struct PartitionStore {
    db: DB,
    path: String,
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
        Ok(Arc::new(PartitionStore { db, path }))
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

    /// Returns a key's value if RocksDB can answer from memory (memtables and block cache),
    /// or [`MemoryRead::NeedsDisk`] without waiting if it would have to read from disk. Such
    /// a read never blocks on I/O, so it may run on an async worker.
    pub fn get_from_memory(&self, key: &[u8]) -> Result<MemoryRead<Option<Vec<u8>>>, StoreError> {
        self.get_with(key, &memory_only())
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

    /// Returns the values of several keys, in the order given, with one RocksDB multi-get.
    /// May read from disk.
    pub fn multi_get(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.db
            .multi_get(keys)
            .into_iter()
            .map(|r| r.map_err(self.rocks()))
            .collect()
    }

    /// Like [`PartitionStore::multi_get`], from memory only: [`MemoryRead::NeedsDisk`] if
    /// any of the keys would need a read from disk. Point reads of one snapshot (so all
    /// values come from the same state, as with MultiGet), not RocksDB's MultiGet: that does
    /// not honour the block-cache-only read tier in every case (it may read the disk anyway,
    /// or report a key it could not read as missing).
    pub fn multi_get_from_memory(
        &self,
        keys: &[&[u8]],
    ) -> Result<MemoryRead<Vec<Option<Vec<u8>>>>, StoreError> {
        let snapshot = self.db.snapshot();
        let mut options = memory_only();
        options.set_snapshot(&snapshot);
        let mut values = Vec::with_capacity(keys.len());
        for key in keys {
            match self.get_with(key, &options)? {
                MemoryRead::Answered(value) => values.push(value),
                MemoryRead::NeedsDisk => return Ok(MemoryRead::NeedsDisk),
            }
        }
        Ok(MemoryRead::Answered(values))
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

    fn read_offset(&self, key: &[u8]) -> Result<i64, StoreError> {
        let meta = self.meta_cf();
        match self.db.get_cf(meta, key).map_err(self.rocks())? {
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
        self.db.write(batch).map_err(self.rocks())
    }

    /// Writes the memtables to SST files and waits for it.
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

    /// Reads every block of every file of the store and checks its checksum, without
    /// filling the block cache. Fails with a corruption error ([`StoreError::is_corruption`])
    /// at the first damaged block.
    pub fn verify_checksums(&self) -> Result<(), StoreError> {
        for family in [rocksdb::DEFAULT_COLUMN_FAMILY_NAME, META_CF] {
            let handle = self
                .db
                .cf_handle(family)
                .expect("both column families are created on open");
            let mut options = rocksdb::ReadOptions::default();
            options.set_verify_checksums(true);
            options.fill_cache(false);
            options.set_readahead_size(2 << 20);
            let mut iterator = self.db.raw_iterator_cf_opt(&handle, options);
            iterator.seek_to_first();
            while iterator.valid() {
                iterator.next();
            }
            iterator.status().map_err(self.rocks())?;
        }
        Ok(())
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

    /// Returns every key and value, in key order. For tests and small stores only.
    pub fn scan(&self) -> Result<Vec<KeyValue>, StoreError> {
        self.db
            .iterator(rocksdb::IteratorMode::Start)
            .map(|item| {
                item.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(self.rocks())
            })
            .collect()
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
    fn memory_reads_say_when_they_need_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<Vec<u8>> = (0..100)
            .map(|i| format!("key-{i:03}").into_bytes())
            .collect();
        {
            let store = PartitionStore::open(dir.path(), &test_memory()).unwrap();
            let updates = keys
                .iter()
                .map(|k| (k.clone(), Some(k.repeat(100))))
                .collect();
            store.apply(&updates, Position::default()).unwrap();
            // A memtable answers from memory.
            assert_eq!(
                store.get_from_memory(&keys[7]).unwrap(),
                MemoryRead::Answered(Some(keys[7].repeat(100)))
            );
            store.flush().unwrap();
        }
        // Reopened with an empty block cache: the data is only in an SST file on disk.
        let store = PartitionStore::open(dir.path(), &test_memory()).unwrap();
        // Values of 700 bytes: the keys are spread over many data blocks.
        let wanted: Vec<&[u8]> = [50, 80, 95].iter().map(|&i| keys[i].as_slice()).collect();
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
        assert_eq!(store.get(&keys[7]).unwrap(), Some(keys[7].repeat(100)));
        assert_eq!(
            store.multi_get(&wanted).unwrap(),
            wanted
                .iter()
                .map(|k| Some(k.repeat(100)))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            store.get_from_memory(&keys[7]).unwrap(),
            MemoryRead::Answered(Some(keys[7].repeat(100)))
        );
        assert_eq!(
            store.multi_get_from_memory(&wanted).unwrap(),
            MemoryRead::Answered(wanted.iter().map(|k| Some(k.repeat(100))).collect())
        );
        assert_eq!(
            store.get_from_memory(b"key-0071").unwrap(),
            MemoryRead::Answered(None)
        );
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
