//! `cargo xtask up | status | down`: kstore's main job on one machine. A broker, the input
//! topic, N `kstore-node` processes on 127.0.0.1 with their own ports and state, gossiping
//! as one cluster with standby copies of every partition, and a `kstore produce` feeding
//! them at a steady rate.
//!
//! Everything `up` starts is written to `.kstore/cluster/cluster.json` in the workspace, with
//! logs and state directories next to it; `down` stops exactly what is listed there.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use kstore_kafka::admin;
use kstore_kafka::local::{Broker, DEFAULT_PORT, Started, alive};
use serde_json::json;

/// The input topic and app id of the local cluster, as in `deploy/kstore-node.toml`.
const INPUT_TOPIC: &str = "orders";
/// Below the ephemeral port range (32768 and up on Linux), so that no process's outgoing
/// connection (a broker connection of a node started a moment earlier) can hold a port
/// before its node listens on it.
const FIRST_GRPC_PORT: u16 = 25051;
const FIRST_METRICS_PORT: u16 = 9464;
const FIRST_GOSSIP_PORT: u16 = 7946;
/// How long one call to the broker may take.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

/// What `up` starts.
#[derive(Debug, Clone, clap::Args)]
pub struct Up {
    /// How many `kstore-node` processes.
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
    /// Partitions of the `orders` topic.
    #[arg(long, default_value_t = 12)]
    pub partitions: u32,
    /// Order events per second.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Customers the events spread over.
    #[arg(long, default_value_t = 5_000)]
    pub customers: u32,
    /// Standby copies of each partition.
    #[arg(long, default_value_t = 1)]
    pub standbys: usize,
    /// The broker's port.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Serve gRPC over mutual TLS, with a cluster secret: makes a CA, a node certificate
    /// (for 127.0.0.1 and localhost) and a client certificate in the cluster's directory
    /// (with the `openssl` command, so that xtask stays free of native code).
    #[arg(long)]
    pub secure: bool,
}

/// The checkout that `cargo xtask` runs in. Read at run time (cargo sets it for `cargo run`),
/// not built in: checkouts that share a target directory share the xtask binary too.
fn workspace_root() -> PathBuf {
    match std::env::var_os("CARGO_MANIFEST_DIR") {
        Some(xtask) => {
            let xtask = PathBuf::from(xtask);
            xtask.parent().map_or(xtask.join(".."), Path::to_path_buf)
        }
        // Run directly, not through cargo: from the checkout's root.
        None => PathBuf::from("."),
    }
}

fn cluster_dir() -> PathBuf {
    workspace_root().join(".kstore").join("cluster")
}

fn cluster_file() -> PathBuf {
    cluster_dir().join("cluster.json")
}

