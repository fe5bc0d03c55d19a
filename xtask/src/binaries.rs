//! Builds kstore's binaries for the commands that run them (`up`, `bench`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The built binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `kstore-node`.
    pub node: PathBuf,
    /// `kstore`, the command line.
    pub cli: PathBuf,
}

/// Builds every binary of the workspace (with the whole workspace's features, as every
/// other build does, so nothing is rebuilt for a narrower feature set) and returns them.
pub fn build() -> Result<Binaries> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--workspace", "--bins"])
        .status()?;
    if !status.success() {
        bail!("building kstore's binaries failed");
    }
    let metadata = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()?;
    let metadata: serde_json::Value = serde_json::from_slice(&metadata.stdout)?;
    let target = metadata["target_directory"]
        .as_str()
        .context("no target_directory")?;
    let debug = Path::new(target).join("debug");
    Ok(Binaries {
        node: debug.join("kstore-node"),
        cli: debug.join("kstore"),
    })
}
