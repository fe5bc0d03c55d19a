//! The catalog: one JSON file per backup, `catalog/<backup-id>.json` in the backup set's
//! directory, written after every file of the backup is in place (so an entry names a
//! complete backup). It records what the backup contains and a checksum of every file, so
//! that a backup can be checked before anything is restored from it.
//!
//! A catalog is read from a shared directory (and one day an object store) that any node,
//! any tool or any damage may have written: an entry is used only if it parses, is no
//! larger than [`MAX_ENTRY_BYTES`], is named for its backup id, states offsets that are not
//! negative, and names only paths inside its backup set.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The catalog's directory in a backup set.
pub const CATALOG_DIR: &str = "catalog";

/// The largest catalog entry read (an entry of 100,000 files is about 20 MB).
pub const MAX_ENTRY_BYTES: u64 = 64 << 20;

/// One file of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChecksum {
    /// The path relative to the backup set's directory.
    pub path: String,
    /// Its size.
    pub bytes: u64,
    /// XXH3-128 of its content, in hex.
    pub xxh3: String,
}

/// One backup of one partition's store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// BackupEngine's id of the backup in its set.
    pub backup_id: u32,
    /// The application id.
    pub app: String,
    /// The store.
    pub store: String,
    /// The partition.
    pub partition: u32,
    /// The input topic's partition count when the backup was made.
    pub partition_count: u32,
    /// Every changelog record before this offset is in the backup.
    pub changelog_next: i64,
    /// Every input record before this offset is reflected in it (the input position: for a
    /// store over several input topics, the sum of `input_offsets`).
    pub input_next: i64,
    /// The next offset per input topic reflected in it (empty in entries made before kstore
    /// kept them, when the store read one topic: its next offset is `input_next`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub input_offsets: BTreeMap<String, i64>,
    /// The node that made it.
    pub node_id: String,
    /// The role of the copy it was made from: active, standby.
    pub source_role: String,
    /// When, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// The bytes of all its files.
    pub size_bytes: u64,
    /// The bytes of its files that no earlier backup in the set had.
    pub added_bytes: u64,
    /// Every file of the backup, BackupEngine's metadata file included.
    pub files: Vec<FileChecksum>,
}

/// The XXH3-128 checksum of a file, in hex, and its size.
pub fn checksum_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        bytes += read as u64;
    }
    Ok((bytes, format!("{:032x}", hasher.digest128())))
}

/// Whether `path` names a file inside a backup set, as BackupEngine names them
/// (`shared_checksum/000009_2765_1234.sst`, `private/1/CURRENT`, `meta/3`): relative, made of
/// plain names only (so no `..`, no root, nothing empty), at most 4096 bytes.
pub fn inside_set(path: &str) -> bool {
    path.len() <= 4096 && path.split('/').all(crate::store::plain_file_name)
}

/// The files BackupEngine lists in a backup's metadata file (`meta/<id>`): every line of the
/// form `<path> crc32 <checksum> …` whose path is inside the set.
pub fn files_in_backup_meta(meta: &str) -> Vec<String> {
    meta.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let path = fields.next()?;
            (fields.next() == Some("crc32") && inside_set(path)).then(|| path.to_owned())
        })
        .collect()
}

/// Parses the catalog entry in file `name` of a catalog, and checks it (see the module's
/// documentation).
pub fn parse_entry(name: &str, bytes: &[u8]) -> Result<CatalogEntry, String> {
    let entry: CatalogEntry = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if name != format!("{}.json", entry.backup_id) {
        return Err(format!("it describes backup {}", entry.backup_id));
    }
    if entry.changelog_next < 0
        || entry.input_next < 0
        || entry.input_offsets.values().any(|next| *next < 0)
    {
        return Err(format!(
            "it states changelog offset {} and input offset {}",
            entry.changelog_next, entry.input_next
        ));
    }
    let mut paths = HashSet::with_capacity(entry.files.len());
    for file in &entry.files {
        if !inside_set(&file.path) {
            let shown: String = file.path.chars().take(64).collect();
            return Err(format!(
                "it names {shown:?}, which is not a path inside the set"
            ));
        }
        if !paths.insert(file.path.as_str()) {
            return Err(format!("it names {:?} twice", file.path));
        }
    }
    Ok(entry)
}

/// Reads a catalog entry's file, refusing one larger than [`MAX_ENTRY_BYTES`].
fn read_entry_file(path: &Path) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_ENTRY_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_ENTRY_BYTES {
        return Err(format!("it is larger than {MAX_ENTRY_BYTES} bytes"));
    }
    Ok(bytes)
}

/// Writes the entry to `catalog/<id>.json` in `set_dir`: to a temporary file first, then
/// renamed, so a reader never sees half an entry.
pub fn write_entry(set_dir: &Path, entry: &CatalogEntry) -> std::io::Result<String> {
    let dir = set_dir.join(CATALOG_DIR);
    std::fs::create_dir_all(&dir)?;
    let name = format!("{}.json", entry.backup_id);
    let temporary = dir.join(format!(".{name}.tmp"));
    let text = serde_json::to_vec_pretty(entry).map_err(std::io::Error::other)?;
    {
        let mut file = std::fs::File::create(&temporary)?;
        std::io::Write::write_all(&mut file, &text)?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, dir.join(&name))?;
    Ok(format!("{CATALOG_DIR}/{name}"))
}

