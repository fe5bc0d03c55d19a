//! The cluster view: every node that gossip knows of, whether it is live, its load, and
//! every copy of every partition it holds, in which role and how far behind. Plain data,
//! built from gossip entries; the questions that routing and placement ask of it ("who
//! holds partition p, and how fresh?") are pure functions.
//!
//! Each node publishes a few gossip keys ([`keys`]); the values are compact text so that
//! one node's state fits one UDP datagram with room to spare (a copy takes about 25 bytes).
//!
//! ```
//! use kstore_core::cluster::{CopyInfo, Role, decode_copies, encode_copies};
//! let copies = vec![CopyInfo {
//!     partition: 3,
//!     role: Role::Standby,
//!     changelog_offset: 120,
//!     input_offset: 455,
//!     lag: 2,
//! }];
//! let text = encode_copies(&copies);
//! assert_eq!(text, "3:S:120:455:2");
//! assert_eq!(decode_copies(&text).unwrap(), copies);
//! ```

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

pub use kstore_proto::v1::{Liveness, NodeStatus, Role};
use kstore_proto::v1::{MetadataResponse, NodeInfo, NodeLoad, PartitionCopy, PartitionHolders};

/// The gossip keys every node publishes.
pub mod keys {
    /// Where the node serves gRPC.
    pub const GRPC_ADDRESS: &str = "grpc";
    /// [`super::encode_status`] of the node.
    pub const STATUS: &str = "status";
    /// The consumer-group generation the node last saw.
    pub const GROUP_GENERATION: &str = "group-generation";
    /// [`super::encode_load`] of the node.
    pub const LOAD: &str = "load";
    /// [`super::encode_copies`] of the node's local copies.
    pub const COPIES: &str = "copies";
    /// [`super::encode_copy_errors`] of the node's failed copies and held ones (serving
    /// reads, their input waiting for a later module).
    pub const COPY_ERRORS: &str = "copy-errors";

    /// Returns the key under which a node publishes `key` ([`GROUP_GENERATION`],
    /// [`COPIES`] or [`COPY_ERRORS`]) for the store of gossip scope `scope`: the key itself
    /// for the node's first store (scope `""`, the keys a single-store node has always
    /// published), `key:store` for each further store.
    pub fn scoped(key: &str, scope: &str) -> String {
        if scope.is_empty() {
            key.to_owned()
        } else {
            format!("{key}:{scope}")
        }
    }
}

/// The longest error of a failed copy that gossip carries, in bytes.
pub const MAX_COPY_ERROR_BYTES: usize = 200;

/// Whether a copy in `role` answers reads: active, standby and restoring copies do; copies
/// that are opening, bootstrapping or failed do not.
pub fn serves_reads(role: Role) -> bool {
    matches!(role, Role::Active | Role::Standby | Role::Restoring)
}

/// One copy of a partition on a node, as its node last published it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyInfo {
    /// The partition.
    pub partition: u32,
    /// Active, standby or restoring; or opening, bootstrapping or failed (no reads).
    pub role: Role,
    /// The next changelog offset the copy will apply.
    pub changelog_offset: i64,
    /// The next input offset: every input record before it is reflected.
    pub input_offset: i64,
    /// Input records of the partition the copy does not reflect yet.
    pub lag: i64,
}

/// How busy a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    /// Input records processed per second.
    pub ingest_rate: u64,
    /// Query calls being answered.
    pub reads_in_flight: u32,
}

/// One node (one process: a restart is a new incarnation) in the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    /// The node's id.
    pub node_id: String,
    /// When the process started, in milliseconds since the Unix epoch.
    pub incarnation: u64,
    /// The version of the node's gossip state within its incarnation.
    pub version: u64,
    /// Where the node gossips.
    pub gossip_address: String,
    /// Where the node serves gRPC.
    pub grpc_address: String,
    /// The consumer-group generation the node last saw (0 before it joined).
    pub group_generation: i32,
    /// What the node says it is doing.
    pub status: NodeStatus,
    /// What the failure detector says.
    pub liveness: Liveness,
    /// Whether another live process claims the same node id.
    pub conflicting: bool,
    /// How busy it is.
    pub load: Load,
    /// Its copies, by partition.
    pub copies: Vec<CopyInfo>,
    /// Why its failed copies failed, or its held copies' input waits, by partition.
    pub copy_errors: BTreeMap<u32, String>,
}

impl NodeEntry {
    /// Returns the node's copy of `partition`, if it holds one.
    pub fn copy_of(&self, partition: u32) -> Option<&CopyInfo> {
        self.copies
            .binary_search_by_key(&partition, |c| c.partition)
            .ok()
            .map(|i| &self.copies[i])
    }

    /// Whether this entry is newer news of the same node than `other`.
    pub fn is_newer_than(&self, other: &NodeEntry) -> bool {
        (self.incarnation, self.version) > (other.incarnation, other.version)
    }
}

/// What the failure detector says of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// Its heartbeats arrive.
    Live,
    /// No heartbeat for this long past the detector's threshold.
    SilentFor(Duration),
}

/// A node's gossip state as the gossip library hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipEntry {
    /// The node's id.
    pub node_id: String,
    /// The node process's start time (the gossip generation).
    pub incarnation: u64,
    /// Where it gossips.
    pub gossip_address: String,
    /// The version of its state.
    pub version: u64,
    /// Its liveness.
    pub detected: Detected,
    /// Its keys and values.
    pub values: BTreeMap<String, String>,
}

/// A gossip value that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("gossip key {key:?} of node {node_id:?} does not decode: {reason}")]
pub struct GossipValueError {
    /// The node that published it.
    pub node_id: String,
    /// The key.
    pub key: String,
    /// Why.
    pub reason: String,
}

/// Returns the liveness of a node: live while its heartbeats arrive; suspect when they
/// stopped less than `dead_after` ago; dead after that. A node that said it was leaving is
/// treated the same: it may be restarting, and its copies stay placed on it until it is
/// dead, so a rolling restart moves nothing.
pub fn liveness(detected: Detected, dead_after: Duration) -> Liveness {
    match detected {
        Detected::Live => Liveness::Live,
        Detected::SilentFor(silent) if silent < dead_after => Liveness::Suspect,
        Detected::SilentFor(_) => Liveness::Dead,
    }
}

/// Returns a role's name, as logs, metrics labels, backup catalogs and the command line
/// show it.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Active => "active",
        Role::Standby => "standby",
        Role::Restoring => "restoring",
        Role::Opening => "opening",
        Role::Bootstrapping => "bootstrapping",
        Role::Failed => "failed",
        Role::Unspecified => "unspecified",
    }
}

fn role_letter(role: Role) -> char {
    match role {
        Role::Active => 'A',
        Role::Standby => 'S',
        Role::Restoring => 'R',
        Role::Opening => 'O',
        Role::Bootstrapping => 'B',
        Role::Failed => 'F',
        Role::Unspecified => 'U',
    }
}

