//! Where backups live.
//!
//! RocksDB's BackupEngine makes and restores backups through a file system, so a location
//! hands out one directory per backup set (one partition of one store) and is told which
//! files a new backup wrote and which files a restore is about to read. A local or mounted
//! directory needs neither call. Object storage (S3 and the like) plugs in behind the same
//! trait: `set_dir` returns a local staging directory; `published` uploads the files a
//! backup added (BackupEngine never rewrites a file under the same name, so uploads are
//! write-once) and then the catalog entry, which is the commit marker; `fetch` downloads the
//! files a restore or a verification needs that the staging directory lacks; listing reads
//! the catalog objects.

use std::path::{Path, PathBuf};

/// One partition's backup set: its BackupEngine directory and its catalog.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackupSet {
    /// The application id.
    pub app: String,
    /// The store.
    pub store: String,
    /// The partition.
    pub partition: u32,
}

impl BackupSet {
    /// The set's path below the location's root: `<app>/<store>/<partition>`.
    pub fn relative_path(&self) -> PathBuf {
        Path::new(&self.app)
            .join(&self.store)
            .join(self.partition.to_string())
    }
}

/// A place that holds backup sets.
pub trait BackupLocation: Send + Sync + std::fmt::Debug {
    /// Says where the backups are, for logs and answers.
    fn describe(&self) -> String;

    /// Returns the local directory the set's BackupEngine and catalog work in, created if
    /// missing.
    fn set_dir(&self, set: &BackupSet) -> std::io::Result<PathBuf>;

    /// A backup of `set` wrote `files` (paths relative to the set's directory, the catalog
    /// entry last): make them durable at the location.
    fn published(&self, set: &BackupSet, files: &[String]) -> std::io::Result<()>;

    /// A restore or a verification is about to read `files` of `set`: make them local.
    fn fetch(&self, set: &BackupSet, files: &[String]) -> std::io::Result<()>;
}

/// A local or mounted directory.
#[derive(Debug, Clone)]
pub struct LocalDirectory {
    root: PathBuf,
}

impl LocalDirectory {
    /// Backups under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalDirectory { root: root.into() }
    }
}

impl BackupLocation for LocalDirectory {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn set_dir(&self, set: &BackupSet) -> std::io::Result<PathBuf> {
        let dir = self.root.join(set.relative_path());
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    fn published(&self, set: &BackupSet, _files: &[String]) -> std::io::Result<()> {
        // Files and directories reach the disk before the next backup relies on them.
        let dir = self.root.join(set.relative_path());
        for sub in ["", "meta", "catalog", "shared_checksum", "private"] {
            if let Ok(handle) = std::fs::File::open(dir.join(sub)) {
                handle.sync_all()?;
            }
        }
        Ok(())
    }

    fn fetch(&self, _set: &BackupSet, _files: &[String]) -> std::io::Result<()> {
        Ok(())
    }
}
