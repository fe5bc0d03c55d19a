//! How the command line shows the cluster view and read answers, for people (tables) and
//! for scripts (JSON).

use std::fmt::Write as _;

use kstore_client::{Answer, Attempt, ReadInfo, Sent};
use kstore_core::cluster::{ClusterView, Liveness, NodeStatus, Role};
use serde_json::{Value, json};

/// The view as tables: the nodes, then each partition's active and other copies with their
/// lag. `asked` names the node the view came from.
pub fn format_view(view: &ClusterView, asked: &str) -> String {
    let mut out = String::new();
    let _ = write_view(&mut out, view, asked);
    out
}

fn write_view(out: &mut String, view: &ClusterView, asked: &str) -> std::fmt::Result {
    writeln!(
        out,
        "cluster {} (view {} from {asked})",
        view.cluster_id, view.version
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<8} {:<17} {:<17} {:<8} {:<9} {:>6} {:>9} {:>6}",
        "node", "grpc", "gossip", "liveness", "status", "copies", "ingest/s", "reads"
    )?;
    for node in &view.nodes {
        writeln!(
            out,
            "{:<8} {:<17} {:<17} {:<8} {:<9} {:>6} {:>9} {:>6}{}",
            node.node_id,
            node.grpc_address,
            node.gossip_address,
            liveness_name(node.liveness),
            status_name(node.status),
            node.copies.len(),
            node.load.ingest_rate,
            node.load.reads_in_flight,
            if node.conflicting {
                "  CONFLICTING NODE ID"
            } else {
                ""
            }
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:>9}  {:<24} standbys and restoring copies (lag)",
        "partition", "active (input, lag)"
    )?;
    let partitions = view
        .nodes
        .iter()
        .flat_map(|n| n.copies.iter().map(|c| c.partition + 1))
        .max()
        .unwrap_or(0);
    for partition in 0..partitions {
        let holders = view.holders(partition);
        let active = holders
            .iter()
            .find(|h| h.copy.role == Role::Active)
            .map(|h| {
                format!(
                    "{}{} ({}, {})",
                    h.node.node_id,
                    liveness_mark(h.node.liveness),
                    h.copy.input_offset,
                    h.copy.lag
                )
            })
            .unwrap_or_else(|| "-".into());
        let others: Vec<String> = holders
            .iter()
            .filter(|h| h.copy.role != Role::Active)
            .map(|h| {
                format!(
                    "{}{}{} ({})",
                    h.node.node_id,
                    liveness_mark(h.node.liveness),
                    if h.copy.role == Role::Restoring {
                        " restoring"
                    } else {
                        ""
                    },
                    h.copy.lag
                )
            })
            .collect();
        writeln!(out, "{partition:>9}  {active:<24} {}", others.join(", "))?;
    }
    Ok(())
}

fn liveness_name(liveness: Liveness) -> &'static str {
    match liveness {
        Liveness::Live => "live",
        Liveness::Suspect => "SUSPECT",
        Liveness::Dead => "DEAD",
        Liveness::Unspecified => "-",
    }
}

/// A mark after a node's name when it is not live.
fn liveness_mark(liveness: Liveness) -> &'static str {
    match liveness {
        Liveness::Live => "",
        Liveness::Suspect => "?",
        Liveness::Dead | Liveness::Unspecified => "†",
    }
}

fn status_name(status: NodeStatus) -> &'static str {
    match status {
        NodeStatus::Starting => "starting",
        NodeStatus::Running => "running",
        NodeStatus::Leaving => "leaving",
        NodeStatus::Unspecified => "-",
    }
}

/// The view as JSON: every node with its liveness, load and copies.
pub fn view_json(view: &ClusterView) -> Value {
    json!({
        "cluster_id": view.cluster_id,
        "view_version": view.version,
        "nodes": view.nodes.iter().map(|n| json!({
            "node_id": n.node_id,
            "grpc_address": n.grpc_address,
            "gossip_address": n.gossip_address,
            "liveness": liveness_name(n.liveness),
            "status": status_name(n.status),
            "incarnation": n.incarnation,
            "version": n.version,
            "conflicting": n.conflicting,
            "ingest_rate": n.load.ingest_rate,
            "reads_in_flight": n.load.reads_in_flight,
            "copies": n.copies.iter().map(|c| json!({
                "partition": c.partition,
                "role": role_name(c.role),
                "changelog_offset": c.changelog_offset,
                "input_offset": c.input_offset,
                "lag": c.lag,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

pub use kstore_core::cluster::role_name;

/// How a read was routed, for `get --explain`: the partition, the plan, every attempt, and
/// who answered.
pub fn format_route<T>(answer: &Answer<T>) -> String {
    let mut out = String::new();
    let route = &answer.route;
    let _ = writeln!(out, "partition {}", route.partition);
    let _ = writeln!(out, "plan      {}", route.plan.join(", "));
    for attempt in &route.attempts {
        let _ = writeln!(out, "tried     {}", describe_attempt(attempt));
    }
    let _ = writeln!(
        out,
        "answered  by {} ({}, input offset {}, lag {})",
        answer.read.node_id,
        role_name(answer.read.role),
        answer.read.input_offset,
        answer.read.lag
    );
    out
}

fn describe_attempt(attempt: &Attempt) -> String {
    let what = match &attempt.error {
        None => "answered".to_owned(),
        Some(error) => error.to_string(),
    };
    let sent = match attempt.sent {
        Sent::First => String::new(),
        sent => format!(" ({sent})"),
    };
    format!(
        "{} at {}{sent} after {:.1} ms: {what}",
        attempt.node_id,
        attempt.address,
        attempt.elapsed.as_secs_f64() * 1000.0
    )
}

/// How fresh a read is, and who answered, as JSON.
pub fn read_json(read: &ReadInfo) -> Value {
    json!({
        "partition": read.partition,
        "node_id": read.node_id,
        "role": role_name(read.role),
        "changelog_offset": read.changelog_offset,
        "input_offset": read.input_offset,
        "lag": read.lag,
    })
}

/// A read's answer as JSON; `value` is the value already turned into JSON.
pub fn answer_json<T>(key: &str, answer: &Answer<T>, value: Value) -> Value {
    json!({
        "key": key,
        "found": !value.is_null(),
        "value": value,
        "partition": answer.read.partition,
        "node_id": answer.read.node_id,
        "role": role_name(answer.read.role),
        "changelog_offset": answer.read.changelog_offset,
        "input_offset": answer.read.input_offset,
        "lag": answer.read.lag,
        "route": {
            "plan": answer.route.plan,
            "attempts": answer.route.attempts.iter().map(describe_attempt).collect::<Vec<_>>(),
        },
    })
}
