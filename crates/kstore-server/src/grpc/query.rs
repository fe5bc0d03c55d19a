//! The Query service: partition-direct point reads, each answer with its staleness.
//!
//! A read computes the key's partition with Kafka's partitioner (or checks the one given)
//! and reads only that partition's store. RocksDB answers from memory (memtables and block
//! cache) on the async worker, without I/O; a read that needs the disk goes to the blocking
//! pool, so that a slow disk never holds an async worker. A read with a position bound
//! waits for its copy to reach it, until the request's deadline.
//!
//! A read (Get, MultiGet or a Scan page) of a partition this node holds no copy of is
//! forwarded once to the best holder in the cluster view (see [`super::forward`]), unless the caller asked for no forwarding or
//! the read was forwarded already: then it fails with PARTITION_NOT_HOSTED and the holders.
//!
//! Metadata answers with the cluster-wide view that gossip keeps; WatchMetadata streams it,
//! once now and again on every change.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kstore_core::cluster::ClusterView;
use kstore_core::partitioner::partition_for_key;
use kstore_core::routing::fanout::FanOut;
use kstore_core::routing::{Target, forward_plan};
use kstore_proto::v1::query_client::QueryClient;
use kstore_proto::v1::query_server::Query;
use kstore_proto::v1::{
    ErrorReason, GetRequest, GetResponse, KeyResult, MetadataRequest, MetadataResponse,
    MultiGetRequest, MultiGetResponse, PartitionHolders, ReadMetadata, ReadOptions, Role,
    ScanEntry, ScanRequest, ScanResponse, StoreInfo, get_response, scan_entry,
};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tonic_types::StatusExt;

use super::error::ReadError;
use super::forward::{self, FORWARDED_READS, Forwarded, Peers};
use crate::access::Access;
use crate::config::NodeConfig;
use crate::registry::{PartitionCopy, Registry};
use crate::store::{MemoryRead, Position, Positioned, ScanPage};

/// Answers a bounded read this long before the caller's deadline, so that the answer (an
/// error carrying the copy's position) still reaches the caller.
const DEADLINE_MARGIN: Duration = Duration::from_millis(5);

/// A read answers this long before the node's request timeout at the latest (at most a
/// tenth of it), so that a read waiting for its position bound says where its copy stands
/// rather than being cut off.
const TIMEOUT_MARGIN: Duration = Duration::from_millis(50);

/// The Query service of one node.
#[derive(Debug, Clone)]
pub struct QueryService {
    registry: Arc<Registry>,
    config: Arc<NodeConfig>,
    view: watch::Receiver<Arc<ClusterView>>,
    value_type_url: Option<String>,
    peers: Arc<Peers>,
    access: Access,
}

/// A copy that is not the active (a standby, or a copy restoring) answers for itself unless
/// a live copy elsewhere is at least this many input records fresher (then the read is
/// forwarded there, and answered locally only if that fails).
const STALE_COPY_FORWARD_MARGIN: i64 = 1_000;

/// How many keys a Scan page holds when the request gives no limit.
const DEFAULT_SCAN_PAGE: usize = 100;

/// A Scan page ends once its keys and values hold this many bytes (well within gRPC's
/// default 4 MiB message limit together with the rest of the answer).
const MAX_SCAN_PAGE_BYTES: usize = 3 << 20;

/// What came of forwarding the keys of a MultiGet: each key's index in the request, and its
/// outcome.
type ForwardedKeys = tokio::task::JoinHandle<Vec<(usize, u32, Forwarded<KeyResult>)>>;

/// A stored value as a read answers it.
enum StoredValue {
    /// As the store's protobuf type, so that grpcurl prints it as JSON.
    Typed(prost_types::Any),
    /// As the stored bytes, when the node does not know their type.
    Raw(Vec<u8>),
}

impl From<StoredValue> for get_response::Value {
    fn from(value: StoredValue) -> Self {
        match value {
            StoredValue::Typed(any) => get_response::Value::Message(any),
            StoredValue::Raw(bytes) => get_response::Value::Raw(bytes),
        }
    }
}

impl From<StoredValue> for scan_entry::Value {
    fn from(value: StoredValue) -> Self {
        match value {
            StoredValue::Typed(any) => scan_entry::Value::Message(any),
            StoredValue::Raw(bytes) => scan_entry::Value::Raw(bytes),
        }
    }
}

impl QueryService {
    /// Returns the service; values are returned as `Any` of `value_type_url` if given, and
    /// Metadata describes `view`.
    pub fn new(
        registry: Arc<Registry>,
        config: Arc<NodeConfig>,
        view: watch::Receiver<Arc<ClusterView>>,
        value_type_url: Option<String>,
    ) -> Self {
        QueryService {
            registry,
            view,
            value_type_url,
            peers: Arc::new(Peers::default()),
            access: Access::from_config(&config),
            config,
        }
    }

    /// The service with reads forwarded to other nodes over `tls` (the node's identity), if
    /// set.
    pub fn with_tls(mut self, tls: Option<Arc<crate::tls::Tls>>) -> Self {
        self.peers = Arc::new(Peers::with_tls(tls));
        self
    }

    /// Whether a read of this key is better answered elsewhere: the local copy is not the
    /// active (a partition just assigned here replaying its changelog, or a standby behind,
    /// for example one just rebuilt from an old backup because its disk had no room for a
    /// peer's snapshot) and a live copy on another node is much fresher. Returns that
    /// partition.
    fn fresher_elsewhere(&self, request: &GetRequest) -> Option<u32> {
        let partition = self.partition_of(&request.key, request.partition).ok()?;
        let copy = self.registry.get(partition as i32)?;
        if copy.role() == Role::Active {
            return None;
        }
        let view = self.view.borrow();
        let best = view
            .forward_targets(partition, self.registry.node_id())
            .into_iter()
            .next()?;
        // By position as well as by lag: a copy whose node has not yet looked at the input's
        // end (one just rebuilt from nothing) states no lag, however far behind it is.
        let trails_by =
            (best.copy.input_offset - copy.position().input_next).max(copy.lag() - best.copy.lag);
        (trails_by > STALE_COPY_FORWARD_MARGIN).then_some(partition)
    }