pub fn up(up: &Up) -> Result<()> {
    if let Ok(text) = fs::read_to_string(cluster_file()) {
        let cluster: serde_json::Value = serde_json::from_str(&text)?;
        if pids(&cluster).into_iter().any(alive) {
            bail!(
                "a local cluster is already up (see `cargo xtask status`); `cargo xtask down` first"
            );
        }
    }
    if up.nodes == 0 || up.partitions == 0 {
        bail!("--nodes and --partitions must be at least 1");
    }
    // The broker starts while cargo builds: on a first run Maven fetches its jars then, and
    // its JVMs start, on the network and the clock more than on the cores the build uses.
    let broker = Broker::on_port(up.port);
    let (built, started) = std::thread::scope(|scope| {
        let starting = scope.spawn(|| broker.start());
        let built = crate::build::binaries(&["kstore-server", "kstore-cli"]);
        let started = starting
            .join()
            .unwrap_or_else(|_| Err(anyhow!("starting the Kafka broker panicked")));
        (built, started)
    });
    let started = started.context("starting the Kafka broker");
    // A failed build is the error to report; a broker this run started goes again.
    let bin = match built {
        Ok(bin) => bin,
        Err(error) => {
            if matches!(started, Ok(Started::New)) {
                broker.stop()?;
            }
            return Err(error);
        }
    };
    let broker_started = started? == Started::New;
    ensure_input_topic(&broker.bootstrap(), up.partitions)?;

    let dir = cluster_dir();
    fs::create_dir_all(&dir)?;
    let template = workspace_root().join("deploy").join("kstore-node.toml");
    let secure = if up.secure {
        Some(Secure::make(&dir.join("tls"))?)
    } else {
        None
    };
    let gossip_address = |i: u16| format!("127.0.0.1:{}", FIRST_GOSSIP_PORT + i);
    let mut nodes = Vec::new();
    for i in 0..up.nodes {
        let id = format!("node-{}", i + 1);
        let grpc = format!("127.0.0.1:{}", FIRST_GRPC_PORT + i);
        let metrics = format!("127.0.0.1:{}", FIRST_METRICS_PORT + i);
        let gossip = gossip_address(i);
        // Every other node is a seed: any one of them that is up lets this one join.
        let seeds: Vec<String> = (0..up.nodes)
            .filter(|&j| j != i)
            .map(gossip_address)
            .collect();
        let state = dir.join(&id);
        let log = dir.join(format!("{id}.log"));
        let mut command = Command::new(bin.join("kstore-node"));
        command.arg("--config").arg(&template);
        for setting in [
            format!("node-id={id}"),
            format!("state-dir={}", state.display()),
            format!("grpc-address={grpc}"),
            format!("metrics-address={metrics}"),
            format!("gossip-address={gossip}"),
            format!("seeds={}", seeds.join(",")),
            format!("num-standbys={}", up.standbys),
            // Backups of every partition every 10 minutes, into the cluster's directory
            // (`kstore backup list` shows them).
            format!("backup.dir={}", dir.join("backups").display()),
            "backup.interval-ms=600000".to_owned(),
            format!("kafka.bootstrap.servers={}", broker.bootstrap()),
        ] {
            command.arg("--set").arg(setting);
        }
        if let Some(secure) = &secure {
            for setting in secure.node_settings() {
                command.arg("--set").arg(setting);
            }
            // Through the environment, not the command line that `ps` shows.
            command.env("KSTORE_CLUSTER_SECRET", &secure.cluster_secret);
        }
        let pid = spawn_detached(command, &log)?;
        nodes.push(
            json!({"id": id, "pid": pid, "grpc": grpc, "metrics": metrics,
                          "gossip": gossip, "state": state, "log": log}),
        );
    }

    let producer_log = dir.join("produce.log");
    let mut produce = Command::new(bin.join("kstore"));
    produce.args([
        "produce",
        "--topic",
        INPUT_TOPIC,
        "--count",
        "1000000000000",
    ]);
    produce.arg("--rate").arg(up.rate.to_string());
    produce.arg("--customers").arg(up.customers.to_string());
    produce.arg("--bootstrap").arg(broker.bootstrap());
    let producer_pid = spawn_detached(produce, &producer_log)?;

    let cluster = json!({
        "bin": bin,
        "broker": {"bootstrap": broker.bootstrap(), "port": up.port, "started_by_up": broker_started},
        "nodes": nodes,
        "producer": {"pid": producer_pid, "log": producer_log, "rate": up.rate},
        "tls": secure.as_ref().map(|s| json!({
            "ca": s.dir.join("ca.pem"),
            "cert": s.dir.join("client.pem"),
            "key": s.dir.join("client-key.pem"),
        })),
    });
    fs::write(cluster_file(), serde_json::to_string_pretty(&cluster)?)?;

    wait_serving(&cluster)?;
    print_next_steps(&cluster, up);
    Ok(())
}

