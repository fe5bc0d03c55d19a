//! The smart client against a real 3-node cluster (12 partitions, one standby): one hop in
//! steady state with no server-side forwarding, fallback to the standby when an active is
//! killed, hedging past a paused node, and a stale view corrected on the fly.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{Node, Scenario, expected_features, run_async, wait_for_agreement};
use kstore_cli::generator::{GeneratorConfig, OrderGenerator};
use kstore_client::{Client, Hedge, ReadError, ReadPolicy, Role};
use kstore_core::orders::OrderEvent;
use kstore_proto::v1::CustomerFeatures;
use kstore_testkit::process::http_get;

const PARTITIONS: u32 = 12;
const CUSTOMERS: u32 = 300;

/// A settled cluster with events ingested.
struct Settled {
    scenario: Scenario,
    nodes: Vec<Node>,
    metrics: Vec<String>,
    events: Vec<OrderEvent>,
}

async fn settled(name: &str) -> Result<Settled> {
    let mut scenario = Scenario::new(name, PARTITIONS).await?;
    scenario.extra.push("metrics-address=127.0.0.1:0".into());
    let generator = GeneratorConfig {
        customers: CUSTOMERS,
        seed: 13,
        ..GeneratorConfig::default()
    };
    let events: Vec<OrderEvent> = OrderGenerator::new(generator.clone()).take(3_000).collect();
    scenario.produce(&generator, 3_000)?;
    let mut nodes = Vec::new();
    let mut metrics = Vec::new();
    for id in ["node-1", "node-2", "node-3"] {
        let mut node = Node::start(&scenario, id, "only").await?;
        metrics.push(scenario.metrics_address(&mut node.process)?);
        nodes.push(node);
    }
    scenario.wait_committed(Duration::from_secs(120), || Ok(()))?;
    {
        let mut refs: Vec<&mut Node> = nodes.iter_mut().collect();
        wait_for_agreement(
            &mut refs,
            &["node-1", "node-2", "node-3"],
            Duration::from_secs(120),
        )
        .await?;
    }
    Ok(Settled {
        scenario,
        nodes,
        metrics,
        events,
    })
}

fn customers() -> Vec<String> {
    (0..CUSTOMERS).map(OrderGenerator::customer_id).collect()
}

