//! `kstore`: the kstore command line.

use std::process::ExitCode;

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kstore_cli::backup;
use kstore_cli::generator::{DEFAULT_START_MS, GeneratorConfig};
use kstore_cli::keys::KeyFormat;
use kstore_cli::produce::{ProduceOptions, produce};
use kstore_cli::status;
use kstore_cli::values::Values;
use kstore_cli::view;
use kstore_client::{
    Answer, Client, Hedge, ReadError, ReadOptions, ReadPolicy, Scan, ScanPage, ScanToken,
};
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(name = "kstore", version, about = "The kstore command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the cluster is and what to read.
#[derive(Debug, Args)]
struct Connect {
    /// gRPC addresses of nodes to learn the cluster from, comma-separated.
    #[arg(
        long,
        env = "KSTORE_SEEDS",
        value_delimiter = ',',
        default_value = "127.0.0.1:25051"
    )]
    seeds: Vec<String>,
    /// The store.
    #[arg(long, default_value = "features")]
    store: String,
    /// Print JSON (one object per line) instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: TlsArgs,
}

/// TLS to the nodes: set any of these and every node is dialed with https.
#[derive(Debug, Args)]
struct TlsArgs {
    /// The CA (PEM) that signs the nodes' certificates; without it, with --cert, the
    /// system's root certificates are trusted.
    #[arg(long, env = "KSTORE_CA", value_name = "PEM")]
    ca: Option<std::path::PathBuf>,
    /// The client certificate (PEM) to present, for nodes that require one (mutual TLS).
    #[arg(
        long = "cert",
        id = "tls_cert",
        value_name = "PEM",
        env = "KSTORE_CERT",
        requires = "tls_key"
    )]
    cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    // Not `key`: that is `get`'s positional argument.
    #[arg(
        long = "key",
        id = "tls_key",
        value_name = "PEM",
        env = "KSTORE_KEY",
        requires = "tls_cert"
    )]
    key: Option<std::path::PathBuf>,
}

impl TlsArgs {
    /// The client's TLS settings, if any flag is set.
    fn config(&self) -> Result<Option<tonic::transport::ClientTlsConfig>, String> {
        if self.ca.is_none() && self.cert.is_none() && self.key.is_none() {
            return Ok(None);
        }
        kstore_client::tls_from_files(
            self.ca.as_deref(),
            self.cert.as_deref(),
            self.key.as_deref(),
        )
        .map(Some)
        .map_err(|error| error.to_string())
    }
}

/// How reads are routed.
#[derive(Debug, Args)]
struct Routing {
    /// Which copies may answer.
    #[arg(long, value_enum, default_value_t = Policy::PreferActive)]
    policy: Policy,
    /// The most input records a copy other than the active may lag.
    #[arg(long, default_value_t = 10_000)]
    max_lag: i64,
    /// Send the read to the next copy too if the first has not answered after this many
    /// milliseconds (0: no hedging). Unset: after the 99th percentile of the latency seen
    /// so far, between 5 and 50 ms. Either way, a copy that has not answered within its
    /// share of the timeout (half, with one other copy) gets the next copy asked too.
    #[arg(long)]
    hedge_ms: Option<u64>,
    /// How long a read may take, in milliseconds.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,
}

/// How keys are written on the command line and printed.
#[derive(Debug, Args)]
struct KeyArgs {
    /// How the keys given here are written and how keys print: text (UTF-8), hex or base64
    /// (for binary keys, such as composite or integer keys).
    #[arg(long, value_enum, default_value_t = KeyFormat::Text)]
    key_format: KeyFormat,
}

