//! Chaos: a cluster of `kstore-node` processes with order events flowing at a fixed rate, a
//! reader that asks every node in turn for a fixed set of customers, and one fault injected
//! on a schedule: `kill -9`, SIGSTOP, a rolling restart, scale-out or scale-in (a drain).
//! The report says what the reader saw (reads issued and answered, the longest time any one
//! key went without an answer, read latency during the fault, the largest lag an answer
//! stated) and whether every customer's final state equals a recomputation from the events
//! sent.
//!
//! The reader behaves as any client that knows the nodes' addresses: each read tries one
//! node, and the next if that one does not answer within [`ATTEMPT_TIMEOUT`] (a paused
//! node accepts connections but never answers).

mod disk;
mod nemesis;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kstore_cli::generator::{GeneratorConfig, OrderGenerator};
use kstore_cli::produce::{ProduceOptions, produce_with_acks};
use kstore_core::cluster::{ClusterView, Liveness, NodeStatus, Role};
use kstore_core::partitioner::partition_for_key;
use kstore_proto::v1::admin_client::AdminClient;
use kstore_proto::v1::query_client::QueryClient;
use kstore_proto::v1::{CustomerFeatures, DrainRequest, GetRequest, MetadataRequest, get_response};
use prost::Message as _;
use tonic::transport::{Channel, Endpoint};

use crate::TestKafka;
use crate::audit::{Answer, Audit, audit};
use crate::process::TestProcess;

/// How long one attempt of a read waits for a node before it asks the next.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(250);

/// How long a read may take, all attempts included, before it counts as failed.
pub const READ_BUDGET: Duration = Duration::from_secs(2);

/// The fault a scenario injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// `kill -9` of one node; it stays dead.
    Kill,
    /// SIGSTOP of one node for a while, then SIGCONT.
    Pause,
    /// Every node in turn stops (SIGTERM) and starts again within the session timeout, for
    /// [`RollingOptions::rounds`] rounds at [`RollingOptions::pace`]; the assignment must be
    /// the same after every round as before it.
    RollingRestart,
    /// A fourth node joins.
    ScaleOut,
    /// One of four nodes is drained (Admin Drain) and stops.
    ScaleIn,
    /// One node's disk fills up (a tmpfs state directory) for a while, then has room again.
    FullDisk,
    /// A byte flips in a file of one of a node's copies while it runs.
    DamageCopy,
    /// A randomized nemesis ([`SoakOptions`]): kill -9, SIGSTOP, rolling restarts,
    /// scale-out and scale-in, damaged copies and full disks, one after another.
    Random,
}

impl Fault {
    /// Every fault, in the order `--scenario all` runs them.
    pub const ALL: [Fault; 7] = [
        Fault::Kill,
        Fault::Pause,
        Fault::RollingRestart,
        Fault::ScaleOut,
        Fault::ScaleIn,
        Fault::FullDisk,
        Fault::DamageCopy,
    ];

    /// The scenario's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::RollingRestart => "rolling-restart",
            Fault::ScaleOut => "scale-out",
            Fault::ScaleIn => "scale-in",
            Fault::FullDisk => "full-disk",
            Fault::DamageCopy => "damage-copy",
            Fault::Random => "random",
        }
    }

    /// Parses a scenario name.
    pub fn parse(name: &str) -> Option<Fault> {
        Fault::ALL
            .into_iter()
            .chain([Fault::Random])
            .find(|f| f.name() == name)
    }
}

/// How a scenario runs.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// The `kstore-node` binary.
    pub node_binary: PathBuf,
    /// Where node state and logs go.
    pub dir: PathBuf,
    /// Partitions of the input topic.
    pub partitions: u32,
    /// Order events per second.
    pub rate: u64,
    /// Customers the events spread over (every one is checked at the end).
    pub customers: u32,
    /// Customers the reader asks for, in turn.
    pub read_keys: u32,
    /// Reads per second.
    pub read_rate: u64,
    /// Events and reads before the fault.
    pub before_fault: Duration,
    /// Events and reads after the fault is over.
    pub after_fault: Duration,
    /// How long a paused node stays paused.
    pub pause: Duration,
    /// The consumer group's session timeout.
    pub session_timeout: Duration,
    /// The randomized nemesis, for [`Fault::Random`].
    pub soak: SoakOptions,
    /// How [`Fault::RollingRestart`] restarts the nodes.
    pub rolling: RollingOptions,
    /// Settings every node gets on top of the scenario's (`key=value`, as `--set` takes them),
    /// such as `kafka.debug=cgrp`.
    pub node_settings: Vec<String>,
}

/// How a rolling restart goes.
#[derive(Debug, Clone)]
pub struct RollingOptions {
    /// How many times every node is restarted, one after another. The assignment is compared
    /// before and after each round.
    pub rounds: u32,
    /// When the next node is stopped.
    pub pace: RestartPace,
    /// Whether nodes are stopped with `kill -9` (a crash) instead of SIGTERM.
    pub kill: bool,
    /// How long a stopped node stays down before it is started again: zero, as a supervisor
    /// restarts it, or longer than the session timeout, so that the group moves its
    /// partitions and must hand them back once it returns.
    pub downtime: Duration,
}

/// When a rolling restart stops the next node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPace {
    /// Once every partition has a live active and a live standby again (a careful operator).
    Settle,
    /// This long after the previous node was started again, whatever the cluster is doing
    /// (a supervisor: SIGTERM, start again as soon as the process has exited, next node).
    After(Duration),
}

