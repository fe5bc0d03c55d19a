//! xtask is the first thing a newcomer compiles, before `cargo xtask setup` has installed
//! libclang, a C++ compiler or anything else: nothing in its tree may build native code.

use std::process::Command;

/// Crates that build C or C++ code, generate bindings with libclang, or look for system
/// libraries. Any of them in xtask's tree means xtask fails to build on a fresh machine.
const NATIVE_BUILD_CRATES: &[&str] =
    &["cc", "cmake", "bindgen", "clang-sys", "pkg-config", "vcpkg"];

/// `-sys` crates that are plain Rust (declarations of the kernel's interface, no C).
const PURE_RUST_SYS_CRATES: &[&str] = &["linux-raw-sys"];

#[test]
fn xtask_builds_without_native_code() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "tree",
            "--package",
            "xtask",
            "--edges",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8_lossy(&output.stdout);
    let names: Vec<&str> = tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert!(
        names.contains(&"xtask"),
        "cargo tree printed no xtask:\n{tree}"
    );
    let native: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| {
            NATIVE_BUILD_CRATES.contains(name)
                || (name.ends_with("-sys") && !PURE_RUST_SYS_CRATES.contains(name))
        })
        .collect();
    assert!(
        native.is_empty(),
        "xtask's tree builds native code ({}); move what needs it into a crate that xtask \
         builds after setup (such as kstore-bench)",
        native.join(", ")
    );
}
