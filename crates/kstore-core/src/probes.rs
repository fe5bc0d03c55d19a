//! What a node's probes decide (the startup, readiness and liveness checks that Kubernetes
//! and container runtimes ask on the metrics port), from plain data: the node gathers what
//! its registry, gossip and loops say, and these functions decide, so that each rule is
//! tested without a node.
//!
//! - **Started**: the stores of the node's first assignment are open (what gRPC health
//!   reports as SERVING). Everything slow at start comes before: the topics' check, reading
//!   every copy on disk for its checksums, bootstrapping copies from a peer or a backup.
//!   Catching up afterwards is readiness's business. A member assigned no partition is
//!   started once that has held for a few seconds.
//! - **Ready**: started, not leaving (shutting down or draining), and every local copy,
//!   whatever its role, answers within the staleness bound `max_lag`: its input end has been
//!   looked up, and its lag is at most `max_lag` input records, or no live copy of its
//!   partition on another node reflects more than `max_lag` records more than it (the
//!   whole cluster is behind, as when ingest stalls everywhere, and sending reads elsewhere
//!   would not make them fresher: a shared cause never takes every node out of service at
//!   once). A node that holds no copy forwards every read and is ready once started.
//! - **Live**: none of the node's loops has stalled: each that beats came around within
//!   `stall_after`, or is inside a step known to be long (such as opening and restoring
//!   copies) and says so; and none stopped while the node is not leaving. A node that is
//!   leaving is always live: killing it would cut its drain short.
//!
//! ```
//! use kstore_core::probes::{Phase, startup};
//! assert!(!startup(Phase::Starting).pass);
//! assert!(startup(Phase::Running).pass);
//! ```

use std::fmt::Write as _;
use std::time::Duration;

use crate::cluster::{ClusterView, Role, role_name};

/// What the node is doing, as its probes see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The stores of its first assignment are not open yet.
    Starting,
    /// Serving.
    Running,
    /// Shutting down or draining: it answers the reads it gets, but takes no new ones.
    Leaving,
}

/// One local copy, as readiness sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalCopy {
    /// The partition.
    pub partition: u32,
    /// Active, standby or restoring.
    pub role: Role,
    /// The next input offset: every input record before it is reflected.
    pub input_offset: i64,
    /// Input records the copy does not reflect yet; `None` until the input partition's end
    /// has been looked up.
    pub lag: Option<i64>,
}

/// What one of the node's loops is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Activity {
    /// It has not started yet.
    NotStarted,
    /// It beats on every round; the last beat was this long ago.
    Beating {
        /// Since the last beat.
        since: Duration,
    },
    /// It runs without beating (a server that is either running or not).
    Running,
    /// It is inside a step known to be long, for this long.
    Busy {
        /// What it does.
        what: String,
        /// For how long.
        since: Duration,
    },
    /// It ended.
    Stopped,
}

/// One of the node's loops and what it is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopState {
    /// The loop's name, such as `ingest`.
    pub name: String,
    /// What it does.
    pub activity: Activity,
}

/// A probe's answer: whether it passes, and one line per thing it checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// Whether the probe passes.
    pub pass: bool,
    /// What was checked, for a person reading the answer.
    pub lines: Vec<String>,
}

impl ProbeReport {
    /// Returns the report as text: `ok` or `failed`, then one line per check.
    pub fn text(&self) -> String {
        let mut text = String::from(if self.pass { "ok\n" } else { "failed\n" });
        for line in &self.lines {
            let _ = writeln!(text, "{line}");
        }
        text
    }
}

/// Whether the node has started: the stores of its first assignment are open.
pub fn startup(phase: Phase) -> ProbeReport {
    let (pass, line) = match phase {
        Phase::Starting => (
            false,
            "starting: the first assignment's stores are not open yet",
        ),
        Phase::Running => (true, "started: stores open"),
        Phase::Leaving => (true, "started, now leaving"),
    };
    ProbeReport {
        pass,
        lines: vec![line.to_owned()],
    }
}