/// How the randomized nemesis runs.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// How long it injects faults.
    pub duration: Duration,
    /// The seed of its schedule: the same seed gives the same schedule.
    pub seed: u64,
    /// Each node's state directory is a tmpfs of this size (if the process may mount one),
    /// so that the nemesis can fill its disk; 0 turns full disks off.
    pub disk_bytes: u64,
}

impl ChaosOptions {
    /// The defaults of `cargo xtask chaos`: 12 partitions, 2,000 events/s over 2,000
    /// customers, 1,000 reads/s over 200 of them.
    pub fn new(node_binary: PathBuf, dir: PathBuf) -> Self {
        ChaosOptions {
            node_binary,
            dir,
            partitions: 12,
            rate: 2_000,
            customers: 2_000,
            read_keys: 200,
            read_rate: 1_000,
            before_fault: Duration::from_secs(10),
            after_fault: Duration::from_secs(15),
            pause: Duration::from_secs(10),
            session_timeout: Duration::from_secs(10),
            soak: SoakOptions {
                duration: Duration::from_secs(120),
                seed: 1,
                disk_bytes: 256 << 20,
            },
            rolling: RollingOptions {
                rounds: 1,
                pace: RestartPace::After(Duration::from_secs(5)),
                kill: false,
                downtime: Duration::ZERO,
            },
            node_settings: Vec::new(),
        }
    }
}

/// What a scenario saw.
#[derive(Debug, Clone)]
pub struct ChaosReport {
    /// The fault.
    pub fault: Fault,
    /// Reads the reader started.
    pub reads_issued: u64,
    /// Reads that got an answer within [`READ_BUDGET`].
    pub reads_answered: u64,
    /// A few failed reads and why.
    pub failures: Vec<String>,
    /// The longest time one key went without an answer, and the key.
    pub longest_gap: (Duration, String),
    /// Read latency p99 from the fault's start to 5 s after its end.
    pub read_p99_during_fault: Duration,
    /// Read latency p99 over the whole run.
    pub read_p99: Duration,
    /// The largest lag an answer stated.
    pub max_lag: i64,
    /// Events sent.
    pub events: u64,
    /// Whether every customer's final state equals the recomputed one.
    pub state_exact: bool,
    /// Customers whose state differs (the first few).
    pub mismatches: Vec<String>,
    /// Fault-specific measurements, such as the time from `kill -9` to routing away.
    pub notes: Vec<(String, String)>,
    /// Every answer checked against its stated position, and the topics checked for
    /// duplicates.
    pub audit: Audit,
    /// Records the nodes logged as exactly-once violations (a consumer that started below
    /// what a copy reflected), over every node's every run.
    pub violations: u64,
    /// Records the nodes logged as handed over again after they were folded (skipped).
    pub redelivered: u64,
    /// What the fault itself checks and found wrong, such as a rolling restart round that
    /// moved an active or rebuilt a copy.
    pub fault_problems: Vec<String>,
}

impl ChaosReport {
    /// What the scenario must show and did not: an unanswered read, a wrong answer, an
    /// understated lag, a double fold or a duplicate, or an inexact final state. Empty when
    /// all is well.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut check = |bad: bool, what: String| {
            if bad {
                problems.push(what);
            }
        };
        check(
            self.reads_answered != self.reads_issued,
            format!(
                "{} of {} reads unanswered: {:?}",
                self.reads_issued - self.reads_answered,
                self.reads_issued,
                self.failures
            ),
        );
        check(
            self.audit.wrong_answers > 0 || self.audit.understated_lags > 0,
            format!(
                "{} answers wrong for their stated position, {} with an understated lag: {:?}",
                self.audit.wrong_answers, self.audit.understated_lags, self.audit.examples
            ),
        );
        check(
            self.violations > 0 || self.redelivered > 0,
            format!(
                "{} exactly-once violations and {} records handed over again",
                self.violations, self.redelivered
            ),
        );
        check(
            self.audit.duplicate_inputs > 0
                || self.audit.missing_inputs > 0
                || self.audit.duplicate_changelog_inputs > 0,
            format!(
                "the input holds {} events twice and misses {}; {} changelog records repeat an \
                 input offset",
                self.audit.duplicate_inputs,
                self.audit.missing_inputs,
                self.audit.duplicate_changelog_inputs
            ),
        );
        check(
            !self.state_exact,
            format!("the final state is not exact: {:?}", self.mismatches),
        );
        problems.extend(self.fault_problems.iter().cloned());
        problems
    }
}

/// One node of the chaos cluster.
struct ChaosNode {
    id: String,
    process: Option<TestProcess>,
    grpc: String,
    gossip: String,
    runs: u32,
}

/// The nodes, and the reader's view of where they serve.
struct Cluster {
    options: ChaosOptions,
    fault: Fault,
    bootstrap: String,
    app: String,
    input: String,
    nodes: Vec<ChaosNode>,
    targets: Arc<RwLock<Vec<(String, Channel)>>>,
    /// Each node's small disk, where the soak mounted one.
    disks: BTreeMap<String, disk::SmallDisk>,
}

impl Cluster {
    /// A node's state directory.
    fn state_dir(&self, id: &str) -> std::path::PathBuf {
        self.options.dir.join(&self.app).join(id)
    }

    /// The directory of a node's copies (one per partition).
    fn store_root(&self, id: &str) -> std::path::PathBuf {
        self.state_dir(id).join(&self.app).join("features")
    }

