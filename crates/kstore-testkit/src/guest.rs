//! Builds `kstore-guest`'s example modules (`count`, `features`, `faulty`, `tally`) for
//! `wasm32-unknown-unknown`, as tests and benchmarks need them: once per process, in release,
//! into `GUEST_MODULES_TARGET_DIR` if set (not `KSTORE_…`: the node reads those as settings), else `<target>/guest-modules` (a target directory of
//! its own, since the `cargo test` that runs this holds the lock on its own).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long building the modules may take (a cold build on a busy 2-core machine compiles
/// serde, prost and kstore-core for wasm32 and their build scripts for the host).
const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);

static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Returns the path of the example module `name` (such as `"features"`), building the
/// examples first if this process has not yet.
pub fn module(name: &str) -> Result<PathBuf> {
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let dir = match built.as_ref() {
        Some(dir) => dir.clone(),
        None => built.insert(build()?).clone(),
    };
    let path = dir.join(format!("{name}.wasm"));
    if !path.is_file() {
        bail!(
            "kstore-guest has no example module {name} ({} is missing)",
            path.display()
        );
    }
    Ok(path)
}

fn build() -> Result<PathBuf> {
    let workspace = workspace_root()?;
    let target = std::env::var_os("GUEST_MODULES_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("guest-modules"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let started = Instant::now();
    let mut child = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "--target",
            "wasm32-unknown-unknown",
            "--package",
            "kstore-guest",
            "--examples",
        ])
        .current_dir(&workspace)
        .env("CARGO_TARGET_DIR", &target)
        // The modules are built as a user would, whatever flags the tests run with.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cargo} to build kstore-guest's modules"))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > BUILD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("building kstore-guest's modules took longer than {BUILD_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if !status.success() {
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            use std::io::Read;
            let _ = pipe.read_to_string(&mut stderr);
        }
        bail!(
            "building kstore-guest's modules failed ({status}); is the target installed \
             (`cargo xtask setup`, or `rustup target add wasm32-unknown-unknown`)?\n{stderr}"
        );
    }
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        "built kstore-guest's modules"
    );
    Ok(target.join("wasm32-unknown-unknown/release/examples"))
}

/// The workspace that holds `crates/kstore-guest`: above the package whose tests run (cargo
/// sets `CARGO_MANIFEST_DIR` for them), else above the current directory.
fn workspace_root() -> Result<PathBuf> {
    let starts = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::current_dir().ok());
    for start in starts {
        if let Some(root) = start
            .ancestors()
            .find(|dir| dir.join("crates/kstore-guest/Cargo.toml").is_file())
        {
            return Ok(root.to_path_buf());
        }
    }
    bail!("cannot find kstore's workspace (crates/kstore-guest) above this package or directory")
}

/// The target directory this executable was built in (cargo marks it with `CACHEDIR.TAG`),
/// else the temporary directory.
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .find(|dir| dir.join("CACHEDIR.TAG").is_file())
                .map(Path::to_path_buf)
        })
        .unwrap_or_else(std::env::temp_dir)
}

/// Writes into `dir` a descriptor set file defining the `tally` module's value,
/// `acme.v1.Tally { uint64 count = 1; string last = 2; }`, as `protoc --include_imports
/// --descriptor_set_out` would, and returns its path.
pub fn tally_descriptor_set(dir: &Path) -> Result<PathBuf> {
    use prost::Message as _;
    use prost_types::field_descriptor_proto::{Label, Type};
    use prost_types::{
        DescriptorProto, FieldDescriptorProto, FileDescriptorProto, FileDescriptorSet,
    };
    let field = |name: &str, number: i32, kind: Type| FieldDescriptorProto {
        name: Some(name.into()),
        number: Some(number),
        label: Some(Label::Optional as i32),
        r#type: Some(kind as i32),
        json_name: Some(name.into()),
        ..FieldDescriptorProto::default()
    };
    let set = FileDescriptorSet {
        file: vec![FileDescriptorProto {
            name: Some("acme/v1/tally.proto".into()),
            package: Some("acme.v1".into()),
            message_type: vec![DescriptorProto {
                name: Some("Tally".into()),
                field: vec![
                    field("count", 1, Type::Uint64),
                    field("last", 2, Type::String),
                ],
                ..DescriptorProto::default()
            }],
            syntax: Some("proto3".into()),
            ..FileDescriptorProto::default()
        }],
    };
    let path = dir.join("tally.binpb");
    std::fs::write(&path, set.encode_to_vec())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