/// Encodes copies as `partition:role:changelog:input:lag`, space-separated, roles as
/// A(ctive), S(tandby), R(estoring), O(pening), B(ootstrapping), F(ailed).
pub fn encode_copies(copies: &[CopyInfo]) -> String {
    let mut text = String::with_capacity(copies.len() * 24);
    for (i, copy) in copies.iter().enumerate() {
        if i > 0 {
            text.push(' ');
        }
        use std::fmt::Write;
        let _ = write!(
            text,
            "{}:{}:{}:{}:{}",
            copy.partition,
            role_letter(copy.role),
            copy.changelog_offset,
            copy.input_offset,
            copy.lag
        );
    }
    text
}

/// Decodes [`encode_copies`]; the copies come back sorted by partition. Anything else is
/// refused: a field that is not a number, an unknown role, a negative offset or lag, an
/// input end past `i64::MAX`, a partition twice.
pub fn decode_copies(text: &str) -> Result<Vec<CopyInfo>, String> {
    let mut copies = Vec::new();
    for item in text.split_ascii_whitespace() {
        let fields: Vec<&str> = item.split(':').collect();
        let [partition, role, changelog, input, lag] = fields[..] else {
            return Err(format!("{item:?} does not have 5 fields"));
        };
        let number = |field: &str| {
            field
                .parse::<i64>()
                .map_err(|_| format!("{field:?} in {item:?} is not a number"))
        };
        let role = match role {
            "A" => Role::Active,
            "S" => Role::Standby,
            "R" => Role::Restoring,
            "O" => Role::Opening,
            "B" => Role::Bootstrapping,
            "F" => Role::Failed,
            other => return Err(format!("unknown role {other:?} in {item:?}")),
        };
        let copy = CopyInfo {
            partition: partition
                .parse()
                .map_err(|_| format!("partition {partition:?} in {item:?} is not a number"))?,
            role,
            changelog_offset: number(changelog)?,
            input_offset: number(input)?,
            lag: number(lag)?,
        };
        // Offsets and lag are never negative, and the input's end (offset plus lag) is an
        // offset too.
        if copy.changelog_offset < 0 || copy.input_offset < 0 || copy.lag < 0 {
            return Err(format!("{item:?} holds a negative offset or lag"));
        }
        if copy.input_offset.checked_add(copy.lag).is_none() {
            return Err(format!(
                "{item:?} puts the input's end past the largest offset"
            ));
        }
        copies.push(copy);
    }
    copies.sort_by_key(|c| c.partition);
    let before = copies.len();
    copies.dedup_by_key(|c| c.partition);
    if copies.len() != before {
        return Err("a partition appears twice".into());
    }
    Ok(copies)
}

/// Encodes the errors of failed copies, one `partition:error` per line; each error cut to
/// [`MAX_COPY_ERROR_BYTES`] (at a character boundary), its line breaks made spaces.
pub fn encode_copy_errors(errors: &BTreeMap<u32, String>) -> String {
    let mut text = String::new();
    for (partition, error) in errors {
        let mut end = error.len().min(MAX_COPY_ERROR_BYTES);
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&partition.to_string());
        text.push(':');
        text.extend(
            error[..end]
                .chars()
                .map(|c| if c == '\n' || c == '\r' { ' ' } else { c }),
        );
    }
    text
}

/// Decodes [`encode_copy_errors`].
pub fn decode_copy_errors(text: &str) -> Result<BTreeMap<u32, String>, String> {
    let mut errors = BTreeMap::new();
    for line in text.lines().filter(|line| !line.is_empty()) {
        let (partition, error) = line
            .split_once(':')
            .ok_or_else(|| format!("{line:?} is not partition:error"))?;
        let partition: u32 = partition
            .parse()
            .map_err(|_| format!("partition {partition:?} is not a number"))?;
        if error.len() > MAX_COPY_ERROR_BYTES {
            return Err(format!("the error of partition {partition} is too long"));
        }
        errors.insert(partition, error.to_owned());
    }
    Ok(errors)
}

/// Encodes a load as `ingest_rate:reads_in_flight`.
pub fn encode_load(load: Load) -> String {
    format!("{}:{}", load.ingest_rate, load.reads_in_flight)
}

/// Decodes [`encode_load`].
pub fn decode_load(text: &str) -> Result<Load, String> {
    let (rate, reads) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not rate:reads"))?;
    Ok(Load {
        ingest_rate: rate.parse().map_err(|_| format!("{rate:?} is no rate"))?,
        reads_in_flight: reads
            .parse()
            .map_err(|_| format!("{reads:?} is no count"))?,
    })
}

/// Decodes a node's gRPC address: an IP address and a port (`127.0.0.1:50051`,
/// `[::1]:50051`), which is all a node ever publishes.
pub fn decode_grpc_address(text: &str) -> Result<String, String> {
    text.parse::<std::net::SocketAddr>()
        .map(|address| address.to_string())
        .map_err(|_| format!("{text:?} is not an IP address and port"))
}

/// Encodes a status as its word.
pub fn encode_status(status: NodeStatus) -> &'static str {
    match status {
        NodeStatus::Starting => "starting",
        NodeStatus::Running => "running",
        NodeStatus::Leaving => "leaving",
        NodeStatus::Unspecified => "unspecified",
    }
}

/// Decodes [`encode_status`].
pub fn decode_status(text: &str) -> Result<NodeStatus, String> {
    match text {
        "starting" => Ok(NodeStatus::Starting),
        "running" => Ok(NodeStatus::Running),
        "leaving" => Ok(NodeStatus::Leaving),
        other => Err(format!("unknown status {other:?}")),
    }
}

impl NodeEntry {
    /// Builds a node's entry, with the copies of the store of gossip scope `scope` (see
    /// [`keys::scoped`]), from its gossip state. A value that does not decode is reported
    /// and left at its default (no copies, no load, no gRPC address, so nothing is routed
    /// to it), so the node still shows.
    pub fn from_gossip(
        entry: &GossipEntry,
        dead_after: Duration,
        scope: &str,
    ) -> (NodeEntry, Vec<GossipValueError>) {
        let mut errors = Vec::new();
        let status = decoded(entry, keys::STATUS, decode_status, &mut errors)
            .unwrap_or(NodeStatus::Starting);
        let load = decoded(entry, keys::LOAD, decode_load, &mut errors).unwrap_or_default();
        let group_generation = decoded(
            entry,
            &keys::scoped(keys::GROUP_GENERATION, scope),
            |v| v.parse().map_err(|_| format!("{v:?} is not a generation")),
            &mut errors,
        )
        .unwrap_or_default();
        let copies = decoded(
            entry,
            &keys::scoped(keys::COPIES, scope),
            decode_copies,
            &mut errors,
        )
        .unwrap_or_default();
        let copy_errors = decoded(
            entry,
            &keys::scoped(keys::COPY_ERRORS, scope),
            decode_copy_errors,
            &mut errors,
        )
        .unwrap_or_default();
        let grpc_address = decoded(entry, keys::GRPC_ADDRESS, decode_grpc_address, &mut errors)
            .unwrap_or_default();
        let node = NodeEntry {
            node_id: entry.node_id.clone(),
            incarnation: entry.incarnation,
            version: entry.version,
            gossip_address: entry.gossip_address.clone(),
            grpc_address,
            group_generation,
            status,
            liveness: liveness(entry.detected, dead_after),
            conflicting: false,
            load,
            copies,
            copy_errors,
        };
        (node, errors)
    }
}

