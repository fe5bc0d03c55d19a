//! The kstore smart client: reads go in one hop to a node that holds a copy of the key's
//! partition, found with Kafka's partitioner and a cached view of the cluster; they fall back
//! to other copies when that node fails, stalls or is slow, and can be hedged.
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
//! A copy that does not answer is not waited for until the deadline: after its share of the
//! time left (half of it when one other copy qualifies) the next copy of the plan is asked
//! as well, and the first answer wins, so a paused or overloaded node delays a read without
//! failing it, before the failure detector has noticed anything. Hedging (by default after
//! the 99th percentile of recent latency, within a budget) asks the next copy sooner when
//! the first is merely slow.
//!
//! Every read is sent with `no_forward`: a node whose copy moved away answers
//! `PARTITION_NOT_HOSTED` with the partition's holders, the client patches its view from
//! them and asks the right node at once, so a stale view is corrected, not hidden behind a
//! server-side forward. The view is kept by a `WatchMetadata` stream, polled as a backstop,
//! and never lost to a failed refresh.

mod builder;
mod channels;
pub mod error;
mod hedge;
pub mod keys;
mod metadata;
mod routing;
mod scan;
#[cfg(feature = "tls")]
mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kstore_core::cluster::ClusterView;
use kstore_core::partitioner::partition_for_key;
use kstore_core::routing::{Target, plan};
use kstore_proto::v1::{PartitionHolders, get_response};

pub use builder::ClientBuilder;
pub use error::{Attempt, AttemptError, BuildError, ReadError, Sent};
pub use hedge::Hedge;
pub use kstore_core::cluster::Role;
pub use kstore_core::routing::ReadPolicy;
pub use metadata::StoreShape;
pub use scan::{
    MAX_PAGE_BYTES, MAX_SCAN_LIMIT, Scan, ScanEntry, ScanPage, ScanToken, ScanTokenError,
};
#[cfg(feature = "tls")]
pub use tls::{TlsFileError, tls_from_files};

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
#[non_exhaustive]
pub struct Stats {
    /// Reads started (a MultiGet counts one per key).
    pub reads: u64,
    /// Reads answered by the first node asked.
    pub first_hop_answers: u64,
    /// Reads answered by another node than the first asked.
    pub fallback_answers: u64,
    /// Hedges sent.
    pub hedges_sent: u64,
    /// Hedges whose answer came first.
    pub hedges_won: u64,
    /// Copies asked because the one asked before had not answered within its share of the
    /// deadline (a stalled or paused node).
    pub failovers: u64,
    /// Misroutes (PARTITION_NOT_HOSTED) corrected from the holders the node named.
    pub misroutes_corrected: u64,
    /// Views fetched from a node (refreshes; the watch stream comes on top).
    pub metadata_refreshes: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) reads: AtomicU64,
    pub(crate) first_hop_answers: AtomicU64,
    pub(crate) fallback_answers: AtomicU64,
    pub(crate) hedges_sent: AtomicU64,
    pub(crate) hedges_won: AtomicU64,
    pub(crate) failovers: AtomicU64,
    pub(crate) misroutes_corrected: AtomicU64,
}

/// A handle on a kstore cluster. Cheap to clone; clones share connections and the view.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) builder: ClientBuilder,
    pub(crate) partitions: u32,
    pub(crate) cache: Arc<metadata::MetadataCache>,
    pub(crate) channels: Arc<channels::Channels>,
    pub(crate) counters: Counters,
    pub(crate) hedger: hedge::Hedger,
    pub(crate) read_seed: AtomicU64,
    pub(crate) _keeper: KeeperTask,
}