    /// The end of `partition`'s input as far as the cluster view shows: the furthest any
    /// holder has seen (what it reflects plus its lag). At most the true end.
    fn input_end_in_view(&self, partition: u32) -> i64 {
        self.view
            .borrow()
            .holders(partition)
            .iter()
            .map(|holder| holder.copy.input_offset + holder.copy.lag)
            .max()
            .unwrap_or(0)
    }

    /// Refuses a read marked as forwarded by another node unless it carries the cluster's
    /// secret: only nodes forward, and a forwarded read is answered by this node's copy
    /// alone.
    fn check_forwarded<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if forward::was_forwarded(request) {
            self.access.node(request)?;
        }
        Ok(())
    }

    /// Returns who holds `partition`, as this node's view says.
    fn holders(&self, partition: u32) -> PartitionHolders {
        self.view.borrow().holders_proto(partition)
    }

    /// Returns the fan-out of keys of `key_partitions` over their live holders elsewhere,
    /// as this node's view says.
    fn forward_fanout(&self, key_partitions: Vec<u32>) -> FanOut {
        let view = self.view.borrow().clone();
        let this_node = self.registry.node_id();
        FanOut::new(key_partitions, |partition| {
            self.peers.order(forward_plan(&view, partition, this_node))
        })
    }

    /// Forwards a Get of `partition` to its live holders (see [`forward_one`]).
    async fn forward_get(
        &self,
        partition: u32,
        request: GetRequest,
        deadline: Instant,
    ) -> Result<Response<GetResponse>, Status> {
        self.forward_one(
            "get",
            partition,
            request,
            deadline,
            |mut client, request| async move { client.get(request).await },
        )
        .await
    }

    /// Forwards a read of one partition to its live holders (see
    /// [`forward::forward_keys`]) with `send`. A holder's answer, error or not, is the
    /// answer. With no holder reachable: PARTITION_NOT_HOSTED; with none answering before
    /// `deadline`: NO_ANSWER.
    async fn forward_one<T, R, F, Fut>(
        &self,
        method: &'static str,
        partition: u32,
        request: T,
        deadline: Instant,
        send: F,
    ) -> Result<Response<R>, Status>
    where
        T: Clone,
        R: Send + 'static,
        F: Fn(QueryClient<Channel>, Request<T>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>> + Send + 'static,
    {
        let fanout = self.forward_fanout(vec![partition]);
        let peers = self.peers.clone();
        let node_id = self.registry.node_id().to_owned();
        let secret = self.config.cluster_secret.clone();
        let call = |target: &Target, _: &[usize], timeout: Duration| {
            let client = peers.client(&target.address);
            let request = forward::forwarded(request.clone(), &node_id, secret.as_deref(), timeout);
            let answer = client.map(|client| send(client, request));
            async move {
                let response = answer.map_err(Status::unavailable)?.await?;
                Ok(vec![Some(response.into_inner())])
            }
        };
        let stalled = |target: &Target| self.peers.stalled(&target.node_id);
        let forwarded = forward::forward_keys(fanout, deadline.into(), call, stalled).await;
        let outcome = forwarded.into_iter().next().unwrap_or(Forwarded::NoHolder);
        count_forwarded(method, &outcome);
        match outcome {
            Forwarded::Answered(response) => Ok(Response::new(response)),
            Forwarded::Refused(status) => Err(status),
            Forwarded::NoAnswer { asked } => Err(ReadError::NoAnswer { partition, asked }.into()),
            Forwarded::NoHolder => Err(ReadError::PartitionNotHosted {
                partition,
                holders: self.holders(partition),
            }
            .into()),
        }
    }

    /// Describes the store for Metadata.
    pub(crate) fn store_info(&self) -> StoreInfo {
        StoreInfo {
            name: self.config.store.clone(),
            partitions: self.registry.partitions(),
            input_topic: self.config.inputs()[0].clone(),
            input_topics: self.config.inputs().to_vec(),
            changelog_topic: self.config.changelog_topic(),
            value_type: self
                .value_type_url
                .as_deref()
                .and_then(|url| url.rsplit('/').next())
                .unwrap_or_default()
                .to_owned(),
        }
    }

    /// Describes the store and the cluster view for Metadata and WatchMetadata.
    pub(crate) fn metadata_of(&self, view: &ClusterView) -> MetadataResponse {
        MetadataResponse {
            stores: vec![self.store_info()],
            nodes: view.to_proto_nodes(&self.config.store),
            node_id: self.registry.node_id().to_owned(),
            cluster_id: self.config.cluster_id.clone(),
            view_version: view.version,
        }
    }

    fn check_store(&self, store: &str) -> Result<(), ReadError> {
        if store == self.config.store {
            Ok(())
        } else {
            Err(ReadError::UnknownStore {
                name: store.into(),
                served: self.config.store.clone(),
            })
        }
    }

    fn check_key(&self, key: &[u8]) -> Result<(), ReadError> {
        if key.is_empty() {
            return Err(ReadError::EmptyKey);
        }
        if key.len() > self.config.max_key_bytes {
            return Err(ReadError::KeyTooLarge {
                len: key.len(),
                limit: self.config.max_key_bytes,
            });
        }
        Ok(())
    }

    /// Returns the key's partition, checking the caller's if given.
    fn partition_of(&self, key: &[u8], given: Option<u32>) -> Result<u32, ReadError> {
        let partitions = self.registry.partitions();
        let expected = partition_for_key(key, partitions);
        match given {
            Some(partition) if partition >= partitions => Err(ReadError::PartitionOutOfRange {
                partition,
                partitions,
            }),
            Some(given) if given != expected => Err(ReadError::WrongPartition { given, expected }),
            _ => Ok(expected),
        }
    }

    fn copy(&self, partition: u32) -> Result<Arc<PartitionCopy>, ReadError> {
        self.registry
            .get(partition as i32)
            .ok_or_else(|| ReadError::PartitionNotHosted {
                partition,
                holders: self.holders(partition),
            })
    }

    /// Waits until the copy reflects input offset `min_input_offset`, or the deadline.
    async fn wait_for(
        copy: &PartitionCopy,
        options: Option<&ReadOptions>,
        deadline: Instant,
    ) -> Result<(), ReadError> {
        let Some(wanted) = options.and_then(|o| o.min_input_offset) else {
            return Ok(());
        };
        let reached = |position: &Position| position.input_next > wanted;
        let mut positions = copy.watch_position();
        let waited = tokio::time::timeout_at(deadline.into(), positions.wait_for(reached)).await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            // Timed out, or the copy was dropped: report where it stands.
            _ => Err(ReadError::PositionNotReached {
                partition: copy.partition as u32,
                wanted,
                input_offset: copy.position().input_next,
                lag: copy.lag(),
            }),
        }
    }

    fn read_metadata(&self, copy: &PartitionCopy, position: Position) -> ReadMetadata {
        let (mut lag, input_end_seen_ms) = copy.lag_and_seen_at(position);
        if !copy.input_end_known() {
            // Before this node's first look at the input's end: at least as far behind as the
            // cluster's other copies show, not 0.
            let end = self.input_end_in_view(copy.partition as u32);
            lag = lag.max(end - position.input_next);
        }
        ReadMetadata {
            partition: copy.partition as u32,
            node_id: self.registry.node_id().to_owned(),
            role: copy.role() as i32,
            changelog_offset: position.changelog_next,
            input_offset: position.input_next,
            lag,
            input_end_seen_ms,
        }
    }

    /// A stored value as the store's protobuf type, if the node knows it, or as raw bytes.
    fn stored_value(&self, bytes: Vec<u8>) -> StoredValue {
        match &self.value_type_url {
            Some(type_url) => StoredValue::Typed(prost_types::Any {
                type_url: type_url.clone(),
                value: bytes,
            }),
            None => StoredValue::Raw(bytes),
        }
    }

    fn response(&self, value: Option<Vec<u8>>, read: ReadMetadata) -> GetResponse {
        GetResponse {
            found: value.is_some(),
            value: value.map(|bytes| self.stored_value(bytes).into()),
            read: Some(read),
        }
    }

    async fn get_one(
        &self,
        request: &GetRequest,
        deadline: Instant,
    ) -> Result<GetResponse, (ReadError, Role)> {
        let none = |error| (error, Role::Unspecified);
        self.check_store(&request.store).map_err(none)?;
        self.check_key(&request.key).map_err(none)?;
        let partition = self
            .partition_of(&request.key, request.partition)
            .map_err(none)?;
        let copy = self.copy(partition).map_err(none)?;
        let role = copy.role();
        Self::wait_for(&copy, request.options.as_ref(), deadline)
            .await
            .map_err(|e| (e, role))?;
        // The value and the position it reflects, from one snapshot of the store.
        let read = read_value(&copy, request.key.clone())
            .await
            .map_err(|message| (ReadError::Store { partition, message }, role))?;
        Ok(self.response(read.value, self.read_metadata(&copy, read.position)))
    }

    /// Reads one page of a partition's keys from this node's copy, once it reflects the
    /// request's position bound.
    async fn scan_page(
        &self,
        request: &ScanRequest,
        deadline: Instant,
    ) -> Result<ScanResponse, (ReadError, Role)> {
        let none = |error| (error, Role::Unspecified);
        self.check_store(&request.store).map_err(none)?;
        let partitions = self.registry.partitions();
        if request.partition >= partitions {
            return Err(none(ReadError::PartitionOutOfRange {
                partition: request.partition,
                partitions,
            }));
        }
        let range =
            kstore_core::scan::KeyRange::of_request(&request.prefix, &request.from, &request.to)
                .map_err(|error| none(error.into()))?;
        let range = match &request.after {
            Some(after) => range.after(after, request.descending),
            None => range,
        };
        let limit = match request.limit as usize {
            0 => DEFAULT_SCAN_PAGE,
            asked => asked,
        }
        .min(self.config.max_scan_page);
        let copy = self.copy(request.partition).map_err(none)?;
        let role = copy.role();
        Self::wait_for(&copy, request.options.as_ref(), deadline)
            .await
            .map_err(|e| (e, role))?;
        let reader = copy.clone();
        let descending = request.descending;
        let partition = request.partition;
        let read = tokio::task::spawn_blocking(move || {
            reader
                .store
                .scan_page(&range, descending, limit, MAX_SCAN_PAGE_BYTES)
        })
        .await
        .map_err(|error| error.to_string())
        .and_then(|read| read.map_err(|error| error.to_string()))
        .map_err(|message| (ReadError::Store { partition, message }, role))?;
        let ScanPage { entries, more } = read.value;
        let entries = entries
            .into_iter()
            .map(|(key, bytes)| ScanEntry {
                key,
                value: Some(self.stored_value(bytes).into()),
            })
            .collect();
        Ok(ScanResponse {
            entries,
            more,
            read: Some(self.read_metadata(&copy, read.position)),
        })
    }

    /// Answers one page of a scan from a local copy, or forwards it to a holder when this
    /// node holds no copy of the partition (and `may_forward`).
    async fn scan_or_forward(
        &self,
        request: ScanRequest,
        deadline: Instant,
        may_forward: bool,
    ) -> Result<ScanResponse, Status> {
        let _in_flight = self.registry.read_started();
        let started = Instant::now();
        match self.scan_page(&request, deadline).await {
            Ok(response) => {
                let role = response
                    .read
                    .as_ref()
                    .map_or(Role::Unspecified, |r| r.role());
                record_latency("scan", started, role, "found");
                Ok(response)
            }
            Err((ReadError::PartitionNotHosted { partition, .. }, _)) if may_forward => {
                let send = |mut client: QueryClient<Channel>, request| async move {
                    client.scan(request).await
                };
                let answer = self
                    .forward_one("scan", partition, request, deadline, send)
                    .await;
                let outcome = match &answer {
                    Ok(_) => "forwarded",
                    Err(_) => "forward_failed",
                };
                record_latency("scan", started, Role::Unspecified, outcome);
                answer.map(Response::into_inner)
            }
            Err((error, role)) => {
                record_latency("scan", started, role, error.reason().as_str_name());
                Err(error.into())
            }
        }
    }

    async fn multi_get(
        &self,
        request: MultiGetRequest,
        deadline: Instant,
        may_forward: bool,
    ) -> Result<MultiGetResponse, ReadError> {
        self.check_store(&request.store)?;
        if request.keys.len() > self.config.max_multiget_keys {
            return Err(ReadError::TooManyKeys {
                count: request.keys.len(),
                limit: self.config.max_multiget_keys,
            });
        }
        let mut by_partition: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (index, key) in request.keys.iter().enumerate() {
            self.check_key(key)?;
            by_partition
                .entry(self.partition_of(key, None)?)
                .or_default()
                .push(index);
        }

        let mut results: Vec<KeyResult> = request
            .keys
            .iter()
            .map(|key| KeyResult {
                key: key.clone(),
                result: None,
                error: 0,
            })
            .collect();
        let mut reads = Vec::new();
        let mut not_hosted: Vec<(u32, Vec<usize>)> = Vec::new();
        for (partition, indexes) in by_partition {
            let Some(copy) = self.registry.get(partition as i32) else {
                not_hosted.push((partition, indexes));
                continue;
            };
            if let Err(error) = Self::wait_for(&copy, request.options.as_ref(), deadline).await {
                for index in indexes {
                    results[index].error = error.reason() as i32;
                }
                continue;
            }
            reads.push((copy.clone(), indexes));
        }

        // Keys of partitions held elsewhere: one forwarded MultiGet per holder, running while
        // the local partitions are read.
        let mut holders = Vec::new();
        let forwarded = if may_forward && !not_hosted.is_empty() {
            Some(self.forward_multi_get(&request, not_hosted, deadline))
        } else {
            for (partition, indexes) in not_hosted {
                for index in indexes {
                    results[index].error = ErrorReason::PartitionNotHosted as i32;
                }
                holders.push(self.holders(partition));
            }
            None
        };

        // One consistent read per partition: from memory on this worker where possible (one
        // snapshot), and one trip to the blocking pool (a RocksDB multi-get per partition)
        // for the partitions that need the disk.
        let keys = Arc::new(request.keys);
        let mut values = Vec::with_capacity(reads.len());
        for (copy, indexes) in &reads {
            let wanted: Vec<&[u8]> = indexes.iter().map(|&i| keys[i].as_slice()).collect();
            values.push(copy.store.multi_get_from_memory(&wanted));
        }
        let from_disk: Vec<usize> = (0..values.len())
            .filter(|&i| matches!(values[i], Ok(MemoryRead::NeedsDisk)))
            .collect();
        if !from_disk.is_empty() {
            metrics::counter!(crate::metrics::DISK_READS).increment(from_disk.len() as u64);
            let jobs: Vec<_> = from_disk
                .iter()
                .map(|&i| (reads[i].0.clone(), reads[i].1.clone()))
                .collect();
            let job_keys = keys.clone();
            let read = tokio::task::spawn_blocking(move || {
                jobs.into_iter()
                    .map(|(copy, indexes)| {
                        let wanted: Vec<&[u8]> =
                            indexes.iter().map(|&i| job_keys[i].as_slice()).collect();
                        copy.store.multi_get(&wanted).map(MemoryRead::Answered)
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|error| ReadError::Store {
                partition: 0,
                message: error.to_string(),
            })?;
            for (i, result) in from_disk.into_iter().zip(read) {
                values[i] = result;
            }
        }

        for ((copy, indexes), values) in reads.into_iter().zip(values) {
            match values {
                Ok(MemoryRead::Answered(values)) => {
                    // The values and the position they reflect come from one snapshot.
                    let read = self.read_metadata(&copy, values.position);
                    for (index, value) in indexes.into_iter().zip(values.value) {
                        results[index].result = Some(self.response(value, read.clone()));
                    }
                }
                Ok(MemoryRead::NeedsDisk) | Err(_) => {
                    for index in indexes {
                        results[index].error = ErrorReason::StoreError as i32;
                    }
                }
            }
        }
        if let Some(forwarded) = forwarded {
            self.collect_forwarded(forwarded, &mut results, &mut holders)
                .await;
        }
        Ok(MultiGetResponse { results, holders })
    }

    /// Sends the keys of partitions this node holds no copy of to their live holders, one
    /// MultiGet per holder (see [`forward::forward_keys`]); runs while the local partitions
    /// are read.
    fn forward_multi_get(
        &self,
        request: &MultiGetRequest,
        not_hosted: Vec<(u32, Vec<usize>)>,
        deadline: Instant,
    ) -> ForwardedKeys {
        // The forwarded keys, as (index in the request, partition).
        let forwarded: Vec<(usize, u32)> = not_hosted
            .iter()
            .flat_map(|(partition, indexes)| indexes.iter().map(|&i| (i, *partition)))
            .collect();
        let fanout = self.forward_fanout(forwarded.iter().map(|&(_, p)| p).collect());
        let keys: Arc<Vec<Vec<u8>>> = Arc::new(
            forwarded
                .iter()
                .map(|&(i, _)| request.keys[i].clone())
                .collect(),
        );
        let (store, options) = (request.store.clone(), request.options);
        let peers = self.peers.clone();
        let node_id = self.registry.node_id().to_owned();
        let secret = self.config.cluster_secret.clone();
        let call = move |target: &Target, asked: &[usize], timeout: Duration| {
            let client = peers.client(&target.address);
            let sub = MultiGetRequest {
                store: store.clone(),
                keys: asked.iter().map(|&k| keys[k].clone()).collect(),
                options,
            };
            let request = forward::forwarded(sub, &node_id, secret.as_deref(), timeout);
            let address = target.address.clone();
            async move {
                let mut client = client.map_err(Status::unavailable)?;
                let answer = client.multi_get(request).await.inspect_err(|status| {
                    tracing::debug!(%address, %status, "forwarding a MultiGet failed");
                })?;
                // A key whose partition the holder no longer holds goes to the next holder.
                Ok(answer
                    .into_inner()
                    .results
                    .into_iter()
                    .map(|result| {
                        (result.error() != ErrorReason::PartitionNotHosted).then_some(result)
                    })
                    .collect())
            }
        };
        let peers = self.peers.clone();
        tokio::spawn(async move {
            let stalled = |target: &Target| peers.stalled(&target.node_id);
            let outcomes = forward::forward_keys(fanout, deadline.into(), call, stalled).await;
            forwarded
                .into_iter()
                .zip(outcomes)
                .map(|((index, partition), outcome)| (index, partition, outcome))
                .collect()
        })
    }

    /// Puts the forwarded answers in place. A key no holder answered fails with NO_ANSWER,
    /// one without a reachable holder with PARTITION_NOT_HOSTED (its holders added to
    /// `holders`), one a holder refused with the holder's reason.
    async fn collect_forwarded(
        &self,
        forwarded: ForwardedKeys,
        results: &mut [KeyResult],
        holders: &mut Vec<PartitionHolders>,
    ) {
        let Ok(outcomes) = forwarded.await else {
            return;
        };
        let mut without_holder = std::collections::BTreeSet::new();
        for (index, partition, outcome) in outcomes {
            count_forwarded("multi_get", &outcome);
            match outcome {
                Forwarded::Answered(answer) => {
                    results[index].result = answer.result;
                    results[index].error = answer.error;
                }
                Forwarded::Refused(status) => {
                    let reason = status
                        .get_details_error_info()
                        .and_then(|info| ErrorReason::from_str_name(&info.reason))
                        .unwrap_or(ErrorReason::PartitionNotHosted);
                    results[index].error = reason as i32;
                }
                Forwarded::NoAnswer { .. } => results[index].error = ErrorReason::NoAnswer as i32,
                Forwarded::NoHolder => {
                    results[index].error = ErrorReason::PartitionNotHosted as i32;
                    without_holder.insert(partition);
                }
            }
        }
        holders.extend(without_holder.into_iter().map(|p| self.holders(p)));
    }

    /// Returns the deadline for waiting: the caller's (`grpc-timeout`) less a margin, or
    /// the configured wait; never past the node's request timeout.
    fn deadline<T>(&self, request: &Request<T>) -> Instant {
        let now = Instant::now();
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let wait = match timeout {
            Some(timeout) => timeout.saturating_sub(DEADLINE_MARGIN),
            None => Duration::from_millis(self.config.read_wait_ms),
        };
        // A read never outlives the request timeout, whatever deadline it brings.
        let limit = Duration::from_millis(self.config.limits.request_timeout_ms);
        now + wait.min(limit - TIMEOUT_MARGIN.min(limit / 10))
    }
}

/// The request of a streamed scan's next page after `sent`: after its last key, at most
/// `limit` keys, from a copy no older than the one `sent` read.
fn next_page_request(request: &ScanRequest, sent: &ScanResponse, limit: usize) -> ScanRequest {
    // A copy "reflects offset n" once its input_offset is past n.
    let read_at = sent
        .read
        .as_ref()
        .and_then(|read| (read.input_offset > 0).then(|| read.input_offset - 1));
    let options = request.options.unwrap_or_default();
    ScanRequest {
        after: sent.entries.last().map(|entry| entry.key.clone()),
        limit: limit as u32,
        options: Some(ReadOptions {
            min_input_offset: options.min_input_offset.max(read_at),
            ..options
        }),
        ..request.clone()
    }
}

/// Whether a read may be forwarded: it was not forwarded already and did not ask for no
/// forwarding.
fn may_forward<T>(request: &Request<T>, options: Option<&ReadOptions>) -> bool {
    !forward::was_forwarded(request) && !options.is_some_and(|o| o.no_forward)
}

/// Reads one key of a copy: from memory on the calling async worker (no I/O, so it cannot
/// stall the worker), or, if that needs the disk, on the blocking pool.
async fn read_value(
    copy: &Arc<PartitionCopy>,
    key: Vec<u8>,
) -> Result<Positioned<Option<Vec<u8>>>, String> {
    match copy.store.get_from_memory(&key) {
        Ok(MemoryRead::Answered(read)) => return Ok(read),
        Ok(MemoryRead::NeedsDisk) => {}
        Err(error) => return Err(error.to_string()),
    }
    metrics::counter!(crate::metrics::DISK_READS).increment(1);
    let reader = copy.clone();
    tokio::task::spawn_blocking(move || reader.store.get_positioned(&key))
        .await
        .map_err(|error| error.to_string())?
        .map_err(|error| error.to_string())
}

/// Parses a `grpc-timeout` header value: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    // The unit is the last character, whatever its width (a byte index could split one).
    let (at, _) = value.char_indices().next_back()?;
    let (digits, unit) = value.split_at(at);
    // The gRPC spec allows at most 8 digits; more could overflow below.
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Counts a forwarded key by what came of it.
fn count_forwarded<R>(method: &'static str, outcome: &Forwarded<R>) {
    let outcome = match outcome {
        Forwarded::Answered(_) => "answered",
        Forwarded::Refused(_) => "error",
        Forwarded::NoAnswer { .. } => "no_answer",
        Forwarded::NoHolder => "no_holder",
    };
    metrics::counter!(FORWARDED_READS, "method" => method, "outcome" => outcome).increment(1);
}

fn record_latency(method: &'static str, started: Instant, role: Role, outcome: &'static str) {
    metrics::histogram!(
        crate::metrics::READ_LATENCY,
        "method" => method,
        "role" => role.as_str_name(),
        "outcome" => outcome
    )
    .record(started.elapsed());
}

#[tonic::async_trait]
impl Query for QueryService {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        self.check_forwarded(&request)?;
        let _in_flight = self.registry.read_started();
        let started = Instant::now();
        let deadline = self.deadline(&request);
        let may_forward = may_forward(&request, request.get_ref().options.as_ref());
        let request = request.into_inner();
        if may_forward && let Some(partition) = self.fresher_elsewhere(&request) {
            // Half the time, so that the local copy can still answer if no holder does.
            let elsewhere = started + deadline.saturating_duration_since(started) / 2;
            let forwarded = self
                .forward_get(partition, request.clone(), elsewhere)
                .await;
            if let Ok(answer) = forwarded {
                record_latency("get", started, Role::Unspecified, "forwarded");
                return Ok(answer);
            }
        }
        match self.get_one(&request, deadline).await {
            Ok(response) => {
                let role = response
                    .read
                    .as_ref()
                    .map_or(Role::Unspecified, |r| r.role());
                let outcome = if response.found { "found" } else { "not_found" };
                record_latency("get", started, role, outcome);
                Ok(Response::new(response))
            }
            Err((ReadError::PartitionNotHosted { partition, .. }, _)) if may_forward => {
                let answer = self.forward_get(partition, request, deadline).await;
                let outcome = match &answer {
                    Ok(_) => "forwarded",
                    Err(_) => "forward_failed",
                };
                record_latency("get", started, Role::Unspecified, outcome);
                answer
            }
            Err((error, role)) => {
                record_latency("get", started, role, error.reason().as_str_name());
                Err(error.into())
            }
        }
    }

    async fn multi_get(
        &self,
        request: Request<MultiGetRequest>,
    ) -> Result<Response<MultiGetResponse>, Status> {
        self.check_forwarded(&request)?;
        let _in_flight = self.registry.read_started();
        let started = Instant::now();
        let deadline = self.deadline(&request);
        let may_forward = may_forward(&request, request.get_ref().options.as_ref());
        let result =
            QueryService::multi_get(self, request.into_inner(), deadline, may_forward).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(error) => error.reason().as_str_name(),
        };
        record_latency("multi_get", started, Role::Unspecified, outcome);
        result.map(Response::new).map_err(Status::from)
    }

    async fn metadata(
        &self,
        _request: Request<MetadataRequest>,
    ) -> Result<Response<MetadataResponse>, Status> {
        let view = self.view.borrow().clone();
        Ok(Response::new(self.metadata_of(&view)))
    }

    async fn scan(&self, request: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        self.check_forwarded(&request)?;
        let deadline = self.deadline(&request);
        let may_forward = may_forward(&request, request.get_ref().options.as_ref());
        self.scan_or_forward(request.into_inner(), deadline, may_forward)
            .await
            .map(Response::new)
    }

    type ScanStreamStream =
        std::pin::Pin<Box<dyn Stream<Item = Result<ScanResponse, Status>> + Send>>;

    async fn scan_stream(
        &self,
        request: Request<ScanRequest>,
    ) -> Result<Response<Self::ScanStreamStream>, Status> {
        self.check_forwarded(&request)?;
        // Each page may wait as long as the call's first page may.
        let page_wait = self
            .deadline(&request)
            .saturating_duration_since(Instant::now());
        let may_forward = may_forward(&request, request.get_ref().options.as_ref());
        let mut request = request.into_inner();
        let mut remaining = match request.limit {
            0 => usize::MAX,
            limit => limit as usize,
        };
        let page_size = match request.page_size as usize {
            0 => self.config.max_scan_page,
            asked => asked.min(self.config.max_scan_page),
        };
        request.limit = page_size.min(remaining) as u32;
        // The first page before the stream starts, so that a bad request fails the call.
        let first = self
            .scan_or_forward(request.clone(), Instant::now() + page_wait, may_forward)
            .await?;
        let (pages, stream) = tokio::sync::mpsc::channel(1);
        let service = self.clone();
        tokio::spawn(async move {
            let mut page = Ok(first);
            loop {
                let next = match &page {
                    Ok(sent) => {
                        remaining = remaining.saturating_sub(sent.entries.len());
                        let more = sent.more && remaining > 0 && !sent.entries.is_empty();
                        more.then(|| next_page_request(&request, sent, page_size.min(remaining)))
                    }
                    Err(_) => None,
                };
                // The reader went away: stop reading.
                if pages.send(page).await.is_err() {
                    return;
                }
                let Some(next) = next else { return };
                request = next;
                page = service
                    .scan_or_forward(request.clone(), Instant::now() + page_wait, may_forward)
                    .await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(stream),
        )))
    }

    type WatchMetadataStream =
        std::pin::Pin<Box<dyn Stream<Item = Result<MetadataResponse, Status>> + Send>>;

    async fn watch_metadata(
        &self,
        _request: Request<MetadataRequest>,
    ) -> Result<Response<Self::WatchMetadataStream>, Status> {
        // The current view first, then each new version. A slow reader skips the versions
        // it missed (the watch keeps only the newest), so it never falls behind.
        let service = self.clone();
        let views = WatchStream::new(self.view.clone());
        let stream = views.map(move |view| Ok(service.metadata_of(&view)));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Describes a local copy for Metadata and Admin.
pub fn partition_copy(copy: &PartitionCopy) -> kstore_proto::v1::PartitionCopy {
    let position = copy.position();
    kstore_proto::v1::PartitionCopy {
        partition: copy.partition as u32,
        role: copy.role() as i32,
        changelog_offset: position.changelog_next,
        input_offset: position.input_next,
        input_end: copy.input_end(),
        lag: copy.lag_at(position),
        error: copy.held().unwrap_or_default(),
        store: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PartitionStore;
    use crate::store::test_memory as memory;

    const PARTITIONS: u32 = 4;

    /// A store holding `keys` (value = key repeated 50 times) at `position`.
    fn store_with(
        dir: &std::path::Path,
        keys: &[&[u8]],
        position: Position,
    ) -> Arc<PartitionStore> {
        let store = PartitionStore::open(dir, &memory()).unwrap();
        let updates = keys
            .iter()
            .map(|k| (k.to_vec(), Some(k.repeat(50))))
            .collect();
        store.apply(&updates, position).unwrap();
        store
    }

    fn service(registry: Arc<Registry>) -> QueryService {
        let (_, view) = watch::channel(Arc::new(ClusterView::default()));
        QueryService::new(registry, Arc::new(NodeConfig::default()), view, None)
    }

    fn get_request(key: &[u8]) -> Request<GetRequest> {
        Request::new(GetRequest {
            store: "features".into(),
            key: key.to_vec(),
            partition: None,
            options: None,
        })
    }

    #[tokio::test]
    async fn a_restoring_copy_answers_with_its_role_and_lag() {
        let dir = tempfile::tempdir().unwrap();
        let key = b"customer-7";
        let partition = partition_for_key(key, PARTITIONS) as i32;
        let position = Position {
            changelog_next: 5,
            input_next: 40,
        };
        let registry = Arc::new(Registry::new("n1", PARTITIONS));
        registry.track(
            partition,
            store_with(dir.path(), &[key], position),
            Role::Restoring,
            position,
        );
        registry.set_input_end(partition, 100, std::time::SystemTime::now());

        let answer = service(registry)
            .get(get_request(key))
            .await
            .unwrap()
            .into_inner();
        assert!(answer.found);
        assert_eq!(answer.value, Some(get_response::Value::Raw(key.repeat(50))));
        let read = answer.read.unwrap();
        assert_eq!(read.role(), Role::Restoring);
        assert_eq!(read.partition, partition as u32);
        assert_eq!(read.changelog_offset, 5);
        assert_eq!(read.input_offset, 40);
        assert_eq!(read.lag, 60);
    }

    /// Serves `service` on a loopback port; returns its address.
    async fn serve_query(service: QueryService) -> String {
        let incoming =
            tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let address = incoming.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(kstore_proto::v1::query_server::QueryServer::new(service))
                .serve_with_incoming(incoming),
        );
        address
    }

    /// A view in which node `n2`, live at `address`, holds `partition` as its active,
    /// reflecting the input before `input_offset`, with `lag`.
    fn view_with_active_elsewhere(
        address: &str,
        partition: u32,
        input_offset: i64,
        lag: i64,
    ) -> watch::Receiver<Arc<ClusterView>> {
        let node = kstore_core::cluster::NodeEntry {
            node_id: "n2".into(),
            incarnation: 1,
            version: 1,
            gossip_address: String::new(),
            grpc_address: address.into(),
            group_generation: 1,
            status: kstore_core::cluster::NodeStatus::Running,
            liveness: kstore_core::cluster::Liveness::Live,
            conflicting: false,
            load: Default::default(),
            copies: vec![kstore_core::cluster::CopyInfo {
                partition,
                role: Role::Active,
                changelog_offset: input_offset,
                input_offset,
                lag,
            }],
            copy_errors: Default::default(),
        };
        let view = ClusterView {
            cluster_id: "test".into(),
            version: 1,
            nodes: vec![node],
        };
        watch::channel(Arc::new(view)).1
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_standby_far_behind_a_live_active_forwards_the_read_and_one_close_answers_itself() {
        let dir = tempfile::tempdir().unwrap();
        let key = b"customer-7";
        let partition = partition_for_key(key, PARTITIONS);
        // n2's active: current.
        let active_registry = Arc::new(Registry::new("n2", PARTITIONS));
        let current = Position {
            changelog_next: 9_000,
            input_next: 9_000,
        };
        active_registry.track(
            partition as i32,
            store_with(&dir.path().join("n2"), &[key], current),
            Role::Active,
            current,
        );
        active_registry.set_input_end(partition as i32, 9_000, std::time::SystemTime::now());
        let active = serve_query(service(active_registry)).await;
        // n1's standby: rebuilt from an old backup, 5,000 records behind.
        let standby_registry = Arc::new(Registry::new("n1", PARTITIONS));
        let behind = Position {
            changelog_next: 4_000,
            input_next: 4_000,
        };
        standby_registry.track(
            partition as i32,
            store_with(&dir.path().join("n1"), &[key], behind),
            Role::Standby,
            behind,
        );
        standby_registry.set_input_end(partition as i32, 9_000, std::time::SystemTime::now());

        for (active_lag, answered_by, input_offset) in [
            (0, "n2", 9_000),
            (STALE_COPY_FORWARD_MARGIN + 10, "n2", 9_000),
            // Fresher, but by less than the margin: the standby answers for itself.
            (5_000 - STALE_COPY_FORWARD_MARGIN + 1, "n1", 4_000),
        ] {
            let standby = QueryService::new(
                standby_registry.clone(),
                Arc::new(NodeConfig::default()),
                view_with_active_elsewhere(&active, partition, 9_000 - active_lag, active_lag),
                None,
            );
            let answer = standby.get(get_request(key)).await.unwrap().into_inner();
            let read = answer.read.unwrap();
            assert_eq!(
                (read.node_id.as_str(), read.input_offset),
                (answered_by, input_offset),
                "active lag {active_lag}"
            );
            assert_eq!(answer.value, Some(get_response::Value::Raw(key.repeat(50))));
        }

        // The read marked as not to be forwarded is answered by the standby, as it is.
        let standby = QueryService::new(
            standby_registry.clone(),
            Arc::new(NodeConfig::default()),
            view_with_active_elsewhere(&active, partition, 9_000, 0),
            None,
        );
        let no_forward = || {
            let mut request = get_request(key);
            request.get_mut().options = Some(ReadOptions {
                no_forward: true,
                ..ReadOptions::default()
            });
            request
        };
        let read = standby
            .get(no_forward())
            .await
            .unwrap()
            .into_inner()
            .read
            .unwrap();
        assert_eq!((read.node_id.as_str(), read.role()), ("n1", Role::Standby));

        // A copy rebuilt from nothing, before its node has looked at the input's end: it
        // forwards by position, and, asked not to, states the lag the view shows, not 0.
        let empty_registry = Arc::new(Registry::new("n1", PARTITIONS));
        let nothing = Position::default();
        empty_registry.track(
            partition as i32,
            PartitionStore::open(&dir.path().join("n1-empty"), &memory()).unwrap(),
            Role::Restoring,
            nothing,
        );
        let restoring = QueryService::new(
            empty_registry,
            Arc::new(NodeConfig::default()),
            view_with_active_elsewhere(&active, partition, 8_500, 500),
            None,
        );
        let read = restoring
            .get(get_request(key))
            .await
            .unwrap()
            .into_inner()
            .read
            .unwrap();
        assert_eq!((read.node_id.as_str(), read.input_offset), ("n2", 9_000));
        let answer = restoring.get(no_forward()).await.unwrap().into_inner();
        assert!(!answer.found);
        let read = answer.read.unwrap();
        assert_eq!(
            (
                read.node_id.as_str(),
                read.input_offset,
                read.lag,
                read.input_end_seen_ms
            ),
            ("n1", 0, 9_000, 0)
        );
    }

    #[tokio::test]
    async fn a_scan_pages_through_a_partition_in_key_order_and_refuses_bad_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let partition = 1u32;
        let keys: Vec<Vec<u8>> = (0..25)
            .map(|i| format!("key-{i:02}").into_bytes())
            .collect();
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let position = Position {
            changelog_next: 30,
            input_next: 25,
        };
        let registry = Arc::new(Registry::new("n1", PARTITIONS));
        registry.track(
            partition as i32,
            store_with(dir.path(), &refs, position),
            Role::Active,
            position,
        );
        registry.set_input_end(partition as i32, 25, std::time::SystemTime::now());
        let service = service(registry);
        let request = |after: Option<Vec<u8>>| ScanRequest {
            store: "features".into(),
            partition,
            prefix: b"key-1".to_vec(),
            limit: 4,
            descending: true,
            after,
            ..ScanRequest::default()
        };
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = service
                .scan(Request::new(request(after.clone())))
                .await
                .unwrap()
                .into_inner();
            let read = page.read.unwrap();
            assert_eq!((read.input_offset, read.lag), (25, 0));
            for entry in &page.entries {
                assert_eq!(
                    entry.value,
                    Some(scan_entry::Value::Raw(entry.key.repeat(50)))
                );
                seen.push(entry.key.clone());
            }
            if !page.more {
                break;
            }
            after = seen.last().cloned();
        }
        let expected: Vec<Vec<u8>> = (10..20)
            .rev()
            .map(|i| format!("key-{i:02}").into_bytes())
            .collect();
        assert_eq!(seen, expected);

        let refused = |request: ScanRequest| {
            let service = service.clone();
            async move { service.scan(Request::new(request)).await.unwrap_err() }
        };
        let inverted = refused(ScanRequest {
            store: "features".into(),
            partition,
            from: b"b".to_vec(),
            to: b"a".to_vec(),
            ..ScanRequest::default()
        })
        .await;
        assert_eq!(inverted.code(), tonic::Code::InvalidArgument);
        assert!(
            inverted
                .message()
                .contains("from (\"b\") is after its to (\"a\")")
        );
        let both = refused(ScanRequest {
            store: "features".into(),
            partition,
            prefix: b"k".to_vec(),
            to: b"z".to_vec(),
            ..ScanRequest::default()
        })
        .await;
        assert_eq!(both.code(), tonic::Code::InvalidArgument);
        let elsewhere = refused(ScanRequest {
            store: "features".into(),
            partition: 0,
            ..ScanRequest::default()
        })
        .await;
        assert_eq!(elsewhere.code(), tonic::Code::Unavailable);
        let beyond = refused(ScanRequest {
            store: "features".into(),
            partition: PARTITIONS,
            ..ScanRequest::default()
        })
        .await;
        assert_eq!(beyond.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn reads_that_need_the_disk_are_answered() {
        let dir = tempfile::tempdir().unwrap();
        // Keys of one partition, so that one store holds them all.
        let keys: Vec<Vec<u8>> = (0..2000)
            .map(|i| format!("customer-{i}").into_bytes())
            .filter(|k| partition_for_key(k, PARTITIONS) == 1)
            .take(300)
            .collect();
        let key_refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let position = Position {
            changelog_next: 300,
            input_next: 300,
        };
        store_with(dir.path(), &key_refs, position).flush().unwrap();
        // Reopened with an empty block cache: every read needs the disk at first.
        let store = PartitionStore::open(dir.path(), &memory()).unwrap();
        assert_eq!(
            store.get_from_memory(&keys[0]).unwrap(),
            MemoryRead::NeedsDisk
        );
        let registry = Arc::new(Registry::new("n1", PARTITIONS));
        registry.track(1, store, Role::Active, position);
        let service = service(registry);

        let answer = service
            .get(get_request(&keys[0]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            answer.value,
            Some(get_response::Value::Raw(keys[0].repeat(50)))
        );
        let wanted: Vec<Vec<u8>> = keys[100..200].to_vec();
        let wanted_refs: Vec<&[u8]> = wanted.iter().map(Vec::as_slice).collect();
        let copy = service.registry.get(1).unwrap();
        assert_eq!(
            copy.store.multi_get_from_memory(&wanted_refs).unwrap(),
            MemoryRead::NeedsDisk
        );
        let request = Request::new(MultiGetRequest {
            store: "features".into(),
            keys: wanted.clone(),
            options: None,
        });
        let answer = Query::multi_get(&service, request)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.results.len(), 100);
        for (result, key) in answer.results.iter().zip(&wanted) {
            assert_eq!(&result.key, key);
            assert_eq!(result.error, 0);
            let value = result.result.as_ref().unwrap().value.clone();
            assert_eq!(value, Some(get_response::Value::Raw(key.repeat(50))));
        }
    }

    proptest::proptest! {
        #[test]
        fn grpc_timeouts_of_any_text_never_panic_and_valid_ones_parse(
            text in "\\PC{0,12}",
            amount in 0u64..100_000_000,
            unit in proptest::sample::select(vec!["H", "M", "S", "m", "u", "n"]),
        ) {
            let _ = parse_grpc_timeout(&text);
            let valid = format!("{amount}{unit}");
            proptest::prop_assert!(parse_grpc_timeout(&valid).is_some());
        }
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("100u"), Some(Duration::from_micros(100)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None, "more than 8 digits");
        assert_eq!(parse_grpc_timeout("+5S"), None);
        assert_eq!(parse_grpc_timeout("5é"), None, "a unit of two bytes");
        assert_eq!(
            parse_grpc_timeout("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
    }
}
