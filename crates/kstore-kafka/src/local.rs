//! The local Apache Kafka broker for development, tests and CI.
//!
//! The broker is the release that `deploy/kafka/pom.xml` pins. Maven resolves its jars into
//! the local Maven cache; the broker then runs as a plain `java` process in KRaft combined
//! mode (broker and controller in one process) on 127.0.0.1. Everything it owns lives in one
//! state directory per port (`<tmp>/kstore-kafka-<port>/`): the pid file, its config, its
//! data and its log. A file lock in that directory makes `start` safe when several
//! processes (test binaries, `cargo xtask`) race to start the same broker.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::admin;

/// Names a broker that tests use instead of starting their own (`host:port`, comma-separated).
pub const BOOTSTRAP_ENV: &str = "KSTORE_KAFKA_BOOTSTRAP";

/// The port `cargo xtask kafka start` and the test fixture use unless told otherwise.
pub const DEFAULT_PORT: u16 = 39092;

/// How long `start` waits for a new broker to answer a metadata request.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// How long `start` waits for the ports of a broker that is shutting down to be freed.
const PORTS_FREE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `stop` waits for a clean shutdown before it kills the broker.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the supervisor of a leased broker keeps it alive once nobody holds the lease,
/// so that consecutive test binaries share one broker instead of each starting their own.
const IDLE_GRACE_SECS: u32 = 30;

/// A broker log larger than this is set aside when the broker starts (64 MiB).
const LOG_ROTATE_BYTES: u64 = 64 << 20;

/// A fixed KRaft cluster id (22 characters of URL-safe base64, as Kafka expects), so that
/// formatting the storage of an existing state directory is a no-op.
const CLUSTER_ID: &str = "a3N0b3JlLXRlc3Ricm9rZQ";

/// One local broker, named by its client port.
#[derive(Debug, Clone)]
pub struct Broker {
    port: u16,
    state_dir: PathBuf,
    secure: Option<SecureListeners>,
}

/// Listeners with TLS and SASL, for testing clients against a secured broker. The broker
/// keeps its PLAINTEXT listener on its port (health checks, topic admin and its own
/// traffic use it) and adds:
///
/// - an SSL listener that requires a client certificate signed by a CA it trusts (mTLS);
/// - a SASL_SSL listener with SCRAM-SHA-256 and SCRAM-SHA-512 over TLS, without client
///   certificates.
///
/// The certificates are PEM files made by the caller (this crate builds no crypto); the
/// SCRAM users are created when the broker's storage is formatted (KRaft keeps them in its
/// metadata), so they must be given before the broker's first start in its state directory.
#[derive(Debug, Clone)]
pub struct SecureListeners {
    /// The SSL listener's port.
    pub ssl_port: u16,
    /// The SASL_SSL listener's port.
    pub sasl_ssl_port: u16,
    /// The broker's certificate chain (PEM), leaf first.
    pub certificate_chain: PathBuf,
    /// The broker's private key (PEM, PKCS#8, unencrypted).
    pub private_key: PathBuf,
    /// The CA certificates (PEM) the SSL listener trusts for client certificates.
    pub client_ca: PathBuf,
    /// SCRAM credentials to create.
    pub scram_users: Vec<ScramUser>,
}

/// A SCRAM credential on the broker.
#[derive(Debug, Clone)]
pub struct ScramUser {
    /// `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub mechanism: String,
    /// The user name.
    pub name: String,
    /// The password.
    pub password: String,
}

/// What `Broker::start` found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// A new broker process was started.
    New,
    /// A healthy broker was already answering on the port and was reused.
    Reused,
}

/// A snapshot of a broker's state, for `cargo xtask kafka status`.
#[derive(Debug, Clone)]
pub struct BrokerStatus {
    /// The bootstrap address clients use.
    pub bootstrap: String,
    /// The pid of the broker kstore started on this port, if it is alive.
    pub pid: Option<u32>,
    /// Whether a broker answers a metadata request on the port.
    pub healthy: bool,
    /// The Kafka version the running broker logged at startup (`Kafka version: …`).
    pub version: Option<String>,
    /// The broker's log file.
    pub log_file: PathBuf,
}

