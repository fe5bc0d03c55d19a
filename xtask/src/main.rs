//! `cargo xtask`: kstore's developer and CI commands.
//!
//! - `setup` checks (and, running as root, installs) what the build needs beyond cargo;
//! - `kafka start|stop|status|logs` runs the local Apache Kafka broker;
//! - `test` runs everything CI runs: setup, fmt, clippy and every test against a real broker;
//! - `up | status | down` runs a local cluster: broker, nodes and a steady producer;
//! - `bench …` and `chaos …` build and run `kstore-bench`: benchmarks, and faults injected
//!   into a cluster under load.
//!
//! xtask is the first thing a newcomer compiles, before setup has installed libclang or a
//! C++ compiler, so nothing in its dependency tree builds native code (a test checks it).
//! Everything that does (RocksDB, librdkafka) is built by the commands, after setup.

mod build;
mod cluster;
mod setup;

use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use kstore_kafka::local::{BOOTSTRAP_ENV, Broker, DEFAULT_PORT, Started};
use setup::Scope;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "kstore's developer and CI commands")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Checks and, where it can, installs what the build needs that cargo cannot fetch.
    Setup,
    /// Runs the local Apache Kafka broker that development and tests use.
    Kafka {
        #[command(subcommand)]
        action: KafkaAction,
        /// The broker's client port (its controller listens on the next port).
        #[arg(long, global = true, default_value_t = DEFAULT_PORT)]
        port: u16,
    },
    /// Runs setup, `cargo fmt --check`, clippy and every test in the workspace against a
    /// real broker; this is what CI runs.
    Test {
        /// The port of the broker to start if `KSTORE_KAFKA_BOOTSTRAP` is unset.
        #[arg(long, default_value_t = DEFAULT_PORT)]
        port: u16,
        /// Extra arguments for `cargo test`, such as a test name filter.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Starts a local cluster: the broker, the `orders` topic, N nodes and a producer.
    Up(cluster::Up),
    /// Shows the local cluster: each node's partitions, roles and lag.
    Status,
    /// Stops everything `up` started.
    Down,
    /// Runs fault scenarios (kill -9, SIGSTOP, rolling restart, scale-out, scale-in) on a
    /// 3-node cluster with events flowing and reads through every node; reports what the
    /// reads saw and whether the final state is exact (`cargo xtask chaos --help`).
    #[command(disable_help_flag = true)]
    Chaos {
        /// Arguments for `kstore-bench chaos`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Runs a benchmark against the local broker: ingest, get, cluster, client, restore, scan,
    /// compare, or report, the suite in one run (`cargo xtask bench --help`).
    #[command(disable_help_flag = true)]
    Bench {
        /// The benchmark and its arguments, for `kstore-bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum KafkaAction {
    /// Starts the broker (or reuses a healthy one) and prints its bootstrap address last.
    Start,
    /// Stops the broker that `start` started on this port.
    Stop,
    /// Shows whether the broker answers, its pid and its Kafka version.
    Status,
    /// Prints the end of the broker's log.
    Logs {
        /// How many lines to print.
        #[arg(long, short = 'n', default_value_t = 200)]
        lines: usize,
        /// Keep printing as the log grows.
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Task::Setup => setup::run(Scope::Everything),
        Task::Kafka { action, port } => kafka(action, Broker::on_port(port)),
        Task::Test {
            port,
            cargo_test_args,
        } => test(port, &cargo_test_args),
        Task::Up(up) => {
            setup::run(Scope::Cluster)?;
            cluster::up(&up)
        }
        Task::Status => cluster::status(),
        Task::Down => cluster::down(),
        Task::Chaos { args } => {
            let mut forwarded = vec!["chaos".to_owned()];
            forwarded.extend(args);
            bench(&forwarded)
        }
        Task::Bench { args } => bench(&args),
    }
}

/// Runs setup, builds `kstore-bench` with the binaries it starts, and runs it with `args`.
fn bench(args: &[String]) -> Result<()> {
    setup::run(Scope::Everything)?;
    let bin = build::binaries(&["kstore-server", "kstore-cli", "kstore-bench"])?;
    let status = Command::new(bin.join("kstore-bench"))
        .args(args)
        .status()
        .context("running kstore-bench")?;
    if !status.success() {
        bail!("kstore-bench {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn kafka(action: KafkaAction, broker: Broker) -> Result<()> {
    match action {
        KafkaAction::Start => {
            match broker.start()? {
                Started::New => eprintln!(
                    "started a Kafka broker; its log is {}",
                    broker.log_file().display()
                ),
                Started::Reused => eprintln!("a healthy Kafka broker is already running"),
            }
            println!("{}", broker.bootstrap());
        }
        KafkaAction::Stop => {
            if broker.stop()? {
                println!("stopped the Kafka broker on {}", broker.bootstrap());
            } else {
                println!(
                    "no Kafka broker started by kstore runs on {}",
                    broker.bootstrap()
                );
            }
        }
        KafkaAction::Status => {
            let status = broker.status();
            println!("bootstrap: {}", status.bootstrap);
            println!("healthy:   {}", if status.healthy { "yes" } else { "no" });
            match status.pid {
                Some(pid) => println!("pid:       {pid} (started by kstore)"),
                None => println!("pid:       none started by kstore"),
            }
            match status.version {
                Some(version) => println!("version:   Apache Kafka {version}"),
                None => println!("version:   unknown"),
            }
            println!("log:       {}", status.log_file.display());
            if !status.healthy {
                bail!("no healthy Kafka broker on {}", status.bootstrap);
            }
        }
        KafkaAction::Logs { lines, follow } => {
            let mut tail = Command::new("tail");
            tail.arg("-n").arg(lines.to_string());
            if follow {
                tail.arg("-F");
            }
            let status = tail
                .arg(broker.log_file())
                .status()
                .context("running tail")?;
            if !status.success() {
                bail!("tail failed on {}", broker.log_file().display());
            }
        }
    }
    Ok(())
}

fn test(port: u16, cargo_test_args: &[String]) -> Result<()> {
    setup::run(Scope::Everything)?;
    cargo(&["fmt", "--all", "--check"])?;
    // Every feature (the client's `tls` among them), then the client alone without its
    // features, as a user who does not ask for TLS builds it.
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&[
        "clippy",
        "-p",
        "kstore-client",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;

    // A broker named by the environment belongs to someone else; otherwise start (or reuse)
    // the local one, holding a lease so that even a killed test run leaves no broker behind.
    let external = std::env::var(BOOTSTRAP_ENV).ok();
    let broker = Broker::on_port(port);
    let (bootstrap, started_here, _lease) = match external {
        Some(bootstrap) => (bootstrap, false, None),
        None => {
            let (started, lease) = broker.start_leased()?;
            (broker.bootstrap(), started == Started::New, Some(lease))
        }
    };
    eprintln!("testing against the Kafka broker at {bootstrap}");

    let mut args = vec!["test", "--workspace"];
    args.extend(cargo_test_args.iter().map(String::as_str));
    let result = Command::new(cargo_path())
        .args(&args)
        .env(BOOTSTRAP_ENV, &bootstrap)
        .status()
        .context("running cargo test");

    if started_here {
        broker
            .stop()
            .context("stopping the Kafka broker this run started")?;
    }
    let status = result?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    let status = Command::new(cargo_path())
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn cargo_path() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}
