//! Gossip: cluster membership and the shared cluster view, over chitchat (scuttlebutt
//! reconciliation and a phi-accrual failure detector, on UDP).
//!
//! Every `publish-interval-ms` the node publishes its own state (gRPC address, status,
//! consumer-group generation, load and every local copy with its offsets and lag) as a few
//! gossip keys, never per record; chitchat versions each node's state, so older news never
//! overwrites newer. In the same beat it rebuilds its view of the cluster from what gossip
//! holds and, if anything changed, publishes a new version of it to the Query service and
//! to placement.

pub mod transport;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ProtocolVersion,
    spawn_chitchat,
};
use kstore_core::cluster::{
    ClusterView, CopyInfo, Detected, GossipEntry, Liveness, Load, NodeStatus, encode_copies,
    encode_copy_errors, encode_load, encode_status, keys,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::NodeConfig;
use crate::ingest::IngestMetrics;
use crate::registry::Registry;
use transport::BoundTransport;

/// Gossip members, by liveness.
pub const MEMBERS: &str = "kstore_gossip_members";
/// The version of this node's cluster view.
pub const VIEW_VERSION: &str = "kstore_cluster_view_version";
/// Gossip values that did not decode.
pub const BAD_VALUES: &str = "kstore_gossip_bad_values_total";
/// Gossip datagrams that did not decode, dropped.
pub const BAD_DATAGRAMS: &str = "kstore_gossip_bad_datagrams_total";
/// Gossip messages from nodes of another cluster, dropped.
pub const FOREIGN_CLUSTER_MESSAGES: &str = "kstore_gossip_foreign_cluster_messages_total";
/// Gossip datagrams without the MAC of the cluster's secret, dropped.
pub const UNAUTHENTICATED_DATAGRAMS: &str = "kstore_gossip_unauthenticated_datagrams_total";

/// The failure detector's threshold. Chitchat's phi is the time since a node's last
/// heartbeat over the mean interval between its heartbeats, which arrive through every peer:
/// at a 100 ms gossip interval a node is suspect after about 0.6 s of silence in a 3-node
/// cluster and about 1.2 s in a large one. (Chitchat's default of 8 flags a node after
/// 0.4 s, which a busy 2-core machine can stall for.)
const PHI_THRESHOLD: f64 = 12.0;

/// Why gossip could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GossipError {
    /// The gossip address could not be bound.
    #[error("cannot listen for gossip on {address}: {reason}")]
    Bind {
        /// The address.
        address: String,
        /// Why.
        reason: String,
    },
    /// Chitchat failed to start.
    #[error("starting gossip: {0}")]
    Start(String),
    /// `advertise-host` is a name that did not resolve in time.
    #[error("cannot resolve the advertised gossip address {address}: {reason}")]
    Resolve {
        /// The `host:port` advertised.
        address: String,
        /// Why.
        reason: String,
    },
}

/// How long a node waits at start for its advertised name to resolve (a pod's own DNS
/// record appears a few seconds after the pod has its address).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(120);