/// Whether the node answers reads within `max_lag` input records: see the module's rules.
/// `copies` are the node's own; `view` is its view of the cluster, where other nodes'
/// copies are found.
pub fn readiness(
    phase: Phase,
    copies: &[LocalCopy],
    view: &ClusterView,
    this_node: &str,
    max_lag: i64,
) -> ProbeReport {
    match phase {
        Phase::Starting => {
            return ProbeReport {
                pass: false,
                lines: vec!["starting: the first assignment's stores are not open yet".into()],
            };
        }
        Phase::Leaving => {
            return ProbeReport {
                pass: false,
                lines: vec!["leaving: shutting down or draining; reads go to the others".into()],
            };
        }
        Phase::Running => {}
    }
    let mut report = ProbeReport {
        pass: true,
        lines: Vec::new(),
    };
    if copies.is_empty() {
        report
            .lines
            .push("no local copies: every read is forwarded".into());
    }
    for copy in copies {
        let name = format!("partition {} ({})", copy.partition, role_name(copy.role));
        let Some(lag) = copy.lag else {
            report.pass = false;
            report
                .lines
                .push(format!("{name}: its input end is not known yet"));
            continue;
        };
        if lag <= max_lag {
            report.lines.push(format!("{name}: lag {lag}"));
            continue;
        }
        let freshest = view
            .holders(copy.partition)
            .into_iter()
            .filter(|h| h.routable() && h.node.node_id != this_node)
            .max_by_key(|h| h.copy.input_offset);
        match freshest {
            Some(holder) if holder.copy.input_offset - copy.input_offset > max_lag => {
                report.pass = false;
                report.lines.push(format!(
                    "{name}: lag {lag} is over the bound of {max_lag}, and {}'s copy is {} \
                     records ahead",
                    holder.node.node_id,
                    holder.copy.input_offset - copy.input_offset
                ));
            }
            _ => report.lines.push(format!(
                "{name}: lag {lag} is over the bound of {max_lag}, but no live copy elsewhere \
                 is more than {max_lag} records ahead"
            )),
        }
    }
    report
}

