//! `kstore-node`: runs one kstore node with the built-in processor.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::Parser;
use kstore_server::config::NodeConfig;
use kstore_server::node;

/// Runs a kstore node: consumes the input topic into per-partition stores, exactly once.
#[derive(Debug, Parser)]
#[command(name = "kstore-node", version)]
struct Args {
    /// The TOML config file (see deploy/kstore-node.toml).
    #[arg(long, short, env = "KSTORE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Overrides one config key, e.g. `--set node-id=node-2` or
    /// `--set kafka.bootstrap.servers=127.0.0.1:9092`. Repeatable; wins over file and env.
    #[arg(long = "set", value_name = "KEY=VALUE", global = true)]
    overrides: Vec<String>,
    #[command(subcommand)]
    command: Option<NodeCommand>,
}

#[derive(Debug, clap::Subcommand)]
enum NodeCommand {
    /// Asks a running node's probe on its metrics port (for a container's HEALTHCHECK, which
    /// has no HTTP client): prints the answer, exits 0 if it passes and 1 if not.
    Probe {
        /// Which probe: `startup`, `ready` or `live`.
        #[arg(value_enum)]
        probe: Probe,
        /// The metrics port's address (default: the config's `metrics-address`, with
        /// 127.0.0.1 for an address that listens on every interface).
        #[arg(long)]
        address: Option<String>,
    },
    /// Point-in-time restore of one of the app's stores (after a processor wrote wrong values):
    /// every chosen partition goes back to its newest backup from at or before `--to`, and
    /// the group's input offsets are rewound to the offsets those backups recorded, so that
    /// the nodes, started again with a fixed processor, reprocess from there. The changelog
    /// gets a correction for every key written since, so that standbys and every later
    /// restore agree. Every node of the app must be stopped. Uses the node's config (topics,
    /// backup.dir, Kafka).
    Restore {
        /// The store to restore (default: the config's first store). The other stores are
        /// untouched.
        #[arg(long)]
        store: Option<String>,
        /// A UTC time (`2026-11-28T03:00:00Z`) or milliseconds since the epoch.
        #[arg(long, required_unless_present = "backup_id")]
        to: Option<String>,
        /// One backup by id, instead of a time (with exactly one partition).
        #[arg(long, conflicts_with = "to")]
        backup_id: Option<u32>,
        /// Only these partitions, comma-separated (default: all).
        #[arg(long, value_delimiter = ',')]
        partitions: Vec<u32>,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// The probes on the metrics port.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Probe {
    /// `/startupz`: the first assignment's stores are open.
    Startup,
    /// `/readyz`: answers reads within `probes.max-lag`.
    Ready,
    /// `/livez`: no loop stalled.
    Live,
}

/// Sends `GET path` to the metrics port and returns whether it answered 200, and its body.
fn ask(address: &str, path: &str) -> std::io::Result<(bool, String)> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let timeout = std::time::Duration::from_secs(5);
    let target = address
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("the address resolves to nothing"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let passed = answer.starts_with("HTTP/1.1 200");
    let body = answer
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_owned());
    Ok((passed, body))
}

