//! Read routing: which copies of a partition a read should ask, in which order, under a read
//! policy. Pure: it takes the cluster view and the caller's own in-flight counts, and gives
//! a plan whose first target is the one to ask and whose rest are the fallbacks (and hedges)
//! in order, each host once.
//!
//! ```
//! use kstore_core::cluster::ClusterView;
//! use kstore_core::routing::{ReadPolicy, plan};
//! let view = ClusterView::default();
//! let targets = plan(&view, 3, ReadPolicy::default(), None, &|_| 0, 0);
//! assert!(targets.is_empty(), "no node holds partition 3 in an empty view");
//! ```
//!
//! A copy that does not answer is not waited for until the read's deadline: each copy asked
//! gets a share of the time left ([`stall_after`]), then the next copy of the plan is asked as
//! well, so that a paused or overloaded node delays a read without failing it, whatever the
//! failure detector has noticed yet. [`fanout`] applies the plans to the keys of a read.

pub mod fanout;

use std::time::Duration;

use crate::cluster::{ClusterView, Holder, Liveness, NodeStatus, Role};

/// Which copies a read may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPolicy {
    /// Only the partition's active copy, and only while its node is live.
    ActiveOnly,
    /// The active first; standbys (and restoring copies) no more than `max_lag` input
    /// records behind when the active is down, suspect or slow.
    PreferActive {
        /// The most input records a fallback copy may lag.
        max_lag: i64,
    },
    /// Any copy no more than `max_lag` behind, the less busy of two picked at random first
    /// (power of two choices), to spread reads when actives are busy ingesting.
    AnyReplica {
        /// The most input records a copy may lag.
        max_lag: i64,
    },
}

impl Default for ReadPolicy {
    /// `PreferActive` with a `max_lag` of 10,000 input records.
    fn default() -> Self {
        ReadPolicy::PreferActive { max_lag: 10_000 }
    }
}

/// One copy a read may ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The node.
    pub node_id: String,
    /// Where it serves gRPC.
    pub address: String,
    /// The copy's role.
    pub role: Role,
    /// The copy's lag, as the view says.
    pub lag: i64,
}

impl Target {
    fn of(holder: &Holder<'_>) -> Target {
        Target {
            node_id: holder.node.node_id.clone(),
            address: holder.node.grpc_address.clone(),
            role: holder.copy.role,
            lag: holder.copy.lag,
        }
    }
}

/// Returns the copies of `partition` that a read may ask under `policy`, in the order to ask
/// them; each node appears once.
///
/// Live nodes come first, a node that is shutting down after the other live ones, and
/// suspect nodes last (a node that missed a few heartbeats may still answer, and is better
/// than no answer); dead nodes never. With
/// `min_input_offset` (read-your-writes), a copy qualifies only if it reflects that offset
/// already or is the live active (which reaches it as it processes). `in_flight` gives the
/// caller's reads in flight per address, added to the load the node reported; `seed` picks
/// the two random candidates of `AnyReplica` (vary it per read).
pub fn plan(
    view: &ClusterView,
    partition: u32,
    policy: ReadPolicy,
    min_input_offset: Option<i64>,
    in_flight: &dyn Fn(&str) -> u32,
    seed: u64,
) -> Vec<Target> {
    let holders: Vec<Holder<'_>> = view
        .holders(partition)
        .into_iter()
        .filter(|h| h.node.liveness != Liveness::Dead && !h.node.grpc_address.is_empty())
        .collect();
    let is_active = |h: &Holder<'_>| h.copy.role == Role::Active;
    let reaches = |h: &Holder<'_>| {
        min_input_offset.is_none_or(|wanted| is_active(h) || h.copy.input_offset > wanted)
    };
    let within = |h: &Holder<'_>, max_lag: i64| is_active(h) || h.copy.lag <= max_lag;
    let mut chosen: Vec<Holder<'_>> = match policy {
        ReadPolicy::ActiveOnly => holders.into_iter().filter(is_active).collect(),
        ReadPolicy::PreferActive { max_lag } => holders
            .into_iter()
            .filter(|h| reaches(h) && within(h, max_lag))
            .collect(),
        ReadPolicy::AnyReplica { max_lag } => {
            let mut fit: Vec<Holder<'_>> = holders
                .into_iter()
                .filter(|h| reaches(h) && within(h, max_lag))
                .collect();
            // The rest stay in the view's order (active first, least lag); the first is the
            // less loaded of two random ones.
            let live = fit
                .iter()
                .filter(|h| h.node.liveness == Liveness::Live)
                .count();
            if live >= 2 {
                let load = |h: &Holder<'_>| {
                    u64::from(h.node.load.reads_in_flight)
                        + u64::from(in_flight(&h.node.grpc_address))
                };
                let a = (splitmix(seed) % fit.len() as u64) as usize;
                let mut b =
                    (splitmix(seed ^ 0x9e37_79b9_7f4a_7c15) % (fit.len() as u64 - 1)) as usize;
                if b >= a {
                    b += 1;
                }
                let first = if load(&fit[b]) < load(&fit[a]) { b } else { a };
                let picked = fit.remove(first);
                fit.insert(0, picked);
            }
            fit
        }
    };
    // A node that is shutting down answers until it stops, but others are asked first; a
    // suspect one comes last.
    chosen.sort_by_key(|h| {
        (
            h.node.liveness != Liveness::Live,
            h.node.status == NodeStatus::Leaving,
        )
    });
    let mut seen = std::collections::HashSet::new();
    chosen
        .iter()
        .filter(|h| seen.insert(h.node.node_id.clone()))
        .map(Target::of)
        .collect()
}