/// Creates the input topic, or checks the partition count of the one that exists.
fn ensure_input_topic(bootstrap: &str, partitions: u32) -> Result<()> {
    match admin::partition_count(bootstrap, INPUT_TOPIC, KAFKA_TIMEOUT)? {
        Some(count) if count != partitions => bail!(
            "topic {INPUT_TOPIC} already has {count} partitions, not {partitions}; use --partitions {count}"
        ),
        Some(_) => return Ok(()),
        None => admin::create_topic(bootstrap, INPUT_TOPIC, partitions, KAFKA_TIMEOUT)?,
    }
    // The controller has created it; wait until the broker's metadata shows it too.
    let deadline = Instant::now() + KAFKA_TIMEOUT;
    while admin::partition_count(bootstrap, INPUT_TOPIC, KAFKA_TIMEOUT)? != Some(partitions) {
        if Instant::now() > deadline {
            bail!("topic {INPUT_TOPIC} was created but the broker does not show it");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Prints the cluster's processes, and each node's partitions with their roles and lag.
/// A closed pipe (`cargo xtask status | head`) ends the listing quietly.
pub fn status() -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match write_status(&mut out).and_then(|()| Ok(out.flush()?)) {
        Err(error)
            if error
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        result => result,
    }
}

fn write_status(out: &mut impl std::io::Write) -> Result<()> {
    let cluster = read_cluster()?;
    writeln!(
        out,
        "broker    {}",
        cluster["broker"]["bootstrap"].as_str().unwrap_or_default()
    )?;
    let producer_pid = cluster["producer"]["pid"].as_u64().unwrap_or(0) as u32;
    writeln!(
        out,
        "producer  pid {producer_pid} {} at {} events/s",
        if alive(producer_pid) {
            "running"
        } else {
            "STOPPED"
        },
        cluster["producer"]["rate"]
    )?;
    writeln!(out)?;
    let nodes: Vec<&serde_json::Value> =
        cluster["nodes"].as_array().into_iter().flatten().collect();
    for node in nodes
        .iter()
        .filter(|n| !alive(n["pid"].as_u64().unwrap_or(0) as u32))
    {
        writeln!(
            out,
            "{} is DOWN (pid {}; see {})",
            node["id"].as_str().unwrap_or_default(),
            node["pid"],
            node["log"].as_str().unwrap_or_default()
        )?;
    }
    // Any node answers for the whole cluster: `kstore metadata` asks the first that does.
    let seeds: Vec<&str> = nodes
        .iter()
        .filter_map(|node| node["grpc"].as_str())
        .collect();
    let output = kstore_metadata(&cluster, &seeds)?;
    if output.status.success() {
        out.write_all(&output.stdout)?;
    } else {
        writeln!(
            out,
            "no node answers Metadata: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )?;
    }
    Ok(())
}

/// Runs `kstore metadata` (the command line `up` built) against `seeds`.
fn kstore_metadata(cluster: &serde_json::Value, seeds: &[&str]) -> Result<std::process::Output> {
    let bin = cluster["bin"]
        .as_str()
        .context("cluster.json names no binaries; `cargo xtask down` and `up` again")?;
    let mut command = Command::new(Path::new(bin).join("kstore"));
    command.arg("metadata").arg("--seeds").arg(seeds.join(","));
    for flag in ["ca", "cert", "key"] {
        if let Some(path) = cluster["tls"][flag].as_str() {
            command.arg(format!("--{flag}")).arg(path);
        }
    }
    command.output().context("running kstore metadata")
}

pub fn down() -> Result<()> {
    let cluster = match read_cluster() {
        Ok(cluster) => cluster,
        Err(_) => {
            println!("no local cluster is up");
            return Ok(());
        }
    };
    let producer = cluster["producer"]["pid"].as_u64().unwrap_or(0) as u32;
    stop(producer, "kstore produce")?;
    for node in cluster["nodes"].as_array().into_iter().flatten() {
        stop(
            node["pid"].as_u64().unwrap_or(0) as u32,
            node["id"].as_str().unwrap_or("node"),
        )?;
    }
    if cluster["broker"]["started_by_up"].as_bool() == Some(true) {
        let port = cluster["broker"]["port"].as_u64().unwrap_or(0) as u16;
        if Broker::on_port(port).stop()? {
            println!("stopped the Kafka broker on port {port}");
        }
    }
    fs::remove_file(cluster_file())?;
    println!(
        "the local cluster is down (logs and stores stay in {})",
        cluster_dir().display()
    );
    Ok(())
}

fn read_cluster() -> Result<serde_json::Value> {
    let text = fs::read_to_string(cluster_file())
        .with_context(|| "no local cluster is up (start one with `cargo xtask up`)")?;
    Ok(serde_json::from_str(&text)?)
}

fn pids(cluster: &serde_json::Value) -> Vec<u32> {
    let mut pids = vec![cluster["producer"]["pid"].as_u64().unwrap_or(0) as u32];
    for node in cluster["nodes"].as_array().into_iter().flatten() {
        pids.push(node["pid"].as_u64().unwrap_or(0) as u32);
    }
    pids
}

/// Sends SIGTERM and waits up to 30 s, then SIGKILL.
fn stop(pid: u32, what: &str) -> Result<()> {
    if !alive(pid) {
        return Ok(());
    }
    Command::new("kill").arg(pid.to_string()).status()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pid) {
        if Instant::now() > deadline {
            Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()?;
            println!("killed {what} (pid {pid}) after 30 s");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("stopped {what} (pid {pid})");
    Ok(())
}

fn spawn_detached(mut command: Command, log: &Path) -> Result<u32> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = command
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {:?}", command.get_program()))?;
    Ok(child.id())
}

/// Waits until every node answers Metadata, or a node dies.
fn wait_serving(cluster: &serde_json::Value) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    for node in cluster["nodes"].as_array().into_iter().flatten() {
        let grpc = node["grpc"].as_str().unwrap_or_default();
        loop {
            if kstore_metadata(cluster, &[grpc])?.status.success() {
                break;
            }
            let pid = node["pid"].as_u64().unwrap_or(0) as u32;
            if !alive(pid) || Instant::now() > deadline {
                bail!(
                    "{} did not come up; see {}",
                    node["id"],
                    node["log"].as_str().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

fn print_next_steps(cluster: &serde_json::Value, up: &Up) {
    let first = &cluster["nodes"][0];
    let grpc = first["grpc"].as_str().unwrap_or_default();
    let metrics = first["metrics"].as_str().unwrap_or_default();
    println!();
    println!(
        "kstore is up: {} nodes, topic {INPUT_TOPIC} with {} partitions, {} events/s over {} customers",
        up.nodes, up.partitions, up.rate, up.customers
    );
    println!();
    println!("try:");
    println!("  cargo xtask status");
    if let Some(tls) = cluster["tls"].as_object() {
        let file = |key: &str| tls.get(key).and_then(|v| v.as_str()).unwrap_or_default();
        let (ca, cert, key) = (file("ca"), file("cert"), file("key"));
        println!("  kstore get --seeds {grpc} --ca {ca} --cert {cert} --key {key} customer-000042");
        println!("  grpcurl -cacert {ca} -cert {cert} -key {key} {grpc} list");
        println!(
            "  grpcurl -cacert {ca} -cert {cert} -key {key} -d '{{\"store\": \"features\", \"key\": \"'$(printf customer-000042 | base64)'\"}}' {grpc} kstore.v1.Query/Get"
        );
        println!("  grpcurl -cacert {ca} -cert {cert} -key {key} {grpc} kstore.v1.Query/Metadata");
        println!("  curl -s http://{metrics}/metrics | grep kstore_tls_");
        println!("  tail -f {}", first["log"].as_str().unwrap_or_default());
        println!("  cargo xtask down");
        println!();
        println!(
            "(gRPC is mutual TLS: a caller without a certificate signed by {ca} is refused; \
             rotate with new files in {} and `kill -HUP` the nodes)",
            Path::new(ca).parent().unwrap_or(Path::new(".")).display()
        );
        return;
    }
    println!("  grpcurl -plaintext {grpc} list");
    println!("  grpcurl -plaintext {grpc} describe kstore.v1.Query");
    println!(
        "  grpcurl -plaintext -d '{{\"store\": \"features\", \"key\": \"'$(printf customer-000042 | base64)'\"}}' {grpc} kstore.v1.Query/Get"
    );
    println!("  grpcurl -plaintext {grpc} kstore.v1.Query/Metadata");
    println!("  grpcurl -plaintext {grpc} kstore.v1.Admin/PartitionStatus");
    println!("  curl -s http://{metrics}/metrics | grep kstore_");
    println!("  tail -f {}", first["log"].as_str().unwrap_or_default());
    println!("  cargo xtask down");
    println!();
    println!(
        "(any node answers any key: a node that holds no copy of the key's partition forwards the"
    );
    println!(" read once to a node that does; the answer names the node that answered)");
    println!(
        "(the nodes are static members of the consumer group: kill one and its partitions are read\n \
         from their standbys at once, lag stated, but their actives move only once the group's\n \
         session timeout, librdkafka's 45 s unless kafka.\"session.timeout.ms\" says otherwise, has\n \
         passed; kstore.v1.Admin/Drain on a node hands its partitions over at once, then stops it)"
    );
}

/// The files and secret of a `--secure` cluster.
struct Secure {
    dir: PathBuf,
    cluster_secret: String,
}

impl Secure {
    /// Makes a CA, a node certificate (server and client authentication, for 127.0.0.1 and
    /// localhost) and a client certificate in `dir` with the `openssl` command, and a
    /// cluster secret.
    fn make(dir: &Path) -> Result<Secure> {
        fs::create_dir_all(dir)?;
        let openssl = |args: &[&str]| -> Result<String> {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .context("running openssl (install it: `cargo xtask up --secure` makes the certificates with it)")?;
            if !output.status.success() {
                bail!(
                    "openssl {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "365",
            "-subj",
            "/CN=kstore local CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&ca)?;
        for (name, extensions) in [
            (
                "node",
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            let (key, csr, cert, ext) = (
                format!("{name}-key.pem"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
            );
            fs::write(
                dir.join(&ext),
                format!(
                    "{extensions}keyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n"
                ),
            )?;
            let subject = format!("/CN=kstore-{name}");
            let mut request = vec!["req"];
            request.extend(ec);
            request.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
            openssl(&request)?;
            let serial = format!(
                "0x{:x}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_nanos()
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-set_serial",
                &serial,
                "-days",
                "365",
                "-out",
                &cert,
                "-extfile",
                &ext,
            ])?;
            fs::remove_file(dir.join(&csr))?;
            fs::remove_file(dir.join(&ext))?;
        }
        let cluster_secret = openssl(&["rand", "-hex", "32"])?;
        Ok(Secure {
            dir: dir.to_owned(),
            cluster_secret,
        })
    }

    /// The nodes' `[tls]` settings: their certificate, the CA for both their peers and
    /// their clients (mutual TLS).
    fn node_settings(&self) -> Vec<String> {
        let file = |name: &str| self.dir.join(name).display().to_string();
        vec![
            format!("tls.cert={}", file("node.pem")),
            format!("tls.key={}", file("node-key.pem")),
            format!("tls.ca={}", file("ca.pem")),
            format!("tls.client-ca={}", file("ca.pem")),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_makes_certificates_that_openssl_verifies_for_their_purposes() -> Result<()> {
        if Command::new("openssl").arg("version").output().is_err() {
            eprintln!("no openssl here; skipped");
            return Ok(());
        }
        let dir = std::env::temp_dir().join(format!("kstore-xtask-secure-{}", std::process::id()));
        let secure = Secure::make(&dir);
        let checked = (|| -> Result<()> {
            let secure = secure?;
            assert_eq!(secure.cluster_secret.len(), 64);
            for (purpose, cert) in [
                ("sslserver", "node.pem"),
                ("sslclient", "node.pem"),
                ("sslclient", "client.pem"),
            ] {
                let output = Command::new("openssl")
                    .args(["verify", "-CAfile", "ca.pem", "-purpose", purpose, cert])
                    .current_dir(&dir)
                    .output()?;
                assert!(
                    output.status.success(),
                    "{cert} for {purpose}: {}",
                    String::from_utf8_lossy(&output.stdout)
                );
            }
            let text = Command::new("openssl")
                .args([
                    "x509",
                    "-noout",
                    "-ext",
                    "subjectAltName",
                    "-in",
                    "node.pem",
                ])
                .current_dir(&dir)
                .output()?;
            let text = String::from_utf8_lossy(&text.stdout);
            assert!(
                text.contains("IP Address:127.0.0.1") && text.contains("DNS:localhost"),
                "{text}"
            );
            Ok(())
        })();
        let _ = fs::remove_dir_all(&dir);
        checked
    }
}
