//! The client's cached cluster view: kept current by a `WatchMetadata` stream, polled now
//! and then as a backstop, and patched at once from the holders a `PARTITION_NOT_HOSTED`
//! answer carries. A node's entry is versioned (incarnation, then gossip version): older
//! news never replaces newer. Concurrent refreshes share one call. The client learns every
//! node from the views, so the seeds it started with can all be replaced over time.
//!
//! A node that this client saw fail or stall is asked last for a while ([`AVOID_FOR`]),
//! whatever views arrive meanwhile: gossip needs about a second to call it suspect, and a
//! view that still says it is live must not send every read back to it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use kstore_core::cluster::{ClusterView, CopyInfo, Liveness, NodeEntry};
use kstore_proto::v1::query_client::QueryClient;
use kstore_proto::v1::{MetadataRequest, MetadataResponse, PartitionHolders};
use tokio_stream::StreamExt;

use crate::channels::Channels;

/// How soon after a refresh another may go to the network (more share the last result).
const REFRESH_SPACING: Duration = Duration::from_millis(100);

/// How long one Metadata call may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a node that failed or stalled a call is asked last, unless it answers meanwhile.
/// Longer than the failure detector takes to call a silent node suspect.
pub(crate) const AVOID_FOR: Duration = Duration::from_secs(2);

/// A store the cluster serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreShape {
    /// Its partition count.
    pub partitions: u32,
    /// The protobuf type of its values, if known.
    pub value_type: String,
}

/// The cache.
#[derive(Debug)]
pub(crate) struct MetadataCache {
    /// Every node, with its copies of the client's store.
    view: RwLock<Arc<ClusterView>>,
    /// The store the client reads, whose copies the view holds.
    store: String,
    stores: RwLock<HashMap<String, StoreShape>>,
    cluster_id: String,
    seeds: Vec<String>,
    refresh: tokio::sync::Mutex<Option<Instant>>,
    /// Nodes that failed or stalled a call, and until when they are asked last.
    avoided: Mutex<HashMap<String, Instant>>,
    pub(crate) refreshes: AtomicU64,
    pub(crate) hints_applied: AtomicU64,
}

impl MetadataCache {
    /// Returns a cache of the copies of `store`, seeded with a first Metadata answer.
    pub(crate) fn new(first: &MetadataResponse, seeds: Vec<String>, store: &str) -> Self {
        let cache = MetadataCache {
            view: RwLock::new(Arc::new(ClusterView::default())),
            store: store.to_owned(),
            stores: RwLock::new(HashMap::new()),
            cluster_id: first.cluster_id.clone(),
            seeds,
            refresh: tokio::sync::Mutex::new(None),
            avoided: Mutex::new(HashMap::new()),
            refreshes: AtomicU64::new(0),
            hints_applied: AtomicU64::new(0),
        };
        cache.install(first);
        cache
    }

