//! Backups against a real broker: Admin CreateBackup, ListBackups and VerifyBackup on a
//! running node, and a node that finds damaged copies at start recovering them by itself,
//! from the newest good backup plus the changelog's tail, or from the changelog alone when
//! every backup of the partition is damaged, with the damaged copies kept aside.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{Node, Scenario, admin_target, expected_features, run_async, wait_for_agreement};
use kstore_cli::generator::{GeneratorConfig, OrderGenerator};
use kstore_core::orders::OrderEvent;
use kstore_core::partitioner::partition_for_key;
use kstore_proto::v1::CustomerFeatures;
use kstore_proto::v1::admin_client::AdminClient;
use kstore_proto::v1::{
    CreateBackupRequest, ListBackupsRequest, NodeInfo, Role, VerifyBackupRequest,
};
use kstore_server::point_in_time::{self, RestorePoint};
use kstore_server::processor::features::FeaturesProcessor;
use kstore_server::processor::{InputRecord, Outcome, ProcessError, Processor, Update};
use prost::Message as _;
use rdkafka::Message as _;

const PARTITIONS: u32 = 4;

/// The largest SST file in a store's directory.
fn largest_sst(dir: &Path) -> Result<PathBuf> {
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sst"))
        .map(|p| Ok((std::fs::metadata(&p)?.len(), p)))
        .collect::<Result<_>>()?;
    files.sort();
    files
        .pop()
        .map(|(_, path)| path)
        .with_context(|| format!("no SST file in {}", dir.display()))
}

/// Flips one byte in the middle of a file, as a failing disk would.
fn flip_a_byte(path: &Path) -> Result<()> {
    let mut bytes = std::fs::read(path)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(path, bytes)?;
    Ok(())
}

/// The directories a node moved aside as damaged, for one partition.
fn damaged_copies(store_root: &Path, partition: u32) -> Result<Vec<PathBuf>> {
    let prefix = format!("{partition}.damaged-");
    Ok(std::fs::read_dir(store_root)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect())
}

/// `records=` of the node's "restore finished" log lines, per partition.
fn restored_records(log: &str) -> BTreeMap<u32, u64> {
    let mut restored = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("restore finished")) {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(name))
                .and_then(|v| v.parse::<u64>().ok())
        };
        if let (Some(partition), Some(records)) = (field("partition="), field("records=")) {
            *restored.entry(partition as u32).or_default() += records;
        }
    }
    restored
}

/// A scenario whose nodes back up to a directory of its own, only on demand (so a test
/// knows which backups exist); returns it and the directory.
async fn scenario_with_backups(name: &str) -> Result<(Scenario, PathBuf)> {
    let mut scenario = Scenario::new(name, PARTITIONS).await?;
    let backup_dir = scenario.dir.path().join("backups");
    scenario
        .extra
        .push(format!("backup.dir={}", backup_dir.display()));
    scenario.extra.push("backup.interval-ms=0".into());
    Ok((scenario, backup_dir))
}

