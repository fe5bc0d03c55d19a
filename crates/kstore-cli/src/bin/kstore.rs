//! `kstore`: the kstore command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kstore_cli::generator::{DEFAULT_START_MS, GeneratorConfig};
use kstore_cli::produce::{ProduceOptions, produce};

#[derive(Debug, Parser)]
#[command(name = "kstore", version, about = "The kstore command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sends deterministic order events (JSON, keyed by customer id) to a topic.
    Produce {
        /// Kafka's bootstrap servers.
        #[arg(long, env = "KSTORE_BOOTSTRAP", default_value = "127.0.0.1:39092")]
        bootstrap: String,
        /// The input topic.
        #[arg(long, default_value = "orders")]
        topic: String,
        /// How many events to send.
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        /// How many of the generator's first events to leave out (to continue a run).
        #[arg(long, default_value_t = 0)]
        skip: u64,
        /// Events per second; 0 sends as fast as possible.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// How many customers the events spread over.
        #[arg(long, default_value_t = 5_000)]
        customers: u32,
        /// Every N-th customer abuses the free-delivery subscription; 0 for none.
        #[arg(long, default_value_t = 50)]
        abuser_every: u32,
        /// The random seed: the same seed gives the same events.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Event time of the first event, in ms since the epoch.
        #[arg(long, default_value_t = DEFAULT_START_MS)]
        start_ms: i64,
        /// Event time advance per event, in ms.
        #[arg(long, default_value_t = 3_000)]
        step_ms: i64,
    },
}

fn main() -> ExitCode {
    let Cli { command } = Cli::parse();
    match command {
        Command::Produce {
            bootstrap,
            topic,
            count,
            skip,
            rate,
            customers,
            abuser_every,
            seed,
            start_ms,
            step_ms,
        } => {
            if customers == 0 {
                eprintln!("kstore produce: --customers must be at least 1");
                return ExitCode::from(2);
            }
            let options = ProduceOptions {
                bootstrap,
                topic,
                count,
                skip,
                rate,
                generator: GeneratorConfig {
                    seed,
                    customers,
                    abuser_every,
                    start_ms,
                    step_ms,
                },
                kafka: Vec::new(),
            };
            match produce(&options) {
                Ok(summary) => {
                    let seconds = summary.elapsed.as_secs_f64();
                    println!(
                        "delivered {} events to {} in {:.1}s ({:.0} events/s)",
                        summary.delivered,
                        options.topic,
                        seconds,
                        summary.delivered as f64 / seconds.max(1e-9)
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("kstore produce: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