    /// Returns the cluster's id.
    pub(crate) fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// Returns the current view.
    pub(crate) fn view(&self) -> Arc<ClusterView> {
        self.view
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Returns a store's shape, if the cluster serves it.
    pub(crate) fn store(&self, name: &str) -> Option<StoreShape> {
        self.stores
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// Returns the names of the stores the cluster serves.
    pub(crate) fn store_names(&self) -> Vec<String> {
        let stores = self
            .stores
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut names: Vec<String> = stores.keys().cloned().collect();
        names.sort();
        names
    }

    /// Takes a node's answer in: its view replaces the cached one, except for node entries
    /// the cache knows newer news of. An answer from another cluster is ignored.
    pub(crate) fn install(&self, answer: &MetadataResponse) -> bool {
        if answer.cluster_id != self.cluster_id {
            tracing::warn!(
                theirs = %answer.cluster_id,
                ours = %self.cluster_id,
                node = %answer.node_id,
                "ignored a view from another cluster"
            );
            return false;
        }
        {
            let mut stores = self
                .stores
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for store in &answer.stores {
                stores.insert(
                    store.name.clone(),
                    StoreShape {
                        partitions: store.partitions,
                        value_type: store.value_type.clone(),
                    },
                );
            }
        }
        let mut incoming = ClusterView::from_proto_of_store(answer, &self.store);
        self.mark_avoided(&mut incoming);
        let mut view = self
            .view
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *view = Arc::new(merge(&view, incoming));
        true
    }

    /// Marks the nodes this client avoids as suspect in `view` (forgetting those whose time
    /// is up).
    fn mark_avoided(&self, view: &mut ClusterView) {
        let mut avoided = self
            .avoided
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        avoided.retain(|_, until| *until > now);
        for node in &mut view.nodes {
            if avoided.contains_key(&node.node_id) && node.liveness == Liveness::Live {
                node.liveness = Liveness::Suspect;
            }
        }
    }

    /// Patches the cache from the holders a `PARTITION_NOT_HOSTED` answer named: the
    /// partition's copies are what the answering node's view says, for every node the cache
    /// does not know newer news of.
    pub(crate) fn apply_hint(&self, hint: &PartitionHolders) {
        let mut view = self
            .view
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut patched = (**view).clone();
        let partition = hint.partition;
        for node in &mut patched.nodes {
            let named = hint.holders.iter().find(|h| h.node_id == node.node_id);
            match named {
                Some(holder)
                    if (holder.incarnation, holder.version) >= (node.incarnation, node.version) =>
                {
                    set_copy(node, partition, holder.role(), holder.lag);
                    node.liveness = holder.liveness();
                }
                Some(_) => {}
                None => node.copies.retain(|c| c.partition != partition),
            }
        }
        for holder in &hint.holders {
            if !patched.nodes.iter().any(|n| n.node_id == holder.node_id) {
                let mut node = NodeEntry {
                    node_id: holder.node_id.clone(),
                    incarnation: holder.incarnation,
                    version: holder.version,
                    gossip_address: String::new(),
                    grpc_address: holder.grpc_address.clone(),
                    group_generation: 0,
                    status: kstore_core::cluster::NodeStatus::Running,
                    liveness: holder.liveness(),
                    conflicting: false,
                    load: Default::default(),
                    copies: Vec::new(),
                    copy_errors: Default::default(),
                };
                set_copy(&mut node, partition, holder.role(), holder.lag);
                patched.nodes.push(node);
            }
        }
        self.mark_avoided(&mut patched);
        *view = Arc::new(patched);
        self.hints_applied.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks a node suspect in the cache (it failed or stalled a call): it is asked last for
    /// [`AVOID_FOR`], whatever views arrive meanwhile, unless it answers a call.
    pub(crate) fn suspect(&self, node_id: &str) {
        self.avoided
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(node_id.to_owned(), Instant::now() + AVOID_FOR);
        let mut view = self
            .view
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if view
            .nodes
            .iter()
            .any(|n| n.node_id == node_id && n.liveness == Liveness::Live)
        {
            let mut patched = (**view).clone();
            for node in patched.nodes.iter_mut().filter(|n| n.node_id == node_id) {
                node.liveness = Liveness::Suspect;
            }
            *view = Arc::new(patched);
        }
    }

    /// Notes that a node answered a call: it is no longer avoided (the next view says how
    /// live it is).
    pub(crate) fn answered(&self, node_id: &str) {
        let mut avoided = self
            .avoided
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !avoided.is_empty() {
            avoided.remove(node_id);
        }
    }

    /// The addresses to ask for metadata: live nodes of the view, then the seeds.
    pub(crate) fn sources(&self) -> Vec<String> {
        let view = self.view();
        let mut sources: Vec<String> = view
            .nodes
            .iter()
            .filter(|n| n.liveness == Liveness::Live && !n.grpc_address.is_empty())
            .map(|n| n.grpc_address.clone())
            .collect();
        for seed in &self.seeds {
            if !sources.contains(seed) {
                sources.push(seed.clone());
            }
        }
        sources
    }

    /// Fetches a fresh view from the first source that answers. Callers that arrive while a
    /// refresh runs (or right after one) share its result. A failure leaves the cached view
    /// as it was.
    pub(crate) async fn refresh(&self, channels: &Channels) -> bool {
        let mut last = self.refresh.lock().await;
        if last.is_some_and(|at| at.elapsed() < REFRESH_SPACING) {
            return true;
        }
        for address in self.sources() {
            let Ok(channel) = channels.get(&address) else {
                continue;
            };
            match fetch(channel).await {
                Ok(answer) => {
                    self.refreshes.fetch_add(1, Ordering::Relaxed);
                    *last = Some(Instant::now());
                    return self.install(&answer);
                }
                Err(error) => tracing::debug!(%address, %error, "metadata refresh"),
            }
        }
        false
    }

    /// Keeps the view current: a WatchMetadata stream from one node, then from another when
    /// it ends; and a refresh every `poll_interval` whatever happens. Runs until dropped.
    pub(crate) async fn keep_current(
        self: Arc<Self>,
        channels: Arc<Channels>,
        poll_interval: Duration,
    ) {
        let poller = {
            let cache = self.clone();
            let channels = channels.clone();
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(poll_interval);
                loop {
                    ticker.tick().await;
                    cache.refresh(&channels).await;
                }
            })
        };
        let _stop_poller = AbortOnDrop(poller);
        let mut turn = 0usize;
        loop {
            let sources = self.sources();
            let address = sources[turn % sources.len().max(1)].clone();
            turn += 1;
            if let Ok(channel) = channels.get(&address) {
                let mut client = QueryClient::new(channel);
                match client.watch_metadata(MetadataRequest {}).await {
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        while let Some(Ok(answer)) = stream.next().await {
                            self.install(&answer);
                        }
                    }
                    Err(status) => tracing::debug!(%address, %status, "watching metadata"),
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Asks a node for its view.
pub(crate) async fn fetch(channel: tonic::transport::Channel) -> Result<MetadataResponse, String> {
    let mut client = QueryClient::new(channel);
    let mut request = tonic::Request::new(MetadataRequest {});
    request.set_timeout(METADATA_TIMEOUT);
    match tokio::time::timeout(METADATA_TIMEOUT, client.metadata(request)).await {
        Ok(Ok(answer)) => Ok(answer.into_inner()),
        Ok(Err(status)) => Err(crate::error::describe_status(&status)),
        Err(_) => Err(format!("no answer within {METADATA_TIMEOUT:?}")),
    }
}

/// The incoming view, except where the cached one has newer news of a node.
fn merge(cached: &ClusterView, mut incoming: ClusterView) -> ClusterView {
    for node in &mut incoming.nodes {
        if let Some(newer) = cached.nodes.iter().find(|c| {
            c.node_id == node.node_id
                && c.incarnation == node.incarnation
                && c.version > node.version
        }) {
            let liveness = node.liveness;
            *node = newer.clone();
            // Liveness is the answering node's fresh opinion, not part of the node's news.
            node.liveness = liveness;
        }
    }
    incoming
}

fn set_copy(node: &mut NodeEntry, partition: u32, role: kstore_core::cluster::Role, lag: i64) {
    let copy = CopyInfo {
        partition,
        role,
        changelog_offset: 0,
        input_offset: 0,
        lag,
    };
    match node
        .copies
        .binary_search_by_key(&partition, |c| c.partition)
    {
        Ok(index) => {
            let kept = node.copies[index];
            node.copies[index] = CopyInfo {
                changelog_offset: kept.changelog_offset,
                input_offset: kept.input_offset,
                ..copy
            };
        }
        Err(index) => node.copies.insert(index, copy),
    }
}

#[cfg(test)]
mod tests {
    use kstore_proto::v1::{
        Holder, Liveness as ProtoLiveness, NodeInfo, PartitionCopy, Role, StoreInfo,
    };

    use super::*;

    fn answer(nodes: Vec<NodeInfo>) -> MetadataResponse {
        MetadataResponse {
            stores: vec![StoreInfo {
                name: "features".into(),
                partitions: 4,
                input_topic: "orders".into(),
                input_topics: vec!["orders".into()],
                changelog_topic: "kstore-features-changelog".into(),
                value_type: String::new(),
            }],
            nodes,
            node_id: "node-1".into(),
            cluster_id: "test".into(),
            view_version: 1,
        }
    }

    fn node(id: &str, version: u64, copies: &[(u32, Role)]) -> NodeInfo {
        NodeInfo {
            node_id: id.into(),
            grpc_address: format!("{id}:50051"),
            copies: copies
                .iter()
                .map(|(p, r)| PartitionCopy {
                    partition: *p,
                    role: *r as i32,
                    ..Default::default()
                })
                .collect(),
            liveness: ProtoLiveness::Live as i32,
            incarnation: 1,
            version,
            ..Default::default()
        }
    }

    #[test]
    fn older_news_of_a_node_never_replaces_newer() {
        let cache = MetadataCache::new(
            &answer(vec![node("node-1", 5, &[(0, Role::Active)])]),
            vec!["seed:1".into()],
            "features",
        );
        // A slower node's view, with older news of node-1.
        cache.install(&answer(vec![node("node-1", 3, &[(0, Role::Standby)])]));
        assert_eq!(cache.view().nodes[0].version, 5);
        assert_eq!(cache.view().nodes[0].copies[0].role, Role::Active);
        cache.install(&answer(vec![node("node-1", 6, &[(1, Role::Active)])]));
        assert_eq!(cache.view().nodes[0].copies[0].partition, 1);
        // Another cluster's view is ignored.
        let mut foreign = answer(vec![]);
        foreign.cluster_id = "other".into();
        assert!(!cache.install(&foreign));
        assert_eq!(cache.view().nodes.len(), 1);
    }

    #[test]
    fn a_node_that_stalled_is_asked_last_across_views_until_it_answers() {
        let live = |id| node(id, 5, &[(0, Role::Active)]);
        let cache = MetadataCache::new(&answer(vec![live("node-1")]), Vec::new(), "features");
        let liveness = |cache: &MetadataCache| cache.view().nodes[0].liveness;
        cache.suspect("node-1");
        assert_eq!(liveness(&cache), Liveness::Suspect);
        // A view that still calls it live (gossip has not noticed yet) does not undo it.
        cache.install(&answer(vec![node("node-1", 6, &[(0, Role::Active)])]));
        assert_eq!(liveness(&cache), Liveness::Suspect);
        // Once it answers, the next view is taken as it is.
        cache.answered("node-1");
        cache.install(&answer(vec![node("node-1", 7, &[(0, Role::Active)])]));
        assert_eq!(liveness(&cache), Liveness::Live);
    }

    #[test]
    fn a_hint_moves_a_partition_to_the_holders_it_names() {
        let cache = MetadataCache::new(
            &answer(vec![
                node("node-1", 5, &[(0, Role::Active)]),
                node("node-2", 5, &[(1, Role::Active)]),
            ]),
            Vec::new(),
            "features",
        );
        cache.apply_hint(&PartitionHolders {
            partition: 0,
            holders: vec![
                Holder {
                    node_id: "node-2".into(),
                    grpc_address: "node-2:50051".into(),
                    role: Role::Active as i32,
                    lag: 0,
                    liveness: ProtoLiveness::Live as i32,
                    incarnation: 1,
                    version: 7,
                },
                Holder {
                    node_id: "node-3".into(),
                    grpc_address: "node-3:50051".into(),
                    role: Role::Standby as i32,
                    lag: 4,
                    liveness: ProtoLiveness::Live as i32,
                    incarnation: 1,
                    version: 2,
                },
            ],
        });
        let view = cache.view();
        let holders: Vec<(&str, Role)> = view
            .holders(0)
            .iter()
            .map(|h| (h.node.node_id.as_str(), h.copy.role))
            .collect();
        assert_eq!(
            holders,
            [("node-2", Role::Active), ("node-3", Role::Standby)]
        );
        assert!(cache.sources().contains(&"node-3:50051".to_owned()));
    }
}
