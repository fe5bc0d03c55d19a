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
    #[arg(long, short, env = "KSTORE_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides one config key, e.g. `--set node-id=node-2` or
    /// `--set kafka.bootstrap.servers=127.0.0.1:9092`. Repeatable; wins over file and env.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
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
    let args = Args::parse();
    let env = std::env::vars().filter(|(name, _)| name != "KSTORE_CONFIG");
    let config = match NodeConfig::load(args.config.as_deref(), env, &args.overrides) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("kstore-node: {error}");
            return ExitCode::from(2);
        }
    };

    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(error) = signal_hook::flag::register(signal, shutdown.clone()) {
            eprintln!("kstore-node: cannot handle signal {signal}: {error}");
            return ExitCode::FAILURE;
        }
    }
    tracing::info!(node_id = %config.node_id, app_id = %config.app_id, "kstore-node starting");
    let processor = node::builtin_processor(&config);
    match node::run(config, processor, shutdown) {
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