impl Broker {
    /// Returns the broker that listens on `port`, with its state directory under the
    /// system's temporary directory.
    pub fn on_port(port: u16) -> Self {
        let state_dir = std::env::temp_dir().join(format!("kstore-kafka-{port}"));
        Broker {
            port,
            state_dir,
            secure: None,
        }
    }

    /// Adds TLS and SASL listeners (see [`SecureListeners`]) to the broker's config. A
    /// broker already running on the port is reused as it is.
    pub fn with_secure_listeners(mut self, listeners: SecureListeners) -> Self {
        self.secure = Some(listeners);
        self
    }

    /// Returns the SSL listener's bootstrap address, if the broker has one.
    pub fn ssl_bootstrap(&self) -> Option<String> {
        self.secure
            .as_ref()
            .map(|s| format!("127.0.0.1:{}", s.ssl_port))
    }

    /// Returns the SASL_SSL listener's bootstrap address, if the broker has one.
    pub fn sasl_ssl_bootstrap(&self) -> Option<String> {
        self.secure
            .as_ref()
            .map(|s| format!("127.0.0.1:{}", s.sasl_ssl_port))
    }

    /// Returns the bootstrap address, `127.0.0.1:<port>`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Returns the directory that holds this broker's pid file, config, data and log.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Returns the broker's log file.
    pub fn log_file(&self) -> PathBuf {
        self.state_dir.join("broker.log")
    }

    fn pid_file(&self) -> PathBuf {
        self.state_dir.join("broker.pid")
    }

    fn controller_port(&self) -> u16 {
        self.port + 1
    }

    /// Starts the broker unless a healthy one already answers on the port, and waits until
    /// it answers a metadata request. Safe to call from several processes at once.
    pub fn start(&self) -> Result<Started> {
        self.start_with(|command| command)
    }

