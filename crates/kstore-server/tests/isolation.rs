//! One partition's trouble stays in that partition: a copy that fails is paused and retried
//! while the node's other partitions keep ingesting and serving, and once it recovers its
//! records are folded exactly once.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kstore_cli::generator::{GeneratorConfig, OrderGenerator};
use kstore_core::partitioner::partition_for_key;
use kstore_proto::v1::query_client::QueryClient;
use kstore_proto::v1::{GetRequest, MetadataRequest, Role, get_response};
use kstore_server::processor::{InputRecord, Outcome, ProcessError, Processor, Update};
use kstore_server::store::{PartitionStore, SharedMemory};
use kstore_testkit::process::wait_until;

use common::{Scenario, run_async};

/// Counts records per key (a little-endian u64), and cannot run at all for the records of
/// one partition while `blocked` is set: as a processor whose model or module failed to
/// load would.
struct CountUnlessBlocked {
    partition: i32,
    blocked: Arc<AtomicBool>,
}

impl Processor for CountUnlessBlocked {
    fn process(
        &mut self,
        record: &InputRecord<'_>,
        current: Option<&[u8]>,
    ) -> Result<Outcome, ProcessError> {
        if record.partition == self.partition && self.blocked.load(Ordering::Relaxed) {
            return Err(ProcessError::Unavailable(
                "its scoring model is not loaded".into(),
            ));
        }
        let count = match current {
            Some(bytes) => u64::from_le_bytes(
                bytes
                    .try_into()
                    .map_err(|_| ProcessError::Failed("a stored count is not 8 bytes".into()))?,
            ),
            None => 0,
        };
        Ok(Outcome {
            update: Update::Put((count + 1).to_le_bytes().to_vec()),
            outputs: Vec::new(),
        })
    }
}

