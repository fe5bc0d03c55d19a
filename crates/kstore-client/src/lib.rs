//! The kstore smart client: reads go in one hop to a node that holds a copy of the key's
//! partition, found with Kafka's partitioner and a cached view of the cluster; they fall back
//! to other copies when that node is busy or gone, and can be hedged.
//!
//! ```no_run
//! use std::time::Duration;
//! use kstore_client::{Client, Hedge, ReadPolicy};
//! use kstore_proto::v1::CustomerFeatures;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::builder()
//!     .seeds(["127.0.0.1:50051", "127.0.0.1:50052"])
//!     .store("features")
//!     .read_policy(ReadPolicy::PreferActive { max_lag: 10_000 })
//!     .hedge(Hedge::After(Duration::from_millis(5)))
//!     .request_timeout(Duration::from_millis(500))
//!     .build()
//!     .await?;
//! let answer = client.get_as::<CustomerFeatures>(b"customer-000042").await?;
//! if let Some(features) = &answer.value {
//!     println!("{} orders, from {} ({:?}, lag {})", features.orders_total,
//!         answer.read.node_id, answer.read.role, answer.read.lag);
//! }
//! # Ok(()) }
//! ```
//!
//! Every read is sent with `no_forward`: a node whose copy moved away answers
//! `PARTITION_NOT_HOSTED` with the partition's holders, the client patches its view from
//! them and asks the right node at once, so a stale view is corrected, not hidden behind a
//! server-side forward. The view is kept by a `WatchMetadata` stream, polled as a backstop,
//! and never lost to a failed refresh.

mod channels;
pub mod error;
mod metadata;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kstore_core::cluster::ClusterView;
use kstore_core::partitioner::partition_for_key;
use kstore_core::routing::{Target, plan};
use kstore_proto::v1::query_client::QueryClient;
use kstore_proto::v1::{ErrorReason, GetRequest, MultiGetRequest, PartitionHolders, get_response};
use prost::Message as _;
use tokio::task::JoinSet;
use tonic_types::StatusExt;

pub use error::{Attempt, AttemptError, BuildError, ReadError};
pub use kstore_core::cluster::Role;
pub use kstore_core::routing::ReadPolicy;
pub use metadata::StoreShape;

/// The type URL of kstore's PartitionHolders status detail.
const PARTITION_HOLDERS_TYPE_URL: &str = "type.googleapis.com/kstore.v1.PartitionHolders";

/// When a read is sent to a second copy while the first has not answered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hedge {
    /// Never: a copy that does not answer is given up only at the request timeout (or
    /// when it fails).
    Off,
    /// After a fixed delay.
    After(Duration),
    /// After the given quantile of this client's recent read latencies (for example 0.95),
    /// kept between `min` and `max`.
    Percentile {
        /// The quantile, between 0 and 1.
        quantile: f64,
        /// The shortest delay.
        min: Duration,
        /// The longest delay.
        max: Duration,
    },
}

/// Per-read settings that override the client's.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReadOptions {
    /// The read policy.
    pub policy: Option<ReadPolicy>,
    /// Read-your-writes: the answer must reflect at least this input offset of the key's
    /// partition (the offset your produce returned). Only copies that can reach it are
    /// asked, and a copy that is behind waits for it until the deadline.
    pub min_input_offset: Option<i64>,
    /// The request timeout.
    pub timeout: Option<Duration>,
    /// Hedging.
    pub hedge: Option<Hedge>,
}

/// How fresh an answer is, and who gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadInfo {
    /// The key's partition.
    pub partition: u32,
    /// The node that answered.
    pub node_id: String,
    /// The role of the copy that answered.
    pub role: Role,
    /// The next changelog offset the copy will apply.
    pub changelog_offset: i64,
    /// The next input offset: every input record before it is reflected.
    pub input_offset: i64,
    /// Input records not reflected yet.
    pub lag: i64,
}

/// A read's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer<T> {
    /// The value, if the key has one.
    pub value: Option<T>,
    /// How fresh it is.
    pub read: ReadInfo,
    /// How the read was routed.
    pub route: Route,
}

