//! A read's fan-out over the copies of its keys' partitions: which node each key is asked
//! of, and where keys go next when the node asked fails or has not answered within its share
//! of the deadline.
//!
//! Keys asked of one node form a group (one call: a Get for one key, a MultiGet for more).
//! The keys of a partition always travel together, and no node is asked twice for a
//! partition. When a group fails or stalls, its keys that are still unanswered are regrouped
//! by their partitions' next copies; a group that stalled may still answer, and the first
//! answer for a key wins. A Get is the fan-out of one key (a scan page would be one
//! partition's). Pure: the caller sends the groups and reports what came back.
//!
//! ```
//! use kstore_core::cluster::Role;
//! use kstore_core::routing::Target;
//! use kstore_core::routing::fanout::FanOut;
//!
//! let copy = |node: &str| Target {
//!     node_id: node.into(),
//!     address: format!("{node}:50051"),
//!     role: Role::Standby,
//!     lag: 0,
//! };
//! // Keys 0 and 2 are of partition 0 (node-a, then node-b); key 1 of partition 1 (node-a).
//! let mut fanout = FanOut::new(vec![0, 1, 0], |partition| match partition {
//!     0 => vec![copy("node-a"), copy("node-b")],
//!     _ => vec![copy("node-a")],
//! });
//! let first = fanout.start();
//! assert_eq!((first[0].target.node_id.as_str(), first[0].keys.clone()), ("node-a", vec![0, 1, 2]));
//! // node-a stalls: partition 0's keys go on to node-b; partition 1 has no other copy.
//! let next = fanout.move_on(first[0].id);
//! assert_eq!((next[0].target.node_id.as_str(), next[0].keys.clone()), ("node-b", vec![0, 2]));
//! // node-a answers after all: the first answer for each key wins.
//! assert!(fanout.settle(1));
//! assert!(fanout.settle(0) && fanout.settle(2));
//! assert!(!fanout.settle(0), "a later answer for a settled key is ignored");
//! assert!(fanout.is_done());
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use super::{Target, stall_after};

/// A group's id: its index among the groups the fan-out has made.
pub type GroupId = usize;

/// Keys to ask of one node, in one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Its id.
    pub id: GroupId,
    /// The node to ask.
    pub target: Target,
    /// The keys, as indexes into the read's keys, in ascending order.
    pub keys: Vec<usize>,
    /// Whether the group asks the first copy of every partition in it (the plan's pick, not
    /// a fallback).
    pub first: bool,
}

#[derive(Debug, Default)]
struct PartitionState {
    /// Copies not asked yet, in the order to ask them.
    rest: VecDeque<Target>,
    /// The nodes asked, in order.
    asked: Vec<String>,
    /// The group that asked the partition last.
    newest: Option<GroupId>,
    /// The partition's keys.
    keys: Vec<usize>,
}

/// The fan-out of one read. See the [module](self) documentation.
#[derive(Debug)]
pub struct FanOut {
    partitions: BTreeMap<u32, PartitionState>,
    /// Each key's partition.
    key_partitions: Vec<u32>,
    /// Whether each key is settled: answered, or failed for good.
    settled: Vec<bool>,
    /// Each group's partitions.
    groups: Vec<Vec<u32>>,
}

impl FanOut {
    /// Returns the fan-out of keys whose partitions are `key_partitions` (key `i`'s at index
    /// `i`); `plan` gives each partition's copies in the order to ask them.
    pub fn new(key_partitions: Vec<u32>, mut plan: impl FnMut(u32) -> Vec<Target>) -> FanOut {
        let mut partitions: BTreeMap<u32, PartitionState> = BTreeMap::new();
        for (key, &partition) in key_partitions.iter().enumerate() {
            partitions.entry(partition).or_default().keys.push(key);
        }
        for (&partition, state) in &mut partitions {
            state.rest = distinct(plan(partition), &[]);
        }
        FanOut {
            partitions,
            settled: vec![false; key_partitions.len()],
            key_partitions,
            groups: Vec::new(),
        }
    }

    /// Returns the first groups: each partition's first copy, its keys grouped by node. A
    /// partition with no copy planned asks nothing (see [`FanOut::exhausted`]).
    pub fn start(&mut self) -> Vec<Group> {
        let fresh: Vec<u32> = self
            .partitions
            .iter()
            .filter(|(_, state)| state.newest.is_none())
            .map(|(&partition, _)| partition)
            .collect();
        self.advance(fresh)
    }