    /// The ids of the nodes that run, sorted.
    fn running(&self) -> Vec<String> {
        let mut running: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.process.is_some())
            .map(|n| n.id.clone())
            .collect();
        running.sort();
        running
    }

    fn settings(&self, id: &str) -> Vec<String> {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.id != id && !n.gossip.is_empty())
            .map(|n| n.gossip.clone())
            .collect();
        vec![
            format!("node-id={id}"),
            format!("app-id={}", self.app),
            format!("cluster-id={}", self.app),
            format!("input-topic={}", self.input),
            format!("state-dir={}", self.state_dir(id).display()),
            "grpc-address=127.0.0.1:0".into(),
            "metrics-address=".into(),
            "gossip-address=127.0.0.1:0".into(),
            format!("seeds={}", seeds.join(",")),
            format!("kafka.bootstrap.servers={}", self.bootstrap),
            format!(
                "kafka.session.timeout.ms={}",
                self.options.session_timeout.as_millis()
            ),
        ]
        .into_iter()
        .chain(self.soak_settings())
        .chain(self.options.node_settings.iter().cloned())
        .collect()
    }

    /// What the soak's nodes add: a quick background check (so that a damaged copy is found
    /// within seconds), quick retries of failed copies, and backups on demand (which flush
    /// copies, so that there are SST files to damage).
    fn soak_settings(&self) -> Vec<String> {
        if !matches!(
            self.fault,
            Fault::Random | Fault::FullDisk | Fault::DamageCopy
        ) {
            return Vec::new();
        }
        let mut settings = vec![
            "verify-interval-ms=5000".into(),
            "copy-retry-initial-ms=500".into(),
            "copy-retry-max-ms=5000".into(),
            format!(
                "backup.dir={}",
                self.options.dir.join(&self.app).join("backups").display()
            ),
            "backup.interval-ms=0".into(),
        ];
        if matches!(self.fault, Fault::Random | Fault::FullDisk) {
            // Without a WAL a full disk shows at the next flush: flush often.
            settings.push("store-flush-interval-ms=2000".into());
        }
        settings
    }

    /// Mounts a small disk as the node's state directory, for the soak's full disks, if the
    /// process may mount one (and says so once if it may not).
    fn mount_small_disk(&mut self, id: &str) {
        let bytes = self.options.soak.disk_bytes;
        let wanted = matches!(self.fault, Fault::Random | Fault::FullDisk);
        if !wanted || bytes == 0 || self.disks.contains_key(id) {
            return;
        }
        match disk::SmallDisk::mount(&self.state_dir(id), bytes) {
            Ok(disk) => {
                self.disks.insert(id.to_owned(), disk);
            }
            Err(error) => {
                tracing::warn!(%error, id, "no small disk: full disks are skipped for this node");
            }
        }
    }

    /// Starts (or restarts) node `id` and waits until it serves gRPC and gossips.
    fn start(&mut self, id: &str) -> Result<()> {
        let args: Vec<String> = self
            .settings(id)
            .into_iter()
            .flat_map(|s| ["--set".to_owned(), s])
            .collect();
        let index = match self.nodes.iter().position(|n| n.id == id) {
            Some(index) => index,
            None => {
                self.nodes.push(ChaosNode {
                    id: id.into(),
                    process: None,
                    grpc: String::new(),
                    gossip: String::new(),
                    runs: 0,
                });
                self.nodes.len() - 1
            }
        };
        self.mount_small_disk(id);
        let node = &mut self.nodes[index];
        node.runs += 1;
        let dir = self.options.dir.join(&self.app);
        std::fs::create_dir_all(&dir)?;
        let log = dir.join(format!("{id}-{}.log", node.runs));
        let mut process = TestProcess::start(id, &self.options.node_binary, &args, &log)?;
        node.grpc = process.logged_address("serving gRPC", Duration::from_secs(120))?;
        node.gossip = process.logged_address("gossiping", Duration::from_secs(60))?;
        node.process = Some(process);
        let channel = Endpoint::from_shared(format!("http://{}", node.grpc))?
            .connect_timeout(ATTEMPT_TIMEOUT)
            .connect_lazy();
        let mut targets = self.targets.write().unwrap_or_else(|e| e.into_inner());
        targets.retain(|(target, _)| target != id);
        targets.push((id.into(), channel));
        targets.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(())
    }

    fn node(&mut self, id: &str) -> Result<&mut ChaosNode> {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .with_context(|| format!("no node {id}"))
    }

    fn process(&mut self, id: &str) -> Result<&mut TestProcess> {
        self.node(id)?
            .process
            .as_mut()
            .with_context(|| format!("{id} is not running"))
    }

    /// Returns the view of the first running node that answers.
    async fn view(&mut self) -> Result<ClusterView> {
        let mut errors = Vec::new();
        for node in &mut self.nodes {
            let Some(process) = node.process.as_mut() else {
                continue;
            };
            if let Some(status) = process.try_exit()? {
                bail!("{} exited with {status}:\n{}", node.id, process.tail());
            }
            let answer = async {
                let mut client = QueryClient::connect(format!("http://{}", node.grpc)).await?;
                anyhow::Ok(client.metadata(MetadataRequest {}).await?.into_inner())
            };
            match tokio::time::timeout(ATTEMPT_TIMEOUT * 4, answer).await {
                Ok(Ok(answer)) => return Ok(ClusterView::from_proto(&answer)),
                Ok(Err(error)) => errors.push(format!("{}: {error}", node.id)),
                Err(_) => errors.push(format!("{}: no answer", node.id)),
            }
        }
        bail!("no node answers Metadata: {errors:?}")
    }

    /// Waits until the view shows every partition with one live active and one live
    /// standby, all on `members`, and every member running.
    /// A node that answers no Metadata for a moment (a busy machine) is asked again; a node
    /// that exited fails the wait at once.
    async fn wait_complete(&mut self, members: &[&str], timeout: Duration) -> Result<ClusterView> {
        let deadline = Instant::now() + timeout;
        loop {
            let missing = match self.view().await {
                Ok(view) => {
                    let gaps = incomplete(&view, members, self.options.partitions);
                    if gaps.is_empty() {
                        return Ok(view);
                    }
                    gaps.join("; ")
                }
                Err(error) if self.any_exited()? => return Err(error),
                Err(error) => format!("no view: {error}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "the cluster did not settle on {members:?} within {timeout:?}: {missing}\n{}",
                    self.recent_warnings()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last warnings and errors each running node logged, for a failure's message.
    fn recent_warnings(&self) -> String {
        let mut text = String::new();
        for node in &self.nodes {
            let Some(process) = node.process.as_ref() else {
                continue;
            };
            let output = process.output();
            let warnings: Vec<&str> = output
                .lines()
                .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
                .collect();
            text.push_str(&format!("{}'s last warnings and errors:\n", node.id));
            for line in &warnings[warnings.len().saturating_sub(12)..] {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }

    /// Whether a node that should run has exited.
    fn any_exited(&mut self) -> Result<bool> {
        for node in &mut self.nodes {
            if let Some(process) = node.process.as_mut()
                && process.try_exit()?.is_some()
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn stop_all(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut process) = node.process.take() {
                let _ = process.terminate(Duration::from_secs(60));
            }
        }
    }
}

/// What keeps the view from complete: each member that is not live and running, and each
/// partition without exactly one live active and at least one live standby on the members,
/// with the copies it has. Empty once complete.
fn incomplete(view: &ClusterView, members: &[&str], partitions: u32) -> Vec<String> {
    let mut gaps = Vec::new();
    for member in members {
        let entries: Vec<_> = view.nodes.iter().filter(|n| n.node_id == *member).collect();
        let running = |n: &&kstore_core::cluster::NodeEntry| {
            n.liveness == Liveness::Live && n.status == NodeStatus::Running
        };
        if !entries.iter().any(running) {
            let states: Vec<String> = entries
                .iter()
                .map(|n| format!("{:?} and {:?}", n.liveness, n.status))
                .collect();
            gaps.push(format!(
                "{member} is not live and running: [{}]",
                states.join(", ")
            ));
        }
    }
    for p in 0..partitions {
        let holders = view.holders(p);
        let on_members = |role| {
            holders
                .iter()
                .filter(|h| {
                    h.copy.role == role
                        && h.routable()
                        && members.contains(&h.node.node_id.as_str())
                })
                .count()
        };
        if on_members(Role::Active) != 1 || on_members(Role::Standby) == 0 {
            let copies: Vec<String> = holders
                .iter()
                .map(|h| format!("{} {:?} {:?}", h.node.node_id, h.copy.role, h.node.liveness))
                .collect();
            gaps.push(format!("partition {p} has [{}]", copies.join(", ")));
        }
    }
    gaps
}

/// The actives of every partition, as node id → partitions.
fn assignment(view: &ClusterView, partitions: u32) -> BTreeMap<String, Vec<u32>> {
    let mut actives: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for p in 0..partitions {
        if let Some(active) = view.active(p) {
            actives
                .entry(active.node.node_id.clone())
                .or_default()
                .push(p);
        }
    }
    actives
}

/// One read as the reader saw it.
struct ReadRecord {
    key: usize,
    started: Instant,
    /// When it was answered, and the answer.
    answered: Option<(Instant, Answer)>,
    failure: Option<String>,
}

/// Reads keys through every node in turn, at a fixed rate, until stopped.
async fn read_loop(
    targets: Arc<RwLock<Vec<(String, Channel)>>>,
    keys: Arc<Vec<String>>,
    rate: u64,
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<ReadRecord>>>,
) {
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut next = 0usize;
    while !stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        let key = next % keys.len();
        let first = next;
        next += 1;
        let targets: Vec<(String, Channel)> =
            targets.read().unwrap_or_else(|e| e.into_inner()).clone();
        let keys = keys.clone();
        let records = records.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let record = read_once(&targets, first, key, &keys[key], started).await;
            let (answered, failure) = match record {
                Ok(answer) => (Some((Instant::now(), answer)), None),
                Err(error) => (None, Some(error)),
            };
            records
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(ReadRecord {
                    key,
                    started,
                    answered,
                    failure,
                });
        });
    }
}

/// One read: the node after the previous read's, then the next, until one answers.
async fn read_once(
    targets: &[(String, Channel)],
    turn: usize,
    key_index: usize,
    key: &str,
    started: Instant,
) -> Result<Answer, String> {
    let mut errors = Vec::new();
    for attempt in 0..targets.len() {
        let remaining = READ_BUDGET.saturating_sub(started.elapsed());
        if remaining.is_zero() {
            break;
        }
        let (node, channel) = &targets[(turn + attempt) % targets.len()];
        let mut client = QueryClient::new(channel.clone());
        let mut request = tonic::Request::new(GetRequest {
            store: "features".into(),
            key: key.as_bytes().to_vec(),
            partition: None,
            options: None,
        });
        let timeout = ATTEMPT_TIMEOUT.min(remaining);
        request.set_timeout(timeout);
        match tokio::time::timeout(timeout, client.get(request)).await {
            Ok(Ok(answer)) => {
                let answer = answer.into_inner();
                let read = answer.read.unwrap_or_default();
                let value = match answer.value {
                    Some(get_response::Value::Message(any)) => Some(any.value),
                    Some(get_response::Value::Raw(bytes)) => Some(bytes),
                    None => None,
                };
                return Ok(Answer {
                    key: key_index,
                    role: read.role().as_str_name().to_string(),
                    node: read.node_id,
                    partition: read.partition,
                    input_offset: read.input_offset,
                    lag: read.lag,
                    input_end_seen_ms: read.input_end_seen_ms,
                    answered_ms: unix_ms(),
                    value: value.map(|bytes| xxhash_rust::xxh3::xxh3_64(&bytes)),
                });
            }
            Ok(Err(status)) => {
                errors.push(format!("{node}: {:?} {}", status.code(), status.message()))
            }
            Err(_) => errors.push(format!("{node}: no answer in {timeout:?}")),
        }
    }
    Err(errors.join("; "))
}

/// Runs one scenario against the broker of `kafka`.
pub async fn run(kafka: &TestKafka, options: &ChaosOptions, fault: Fault) -> Result<ChaosReport> {
    let app = kafka.unique_name(&format!("chaos-{}", fault.name()));
    let input = format!("{app}-orders");
    // Append times let the audit tell which records were in the log when a node looked.
    kafka
        .create_topic_with(
            &input,
            options.partitions,
            &[("message.timestamp.type", "LogAppendTime")],
        )
        .await?;
    let mut cluster = Cluster {
        options: options.clone(),
        fault,
        bootstrap: kafka.bootstrap().into(),
        app: app.clone(),
        input: input.clone(),
        nodes: Vec::new(),
        targets: Arc::default(),
        disks: BTreeMap::new(),
    };
    let result = scenario(kafka, &mut cluster, fault).await;
    cluster.stop_all();
    if let Err(error) = kafka.delete_topics_with_prefix(&format!("{app}-"), Some(&app)) {
        tracing::warn!(%error, "deleting the scenario's topics");
    }
    result
}

async fn scenario(kafka: &TestKafka, cluster: &mut Cluster, fault: Fault) -> Result<ChaosReport> {
    let options = cluster.options.clone();
    let initial = if fault == Fault::ScaleIn { 4 } else { 3 };
    let ids: Vec<String> = (1..=initial).map(|i| format!("node-{i}")).collect();
    for id in &ids {
        cluster.start(id)?;
    }
    let members: Vec<&str> = ids.iter().map(String::as_str).collect();
    cluster
        .wait_complete(&members, Duration::from_secs(180))
        .await?;

    // Events flow for the whole run (as long as the slowest fault takes, and more).
    let fault_budget = match fault {
        Fault::Kill => options.session_timeout + Duration::from_secs(20),
        Fault::Pause => options.pause + Duration::from_secs(5),
        // A round: three restarts (a few seconds each, plus the pace and the downtime), then
        // settling.
        Fault::RollingRestart => {
            (Duration::from_secs(40) + options.rolling.downtime * 3) * options.rolling.rounds.max(1)
        }
        Fault::ScaleOut | Fault::ScaleIn => Duration::from_secs(25),
        Fault::FullDisk | Fault::DamageCopy => Duration::from_secs(40),
        Fault::Random => options.soak.duration + Duration::from_secs(30),
    };
    let events =
        options.rate * (options.before_fault + fault_budget + options.after_fault).as_secs();
    let generator = GeneratorConfig {
        customers: options.customers,
        seed: 7,
        ..GeneratorConfig::default()
    };
    let producer = {
        let produce_options = ProduceOptions {
            bootstrap: kafka.bootstrap().into(),
            topic: cluster.input.clone(),
            count: events,
            skip: 0,
            rate: options.rate,
            generator: generator.clone(),
            kafka: Vec::new(),
        };
        tokio::task::spawn_blocking(move || produce_with_acks(&produce_options))
    };

    let keys: Arc<Vec<String>> = Arc::new(
        (0..options.read_keys.min(options.customers))
            .map(OrderGenerator::customer_id)
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let records = Arc::new(Mutex::new(Vec::new()));
    let reader = tokio::spawn(read_loop(
        cluster.targets.clone(),
        keys.clone(),
        options.read_rate,
        stop.clone(),
        records.clone(),
    ));
    let reading = Instant::now();

    tokio::time::sleep(options.before_fault).await;
    let fault_started = Instant::now();
    let mut notes = Vec::new();
    let mut fault_problems = Vec::new();
    inject(cluster, fault, &mut notes, &mut fault_problems).await?;
    let fault_ended = Instant::now();
    tokio::time::sleep(options.after_fault).await;
    stop.store(true, Ordering::Relaxed);
    let reading_ended = Instant::now();
    reader.await?;
    // Reads still in flight finish within their budget.
    tokio::time::sleep(READ_BUDGET).await;

    let (summary, acks) = producer.await??;
    ensure!(
        summary.delivered == events,
        "the producer delivered {} of {events} events",
        summary.delivered
    );
    let (state_exact, mismatches) = verify_state(kafka, cluster, &generator, events).await?;

    let records = std::mem::take(&mut *records.lock().unwrap_or_else(|e| e.into_inner()));
    let answers: Vec<Answer> = records
        .iter()
        .filter_map(|r| r.answered.as_ref().map(|(_, answer)| answer.clone()))
        .collect();
    let audit = audit(
        kafka,
        &cluster.input,
        &format!("{}-features-changelog", cluster.app),
        options.partitions,
        &generator,
        events,
        &acks,
        &keys,
        &answers,
    )?;
    let logs = options.dir.join(&cluster.app);
    let mut report = summarize(
        fault,
        &records,
        &keys,
        reading,
        reading_ended,
        (fault_started, fault_ended + Duration::from_secs(5)),
    );
    report.events = events;
    report.state_exact = state_exact;
    report.mismatches = mismatches;
    report.notes = notes;
    report.fault_problems = fault_problems;
    report.audit = audit;
    report.violations = count_in_logs(&logs, "exactly-once violation");
    report.redelivered = count_in_logs(&logs, "handed over a record already folded");
    Ok(report)
}

/// Injects the fault and waits until the cluster has dealt with it. What the fault's own
/// checks find wrong goes to `problems` (the run goes on, so that the report is whole).
async fn inject(
    cluster: &mut Cluster,
    fault: Fault,
    notes: &mut Vec<(String, String)>,
    problems: &mut Vec<String>,
) -> Result<()> {
    let options = cluster.options.clone();
    match fault {
        Fault::Kill => {
            let before = cluster.view().await?;
            let victim_partitions = assignment(&before, options.partitions)
                .remove("node-2")
                .unwrap_or_default();
            cluster.process("node-2")?.kill9()?;
            let killed = Instant::now();
            cluster.node("node-2")?.process = None;
            let mut routed_away = None;
            loop {
                let view = cluster.view().await?;
                let live = view
                    .nodes
                    .iter()
                    .any(|n| n.node_id == "node-2" && n.liveness == Liveness::Live);
                if !live && routed_away.is_none() {
                    routed_away = Some(killed.elapsed());
                }
                let processing = victim_partitions.iter().all(|p| {
                    view.active(*p)
                        .is_some_and(|a| a.node.node_id != "node-2" && a.routable())
                });
                if routed_away.is_some() && processing {
                    notes.push((
                        "kill -9 to routing away".into(),
                        format!("{} ms", routed_away.unwrap_or_default().as_millis()),
                    ));
                    notes.push((
                        "kill -9 to its partitions processing elsewhere".into(),
                        format!("{} ms", killed.elapsed().as_millis()),
                    ));
                    return Ok(());
                }
                ensure!(
                    killed.elapsed() < options.session_timeout + Duration::from_secs(120),
                    "node-2's partitions did not move: {view:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Fault::Pause => {
            let pid = cluster.process("node-2")?.pid();
            signal(pid, "STOP")?;
            let paused = Instant::now();
            tokio::time::sleep(options.pause).await;
            signal(pid, "CONT")?;
            notes.push((
                "paused".into(),
                format!("{} ms", paused.elapsed().as_millis()),
            ));
            cluster
                .wait_complete(&["node-1", "node-2", "node-3"], Duration::from_secs(120))
                .await?;
            Ok(())
        }
        Fault::RollingRestart => rolling_restart(cluster, notes, problems).await,
        Fault::ScaleOut => {
            let started = Instant::now();
            cluster.start("node-4")?;
            cluster
                .wait_complete(
                    &["node-1", "node-2", "node-3", "node-4"],
                    Duration::from_secs(120),
                )
                .await?;
            let view = cluster.view().await?;
            let taken = assignment(&view, options.partitions)
                .get("node-4")
                .map_or(0, Vec::len);
            notes.push((
                "node-4 active for".into(),
                format!(
                    "{taken} partitions after {} ms",
                    started.elapsed().as_millis()
                ),
            ));
            Ok(())
        }
        Fault::Random => nemesis::run(cluster, notes).await,
        Fault::FullDisk => {
            let (done, failed) =
                nemesis::full_disk(cluster, "node-2", Duration::from_secs(15)).await?;
            let failed = failed.with_context(|| {
                format!("{done} (mounting a tmpfs needs root or a user namespace that allows it)")
            })?;
            ensure!(failed > 0, "{done}: the full disk failed no copy");
            notes.push(("fault".into(), done));
            cluster
                .wait_complete(&["node-1", "node-2", "node-3"], Duration::from_secs(180))
                .await?;
            Ok(())
        }
        Fault::DamageCopy => {
            let done = nemesis::damage_copy(cluster, "node-2", 0).await?;
            ensure!(done.contains("rebuilt"), "{done}");
            notes.push(("fault".into(), done));
            cluster
                .wait_complete(&["node-1", "node-2", "node-3"], Duration::from_secs(180))
                .await?;
            Ok(())
        }
        Fault::ScaleIn => {
            let grpc = cluster.node("node-4")?.grpc.clone();
            let mut admin = AdminClient::connect(format!("http://{grpc}")).await?;
            let drained = Instant::now();
            admin.drain(DrainRequest {}).await?;
            let status = cluster
                .process("node-4")?
                .wait_exit(Duration::from_secs(180))?;
            ensure!(status.success(), "node-4 exit after its drain: {status}");
            cluster.node("node-4")?.process = None;
            notes.push((
                "drain of node-4".into(),
                format!("{} ms", drained.elapsed().as_millis()),
            ));
            cluster
                .wait_complete(&["node-1", "node-2", "node-3"], Duration::from_secs(120))
                .await?;
            Ok(())
        }
    }
}

/// Restarts every node in turn, [`RollingOptions::rounds`] times, at
/// [`RollingOptions::pace`]; after each round, once the cluster has settled, compares the
/// assignment (as Metadata reports it) with the one before the round, and counts the
/// changelog records the round replayed and the copies it rebuilt.
///
/// A round that moved an active is a problem. So is a replay or a rebuilt copy in a round in
/// which every node came back by SIGTERM and at once and the group did not rebalance (its
/// generation, as the nodes report it, stayed the same): then every node rejoined as the
/// static member it was, and nothing may move even for a while. A round in which the group
/// did rebalance (a member missed its session timeout: a slow restart, a stalled broker) is
/// noted with its generations.
async fn rolling_restart(
    cluster: &mut Cluster,
    notes: &mut Vec<(String, String)>,
    problems: &mut Vec<String>,
) -> Result<()> {
    let options = cluster.options.clone();
    let rolling = options.rolling.clone();
    let members = cluster.running();
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    let logs = options.dir.join(&cluster.app);
    let mut moved = Vec::new();
    let mut rebalanced = Vec::new();
    let mut replayed_total = 0;
    let mut rebuilt_total = 0;
    for round in 1..=rolling.rounds {
        let view = cluster.wait_complete(&members, SETTLE_TIMEOUT).await?;
        let (before, generation_before) =
            (assignment(&view, options.partitions), generation(&view));
        let replayed_before = sum_in_logs(&logs, ACTIVATED, "records");
        let rebuilt_before = count_in_logs(&logs, COLD_COPY);
        let mut exits = Vec::new();
        for (turn, id) in members.iter().enumerate() {
            let stopping = Instant::now();
            let process = cluster.process(id)?;
            // A crash has no exit status worth checking.
            let status = if rolling.kill {
                process.kill9()?;
                None
            } else {
                Some(process.terminate(Duration::from_secs(60))?)
            };
            if let Some(status) = status
                && !status.success()
            {
                // A supervisor starts it again all the same; the run goes on.
                let output = process.output();
                let why = output
                    .lines()
                    .rev()
                    .find(|l| l.contains("stopped error="))
                    .unwrap_or_default();
                problems.push(format!("round {round}: {id} exited with {status}: {why}"));
            }
            exits.push(stopping.elapsed().as_millis());
            if !rolling.downtime.is_zero() {
                cluster.node(id)?.process = None;
                tokio::time::sleep(rolling.downtime).await;
            }
            cluster.start(id)?;
            let started = Instant::now();
            if turn + 1 == members.len() {
                break;
            }
            match rolling.pace {
                RestartPace::Settle => {
                    cluster.wait_complete(&members, SETTLE_TIMEOUT).await?;
                }
                RestartPace::After(pace) => {
                    tokio::time::sleep(pace.saturating_sub(started.elapsed())).await;
                }
            }
        }
        let view = cluster.wait_complete(&members, SETTLE_TIMEOUT).await?;
        let (after, generation_after) = (assignment(&view, options.partitions), generation(&view));
        let replayed = sum_in_logs(&logs, ACTIVATED, "records") - replayed_before;
        let rebuilt = count_in_logs(&logs, COLD_COPY) - rebuilt_before;
        replayed_total += replayed;
        rebuilt_total += rebuilt;
        let kept = if after == before {
            "kept".to_owned()
        } else {
            moved.push(round);
            format!("MOVED: {before:?} became {after:?}")
        };
        let group = if generation_after == generation_before {
            format!("no rebalance (generation {generation_after})")
        } else {
            rebalanced.push(round);
            format!("rebalanced: generation {generation_before} to {generation_after}")
        };
        let summary = format!(
            "assignment {kept}; group {group}; {replayed} changelog records replayed; \
             {rebuilt} copies rebuilt; SIGTERM to exit {exits:?} ms"
        );
        eprintln!("chaos: rolling restart round {round}: {summary}");
        notes.push((format!("round {round}"), summary));
        let quick = !rolling.kill && rolling.downtime.is_zero();
        if quick && generation_after == generation_before && (replayed > 0 || rebuilt > 0) {
            problems.push(format!(
                "rolling restart round {round} replayed {replayed} changelog records and \
                 rebuilt {rebuilt} copies, though no member left the group"
            ));
        }
    }
    let rounds = rolling.rounds as usize;
    notes.push((
        "rounds that kept the assignment".into(),
        format!("{} of {rounds}", rounds - moved.len()),
    ));
    notes.push((
        "rounds the group rebalanced in".into(),
        format!("{} of {rounds} {rebalanced:?}", rebalanced.len()),
    ));
    notes.push(("records replayed".into(), replayed_total.to_string()));
    notes.push(("copies rebuilt".into(), rebuilt_total.to_string()));
    if !moved.is_empty() {
        problems.push(format!(
            "rolling restart rounds {moved:?} moved the assignment"
        ));
    }
    Ok(())
}

/// The latest consumer-group generation any node reports.
fn generation(view: &ClusterView) -> i32 {
    view.nodes
        .iter()
        .map(|n| n.group_generation)
        .max()
        .unwrap_or_default()
}

/// How long the cluster may take to have every partition served again.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);

/// What a node logs when a partition turns active, with the changelog records its restore
/// replayed (`records=`).
const ACTIVATED: &str = "restore finished; the partition is active";

/// What a node logs when it opens a copy it had no files for.
const COLD_COPY: &str = "warm=false";

/// Sums the numeric field `field` of every line of every node log under `dir` that contains
/// `what`.
fn sum_in_logs(dir: &std::path::Path, what: &str, field: &str) -> u64 {
    let prefix = format!("{field}=");
    node_logs(dir)
        .iter()
        .flat_map(|log| log.lines())
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|word| word.strip_prefix(&prefix))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

/// Every node log under `dir`.
fn node_logs(dir: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .collect()
}

/// Now, in milliseconds since the Unix epoch.
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Counts the lines of every node log under `dir` that contain `what`.
fn count_in_logs(dir: &std::path::Path, what: &str) -> u64 {
    node_logs(dir)
        .iter()
        .map(|log| log.lines().filter(|l| l.contains(what)).count() as u64)
        .sum()
}

fn signal(pid: u32, name: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()?;
    ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
}

/// Reads every customer's final state from the cluster once it has caught up, and compares
/// it with a recomputation from the events sent.
async fn verify_state(
    kafka: &TestKafka,
    cluster: &mut Cluster,
    generator: &GeneratorConfig,
    events: u64,
) -> Result<(bool, Vec<String>)> {
    let options = cluster.options.clone();
    let end = kafka.end_offsets(&cluster.input, options.partitions)?;
    let mut expected: HashMap<String, CustomerFeatures> = HashMap::new();
    for event in OrderGenerator::new(generator.clone()).take(events as usize) {
        kstore_server::processor::features::fold(
            expected.entry(event.customer_id.clone()).or_default(),
            &event,
        );
    }
    let targets = cluster
        .targets
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut mismatches = Vec::new();
    for customer in (0..options.customers).map(OrderGenerator::customer_id) {
        let partition = partition_for_key(customer.as_bytes(), options.partitions) as usize;
        loop {
            // The partition's active, once it reflects every event sent (a node that holds
            // a standby answers from it; another node's answer may be the active's).
            let mut answer = None;
            for (_, channel) in &targets {
                let mut client = QueryClient::new(channel.clone());
                let request = GetRequest {
                    store: "features".into(),
                    key: customer.as_bytes().to_vec(),
                    partition: None,
                    options: None,
                };
                let Ok(Ok(got)) =
                    tokio::time::timeout(Duration::from_secs(2), client.get(request)).await
                else {
                    continue;
                };
                let got = got.into_inner();
                if got
                    .read
                    .as_ref()
                    .is_some_and(|r| r.role() == Role::Active && r.input_offset >= end[partition])
                {
                    answer = Some(got);
                    break;
                }
            }
            if answer.is_some() {
                let features = match answer.and_then(|a| a.value) {
                    Some(get_response::Value::Message(any)) => {
                        Some(CustomerFeatures::decode(any.value.as_slice())?)
                    }
                    _ => None,
                };
                if features.as_ref() != expected.get(&customer) && mismatches.len() < 10 {
                    mismatches.push(format!(
                        "{customer}: {} orders stored, {} sent",
                        features.map_or(0, |f| f.orders_total),
                        expected.get(&customer).map_or(0, |f| f.orders_total)
                    ));
                }
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{customer}'s partition {partition} did not catch up to offset {}",
                end[partition]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok((mismatches.is_empty(), mismatches))
}

fn summarize(
    fault: Fault,
    records: &[ReadRecord],
    keys: &[String],
    from: Instant,
    to: Instant,
    fault_window: (Instant, Instant),
) -> ChaosReport {
    let mut latency = hdrhistogram::Histogram::<u64>::new(3).expect("3 significant digits");
    let mut during = hdrhistogram::Histogram::<u64>::new(3).expect("3 significant digits");
    let mut answers: Vec<Vec<Instant>> = vec![Vec::new(); keys.len()];
    let mut failures = Vec::new();
    let mut max_lag = 0;
    let mut answered = 0;
    for record in records {
        match (&record.answered, &record.failure) {
            (Some((at, answer)), _) => {
                let at = *at;
                answered += 1;
                max_lag = max_lag.max(answer.lag);
                let micros = at.duration_since(record.started).as_micros() as u64;
                let _ = latency.record(micros);
                if record.started >= fault_window.0 && record.started <= fault_window.1 {
                    let _ = during.record(micros);
                }
                answers[record.key].push(at);
            }
            (None, Some(failure)) if failures.len() < 5 => {
                failures.push(format!("{}: {failure}", keys[record.key]));
            }
            _ => {}
        }
    }
    let mut longest_gap = (Duration::ZERO, String::new());
    for (key, times) in answers.iter_mut().enumerate() {
        times.sort_unstable();
        let mut previous = from;
        for &at in times.iter().chain(std::iter::once(&to)) {
            let gap = at.saturating_duration_since(previous);
            if gap > longest_gap.0 {
                longest_gap = (gap, keys[key].clone());
            }
            previous = at;
        }
    }
    let p99 = |h: &hdrhistogram::Histogram<u64>| Duration::from_micros(h.value_at_quantile(0.99));
    ChaosReport {
        fault,
        reads_issued: records.len() as u64,
        reads_answered: answered,
        failures,
        longest_gap,
        read_p99_during_fault: p99(&during),
        read_p99: p99(&latency),
        max_lag,
        events: 0,
        state_exact: false,
        mismatches: Vec::new(),
        notes: Vec::new(),
        audit: Audit::default(),
        violations: 0,
        redelivered: 0,
        fault_problems: Vec::new(),
    }
}