/// Returns where a node that holds no copy of `partition` forwards a read of it, in the order
/// to ask them: the live holders other than `this_node`, the active first, then the least
/// lag (see [`ClusterView::forward_targets`]).
pub fn forward_plan(view: &ClusterView, partition: u32, this_node: &str) -> Vec<Target> {
    view.forward_targets(partition, this_node)
        .iter()
        .map(Target::of)
        .collect()
}

/// Returns how long a read waits for the copy it asked last before it asks the next copy of
/// its plan as well: an even share of the time left (`remaining`) between that copy and the
/// `copies_left` not asked yet. `None` when no copy is left: the last copy gets all the time
/// there is.
///
/// The copy asked keeps its chance to answer (the first answer wins), and every copy gets at
/// least its share of the time, so a node that stalls (paused, swapping, in a long
/// collection) costs a read one share of its deadline, not the read.
///
/// ```
/// use std::time::Duration;
/// use kstore_core::routing::stall_after;
/// let second = Duration::from_secs(1);
/// assert_eq!(stall_after(second, 1), Some(second / 2));
/// assert_eq!(stall_after(second, 2), Some(second / 3));
/// assert_eq!(stall_after(second, 0), None);
/// ```
pub fn stall_after(remaining: Duration, copies_left: usize) -> Option<Duration> {
    if copies_left == 0 {
        return None;
    }
    let shares = u32::try_from(copies_left).map_or(u32::MAX, |left| left.saturating_add(1));
    Some(remaining / shares)
}

