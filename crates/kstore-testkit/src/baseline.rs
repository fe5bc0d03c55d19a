//! The Kafka Streams baseline (`bench/kafka-streams-baseline`): kstore's built-in processor
//! as a Kafka Streams application, for the equality test and the side-by-side benchmark.
//!
//! [`build_jar`] runs Maven when the jar is missing or older than its sources (the project,
//! and kstore's protos it compiles); [`Baseline::start`] runs one instance and waits until it
//! serves gRPC and its Kafka Streams state is RUNNING.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};

use crate::process::{TestProcess, wait_until};

/// How long a Maven build may take: the first one downloads Kafka Streams, gRPC and protoc.
const BUILD_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The JVM's settings for every instance: a heap sized for the workload (the store lives in
/// RocksDB, off the heap), so that its footprint is the application's and not an idle
/// default of a quarter of the machine's memory.
pub const JVM_ARGS: &[&str] = &["-Xms128m", "-Xmx512m", "-XX:+UseG1GC"];

/// Returns the Maven project's directory.
pub fn project_dir() -> PathBuf {
    workspace_dir().join("bench/kafka-streams-baseline")
}

/// Returns where the build puts the runnable jar.
pub fn jar_path() -> PathBuf {
    project_dir().join("target/kafka-streams-baseline.jar")
}

/// The checkout the test or xtask runs in, found at run time: the nearest ancestor of the
/// running package's directory (cargo sets `CARGO_MANIFEST_DIR` for `cargo test` and
/// `cargo run`), or of the working directory, that holds the baseline's project. Not built
/// in with `env!`: checkouts that share a target directory share compiled path crates.
fn workspace_dir() -> PathBuf {
    let start = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::current_dir().ok())
        .unwrap_or_else(|| PathBuf::from("."));
    start
        .ancestors()
        .find(|dir| dir.join("bench/kafka-streams-baseline/pom.xml").is_file())
        .map(Path::to_path_buf)
        .unwrap_or(start)
}

/// Builds the jar with `mvn -q -B package` unless it is newer than every source file (the
/// project's pom, `.mvn` and `src`, and kstore's `proto` directory), and returns its path.
/// Builds of several processes at once take turns (a lock file in the project's `target`).
pub fn build_jar() -> Result<PathBuf> {
    let project = project_dir();
    let jar = jar_path();
    let target = project.join("target");
    std::fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
    let lock_path = target.join(".build.lock");
    let lock = File::create(&lock_path)
        .with_context(|| format!("creating the lock {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;

    let sources = [
        project.join("pom.xml"),
        project.join(".mvn"),
        project.join("src"),
        workspace_dir().join("proto"),
    ];
    let newest_source = sources
        .iter()
        .map(|path| newest_mtime(path))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .max();
    let jar_time = std::fs::metadata(&jar).and_then(|m| m.modified()).ok();
    if let (Some(jar_time), Some(newest)) = (jar_time, newest_source)
        && jar_time >= newest
    {
        return Ok(jar);
    }

    let log_path = target.join("mvn-build.log");
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let started = Instant::now();
    let mut child = Command::new("mvn")
        .args(["-q", "-B", "package"])
        .current_dir(&project)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context(
            "running mvn (Maven and a Java 17 JDK are needed: `cargo xtask setup` installs them)",
        )?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > BUILD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "mvn package in {} took longer than {BUILD_TIMEOUT:?}; its output is in {}",
                project.display(),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if !status.success() {
        bail!(
            "mvn -q -B package in {} failed ({status}):\n{}",
            project.display(),
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
    if !jar.is_file() {
        bail!("mvn package succeeded but {} is missing", jar.display());
    }
    Ok(jar)
}

/// The newest modification time of a file, or of any file under a directory.
fn newest_mtime(path: &Path) -> Result<Option<SystemTime>> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    };
    if !metadata.is_dir() {
        return Ok(Some(metadata.modified()?));
    }
    let mut newest = Some(metadata.modified()?);
    for entry in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
        let found = newest_mtime(&entry?.path())?;
        newest = newest.max(found);
    }
    Ok(newest)
}

/// How to run one instance of the baseline.
#[derive(Debug, Clone)]
pub struct BaselineOptions {
    /// Kafka's bootstrap servers.
    pub bootstrap: String,
    /// The input topic of JSON order events.
    pub input_topic: String,
    /// Kafka Streams' application.id: the group, and the prefix of its topics
    /// (`<id>-features-changelog`, `<id>-dlq`, `<id>-alerts`).
    pub application_id: String,
    /// The instance's id: its static group member id.
    pub instance_id: String,
    /// Kafka Streams' state directory.
    pub state_dir: PathBuf,
    /// Standby replicas per partition.
    pub standbys: u32,
    /// Further flags, such as `--threads 2` or `--set key=value`.
    pub extra: Vec<String>,
}

impl BaselineOptions {
    fn args(&self, jar: &Path) -> Vec<String> {
        let mut args: Vec<String> = JVM_ARGS.iter().map(|&a| a.to_owned()).collect();
        args.extend([
            "-jar".into(),
            jar.display().to_string(),
            "--bootstrap".into(),
            self.bootstrap.clone(),
            "--input-topic".into(),
            self.input_topic.clone(),
            "--application-id".into(),
            self.application_id.clone(),
            "--instance-id".into(),
            self.instance_id.clone(),
            "--state-dir".into(),
            self.state_dir.display().to_string(),
            "--grpc-port".into(),
            "0".into(),
            "--standbys".into(),
            self.standbys.to_string(),
        ]);
        args.extend(self.extra.iter().cloned());
        args
    }
}

/// A running baseline instance; dropping it kills the process.
#[derive(Debug)]
pub struct Baseline {
    /// The JVM process.
    pub process: TestProcess,
    /// Where it serves `kstore.v1.Query` (`host:port`).
    pub grpc_address: String,
}

impl Baseline {
    /// Starts an instance of the jar (see [`build_jar`]) with its output in `log`, and waits
    /// up to `timeout` for it to serve gRPC and to reach RUNNING.
    pub fn start(
        jar: &Path,
        options: &BaselineOptions,
        log: &Path,
        timeout: Duration,
    ) -> Result<Baseline> {
        let mut process = TestProcess::start(
            &format!("kafka-streams-baseline {}", options.instance_id),
            Path::new("java"),
            &options.args(jar),
            log,
        )?;
        let mut grpc_address = None;
        wait_until(
            timeout,
            "the Kafka Streams baseline to serve gRPC and run",
            || {
                if let Some(status) = process.try_exit()? {
                    bail!(
                        "the Kafka Streams baseline exited with {status}:\n{}",
                        process.tail()
                    );
                }
                let output = process.output();
                grpc_address = output
                    .lines()
                    .find_map(|l| l.strip_prefix("grpc listening on "))
                    .map(|a| a.trim().to_owned());
                Ok(grpc_address.is_some() && output.lines().any(|l| l.trim() == "running"))
            },
        )?;
        Ok(Baseline {
            process,
            grpc_address: grpc_address.unwrap_or_default(),
        })
    }
}
