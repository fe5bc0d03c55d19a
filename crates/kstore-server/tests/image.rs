//! The container image (`deploy/Dockerfile`), built offline with podman and run against the
//! real broker: the node starts as the non-root user, passes its probes and the image's
//! HEALTHCHECK, ships the `kstore` CLI, and stops cleanly on SIGTERM.
//!
//! No registry is reachable here, so the base image is a Debian root file system made by
//! `debootstrap` (from Debian's package archive) and imported, and the image is built with
//! `BINARIES=prebuilt` from the binaries cargo built for the tests (the Rust stages need the
//! `rust` image). Ignored by default: it needs podman, runc and debootstrap
//! (`apt-get install podman runc debootstrap`) and root. Run it with
//! `cargo test -p kstore-server --test image -- --ignored`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use kstore_testkit::process::wait_until;

const BASE: &str = "localhost/kstore-base:bookworm";
const IMAGE: &str = "localhost/kstore:test";

/// podman's flags for this machine kind: crun cannot run in its hybrid cgroup layout, and
/// root lacks CAP_SYS_RESOURCE, so limits may only stay at or below the current ones.
fn run_flags() -> Vec<String> {
    let open_files = String::from_utf8(
        Command::new("sh")
            .args(["-c", "ulimit -Hn"])
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default(),
    )
    .unwrap_or_default();
    let open_files = open_files
        .trim()
        .parse::<u64>()
        .unwrap_or(20_000)
        .min(65_536);
    vec![
        "--runtime".into(),
        "runc".into(),
        "--ulimit".into(),
        format!("nofile={open_files}:{open_files}"),
        "--ulimit".into(),
        "nproc=4096:4096".into(),
    ]
}

fn podman(args: &[&str]) -> Result<String> {
    let output = Command::new("podman")
        .args(args)
        .output()
        .context("running podman (apt-get install podman runc debootstrap)")?;
    if !output.status.success() {
        bail!(
            "podman {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Makes the base image from a minimal Debian bookworm root file system, once per machine.
fn base_image() -> Result<()> {
    if podman(&["image", "exists", BASE]).is_ok() {
        return Ok(());
    }
    let root = std::env::temp_dir().join("kstore-image-base");
    let _ = std::fs::remove_dir_all(&root);
    let status = Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(&root)
        .arg("http://deb.debian.org/debian")
        .status()
        .context("running debootstrap (apt-get install debootstrap)")?;
    ensure!(status.success(), "debootstrap failed");
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["-c", "."])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let status = Command::new("podman")
        .args(["import", "-", BASE])
        .stdin(tar.stdout.context("tar's output")?)
        .status()?;
    ensure!(status.success(), "podman import failed");
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

/// The `kstore` binary next to `kstore-node`, built if it is not there.
fn cli_binary(node: &Path) -> Result<PathBuf> {
    let cli = node.with_file_name("kstore");
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "kstore-cli", "--bin", "kstore"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()?;
    ensure!(status.success() && cli.exists(), "building kstore failed");
    Ok(cli)
}

/// Removes the container when the test ends, however it ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "-f", "-t", "5", &self.0])
            .output();
    }
}

fn http_status(address: &str, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, text))
}