    /// Returns where the group's unsettled keys go next: the partitions that this group
    /// asked last, each to its next copy, grouped by node. Called when the group fails, or
    /// has not answered within its share of the deadline (it may still answer). A partition
    /// with no copy left asks nothing more.
    pub fn move_on(&mut self, group: GroupId) -> Vec<Group> {
        let partitions = self.newest_in(group);
        self.advance(partitions)
    }

    /// Returns where the unsettled keys go next when no call is running for them (after a
    /// fresh view replanned their partitions, say): each of their partitions' next copy.
    pub fn resume(&mut self) -> Vec<Group> {
        let waiting: Vec<u32> = self
            .partitions
            .iter()
            .filter(|(_, state)| self.has_unsettled(state))
            .map(|(&partition, _)| partition)
            .collect();
        self.advance(waiting)
    }

    /// Like [`FanOut::move_on`], for the named partitions of the group only (the group
    /// answered, but not for their keys).
    pub fn move_on_partitions(&mut self, group: GroupId, partitions: &[u32]) -> Vec<Group> {
        let partitions = self
            .newest_in(group)
            .into_iter()
            .filter(|p| partitions.contains(p))
            .collect();
        self.advance(partitions)
    }

    /// Replaces the copies of `partition` not asked yet with `targets` (a fresh plan), less
    /// the nodes already asked for it.
    pub fn replan(&mut self, partition: u32, targets: Vec<Target>) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.rest = distinct(targets, &state.asked);
        }
    }

    /// Settles a key (answered, or failed for good). Returns false if it was settled
    /// already: a later answer, to be ignored.
    pub fn settle(&mut self, key: usize) -> bool {
        match self.settled.get_mut(key) {
            Some(settled) if !*settled => {
                *settled = true;
                true
            }
            _ => false,
        }
    }

    /// Whether the key is settled.
    pub fn is_settled(&self, key: usize) -> bool {
        self.settled.get(key).copied().unwrap_or(true)
    }

    /// Returns how many keys the read has.
    pub fn keys(&self) -> usize {
        self.settled.len()
    }

    /// Whether every key is settled.
    pub fn is_done(&self) -> bool {
        self.settled.iter().all(|&settled| settled)
    }

    /// Returns the keys not settled yet, in ascending order.
    pub fn unsettled(&self) -> Vec<usize> {
        (0..self.settled.len())
            .filter(|&key| !self.settled[key])
            .collect()
    }

    /// Returns the key's partition.
    pub fn partition_of(&self, key: usize) -> u32 {
        self.key_partitions[key]
    }

    /// Returns the partitions of the group.
    pub fn partitions_of(&self, group: GroupId) -> &[u32] {
        self.groups.get(group).map_or(&[], Vec::as_slice)
    }

    /// Returns the partitions with unsettled keys and no copy left to ask.
    pub fn exhausted(&self) -> Vec<u32> {
        self.partitions
            .iter()
            .filter(|(_, state)| state.rest.is_empty() && self.has_unsettled(state))
            .map(|(&partition, _)| partition)
            .collect()
    }

    /// Returns the nodes asked for `partition`, in order.
    pub fn asked(&self, partition: u32) -> &[String] {
        self.partitions
            .get(&partition)
            .map_or(&[], |state| state.asked.as_slice())
    }

    /// Returns the plan of `partition` as it stands: the nodes asked, then those not asked
    /// yet.
    pub fn plan(&self, partition: u32) -> Vec<String> {
        self.partitions
            .get(&partition)
            .map(|state| {
                let rest = state.rest.iter().map(|t| t.node_id.clone());
                state.asked.iter().cloned().chain(rest).collect()
            })
            .unwrap_or_default()
    }

    /// Returns how many copies are left after the group's, at most, over the partitions with
    /// unsettled keys that it asked last.
    pub fn copies_left(&self, group: GroupId) -> usize {
        self.newest_in(group)
            .iter()
            .filter_map(|p| self.partitions.get(p))
            .map(|state| state.rest.len())
            .max()
            .unwrap_or(0)
    }

    /// Returns how long to wait for the group before its keys go on to their next copies as
    /// well, given the time left when it was sent (see [`stall_after`]); `None` when there
    /// is nowhere else to go.
    pub fn stall_after(&self, group: GroupId, remaining: Duration) -> Option<Duration> {
        stall_after(remaining, self.copies_left(group))
    }

    /// The partitions, with unsettled keys, that `group` asked last.
    fn newest_in(&self, group: GroupId) -> Vec<u32> {
        self.partitions_of(group)
            .iter()
            .copied()
            .filter(|p| {
                self.partitions
                    .get(p)
                    .is_some_and(|state| state.newest == Some(group) && self.has_unsettled(state))
            })
            .collect()
    }

    fn has_unsettled(&self, state: &PartitionState) -> bool {
        state.keys.iter().any(|&key| !self.settled[key])
    }

    /// Asks each partition's next copy, grouping the partitions by node.
    fn advance(&mut self, partitions: Vec<u32>) -> Vec<Group> {
        let mut by_node: BTreeMap<String, (Target, Vec<u32>, bool)> = BTreeMap::new();
        for partition in partitions {
            let Some(state) = self.partitions.get(&partition) else {
                continue;
            };
            if !self.has_unsettled(state) {
                continue;
            }
            let Some(state) = self.partitions.get_mut(&partition) else {
                continue;
            };
            let Some(target) = state.rest.pop_front() else {
                continue;
            };
            let first = state.asked.is_empty();
            state.asked.push(target.node_id.clone());
            let entry = by_node
                .entry(target.node_id.clone())
                .or_insert_with(|| (target, Vec::new(), true));
            entry.1.push(partition);
            entry.2 &= first;
        }
        let mut groups = Vec::with_capacity(by_node.len());
        for (_, (target, partitions, first)) in by_node {
            let id = self.groups.len();
            let mut keys = Vec::new();
            for partition in &partitions {
                if let Some(state) = self.partitions.get_mut(partition) {
                    state.newest = Some(id);
                    keys.extend(state.keys.iter().copied().filter(|&k| !self.settled[k]));
                }
            }
            keys.sort_unstable();
            self.groups.push(partitions);
            groups.push(Group {
                id,
                target,
                keys,
                first,
            });
        }
        groups
    }
}