/// Whether the node's loops are alive: see the module's rules.
pub fn liveness(loops: &[LoopState], phase: Phase, stall_after: Duration) -> ProbeReport {
    let mut report = ProbeReport {
        pass: true,
        lines: Vec::new(),
    };
    if phase == Phase::Leaving {
        report
            .lines
            .push("leaving: loops end one by one while the node drains or stops".into());
    }
    for state in loops {
        let name = &state.name;
        let (stalled, line) = match &state.activity {
            Activity::NotStarted => (false, format!("{name}: not started yet")),
            Activity::Beating { since } if *since > stall_after => (
                true,
                format!(
                    "{name}: stalled, last round {} ms ago (the limit is {} ms)",
                    since.as_millis(),
                    stall_after.as_millis()
                ),
            ),
            Activity::Beating { since } => (
                false,
                format!("{name}: last round {} ms ago", since.as_millis()),
            ),
            Activity::Running => (false, format!("{name}: running")),
            Activity::Busy { what, since } => (
                false,
                format!("{name}: {what}, for {} ms", since.as_millis()),
            ),
            Activity::Stopped => (true, format!("{name}: stopped")),
        };
        if stalled && phase != Phase::Leaving {
            report.pass = false;
        }
        report.lines.push(line);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{CopyInfo, Liveness, Load, NodeEntry, NodeStatus};

    const BOUND: i64 = 10_000;

    fn node(id: &str, liveness: Liveness, copies: Vec<CopyInfo>) -> NodeEntry {
        NodeEntry {
            node_id: id.into(),
            incarnation: 1,
            version: 1,
            gossip_address: format!("{id}:7946"),
            grpc_address: format!("{id}:50051"),
            group_generation: 1,
            status: NodeStatus::Running,
            liveness,
            conflicting: false,
            load: Load::default(),
            copies,
            copy_errors: Default::default(),
        }
    }

    fn copy(partition: u32, role: Role, input_offset: i64, lag: i64) -> CopyInfo {
        CopyInfo {
            partition,
            role,
            changelog_offset: input_offset,
            input_offset,
            lag,
        }
    }

    fn local(partition: u32, role: Role, input_offset: i64, lag: i64) -> LocalCopy {
        LocalCopy {
            partition,
            role,
            input_offset,
            lag: Some(lag),
        }
    }

    fn view(nodes: Vec<NodeEntry>) -> ClusterView {
        ClusterView {
            cluster_id: "c".into(),
            version: 1,
            nodes,
        }
    }

    #[test]
    fn a_node_that_has_not_opened_its_stores_is_neither_started_nor_ready() {
        assert!(!startup(Phase::Starting).pass);
        let report = readiness(Phase::Starting, &[], &view(vec![]), "n1", BOUND);
        assert!(!report.pass);
        assert!(report.text().starts_with("failed\nstarting"));
    }

    #[test]
    fn a_node_without_copies_is_ready_because_it_forwards() {
        let report = readiness(Phase::Running, &[], &view(vec![]), "n1", BOUND);
        assert!(report.pass, "{}", report.text());
    }

    #[test]
    fn copies_within_the_bound_are_ready_whatever_their_role() {
        let copies = [
            local(0, Role::Active, 100, 0),
            local(1, Role::Standby, 100, BOUND),
            local(2, Role::Restoring, 100, 5),
        ];
        let report = readiness(Phase::Running, &copies, &view(vec![]), "n1", BOUND);
        assert!(report.pass, "{}", report.text());
        assert_eq!(report.lines.len(), 3);
    }

    #[test]
    fn a_copy_far_behind_a_live_copy_elsewhere_is_not_ready() {
        let others = view(vec![node(
            "n2",
            Liveness::Live,
            vec![copy(1, Role::Active, 50_000, 0)],
        )]);
        let copies = [local(1, Role::Restoring, 20_000, 30_000)];
        let report = readiness(Phase::Running, &copies, &others, "n1", BOUND);
        assert!(!report.pass);
        assert!(
            report.lines[0].contains("n2's copy is 30000 records ahead"),
            "{}",
            report.text()
        );
    }

    #[test]
    fn a_copy_behind_with_nothing_fresher_alive_stays_ready() {
        // The active is paused (suspect): its standby here is the best answer there is,
        // however far the input has moved on.
        let others = view(vec![
            node(
                "n2",
                Liveness::Suspect,
                vec![copy(1, Role::Active, 90_000, 0)],
            ),
            node(
                "n3",
                Liveness::Live,
                vec![copy(1, Role::Standby, 52_000, 48_000)],
            ),
        ]);
        let copies = [local(1, Role::Standby, 50_000, 50_000)];
        let report = readiness(Phase::Running, &copies, &others, "n1", BOUND);
        assert!(report.pass, "{}", report.text());
        assert!(report.lines[0].contains("no live copy elsewhere"));
    }

    #[test]
    fn this_nodes_own_entry_in_the_view_is_not_a_copy_elsewhere() {
        let others = view(vec![node(
            "n1",
            Liveness::Live,
            vec![copy(1, Role::Standby, 90_000, 0)],
        )]);
        let copies = [local(1, Role::Standby, 50_000, 40_000)];
        assert!(readiness(Phase::Running, &copies, &others, "n1", BOUND).pass);
    }

    #[test]
    fn a_copy_whose_input_end_is_unknown_is_not_ready_yet() {
        let copies = [LocalCopy {
            partition: 0,
            role: Role::Standby,
            input_offset: 0,
            lag: None,
        }];
        assert!(!readiness(Phase::Running, &copies, &view(vec![]), "n1", BOUND).pass);
    }

    #[test]
    fn a_leaving_node_is_not_ready_but_stays_live() {
        assert!(!readiness(Phase::Leaving, &[], &view(vec![]), "n1", BOUND).pass);
        let loops = [LoopState {
            name: "ingest".into(),
            activity: Activity::Stopped,
        }];
        let report = liveness(&loops, Phase::Leaving, Duration::from_secs(1));
        assert!(report.pass, "{}", report.text());
        assert!(startup(Phase::Leaving).pass);
    }

    #[test]
    fn a_stalled_or_stopped_loop_fails_liveness() {
        let stall = Duration::from_secs(300);
        let healthy = [
            LoopState {
                name: "ingest".into(),
                activity: Activity::Beating {
                    since: Duration::from_millis(40),
                },
            },
            LoopState {
                name: "grpc".into(),
                activity: Activity::Running,
            },
            LoopState {
                name: "updater".into(),
                activity: Activity::NotStarted,
            },
        ];
        assert!(liveness(&healthy, Phase::Running, stall).pass);

        let mut stalled = healthy.clone();
        stalled[0].activity = Activity::Beating {
            since: Duration::from_secs(301),
        };
        let report = liveness(&stalled, Phase::Running, stall);
        assert!(!report.pass);
        assert!(report.lines[0].contains("stalled"), "{}", report.text());

        let mut stopped = healthy.clone();
        stopped[1].activity = Activity::Stopped;
        assert!(!liveness(&stopped, Phase::Running, stall).pass);
    }

    #[test]
    fn a_loop_busy_restoring_is_live_however_long_it_takes() {
        let loops = [LoopState {
            name: "ingest".into(),
            activity: Activity::Busy {
                what: "opening assigned copies".into(),
                since: Duration::from_secs(3 * 3600),
            },
        }];
        let report = liveness(&loops, Phase::Running, Duration::from_secs(300));
        assert!(report.pass, "{}", report.text());
    }
}