/// What a scan reads.
#[derive(Debug, Args)]
struct ScanArgs {
    /// The keys that start with this prefix.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    prefix: Option<String>,
    /// The first key of the range.
    #[arg(long)]
    from: Option<String>,
    /// The first key past the range.
    #[arg(long)]
    to: Option<String>,
    /// Largest key first.
    #[arg(long)]
    descending: bool,
    /// One partition only.
    #[arg(long)]
    partition: Option<u32>,
    /// Keys per page (1 to 10000).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Continue after the page that printed this token (the range comes from the token).
    #[arg(long, conflicts_with_all = ["prefix", "from", "to", "descending", "partition"])]
    token: Option<String>,
    /// Read every page to the end, not only one.
    #[arg(long)]
    all: bool,
    /// With --all, how long a page that fails is asked again, in milliseconds (from the
    /// same token: no key is repeated or missed).
    #[arg(long, default_value_t = 30_000)]
    retry_ms: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Policy {
    ActiveOnly,
    PreferActive,
    AnyReplica,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Reads one key: its value, who answered, and how fresh it is.
    Get {
        #[command(flatten)]
        connect: Connect,
        #[command(flatten)]
        routing: Routing,
        #[command(flatten)]
        keys: KeyArgs,
        /// The key (a customer id for the built-in processor).
        key: String,
        /// Read-your-writes: the answer must reflect this input offset of the key's
        /// partition.
        #[arg(long)]
        min_input_offset: Option<i64>,
        /// Also print the routing decision: partition, plan, hosts tried, who answered.
        #[arg(long)]
        explain: bool,
    },
    /// Reads many keys at once (one MultiGet per node that holds some of them).
    Mget {
        #[command(flatten)]
        connect: Connect,
        #[command(flatten)]
        routing: Routing,
        #[command(flatten)]
        format: KeyArgs,
        /// The keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Reads keys in key order, a page at a time: the keys with a prefix or in [from, to),
    /// over the whole store (its partitions merged) or one partition. Each page ends with a
    /// token; give it to --token for the next page.
    Scan {
        #[command(flatten)]
        connect: Connect,
        #[command(flatten)]
        routing: Routing,
        #[command(flatten)]
        keys: KeyArgs,
        #[command(flatten)]
        scan: ScanArgs,
    },
    /// Shows the cluster: every node, and each partition's copies with their lag.
    Metadata {
        #[command(flatten)]
        connect: Connect,
    },
    /// Shows the cluster view again whenever it changes, until interrupted.
    Watch {
        #[command(flatten)]
        connect: Connect,
    },
    /// Shows every live node's copies as its Admin PartitionStatus states them: role,
    /// input position, lag, keys, size on disk, current module and error (a failed copy's,
    /// or why a held copy's input waits). Fails if a node does not answer (or is suspect)
    /// or a copy has an error.
    Status {
        #[command(flatten)]
        connect: AdminConnect,
    },
    /// Backs up, lists and verifies the stores' backups (Admin calls).
    Backup {
        #[command(subcommand)]
        action: BackupAction,
    },
    /// Point-in-time restore: runs `kstore-node restore` (beside this binary, or on the
    /// PATH) with these arguments, since it needs the node's config and RocksDB. For
    /// example: `kstore restore -c node.toml --to 2026-11-28T03:00:00Z --dry-run`.
    #[command(disable_help_flag = true)]
    Restore {
        /// Arguments for `kstore-node restore` (`--help` shows them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
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
        /// Customers take turns instead of being drawn at random: --count equal to
        /// --customers fills a store with exactly that many keys.
        #[arg(long)]
        customers_in_turn: bool,
    },
}

/// Where the Admin calls go.
#[derive(Debug, Args)]
struct AdminConnect {
    /// gRPC addresses of nodes, comma-separated; the first that answers is used.
    #[arg(
        long,
        env = "KSTORE_SEEDS",
        value_delimiter = ',',
        default_value = "127.0.0.1:25051"
    )]
    seeds: Vec<String>,
    /// The nodes' admin token, if they require one.
    #[arg(long, env = "KSTORE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Only this store (default: every store the nodes serve).
    #[arg(long)]
    store: Option<String>,
    /// Only these partitions, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    partitions: Vec<u32>,
    /// How long one call may take, in seconds (a backup of a large store takes a while).
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum BackupAction {
    /// Backs up every partition now, each once: every live node backs up the partitions it
    /// is the backup source of (the least-lagging live standby, else the active).
    Create {
        #[command(flatten)]
        connect: AdminConnect,
    },
    /// Lists the backups in the catalog, oldest first per partition.
    List {
        #[command(flatten)]
        connect: AdminConnect,
    },
    /// Re-reads every file of the backups and checks its checksum; fails if any is damaged.
    Verify {
        #[command(flatten)]
        connect: AdminConnect,
        /// One backup (with exactly one --partitions), instead of all.
        #[arg(long, default_value_t = 0)]
        backup_id: u32,
    },
}

fn main() -> ExitCode {
    let Cli { command } = Cli::parse();
    // A reader that stops early (`kstore scan --all | head`) ends this process quietly, as
    // it would any Unix tool, rather than making a print panic on the broken pipe.
    let _ = signal_hook::flag::register_conditional_default(
        signal_hook::consts::SIGPIPE,
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
    );
    // One crypto provider for the whole process (rustls panics when it must pick one of
    // several linked in).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let read = |connect: &Connect, routing: Option<&Routing>, work| -> ExitCode {
        let runtime = match tokio::runtime::Runtime::new() {
            Ok(runtime) => runtime,
            Err(error) => {
                eprintln!("kstore: starting the runtime: {error}");
                return ExitCode::FAILURE;
            }
        };
        runtime.block_on(async {
            match connect_client(connect, routing).await {
                Ok(client) => run_read(&client, connect, work).await,
                Err(error) => {
                    eprintln!("kstore: {error}");
                    ExitCode::FAILURE
                }
            }
        })
    };
    match command {
        Command::Get {
            connect,
            routing,
            keys,
            key,
            min_input_offset,
            explain,
        } => read(
            &connect,
            Some(&routing),
            Work::Get {
                key,
                format: keys.key_format,
                min_input_offset,
                explain,
            },
        ),
        Command::Mget {
            connect,
            routing,
            format,
            keys,
        } => read(
            &connect,
            Some(&routing),
            Work::Mget {
                keys,
                format: format.key_format,
            },
        ),
        Command::Scan {
            connect,
            routing,
            keys,
            scan,
        } => read(&connect, Some(&routing), Work::Scan(scan, keys.key_format)),
        Command::Metadata { connect } => read(&connect, None, Work::Metadata),
        Command::Watch { connect } => read(&connect, None, Work::Watch),
        Command::Restore { args } => {
            let beside = std::env::current_exe()
                .ok()
                .and_then(|exe| Some(exe.parent()?.join("kstore-node")))
                .filter(|path| path.exists());
            let program = beside.unwrap_or_else(|| "kstore-node".into());
            match std::process::Command::new(&program)
                .arg("restore")
                .args(&args)
                .status()
            {
                Ok(status) if status.success() => ExitCode::SUCCESS,
                Ok(status) => ExitCode::from(status.code().unwrap_or(1).clamp(1, 255) as u8),
                Err(error) => {
                    eprintln!(
                        "kstore restore: cannot run {}: {error} (build it with `cargo build -p \
                         kstore-server`)",
                        program.display()
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status { connect } => match tokio::runtime::Runtime::new() {
            Ok(runtime) => runtime.block_on(run_status(connect)),
            Err(error) => {
                eprintln!("kstore: starting the runtime: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Backup { action } => match tokio::runtime::Runtime::new() {
            Ok(runtime) => runtime.block_on(run_backup(action)),
            Err(error) => {
                eprintln!("kstore: starting the runtime: {error}");
                ExitCode::FAILURE
            }
        },
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
            customers_in_turn,
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
                    customers_in_turn,
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

/// What a read command does once connected.
enum Work {
    Get {
        key: String,
        format: KeyFormat,
        min_input_offset: Option<i64>,
        explain: bool,
    },
    Mget {
        keys: Vec<String>,
        format: KeyFormat,
    },
    Scan(ScanArgs, KeyFormat),
    Metadata,
    Watch,
}

async fn connect_client(connect: &Connect, routing: Option<&Routing>) -> Result<Client, String> {
    let mut builder = Client::builder()
        .seeds(connect.seeds.clone())
        .store(connect.store.clone());
    if let Some(routing) = routing {
        let policy = match routing.policy {
            Policy::ActiveOnly => ReadPolicy::ActiveOnly,
            Policy::PreferActive => ReadPolicy::PreferActive {
                max_lag: routing.max_lag,
            },
            Policy::AnyReplica => ReadPolicy::AnyReplica {
                max_lag: routing.max_lag,
            },
        };
        builder = builder
            .read_policy(policy)
            .request_timeout(Duration::from_millis(routing.timeout_ms));
        match routing.hedge_ms {
            None => {}
            Some(0) => builder = builder.hedge(Hedge::Off),
            Some(ms) => builder = builder.hedge(Hedge::After(Duration::from_millis(ms))),
        }
    }
    if let Some(tls) = connect.tls.config()? {
        builder = builder.tls(tls);
    }
    builder.build().await.map_err(|error| error.to_string())
}

async fn run_read(client: &Client, connect: &Connect, work: Work) -> ExitCode {
    let values = match &work {
        Work::Get { .. } | Work::Mget { .. } | Work::Scan(..) => {
            match describe_values(client, connect).await {
                Ok(values) => values,
                Err(error) => {
                    eprintln!("kstore: values print as bytes: {error}");
                    Values::guessed()
                }
            }
        }
        Work::Metadata | Work::Watch => Values::guessed(),
    };
    match work {
        Work::Get {
            key,
            format,
            min_input_offset,
            explain,
        } => {
            let options = ReadOptions {
                min_input_offset,
                ..ReadOptions::default()
            };
            let bytes = match format.parse(&key) {
                Ok(bytes) => bytes,
                Err(error) => return bad_key(&error),
            };
            match client.get_with(&bytes, &options).await {
                Ok(answer) => {
                    print_answer(&key, &answer, &values, connect.json);
                    if explain && !connect.json {
                        print!("{}", view::format_route(&answer));
                    }
                    ExitCode::SUCCESS
                }
                Err(error) => read_failed(&key, &error),
            }
        }
        Work::Mget { keys, format } => {
            let bytes: Result<Vec<Vec<u8>>, String> =
                keys.iter().map(|key| format.parse(key)).collect();
            let bytes = match bytes {
                Ok(bytes) => bytes,
                Err(error) => return bad_key(&error),
            };
            let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
            let mut failed = false;
            for (key, result) in keys.iter().zip(client.multi_get(&refs).await) {
                match result {
                    Ok(answer) => print_answer(key, &answer, &values, connect.json),
                    Err(error) => {
                        failed = true;
                        read_failed(key, &error);
                    }
                }
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Work::Scan(scan, format) => run_scan(client, &scan, format, &values, connect.json).await,
        Work::Metadata => {
            let view = client.view();
            if connect.json {
                println!("{}", view::view_json(&view));
            } else {
                print!("{}", view::format_view(&view, "the client's view"));
            }
            ExitCode::SUCCESS
        }
        Work::Watch => {
            let mut shown = None;
            loop {
                let view = client.view();
                if shown != Some((view.version, view.nodes.clone())) {
                    if connect.json {
                        println!("{}", view::view_json(&view));
                    } else {
                        println!("{}", view::format_view(&view, "the client's view"));
                    }
                    shown = Some((view.version, view.nodes.clone()));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

fn print_answer(key: &str, answer: &Answer<Vec<u8>>, values: &Values, json: bool) {
    let value = values.json(answer.value.as_deref());
    if json {
        println!("{}", view::answer_json(key, answer, value));
        return;
    }
    let read = &answer.read;
    println!(
        "{key}: partition {}, answered by {} ({}, input offset {}, lag {})",
        read.partition,
        read.node_id,
        view::role_name(read.role),
        read.input_offset,
        read.lag
    );
    match value {
        Value::Null => println!("  not found"),
        value => println!(
            "  {}",
            serde_json::to_string_pretty(&value)
                .unwrap_or_default()
                .replace('\n', "\n  ")
        ),
    }
}

/// How the store's values print: as the type the cluster's Metadata names, described by the
/// first seed whose reflection answers.
async fn describe_values(client: &Client, connect: &Connect) -> Result<Values, String> {
    let value_type = client.store_shape().value_type;
    let tls = connect.tls.config()?;
    let mut failures = Vec::new();
    for seed in &connect.seeds {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{seed}"))
            .map_err(|error| format!("{seed}: {error}"))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10));
        let endpoint = match &tls {
            Some(tls) => endpoint
                .tls_config(tls.clone())
                .map_err(|error| format!("{seed}: {error}"))?,
            None => endpoint,
        };
        match Values::described(endpoint.connect_lazy(), &value_type).await {
            Ok(values) => return Ok(values),
            Err(error) => failures.push(format!("{seed}: {error}")),
        }
    }
    Err(failures.join("; "))
}

/// Prints pages of a scan: one, or with `--all` every one to the end, asking a failed page
/// again from the same token until `--retry-ms` has passed.
async fn run_scan(
    client: &Client,
    args: &ScanArgs,
    format: KeyFormat,
    values: &Values,
    json: bool,
) -> ExitCode {
    let mut token = match &args.token {
        Some(text) => match text.parse::<ScanToken>() {
            Ok(token) => Some(token),
            Err(error) => {
                eprintln!("kstore scan: --token: {error}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let key = |written: &Option<String>| format.parse(written.as_deref().unwrap_or_default());
    let scan = match (&args.prefix, &args.from, &args.to) {
        (Some(_), _, _) => key(&args.prefix).map(Scan::prefix),
        (None, None, None) => Ok(Scan::all()),
        (None, from, to) => key(from).and_then(|from| Ok(Scan::range(from, key(to)?))),
    };
    let mut scan = match scan {
        Ok(scan) => scan,
        Err(error) => return bad_key(&error),
    };
    if args.descending {
        scan = scan.descending();
    }
    if let Some(partition) = args.partition {
        scan = scan.partition(partition);
    }
    let mut keys = 0usize;
    loop {
        let mut failing_since = None;
        let page = loop {
            let page = match &token {
                Some(token) => {
                    client
                        .scan_next(token, args.limit, &ReadOptions::default())
                        .await
                }
                None => client.scan(&scan, args.limit).await,
            };
            match page {
                Ok(page) => break page,
                Err(error) => {
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    let retriable = error.partition().is_some();
                    if !args.all
                        || !retriable
                        || since.elapsed() >= Duration::from_millis(args.retry_ms)
                    {
                        eprintln!("kstore scan: {error}");
                        if let Some(token) = &token {
                            eprintln!("kstore scan: resume with --token {token}");
                        }
                        return ExitCode::FAILURE;
                    }
                    eprintln!("kstore scan: {error} (asking again)");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        keys += page.entries.len();
        print_page(&page, format, values, json);
        match page.next {
            Some(next) if args.all => token = Some(next),
            _ => break,
        }
    }
    if !json {
        eprintln!("kstore scan: {keys} keys");
    }
    ExitCode::SUCCESS
}

/// Prints a page's keys, one per line, then what it read and where the next page starts.
fn print_page(page: &ScanPage, format: KeyFormat, values: &Values, json: bool) {
    for entry in &page.entries {
        let key = format.print(&entry.key);
        let value = values.json(Some(&entry.value));
        if json {
            println!(
                "{}",
                serde_json::json!({"key": key, "partition": entry.partition, "value": value})
            );
        } else {
            println!("{key}\t{value}");
        }
    }
    let next = page.next.as_ref().map(ToString::to_string);
    if json {
        let reads: Vec<Value> = page.reads.iter().map(view::read_json).collect();
        println!(
            "{}",
            serde_json::json!({"page": {"keys": page.entries.len(), "reads": reads, "next": next}})
        );
    } else {
        let behind = page.reads.iter().map(|read| read.lag).max().unwrap_or(0);
        match next {
            Some(token) => eprintln!(
                "kstore scan: {} keys (most lag {behind}); next page: --token {token}",
                page.entries.len()
            ),
            None => eprintln!(
                "kstore scan: {} keys (most lag {behind}); the scan is complete",
                page.entries.len()
            ),
        }
    }
}

/// A key given that is not written as `--key-format` says: exit status 2.
fn bad_key(error: &str) -> ExitCode {
    eprintln!("kstore: a key is not as --key-format says: {error}");
    ExitCode::from(2)
}

fn read_failed(key: &str, error: &ReadError) -> ExitCode {
    eprintln!("kstore: reading {key}: {error}");
    ExitCode::FAILURE
}

impl AdminConnect {
    fn target(&self) -> Result<backup::AdminTarget, String> {
        Ok(backup::AdminTarget {
            seeds: self.seeds.clone(),
            token: self.admin_token.clone(),
            timeout: Duration::from_secs(self.timeout_s),
            tls: self.tls.config()?,
        })
    }
}

async fn run_status(connect: AdminConnect) -> ExitCode {
    let target = match connect.target() {
        Ok(target) => target,
        Err(error) => {
            eprintln!("kstore status: {error}");
            return ExitCode::FAILURE;
        }
    };
    let store = connect.store.clone().unwrap_or_default();
    let nodes = match status::collect(&target, &store, &connect.partitions).await {
        Ok(nodes) => nodes,
        Err(error) => {
            eprintln!("kstore status: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut ok = true;
    if !connect.json {
        println!("{}", status::status_header());
    }
    for (node_id, answer) in &nodes {
        match answer {
            Ok(copies) => {
                for copy in copies {
                    ok &= copy.copy.as_ref().is_none_or(|c| c.error.is_empty());
                    if connect.json {
                        println!("{}", status_json(node_id, copy));
                    } else {
                        println!("{}", status::format_copy(node_id, copy));
                    }
                }
            }
            Err(error) => {
                ok = false;
                eprintln!("kstore status: asking {node_id}: {error}");
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn status_json(node_id: &str, status: &kstore_proto::v1::StoreStatus) -> Value {
    let copy = status.copy.clone().unwrap_or_default();
    serde_json::json!({
        "node_id": node_id,
        "store": status.store,
        "partition": copy.partition,
        "role": view::role_name(copy.role()),
        "input_offset": copy.input_offset,
        "lag": copy.lag,
        "changelog_offset": copy.changelog_offset,
        "estimated_keys": status.estimated_keys,
        "size_on_disk_bytes": status.size_on_disk_bytes,
        "modules": status.modules.iter().map(|m| serde_json::json!({
            "from_input_offset": m.from_input_offset,
            "sha256": m.sha256,
        })).collect::<Vec<_>>(),
        "error": copy.error,
    })
}

async fn run_backup(action: BackupAction) -> ExitCode {
    let connect = match &action {
        BackupAction::Create { connect }
        | BackupAction::List { connect }
        | BackupAction::Verify { connect, .. } => connect,
    };
    let target = match connect.target() {
        Ok(target) => target,
        Err(error) => {
            eprintln!("kstore backup: {error}");
            return ExitCode::FAILURE;
        }
    };
    let (json, partitions) = (connect.json, connect.partitions.clone());
    let store = connect.store.clone().unwrap_or_default();
    let outcome = match action {
        BackupAction::Create { .. } => backup_create(&target, &store, &partitions, json).await,
        BackupAction::List { .. } => backup_list(&target, &store, &partitions, json).await,
        BackupAction::Verify { backup_id, .. } => {
            backup_verify(&target, &store, &partitions, backup_id, json).await
        }
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("kstore backup: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn backup_json(info: &kstore_proto::v1::BackupInfo) -> Value {
    serde_json::json!({
        "partition": info.partition,
        "backup_id": info.backup_id,
        "app": info.app,
        "store": info.store,
        "partition_count": info.partition_count,
        "changelog_offset": info.changelog_offset,
        "input_offset": info.input_offset,
        "node_id": info.node_id,
        "source_role": view::role_name(info.source_role()),
        "created_at_ms": info.created_at_ms,
        "size_bytes": info.size_bytes,
        "added_bytes": info.added_bytes,
        "file_count": info.file_count,
    })
}

async fn backup_create(
    target: &backup::AdminTarget,
    store: &str,
    partitions: &[u32],
    json: bool,
) -> anyhow::Result<bool> {
    let summary = backup::create(target, store, partitions).await?;
    let mut ok = summary.missing.is_empty();
    if !json {
        println!("{}", backup::backup_header());
    }
    for (node_id, answer) in &summary.answers {
        match answer {
            Ok(answer) => {
                for info in &answer.backups {
                    if json {
                        println!("{}", backup_json(info));
                    } else {
                        println!("{}", backup::format_backup(info));
                    }
                }
                for failed in &answer.failed {
                    ok = false;
                    eprintln!(
                        "kstore backup: {node_id} could not back up partition {} of store {}: {}",
                        failed.partition, failed.store, failed.error
                    );
                }
            }
            Err(error) => {
                ok = false;
                eprintln!("kstore backup: asking {node_id}: {error}");
            }
        }
    }
    if !summary.missing.is_empty() {
        let missing: Vec<String> = summary
            .missing
            .iter()
            .map(|(store, partition)| format!("{store}/{partition}"))
            .collect();
        eprintln!(
            "kstore backup: no node backed up {} (store/partition: no live copy, or a \
             restoring one)",
            missing.join(", ")
        );
    }
    Ok(ok)
}

async fn backup_list(
    target: &backup::AdminTarget,
    store: &str,
    partitions: &[u32],
    json: bool,
) -> anyhow::Result<bool> {
    let (location, backups) = backup::list(target, store, partitions).await?;
    if json {
        for info in &backups {
            println!("{}", backup_json(info));
        }
        return Ok(true);
    }
    println!("backups at {location}: {}", backups.len());
    println!("{}", backup::backup_header());
    for info in &backups {
        println!("{}", backup::format_backup(info));
    }
    Ok(true)
}

async fn backup_verify(
    target: &backup::AdminTarget,
    store: &str,
    partitions: &[u32],
    backup_id: u32,
    json: bool,
) -> anyhow::Result<bool> {
    let answer = backup::verify(target, store, partitions, backup_id).await?;
    let mut ok = true;
    for result in &answer.results {
        ok &= result.ok;
        let info = result.backup.clone().unwrap_or_default();
        if json {
            let mut value = backup_json(&info);
            value["ok"] = Value::from(result.ok);
            value["files_checked"] = Value::from(result.files_checked);
            value["bytes_checked"] = Value::from(result.bytes_checked);
            value["problems"] = Value::from(result.problems.clone());
            println!("{value}");
            continue;
        }
        println!(
            "store {} partition {} backup {}: {} ({} files, {})",
            info.store,
            info.partition,
            info.backup_id,
            if result.ok { "ok" } else { "DAMAGED" },
            result.files_checked,
            backup::format_bytes(result.bytes_checked)
        );
        for problem in &result.problems {
            println!("  {problem}");
        }
    }
    if answer.results.is_empty() {
        eprintln!("kstore backup: no backups to verify");
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn tls_flags_reach_every_read_command() {
        let cli = Cli::try_parse_from([
            "kstore",
            "get",
            "--ca",
            "ca.pem",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
            "customer-1",
        ])
        .unwrap();
        let Command::Get { connect, key, .. } = cli.command else {
            panic!("not get");
        };
        assert_eq!(key, "customer-1");
        assert_eq!(
            connect.tls.key.as_deref(),
            Some(std::path::Path::new("k.pem"))
        );
        assert!(connect.tls.config().unwrap_err().contains("ca.pem"));
        assert!(
            Cli::try_parse_from(["kstore", "metadata", "--cert", "c.pem"]).is_err(),
            "a certificate without its key"
        );
    }
}