/// Decodes the value of `key`, if the entry has one; one that does not decode is reported.
fn decoded<T>(
    entry: &GossipEntry,
    key: &str,
    decode: impl Fn(&str) -> Result<T, String>,
    errors: &mut Vec<GossipValueError>,
) -> Option<T> {
    let value = entry.values.get(key)?;
    decode(value)
        .map_err(|reason| {
            errors.push(GossipValueError {
                node_id: entry.node_id.clone(),
                key: key.to_owned(),
                reason,
            });
        })
        .ok()
}

/// One holder of a partition: a node and its copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder<'a> {
    /// The node.
    pub node: &'a NodeEntry,
    /// Its copy of the partition.
    pub copy: &'a CopyInfo,
}

impl Holder<'_> {
    /// Whether reads can go to this holder: its node is live.
    pub fn routable(&self) -> bool {
        self.node.liveness == Liveness::Live
    }

    /// The order in which holders are worth asking: live before suspect before dead; a node
    /// that is shutting down after the others; the active before other copies; then the
    /// least lag; then node id.
    fn rank(&self) -> (Liveness, bool, bool, i64, &str) {
        (
            self.node.liveness,
            self.node.status == NodeStatus::Leaving,
            self.copy.role != Role::Active,
            self.copy.lag,
            &self.node.node_id,
        )
    }
}

/// What one node knows of the whole cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterView {
    /// The cluster's id.
    pub cluster_id: String,
    /// Increases whenever the content changes.
    pub version: u64,
    /// The nodes, by node id, then incarnation.
    pub nodes: Vec<NodeEntry>,
}

impl ClusterView {
    /// Builds a view from gossip entries. A restarted node's earlier incarnations at the
    /// same gossip address are dropped (one address cannot serve two processes); an earlier
    /// incarnation elsewhere is dropped once a newer one is live. Two live processes that
    /// claim one node id are both kept and marked conflicting. Values that do not decode
    /// are returned for the caller to report. The copies are those of the store of gossip
    /// scope `scope` (see [`keys::scoped`]; `""` for a node's first store).
    pub fn from_gossip(
        cluster_id: &str,
        entries: &[GossipEntry],
        dead_after: Duration,
        scope: &str,
    ) -> (ClusterView, Vec<GossipValueError>) {
        let mut errors = Vec::new();
        let mut by_id: BTreeMap<&str, Vec<NodeEntry>> = BTreeMap::new();
        for entry in entries {
            let (node, mut node_errors) = NodeEntry::from_gossip(entry, dead_after, scope);
            errors.append(&mut node_errors);
            by_id.entry(&entry.node_id).or_default().push(node);
        }
        let mut nodes = Vec::new();
        for (_, mut incarnations) in by_id {
            incarnations.sort_by_key(|n| std::cmp::Reverse(n.incarnation));
            let mut kept: Vec<NodeEntry> = Vec::new();
            for node in incarnations {
                let superseded = kept.iter().any(|newer| {
                    newer.gossip_address == node.gossip_address
                        || (newer.liveness == Liveness::Live && node.liveness != Liveness::Live)
                        || node.liveness == Liveness::Dead
                });
                if !superseded {
                    kept.push(node);
                }
            }
            let live = kept.iter().filter(|n| n.liveness == Liveness::Live).count();
            for node in &mut kept {
                node.conflicting = live > 1 && node.liveness == Liveness::Live;
            }
            kept.reverse();
            nodes.extend(kept);
        }
        let view = ClusterView {
            cluster_id: cluster_id.to_owned(),
            version: 0,
            nodes,
        };
        (view, errors)
    }

    /// Whether two views hold the same nodes and copies (versions aside).
    pub fn same_content(&self, other: &ClusterView) -> bool {
        self.cluster_id == other.cluster_id && self.nodes == other.nodes
    }