/// Reads every entry in `set_dir`'s catalog, oldest first. An entry that does not parse or
/// pass its checks is returned as an error beside the others, never silently skipped.
pub fn read_entries(set_dir: &Path) -> (Vec<CatalogEntry>, Vec<String>) {
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    let Ok(listing) = std::fs::read_dir(set_dir.join(CATALOG_DIR)) else {
        return (entries, problems);
    };
    for item in listing.flatten() {
        let path = item.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let name = item.file_name().to_string_lossy().into_owned();
        match read_entry_file(&path).and_then(|bytes| parse_entry(&name, &bytes)) {
            Ok(entry) => entries.push(entry),
            Err(error) => problems.push(format!("{}: {error}", path.display())),
        }
    }
    entries.sort_by_key(|e: &CatalogEntry| e.backup_id);
    (entries, problems)
}

/// Removes the catalog entry of a backup that no longer exists.
pub fn remove_entry(set_dir: &Path, backup_id: u32) -> std::io::Result<()> {
    std::fs::remove_file(set_dir.join(CATALOG_DIR).join(format!("{backup_id}.json")))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn backup_meta_lists_its_files() {
        let meta = "1764300000\n42\n3\nshared_checksum/000009_2765_1234.sst crc32 2765 \
                    \nprivate/1/MANIFEST-000005 crc32 99\nprivate/1/CURRENT crc32 7\n";
        assert_eq!(
            files_in_backup_meta(meta),
            [
                "shared_checksum/000009_2765_1234.sst",
                "private/1/MANIFEST-000005",
                "private/1/CURRENT"
            ]
        );
    }

    fn entry() -> CatalogEntry {
        CatalogEntry {
            backup_id: 3,
            app: "app".into(),
            store: "features".into(),
            partition: 2,
            partition_count: 12,
            changelog_next: 100,
            input_next: 250,
            input_offsets: BTreeMap::new(),
            node_id: "node-1".into(),
            source_role: "standby".into(),
            created_at_ms: 1,
            size_bytes: 10,
            added_bytes: 4,
            files: vec![FileChecksum {
                path: "meta/3".into(),
                bytes: 10,
                xxh3: "00".into(),
            }],
        }
    }

    #[test]
    fn entries_round_trip_and_a_bad_one_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let entry = entry();
        write_entry(dir.path(), &entry).unwrap();
        std::fs::write(dir.path().join("catalog/9.json"), b"{not json").unwrap();
        let (entries, problems) = read_entries(dir.path());
        assert_eq!(entries, [entry]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("9.json"), "{problems:?}");
    }

    #[test]
    fn entries_that_reach_outside_their_set_or_lie_about_themselves_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let bad = |mutate: fn(&mut CatalogEntry)| {
            let mut entry = entry();
            mutate(&mut entry);
            entry
        };
        let cases = [
            bad(|e| e.files[0].path = "../../../etc/passwd".into()),
            bad(|e| e.files[0].path = "/etc/passwd".into()),
            bad(|e| e.files[0].path = "shared_checksum//x".into()),
            bad(|e| e.files.push(e.files[0].clone())),
            bad(|e| e.input_next = -1),
        ];
        for (n, entry) in cases.iter().enumerate() {
            let mut entry = entry.clone();
            entry.backup_id = n as u32 + 10;
            write_entry(dir.path(), &entry).unwrap();
        }
        // An entry under another backup's name.
        let text = serde_json::to_vec(&entry()).unwrap();
        std::fs::write(dir.path().join(CATALOG_DIR).join("4.json"), text).unwrap();
        // An entry too large to be one.
        let huge = std::fs::File::create(dir.path().join(CATALOG_DIR).join("5.json")).unwrap();
        huge.set_len(MAX_ENTRY_BYTES + 1).unwrap();
        let (entries, problems) = read_entries(dir.path());
        assert!(entries.is_empty(), "{entries:?}");
        assert_eq!(problems.len(), cases.len() + 2, "{problems:?}");
        assert!(
            problems.iter().any(|p| p.contains("larger than")),
            "{problems:?}"
        );
    }

    #[test]
    fn backup_meta_paths_outside_the_set_are_left_out() {
        let meta = "1\n2\n3\n../../secret crc32 1\n/etc/passwd crc32 2\nmeta/1 crc32 3\n";
        assert_eq!(files_in_backup_meta(meta), ["meta/1"]);
    }

    fn any_entry() -> impl Strategy<Value = CatalogEntry> {
        let path =
            proptest::collection::vec("[a-z0-9_]{1,12}(\\.sst)?", 1..4).prop_map(|p| p.join("/"));
        (
            any::<u32>(),
            "\\PC{0,12}",
            any::<u32>(),
            0..=i64::MAX,
            0..=i64::MAX,
            any::<u64>(),
            proptest::collection::btree_map(path, (any::<u64>(), "[0-9a-f]{32}"), 0..5),
        )
            .prop_map(
                |(backup_id, node_id, partition, changelog_next, input_next, at, files)| {
                    CatalogEntry {
                        backup_id,
                        app: "app".into(),
                        store: "features".into(),
                        partition,
                        partition_count: partition.saturating_add(1),
                        changelog_next,
                        input_next,
                        input_offsets: BTreeMap::from([("orders".into(), input_next)]),
                        node_id,
                        source_role: "standby".into(),
                        created_at_ms: at,
                        size_bytes: at / 2,
                        added_bytes: at / 4,
                        files: files
                            .into_iter()
                            .map(|(path, (bytes, xxh3))| FileChecksum { path, bytes, xxh3 })
                            .collect(),
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn entries_round_trip_through_their_json(entry in any_entry()) {
            let name = format!("{}.json", entry.backup_id);
            let text = serde_json::to_vec_pretty(&entry).unwrap();
            prop_assert_eq!(parse_entry(&name, &text).unwrap(), entry);
        }

        #[test]
        fn any_bytes_in_a_catalog_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            name in "\\PC{0,12}",
            meta in "\\PC{0,200}",
        ) {
            let _ = parse_entry(&name, &bytes);
            for path in files_in_backup_meta(&meta) {
                prop_assert!(inside_set(&path));
            }
        }
    }
}