/// How a read was routed: the plan and every attempt, the answering one last.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Route {
    /// The key's partition.
    pub partition: u32,
    /// The nodes the plan named, in order.
    pub plan: Vec<String>,
    /// The attempts made.
    pub attempts: Vec<Attempt>,
}

/// What the client has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Reads started.
    pub reads: u64,
    /// Reads answered by the first node asked.
    pub first_hop_answers: u64,
    /// Reads answered by another node than the first asked.
    pub fallback_answers: u64,
    /// Hedges sent.
    pub hedges_sent: u64,
    /// Hedges whose answer came first.
    pub hedges_won: u64,
    /// Misroutes (PARTITION_NOT_HOSTED) corrected from the holders the node named.
    pub misroutes_corrected: u64,
    /// Views fetched from a node (refreshes; the watch stream comes on top).
    pub metadata_refreshes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    first_hop_answers: AtomicU64,
    fallback_answers: AtomicU64,
    hedges_sent: AtomicU64,
    hedges_won: AtomicU64,
    misroutes_corrected: AtomicU64,
}

/// Configures a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    seeds: Vec<String>,
    store: String,
    cluster_id: Option<String>,
    policy: ReadPolicy,
    hedge: Hedge,
    hedge_budget: f64,
    request_timeout: Duration,
    connect_timeout: Duration,
    poll_interval: Duration,
    max_key_bytes: usize,
    #[cfg(feature = "tls")]
    tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            seeds: Vec::new(),
            store: "features".into(),
            cluster_id: None,
            policy: ReadPolicy::default(),
            hedge: Hedge::Off,
            hedge_budget: 0.1,
            request_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_millis(500),
            poll_interval: Duration::from_secs(10),
            max_key_bytes: 64 << 10,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

impl ClientBuilder {
    /// The gRPC addresses (`host:port`) of nodes to learn the cluster from; any one that
    /// answers will do.
    pub fn seeds<S: Into<String>>(mut self, seeds: impl IntoIterator<Item = S>) -> Self {
        self.seeds = seeds.into_iter().map(Into::into).collect();
        self
    }

    /// The store to read (default `features`).
    pub fn store(mut self, store: impl Into<String>) -> Self {
        self.store = store.into();
        self
    }

    /// Refuses nodes of any other cluster (default: the cluster of the first seed that
    /// answers).
    pub fn cluster_id(mut self, cluster_id: impl Into<String>) -> Self {
        self.cluster_id = Some(cluster_id.into());
        self
    }

