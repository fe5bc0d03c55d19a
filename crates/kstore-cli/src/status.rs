//! `kstore status`: every live node's copies as its Admin `PartitionStatus` states them,
//! with what the cluster view does not carry (size on disk, keys, module history, a held
//! copy's whole reason).

use anyhow::Result;
use kstore_proto::v1::{Liveness, PartitionStatusRequest, StoreStatus};

use crate::backup::{AdminTarget, format_bytes};
use crate::view::role_name;

/// One node's copies, or why it did not answer.
pub type NodeStatus = (String, std::result::Result<Vec<StoreStatus>, String>);

/// Asks every live node for its copies of `store` (every store if empty) and `partitions`
/// (all if empty), in the view's order of nodes, each node's copies by store and partition;
/// then each suspect node, as not answering.
pub async fn collect(
    target: &AdminTarget,
    store: &str,
    partitions: &[u32],
) -> Result<Vec<NodeStatus>> {
    let (view, nodes) = target.live_nodes().await?;
    let store_asked = store.to_owned();
    let answers = target
        .ask_each(nodes, move |target, mut admin| {
            let store = store_asked.clone();
            async move {
                let request = target.request(PartitionStatusRequest { store })?;
                Ok(admin.partition_status(request).await?.into_inner())
            }
        })
        .await?;
    // A suspect node (it stopped gossiping, and may hold copies) is not asked: it shows as
    // not answering. Dead nodes are gone.
    let not_live = view
        .nodes
        .iter()
        .filter(|n| n.liveness() == Liveness::Suspect)
        .map(|n| (n.node_id.clone(), Err("not asked: suspect".to_owned())));
    Ok(answers
        .into_iter()
        .map(|(node_id, answer)| {
            let copies = answer.map(|answer| {
                let mut copies: Vec<StoreStatus> = answer
                    .stores
                    .into_iter()
                    .filter(|s| {
                        partitions.is_empty()
                            || s.copy
                                .as_ref()
                                .is_some_and(|c| partitions.contains(&c.partition))
                    })
                    .collect();
                copies.sort_by_key(|s| (s.store.clone(), s.copy.as_ref().map(|c| c.partition)));
                copies
            });
            (node_id, copies)
        })
        .chain(not_live)
        .collect())
}

/// The header of [`format_copy`]'s rows.
pub fn status_header() -> String {
    format!(
        "{:<10} {:<12} {:>9} {:<9} {:>12} {:>10} {:>12} {:>10} {:>10}  {:<12}  {}",
        "node",
        "store",
        "partition",
        "role",
        "input",
        "lag",
        "changelog",
        "keys",
        "size",
        "module",
        "error"
    )
}

/// One copy as a table row: its module is the first 12 hex digits of the current one's
/// SHA-256 (`-` for a built-in processor).
pub fn format_copy(node_id: &str, status: &StoreStatus) -> String {
    let copy = status.copy.clone().unwrap_or_default();
    let module = status
        .modules
        .last()
        .map_or("-".to_owned(), |m| m.sha256.chars().take(12).collect());
    format!(
        "{:<10} {:<12} {:>9} {:<9} {:>12} {:>10} {:>12} {:>10} {:>10}  {:<12}  {}",
        node_id,
        status.store,
        copy.partition,
        role_name(copy.role()),
        copy.input_offset,
        copy.lag,
        copy.changelog_offset,
        status.estimated_keys,
        format_bytes(status.size_on_disk_bytes),
        module,
        copy.error
    )
}

#[cfg(test)]
mod tests {
    use kstore_proto::v1::{ModuleVersion, PartitionCopy, Role};

    use super::*;

    #[test]
    fn a_copy_prints_as_one_row_under_its_header() {
        let status = StoreStatus {
            store: "tally".into(),
            copy: Some(PartitionCopy {
                partition: 2,
                role: Role::Active as i32,
                input_offset: 914,
                lag: 7,
                changelog_offset: 880,
                error: "held: an earlier version".into(),
                ..PartitionCopy::default()
            }),
            size_on_disk_bytes: 3 * 1024 * 1024,
            estimated_keys: 23,
            modules: vec![ModuleVersion {
                from_input_offset: 0,
                sha256: "8b1e62c582b6aa".into(),
            }],
        };
        let row = format_copy("node-1", &status);
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            [
                "node-1",
                "tally",
                "2",
                "active",
                "914",
                "7",
                "880",
                "23",
                "3.0",
                "MiB",
                "8b1e62c582b6",
                "held:",
                "an",
                "earlier",
                "version"
            ]
        );
        assert_eq!(
            status_header().split_whitespace().count(),
            11,
            "one header per column"
        );
    }
}