/// A port nobody listens on right now.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[test]
fn a_partition_whose_processor_cannot_run_fails_alone_and_recovers_exactly_once() -> Result<()> {
    run_async(async {
        let partitions = 4;
        let scenario = Scenario::new("isolation-processor", partitions).await?;
        let count = 8_000u64;
        let generator = GeneratorConfig {
            customers: 200,
            seed: 21,
            ..GeneratorConfig::default()
        };
        scenario.produce(&generator, count)?;
        let events: Vec<_> = OrderGenerator::new(generator)
            .take(count as usize)
            .collect();
        let mut expected: BTreeMap<String, u64> = BTreeMap::new();
        for event in &events {
            *expected.entry(event.customer_id.clone()).or_default() += 1;
        }
        let failing = 2i32;
        let of = |key: &str| partition_for_key(key.as_bytes(), partitions) as i32;

        let mut config = scenario.config("node-1")?;
        let port = free_port()?;
        config.grpc_address = format!("127.0.0.1:{port}");
        config.copy_retry_initial_ms = 200;
        config.copy_retry_max_ms = 1_000;
        let blocked = Arc::new(AtomicBool::new(true));
        let processor = CountUnlessBlocked {
            partition: failing,
            blocked: blocked.clone(),
        };
        let shutdown = Arc::new(AtomicBool::new(false));
        let node = {
            let stop = shutdown.clone();
            std::thread::spawn(move || kstore_server::node::run(config, Box::new(processor), stop))
        };
        let stop_node = scopeguard(shutdown.clone());

        // Every other partition commits all of its input; the failing one nothing, and it
        // shows as failed, with why.
        let end = scenario.kafka.end_offsets(&scenario.input, partitions)?;
        wait_until(
            Duration::from_secs(120),
            "the other partitions to commit their input",
            || {
                ensure!(!node.is_finished(), "the node stopped");
                let committed =
                    scenario
                        .kafka
                        .committed_offsets(&scenario.app, &scenario.input, partitions)?;
                Ok((0..partitions as usize)
                    .filter(|&p| p != failing as usize)
                    .all(|p| committed[p] >= end[p]))
            },
        )?;
        let mut client = QueryClient::connect(format!("http://127.0.0.1:{port}")).await?;
        let mut seen_failed = None;
        for _ in 0..100 {
            let metadata = client.metadata(MetadataRequest {}).await?.into_inner();
            let node = metadata.nodes.first().context("no node in Metadata")?;
            let copy = node
                .copies
                .iter()
                .find(|c| c.partition == failing as u32)
                .context("the failing partition's copy is not in Metadata")?;
            for other in node.copies.iter().filter(|c| c.partition != failing as u32) {
                ensure!(
                    other.role() == Role::Active,
                    "partition {} is {:?} while another partition fails",
                    other.partition,
                    other.role()
                );
            }
            if copy.role() == Role::Failed {
                seen_failed = Some(copy.error.clone());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let error = seen_failed.context("the failing partition never showed as failed")?;
        ensure!(
            error.contains("the processor cannot run") && error.contains("model is not loaded"),
            "the failed copy's error: {error:?}"
        );
        let committed =
            scenario
                .kafka
                .committed_offsets(&scenario.app, &scenario.input, partitions)?;
        ensure!(
            committed[failing as usize] <= 0,
            "the failing partition committed input up to {}",
            committed[failing as usize]
        );
        // The other partitions answer with their exact final counts meanwhile.
        for (customer, want) in expected.iter().filter(|(c, _)| of(c) != failing).take(20) {
            let answer = client
                .get(GetRequest {
                    store: "features".into(),
                    key: customer.as_bytes().to_vec(),
                    partition: None,
                    options: None,
                })
                .await?
                .into_inner();
            let Some(get_response::Value::Raw(bytes)) = answer.value else {
                anyhow::bail!("{customer}: no raw value in {answer:?}");
            };
            let got = u64::from_le_bytes(bytes.as_slice().try_into()?);
            ensure!(got == *want, "{customer}: {got} counted, {want} sent");
        }

        // The processor can run again: the partition recovers by itself.
        blocked.store(false, Ordering::Relaxed);
        scenario.wait_committed(Duration::from_secs(120), || {
            ensure!(!node.is_finished(), "the node stopped");
            Ok(())
        })?;
        drop(stop_node);
        node.join()
            .map_err(|_| anyhow::anyhow!("the node panicked"))??;

        // Every record of every partition was folded exactly once; none was dead-lettered.
        let config = scenario.config("node-1")?;
        let memory = SharedMemory::new(&config.memory);
        let mut stored = BTreeMap::new();
        for partition in 0..partitions as i32 {
            let store = PartitionStore::open(&config.store_dir(partition), &memory)?;
            for (key, value) in store.scan()? {
                stored.insert(
                    String::from_utf8(key)?,
                    u64::from_le_bytes(value.as_slice().try_into()?),
                );
            }
        }
        ensure!(
            stored == expected,
            "per-key counts differ from the events sent"
        );
        let dead_letters = scenario
            .kafka
            .partition_count(&format!("{}-dlq", scenario.app))?
            .map(|dlq_partitions| {
                scenario
                    .kafka
                    .read_all(&format!("{}-dlq", scenario.app), dlq_partitions)
            })
            .transpose()?
            .map_or(0, |letters| letters.len());
        ensure!(
            dead_letters == 0,
            "{dead_letters} records were dead-lettered"
        );
        Ok(())
    })
}

/// Sets `shutdown` when dropped, so that a failing test still stops its in-process node.
fn scopeguard(shutdown: Arc<AtomicBool>) -> impl Drop {
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    Stop(shutdown)
}

/// Fills partition `partition`'s store in `config`'s state directory with about `bytes` of
/// incompressible filler under keys `filler-…` (outside the events' key space), so that a
/// snapshot of the copy is that large.
fn fill_copy(config: &kstore_server::config::NodeConfig, partition: i32, bytes: u64) -> Result<()> {
    const VALUE_BYTES: usize = 4096;
    let dir = config.store_dir(partition);
    std::fs::create_dir_all(&dir)?;
    let store = PartitionStore::open(&dir, &SharedMemory::new(&config.memory))?;
    // xorshift64*: fast, and incompressible enough for LZ4.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let records = bytes / VALUE_BYTES as u64;
    let mut written = 0;
    while written < records {
        let mut batch = BTreeMap::new();
        for i in written..(written + 256).min(records) {
            let value: Vec<u8> = (0..VALUE_BYTES / 8)
                .flat_map(|_| next().to_le_bytes())
                .collect();
            batch.insert(format!("filler-{i:010}").into_bytes(), Some(value));
        }
        written += batch.len() as u64;
        store.apply(&batch, kstore_server::store::Position::default())?;
    }
    store.flush()?;
    Ok(())
}

/// The lines of a node's log that name `partition` (as `partition=N`), at most the last 60.
fn lines_about_partition(log: &str, partition: i32) -> String {
    let tag = format!("partition={partition}");
    let lines: Vec<&str> = log
        .lines()
        .filter(|line| {
            line.split(|c: char| c.is_whitespace() || c == ',' || c == '{' || c == '}')
                .any(|word| word == tag)
        })
        .collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// A copy's role and input offset per partition, as node `node_id` publishes them.
fn copies_of(
    metadata: &kstore_proto::v1::MetadataResponse,
    node_id: &str,
) -> BTreeMap<u32, (Role, i64)> {
    metadata
        .nodes
        .iter()
        .filter(|n| n.node_id == node_id)
        .flat_map(|n| n.copies.iter())
        .map(|c| (c.partition, (c.role(), c.input_offset)))
        .collect()
}

#[test]
fn a_large_copy_bootstraps_from_its_peer_while_the_nodes_other_partitions_ingest() -> Result<()> {
    run_async(async {
        let partitions = 4;
        let mut scenario = Scenario::new("isolation-bootstrap", partitions).await?;
        // A commit that waited for a bootstrap would exceed these.
        scenario
            .extra
            .push("kafka.max.poll.interval.ms=10000".into());
        scenario
            .extra
            .push("kafka.transaction.timeout.ms=10000".into());
        let filler_mib: u64 = std::env::var("KSTORE_BOOTSTRAP_TEST_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024);
        let big = 0i32;
        fill_copy(&scenario.config("node-1")?, big, filler_mib << 20)?;

        let generator = GeneratorConfig {
            customers: 2_000,
            seed: 33,
            ..GeneratorConfig::default()
        };
        let (before, during) = (5_000u64, 60_000u64);
        scenario.produce(&generator, before)?;
        let mut node1 = common::Node::start(&scenario, "node-1", "only").await?;
        scenario.wait_caught_up(&mut node1.process, Duration::from_secs(300))?;

        // Events flow at a steady rate while node-2 joins and bootstraps its copies.
        let producer = {
            let options = kstore_cli::produce::ProduceOptions {
                bootstrap: scenario.kafka.bootstrap().into(),
                topic: scenario.input.clone(),
                count: during,
                skip: before,
                rate: 3_000,
                generator: generator.clone(),
                kafka: Vec::new(),
            };
            tokio::task::spawn_blocking(move || kstore_cli::produce::produce(&options))
        };
        let mut node2 = common::Node::start(&scenario, "node-2", "only").await?;
        // While node-2's copy of the big partition bootstraps, its other copies that are
        // active fold input: their input offsets move.
        // node-2's copies at the previous look while the big copy was bootstrapping.
        let mut previous: Option<BTreeMap<u32, (Role, i64)>> = None;
        let mut advanced = false;
        let mut seen = Vec::new();
        let watching = std::time::Instant::now();
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        loop {
            let copies = copies_of(&node2.metadata().await?, "node-2");
            seen.push((watching.elapsed().as_millis(), copies.clone()));
            let bootstrapping = copies
                .get(&(big as u32))
                .is_some_and(|(role, _)| *role == Role::Bootstrapping);
            if bootstrapping {
                if let Some(previous) = &previous {
                    advanced |= copies.iter().any(|(p, (role, offset))| {
                        *role == Role::Active
                            && previous.get(p).is_some_and(|(was, before)| {
                                *was == Role::Active && offset > before
                            })
                    });
                }
                previous = Some(copies.clone());
            } else if previous.is_some()
                && copies
                    .get(&(big as u32))
                    .is_some_and(|(role, _)| kstore_core::cluster::serves_reads(*role))
            {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "node-2's copy of partition {big} was never seen bootstrapping: {copies:?}; \
                 first looks (ms, copies): {:?}; node-2 logged about partition {big}:\n{}",
                &seen[..seen.len().min(20)],
                lines_about_partition(&node2.process.output(), big)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            advanced,
            "no active partition of node-2 folded input while its copy of partition {big} \
             bootstrapped; node-2's copies (ms, partition: role and input offset):\n{seen:?}\n{}",
            node2.process.output()
        );
        let summary = producer.await??;
        ensure!(
            summary.delivered == during,
            "delivered {}",
            summary.delivered
        );
        scenario.wait_caught_up(&mut node2.process, Duration::from_secs(300))?;

        // Every customer's state is exact, read from whichever node is active for it.
        let events: Vec<_> = OrderGenerator::new(generator)
            .take((before + during) as usize)
            .collect();
        let expected = common::expected_features(&events);
        let end = scenario.kafka.end_offsets(&scenario.input, partitions)?;
        for (customer, want) in &expected {
            let partition = partition_for_key(customer.as_bytes(), partitions);
            let mut answer = None;
            for _ in 0..600 {
                for node in [&mut node1, &mut node2] {
                    let got = node
                        .client
                        .get(GetRequest {
                            store: "features".into(),
                            key: customer.as_bytes().to_vec(),
                            partition: None,
                            options: Some(kstore_proto::v1::ReadOptions {
                                no_forward: true,
                                ..Default::default()
                            }),
                        })
                        .await;
                    if let Ok(got) = got {
                        let got = got.into_inner();
                        if got.read.as_ref().is_some_and(|r| {
                            r.role() == Role::Active && r.input_offset >= end[partition as usize]
                        }) {
                            answer = Some(got);
                        }
                    }
                }
                if answer.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let answer =
                answer.with_context(|| format!("no caught-up active answers {customer}"))?;
            let Some(get_response::Value::Message(any)) = answer.value else {
                anyhow::bail!("{customer}: no value");
            };
            let got = <kstore_proto::v1::CustomerFeatures as prost::Message>::decode(
                any.value.as_slice(),
            )?;
            ensure!(
                &got == want,
                "{customer}: {got:?} stored, {want:?} expected"
            );
        }

        for node in [&mut node2, &mut node1] {
            let status = node.process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "{} exit after SIGTERM: {status}", node.id);
        }
        for node in [&node1, &node2] {
            let log = node.process.output().to_lowercase();
            // librdkafka's "application maximum poll interval (…) exceeded by …", a fenced
            // producer (a transaction that timed out), an abort, a double fold.
            for sign in [
                "maximum poll interval",
                "fenced",
                "aborting the transaction",
                "exactly-once violation",
            ] {
                ensure!(
                    !log.contains(sign),
                    "{} logged {sign:?}:\n{}",
                    node.id,
                    node.process.tail()
                );
            }
        }
        let bootstrapped = node2.process.output();
        ensure!(
            bootstrapped.lines().any(|l| l.contains("copy bootstrapped")
                && l.contains(&format!("partition={big} "))
                && l.contains("peer")),
            "node-2 did not bootstrap partition {big} from its peer"
        );
        Ok(())
    })
}
