//! The probes on the metrics port against real nodes: started once the stores are open (a
//! member assigned no partition too), ready within the staleness bound while a paused
//! active's standby serves its partition far behind, live throughout, and not ready but
//! still live while a node drains.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{Layout, Node, Scenario, run_async};
use kstore_cli::generator::GeneratorConfig;
use kstore_testkit::process::wait_until;

const MAX_LAG: i64 = 100;

/// Sends `GET path` to a metrics port and returns the status code and body.
fn probe(address: &str, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

fn signal(pid: u32, name: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
}

#[test]
fn probes_follow_nodes_from_start_through_a_paused_active_to_a_drain() -> Result<()> {
    run_async(async {
        // Three nodes for two partitions: one member is assigned nothing.
        let mut scenario = Scenario::new("probes", 2).await?;
        scenario.extra.extend([
            "metrics-address=127.0.0.1:0".into(),
            format!("probes.max-lag={MAX_LAG}"),
            "drain-on-shutdown=true".into(),
            "drain-timeout-ms=20000".into(),
            // The paused active keeps its partitions meanwhile (a busy machine may take a
            // while to show the standby's lag).
            "kafka.session.timeout.ms=30000".into(),
        ]);
        let generator = GeneratorConfig {
            customers: 200,
            seed: 7,
            ..GeneratorConfig::default()
        };
        scenario.produce(&generator, 1_000)?;
        let ids = ["node-1", "node-2", "node-3"];
        let mut nodes = Vec::new();
        let mut metrics = Vec::new();
        for id in ids {
            let mut node = Node::start(&scenario, id, "only").await?;
            metrics.push(scenario.metrics_address(&mut node.process)?);
            nodes.push(node);
        }

        // Started: every node, the one without a partition of its own included.
        for (node, address) in nodes.iter().zip(&metrics) {
            wait_until(Duration::from_secs(120), "/startupz to pass", || {
                Ok(probe(address, "/startupz")?.0 == 200)
            })
            .with_context(|| format!("{}: {}", node.id, node.process.tail()))?;
        }
        scenario.wait_committed(Duration::from_secs(120), || Ok(()))?;
        // Every partition with its active and standby, as every node sees it (one node
        // holds fewer copies than the others: there are fewer copies than nodes).
        let deadline = Instant::now() + Duration::from_secs(120);
        let layout = loop {
            let mut layouts = Vec::new();
            for node in nodes.iter_mut() {
                layouts.push(Layout::of(&node.metadata().await?));
            }
            if layouts[0].complete(&ids, 1) && layouts.iter().all(|l| *l == layouts[0]) {
                break layouts.swap_remove(0);
            }
            if Instant::now() > deadline {
                bail!("the nodes did not agree on a complete layout: {layouts:#?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        for address in &metrics {
            wait_until(Duration::from_secs(60), "/readyz to pass", || {
                Ok(probe(address, "/readyz")?.0 == 200)
            })?;
            ensure!(
                probe(address, "/no-such-page")?.0 == 404,
                "an unknown path is a 404"
            );
            let (status, body) = probe(address, "/livez")?;
            ensure!(status == 200, "/livez: {body}");
            for part in [
                "ingest:",
                "state updater:",
                "gossip:",
                "grpc server: running",
            ] {
                ensure!(body.contains(part), "/livez lacks {part:?}: {body}");
            }
        }

        // Pause partition 0's active: its standby answers for it, further and further
        // behind the input, and stays ready, since no live copy is fresher.
        let active = layout.actives[&0][0].clone();
        let standby = layout.standbys[&0]
            .iter()
            .next()
            .context("partition 0 has no standby")?
            .clone();
        let index = |id: &str| ids.iter().position(|i| *i == id).unwrap();
        let paused = nodes[index(&active)].process.pid();
        signal(paused, "STOP")?;
        let paused_at = Instant::now();
        let outcome = (|| -> Result<String> {
            scenario.produce_from(&generator, 1_000, 600)?;
            let address = &metrics[index(&standby)];
            let mut last = String::new();
            let seen = wait_until(
                Duration::from_secs(20),
                "the standby to fall behind",
                || {
                    let (status, body) = probe(address, "/readyz")?;
                    ensure!(status == 200, "the standby's node went unready: {body}");
                    last = body;
                    Ok(last.lines().any(|l| {
                        l.starts_with("partition 0 (standby)")
                            && l.contains("no live copy elsewhere")
                    }))
                },
            );
            seen.with_context(|| format!("last /readyz of {standby}: {last}"))?;
            let (status, body) = probe(address, "/livez")?;
            ensure!(status == 200, "/livez: {body}");
            Ok(last)
        })();
        signal(paused, "CONT")?;
        let body = outcome?;
        ensure!(
            paused_at.elapsed() < Duration::from_secs(28),
            "the check ran past the session timeout: partition 0 may have moved ({body})"
        );
        for address in &metrics {
            wait_until(Duration::from_secs(60), "/readyz to pass again", || {
                Ok(probe(address, "/readyz")?.0 == 200)
            })?;
        }

        // Drain (SIGTERM with drain-on-shutdown): not ready, still live, until it exits.
        let drained = &mut nodes[2];
        signal(drained.process.pid(), "TERM")?;
        let address = &metrics[2];
        let mut leaving_seen = false;
        let deadline = Instant::now() + Duration::from_secs(60);
        while drained.process.try_exit()?.is_none() {
            if Instant::now() > deadline {
                bail!("node-3 did not stop: {}", drained.process.tail());
            }
            if let (Ok((ready, ready_body)), Ok((live, live_body))) =
                (probe(address, "/readyz"), probe(address, "/livez"))
                && ready_body.contains("leaving")
            {
                ensure!(ready == 503, "/readyz while leaving: {ready} {ready_body}");
                ensure!(live == 200, "/livez while leaving: {live} {live_body}");
                leaving_seen = true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        ensure!(
            leaving_seen,
            "never saw /readyz say leaving: {}",
            drained.process.tail()
        );
        Ok(())
    })
}