    /// The default read policy (default `PreferActive { max_lag: 10_000 }`).
    pub fn read_policy(mut self, policy: ReadPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The default hedging (default off).
    pub fn hedge(mut self, hedge: Hedge) -> Self {
        self.hedge = hedge;
        self
    }

    /// The most hedges as a share of reads (default 0.1), so that hedging cannot double the
    /// load on a cluster that is slow everywhere.
    pub fn hedge_budget(mut self, share: f64) -> Self {
        self.hedge_budget = share.clamp(0.0, 1.0);
        self
    }

    /// How long a read may take, all attempts included (default 1 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long connecting to a node may take (default 500 ms).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How often the view is fetched whatever the watch stream does (default 10 s).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The longest key the client sends (default 64 KiB, the nodes' default).
    pub fn max_key_bytes(mut self, limit: usize) -> Self {
        self.max_key_bytes = limit;
        self
    }

    /// Connects to the nodes over TLS.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: tonic::transport::ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Learns the cluster from the first seed that answers and starts keeping its view.
    /// Fails with every seed tried and why if none answers, or if the cluster is not the
    /// one asked for or does not serve the store.
    pub async fn build(self) -> Result<Client, BuildError> {
        if self.seeds.is_empty() {
            return Err(BuildError::NoSeeds);
        }
        let channels = Arc::new(channels::Channels::new(
            self.connect_timeout,
            #[cfg(feature = "tls")]
            self.tls.clone(),
        ));
        let mut tried = Vec::new();
        let mut first = None;
        for seed in &self.seeds {
            let channel = channels.get(seed).map_err(|reason| BuildError::BadSeed {
                seed: seed.clone(),
                reason,
            })?;
            match metadata::fetch(channel).await {
                Ok(answer) => {
                    if let Some(expected) = &self.cluster_id
                        && answer.cluster_id != *expected
                    {
                        return Err(BuildError::WrongCluster {
                            seed: seed.clone(),
                            expected: expected.clone(),
                            found: answer.cluster_id,
                        });
                    }
                    first = Some(answer);
                    break;
                }
                Err(reason) => tried.push((seed.clone(), reason)),
            }
        }
        let first = first.ok_or(BuildError::Unreachable { tried })?;
        let cache = Arc::new(metadata::MetadataCache::new(&first, self.seeds.clone()));
        let store = cache
            .store(&self.store)
            .ok_or_else(|| BuildError::UnknownStore {
                store: self.store.clone(),
                served: cache.store_names(),
            })?;
        let keeper = tokio::spawn(
            cache
                .clone()
                .keep_current(channels.clone(), self.poll_interval),
        );
        Ok(Client {
            inner: Arc::new(Inner {
                builder: self,
                partitions: store.partitions,
                cache,
                channels,
                counters: Counters::default(),
                latencies: Mutex::new(Latencies::default()),
                read_seed: AtomicU64::new(0),
                _keeper: KeeperTask(keeper),
            }),
        })
    }
}

/// A handle on a kstore cluster. Cheap to clone; clones share connections and the view.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    builder: ClientBuilder,
    partitions: u32,
    cache: Arc<metadata::MetadataCache>,
    channels: Arc<channels::Channels>,
    counters: Counters,
    latencies: Mutex<Latencies>,
    read_seed: AtomicU64,
    _keeper: KeeperTask,
}

#[derive(Debug)]
struct KeeperTask(tokio::task::JoinHandle<()>);

impl Drop for KeeperTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Recent read latencies, for percentile hedging.
#[derive(Debug, Default)]
struct Latencies {
    recent: std::collections::VecDeque<Duration>,
}

impl Latencies {
    const KEEP: usize = 1_024;

    fn record(&mut self, latency: Duration) {
        if self.recent.len() == Self::KEEP {
            self.recent.pop_front();
        }
        self.recent.push_back(latency);
    }

    fn quantile(&self, q: f64) -> Option<Duration> {
        if self.recent.len() < 20 {
            return None;
        }
        let mut sorted: Vec<Duration> = self.recent.iter().copied().collect();
        sorted.sort_unstable();
        let index = ((sorted.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        Some(sorted[index])
    }
}

/// What one attempt came to.
enum Outcome {
    Answered(kstore_proto::v1::GetResponse),
    Failed(AttemptError, Option<PartitionHolders>),
}

impl Client {
    /// Returns a builder.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Returns the store's partition count.
    pub fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    /// Returns the client's current view of the cluster.
    pub fn view(&self) -> Arc<ClusterView> {
        self.inner.cache.view()
    }

    /// Returns the cluster's id.
    pub fn cluster_id(&self) -> &str {
        self.inner.cache.cluster_id()
    }

    /// Fetches a fresh view now (reads do this by themselves when they need to).
    pub async fn refresh(&self) -> bool {
        self.inner.cache.refresh(&self.inner.channels).await
    }

    /// Returns what the client has done so far.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Stats {
            reads: get(&c.reads),
            first_hop_answers: get(&c.first_hop_answers),
            fallback_answers: get(&c.fallback_answers),
            hedges_sent: get(&c.hedges_sent),
            hedges_won: get(&c.hedges_won),
            misroutes_corrected: get(&c.misroutes_corrected),
            metadata_refreshes: self.inner.cache.refreshes.load(Ordering::Relaxed),
        }
    }