#[test]
#[ignore = "needs podman, runc and debootstrap, and root: cargo test -p kstore-server --test image -- --ignored"]
fn the_image_builds_offline_and_runs_a_node_that_passes_its_probes() -> Result<()> {
    base_image()?;
    let node = PathBuf::from(env!("CARGO_BIN_EXE_kstore-node"));
    let cli = cli_binary(&node)?;
    let context = tempfile::tempdir()?;
    std::fs::create_dir_all(context.path().join("prebuilt"))?;
    std::fs::create_dir_all(context.path().join("deploy"))?;
    std::fs::copy(&node, context.path().join("prebuilt/kstore-node"))?;
    std::fs::copy(&cli, context.path().join("prebuilt/kstore"))?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::copy(
        repo.join("deploy/kstore-node.toml"),
        context.path().join("deploy/kstore-node.toml"),
    )?;
    let dockerfile = repo.join("deploy/Dockerfile");
    let mut build: Vec<String> = vec!["build".into(), "--format".into(), "docker".into()];
    build.extend(run_flags());
    build.extend(
        [
            "-f",
            dockerfile.to_str().context("path")?,
            "--build-arg",
            "BINARIES=prebuilt",
            "--build-arg",
            &format!("RUNTIME_IMAGE={BASE}"),
            "-t",
            IMAGE,
            context.path().to_str().context("path")?,
        ]
        .map(String::from),
    );
    podman(&build.iter().map(String::as_str).collect::<Vec<_>>())?;

    let kafka = kstore_testkit::kafka();
    let app = kafka.unique_name("image");
    let input = format!("{app}-orders");
    tokio::runtime::Runtime::new()?.block_on(kafka.create_topic(&input, 2))?;
    let name = app.clone();
    let mut run: Vec<String> = vec!["run".into(), "-d".into(), "--name".into(), name.clone()];
    run.extend(run_flags());
    // The host's network, where the test broker listens; ports the kernel picks, since
    // other nodes on this machine may hold the image's defaults.
    for setting in [
        "KSTORE_NODE_ID=image-node-1".to_owned(),
        format!("KSTORE_APP_ID={app}"),
        format!("KSTORE_CLUSTER_ID={app}"),
        format!("KSTORE_INPUT_TOPIC={input}"),
        format!("KSTORE_KAFKA__BOOTSTRAP_SERVERS={}", kafka.bootstrap()),
        "KSTORE_ADVERTISE_HOST=127.0.0.1".into(),
        "KSTORE_ADMIN_TOKEN=image-test-admin-token".into(),
        "KSTORE_CLUSTER_SECRET=image-test-cluster-secret-of-32-bytes!".into(),
        "KSTORE_GRPC_ADDRESS=0.0.0.0:0".into(),
        "KSTORE_METRICS_ADDRESS=0.0.0.0:0".into(),
        "KSTORE_GOSSIP_ADDRESS=0.0.0.0:0".into(),
    ] {
        run.extend(["-e".to_owned(), setting]);
    }
    run.extend(["--network".into(), "host".into(), IMAGE.into()]);
    podman(&run.iter().map(String::as_str).collect::<Vec<_>>())?;
    let container = Container(name);
    let cleanup = || kafka.delete_topics_with_prefix(&format!("{app}-"), Some(&app));

    let outcome = (|| -> Result<()> {
        let mut metrics = String::new();
        wait_until(
            Duration::from_secs(120),
            "the node's metrics address",
            || {
                let logs = podman(&["logs", &container.0])?;
                metrics = logs
                    .lines()
                    .find(|l| l.contains("serving Prometheus metrics"))
                    .and_then(|l| l.split("address=").nth(1))
                    .and_then(|a| a.split_whitespace().next())
                    .unwrap_or_default()
                    .replace("0.0.0.0", "127.0.0.1");
                ensure!(
                    podman(&["inspect", "-f", "{{.State.Running}}", &container.0])?.trim()
                        == "true",
                    "the container stopped: {logs}"
                );
                Ok(!metrics.is_empty())
            },
        )?;
        for path in ["/startupz", "/readyz", "/livez"] {
            wait_until(Duration::from_secs(120), path, || {
                Ok(http_status(&metrics, path)?.0 == 200)
            })?;
        }
        // The config baked into the image listens on every interface and keeps its state in
        // the volume.
        let baked = podman(&["exec", &container.0, "cat", "/etc/kstore/kstore-node.toml"])?;
        for line in [
            r#"state-dir = "/var/lib/kstore""#,
            r#"grpc-address = "0.0.0.0:50051""#,
            r#"metrics-address = "0.0.0.0:9464""#,
            r#"gossip-address = "0.0.0.0:7946""#,
        ] {
            ensure!(
                baked.lines().any(|l| l == line),
                "the image's config lacks {line}"
            );
        }
        let uid = podman(&["exec", &container.0, "id", "-u"])?;
        ensure!(uid.trim() == "10001", "runs as uid {uid}");
        podman(&["exec", &container.0, "kstore", "--version"])?;
        // The image's HEALTHCHECK (`kstore-node probe live` on the default port; this run
        // moved the port, so ask the one it took) and the probe command itself.
        let port = metrics.rsplit(':').next().context("port")?;
        podman(&[
            "exec",
            &container.0,
            "kstore-node",
            "probe",
            "ready",
            "--address",
            &format!("127.0.0.1:{port}"),
        ])?;
        let inspected = podman(&["image", "inspect", IMAGE])?;
        let health = inspected
            .split("\"Healthcheck\"")
            .nth(1)
            .context("the image has no HEALTHCHECK")?;
        let test: String = health.split(']').next().unwrap_or_default().into();
        ensure!(
            test.contains("\"kstore-node\"") && test.contains("\"live\""),
            "HEALTHCHECK: {test}"
        );
        // SIGTERM: a clean stop, exit code 0.
        podman(&["stop", "-t", "60", &container.0])?;
        let code = podman(&["inspect", "-f", "{{.State.ExitCode}}", &container.0])?;
        ensure!(
            code.trim() == "0",
            "exit code {code}: {}",
            podman(&["logs", &container.0])?
        );
        let size = podman(&["image", "inspect", "-f", "{{.Size}}", IMAGE])?;
        eprintln!(
            "image {IMAGE}: {} MB",
            size.trim().parse::<u64>().unwrap_or(0) >> 20
        );
        Ok(())
    })();
    drop(container);
    cleanup()?;
    outcome
}