/// A fixed 64-bit mix (splitmix64), so that plans do not depend on a random source.
fn splitmix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::cluster::{CopyInfo, Detected, GossipEntry, encode_copies, keys};

    fn node(
        id: usize,
        detected: Detected,
        leaving: bool,
        reads: u32,
        copies: &[CopyInfo],
    ) -> GossipEntry {
        let mut values = BTreeMap::new();
        values.insert(
            keys::GRPC_ADDRESS.into(),
            format!("127.0.0.1:{}", 50_000 + id),
        );
        values.insert(
            keys::STATUS.into(),
            if leaving { "leaving" } else { "running" }.into(),
        );
        values.insert(keys::LOAD.into(), format!("0:{reads}"));
        values.insert(keys::COPIES.into(), encode_copies(copies));
        GossipEntry {
            node_id: format!("node-{id}"),
            incarnation: 1,
            gossip_address: format!("127.0.0.1:{}", 7_000 + id),
            version: 1,
            detected,
            values,
        }
    }

    fn copy(role: Role, input_offset: i64, lag: i64) -> CopyInfo {
        CopyInfo {
            partition: 0,
            role,
            changelog_offset: input_offset,
            input_offset,
            lag,
        }
    }

    fn view(entries: &[GossipEntry]) -> ClusterView {
        ClusterView::from_gossip("test", entries, Duration::from_secs(10), "").0
    }

    fn ids(targets: &[Target]) -> Vec<&str> {
        targets.iter().map(|t| t.node_id.as_str()).collect()
    }

    const LIVE: Detected = Detected::Live;
    const SUSPECT: Detected = Detected::SilentFor(Duration::from_secs(1));

    #[test]
    fn prefer_active_asks_the_active_then_standbys_within_the_lag_bound() {
        let view = view(&[
            node(1, LIVE, false, 0, &[copy(Role::Active, 100, 0)]),
            node(2, LIVE, false, 0, &[copy(Role::Standby, 90, 10)]),
            node(3, LIVE, false, 0, &[copy(Role::Standby, 40, 60)]),
        ]);
        let policy = ReadPolicy::PreferActive { max_lag: 50 };
        assert_eq!(
            ids(&plan(&view, 0, policy, None, &|_| 0, 1)),
            ["node-1", "node-2"]
        );
        assert_eq!(
            ids(&plan(&view, 0, ReadPolicy::ActiveOnly, None, &|_| 0, 1)),
            ["node-1"]
        );
        assert!(plan(&view, 1, policy, None, &|_| 0, 1).is_empty());
    }

    #[test]
    fn a_suspect_active_is_asked_last() {
        let view = view(&[
            node(1, SUSPECT, false, 0, &[copy(Role::Active, 100, 0)]),
            node(2, LIVE, false, 0, &[copy(Role::Standby, 90, 10)]),
        ]);
        let policy = ReadPolicy::PreferActive { max_lag: 50 };
        assert_eq!(
            ids(&plan(&view, 0, policy, None, &|_| 0, 1)),
            ["node-2", "node-1"]
        );
        assert_eq!(
            ids(&plan(&view, 0, ReadPolicy::ActiveOnly, None, &|_| 0, 1)),
            ["node-1"]
        );
    }

    #[test]
    fn a_position_bound_keeps_only_copies_that_reach_it() {
        let view = view(&[
            node(1, LIVE, false, 0, &[copy(Role::Active, 100, 0)]),
            node(2, LIVE, false, 0, &[copy(Role::Standby, 95, 5)]),
            node(3, LIVE, false, 0, &[copy(Role::Standby, 99, 1)]),
        ]);
        let policy = ReadPolicy::AnyReplica { max_lag: 50 };
        let targets = plan(&view, 0, policy, Some(97), &|_| 0, 5);
        let mut got = ids(&targets);
        got.sort();
        assert_eq!(got, ["node-1", "node-3"]);
    }

    #[test]
    fn any_replica_takes_the_less_loaded_of_two() {
        let view = view(&[
            node(1, LIVE, false, 50, &[copy(Role::Active, 100, 0)]),
            node(2, LIVE, false, 0, &[copy(Role::Standby, 99, 1)]),
        ]);
        let policy = ReadPolicy::AnyReplica { max_lag: 50 };
        for seed in 0..20 {
            assert_eq!(
                plan(&view, 0, policy, None, &|_| 0, seed)[0].node_id,
                "node-2"
            );
        }
        // The caller's own reads in flight count too.
        let busy = |address: &str| if address.ends_with("50002") { 100 } else { 0 };
        assert_eq!(plan(&view, 0, policy, None, &busy, 3)[0].node_id, "node-1");
    }

    #[test]
    fn a_node_shutting_down_is_asked_last() {
        let view = view(&[
            node(1, LIVE, true, 0, &[copy(Role::Active, 100, 0)]),
            node(2, LIVE, false, 0, &[copy(Role::Standby, 99, 1)]),
        ]);
        let targets = plan(&view, 0, ReadPolicy::default(), None, &|_| 0, 1);
        assert_eq!(ids(&targets), ["node-2", "node-1"]);
    }

    proptest! {
        #[test]
        fn plans_name_each_live_qualifying_node_once(
            layout in proptest::collection::vec((0u8..3, any::<bool>(), 0u8..3, 0i64..200, 0u32..20), 1..8),
            max_lag in 0i64..150,
            bound in proptest::option::of(0i64..200),
            seed in any::<u64>(),
            which in 0u8..3,
        ) {
            let entries: Vec<GossipEntry> = layout
                .iter()
                .enumerate()
                .map(|(i, (health, leaving, role, lag, reads))| {
                    let detected = match health {
                        0 | 1 => LIVE,
                        _ => SUSPECT,
                    };
                    let role = [Role::Active, Role::Standby, Role::Restoring][*role as usize];
                    node(i, detected, *leaving, *reads, &[copy(role, 200 - lag, *lag)])
                })
                .collect();
            let view = view(&entries);
            let policy = match which {
                0 => ReadPolicy::ActiveOnly,
                1 => ReadPolicy::PreferActive { max_lag },
                _ => ReadPolicy::AnyReplica { max_lag },
            };
            let targets = plan(&view, 0, policy, bound, &|_| 0, seed);
            let mut seen = std::collections::HashSet::new();
            for target in &targets {
                prop_assert!(seen.insert(target.node_id.clone()), "{} twice", target.node_id);
                let node = view.nodes.iter().find(|n| n.node_id == target.node_id).unwrap();
                prop_assert!(node.liveness != Liveness::Dead);
                let copy = node.copy_of(0).unwrap();
                prop_assert!(copy.role == Role::Active || copy.lag <= max_lag);
                if let Some(wanted) = bound {
                    prop_assert!(copy.role == Role::Active || copy.input_offset > wanted);
                }
                if policy == ReadPolicy::ActiveOnly {
                    prop_assert_eq!(copy.role, Role::Active);
                }
            }
            // Live nodes before suspect ones.
            let live: Vec<bool> = targets
                .iter()
                .map(|t| view.nodes.iter().any(|n| n.node_id == t.node_id && n.liveness == Liveness::Live))
                .collect();
            prop_assert!(live.windows(2).all(|w| w[0] || !w[1]), "{:?}", targets);
            if let ReadPolicy::PreferActive { .. } = policy {
                // A live active that is not shutting down comes first.
                if let Some(active) = view.nodes.iter().find(|n| {
                    n.liveness == Liveness::Live
                        && n.status != NodeStatus::Leaving
                        && n.copy_of(0).is_some_and(|c| c.role == Role::Active)
                }) {
                    prop_assert_eq!(&targets[0].role, &Role::Active, "{:?} {:?}", targets, active.node_id);
                }
            }
        }
    }
}