    /// Reads a key's value as raw bytes, with the client's defaults.
    pub async fn get(&self, key: &[u8]) -> Result<Answer<Vec<u8>>, ReadError> {
        self.get_with(key, &ReadOptions::default()).await
    }

    /// Reads a key's value as a protobuf message (such as `kstore.v1.CustomerFeatures`).
    pub async fn get_as<M: prost::Message + Default>(
        &self,
        key: &[u8],
    ) -> Result<Answer<M>, ReadError> {
        let answer = self.get(key).await?;
        decode(answer)
    }

    /// Reads a key's value as raw bytes, with per-read settings.
    pub async fn get_with(
        &self,
        key: &[u8],
        options: &ReadOptions,
    ) -> Result<Answer<Vec<u8>>, ReadError> {
        let partition = self.check_key(key)?;
        let response = self.read(key, partition, options).await?;
        Ok(response)
    }

    /// Returns the key's partition, or why the key is refused before any network call.
    fn check_key(&self, key: &[u8]) -> Result<u32, ReadError> {
        if key.is_empty() {
            return Err(ReadError::EmptyKey);
        }
        let limit = self.inner.builder.max_key_bytes;
        if key.len() > limit {
            return Err(ReadError::KeyTooLarge {
                len: key.len(),
                limit,
            });
        }
        Ok(partition_for_key(key, self.inner.partitions))
    }

    /// Returns the plan for a read of `partition`, leaving out nodes already asked.
    fn plan(&self, partition: u32, options: &ReadOptions, asked: &[String]) -> Vec<Target> {
        let view = self.inner.cache.view();
        let policy = options.policy.unwrap_or(self.inner.builder.policy);
        let seed = self.inner.read_seed.fetch_add(1, Ordering::Relaxed);
        let channels = &self.inner.channels;
        plan(
            &view,
            partition,
            policy,
            options.min_input_offset,
            &|a| channels.in_flight(a),
            seed,
        )
        .into_iter()
        .filter(|t| !asked.contains(&t.node_id))
        .collect()
    }

    fn hedge_delay(&self, hedge: Hedge) -> Option<Duration> {
        match hedge {
            Hedge::Off => None,
            Hedge::After(delay) => Some(delay),
            Hedge::Percentile { quantile, min, max } => Some(
                self.inner
                    .latencies
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .quantile(quantile)
                    .unwrap_or(max)
                    .clamp(min, max),
            ),
        }
    }

    fn hedge_allowed(&self) -> bool {
        let reads = self.inner.counters.reads.load(Ordering::Relaxed) as f64;
        let hedges = self.inner.counters.hedges_sent.load(Ordering::Relaxed) as f64;
        // A small allowance lets the first reads of a client hedge too.
        hedges < reads * self.inner.builder.hedge_budget + 10.0
    }