/// Resolves the advertised gossip address: an IP address as is, a DNS name (such as a
/// StatefulSet pod's `kstore-0.kstore-peers`) by looking it up until it resolves.
async fn resolve_advertised(advertised: &str) -> Result<SocketAddr, GossipError> {
    if let Ok(address) = advertised.parse() {
        return Ok(address);
    }
    let started = Instant::now();
    loop {
        let reason = match tokio::net::lookup_host(advertised).await {
            Ok(mut addresses) => match addresses.next() {
                Some(address) => {
                    tracing::info!(name = advertised, %address, "resolved the advertised host");
                    return Ok(address);
                }
                None => "no address".to_owned(),
            },
            Err(error) => error.to_string(),
        };
        if started.elapsed() >= RESOLVE_TIMEOUT {
            return Err(GossipError::Resolve {
                address: advertised.to_owned(),
                reason,
            });
        }
        tracing::info!(
            name = advertised,
            reason,
            "waiting for the advertised host to resolve"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A running gossip member and the view it keeps.
pub struct Gossip {
    handle: ChitchatHandle,
    /// Each store's view, in the order of [`SelfState::stores`].
    views: Vec<watch::Receiver<Arc<ClusterView>>>,
    address: SocketAddr,
    publisher: JoinHandle<()>,
    interval: Duration,
}

impl std::fmt::Debug for Gossip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gossip")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// What the publisher needs to describe one store of this node.
#[derive(Debug, Clone)]
pub struct GossipedStore {
    /// The store's gossip scope (`NodeConfig::gossip_scope`): which keys carry its copies.
    pub scope: String,
    /// The store's copies, status, generation and reads in flight.
    pub registry: Arc<Registry>,
    /// The store's ingest counters, for the ingest rate.
    pub ingest: Arc<IngestMetrics>,
}

/// What the publisher needs to describe this node.
#[derive(Debug, Clone)]
pub struct SelfState {
    /// The node's stores, its first store first.
    pub stores: Vec<GossipedStore>,
    /// Where peers reach this node's gRPC.
    pub grpc_address: String,
    /// Set when the node shuts down: it then says it is leaving.
    pub shutdown: Arc<AtomicBool>,
    /// The publisher's pulse, for liveness: one round per publish interval.
    pub pulse: Arc<crate::probes::Pulse>,
}

impl Gossip {
    /// Binds the gossip address, joins the cluster through the seeds and starts publishing
    /// this node's state.
    pub async fn start(config: &NodeConfig, state: SelfState) -> Result<Gossip, GossipError> {
        let bind_error = |reason: String| GossipError::Bind {
            address: config.gossip_address.clone(),
            reason,
        };
        let listen = config
            .gossip_address
            .parse()
            .map_err(|_| bind_error("not an address".into()))?;
        let (transport, bound) = BoundTransport::bind(listen, config.cluster_secret.as_deref())
            .await
            .map_err(|error| bind_error(format!("{error:#}")))?;
        let address = resolve_advertised(&config.advertised(bound)).await?;
        let incarnation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let interval = Duration::from_millis(config.gossip_interval_ms);
        let chitchat_config = ChitchatConfig {
            chitchat_id: ChitchatId::new(config.node_id.as_str(), incarnation, address),
            cluster_id: config.cluster_id.clone(),
            gossip_interval: interval,
            listen_addr: bound,
            seed_nodes: config.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: PHI_THRESHOLD,
                sampling_window_size: 1_000,
                max_interval: Duration::from_secs(10),
                initial_interval: interval,
                // How long a dead node's state is kept (and shown as dead) before it is
                // forgotten.
                dead_node_grace_period: Duration::from_secs(10 * 60),
            },
            marked_for_deletion_grace_period: Duration::from_secs(60 * 60),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V0,
        };
        let initial = own_values(&state, Load::default());
        let handle = spawn_chitchat(chitchat_config, initial, &transport)
            .await
            .map_err(|error| GossipError::Start(format!("{error:#}")))?;
        tracing::info!(%address, cluster = %config.cluster_id, seeds = ?config.seeds, "gossiping");

        let (view_txs, views) = state
            .stores
            .iter()
            .map(|_| {
                watch::channel(Arc::new(ClusterView {
                    cluster_id: config.cluster_id.clone(),
                    ..ClusterView::default()
                }))
            })
            .unzip();
        let publisher = tokio::spawn(publish(
            handle.chitchat(),
            state,
            Duration::from_millis(config.publish_interval_ms),
            Duration::from_millis(config.dead_after_ms),
            config.cluster_id.clone(),
            view_txs,
        ));
        Ok(Gossip {
            handle,
            views,
            address,
            publisher,
            interval,
        })
    }

    /// Returns the address peers gossip with.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Returns a receiver of the cluster view of the node's first store: the current one,
    /// and each new version. Membership is the same in every store's view.
    pub fn view(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.views[0].clone()
    }

    /// Returns a receiver of the cluster view of the node's `index`th store (in the order
    /// of [`SelfState::stores`]): every node, with its copies of that store.
    pub fn view_of(&self, index: usize) -> watch::Receiver<Arc<ClusterView>> {
        self.views[index].clone()
    }

    /// Leaves the cluster: waits until a changed status (leaving) has had a few gossip
    /// rounds to spread, then stops gossiping.
    pub async fn leave(self, publish_interval: Duration) {
        tokio::time::sleep(publish_interval + self.interval * 3).await;
        self.publisher.abort();
        if let Err(error) = self.handle.shutdown().await {
            tracing::debug!(%error, "stopping gossip");
        }
    }
}

/// This node's gossip keys and values: its address, status and load, and each store's
/// group generation and copies under the store's scoped keys.
fn own_values(state: &SelfState, load: Load) -> Vec<(String, String)> {
    let status = if state.shutdown.load(Ordering::Relaxed) {
        NodeStatus::Leaving
    } else if state
        .stores
        .iter()
        .all(|store| store.registry.status() == NodeStatus::Running)
    {
        NodeStatus::Running
    } else {
        NodeStatus::Starting
    };
    let mut values = vec![
        (keys::GRPC_ADDRESS.into(), state.grpc_address.clone()),
        (keys::STATUS.into(), encode_status(status).into()),
        (keys::LOAD.into(), encode_load(load)),
    ];
    for store in &state.stores {
        values.extend(store_values(store));
    }
    values
}

/// One store's gossip keys and values: its group generation, its copies and the errors of
/// its failed copies and why its held copies' input waits.
fn store_values(store: &GossipedStore) -> [(String, String); 3] {
    let registry = &store.registry;
    let mut errors = std::collections::BTreeMap::new();
    let mut copies: Vec<CopyInfo> = registry
        .all()
        .iter()
        .map(|copy| {
            let position = copy.position();
            // A held copy serves reads, stale: its reason shows wherever the view does.
            if let Some(reason) = copy.held() {
                errors.insert(copy.partition as u32, reason);
            }
            CopyInfo {
                partition: copy.partition as u32,
                role: copy.role(),
                changelog_offset: position.changelog_next,
                input_offset: position.input_next,
                lag: copy.lag_at(position),
            }
        })
        .collect();
    // Copies that serve no reads (opening, bootstrapping, failed) show too, with the errors
    // of the failed ones.
    for (partition, pending) in registry.all_pending() {
        if copies.iter().any(|c| c.partition == partition as u32) {
            continue;
        }
        copies.push(CopyInfo {
            partition: partition as u32,
            role: pending.role,
            changelog_offset: 0,
            input_offset: 0,
            lag: 0,
        });
        if let Some(error) = pending.error {
            errors.insert(partition as u32, error);
        }
    }
    copies.sort_by_key(|c| c.partition);
    let scope = store.scope.as_str();
    [
        (
            keys::scoped(keys::GROUP_GENERATION, scope),
            registry.group_generation().to_string(),
        ),
        (keys::scoped(keys::COPIES, scope), encode_copies(&copies)),
        (
            keys::scoped(keys::COPY_ERRORS, scope),
            encode_copy_errors(&errors),
        ),
    ]
}

/// Publishes this node's state and rebuilds the view, every `interval`.
async fn publish(
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    state: SelfState,
    interval: Duration,
    dead_after: Duration,
    cluster_id: String,
    view_txs: Vec<watch::Sender<Arc<ClusterView>>>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let records_in = |state: &SelfState| -> u64 {
        state
            .stores
            .iter()
            .map(|store| store.ingest.records_in.load(Ordering::Relaxed))
            .sum()
    };
    let mut last_count = records_in(&state);
    let mut last_tick = Instant::now();
    // When each node that is not live was first seen so.
    let mut silent_since: HashMap<ChitchatId, Instant> = HashMap::new();
    // What chitchat dropped, as of the last tick.
    let mut dropped = (0, 0, 0);
    // Conflicting processes already reported, so each is logged once.
    let mut conflicts_reported: std::collections::HashSet<(String, u64)> = Default::default();
    loop {
        ticker.tick().await;
        state.pulse.beat();
        let now = Instant::now();
        let count = records_in(&state);
        let elapsed = now.duration_since(last_tick).as_secs_f64().max(1e-3);
        let load = Load {
            ingest_rate: (count.saturating_sub(last_count) as f64 / elapsed) as u64,
            reads_in_flight: state
                .stores
                .iter()
                .map(|store| store.registry.reads_in_flight())
                .sum(),
        };
        (last_count, last_tick) = (count, now);
        let values = own_values(&state, load);

        let entries = {
            let mut chitchat = chitchat.lock().await;
            let own = chitchat.self_node_state();
            for (key, value) in values {
                own.set(key, value);
            }
            let live: std::collections::HashSet<ChitchatId> =
                chitchat.live_nodes().cloned().collect();
            silent_since.retain(|id, _| !live.contains(id));
            chitchat
                .node_states()
                .iter()
                .map(|(id, node)| {
                    let detected = if live.contains(id) {
                        Detected::Live
                    } else {
                        let since = *silent_since.entry(id.clone()).or_insert(now);
                        Detected::SilentFor(now.duration_since(since))
                    };
                    GossipEntry {
                        node_id: id.node_id.to_string(),
                        incarnation: id.generation_id,
                        gossip_address: id.gossip_advertise_addr.to_string(),
                        version: node.max_version(),
                        detected,
                        values: node
                            .key_values()
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .collect(),
                    }
                })
                .collect::<Vec<_>>()
        };
        report_dropped(&mut dropped);
        for (store, view_tx) in state.stores.iter().zip(&view_txs).skip(1) {
            let (view, errors) =
                ClusterView::from_gossip(&cluster_id, &entries, dead_after, &store.scope);
            report_bad_values(&errors);
            send_if_changed(view_tx, view, |_, _| {});
        }
        // The first store's view last, with membership's logs and metrics.
        let (view, errors) =
            ClusterView::from_gossip(&cluster_id, &entries, dead_after, &state.stores[0].scope);
        report_bad_values(&errors);
        let counts = view.count_by_liveness();
        for liveness in [Liveness::Live, Liveness::Suspect, Liveness::Dead] {
            let count = counts.get(&liveness).copied().unwrap_or(0);
            metrics::gauge!(MEMBERS, "liveness" => liveness.as_str_name()).set(count as f64);
        }
        for node in view.nodes.iter().filter(|n| n.conflicting) {
            if conflicts_reported.insert((node.node_id.clone(), node.incarnation)) {
                tracing::error!(
                    node_id = %node.node_id,
                    gossip_address = %node.gossip_address,
                    grpc_address = %node.grpc_address,
                    "two live processes claim this node id; give each node its own node-id"
                );
            }
        }
        send_if_changed(&view_txs[0], view, |current, view| {
            log_membership_changes(current, view);
            metrics::gauge!(VIEW_VERSION).set(view.version as f64);
        });
    }
}

/// Logs and counts gossip values that did not decode.
fn report_bad_values(errors: &[kstore_core::cluster::GossipValueError]) {
    for error in errors {
        tracing::warn!(%error, "a gossip value does not decode");
    }
    metrics::counter!(BAD_VALUES).increment(errors.len() as u64);
}

/// Sends `view` as the next version if its content differs from the current one, calling
/// `changed` with the current and the new view first.
fn send_if_changed(
    view_tx: &watch::Sender<Arc<ClusterView>>,
    mut view: ClusterView,
    changed: impl FnOnce(&ClusterView, &ClusterView),
) {
    view_tx.send_if_modified(|current| {
        if current.same_content(&view) {
            return false;
        }
        view.version = current.version + 1;
        changed(current, &view);
        *current = Arc::new(std::mem::take(&mut view));
        true
    });
}

/// Publishes what gossip dropped, and logs it (once per tick, however many).
fn report_dropped(last: &mut (u64, u64, u64)) {
    let now = (
        transport::BAD_DATAGRAMS.load(Ordering::Relaxed),
        transport::FOREIGN_CLUSTER_MESSAGES.load(Ordering::Relaxed),
        transport::UNAUTHENTICATED_DATAGRAMS.load(Ordering::Relaxed),
    );
    metrics::counter!(BAD_DATAGRAMS).absolute(now.0);
    metrics::counter!(FOREIGN_CLUSTER_MESSAGES).absolute(now.1);
    metrics::counter!(UNAUTHENTICATED_DATAGRAMS).absolute(now.2);
    if now.2 > last.2 {
        tracing::warn!(
            count = now.2 - last.2,
            "dropped gossip datagrams without the cluster's MAC (a node with another \
             cluster-secret, or a forgery)"
        );
    }
    if now.0 > last.0 {
        tracing::warn!(
            count = now.0 - last.0,
            "dropped gossip datagrams that do not decode"
        );
    }
    if now.1 > last.1 {
        tracing::warn!(
            count = now.1 - last.1,
            "dropped gossip from nodes of another cluster (check their cluster-id and seeds)"
        );
    }
    *last = now;
}

/// Logs nodes that joined, left or changed liveness between two views.
fn log_membership_changes(before: &ClusterView, after: &ClusterView) {
    let key = |n: &kstore_core::cluster::NodeEntry| (n.node_id.clone(), n.incarnation);
    let old: HashMap<_, _> = before.nodes.iter().map(|n| (key(n), n.liveness)).collect();
    for node in &after.nodes {
        match old.get(&key(node)) {
            None => tracing::info!(
                node_id = %node.node_id,
                grpc_address = %node.grpc_address,
                liveness = node.liveness.as_str_name(),
                "a node joined the view"
            ),
            Some(liveness) if *liveness != node.liveness => tracing::info!(
                node_id = %node.node_id,
                from = liveness.as_str_name(),
                to = node.liveness.as_str_name(),
                "a node's liveness changed"
            ),
            Some(_) => {}
        }
    }
    let new: std::collections::HashSet<_> = after.nodes.iter().map(key).collect();
    for node in &before.nodes {
        if !new.contains(&key(node)) {
            tracing::info!(node_id = %node.node_id, "a node left the view");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_advertised_name_resolves_and_an_address_stays_as_it_is() {
        let address = resolve_advertised("10.1.2.3:7946").await.unwrap();
        assert_eq!(address, "10.1.2.3:7946".parse().unwrap());
        let named = resolve_advertised("localhost:7946").await.unwrap();
        assert!(named.ip().is_loopback(), "{named}");
        assert_eq!(named.port(), 7946);
    }

    async fn member(node_id: &str, seeds: Vec<String>) -> Gossip {
        let config = NodeConfig {
            node_id: node_id.into(),
            gossip_address: "127.0.0.1:0".into(),
            seeds,
            ..NodeConfig::default()
        };
        let state = SelfState {
            stores: vec![GossipedStore {
                scope: String::new(),
                registry: Arc::new(Registry::new(node_id, 4)),
                ingest: Arc::new(IngestMetrics::default()),
            }],
            grpc_address: "127.0.0.1:1".into(),
            shutdown: Arc::new(AtomicBool::new(false)),
            pulse: Arc::new(crate::probes::Pulse::beating("gossip")),
        };
        Gossip::start(&config, state).await.unwrap()
    }

    /// Datagrams as a broken or hostile sender might send them: random bytes, and random
    /// bytes behind a valid chitchat header (magic number, protocol version, message type)
    /// so that the decoder goes past its first checks.
    fn junk(n: u64) -> Vec<u8> {
        let word =
            |i: u64| xxhash_rust::xxh3::xxh3_64(&[n.to_le_bytes(), i.to_le_bytes()].concat());
        let len = (word(0) % 1_400) as usize;
        let mut bytes: Vec<u8> = (0..len as u64).map(|i| word(i + 1) as u8).collect();
        if n.is_multiple_of(2) && bytes.len() >= 4 {
            bytes[..2].copy_from_slice(&45_139u16.to_le_bytes());
            bytes[2] = (n / 2 % 2) as u8;
            bytes[3] = (n / 4 % 4) as u8;
        }
        bytes
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gossip_keeps_working_through_junk_datagrams() {
        let target = member("node-a", Vec::new()).await;
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for n in 0..5_000 {
            socket.send_to(&junk(n), target.address()).await.unwrap();
            if n % 200 == 0 {
                // Let the receiver keep up, so that the junk is read rather than dropped
                // by the kernel.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // A real member still joins through the node that got the junk, and each sees the
        // other live.
        let joiner = member("node-b", vec![target.address().to_string()]).await;
        let sees = |gossip: &Gossip, other: &str| {
            gossip
                .view()
                .borrow()
                .nodes
                .iter()
                .any(|n| n.node_id == other && n.liveness == Liveness::Live)
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(sees(&target, "node-b") && sees(&joiner, "node-a")) {
            assert!(
                Instant::now() < deadline,
                "the members never saw each other"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        joiner.leave(Duration::ZERO).await;
        target.leave(Duration::ZERO).await;
    }
}