/// The targets in order, each node once, less the nodes in `asked`.
fn distinct(targets: Vec<Target>, asked: &[String]) -> VecDeque<Target> {
    let mut seen: Vec<String> = asked.to_vec();
    let mut rest = VecDeque::with_capacity(targets.len());
    for target in targets {
        if !seen.contains(&target.node_id) {
            seen.push(target.node_id.clone());
            rest.push_back(target);
        }
    }
    rest
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use proptest::prelude::*;

    use super::*;
    use crate::cluster::Role;

    fn copy(node: usize) -> Target {
        Target {
            node_id: format!("node-{node}"),
            address: format!("127.0.0.1:{}", 50_000 + node),
            role: if node == 0 {
                Role::Active
            } else {
                Role::Standby
            },
            lag: 0,
        }
    }

    #[test]
    fn a_stalled_group_splits_by_each_partitions_next_copy() {
        // Partitions 0 and 1 both start on node-1; their second copies differ.
        let plans: HashMap<u32, Vec<Target>> = [
            (0, vec![copy(1), copy(2)]),
            (1, vec![copy(1), copy(3)]),
            (2, vec![copy(2), copy(1)]),
        ]
        .into();
        let mut fanout = FanOut::new(vec![0, 1, 2, 0], |p| plans[&p].clone());
        let first = fanout.start();
        let summary = |groups: &[Group]| -> Vec<(String, Vec<usize>, bool)> {
            groups
                .iter()
                .map(|g| (g.target.node_id.clone(), g.keys.clone(), g.first))
                .collect()
        };
        assert_eq!(
            summary(&first),
            [
                ("node-1".into(), vec![0, 1, 3], true),
                ("node-2".into(), vec![2], true)
            ]
        );
        assert_eq!(fanout.copies_left(first[0].id), 1);
        assert_eq!(
            fanout.stall_after(first[0].id, Duration::from_secs(1)),
            Some(Duration::from_millis(500))
        );
        let second = fanout.move_on(first[0].id);
        assert_eq!(
            summary(&second),
            [
                ("node-2".into(), vec![0, 3], false),
                ("node-3".into(), vec![1], false)
            ]
        );
        // Moving on from a group whose partitions moved on already asks nobody.
        assert!(fanout.move_on(first[0].id).is_empty());
        assert_eq!(fanout.copies_left(first[0].id), 0);
        assert_eq!(fanout.plan(0), ["node-1", "node-2"]);
        // Nothing left for partition 0 after node-2.
        assert!(fanout.move_on(second[0].id).is_empty());
        assert_eq!(fanout.exhausted(), [0, 1]);
    }

    #[test]
    fn a_replan_never_asks_a_node_twice_and_partitions_without_copies_are_exhausted() {
        let mut fanout = FanOut::new(vec![5], |_| Vec::new());
        assert!(fanout.start().is_empty());
        assert_eq!(fanout.exhausted(), [5]);
        fanout.replan(5, vec![copy(1), copy(1), copy(2)]);
        let first = fanout.start();
        assert_eq!(first.len(), 1);
        assert!(first[0].first);
        // A misroute: the fresh plan names node-1 again, and node-3.
        fanout.replan(5, vec![copy(1), copy(3), copy(2)]);
        let next = fanout.move_on_partitions(first[0].id, &[5]);
        assert_eq!(next[0].target.node_id, "node-3");
        assert_eq!(fanout.asked(5), ["node-1", "node-3"]);
        // Resumed (node-3 failed, nothing runs): the last copy left.
        let last = fanout.resume();
        assert_eq!(last[0].target.node_id, "node-2");
        assert!(fanout.resume().is_empty());
        assert_eq!(fanout.exhausted(), [5]);
        assert!(fanout.settle(0));
        assert_eq!(fanout.stall_after(last[0].id, Duration::from_secs(1)), None);
        assert!(fanout.is_done() && fanout.exhausted().is_empty());
    }

    proptest! {
        #[test]
        fn keys_of_a_partition_travel_together_and_no_node_is_asked_twice_for_one(
            key_partitions in proptest::collection::vec(0u32..6, 1..40),
            plans in proptest::collection::vec(proptest::collection::vec(0usize..5, 0..5), 6),
            events in proptest::collection::vec((0u8..3, any::<u16>()), 0..40),
        ) {
            let plans: Vec<Vec<Target>> = plans
                .iter()
                .map(|nodes| nodes.iter().map(|&n| copy(n)).collect())
                .collect();
            let mut fanout = FanOut::new(key_partitions.clone(), |p| plans[p as usize].clone());
            // A new group holds every unsettled key of each of its partitions.
            let check = |fanout: &FanOut, groups: &[Group]| -> Result<(), TestCaseError> {
                for group in groups {
                    prop_assert!(!group.keys.is_empty());
                    prop_assert!(group.keys.windows(2).all(|w| w[0] < w[1]));
                    let partitions: BTreeSet<u32> =
                        group.keys.iter().map(|&k| key_partitions[k]).collect();
                    for partition in partitions {
                        let all: Vec<usize> = (0..key_partitions.len())
                            .filter(|&k| key_partitions[k] == partition && !fanout.is_settled(k))
                            .collect();
                        let in_group: Vec<usize> = group
                            .keys
                            .iter()
                            .copied()
                            .filter(|&k| key_partitions[k] == partition)
                            .collect();
                        prop_assert_eq!(in_group, all);
                    }
                }
                Ok(())
            };
            let first = fanout.start();
            check(&fanout, &first)?;
            let mut sent = first;
            for (what, pick) in events {
                let pick = usize::from(pick);
                let next = match what {
                    0 if !sent.is_empty() => fanout.move_on(sent[pick % sent.len()].id),
                    1 => {
                        fanout.settle(pick % key_partitions.len());
                        Vec::new()
                    }
                    _ if !sent.is_empty() => {
                        let group = &sent[pick % sent.len()];
                        let partition = key_partitions[group.keys[0]];
                        fanout.move_on_partitions(group.id, &[partition])
                    }
                    _ => Vec::new(),
                };
                check(&fanout, &next)?;
                sent.extend(next);
            }
            // No node asked twice for a partition, and every ask is in the partition's plan.
            let mut asked: BTreeSet<(u32, String)> = BTreeSet::new();
            for group in &sent {
                let partitions: BTreeSet<u32> =
                    group.keys.iter().map(|&k| key_partitions[k]).collect();
                for partition in partitions {
                    prop_assert!(
                        asked.insert((partition, group.target.node_id.clone())),
                        "{} asked twice for partition {}", group.target.node_id, partition
                    );
                    prop_assert!(plans[partition as usize].contains(&group.target));
                }
            }
        }
    }
}