    /// Returns every holder of `partition` whose copy serves reads (not opening,
    /// bootstrapping or failed), best first: live before suspect before dead, the active
    /// before other copies, then the least lag.
    pub fn holders(&self, partition: u32) -> Vec<Holder<'_>> {
        let mut holders: Vec<Holder<'_>> = self
            .nodes
            .iter()
            .filter_map(|node| node.copy_of(partition).map(|copy| Holder { node, copy }))
            .filter(|holder| serves_reads(holder.copy.role))
            .collect();
        holders.sort_by(|a, b| a.rank().cmp(&b.rank()));
        holders
    }

    /// Returns where a node that holds no copy of `partition` may forward a read of it, best
    /// first: the live holders other than `this_node` (the active first, then the least
    /// lag). Suspect and dead holders are never chosen.
    pub fn forward_targets(&self, partition: u32, this_node: &str) -> Vec<Holder<'_>> {
        self.holders(partition)
            .into_iter()
            .filter(|h| {
                h.routable() && h.node.node_id != this_node && !h.node.grpc_address.is_empty()
            })
            .collect()
    }

    /// Returns the holders of `partition`, best first, as the detail of a
    /// PARTITION_NOT_HOSTED answer.
    pub fn holders_proto(&self, partition: u32) -> PartitionHolders {
        PartitionHolders {
            partition,
            holders: self
                .holders(partition)
                .into_iter()
                .map(|h| kstore_proto::v1::Holder {
                    node_id: h.node.node_id.clone(),
                    grpc_address: h.node.grpc_address.clone(),
                    role: h.copy.role as i32,
                    lag: h.copy.lag,
                    liveness: h.node.liveness as i32,
                    incarnation: h.node.incarnation,
                    version: h.node.version,
                })
                .collect(),
        }
    }

    /// Returns the node whose copy of `partition` is active and not dead. If two claim it
    /// (one is being fenced, or has not said yet that it gave the partition up), the one
    /// that saw the later group generation; then a live one; then the later incarnation.
    pub fn active(&self, partition: u32) -> Option<Holder<'_>> {
        self.holders(partition)
            .into_iter()
            .filter(|h| h.copy.role == Role::Active && h.node.liveness != Liveness::Dead)
            .max_by_key(|h| {
                (
                    h.node.group_generation,
                    h.node.liveness == Liveness::Live,
                    h.node.incarnation,
                )
            })
    }

    /// Returns the node that should take the backups of `partition`, so that actives are not
    /// loaded: the least-lagging live standby (a copy that is running, not leaving), else the
    /// live active. `None` when no live node holds a usable copy.
    pub fn backup_source(&self, partition: u32) -> Option<&str> {
        let usable = |h: &Holder<'_>| h.routable() && h.node.status != NodeStatus::Leaving;
        let holders = self.holders(partition);
        holders
            .iter()
            .filter(|h| usable(h) && h.copy.role == Role::Standby)
            .min_by_key(|h| (h.copy.lag, &h.node.node_id))
            .or_else(|| {
                holders
                    .iter()
                    .find(|h| usable(h) && h.copy.role == Role::Active)
            })
            .map(|h| h.node.node_id.as_str())
    }

    /// Returns the nodes that can send a snapshot of `partition` to `this_node`, best first:
    /// live, not leaving, holding a running copy (active or standby, not restoring); the
    /// least lag first, a standby before the active at equal lag (to spare the active).
    pub fn snapshot_sources(&self, partition: u32, this_node: &str) -> Vec<Holder<'_>> {
        let mut sources: Vec<Holder<'_>> = self
            .holders(partition)
            .into_iter()
            .filter(|h| {
                h.routable()
                    && h.node.status != NodeStatus::Leaving
                    && h.node.node_id != this_node
                    && !h.node.grpc_address.is_empty()
                    && matches!(h.copy.role, Role::Active | Role::Standby)
            })
            .collect();
        sources.sort_by_key(|h| (h.copy.lag.max(0), h.copy.role == Role::Active));
        sources
    }

    /// Whether a live node other than `this_node` holds a copy of `partition` that is only
    /// opening, being bootstrapped or restoring its changelog (as every copy of a node is for
    /// a moment after a rebalance): a snapshot source soon, though not yet one.
    pub fn copy_settling_elsewhere(&self, partition: u32, this_node: &str) -> bool {
        self.nodes.iter().any(|node| {
            node.node_id != this_node
                && node.liveness == Liveness::Live
                && node.copy_of(partition).is_some_and(|copy| {
                    matches!(
                        copy.role,
                        Role::Opening | Role::Bootstrapping | Role::Restoring
                    )
                })
        })
    }

    /// Returns the node ids that standbys may be placed on: every node not dead. A node that
    /// is suspect (paused, restarting) keeps its standbys until it counts as dead, so that a
    /// short absence moves no data.
    pub fn placement_members(&self) -> Vec<&str> {
        let mut members: Vec<&str> = self
            .nodes
            .iter()
            .filter(|n| n.liveness != Liveness::Dead)
            .map(|n| n.node_id.as_str())
            .collect();
        members.dedup();
        members
    }

    /// Returns, per partition below `partitions`, the node id of its active copy if known.
    pub fn actives(&self, partitions: u32) -> Vec<Option<&str>> {
        (0..partitions)
            .map(|p| self.active(p).map(|h| h.node.node_id.as_str()))
            .collect()
    }

    /// Counts the nodes by liveness.
    pub fn count_by_liveness(&self) -> HashMap<Liveness, usize> {
        let mut counts = HashMap::new();
        for node in &self.nodes {
            *counts.entry(node.liveness).or_default() += 1;
        }
        counts
    }

    /// Returns the view as the `nodes` of a Metadata answer, each copy marked as one of
    /// `store`.
    pub fn to_proto_nodes(&self, store: &str) -> Vec<NodeInfo> {
        self.nodes
            .iter()
            .map(|node| node_to_proto(node, store))
            .collect()
    }

    /// Returns the view of every store as the `nodes` of a Metadata answer: the nodes of
    /// the first view, each with its copies of every store (marked with their store).
    /// `views` holds each store's name and view, built from the same gossip.
    pub fn to_proto_nodes_of_stores(views: &[(&str, &ClusterView)]) -> Vec<NodeInfo> {
        let Some((first_store, first)) = views.first() else {
            return Vec::new();
        };
        let mut nodes = first.to_proto_nodes(first_store);
        for (store, view) in &views[1..] {
            for node in &mut nodes {
                if let Some(entry) = view
                    .nodes
                    .iter()
                    .find(|n| n.node_id == node.node_id && n.incarnation == node.incarnation)
                {
                    node.copies.extend(node_to_proto(entry, store).copies);
                }
            }
        }
        nodes
    }

    /// Rebuilds the view of the answering node's first store from a Metadata answer (as a
    /// client receives it); of every copy if the answer names no store.
    pub fn from_proto(response: &MetadataResponse) -> ClusterView {
        match response.stores.first() {
            Some(first) => Self::from_proto_of_store(response, &first.name),
            None => Self::from_proto_nodes(response, |_| true),
        }
    }

    /// Rebuilds the view of one store from a Metadata answer: the copies marked as the
    /// store's (and unmarked ones, which a node of one store sends).
    pub fn from_proto_of_store(response: &MetadataResponse, store: &str) -> ClusterView {
        Self::from_proto_nodes(response, |copy| {
            copy.store.is_empty() || copy.store == store
        })
    }

    fn from_proto_nodes(
        response: &MetadataResponse,
        keep: impl Fn(&PartitionCopy) -> bool,
    ) -> ClusterView {
        let mut nodes: Vec<NodeEntry> = response
            .nodes
            .iter()
            .map(|node| node_from_proto(node, &keep))
            .collect();
        nodes.sort_by(|a, b| (&a.node_id, a.incarnation).cmp(&(&b.node_id, b.incarnation)));
        ClusterView {
            cluster_id: response.cluster_id.clone(),
            version: response.view_version,
            nodes,
        }
    }
}

fn node_to_proto(node: &NodeEntry, store: &str) -> NodeInfo {
    NodeInfo {
        node_id: node.node_id.clone(),
        grpc_address: node.grpc_address.clone(),
        copies: node
            .copies
            .iter()
            .map(|c| PartitionCopy {
                partition: c.partition,
                role: c.role as i32,
                changelog_offset: c.changelog_offset,
                input_offset: c.input_offset,
                input_end: c.input_offset.saturating_add(c.lag),
                lag: c.lag,
                error: node
                    .copy_errors
                    .get(&c.partition)
                    .cloned()
                    .unwrap_or_default(),
                store: store.to_owned(),
            })
            .collect(),
        liveness: node.liveness as i32,
        incarnation: node.incarnation,
        version: node.version,
        group_generation: node.group_generation,
        load: Some(NodeLoad {
            ingest_rate: node.load.ingest_rate,
            reads_in_flight: node.load.reads_in_flight,
        }),
        status: node.status as i32,
        conflicting: node.conflicting,
        gossip_address: node.gossip_address.clone(),
    }
}