fn probe(config_address: &str, address: Option<&str>, probe: Probe) -> ExitCode {
    let address = match address {
        Some(address) => address.to_owned(),
        None => match config_address.parse::<std::net::SocketAddr>() {
            Ok(mut bound) => {
                if bound.ip().is_unspecified() {
                    bound.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                bound.to_string()
            }
            Err(_) => {
                eprintln!("kstore-node probe: metrics-address is off; pass --address");
                return ExitCode::from(2);
            }
        },
    };
    let path = match probe {
        Probe::Startup => "/startupz",
        Probe::Ready => "/readyz",
        Probe::Live => "/livez",
    };
    match ask(&address, path) {
        Ok((passed, body)) => {
            print!("{body}");
            if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("kstore-node probe: GET http://{address}{path}: {error}");
            ExitCode::FAILURE
        }
    }
}

fn restore(
    config: &NodeConfig,
    to: Option<&str>,
    backup_id: Option<u32>,
    partitions: &[u32],
    dry_run: bool,
) -> ExitCode {
    use kstore_server::point_in_time::{self, RestorePoint};
    let point = match (to, backup_id) {
        (_, Some(id)) => RestorePoint::Backup(id),
        (Some(text), None) => match point_in_time::parse_time(text) {
            Ok(at) => RestorePoint::Time(at),
            Err(error) => {
                eprintln!("kstore-node restore: {error}");
                return ExitCode::from(2);
            }
        },
        (None, None) => unreachable!("clap requires --to or --backup-id"),
    };
    let plans = match point_in_time::plan(config, point, partitions) {
        Ok(plans) => plans,
        Err(error) => {
            eprintln!("kstore-node restore: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{:>9} {:>7} {:>15} {:>14} {:>14} {:>14} {:>12}",
        "partition", "backup", "made at (ms)", "changelog", "superseded", "input from", "reprocess"
    );
    for plan in &plans {
        println!(
            "{:>9} {:>7} {:>15} {:>14} {:>14} {:>14} {:>12}",
            plan.partition,
            plan.backup.backup_id,
            plan.backup.created_at_ms,
            plan.backup.changelog_next,
            (plan.changelog_end - plan.backup.changelog_next).max(0),
            plan.backup.input_next,
            plan.events_to_reprocess()
        );
    }
    let total: i64 = plans.iter().map(|p| p.events_to_reprocess()).sum();
    println!("events to reprocess: {total}");
    if dry_run {
        println!("dry run: nothing changed");
        return ExitCode::SUCCESS;
    }
    let scratch = config.state_dir.join(".point-in-time-restore");
    match point_in_time::execute(config, &plans, &scratch, |step| println!("{step}")) {
        Ok(_) => {
            let _ = std::fs::remove_dir_all(&scratch);
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("kstore-node restore: {error}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    use tracing_subscriber::prelude::*;
    // Chitchat warns once per dropped gossip message; the node counts them (unfiltered
    // layer) and reports them once per publish interval instead.
    let filter = tracing_subscriber::EnvFilter::try_from_env("KSTORE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,chitchat=error"));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::stdout().is_terminal())
                .with_filter(filter),
        )
        .with(kstore_server::gossip::transport::DropCounter)
        .init();
    // One rustls crypto provider for the process, before anything builds a TLS config.
    kstore_server::kafka::connect::install_crypto_provider();
    let args = Args::parse();
    if let Some(NodeCommand::Probe {
        probe: which,
        address: Some(address),
    }) = &args.command
    {
        return probe("", Some(address), *which);
    }
    let env = std::env::vars().filter(|(name, _)| name != "KSTORE_CONFIG");
    let config = match NodeConfig::load(args.config.as_deref(), env, &args.overrides) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("kstore-node: {error}");
            return ExitCode::from(2);
        }
    };

    if let Some(NodeCommand::Probe { probe: which, .. }) = &args.command {
        return probe(&config.metrics_address, None, *which);
    }
    if let Some(NodeCommand::Restore {
        store,
        to,
        backup_id,
        partitions,
        dry_run,
    }) = &args.command
    {
        let configs = config.store_configs();
        let chosen = match store {
            None => configs.first(),
            Some(name) => configs.iter().find(|c| &c.store == name),
        };
        let Some(chosen) = chosen else {
            let names: Vec<&str> = configs.iter().map(|c| c.store.as_str()).collect();
            eprintln!(
                "kstore-node restore: no store named {:?}; the config declares {}",
                store.as_deref().unwrap_or_default(),
                names.join(", ")
            );
            return ExitCode::from(2);
        };
        println!(
            "store {} (input {}, changelog {}, group {})",
            chosen.store,
            chosen.inputs().join(", "),
            chosen.changelog_topic(),
            chosen.group_id()
        );
        return restore(chosen, to.as_deref(), *backup_id, partitions, *dry_run);
    }

    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(error) = signal_hook::flag::register(signal, shutdown.clone()) {
            eprintln!("kstore-node: cannot handle signal {signal}: {error}");
            return ExitCode::FAILURE;
        }
    }
    tracing::info!(node_id = %config.node_id, app_id = %config.app_id, "kstore-node starting");
    let processors = match node::configured_processors(&config) {
        Ok(processors) => processors,
        Err((store, error)) if store == config.store => {
            eprintln!("kstore-node: {error}");
            return ExitCode::from(2);
        }
        Err((store, error)) => {
            eprintln!("kstore-node: store {store}: {error}");
            return ExitCode::from(2);
        }
    };
    kstore_server::tls::install_crypto_provider();
    match node::run_stores(config, processors, shutdown) {
        Ok(()) => {
            tracing::info!("kstore-node stopped cleanly");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(%error, "kstore-node stopped");
            eprintln!("kstore-node: {error}");
            ExitCode::FAILURE
        }
    }
}