#[derive(Debug)]
pub(crate) struct KeeperTask(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for KeeperTask {
    fn drop(&mut self) {
        self.0.abort();
    }
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

    /// Returns the store's partition count and value type, as the cluster described it.
    pub fn store_shape(&self) -> StoreShape {
        self.inner
            .cache
            .store(&self.inner.builder.store)
            .unwrap_or(StoreShape {
                partitions: self.inner.partitions,
                value_type: String::new(),
            })
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
            failovers: get(&c.failovers),
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
        let keys = [key];
        let read = self.read_of(routing::Op::Get, &keys, vec![partition], options)?;
        let context = ReadContext::new(&self.inner, options);
        let mut results =
            routing::read(&context, &self.inner.hedger, &self.inner.counters, &read).await;
        results
            .pop()
            .map(|result| result.map(routing::Routed::into_answer))
            .unwrap_or(Err(ReadError::Failed {
                partition,
                attempts: Vec::new(),
            }))
    }

    /// Reads many keys with the client's defaults: see [`Client::multi_get_with`].
    pub async fn multi_get(&self, keys: &[&[u8]]) -> Vec<Result<Answer<Vec<u8>>, ReadError>> {
        self.multi_get_with(keys, &ReadOptions::default()).await
    }

    /// Reads many keys, answered in the order given: one MultiGet per node the keys' plans
    /// ask first, in parallel; a node's keys go on to their partitions' next copies when it
    /// fails, stalls past its share of the deadline, or (hedging) is slow; a key a node no
    /// longer holds is asked of the holders it names. A key's failure is its own; the call
    /// itself does not fail.
    pub async fn multi_get_with(
        &self,
        keys: &[&[u8]],
        options: &ReadOptions,
    ) -> Vec<Result<Answer<Vec<u8>>, ReadError>> {
        let mut results: Vec<Option<Result<Answer<Vec<u8>>, ReadError>>> =
            keys.iter().map(|_| None).collect();
        // Bad keys fail on their own, before any network call.
        let mut good: Vec<usize> = Vec::with_capacity(keys.len());
        let mut partitions = Vec::with_capacity(keys.len());
        for (index, key) in keys.iter().enumerate() {
            match self.check_key(key) {
                Ok(partition) => {
                    good.push(index);
                    partitions.push(partition);
                }
                Err(error) => results[index] = Some(Err(error)),
            }
        }
        if !good.is_empty() {
            let good_keys: Vec<&[u8]> = good.iter().map(|&i| keys[i]).collect();
            match self.read_of(routing::Op::MultiGet, &good_keys, partitions, options) {
                Ok(read) => {
                    let context = ReadContext::new(&self.inner, options);
                    let answers =
                        routing::read(&context, &self.inner.hedger, &self.inner.counters, &read)
                            .await;
                    for (index, answer) in good.into_iter().zip(answers) {
                        results[index] = Some(answer.map(routing::Routed::into_answer));
                    }
                }
                Err(error) => {
                    for index in good {
                        results[index] = Some(Err(error.clone()));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|result| {
                result.unwrap_or(Err(ReadError::Failed {
                    partition: 0,
                    attempts: Vec::new(),
                }))
            })
            .collect()
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

    /// Returns a read of `keys` with the client's settings and the read's own, or why the
    /// read's own are refused.
    fn read_of<'a>(
        &self,
        op: routing::Op,
        keys: &'a [&'a [u8]],
        partitions: Vec<u32>,
        options: &ReadOptions,
    ) -> Result<routing::Read<'a>, ReadError> {
        let builder = &self.inner.builder;
        let hedge = options.hedge.unwrap_or(builder.hedge);
        if let Err(reason) = hedge.validate() {
            return Err(ReadError::InvalidOption {
                option: "hedge",
                reason,
            });
        }
        let timeout = options.timeout.unwrap_or(builder.request_timeout);
        if timeout.is_zero() {
            return Err(ReadError::InvalidOption {
                option: "timeout",
                reason: "a read needs some time".into(),
            });
        }
        let policy = options.policy.unwrap_or(builder.policy);
        Ok(routing::Read {
            op,
            keys,
            partitions,
            timeout,
            hedge: self.inner.hedger.delay(hedge, op),
            policy: format!("{policy:?}"),
        })
    }
}

/// A read's way to the cluster: the client's view and connections, under the read's policy.
struct ReadContext<'a> {
    inner: &'a Inner,
    policy: ReadPolicy,
    min_input_offset: Option<i64>,
    settings: routing::calls::CallSettings,
}

impl<'a> ReadContext<'a> {
    fn new(inner: &'a Inner, options: &ReadOptions) -> Self {
        ReadContext {
            inner,
            policy: options.policy.unwrap_or(inner.builder.policy),
            min_input_offset: options.min_input_offset,
            settings: routing::calls::CallSettings {
                store: inner.builder.store.clone(),
                min_input_offset: options.min_input_offset,
            },
        }
    }
}

impl routing::Nodes for ReadContext<'_> {
    fn plan(&self, partition: u32, asked: &[String]) -> Vec<Target> {
        let view = self.inner.cache.view();
        let seed = self.inner.read_seed.fetch_add(1, Ordering::Relaxed);
        let channels = &self.inner.channels;
        plan(
            &view,
            partition,
            self.policy,
            self.min_input_offset,
            &|address| channels.in_flight(address),
            seed,
        )
        .into_iter()
        .filter(|target| !asked.contains(&target.node_id))
        .collect()
    }

    fn call(
        &self,
        op: routing::Op,
        target: &Target,
        keys: Vec<Vec<u8>>,
        deadline: tokio::time::Instant,
    ) -> routing::CallFuture {
        routing::calls::call(
            &self.inner.channels,
            &self.settings,
            op,
            target,
            keys,
            deadline,
        )
    }

    fn correct(&self, holders: &PartitionHolders) {
        self.inner.cache.apply_hint(holders);
    }

    fn unresponsive(&self, node_id: &str) {
        self.inner.cache.suspect(node_id);
    }

    fn answered(&self, node_id: &str) {
        self.inner.cache.answered(node_id);
    }

    fn refresh(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async {
            self.inner.cache.refresh(&self.inner.channels).await;
        })
    }

    fn refresh_later(&self) {
        let cache = self.inner.cache.clone();
        let channels = self.inner.channels.clone();
        tokio::spawn(async move { cache.refresh(&channels).await });
    }
}

pub(crate) fn answer_of(
    response: kstore_proto::v1::GetResponse,
    partition: u32,
    route: Route,
) -> Answer<Vec<u8>> {
    let read = read_info(response.read.unwrap_or_default(), partition);
    let value = match response.value {
        Some(get_response::Value::Raw(bytes)) => Some(bytes),
        Some(get_response::Value::Message(any)) => Some(any.value),
        None => None,
    };
    Answer {
        value: if response.found { value } else { None },
        read,
        route,
    }
}

/// How fresh an answer from `partition` is, as the node stated it.
pub(crate) fn read_info(read: kstore_proto::v1::ReadMetadata, partition: u32) -> ReadInfo {
    ReadInfo {
        partition,
        role: read.role(),
        node_id: read.node_id,
        changelog_offset: read.changelog_offset,
        input_offset: read.input_offset,
        lag: read.lag,
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
