//! The catalog: one JSON file per backup, `catalog/<backup-id>.json` in the backup set's
//! directory, written after every file of the backup is in place (so an entry names a
//! complete backup). It records what the backup contains and a checksum of every file, so
//! that a backup can be checked before anything is restored from it.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The catalog's directory in a backup set.
pub const CATALOG_DIR: &str = "catalog";

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
    /// Every input record before this offset is reflected in it.
    pub input_next: i64,
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

/// The files BackupEngine lists in a backup's metadata file (`meta/<id>`): every line of the
/// form `<path> crc32 <checksum> …`.
pub fn files_in_backup_meta(meta: &str) -> Vec<String> {
    meta.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let path = fields.next()?;
            (fields.next() == Some("crc32")).then(|| path.to_owned())
        })
        .collect()
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

/// Reads every entry in `set_dir`'s catalog, oldest first. An entry that does not parse is
/// returned as an error beside the others, never silently skipped.
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
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
        {
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

    #[test]
    fn entries_round_trip_and_a_bad_one_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let entry = CatalogEntry {
            backup_id: 3,
            app: "app".into(),
            store: "features".into(),
            partition: 2,
            partition_count: 12,
            changelog_next: 100,
            input_next: 250,
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
        };
        write_entry(dir.path(), &entry).unwrap();
        std::fs::write(dir.path().join("catalog/9.json"), b"{not json").unwrap();
        let (entries, problems) = read_entries(dir.path());
        assert_eq!(entries, [entry]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("9.json"), "{problems:?}");
    }
}
