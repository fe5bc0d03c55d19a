//! Finds the kstore binaries that the benchmarks and chaos scenarios run. `cargo xtask`
//! builds them together with `kstore-bench`, so they are its siblings in the target
//! directory. (Not an environment variable: nodes the benchmarks start inherit the
//! environment, and a node takes every `KSTORE_…` variable as configuration.)

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

/// The built binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `kstore-node`.
    pub node: PathBuf,
    /// `kstore`, the command line.
    pub cli: PathBuf,
    /// The directory that holds them, in the target directory of their build.
    pub dir: PathBuf,
}

impl Binaries {
    /// Returns `<target>/<name>`, a directory for reports beside the build's profiles (the
    /// target directory the binaries were built in).
    pub fn report_dir(&self, name: &str) -> PathBuf {
        self.dir
            .parent()
            .map_or_else(|| self.dir.join(name), |target| target.join(name))
    }
}

/// Returns the binaries beside this one, and fails naming the command that builds them when
/// one is missing.
pub fn locate() -> Result<Binaries> {
    let dir = std::env::current_exe()
        .context("finding kstore-bench's own path")?
        .parent()
        .context("kstore-bench's directory")?
        .to_path_buf();
    let binaries = Binaries {
        node: dir.join("kstore-node"),
        cli: dir.join("kstore"),
        dir,
    };
    for binary in [&binaries.node, &binaries.cli] {
        if !binary.is_file() {
            bail!(
                "{} is missing; run the benchmarks through `cargo xtask bench …` or \
                 `cargo xtask chaos …`, which build it",
                binary.display()
            );
        }
    }
    Ok(binaries)
}