    /// Starts the broker like [`Broker::start`], but for a bounded use such as a test run:
    /// the caller gets a lease (a shared file lock) to hold while it needs the broker. If
    /// this call starts the broker, a small supervisor stops it once no process has held a
    /// lease for a while, so a crashed or interrupted test run leaves no broker behind.
    pub fn start_leased(&self) -> Result<(Started, File)> {
        fs::create_dir_all(&self.state_dir)
            .with_context(|| format!("creating {}", self.state_dir.display()))?;
        let lease_path = self.state_dir.join("test.lease");
        let lease = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lease_path)
            .with_context(|| format!("opening {}", lease_path.display()))?;
        lease.lock_shared()?;
        let started = self.start_with(|broker| supervised(broker, &lease_path))?;
        Ok((started, lease))
    }

    /// Like [`Broker::start`], but lets the caller wrap the broker's command line.
    fn start_with(&self, wrap: impl FnOnce(Command) -> Command) -> Result<Started> {
        fs::create_dir_all(&self.state_dir)
            .with_context(|| format!("creating {}", self.state_dir.display()))?;
        let _start_lock = self.lock("start.lock")?;

        if self.is_healthy() {
            return Ok(Started::Reused);
        }
        if let Some(pid) = self.running_pid() {
            // Our broker is alive but not answering yet (another process started it a moment
            // ago and gave up waiting, or it is still loading its logs): wait for it.
            self.wait_until_healthy(pid)?;
            return Ok(Started::Reused);
        }
        if TcpStream::connect_timeout(&self.socket_addr(), Duration::from_millis(500)).is_ok() {
            bail!(
                "port {} is taken by a process that does not answer Kafka metadata requests; \
                 choose another with --port",
                self.port
            );
        }
        // A broker that was just stopped may hold its ports for a moment longer.
        self.wait_ports_free()?;

        let classpath = self.resolve_classpath()?;
        self.write_config()?;
        self.format_storage(&classpath)?;

        self.rotate_log()?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file())
            .with_context(|| format!("opening {}", self.log_file().display()))?;
        let mut command = Command::new("java");
        command
            .args(self.jvm_args(&classpath))
            .arg("kafka.Kafka")
            .arg(self.state_dir.join("server.properties"));
        let mut command = wrap(command);
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // A process group of its own, so that Ctrl-C in the terminal that started it does
        // not take the shared broker down with it.
        command.process_group(0);
        let child = command
            .spawn()
            .context("starting java (is Java 17+ installed?)")?;
        let pid = child.id();
        fs::write(self.pid_file(), pid.to_string())?;
        // The broker outlives this handle on purpose; `stop` ends it by pid.
        drop(child);

        self.wait_until_healthy(pid)?;
        Ok(Started::New)
    }

    /// Stops the broker that kstore started on this port, if any, and waits for it to exit.
    /// Returns `false` if there was none. A broker that kstore did not start is left alone.
    pub fn stop(&self) -> Result<bool> {
        if !self.state_dir.exists() {
            return Ok(false);
        }
        let _start_lock = self.lock("start.lock")?;
        let Some(pid) = self.running_pid() else {
            let _ = fs::remove_file(self.pid_file());
            return Ok(false);
        };
        signal(pid, "TERM")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        while alive(pid) {
            if Instant::now() > deadline {
                signal(pid, "KILL")?;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = fs::remove_file(self.pid_file());
        Ok(true)
    }

    /// Reports whether the broker answers, which process kstore started for it, and the
    /// Kafka version that process logged.
    pub fn status(&self) -> BrokerStatus {
        let pid = self.running_pid();
        BrokerStatus {
            bootstrap: self.bootstrap(),
            pid,
            healthy: self.is_healthy(),
            version: pid.and_then(|_| self.logged_version()),
            log_file: self.log_file(),
        }
    }

    /// Returns whether a broker on the port answers a metadata request.
    pub fn is_healthy(&self) -> bool {
        if TcpStream::connect_timeout(&self.socket_addr(), Duration::from_millis(500)).is_err() {
            return false;
        }
        metadata_answers(&self.bootstrap(), Duration::from_secs(5))
    }

    /// Returns the last `max_bytes` of the broker's log.
    pub fn log_tail(&self, max_bytes: u64) -> Result<String> {
        let mut file = File::open(self.log_file())
            .with_context(|| format!("opening {}", self.log_file().display()))?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(max_bytes)))?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail)?;
        Ok(String::from_utf8_lossy(&tail).into_owned())
    }

    /// Waits until both of the broker's ports can be bound (a broker shutting down may
    /// still hold its controller port after its client port closed).
    fn wait_ports_free(&self) -> Result<()> {
        let deadline = Instant::now() + PORTS_FREE_TIMEOUT;
        let secure_ports = self
            .secure
            .as_ref()
            .map(|s| vec![s.ssl_port, s.sasl_ssl_port])
            .unwrap_or_default();
        for port in [self.port, self.controller_port()]
            .into_iter()
            .chain(secure_ports)
        {
            while let Err(error) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                if Instant::now() > deadline {
                    bail!(
                        "port {port} is still in use after {PORTS_FREE_TIMEOUT:?} ({error}); \
                         choose another with --port"
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    fn socket_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn lock(&self, name: &str) -> Result<File> {
        let path = self.state_dir.join(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.lock()
            .with_context(|| format!("locking {}", path.display()))?;
        Ok(file)
    }

    /// Returns the pid in the pid file if that process is alive and is this broker.
    fn running_pid(&self) -> Option<u32> {
        let pid: u32 = fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let config = self.state_dir.join("server.properties");
        let cmdline = String::from_utf8_lossy(&cmdline);
        // The pid may have been reused by an unrelated process since the broker died.
        cmdline
            .contains(config.to_string_lossy().as_ref())
            .then_some(pid)
    }

    fn wait_until_healthy(&self, pid: u32) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !alive(pid) {
                bail!(
                    "the Kafka broker exited during startup; the end of {}:\n{}",
                    self.log_file().display(),
                    self.log_tail(4000).unwrap_or_default()
                );
            }
            if self.is_healthy() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the Kafka broker (pid {pid}) did not answer within {:?}; see {}",
                    START_TIMEOUT,
                    self.log_file().display()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Keeps the log bounded across starts: a log over `LOG_ROTATE_BYTES` becomes
    /// `broker.log.1` (replacing the one before) and the broker starts a new one.
    fn rotate_log(&self) -> Result<()> {
        let log = self.log_file();
        if fs::metadata(&log).is_ok_and(|meta| meta.len() > LOG_ROTATE_BYTES) {
            fs::rename(&log, log.with_extension("log.1"))
                .with_context(|| format!("rotating {}", log.display()))?;
        }
        Ok(())
    }

    fn logged_version(&self) -> Option<String> {
        let log = fs::read_to_string(self.log_file()).ok()?;
        log.lines()
            .rev()
            .find_map(|line| line.split("Kafka version: ").nth(1))
            .and_then(|version| version.split_whitespace().next())
            .map(str::to_owned)
    }

    /// Asks Maven for the broker's classpath, resolving the jars into the local Maven
    /// cache the first time. The answer is cached in the state directory beside the pom it
    /// came from, until the pom changes or a jar it names is gone.
    fn resolve_classpath(&self) -> Result<String> {
        let pom = self.state_dir.join("pom.xml");
        let cached = self.state_dir.join("classpath.txt");
        let pom_unchanged = fs::read_to_string(&pom).is_ok_and(|text| text == KAFKA_POM);
        if pom_unchanged
            && let Ok(classpath) = fs::read_to_string(&cached)
            && std::env::split_paths(classpath.trim()).all(|jar| jar.exists())
        {
            return Ok(classpath.trim().to_owned());
        }
        let _ = fs::remove_file(&cached);
        fs::write(&pom, KAFKA_POM).with_context(|| format!("writing {}", pom.display()))?;
        let output = Command::new("mvn")
            .args(["-q", "-B", "-f"])
            .arg(&pom)
            .arg("dependency:build-classpath")
            .arg(format!("-Dmdep.outputFile={}", cached.display()))
            .output()
            .context("running mvn (is Maven installed? `cargo xtask setup` checks)")?;
        if !output.status.success() {
            let _ = fs::remove_file(&cached);
            bail!(
                "mvn could not resolve the Kafka broker from {} (a copy of deploy/kafka/pom.xml):\n{}{}",
                pom.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let classpath = fs::read_to_string(&cached)
            .with_context(|| format!("reading the classpath mvn wrote to {}", cached.display()))?;
        Ok(classpath.trim().to_owned())
    }

    fn jvm_args(&self, classpath: &str) -> Vec<String> {
        vec![
            "-Xms256m".into(),
            "-Xmx1g".into(),
            "-XX:+UseG1GC".into(),
            "-Djava.awt.headless=true".into(),
            format!(
                "-Dlog4j2.configurationFile={}",
                self.state_dir.join("log4j2.properties").display()
            ),
            "-cp".into(),
            classpath.into(),
        ]
    }

    fn write_config(&self) -> Result<()> {
        let data = self.state_dir.join("data");
        let port = self.port;
        let controller = self.controller_port();
        let mut listeners = format!("PLAINTEXT://127.0.0.1:{port}");
        let mut protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT".to_owned();
        let mut security = String::new();
        if let Some(secure) = &self.secure {
            listeners.push_str(&format!(
                ",SSL://127.0.0.1:{},SASL_SSL://127.0.0.1:{}",
                secure.ssl_port, secure.sasl_ssl_port
            ));
            protocols.push_str(",SSL:SSL,SASL_SSL:SASL_SSL");
            security = secure.properties()?;
        }
        let server = format!(
            "# Written by kstore-kafka for a local development and test broker.\n\
             process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.voters=1@127.0.0.1:{controller}\n\
             listeners={listeners},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners={listeners}\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=PLAINTEXT\n\
             listener.security.protocol.map={protocols}\n\
             log.dirs={data}\n\
             num.partitions=1\n\
             auto.create.topics.enable=false\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=12\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             transaction.state.log.num.partitions=12\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             group.initial.rebalance.delay.ms=0\n\
             group.min.session.timeout.ms=1000\n\
             log.retention.hours=24\n\
             {security}",
            data = data.display()
        );
        fs::write(self.state_dir.join("server.properties"), server)?;
        let log4j = "status = warn\n\
                     appender.out.type = Console\n\
                     appender.out.name = out\n\
                     appender.out.layout.type = PatternLayout\n\
                     appender.out.layout.pattern = [%d] %p %m (%c)%n\n\
                     rootLogger.level = info\n\
                     rootLogger.appenderRef.out.ref = out\n\
                     logger.kafka-request.name = kafka.request.logger\n\
                     logger.kafka-request.level = warn\n";
        fs::write(self.state_dir.join("log4j2.properties"), log4j)?;
        Ok(())
    }

    fn format_storage(&self, classpath: &str) -> Result<()> {
        if self.state_dir.join("data").join("meta.properties").exists() {
            return Ok(());
        }
        let output = Command::new("java")
            .args(self.jvm_args(classpath))
            .args([
                "kafka.tools.StorageTool",
                "format",
                "--ignore-formatted",
                "-t",
                CLUSTER_ID,
                "-c",
            ])
            .arg(self.state_dir.join("server.properties"))
            .args(self.secure.iter().flat_map(|secure| {
                secure.scram_users.iter().flat_map(|user| {
                    [
                        "--add-scram".to_owned(),
                        format!(
                            "{}=[name={},password={}]",
                            user.mechanism, user.name, user.password
                        ),
                    ]
                })
            }))
            .output()
            .context("running java (is Java 17+ installed?)")?;
        if !output.status.success() {
            bail!(
                "formatting the broker's storage failed:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }
}

impl SecureListeners {
    /// The broker settings of the two listeners. The key and chain go inline (a PEM key
    /// store given as a file must be encrypted, inline it need not be), with their line
    /// breaks escaped as a properties file wants them.
    fn properties(&self) -> Result<String> {
        let read = |path: &Path| {
            fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))
                .map(|pem| pem.trim().replace('\n', "\\n"))
        };
        let chain = read(&self.certificate_chain)?;
        let key = read(&self.private_key)?;
        let scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;";
        Ok(format!(
            "ssl.keystore.type=PEM\n\
             ssl.keystore.certificate.chain={chain}\n\
             ssl.keystore.key={key}\n\
             ssl.truststore.type=PEM\n\
             ssl.truststore.location={truststore}\n\
             listener.name.ssl.ssl.client.auth=required\n\
             listener.name.sasl_ssl.ssl.client.auth=none\n\
             listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512\n\
             listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config={scram}\n\
             listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={scram}\n",
            truststore = self.client_ca.display(),
        ))
    }
}

/// Wraps the broker's command in a supervisor that stops the broker once no test process
/// has held the lease for `IDLE_GRACE_SECS`, and forwards SIGTERM to it.
fn supervised(broker: Command, lease: &Path) -> Command {
    const SCRIPT: &str = r#"
lease="$1"; grace="$2"; shift 2
"$@" &
broker=$!
trap 'kill -TERM "$broker" 2>/dev/null; wait "$broker"; exit 0' TERM INT
idle=0
while kill -0 "$broker" 2>/dev/null; do
  sleep 1 & wait $!
  if flock -n -x "$lease" true; then idle=$((idle + 1)); else idle=0; fi
  if [ "$idle" -ge "$grace" ]; then kill -TERM "$broker"; wait "$broker"; exit 0; fi
done
wait "$broker"
"#;
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(SCRIPT)
        .arg("kstore-kafka-supervisor")
        .arg(lease)
        .arg(IDLE_GRACE_SECS.to_string())
        .arg(broker.get_program())
        .args(broker.get_args());
    command
}

/// `deploy/kafka/pom.xml`, built in: a binary built in one checkout and run from another
/// (they share a target directory) must not look for the pom where it was compiled.
const KAFKA_POM: &str = include_str!("../../../deploy/kafka/pom.xml");

/// Returns whether a broker among `bootstrap` (comma-separated `host:port`) answers a
/// metadata request within `timeout`.
pub fn metadata_answers(bootstrap: &str, timeout: Duration) -> bool {
    bootstrap
        .split(',')
        .map(str::trim)
        .filter(|address| !address.is_empty())
        .any(|address| admin::answers_metadata(address, timeout))
}

/// Returns whether process `pid` is running (a zombie, exited but not yet reaped, is not).
pub fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; its state letter, after the name, is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'))
    })
}

fn signal(pid: u32, name: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    if !status.success() && alive(pid) {
        bail!("could not send SIG{name} to pid {pid}");
    }
    Ok(())
}