fn forwarded_reads(metrics: &str) -> Result<f64> {
    let text = http_get(metrics, "/metrics")?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("kstore_forwarded_reads_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

#[test]
fn reads_take_one_hop_then_fall_back_past_a_paused_and_a_killed_node() -> Result<()> {
    run_async(async {
        let Settled {
            scenario,
            mut nodes,
            metrics,
            events,
        } = settled("client-fallback").await?;
        let expected = expected_features(&events);
        let seed = nodes[0]
            .process
            .logged_address("serving gRPC", Duration::from_secs(5))?;
        let timeout = Duration::from_secs(2);
        let client = Client::builder()
            .seeds([seed])
            .cluster_id(scenario.app.clone())
            .read_policy(ReadPolicy::PreferActive { max_lag: 1_000_000 })
            .hedge(Hedge::After(Duration::from_millis(50)))
            .hedge_budget(1.0)
            .request_timeout(timeout)
            .build()
            .await?;

        // Steady state: every read answered by the first node asked, no node forwards.
        for customer in customers() {
            let answer = client
                .get_as::<CustomerFeatures>(customer.as_bytes())
                .await?;
            ensure!(
                answer.value.as_ref() == expected.get(&customer),
                "{customer}"
            );
        }
        let stats = client.stats();
        ensure!(
            stats.first_hop_answers == stats.reads && stats.fallback_answers == 0,
            "{stats:?}"
        );
        for address in &metrics {
            ensure!(
                forwarded_reads(address)? == 0.0,
                "{address} forwarded reads"
            );
        }
        // Bad keys fail locally, before any network call.
        let reads = client.stats().reads;
        ensure!(matches!(client.get(b"").await, Err(ReadError::EmptyKey)));
        ensure!(matches!(
            client.get(&vec![b'k'; 70_000]).await,
            Err(ReadError::KeyTooLarge { len: 70_000, .. })
        ));
        ensure!(client.stats().reads == reads, "bad keys were sent");

        // A paused node: hedges answer, no read waits for the request timeout.
        let paused = nodes[2].process.pid();
        std::process::Command::new("kill")
            .args(["-STOP", &paused.to_string()])
            .status()?;
        let mut slowest = Duration::ZERO;
        let outcome: Result<()> = async {
            for customer in customers() {
                let started = Instant::now();
                let answer = client
                    .get_as::<CustomerFeatures>(customer.as_bytes())
                    .await?;
                slowest = slowest.max(started.elapsed());
                ensure!(
                    answer.value.as_ref() == expected.get(&customer),
                    "{customer}"
                );
            }
            Ok(())
        }
        .await;
        std::process::Command::new("kill")
            .args(["-CONT", &paused.to_string()])
            .status()?;
        outcome?;
        ensure!(
            slowest < timeout / 2,
            "a read took {slowest:?} with node-3 paused"
        );
        let stats = client.stats();
        ensure!(
            stats.hedges_won > 0 || stats.fallback_answers > 0,
            "{stats:?}"
        );

        // kill -9 of a node: its partitions' keys answer from their standbys.
        nodes[1].process.kill9()?;
        for customer in customers() {
            match client.get_as::<CustomerFeatures>(customer.as_bytes()).await {
                Ok(answer) => {
                    ensure!(
                        answer.read.node_id != "node-2",
                        "{customer} from the dead node"
                    );
                    ensure!(
                        answer.value.as_ref() == expected.get(&customer),
                        "{customer}"
                    );
                }
                Err(error) => bail!("{customer}: {error}"),
            }
        }
        for node in [0, 2] {
            let status = nodes[node].process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "exit: {status}");
        }
        Ok(())
    })
}

#[test]
fn a_restarted_node_on_another_port_is_found_again_without_a_failed_read() -> Result<()> {
    run_async(async {
        let Settled {
            scenario,
            mut nodes,
            events,
            ..
        } = settled("client-stale").await?;
        let expected = expected_features(&events);
        let seeds: Vec<String> = nodes
            .iter_mut()
            .map(|n| {
                n.process
                    .logged_address("serving gRPC", Duration::from_secs(5))
            })
            .collect::<Result<_>>()?;
        let client = Client::builder()
            .seeds(seeds)
            .read_policy(ReadPolicy::PreferActive { max_lag: 1_000_000 })
            .hedge(Hedge::After(Duration::from_millis(50)))
            .request_timeout(Duration::from_secs(2))
            .build()
            .await?;
        let before = client.view();
        let old = before
            .nodes
            .iter()
            .find(|n| n.node_id == "node-2")
            .context("node-2 in the view")?
            .grpc_address
            .clone();

        // node-2 restarts on another port; the client reads throughout.
        let status = nodes[1].process.terminate(Duration::from_secs(60))?;
        ensure!(status.success());
        let restarted = Node::start(&scenario, "node-2", "second").await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            for customer in customers() {
                let answer = client
                    .get_as::<CustomerFeatures>(customer.as_bytes())
                    .await
                    .map_err(|error: ReadError| anyhow::anyhow!("{customer}: {error}"))?;
                ensure!(
                    answer
                        .value
                        .is_none_or(|v| v.orders_total <= expected[&customer].orders_total),
                    "{customer}"
                );
            }
            let view = client.view();
            let now = view
                .nodes
                .iter()
                .find(|n| n.node_id == "node-2" && n.grpc_address != old);
            if now.is_some_and(|n| n.copies.iter().any(|c| c.role == Role::Active)) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the client never saw node-2's new address"
            );
        }
        nodes.push(restarted);
        for (index, node) in nodes.iter_mut().enumerate() {
            if index == 1 {
                continue;
            }
            let status = node.process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "exit: {status}");
        }
        Ok(())
    })
}

#[test]
fn bad_keys_and_unreachable_seeds_fail_before_any_read() -> Result<()> {
    run_async(async {
        // Port 1 on loopback: nothing listens there, connections are refused.
        let free = "127.0.0.1:1".to_owned();
        let error = Client::builder()
            .seeds([free.clone()])
            .connect_timeout(Duration::from_millis(200))
            .build()
            .await
            .unwrap_err();
        ensure!(error.to_string().contains(&free), "{error}");
        ensure!(Client::builder().build().await.is_err(), "no seeds");
        Ok(())
    })
}