    /// One read: the plan's first copy; the next when one fails (at once) or does not answer
    /// within the hedge delay; the holders a misrouted answer names patch the view and the
    /// plan; all within the request timeout.
    async fn read(
        &self,
        key: &[u8],
        partition: u32,
        options: &ReadOptions,
    ) -> Result<Answer<Vec<u8>>, ReadError> {
        let counters = &self.inner.counters;
        counters.reads.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let timeout = options
            .timeout
            .unwrap_or(self.inner.builder.request_timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        let hedge = self.hedge_delay(options.hedge.unwrap_or(self.inner.builder.hedge));
        let policy = options.policy.unwrap_or(self.inner.builder.policy);

        let mut plan = self.plan(partition, options, &[]);
        if plan.is_empty() {
            // Maybe the view is stale: one refresh, then plan again.
            self.refresh().await;
            plan = self.plan(partition, options, &[]);
        }
        if plan.is_empty() {
            return Err(ReadError::NoCopy {
                partition,
                policy: format!("{policy:?}"),
            });
        }
        let mut route = Route {
            partition,
            plan: plan.iter().map(|t| t.node_id.clone()).collect(),
            attempts: Vec::new(),
        };
        let mut pending = plan.into_iter();
        let mut asked: Vec<String> = Vec::new();
        let mut running: JoinSet<(usize, Instant, Outcome)> = JoinSet::new();
        // Attempt index → (target, is hedge).
        let mut sent: Vec<(Target, bool)> = Vec::new();
        let mut replanned = false;
        let mut hedge_at = hedge.map(|d| tokio::time::Instant::now() + d);

        let start = |target: Target,
                     is_hedge: bool,
                     running: &mut JoinSet<_>,
                     sent: &mut Vec<(Target, bool)>,
                     asked: &mut Vec<String>| {
            let index = sent.len();
            asked.push(target.node_id.clone());
            let attempt = self.attempt(key, &target, options, deadline);
            sent.push((target, is_hedge));
            running.spawn(async move {
                let begun = Instant::now();
                (index, begun, attempt.await)
            });
        };
        if let Some(first) = pending.next() {
            start(first, false, &mut running, &mut sent, &mut asked);
        }
        loop {
            let hedge_due = hedge_at.filter(|_| running.len() == 1);
            tokio::select! {
                joined = running.join_next(), if !running.is_empty() => {
                    let Some(Ok((index, begun, outcome))) = joined else { continue };
                    let (target, is_hedge) = sent[index].clone();
                    let elapsed = begun.elapsed();
                    match outcome {
                        Outcome::Answered(response) => {
                            route.attempts.push(Attempt {
                                node_id: target.node_id.clone(),
                                address: target.address.clone(),
                                hedge: is_hedge,
                                elapsed,
                                error: None,
                            });
                            // The others still running are cancelled when `running` drops.
                            for (other, (t, h)) in sent.iter().enumerate() {
                                if other != index && !route.attempts.iter().any(|a| a.node_id == t.node_id) {
                                    route.attempts.push(Attempt {
                                        node_id: t.node_id.clone(),
                                        address: t.address.clone(),
                                        hedge: *h,
                                        elapsed: Duration::ZERO,
                                        error: Some(AttemptError::Cancelled),
                                    });
                                }
                            }
                            if index == 0 {
                                counters.first_hop_answers.fetch_add(1, Ordering::Relaxed);
                            } else {
                                counters.fallback_answers.fetch_add(1, Ordering::Relaxed);
                            }
                            if is_hedge {
                                counters.hedges_won.fetch_add(1, Ordering::Relaxed);
                            }
                            self.inner
                                .latencies
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .record(started.elapsed());
                            return Ok(answer_of(response, partition, route));
                        }
                        Outcome::Failed(error, hint) => {
                            route.attempts.push(Attempt {
                                node_id: target.node_id.clone(),
                                address: target.address.clone(),
                                hedge: is_hedge,
                                elapsed,
                                error: Some(error.clone()),
                            });
                            match &error {
                                AttemptError::Status { code, .. } if !retriable(*code) => {
                                    return Err(ReadError::Rejected { partition, error, attempts: route.attempts });
                                }
                                AttemptError::NotHosted => {
                                    if let Some(hint) = hint {
                                        self.inner.cache.apply_hint(&hint);
                                        counters.misroutes_corrected.fetch_add(1, Ordering::Relaxed);
                                    }
                                    // The rest of the plan came from the stale view.
                                    pending = self.plan(partition, options, &asked).into_iter();
                                    let cache = self.inner.cache.clone();
                                    let channels = self.inner.channels.clone();
                                    tokio::spawn(async move { cache.refresh(&channels).await });
                                }
                                AttemptError::Unreachable(_) | AttemptError::TimedOut => {
                                    self.inner.cache.suspect(&target.node_id);
                                }
                                _ => {}
                            }
                            if running.is_empty() {
                                let mut next = pending.next();
                                if next.is_none() && !replanned {
                                    // Every planned copy failed: fetch a fresh view once.
                                    replanned = true;
                                    self.refresh().await;
                                    pending = self.plan(partition, options, &asked).into_iter();
                                    next = pending.next();
                                }
                                match next {
                                    Some(target) => start(target, false, &mut running, &mut sent, &mut asked),
                                    None => return Err(ReadError::Failed { partition, attempts: route.attempts }),
                                }
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(hedge_due.unwrap_or(deadline)), if hedge_due.is_some() => {
                    hedge_at = None;
                    if self.hedge_allowed() && let Some(target) = pending.next() {
                        counters.hedges_sent.fetch_add(1, Ordering::Relaxed);
                        start(target, true, &mut running, &mut sent, &mut asked);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    for (t, h) in &sent {
                        if !route.attempts.iter().any(|a| a.node_id == t.node_id) {
                            route.attempts.push(Attempt {
                                node_id: t.node_id.clone(),
                                address: t.address.clone(),
                                hedge: *h,
                                elapsed: started.elapsed(),
                                error: Some(AttemptError::TimedOut),
                            });
                        }
                    }
                    return Err(ReadError::TimedOut { partition, timeout, attempts: route.attempts });
                }
            }
        }
    }

    /// One attempt: a Get with `no_forward`, to one node, until `deadline`.
    fn attempt(
        &self,
        key: &[u8],
        target: &Target,
        options: &ReadOptions,
        deadline: tokio::time::Instant,
    ) -> impl std::future::Future<Output = Outcome> + Send + 'static {
        let request = GetRequest {
            store: self.inner.builder.store.clone(),
            key: key.to_vec(),
            partition: None,
            options: Some(kstore_proto::v1::ReadOptions {
                min_input_offset: options.min_input_offset,
                no_forward: true,
            }),
        };
        let channel = self.inner.channels.start_read(&target.address);
        async move {
            let (channel, _in_flight) = match channel {
                Ok(channel) => channel,
                Err(reason) => return Outcome::Failed(AttemptError::Unreachable(reason), None),
            };
            let mut client = QueryClient::new(channel);
            let mut request = tonic::Request::new(request);
            request.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
            match tokio::time::timeout_at(deadline, client.get(request)).await {
                Ok(Ok(response)) => Outcome::Answered(response.into_inner()),
                Ok(Err(status)) => classify(&status),
                Err(_) => Outcome::Failed(AttemptError::TimedOut, None),
            }
        }
    }

    /// Reads many keys: grouped by the node each one's plan asks first, one MultiGet per
    /// node in parallel; the keys of a group that fails (or that a node no longer holds)
    /// are read again one by one through their fallbacks. A key's failure is its own; the
    /// call itself does not fail.
    pub async fn multi_get(&self, keys: &[&[u8]]) -> Vec<Result<Answer<Vec<u8>>, ReadError>> {
        let options = ReadOptions::default();
        let mut results: Vec<Option<Result<Answer<Vec<u8>>, ReadError>>> = vec![None; keys.len()];
        let mut groups: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
        for (index, key) in keys.iter().enumerate() {
            match self.check_key(key) {
                Err(error) => results[index] = Some(Err(error)),
                // A key with no copy planned goes the single-key way, which says why.
                Ok(partition) => {
                    if let Some(target) = self.plan(partition, &options, &[]).into_iter().next() {
                        groups
                            .entry((target.node_id, target.address))
                            .or_default()
                            .push(index);
                    }
                }
            }
        }
        let timeout = self.inner.builder.request_timeout;
        let mut calls = JoinSet::new();
        for ((node_id, address), indexes) in groups {
            let request = MultiGetRequest {
                store: self.inner.builder.store.clone(),
                keys: indexes.iter().map(|&i| keys[i].to_vec()).collect(),
                options: Some(kstore_proto::v1::ReadOptions {
                    min_input_offset: None,
                    no_forward: true,
                }),
            };
            let channel = self.inner.channels.start_read(&address);
            calls.spawn(async move {
                let answer = async {
                    let (channel, _in_flight) = channel.ok()?;
                    let mut request = tonic::Request::new(request);
                    request.set_timeout(timeout);
                    let response =
                        tokio::time::timeout(timeout, QueryClient::new(channel).multi_get(request))
                            .await
                            .ok()?
                            .ok()?;
                    Some(response.into_inner())
                };
                (node_id, address, indexes, answer.await)
            });
        }
        while let Some(Ok((node_id, address, indexes, answer))) = calls.join_next().await {
            let Some(answer) = answer else { continue };
            for hint in &answer.holders {
                self.inner.cache.apply_hint(hint);
            }
            for (index, result) in indexes.into_iter().zip(answer.results) {
                if result.error != 0 {
                    continue;
                }
                if let Some(response) = result.result {
                    let partition = partition_for_key(keys[index], self.inner.partitions);
                    let route = Route {
                        partition,
                        plan: vec![node_id.clone()],
                        attempts: vec![Attempt {
                            node_id: node_id.clone(),
                            address: address.clone(),
                            hedge: false,
                            elapsed: Duration::ZERO,
                            error: None,
                        }],
                    };
                    self.inner.counters.reads.fetch_add(1, Ordering::Relaxed);
                    self.inner
                        .counters
                        .first_hop_answers
                        .fetch_add(1, Ordering::Relaxed);
                    results[index] = Some(Ok(answer_of(response, partition, route)));
                }
            }
        }
        // What no group answered goes through the single-key path and its fallbacks.
        let mut retries = JoinSet::new();
        for (index, result) in results.iter().enumerate() {
            if result.is_none() {
                let client = self.clone();
                let key = keys[index].to_vec();
                retries.spawn(async move { (index, client.get_with(&key, &options).await) });
            }
        }
        while let Some(Ok((index, result))) = retries.join_next().await {
            results[index] = Some(result);
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or(Err(ReadError::Failed {
                    partition: 0,
                    attempts: Vec::new(),
                }))
            })
            .collect()
    }
}

/// Whether another copy may answer where this one failed with `code`.
fn retriable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted
    )
}

/// Turns a node's error answer into an attempt error, with the holders it named.
fn classify(status: &tonic::Status) -> Outcome {
    let reason = status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default();
    if reason == ErrorReason::PartitionNotHosted.as_str_name() {
        let hint = tonic_types::pb::Status::decode(status.details())
            .ok()
            .and_then(|rich| {
                rich.details
                    .into_iter()
                    .find(|any| any.type_url == PARTITION_HOLDERS_TYPE_URL)
            })
            .and_then(|any| PartitionHolders::decode(any.value.as_slice()).ok());
        return Outcome::Failed(AttemptError::NotHosted, hint);
    }
    let error = match status.code() {
        tonic::Code::Unavailable if reason.is_empty() => {
            AttemptError::Unreachable(status.message().to_owned())
        }
        tonic::Code::DeadlineExceeded => AttemptError::TimedOut,
        code => AttemptError::Status {
            code,
            reason,
            message: status.message().to_owned(),
        },
    };
    Outcome::Failed(error, None)
}

fn answer_of(
    response: kstore_proto::v1::GetResponse,
    partition: u32,
    route: Route,
) -> Answer<Vec<u8>> {
    let read = response.read.unwrap_or_default();
    let value = match response.value {
        Some(get_response::Value::Raw(bytes)) => Some(bytes),
        Some(get_response::Value::Message(any)) => Some(any.value),
        None => None,
    };
    Answer {
        value: if response.found { value } else { None },
        read: ReadInfo {
            partition,
            node_id: read.node_id.clone(),
            role: read.role(),
            changelog_offset: read.changelog_offset,
            input_offset: read.input_offset,
            lag: read.lag,
        },
        route,
    }
}

fn decode<M: prost::Message + Default>(answer: Answer<Vec<u8>>) -> Result<Answer<M>, ReadError> {
    let value = match answer.value {
        Some(bytes) => Some(
            M::decode(bytes.as_slice()).map_err(|error| ReadError::Decode {
                partition: answer.read.partition,
                type_name: std::any::type_name::<M>(),
                reason: error.to_string(),
            })?,
        ),
        None => None,
    };
    Ok(Answer {
        value,
        read: answer.read,
        route: answer.route,
    })
}
