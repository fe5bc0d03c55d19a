//! A small disk for one node: a size-limited tmpfs mounted as its state directory, which a
//! test can fill to the last byte and give back, as a full disk in production would.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// A mounted tmpfs; unmounted when dropped.
#[derive(Debug)]
pub struct SmallDisk {
    path: PathBuf,
}

/// The file that fills a disk.
const FILLER: &str = "kstore-test-filler";

impl SmallDisk {
    /// Mounts a tmpfs of `bytes` at `path` (created if missing). Needs the privilege to
    /// mount (root, or a user namespace that allows it).
    pub fn mount(path: &Path, bytes: u64) -> Result<SmallDisk> {
        std::fs::create_dir_all(path)?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes}"))
            .arg("tmpfs")
            .arg(path)
            .output()
            .context("running mount")?;
        if !output.status.success() {
            bail!(
                "mounting a tmpfs at {}: {}",
                path.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(SmallDisk { path: path.into() })
    }

    /// Fills the disk: writes a file until no byte is left. Returns how many bytes it took.
    pub fn fill(&self) -> Result<u64> {
        let mut file = std::fs::File::create(self.path.join(FILLER))?;
        let chunk = vec![0u8; 1 << 20];
        let mut written = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(error) if error.raw_os_error() == Some(28) => break, // ENOSPC
                Err(error) => return Err(error.into()),
            }
        }
        // The last partial chunk may still fit byte by byte.
        let small = [0u8; 512];
        while let Ok(n) = file.write(&small) {
            if n == 0 {
                break;
            }
            written += n as u64;
        }
        Ok(written)
    }

    /// Gives the space back.
    pub fn free(&self) -> Result<()> {
        match std::fs::remove_file(self.path.join(FILLER)) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: a node that still runs keeps its files until it exits.
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
    }
}
