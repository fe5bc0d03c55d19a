//! Builds kstore's binaries for the commands that run them (`up`, `bench`, `chaos`), after
//! setup has installed what RocksDB and librdkafka need.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cargo_path;

/// The cargo profile every command builds with, so that `up`, `test` and the benchmarks
/// share one build of the dependencies.
pub const PROFILE: &str = "dev";

/// Builds the binaries of `packages` and returns the directory they are in.
pub fn binaries(packages: &[&str]) -> Result<PathBuf> {
    let mut command = Command::new(cargo_path());
    command.args(["build", "--bins", "--profile", PROFILE]);
    for package in packages {
        command.args(["--package", package]);
    }
    let status = command.status().context("running cargo build")?;
    if !status.success() {
        bail!("building {} failed", packages.join(", "));
    }
    Ok(target_dir()?.join(profile_dir()))
}

/// Returns the workspace's target directory, wherever `CARGO_TARGET_DIR` or the cargo
/// config puts it.
pub fn target_dir() -> Result<PathBuf> {
    let output = Command::new(cargo_path())
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    if !output.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let target = metadata["target_directory"]
        .as_str()
        .context("cargo metadata names no target_directory")?;
    Ok(PathBuf::from(target))
}

/// The folder of the target directory that `PROFILE`'s binaries go to.
fn profile_dir() -> &'static str {
    match PROFILE {
        "dev" | "test" => "debug",
        "release" | "bench" => "release",
        other => other,
    }
}