#[test]
fn damaged_copies_recover_from_the_newest_good_backup_or_the_changelog() -> Result<()> {
    run_async(async {
        let (scenario, backup_dir) = scenario_with_backups("backup-recovery").await?;
        let generator = GeneratorConfig {
            customers: 2_000,
            seed: 11,
            ..GeneratorConfig::default()
        };
        let (before, after, last) = (20_000u64, 10_000u64, 2_000u64);
        let events: Vec<OrderEvent> = OrderGenerator::new(generator.clone())
            .take((before + after + last) as usize)
            .collect();
        scenario.produce(&generator, before)?;

        let mut node = scenario.start_node("node-1", "first")?;
        let uri = scenario.grpc_uri(&mut node)?;
        scenario.wait_caught_up(&mut node, Duration::from_secs(180))?;
        let mut admin = AdminClient::connect(uri.clone()).await?;

        // One backup of every partition, from the only copy there is: the active. As
        // `kstore backup create` does: every live node in the view is asked.
        let target = admin_target(&uri);
        let summary = kstore_cli::backup::create(&target, "", &[]).await?;
        ensure!(
            summary.missing.is_empty() && summary.answers.len() == 1,
            "backup answers {:?}, missing {:?}",
            summary.answers,
            summary.missing
        );
        let created = summary.answers[0]
            .1
            .clone()
            .map_err(anyhow::Error::msg)
            .context("node-1's backups")?;
        ensure!(
            created.failed.is_empty(),
            "failed backups: {:?}",
            created.failed
        );
        let end = scenario.kafka.end_offsets(&scenario.input, PARTITIONS)?;
        let mut backed_up: Vec<u32> = created.backups.iter().map(|b| b.partition).collect();
        backed_up.sort();
        ensure!(backed_up == [0, 1, 2, 3], "backed up {backed_up:?}");
        for backup in &created.backups {
            ensure!(
                backup.input_offset == end[backup.partition as usize]
                    && backup.source_role() == Role::Active
                    && backup.partition_count == PARTITIONS
                    && backup.node_id == "node-1"
                    && backup.size_bytes > 0
                    && backup.file_count > 0,
                "backup {backup:?} does not match input end {end:?}"
            );
        }
        let listed = admin
            .list_backups(ListBackupsRequest::default())
            .await?
            .into_inner();
        ensure!(
            listed.backups.len() == 4,
            "listed {} backups",
            listed.backups.len()
        );
        let verified = admin
            .verify_backup(VerifyBackupRequest::default())
            .await?
            .into_inner();
        ensure!(
            verified.results.len() == 4 && verified.results.iter().all(|r| r.ok),
            "verification: {:?}",
            verified.results
        );

        // More events after the backup, then the node stops.
        scenario.produce_from(&generator, before, after)?;
        scenario.wait_caught_up(&mut node, Duration::from_secs(180))?;
        let status = node.terminate(Duration::from_secs(60))?;
        ensure!(status.success(), "exit after SIGTERM: {status}");

        // The disk damages partition 0's copy; partition 1's copy and every file of its
        // backup too.
        let config = scenario.config("node-1")?;
        flip_a_byte(&largest_sst(&config.store_dir(0))?)?;
        flip_a_byte(&largest_sst(&config.store_dir(1))?)?;
        let set_1 = backup_dir
            .join(&scenario.app)
            .join(&config.store)
            .join("1")
            .join("shared_checksum");
        for file in std::fs::read_dir(&set_1)?.flatten() {
            flip_a_byte(&file.path())?;
        }
        let mut node = scenario.start_node("node-1", "second")?;
        let uri = scenario.grpc_uri(&mut node)?;
        scenario.produce_from(&generator, before + after, last)?;
        scenario.wait_caught_up(&mut node, Duration::from_secs(180))?;
        let mut admin = AdminClient::connect(uri).await?;
        let verified = admin
            .verify_backup(VerifyBackupRequest {
                partitions: vec![1],
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(
            verified.results.len() == 1 && !verified.results[0].ok,
            "partition 1's damaged backup verified as {:?}",
            verified.results
        );
        let status = node.terminate(Duration::from_secs(60))?;
        ensure!(status.success(), "exit after SIGTERM: {status}");

        // Both damaged copies were kept aside, the other two were left alone.
        let store_root = config.store_dir(0).parent().unwrap().to_path_buf();
        for partition in 0..PARTITIONS {
            let aside = damaged_copies(&store_root, partition)?;
            let want = usize::from(partition < 2);
            ensure!(
                aside.len() == want,
                "partition {partition}: damaged copies kept {aside:?}"
            );
        }
        let log = node.output();
        ensure!(
            log.lines()
                .any(|l| l.contains("recovering from a backup") && l.contains("partition=0")),
            "partition 0 did not recover from its backup:\n{log}"
        );
        ensure!(
            log.lines()
                .any(|l| l.contains("recovering from the whole changelog")
                    && l.contains("partition=1")),
            "partition 1 did not fall back to its changelog:\n{log}"
        );
        ensure!(
            log.lines()
                .any(|l| l.contains("a backup is damaged") && l.contains("partition=1")),
            "partition 1's damaged backup was not reported:\n{log}"
        );

        // Partition 0 replayed only the changelog after its backup (one record per input
        // record produced since); partition 1 replayed its whole changelog.
        let restored = restored_records(&log);
        let input_of = |partition: u32, range: std::ops::Range<u64>| {
            events[range.start as usize..range.end as usize]
                .iter()
                .filter(|e| partition_for_key(e.customer_id.as_bytes(), PARTITIONS) == partition)
                .count() as u64
        };
        let tail_0 = input_of(0, before..before + after);
        let whole_1 = input_of(1, 0..before + after);
        ensure!(
            restored.get(&0) == Some(&tail_0) && restored.get(&1) == Some(&whole_1),
            "replayed {restored:?}; partition 0's tail had {tail_0} input records, \
             partition 1's whole input {whole_1}"
        );

        // Every customer's state is exact.
        assert_exact(&scenario, &["node-1"], &events)?;
        Ok(())
    })
}

/// Waits until `node`'s copies of every partition reflect the input's end.
async fn wait_copies_at_end(scenario: &Scenario, node: &mut Node) -> Result<()> {
    let end = scenario
        .kafka
        .end_offsets(&scenario.input, scenario.partitions)?;
    wait_own_view(
        node,
        Duration::from_secs(120),
        &format!("copies at the input's end {end:?}"),
        |me| {
            (0..scenario.partitions).all(|p| {
                me.copies
                    .iter()
                    .any(|c| c.partition == p && c.input_offset == end[p as usize])
            })
        },
    )
    .await
}

/// Polls `node`'s own entry in its cluster view until `reached` holds of it; fails after
/// `within`, naming `what` it did not reach and the view. The view shows a copy's role and
/// offsets as of the node's last gossip round, so it may trail the group's commit by a moment.
async fn wait_own_view(
    node: &mut Node,
    within: Duration,
    what: &str,
    reached: impl Fn(&NodeInfo) -> bool,
) -> Result<()> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let metadata = node.metadata().await?;
        if metadata
            .nodes
            .iter()
            .find(|n| n.node_id == node.id)
            .is_some_and(&reached)
        {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{} did not show {what} in its own view: {metadata:?}",
            node.id
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Checks every stored customer of `nodes`' stopped stores against the recomputed state.
fn assert_exact(scenario: &Scenario, nodes: &[&str], events: &[OrderEvent]) -> Result<()> {
    let stores = scenario.read_stores(nodes)?;
    let expected = expected_features(events);
    let mut stored = 0;
    for (partition, values) in &stores {
        for (customer, features) in values {
            stored += 1;
            ensure!(
                partition_for_key(customer.as_bytes(), scenario.partitions) as i32 == *partition,
                "{customer} is stored in partition {partition}"
            );
            ensure!(
                Some(features) == expected.get(customer),
                "{customer}: stored {features:?}, expected {:?}",
                expected.get(customer)
            );
        }
    }
    ensure!(
        stored == expected.len(),
        "stored {stored} customers of {}",
        expected.len()
    );
    Ok(())
}

#[test]
fn a_new_node_bootstraps_its_copies_from_peer_snapshots() -> Result<()> {
    run_async(async {
        let scenario = Scenario::new("peer-snapshot", PARTITIONS).await?;
        let generator = GeneratorConfig {
            customers: 2_000,
            seed: 12,
            ..GeneratorConfig::default()
        };
        let (before, after) = (20_000u64, 5_000u64);
        let events: Vec<OrderEvent> = OrderGenerator::new(generator.clone())
            .take((before + after) as usize)
            .collect();
        scenario.produce(&generator, before)?;
        let mut node1 = Node::start(&scenario, "node-1", "only").await?;
        scenario.wait_caught_up(&mut node1.process, Duration::from_secs(180))?;

        // node-2 joins: it takes over some actives and a standby of the rest, every one
        // new to it.
        let mut node2 = Node::start(&scenario, "node-2", "only").await?;
        wait_for_agreement(
            &mut [&mut node1, &mut node2],
            &["node-1", "node-2"],
            Duration::from_secs(120),
        )
        .await?;
        scenario.produce_from(&generator, before, after)?;
        scenario.wait_caught_up(&mut node1.process, Duration::from_secs(180))?;
        // node-2's copies all reach the input's end.
        wait_copies_at_end(&scenario, &mut node2).await?;
        for node in [&mut node2, &mut node1] {
            let status = node.process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "{} exit after SIGTERM: {status}", node.id);
        }

        // Every copy node-2 opened came from node-1's snapshot, none from the whole changelog.
        let log = node2.process.output();
        for partition in 0..PARTITIONS {
            let line = log
                .lines()
                .find(|l| {
                    l.contains("bootstrapped a copy from a peer's snapshot")
                        && l.contains(&format!("partition={partition} "))
                })
                .with_context(|| format!("partition {partition} was not bootstrapped:\n{log}"))?;
            ensure!(
                line.contains("peer=node-1") && !line.contains("changelog_offset=0 "),
                "{line}"
            );
        }
        ensure!(
            !log.contains("recovering from the whole changelog"),
            "a copy replayed its whole changelog:\n{log}"
        );
        assert_exact(&scenario, &["node-2"], &events)?;
        assert_exact(&scenario, &["node-1"], &events)?;
        Ok(())
    })
}

/// A processor with a logic bug: it folds like the built-in one, then forgets every
/// feature but the customer id.
struct ForgetfulProcessor(FeaturesProcessor);

impl Processor for ForgetfulProcessor {
    fn process(
        &mut self,
        record: &InputRecord<'_>,
        current: Option<&[u8]>,
    ) -> Result<Outcome, ProcessError> {
        let mut outcome = self.0.process(record, current)?;
        if let Update::Put(value) = &mut outcome.update {
            let features = CustomerFeatures::decode(value.as_slice()).unwrap_or_default();
            *value = CustomerFeatures {
                customer_id: features.customer_id,
                ..CustomerFeatures::default()
            }
            .encode_to_vec();
        }
        Ok(outcome)
    }
}

/// Folds a changelog as a copy rebuilt from it would: the last value per key wins, a
/// tombstone deletes.
fn fold_changelog(scenario: &Scenario) -> Result<BTreeMap<String, CustomerFeatures>> {
    let changelog = format!("{}-features-changelog", scenario.app);
    let mut state = BTreeMap::new();
    for message in scenario.kafka.read_all(&changelog, scenario.partitions)? {
        let key = message.key().unwrap_or_default();
        if key.first() == Some(&0) {
            continue;
        }
        let key = String::from_utf8(key.to_vec())?;
        match message.payload() {
            Some(value) => {
                state.insert(key, CustomerFeatures::decode(value)?);
            }
            None => {
                state.remove(&key);
            }
        }
    }
    Ok(state)
}

#[test]
fn point_in_time_restore_undoes_a_logic_bug() -> Result<()> {
    run_async(async {
        let (scenario, _) = scenario_with_backups("point-in-time").await?;
        let generator = GeneratorConfig {
            customers: 1_000,
            seed: 13,
            ..GeneratorConfig::default()
        };
        let (good, buggy, later) = (10_000u64, 5_000u64, 2_000u64);
        let events: Vec<OrderEvent> = OrderGenerator::new(generator.clone())
            .take((good + buggy + later) as usize)
            .collect();

        // The right processor, then a backup of every partition.
        scenario.produce(&generator, good)?;
        let mut node = scenario.start_node("node-1", "before")?;
        let uri = scenario.grpc_uri(&mut node)?;
        scenario.wait_caught_up(&mut node, Duration::from_secs(180))?;
        let target = admin_target(&uri);
        let summary = kstore_cli::backup::create(&target, "", &[]).await?;
        ensure!(
            summary.missing.is_empty(),
            "not backed up: {:?}",
            summary.missing
        );
        let status = node.terminate(Duration::from_secs(60))?;
        ensure!(status.success(), "exit after SIGTERM: {status}");
        let before_the_bug = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;

        // A release with a logic bug runs for a while.
        scenario.produce_from(&generator, good, buggy)?;
        let config = scenario.config("node-1")?;
        let shutdown = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let buggy_node = std::thread::spawn({
            let (config, stop) = (config.clone(), shutdown.clone());
            move || {
                let processor = ForgetfulProcessor(FeaturesProcessor::new(config.alerts_topic()));
                kstore_server::node::run(config, Box::new(processor), stop)
            }
        });
        scenario.wait_committed(Duration::from_secs(180), || {
            ensure!(!buggy_node.is_finished(), "the buggy node stopped early");
            Ok(())
        })?;
        shutdown.store(true, std::sync::atomic::Ordering::Relaxed);
        buggy_node
            .join()
            .map_err(|_| anyhow::anyhow!("the buggy node panicked"))??;
        ensure!(
            fold_changelog(&scenario)?
                != expected_features(&events[..(good + buggy) as usize])
                    .into_iter()
                    .collect(),
            "the bug left no trace in the changelog"
        );

        // The plan: every partition back to its backup, the buggy stretch reprocessed.
        let point = RestorePoint::Time(before_the_bug);
        let plans = point_in_time::plan(&config, point, &[])?;
        ensure!(plans.len() == PARTITIONS as usize, "{plans:?}");
        let reprocess: i64 = plans.iter().map(|p| p.events_to_reprocess()).sum();
        ensure!(
            reprocess == buggy as i64,
            "{reprocess} events to reprocess, not {buggy}"
        );
        // The stopped static member still holds its place in the group for a while: the
        // restore waits for it to go.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while let Err(error) = point_in_time::check_group_empty(&config) {
            ensure!(
                std::time::Instant::now() < deadline,
                "the group did not empty: {error}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let scratch = scenario.dir.path().join("restore-scratch");
        let written =
            point_in_time::execute(&config, &plans, &scratch, |step| eprintln!("{step}"))?;
        let corrections: u64 = written.iter().map(|(_, n)| n).sum();
        ensure!(corrections > 0, "no corrections written");

        // The fixed release reprocesses, and more events follow.
        let mut node = scenario.start_node("node-1", "after")?;
        scenario.produce_from(&generator, good + buggy, later)?;
        scenario.wait_caught_up(&mut node, Duration::from_secs(180))?;
        let status = node.terminate(Duration::from_secs(60))?;
        ensure!(status.success(), "exit after SIGTERM: {status}");

        // The state equals a run that never had the bug: in the stores, and in what a copy
        // rebuilt from the changelog would hold.
        assert_exact(&scenario, &["node-1"], &events)?;
        let expected: BTreeMap<String, CustomerFeatures> =
            expected_features(&events).into_iter().collect();
        ensure!(
            fold_changelog(&scenario)? == expected,
            "the changelog does not fold to the right state"
        );
        Ok(())
    })
}

#[test]
fn a_standby_damaged_while_the_node_runs_is_rebuilt_from_its_peer() -> Result<()> {
    run_async(async {
        let (mut scenario, _) = scenario_with_backups("verify-running").await?;
        scenario.extra.push("verify-interval-ms=1000".into());
        let generator = GeneratorConfig {
            customers: 2_000,
            seed: 14,
            ..GeneratorConfig::default()
        };
        let (before, after) = (20_000u64, 2_000u64);
        let events: Vec<OrderEvent> = OrderGenerator::new(generator.clone())
            .take((before + after) as usize)
            .collect();
        scenario.produce(&generator, before)?;
        let mut node1 = Node::start(&scenario, "node-1", "only").await?;
        let mut node2 = Node::start(&scenario, "node-2", "only").await?;
        let layout = wait_for_agreement(
            &mut [&mut node1, &mut node2],
            &["node-1", "node-2"],
            Duration::from_secs(120),
        )
        .await?;
        wait_copies_at_end(&scenario, &mut node2).await?;
        // Backups flush the standbys' memtables, so their data is in SST files on disk.
        let grpc = scenario.grpc_uri(&mut node2.process)?;
        let target = admin_target(&grpc);
        kstore_cli::backup::create(&target, "", &[]).await?;

        // The disk under one of node-2's standbys flips a byte.
        let partition = *layout
            .standbys
            .iter()
            .find(|(_, holders)| holders.contains("node-2"))
            .map(|(p, _)| p)
            .context("node-2 holds no standby")?;
        let config = scenario.config("node-2")?;
        let dir = config.store_dir(partition as i32);
        flip_a_byte(&largest_sst(&dir)?)?;

        // The background check finds it; the standby is rebuilt from node-1's copy.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let rebuilt = |log: &str| {
            log.lines().any(|l| {
                l.contains("recovering from a peer's snapshot")
                    && l.contains(&format!("partition={partition} "))
                    && l.contains("damaged")
            })
        };
        while !rebuilt(&node2.process.output()) {
            ensure!(
                std::time::Instant::now() < deadline,
                "node-2 did not rebuild its damaged standby of partition {partition}:\n{}",
                node2.process.output()
            );
            node2.metadata().await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        scenario.produce_from(&generator, before, after)?;
        scenario.wait_caught_up(&mut node1.process, Duration::from_secs(180))?;
        wait_copies_at_end(&scenario, &mut node2).await?;
        for node in [&mut node2, &mut node1] {
            let status = node.process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "{} exit after SIGTERM: {status}", node.id);
        }
        let store_root = dir.parent().unwrap().to_path_buf();
        let aside = damaged_copies(&store_root, partition)?;
        let log = node2.process.output();
        let told: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("damaged") || l.contains("snapshot"))
            .collect();
        ensure!(
            aside.len() == 1,
            "damaged copies kept: {aside:?}\n{}",
            told.join("\n")
        );
        assert_exact(&scenario, &["node-2"], &events)?;
        Ok(())
    })
}

#[test]
fn an_active_damaged_while_the_node_runs_fails_alone_and_is_rebuilt_while_the_rest_ingests()
-> Result<()> {
    run_async(async {
        let (mut scenario, _) = scenario_with_backups("verify-active").await?;
        scenario.extra.push("verify-interval-ms=1000".into());
        scenario.extra.push("copy-retry-initial-ms=200".into());
        let generator = GeneratorConfig {
            customers: 2_000,
            seed: 15,
            ..GeneratorConfig::default()
        };
        let (before, after) = (20_000u64, 4_000u64);
        let events: Vec<OrderEvent> = OrderGenerator::new(generator.clone())
            .take((before + after) as usize)
            .collect();
        scenario.produce(&generator, before)?;
        // node-1 alone first: a backup then flushes its actives' memtables to SST files.
        let mut node1 = Node::start(&scenario, "node-1", "only").await?;
        wait_copies_at_end(&scenario, &mut node1).await?;
        let grpc = scenario.grpc_uri(&mut node1.process)?;
        kstore_cli::backup::create(&admin_target(&grpc), "", &[]).await?;
        let mut node2 = Node::start(&scenario, "node-2", "only").await?;
        let layout = wait_for_agreement(
            &mut [&mut node1, &mut node2],
            &["node-1", "node-2"],
            Duration::from_secs(120),
        )
        .await?;
        wait_copies_at_end(&scenario, &mut node2).await?;

        // The disk under one of node-1's actives flips a byte.
        let partition = *layout
            .actives
            .iter()
            .find(|(_, holders)| holders.iter().any(|h| h == "node-1"))
            .map(|(p, _)| p)
            .context("node-1 is active for no partition")?;
        let dir = scenario.config("node-1")?.store_dir(partition as i32);
        flip_a_byte(&largest_sst(&dir)?)?;

        // The background check finds it: that copy fails alone, is rebuilt from node-2's
        // standby, and turns active again, while events keep flowing to every partition.
        scenario.produce_from(&generator, before, after)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let mine = format!("partition={partition} ");
        let failed = |log: &str| {
            log.lines()
                .any(|l| l.contains("a copy failed") && l.contains(&mine) && l.contains("damaged"))
        };
        let rebuilt = |log: &str| {
            log.lines().any(|l| {
                l.contains("recovering from a peer's snapshot")
                    && l.contains(&mine)
                    && l.contains("damaged")
            })
        };
        loop {
            let log = node1.process.output();
            if failed(&log) && rebuilt(&log) {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "node-1 did not fail and rebuild its damaged active of partition {partition}:\n{log}"
            );
            ensure!(
                node1.process.try_exit()?.is_none(),
                "node-1 exited:\n{}",
                node1.process.tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        scenario.wait_caught_up(&mut node1.process, Duration::from_secs(180))?;
        let end = scenario
            .kafka
            .end_offsets(&scenario.input, scenario.partitions)?[partition as usize];
        wait_own_view(
            &mut node1,
            Duration::from_secs(30),
            &format!("its rebuilt copy of partition {partition} active at the input's end {end}"),
            |me| {
                me.copies.iter().any(|c| {
                    c.partition == partition && c.role() == Role::Active && c.input_offset == end
                })
            },
        )
        .await?;
        wait_copies_at_end(&scenario, &mut node2).await?;
        for node in [&mut node2, &mut node1] {
            let status = node.process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "{} exit after SIGTERM: {status}", node.id);
        }
        let log = node1.process.output();
        ensure!(
            !log.contains("exactly-once violation"),
            "node-1 logged an exactly-once violation:\n{log}"
        );
        let aside = damaged_copies(dir.parent().context("the store root")?, partition)?;
        ensure!(aside.len() == 1, "damaged copies kept: {aside:?}");
        assert_exact(&scenario, &["node-1", "node-2"], &events)?;
        Ok(())
    })
}

#[test]
fn backup_calls_on_a_node_without_a_location_say_how_to_configure_one() -> Result<()> {
    run_async(async {
        let scenario = Scenario::new("backup-off", 1).await?;
        let mut node = scenario.start_node("node-1", "only")?;
        let uri = scenario.grpc_uri(&mut node)?;
        let mut admin = AdminClient::connect(uri).await?;
        let error = admin
            .create_backup(CreateBackupRequest::default())
            .await
            .unwrap_err();
        ensure!(
            error.code() == tonic::Code::FailedPrecondition
                && error.message().contains("backup.dir"),
            "{error:?}"
        );
        let status = node.terminate(Duration::from_secs(60))?;
        ensure!(status.success(), "exit after SIGTERM: {status}");
        Ok(())
    })
}