fn node_from_proto(node: &NodeInfo, keep: impl Fn(&PartitionCopy) -> bool) -> NodeEntry {
    let mut copies: Vec<CopyInfo> = node
        .copies
        .iter()
        .filter(|c| keep(c))
        .map(|c| CopyInfo {
            partition: c.partition,
            role: c.role(),
            changelog_offset: c.changelog_offset,
            input_offset: c.input_offset,
            lag: c.lag,
        })
        .collect();
    copies.sort_by_key(|c| c.partition);
    let copy_errors = node
        .copies
        .iter()
        .filter(|c| keep(c) && !c.error.is_empty())
        .map(|c| (c.partition, c.error.clone()))
        .collect();
    let load = node.load.unwrap_or_default();
    NodeEntry {
        node_id: node.node_id.clone(),
        incarnation: node.incarnation,
        version: node.version,
        gossip_address: node.gossip_address.clone(),
        grpc_address: node.grpc_address.clone(),
        group_generation: node.group_generation,
        status: node.status(),
        liveness: node.liveness(),
        conflicting: node.conflicting,
        load: Load {
            ingest_rate: load.ingest_rate,
            reads_in_flight: load.reads_in_flight,
        },
        copies,
        copy_errors,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost::Message as _;

    use super::*;

    const DEAD_AFTER: Duration = Duration::from_secs(10);

    fn copy(partition: u32, role: Role, lag: i64) -> CopyInfo {
        CopyInfo {
            partition,
            role,
            changelog_offset: 100 + i64::from(partition),
            input_offset: 1_000 + i64::from(partition),
            lag,
        }
    }

    fn entry(node_id: &str, incarnation: u64, port: u16, detected: Detected) -> GossipEntry {
        let mut values = BTreeMap::new();
        values.insert(
            keys::GRPC_ADDRESS.into(),
            format!("127.0.0.1:{}", port + 1000),
        );
        values.insert(keys::STATUS.into(), "running".into());
        values.insert(keys::LOAD.into(), "250:3".into());
        values.insert(keys::GROUP_GENERATION.into(), "7".into());
        GossipEntry {
            node_id: node_id.into(),
            incarnation,
            gossip_address: format!("127.0.0.1:{port}"),
            version: 42,
            detected,
            values,
        }
    }

    fn with_copies(mut entry: GossipEntry, copies: &[CopyInfo]) -> GossipEntry {
        entry
            .values
            .insert(keys::COPIES.into(), encode_copies(copies));
        entry
    }

    fn view(entries: &[GossipEntry]) -> ClusterView {
        let (view, errors) = ClusterView::from_gossip("test", entries, DEAD_AFTER, "");
        assert!(errors.is_empty(), "{errors:?}");
        view
    }

    #[test]
    fn each_store_has_its_own_view_of_the_same_nodes_and_metadata_marks_each_copy() {
        let scoped = |mut entry: GossipEntry, generation: i32, copies: &[CopyInfo]| {
            let key = |k| keys::scoped(k, "tally");
            entry
                .values
                .insert(key(keys::COPIES), encode_copies(copies));
            entry
                .values
                .insert(key(keys::GROUP_GENERATION), generation.to_string());
            entry
        };
        let entries = [
            scoped(
                with_copies(
                    entry("node-1", 1, 7001, Detected::Live),
                    &[copy(0, Role::Active, 0), copy(1, Role::Standby, 3)],
                ),
                9,
                &[copy(0, Role::Standby, 1)],
            ),
            scoped(
                with_copies(
                    entry("node-2", 1, 7002, Detected::Live),
                    &[copy(1, Role::Active, 0), copy(0, Role::Standby, 2)],
                ),
                9,
                &[copy(0, Role::Active, 0), copy(2, Role::Active, 5)],
            ),
        ];
        // The first store's copies are under the keys a node of one store has always used.
        let features = view(&entries);
        let (tally, errors) = ClusterView::from_gossip("test", &entries, DEAD_AFTER, "tally");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(features.active(0).unwrap().node.node_id, "node-1");
        assert_eq!(tally.active(0).unwrap().node.node_id, "node-2");
        assert_eq!(tally.active(2).unwrap().node.node_id, "node-2");
        assert!(features.active(2).is_none());
        assert_eq!(tally.nodes[0].group_generation, 9);
        assert_eq!(features.nodes[0].group_generation, 7);
        // Membership is the same in both.
        let ids = |v: &ClusterView| {
            v.nodes
                .iter()
                .map(|n| n.node_id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&features), ids(&tally));

        // One Metadata answer carries both, each copy marked with its store; a client takes
        // its store's copies back out, as they were.
        let nodes =
            ClusterView::to_proto_nodes_of_stores(&[("features", &features), ("tally", &tally)]);
        assert_eq!(nodes[1].copies.len(), 4);
        let answer = MetadataResponse {
            stores: vec![
                kstore_proto::v1::StoreInfo {
                    name: "features".into(),
                    ..Default::default()
                },
                kstore_proto::v1::StoreInfo {
                    name: "tally".into(),
                    ..Default::default()
                },
            ],
            nodes,
            ..MetadataResponse::default()
        };
        for (store, want) in [("features", &features), ("tally", &tally)] {
            let back = ClusterView::from_proto_of_store(&answer, store);
            let copies =
                |v: &ClusterView| v.nodes.iter().map(|n| n.copies.clone()).collect::<Vec<_>>();
            assert_eq!(copies(&back), copies(want), "{store}");
        }
        // Without a store named, the answering node's first store.
        assert_eq!(
            ClusterView::from_proto(&answer).nodes[1].copies,
            features.nodes[1].copies
        );
    }

    #[test]
    fn liveness_follows_the_detector_and_dead_after() {
        let silent = |s| Detected::SilentFor(Duration::from_secs(s));
        assert_eq!(liveness(Detected::Live, DEAD_AFTER), Liveness::Live);
        assert_eq!(liveness(silent(3), DEAD_AFTER), Liveness::Suspect);
        assert_eq!(liveness(silent(10), DEAD_AFTER), Liveness::Dead);
    }

    #[test]
    fn backups_come_from_the_least_lagging_live_standby_else_the_active() {
        let suspect = Detected::SilentFor(Duration::from_secs(2));
        let view = view(&[
            with_copies(
                entry("node-1", 1, 7001, Detected::Live),
                &[copy(0, Role::Active, 0), copy(1, Role::Active, 0)],
            ),
            with_copies(
                entry("node-2", 1, 7002, Detected::Live),
                &[copy(0, Role::Standby, 40), copy(2, Role::Restoring, 0)],
            ),
            with_copies(
                entry("node-3", 1, 7003, Detected::Live),
                &[copy(0, Role::Standby, 7)],
            ),
            with_copies(
                entry("node-4", 1, 7004, suspect),
                &[copy(0, Role::Standby, 0), copy(1, Role::Standby, 0)],
            ),
        ]);
        // The standby with the least lag, though another is closer to its active.
        assert_eq!(view.backup_source(0), Some("node-3"));
        // Its only standby is suspect: the active takes the backup.
        assert_eq!(view.backup_source(1), Some("node-1"));
        // A restoring copy is no source, and nobody holds partition 3.
        assert_eq!(view.backup_source(2), None);
        assert_eq!(view.backup_source(3), None);
    }

    #[test]
    fn snapshots_come_from_running_live_copies_least_lag_first() {
        let view = view(&[
            with_copies(
                entry("node-1", 1, 7001, Detected::Live),
                &[copy(0, Role::Active, 0)],
            ),
            with_copies(
                entry("node-2", 1, 7002, Detected::Live),
                &[copy(0, Role::Standby, 0)],
            ),
            with_copies(
                entry("node-3", 1, 7003, Detected::Live),
                &[copy(0, Role::Standby, 30)],
            ),
            with_copies(
                entry("node-4", 1, 7004, Detected::Live),
                &[copy(0, Role::Restoring, 0)],
            ),
            with_copies(
                entry(
                    "node-5",
                    1,
                    7005,
                    Detected::SilentFor(Duration::from_secs(2)),
                ),
                &[copy(0, Role::Standby, 0)],
            ),
        ]);
        let order = |this: &str| -> Vec<String> {
            view.snapshot_sources(0, this)
                .iter()
                .map(|h| h.node.node_id.clone())
                .collect()
        };
        assert_eq!(order("node-9"), ["node-2", "node-1", "node-3"]);
        assert_eq!(order("node-2"), ["node-1", "node-3"]);
        assert!(view.snapshot_sources(1, "node-9").is_empty());
    }

    #[test]
    fn a_live_peer_copy_that_is_restoring_or_opening_is_a_source_soon() {
        let view = view(&[
            with_copies(
                entry("node-1", 1, 7001, Detected::Live),
                &[copy(0, Role::Restoring, 0), copy(1, Role::Opening, 0)],
            ),
            with_copies(
                entry("node-2", 1, 7002, Detected::Live),
                &[copy(2, Role::Failed, 0), copy(3, Role::Active, 0)],
            ),
            with_copies(
                entry(
                    "node-3",
                    1,
                    7003,
                    Detected::SilentFor(Duration::from_secs(2)),
                ),
                &[copy(2, Role::Bootstrapping, 0)],
            ),
        ]);
        assert!(view.snapshot_sources(0, "node-9").is_empty());
        assert!(view.copy_settling_elsewhere(0, "node-9"));
        assert!(view.copy_settling_elsewhere(1, "node-9"));
        // Not this node's own copy, not a failed copy, not a suspect node's.
        assert!(!view.copy_settling_elsewhere(0, "node-1"));
        assert!(!view.copy_settling_elsewhere(2, "node-9"));
        // A running copy is a source now, not one settling.
        assert!(!view.copy_settling_elsewhere(3, "node-9"));
        assert!(!view.copy_settling_elsewhere(4, "node-9"));
    }

    #[test]
    fn holders_are_ranked_live_active_first_then_by_lag() {
        let view = view(&[
            with_copies(
                entry("node-1", 1, 7001, Detected::Live),
                &[copy(0, Role::Standby, 50)],
            ),
            with_copies(
                entry("node-2", 1, 7002, Detected::Live),
                &[copy(0, Role::Standby, 5), copy(1, Role::Active, 0)],
            ),
            with_copies(
                entry(
                    "node-3",
                    1,
                    7003,
                    Detected::SilentFor(Duration::from_secs(2)),
                ),
                &[copy(0, Role::Active, 0)],
            ),
            with_copies(
                entry("node-4", 1, 7004, Detected::Live),
                &[copy(0, Role::Active, 900)],
            ),
        ]);
        let order: Vec<&str> = view
            .holders(0)
            .iter()
            .map(|h| h.node.node_id.as_str())
            .collect();
        assert_eq!(order, ["node-4", "node-2", "node-1", "node-3"]);
        assert_eq!(view.holders(1).len(), 1);
        assert!(view.holders(2).is_empty());
        assert!(view.holders(0)[0].routable());
        assert!(!view.holders(0)[3].routable());
        // Two claim partition 0's active copy in the same generation: the live one wins.
        assert_eq!(view.active(0).unwrap().node.node_id, "node-4");
        assert_eq!(view.active(1).unwrap().node.node_id, "node-2");
    }

    #[test]
    fn reads_are_forwarded_to_live_holders_other_than_this_node_active_first() {
        let view = view(&[
            with_copies(
                entry("node-1", 1, 7001, Detected::Live),
                &[copy(0, Role::Standby, 3)],
            ),
            with_copies(
                entry(
                    "node-2",
                    1,
                    7002,
                    Detected::SilentFor(Duration::from_secs(1)),
                ),
                &[copy(0, Role::Active, 0)],
            ),
            with_copies(
                entry("node-3", 1, 7003, Detected::Live),
                &[copy(0, Role::Standby, 1)],
            ),
        ]);
        // The active is suspect: the least-lagging live standby first.
        let targets: Vec<&str> = view
            .forward_targets(0, "node-4")
            .iter()
            .map(|h| h.node.node_id.as_str())
            .collect();
        assert_eq!(targets, ["node-3", "node-1"]);
        // Never back to the asking node.
        assert!(
            view.forward_targets(0, "node-3")
                .iter()
                .all(|h| h.node.node_id != "node-3")
        );
        assert!(view.forward_targets(1, "node-4").is_empty());
        // The detail lists every holder, suspect ones too, best first.
        let detail = view.holders_proto(0);
        let order: Vec<&str> = detail.holders.iter().map(|h| h.node_id.as_str()).collect();
        assert_eq!(order, ["node-3", "node-1", "node-2"]);
        assert_eq!(detail.holders[2].liveness(), Liveness::Suspect);
    }

    #[test]
    fn copies_that_serve_no_reads_are_shown_but_never_chosen() {
        let mut failed = with_copies(
            entry("node-1", 1, 7001, Detected::Live),
            &[copy(0, Role::Failed, 0), copy(1, Role::Bootstrapping, 0)],
        );
        failed.values.insert(
            keys::COPY_ERRORS.into(),
            encode_copy_errors(&BTreeMap::from([(0, "disk full\nretrying".to_owned())])),
        );
        let view = view(&[
            failed,
            with_copies(
                entry("node-2", 1, 7002, Detected::Live),
                &[copy(0, Role::Standby, 4), copy(1, Role::Opening, 0)],
            ),
        ]);
        let holders: Vec<&str> = view
            .holders(0)
            .iter()
            .map(|h| h.node.node_id.as_str())
            .collect();
        assert_eq!(holders, ["node-2"]);
        assert!(view.active(0).is_none());
        assert!(view.holders(1).is_empty());
        assert!(view.forward_targets(1, "node-3").is_empty());
        assert!(view.snapshot_sources(0, "node-3").len() == 1);
        // Metadata shows every copy, and why the failed one failed.
        let nodes = view.to_proto_nodes("features");
        let failed = &nodes[0].copies[0];
        assert_eq!(failed.role(), Role::Failed);
        assert_eq!(failed.error, "disk full retrying");
        assert_eq!(nodes[0].copies[1].role(), Role::Bootstrapping);
        let back = ClusterView::from_proto(&MetadataResponse {
            nodes,
            cluster_id: view.cluster_id.clone(),
            ..MetadataResponse::default()
        });
        assert_eq!(back.nodes, view.nodes);
    }

    #[test]
    fn a_restart_at_the_same_address_replaces_the_old_process() {
        let old = with_copies(
            entry("node-1", 100, 7001, Detected::Live),
            &[copy(0, Role::Active, 0)],
        );
        let new = entry("node-1", 200, 7001, Detected::Live);
        let view = view(&[old, new]);
        assert_eq!(view.nodes.len(), 1);
        assert_eq!(view.nodes[0].incarnation, 200);
        assert!(!view.nodes[0].conflicting);
    }

    #[test]
    fn two_live_processes_with_one_node_id_are_both_shown_as_conflicting() {
        let view = view(&[
            entry("node-1", 100, 7001, Detected::Live),
            entry("node-1", 200, 7002, Detected::Live),
            entry("node-2", 100, 7003, Detected::Live),
        ]);
        let conflicting: Vec<(&str, u64)> = view
            .nodes
            .iter()
            .filter(|n| n.conflicting)
            .map(|n| (n.node_id.as_str(), n.incarnation))
            .collect();
        assert_eq!(conflicting, [("node-1", 100), ("node-1", 200)]);
        assert_eq!(view.placement_members(), ["node-1", "node-2"]);
    }

    #[test]
    fn an_old_incarnation_elsewhere_goes_once_the_new_one_is_live() {
        let view = view(&[
            entry(
                "node-1",
                100,
                7001,
                Detected::SilentFor(Duration::from_secs(1)),
            ),
            entry("node-1", 200, 7002, Detected::Live),
        ]);
        assert_eq!(view.nodes.len(), 1);
        assert_eq!(view.nodes[0].gossip_address, "127.0.0.1:7002");
    }

    #[test]
    fn values_that_do_not_decode_are_reported_and_the_node_still_shows() {
        let mut bad = entry("node-1", 1, 7001, Detected::Live);
        bad.values.insert(keys::COPIES.into(), "0:X:1:2:3".into());
        bad.values.insert(keys::LOAD.into(), "lots".into());
        let (view, errors) = ClusterView::from_gossip("test", &[bad], DEAD_AFTER, "");
        assert_eq!(view.nodes.len(), 1);
        assert!(view.nodes[0].copies.is_empty());
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, [keys::LOAD, keys::COPIES]);
    }

    #[test]
    fn a_leaving_or_suspect_node_keeps_its_standbys_until_dead_and_is_asked_last() {
        let mut leaving = with_copies(
            entry("node-2", 1, 7002, Detected::Live),
            &[copy(0, Role::Active, 0)],
        );
        leaving.values.insert(keys::STATUS.into(), "leaving".into());
        let staying = with_copies(
            entry("node-1", 1, 7001, Detected::Live),
            &[copy(0, Role::Standby, 3)],
        );
        let view = view(&[staying.clone(), leaving.clone()]);
        assert_eq!(view.placement_members(), ["node-1", "node-2"]);
        // A live node that is shutting down is asked after the others.
        assert_eq!(view.forward_targets(0, "node-3")[0].node.node_id, "node-1");
        leaving.detected = Detected::SilentFor(Duration::from_secs(1));
        let view = self::view(&[staying.clone(), leaving.clone()]);
        assert_eq!(view.nodes[1].liveness, Liveness::Suspect);
        assert_eq!(view.placement_members(), ["node-1", "node-2"]);
        leaving.detected = Detected::SilentFor(DEAD_AFTER);
        let view = self::view(&[staying, leaving]);
        assert_eq!(view.placement_members(), ["node-1"]);
    }

    /// The issue's sizing: 256 partitions, 20 nodes, one standby. One node's gossip state
    /// must fit one UDP datagram (65,507 bytes) and the whole Metadata answer stay well
    /// under 64 KiB.
    #[test]
    fn view_size_for_256_partitions_20_nodes_one_standby() {
        let partitions = 256u32;
        let members: Vec<String> = (1..=20).map(|i| format!("node-{i:02}")).collect();
        let member_refs: Vec<&str> = members.iter().map(String::as_str).collect();
        let actives: Vec<Option<&str>> = (0..partitions as usize)
            .map(|p| Some(member_refs[p % 20]))
            .collect();
        let standbys = crate::placement::place_standbys(&member_refs, &actives, 1);
        // Large, realistic offsets: a partition that has seen a billion records.
        let offset = |p: u32| 1_000_000_000 + i64::from(p) * 7_919;
        let mut entries = Vec::new();
        let mut largest_state = 0;
        for (i, node) in members.iter().enumerate() {
            let mut copies = Vec::new();
            for p in 0..partitions {
                let role = if actives[p as usize] == Some(node.as_str()) {
                    Role::Active
                } else if standbys[p as usize].contains(node) {
                    Role::Standby
                } else {
                    continue;
                };
                copies.push(CopyInfo {
                    partition: p,
                    role,
                    changelog_offset: offset(p),
                    input_offset: offset(p) * 3,
                    lag: if role == Role::Active { 0 } else { 1_234 },
                });
            }
            let gossip = with_copies(
                entry(node, 1_764_000_000_000, 7000 + i as u16, Detected::Live),
                &copies,
            );
            let state: usize = gossip
                .values
                .iter()
                .map(|(k, v)| k.len() + v.len() + 16)
                .sum();
            largest_state = largest_state.max(state);
            entries.push(gossip);
        }
        let view = view(&entries);
        let response = MetadataResponse {
            stores: Vec::new(),
            nodes: view.to_proto_nodes("features"),
            node_id: "node-01".into(),
            cluster_id: "test".into(),
            view_version: 1,
        };
        let encoded = response.encoded_len();
        eprintln!(
            "256 partitions x 20 nodes x 1 standby: largest node gossip state {largest_state} \
             bytes, Metadata answer {encoded} bytes"
        );
        assert!(
            largest_state < 65_507 / 4,
            "one node's state: {largest_state} bytes"
        );
        assert!(encoded < 64 << 10, "the view: {encoded} bytes");
        assert_eq!(
            view.nodes.iter().map(|n| n.copies.len()).sum::<usize>(),
            512
        );
    }

    fn arbitrary_copy() -> impl Strategy<Value = CopyInfo> {
        (
            0u32..1024,
            prop_oneof![
                Just(Role::Active),
                Just(Role::Standby),
                Just(Role::Restoring),
                Just(Role::Opening),
                Just(Role::Bootstrapping),
                Just(Role::Failed),
            ],
            0i64..i64::MAX / 2,
            0i64..i64::MAX / 2,
            0i64..1 << 40,
        )
            .prop_map(
                |(partition, role, changelog_offset, input_offset, lag)| CopyInfo {
                    partition,
                    role,
                    changelog_offset,
                    input_offset,
                    lag,
                },
            )
    }

    proptest! {
        #[test]
        fn copies_round_trip(copies in proptest::collection::vec(arbitrary_copy(), 0..64)) {
            let mut copies = copies;
            copies.sort_by_key(|c| c.partition);
            copies.dedup_by_key(|c| c.partition);
            prop_assert_eq!(decode_copies(&encode_copies(&copies)).unwrap(), copies);
        }

        #[test]
        fn decoding_arbitrary_text_never_panics(text in ".{0,200}") {
            let _ = decode_copies(&text);
            let _ = decode_load(&text);
            let _ = decode_copy_errors(&text);
        }

        #[test]
        fn copy_errors_round_trip_cut_to_their_limit(
            errors in proptest::collection::btree_map(0u32..1024, "\\PC{0,300}", 0..16)
        ) {
            let decoded = decode_copy_errors(&encode_copy_errors(&errors)).unwrap();
            prop_assert_eq!(decoded.len(), errors.len());
            for (partition, error) in &errors {
                let got = &decoded[partition];
                prop_assert!(got.len() <= MAX_COPY_ERROR_BYTES);
                prop_assert!(error.starts_with(got.as_str()));
            }
        }

        #[test]
        fn holders_are_every_copy_ranked_and_the_view_survives_the_wire(
            layout in proptest::collection::vec(
                (proptest::collection::vec(arbitrary_copy(), 0..8), 0u8..3), 1..8)
        ) {
            let entries: Vec<GossipEntry> = layout
                .iter()
                .enumerate()
                .map(|(i, (copies, health))| {
                    let detected = match health {
                        0 => Detected::Live,
                        1 => Detected::SilentFor(Duration::from_secs(1)),
                        _ => Detected::SilentFor(Duration::from_secs(60)),
                    };
                    let mut copies = copies.clone();
                    copies.sort_by_key(|c| c.partition);
                    copies.dedup_by_key(|c| c.partition);
                    with_copies(entry(&format!("node-{i}"), 1, 7000 + i as u16, detected), &copies)
                })
                .collect();
            let view = view(&entries);
            for partition in 0..1024 {
                let holders = view.holders(partition);
                let expected = view
                    .nodes
                    .iter()
                    .filter(|n| n.copy_of(partition).is_some_and(|c| serves_reads(c.role)))
                    .count();
                prop_assert_eq!(holders.len(), expected);
                for pair in holders.windows(2) {
                    prop_assert!(pair[0].rank() <= pair[1].rank());
                }
                if let Some(active) = view.active(partition) {
                    prop_assert_eq!(active.copy.role, Role::Active);
                    prop_assert!(active.node.liveness != Liveness::Dead);
                }
            }
            let response = MetadataResponse {
                stores: Vec::new(),
                nodes: view.to_proto_nodes("features"),
                node_id: String::new(),
                cluster_id: "test".into(),
                view_version: view.version,
            };
            let decoded = MetadataResponse::decode(response.encode_to_vec().as_slice()).unwrap();
            prop_assert_eq!(ClusterView::from_proto(&decoded), view);
        }
    }

    /// A gossip value for `key` as any node might publish it: mostly well-shaped with any
    /// numbers, sometimes any text.
    fn hostile_value(key: &'static str) -> BoxedStrategy<String> {
        let number = prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            Just("-0".to_owned()),
            Just("+7".to_owned()),
            "[0-9]{0,25}",
        ];
        let item = (
            number.clone(),
            prop_oneof![Just("A"), Just("S"), Just("R"), Just("U"), Just("")],
            number.clone(),
            number.clone(),
            number.clone(),
        )
            .prop_map(|(p, r, c, i, l)| format!("{p}:{r}:{c}:{i}:{l}"));
        let shaped = match key {
            keys::COPIES => proptest::collection::vec(item, 0..6)
                .prop_map(|items| items.join(" "))
                .boxed(),
            keys::LOAD => (number.clone(), number)
                .prop_map(|(a, b)| format!("{a}:{b}"))
                .boxed(),
            keys::GRPC_ADDRESS => prop_oneof![
                Just("127.0.0.1:50051".to_owned()),
                Just("[::1]:1".to_owned()),
                Just("node-1:50051".to_owned()),
                Just("http://x".to_owned()),
            ]
            .boxed(),
            _ => number.boxed(),
        };
        prop_oneof![4 => shaped, 1 => "\\PC{0,40}"].boxed()
    }

    fn hostile_entry() -> impl Strategy<Value = GossipEntry> {
        (
            "[a-z0-9-]{0,6}",
            any::<u64>(),
            any::<u64>(),
            prop_oneof![Just(0u64), any::<u64>()],
            hostile_value(keys::COPIES),
            hostile_value(keys::LOAD),
            hostile_value(keys::GROUP_GENERATION),
            hostile_value(keys::GRPC_ADDRESS),
            "\\PC{0,12}",
        )
            .prop_map(
                |(
                    node_id,
                    incarnation,
                    version,
                    silent,
                    copies,
                    load,
                    generation,
                    grpc,
                    status,
                )| {
                    let values = [
                        (keys::COPIES, copies),
                        (keys::LOAD, load),
                        (keys::GROUP_GENERATION, generation),
                        (keys::GRPC_ADDRESS, grpc),
                        (keys::STATUS, status),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect();
                    GossipEntry {
                        node_id,
                        incarnation,
                        gossip_address: format!("127.0.0.1:{}", incarnation % 3),
                        version,
                        detected: match silent {
                            0 => Detected::Live,
                            ms => Detected::SilentFor(Duration::from_millis(ms % 100_000)),
                        },
                        values,
                    }
                },
            )
    }

    /// Asks every question of a view that routing, placement and Metadata ask.
    fn ask_everything(view: &ClusterView) {
        for partition in (0..8).chain([u32::MAX]) {
            let _ = view.holders(partition);
            let _ = view.forward_targets(partition, "node-1");
            let _ = view.holders_proto(partition);
            let _ = view.active(partition);
            let _ = view.backup_source(partition);
            let _ = view.snapshot_sources(partition, "node-1");
        }
        let _ = view.placement_members();
        let _ = view.actives(8);
        let _ = view.count_by_liveness();
        let _ = ClusterView::from_proto(&MetadataResponse {
            stores: Vec::new(),
            nodes: view.to_proto_nodes("features"),
            node_id: String::new(),
            cluster_id: view.cluster_id.clone(),
            view_version: view.version,
        });
    }

    proptest! {
        #[test]
        fn gossip_of_any_shape_never_panics_and_what_decodes_is_sane(
            entries in proptest::collection::vec(hostile_entry(), 0..6)
        ) {
            let (view, _errors) = ClusterView::from_gossip("test", &entries, DEAD_AFTER, "");
            for node in &view.nodes {
                prop_assert!(node.grpc_address.is_empty()
                    || node.grpc_address.parse::<std::net::SocketAddr>().is_ok());
                for copy in &node.copies {
                    prop_assert!(copy.changelog_offset >= 0 && copy.input_offset >= 0);
                    prop_assert!(copy.lag >= 0 && copy.input_offset.checked_add(copy.lag).is_some());
                }
            }
            ask_everything(&view);
        }

        #[test]
        fn a_metadata_answer_of_any_shape_never_panics_a_client_view(
            nodes in proptest::collection::vec(
                (
                    "\\PC{0,8}",
                    proptest::collection::vec(
                        (any::<u32>(), any::<i32>(), any::<i64>(), any::<i64>(), any::<i64>(), any::<i64>()),
                        0..6,
                    ),
                    any::<i32>(),
                    any::<i32>(),
                    any::<u64>(),
                ),
                0..5,
            ),
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let nodes = nodes
                .into_iter()
                .map(|(node_id, copies, liveness, status, incarnation)| NodeInfo {
                    node_id,
                    grpc_address: "127.0.0.1:1".into(),
                    copies: copies
                        .into_iter()
                        .map(|(partition, role, changelog_offset, input_offset, input_end, lag)| {
                            PartitionCopy { partition, role, changelog_offset, input_offset, input_end, lag, error: String::new(), store: String::new() }
                        })
                        .collect(),
                    liveness,
                    incarnation,
                    version: 0,
                    group_generation: 0,
                    load: None,
                    status,
                    conflicting: false,
                    gossip_address: String::new(),
                })
                .collect();
            let answer = MetadataResponse {
                stores: Vec::new(),
                nodes,
                node_id: String::new(),
                cluster_id: "test".into(),
                view_version: 0,
            };
            ask_everything(&ClusterView::from_proto(&answer));
            if let Ok(answer) = MetadataResponse::decode(bytes.as_slice()) {
                ask_everything(&ClusterView::from_proto(&answer));
            }
        }

        #[test]
        fn loads_statuses_and_addresses_round_trip(
            ingest_rate in any::<u64>(),
            reads_in_flight in any::<u32>(),
            status in prop_oneof![
                Just(NodeStatus::Starting), Just(NodeStatus::Running), Just(NodeStatus::Leaving)
            ],
            ip in any::<[u8; 4]>(),
            port in any::<u16>(),
        ) {
            let load = Load { ingest_rate, reads_in_flight };
            prop_assert_eq!(decode_load(&encode_load(load)).unwrap(), load);
            prop_assert_eq!(decode_status(encode_status(status)).unwrap(), status);
            let address = std::net::SocketAddr::from((ip, port)).to_string();
            prop_assert_eq!(decode_grpc_address(&address).unwrap(), address);
        }
    }
}
