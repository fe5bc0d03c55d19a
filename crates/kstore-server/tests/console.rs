//! The web console against a real 3-node cluster: `/console/cluster.json` shows every node
//! and every partition's copies; a key lookup through any node shows the key's partition,
//! its holders, who answered and the exact value; and the page itself, loaded in headless
//! Chromium (Debian's `chromium`, which `cargo xtask setup` installs), shows the map, then
//! shows the change when a node is killed.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{Node, Scenario, expected_features, run_async, wait_for_agreement};
use kstore_cli::generator::{GeneratorConfig, OrderGenerator};
use kstore_core::orders::OrderEvent;
use kstore_core::partitioner::partition_for_key;
use kstore_testkit::process::http_get;
use serde_json::Value;

const PARTITIONS: u32 = 12;
const CHROMIUM: &str = "/usr/bin/chromium";

/// The body of a `GET`, as JSON.
fn get_json(address: &str, path: &str) -> Result<Value> {
    let response = http_get(address, path)?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .context("no body")?;
    Ok(serde_json::from_str(body)?)
}

/// The console page's DOM after Chromium has run its script for a few seconds of virtual
/// time (its first polls of the cluster included).
fn rendered(address: &str, profile: &Path) -> Result<String> {
    if !Path::new(CHROMIUM).is_file() {
        bail!("{CHROMIUM} is missing: `cargo xtask setup` installs Debian's chromium package");
    }
    let output = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=4000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("http://{address}/console"))
        .output()
        .context("running chromium")?;
    ensure!(
        output.status.success(),
        "chromium: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// The node ids the view in `cluster` shows with `liveness`, and how many active copies
/// each live node holds.
fn nodes_with(cluster: &Value, liveness: &str) -> Vec<String> {
    cluster["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|node| node["liveness"] == liveness)
        .filter_map(|node| node["node_id"].as_str().map(str::to_owned))
        .collect()
}

/// Each partition's active copies on live nodes, as `cluster` shows them.
fn live_actives(cluster: &Value) -> Vec<(u64, String)> {
    let mut actives = Vec::new();
    for node in cluster["nodes"].as_array().into_iter().flatten() {
        if node["liveness"] != "live" {
            continue;
        }
        for copy in node["copies"].as_array().into_iter().flatten() {
            if copy["role"] == "active" {
                actives.push((
                    copy["partition"].as_u64().unwrap_or(u64::MAX),
                    node["node_id"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
    }
    actives.sort();
    actives
}

#[test]
fn the_console_shows_the_cluster_looks_up_keys_and_follows_a_killed_node() -> Result<()> {
    run_async(async {
        let mut scenario = Scenario::new("console", PARTITIONS).await?;
        scenario.extra.push("metrics-address=127.0.0.1:0".into());
        let generator = GeneratorConfig {
            customers: 200,
            seed: 23,
            ..GeneratorConfig::default()
        };
        let events: Vec<OrderEvent> = OrderGenerator::new(generator.clone()).take(2_000).collect();
        scenario.produce(&generator, 2_000)?;
        let ids = ["node-1", "node-2", "node-3"];
        let mut nodes = Vec::new();
        let mut consoles = Vec::new();
        for id in ids {
            let mut node = Node::start(&scenario, id, "only").await?;
            consoles.push(scenario.metrics_address(&mut node.process)?);
            nodes.push(node);
        }
        scenario.wait_committed(Duration::from_secs(120), || Ok(()))?;
        {
            let mut refs: Vec<&mut Node> = nodes.iter_mut().collect();
            wait_for_agreement(&mut refs, &ids, Duration::from_secs(120)).await?;
        }

        // The map: three live nodes, one live active per partition.
        let cluster = get_json(&consoles[0], "/console/cluster.json")?;
        ensure!(cluster["partitions"] == PARTITIONS, "{cluster}");
        ensure!(nodes_with(&cluster, "live").len() == 3, "{cluster}");
        let actives = live_actives(&cluster);
        ensure!(
            actives.iter().map(|(p, _)| *p).eq(0..u64::from(PARTITIONS)),
            "actives: {actives:?}"
        );

        // A lookup through a node shows the partition, the holders, who answered, and the
        // value, exact against the events sent (forwarded when the node holds no copy).
        let expected = expected_features(&events);
        for customer in ["customer-000007", "customer-000042", "customer-000199"] {
            let lookup = get_json(&consoles[1], &format!("/console/lookup?key={customer}"))?;
            let partition = partition_for_key(customer.as_bytes(), PARTITIONS);
            ensure!(lookup["partition"] == partition, "{lookup}");
            ensure!(
                lookup["holders"].as_array().is_some_and(|h| h.len() == 2),
                "{lookup}"
            );
            let answer = &lookup["answer"];
            ensure!(answer["found"] == true, "{lookup}");
            let features = expected.get(customer).context("no events")?;
            ensure!(
                answer["value"] == serde_json::to_value(features)?,
                "{customer}: {} (want {})",
                answer["value"],
                serde_json::to_value(features)?
            );
            let holders: Vec<&str> = lookup["holders"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|h| h["node_id"].as_str())
                .collect();
            ensure!(
                holders.contains(&answer["node_id"].as_str().unwrap_or_default()),
                "answered by a node that holds no copy: {lookup}"
            );
        }

        // The page, rendered: every node live, an active cell per partition.
        let profile = tempfile::tempdir()?;
        let page = rendered(&consoles[0], profile.path())?;
        for id in ids {
            ensure!(
                page.contains(&format!(r#"data-node="{id}" data-liveness="live""#)),
                "{id} not shown live:\n{page}"
            );
        }
        let active_cells = page.matches(r#"data-role="active""#).count();
        ensure!(
            active_cells == PARTITIONS as usize,
            "{active_cells} active cells"
        );

        // kill -9 of node-3: the view calls it dead and moves its partitions; the page shows
        // both.
        nodes[2].process.kill9()?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let cluster = get_json(&consoles[0], "/console/cluster.json")?;
            let actives = live_actives(&cluster);
            let moved = actives.iter().map(|(p, _)| *p).eq(0..u64::from(PARTITIONS))
                && actives.iter().all(|(_, node)| node != "node-3");
            if nodes_with(&cluster, "dead") == ["node-3"] && moved {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the view did not move on: {cluster}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let page = rendered(&consoles[0], profile.path())?;
        ensure!(
            page.contains(r#"data-node="node-3" data-liveness="dead""#),
            "node-3 not shown dead:\n{page}"
        );
        let on_dead = page
            .matches(r#"data-node="node-3" data-role="active""#)
            .count();
        let live_active_cells = page.matches(r#"data-role="active""#).count() - on_dead;
        ensure!(
            live_active_cells == PARTITIONS as usize,
            "{live_active_cells} active cells on live nodes after the kill"
        );

        for node in [0, 1] {
            let status = nodes[node].process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "exit: {status}");
        }
        Ok(())
    })
}
