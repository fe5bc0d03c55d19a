//! Several stores in one cluster: the built-in features store and a store of a WebAssembly
//! module (`kstore-guest`'s `tally` example, its values a protobuf message of its own) fed
//! from a topic of its own, on three nodes of one gossip cluster. Each store has its own
//! actives and standbys; both stay exact through kill -9 of a node and a rolling restart
//! with both inputs flowing, and through every node each store's values read exactly what
//! its input says; an unknown store is refused naming the stores served. A store over two
//! co-partitioned topics folds both exactly.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kstore_cli::generator::{GeneratorConfig, OrderGenerator};
use kstore_core::orders::OrderEvent;
use kstore_proto::v1::{CustomerFeatures, ErrorReason, GetRequest, get_response};
use prost::Message as _;
use rdkafka::producer::FutureRecord;
use tonic_types::StatusExt;

use common::{
    Layout, Node, Scenario, admin_target, assert_exact_state, expected_features, run_async,
};
use kstore_server::point_in_time::{self, RestorePoint};

const PARTITIONS: u32 = 4;
/// The tally store's topic has a partition count of its own.
const WORD_PARTITIONS: u32 = 3;
const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

/// Per key of the tally store: how many records and the last one's value.
type Tallies = BTreeMap<String, (u64, String)>;

/// Sends records `range` of the tally store's input (keys `word-00` to `word-22`), and
/// records what each key should hold.
async fn send_words(
    scenario: &Scenario,
    topic: &str,
    range: std::ops::Range<u64>,
    expected: &mut Tallies,
) -> Result<()> {
    send_keyed(scenario, topic, "word", 23, range, expected).await
}

/// Sends records `range` of the tally store's input, keyed `<prefix>-00` to
/// `<prefix>-<keys - 1>` in turn, and records what each key should hold.
async fn send_keyed(
    scenario: &Scenario,
    topic: &str,
    prefix: &str,
    keys: u64,
    range: std::ops::Range<u64>,
    expected: &mut Tallies,
) -> Result<()> {
    let producer = scenario.kafka.producer()?;
    for i in range {
        let key = format!("{prefix}-{:02}", i % keys);
        let value = format!("value-{i}");
        let record = FutureRecord::<str, str>::to(topic)
            .key(&key)
            .payload(&value);
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)?;
        let entry = expected.entry(key).or_default();
        *entry = (entry.0 + 1, value);
    }
    Ok(())
}

/// The inputs sent so far: the features store's order events (the generator's first
/// `events_sent`) and the tally store's records, with what each tally key should hold.
struct Inputs {
    generator: GeneratorConfig,
    events_sent: u64,
    words_topic: String,
    words_sent: u64,
    tallies: Tallies,
}

impl Inputs {
    /// Sends the next `events` order events and `words` tally records.
    async fn send(&mut self, scenario: &Scenario, events: u64, words: u64) -> Result<()> {
        scenario.produce_from(&self.generator, self.events_sent, events)?;
        self.events_sent += events;
        let range = self.words_sent..self.words_sent + words;
        send_words(scenario, &self.words_topic, range, &mut self.tallies).await?;
        self.words_sent += words;
        Ok(())
    }
}

/// Waits until every node's view shows, for each store, one live active and one live
/// standby per partition on other nodes, spread over all three nodes.
async fn wait_for_both_layouts(nodes: &mut [Node], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut last = Vec::new();
        for node in nodes.iter_mut() {
            let metadata = node.metadata().await?;
            for store in ["features", "tally"] {
                last.push((node.id.clone(), store, Layout::of_store(&metadata, store)));
            }
        }
        let settled = last.iter().all(|(_, _, layout)| {
            layout.complete(&NODES, 1) && layout.standbys_per_node().len() == NODES.len()
        });
        if settled {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the stores' layouts did not settle: {last:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `group` has committed every record of `topic`.
fn wait_group_caught_up(
    scenario: &Scenario,
    group: &str,
    topic: &str,
    partitions: u32,
    timeout: Duration,
) -> Result<()> {
    let end = scenario.kafka.end_offsets(topic, partitions)?;
    let deadline = Instant::now() + timeout;
    loop {
        let committed = scenario.kafka.committed_offsets(group, topic, partitions)?;
        if committed.iter().zip(&end).all(|(c, e)| c >= e || *e == 0) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("group {group} committed {committed:?} of {topic}, whose end is {end:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Writes a config file `name` in the scenario's directory that declares, besides the
/// features store, the tally store: input `<app>-words`, processor `module`, values
/// `acme.v1.Tally`, group `<app>-tally`. Returns its path.
fn tally_config(scenario: &Scenario, name: &str, module: &std::path::Path) -> Result<PathBuf> {
    let set = kstore_testkit::guest::tally_descriptor_set(scenario.dir.path())?;
    let typed = format!(
        r#"value-type = {{ descriptor-set = "{}", message = "acme.v1.Tally" }}"#,
        set.display()
    );
    store_config(scenario, name, module, &typed)
}

/// As [`tally_config`], with `value_type` as the store's `value-type` line (empty: raw
/// bytes).
fn store_config(
    scenario: &Scenario,
    name: &str,
    module: &std::path::Path,
    value_type: &str,
) -> Result<PathBuf> {
    let app = &scenario.app;
    let file = scenario.dir.path().join(name);
    std::fs::write(
        &file,
        format!(
            r#"
[[stores]]
name = "tally"
input-topic = "{app}-words"
processor = {{ wasm = "{module}" }}
{value_type}
changelog-topic = "{app}-tally-changelog"
dead-letter-topic = "{app}-tally-dlq"
group-id = "{app}-tally"
"#,
            module = module.display(),
        ),
    )?;
    Ok(file)
}

/// Checks that `node` answers every key of both stores exactly: each customer's features
/// as recomputed from the events, each word's Tally (decoded through the node's reflection,
/// as grpcurl would) as sent.
async fn check_reads(
    node: &mut Node,
    features: &std::collections::HashMap<String, CustomerFeatures>,
    tallies: &Tallies,
) -> Result<()> {
    for (customer, want) in features {
        let answer = node
            .client
            .get(GetRequest {
                store: "features".into(),
                key: customer.as_bytes().to_vec(),
                ..GetRequest::default()
            })
            .await?
            .into_inner();
        let Some(get_response::Value::Message(any)) = answer.value else {
            bail!("{customer} not found through {}", node.id);
        };
        ensure!(
            CustomerFeatures::decode(any.value.as_slice())? == *want,
            "{customer}'s features through {}",
            node.id
        );
    }
    // The type as the node's reflection describes it, the way grpcurl and `kstore get
    // --json` learn it.
    let metadata = node.metadata().await?;
    let address = metadata
        .nodes
        .iter()
        .find(|n| n.node_id == node.id)
        .map(|n| n.grpc_address.clone())
        .context("the node is not in its own view")?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
        .connect()
        .await?;
    let values = kstore_cli::values::Values::described(channel, "acme.v1.Tally")
        .await
        .map_err(anyhow::Error::msg)?;
    for (key, (count, last)) in tallies {
        let answer = node
            .client
            .get(GetRequest {
                store: "tally".into(),
                key: key.as_bytes().to_vec(),
                ..GetRequest::default()
            })
            .await?
            .into_inner();
        let Some(get_response::Value::Message(any)) = answer.value else {
            bail!("{key} not answered as a typed message through {}", node.id);
        };
        ensure!(
            any.type_url == "type.googleapis.com/acme.v1.Tally",
            "{key}: {}",
            any.type_url
        );
        let json = values.json(Some(&any.value));
        let want = serde_json::json!({"count": count.to_string(), "last": last});
        ensure!(
            json == want,
            "{key} through {}: {json} (want {want})",
            node.id
        );
    }
    Ok(())
}

#[test]
fn a_cluster_serves_the_features_store_and_a_module_store_both_exact_through_kill_9_and_a_rolling_restart()
-> Result<()> {
    run_async(async {
        let mut scenario = Scenario::new("stores", PARTITIONS).await?;
        let app = scenario.app.clone();
        let words = format!("{app}-words");
        scenario.kafka.create_topic(&words, WORD_PARTITIONS).await?;
        let tally_group = format!("{app}-tally");
        let module = kstore_testkit::guest::module("tally")?;
        scenario.config_file = Some(tally_config(&scenario, "stores.toml", &module)?);

        let generator = GeneratorConfig {
            customers: 400,
            seed: 31,
            ..GeneratorConfig::default()
        };
        // Both inputs go on between the faults.
        let mut inputs = Inputs {
            generator,
            events_sent: 0,
            words_topic: words.clone(),
            words_sent: 0,
            tallies: Tallies::new(),
        };
        inputs.send(&scenario, 3_000, 800).await?;

        let mut nodes = Vec::new();
        for id in NODES {
            nodes.push(Node::start(&scenario, id, "first").await?);
        }
        wait_for_both_layouts(&mut nodes, Duration::from_secs(180)).await?;

        // Metadata names both stores, each with its own partitions and value type.
        let metadata = nodes[0].metadata().await?;
        let stores: Vec<(String, u32, String)> = metadata
            .stores
            .iter()
            .map(|s| (s.name.clone(), s.partitions, s.value_type.clone()))
            .collect();
        ensure!(
            stores
                == [
                    (
                        "features".into(),
                        PARTITIONS,
                        "kstore.v1.CustomerFeatures".into()
                    ),
                    ("tally".into(), WORD_PARTITIONS, "acme.v1.Tally".into()),
                ],
            "{stores:?}"
        );
        // A read of a store nobody serves is refused, naming the stores served.
        let refused = nodes[0]
            .client
            .get(GetRequest {
                store: "nope".into(),
                key: b"word-01".to_vec(),
                ..GetRequest::default()
            })
            .await
            .expect_err("a read of an unknown store was answered");
        let reason = refused.get_details_error_info().map(|info| info.reason);
        ensure!(
            refused.code() == tonic::Code::InvalidArgument
                && reason.as_deref() == Some(ErrorReason::UnknownStore.as_str_name())
                && refused.message().contains("features, tally"),
            "{refused:?}"
        );

        // kill -9 of node-2 while both inputs go on, then its restart from its own disk.
        let status = nodes[1].process.kill9()?;
        ensure!(!status.success(), "node-2 after kill -9: {status}");
        inputs.send(&scenario, 1_500, 400).await?;
        nodes[1] = Node::start(&scenario, "node-2", "after-kill").await?;
        wait_for_both_layouts(&mut nodes, Duration::from_secs(180)).await?;

        // A rolling restart, one node at a time, while both inputs go on.
        for (i, id) in NODES.iter().enumerate() {
            let status = nodes[i].process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "{id} exit: {status}");
            inputs.send(&scenario, 1_000, 300).await?;
            nodes[i] = Node::start(&scenario, id, "rolled").await?;
            wait_for_both_layouts(&mut nodes, Duration::from_secs(180)).await?;
        }
        scenario.wait_committed(Duration::from_secs(300), || Ok(()))?;
        wait_group_caught_up(
            &scenario,
            &tally_group,
            &words,
            WORD_PARTITIONS,
            Duration::from_secs(300),
        )?;
        let events: Vec<OrderEvent> = OrderGenerator::new(inputs.generator.clone())
            .take(inputs.events_sent as usize)
            .collect();
        let tallies = inputs.tallies;

        // Through every node, every key of both stores reads exactly what its input says.
        let features = expected_features(&events);
        for node in &mut nodes {
            check_reads(node, &features, &tallies).await?;
        }
        for node in &mut nodes {
            let status = node.process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "{} exit: {status}", node.id);
        }
        // The features stores on disk are exact too, each partition at the input's end.
        assert_exact_state(&scenario, &NODES, &events)?;
        // Nothing of either store was dead-lettered.
        let dead = scenario
            .kafka
            .read_all(&format!("{app}-tally-dlq"), WORD_PARTITIONS)?;
        ensure!(
            dead.is_empty(),
            "{} tally records dead-lettered",
            dead.len()
        );
        scenario
            .kafka
            .delete_topics_with_prefix(&format!("{app}-tally"), Some(&tally_group))
            .context("deleting the tally store's topics")?;
        Ok(())
    })
}

/// The JSON body of a `GET` of `path` on the metrics port at `address` that answers 200.
fn console_json(address: &str, path: &str) -> Result<serde_json::Value> {
    // http_get fails unless the answer is 200 OK.
    let response = kstore_testkit::process::http_get(address, path)?;
    let (_, body) = response.split_once("\r\n\r\n").context("no body")?;
    Ok(serde_json::from_str(body)?)
}

/// Checks [`check_reads`] until it passes, for up to half a minute: a committed record
/// reaches the store just after its commit.
async fn wait_reads_exact(
    node: &mut Node,
    features: &std::collections::HashMap<String, CustomerFeatures>,
    tallies: &Tallies,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match check_reads(node, features, tallies).await {
            Ok(()) => return Ok(()),
            Err(error) if Instant::now() > deadline => return Err(error),
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// The Admin backup calls and point-in-time restore act on the store they name: the tally
/// store is backed up, listed and verified on its own, and after a wrong module folded part
/// of its input, restored to a time before it and reprocessed exactly; the features store
/// of the same nodes keeps its state and its group's offsets throughout.
#[test]
fn a_second_store_is_backed_up_and_restored_to_a_point_in_time_on_its_own() -> Result<()> {
    run_async(async {
        let mut scenario = Scenario::new("stores-restore", PARTITIONS).await?;
        let app = scenario.app.clone();
        let words = format!("{app}-words");
        let tally_group = format!("{app}-tally");
        scenario.kafka.create_topic(&words, WORD_PARTITIONS).await?;
        let backup_dir = scenario.dir.path().join("backups");
        scenario
            .extra
            .push(format!("backup.dir={}", backup_dir.display()));
        scenario.extra.push("backup.interval-ms=0".into());
        scenario.extra.push("metrics-address=127.0.0.1:0".into());
        let good = tally_config(
            &scenario,
            "good.toml",
            &kstore_testkit::guest::module("tally")?,
        )?;
        // The wrong release: a module that counts instead, with raw values (it cannot read
        // a Tally, so the keys that have one dead-letter, and new keys get a count).
        let wrong = store_config(
            &scenario,
            "wrong.toml",
            &kstore_testkit::guest::module("count")?,
            "",
        )?;
        scenario.config_file = Some(good.clone());
        let mut inputs = Inputs {
            generator: GeneratorConfig {
                customers: 300,
                seed: 41,
                ..GeneratorConfig::default()
            },
            events_sent: 0,
            words_topic: words.clone(),
            words_sent: 0,
            tallies: Tallies::new(),
        };
        let caught_up = |scenario: &Scenario| -> Result<()> {
            scenario.wait_committed(Duration::from_secs(180), || Ok(()))?;
            wait_group_caught_up(
                scenario,
                &tally_group,
                &words,
                WORD_PARTITIONS,
                Duration::from_secs(180),
            )
        };

        inputs.send(&scenario, 2_000, 600).await?;
        let mut node = Node::start(&scenario, "node-1", "before").await?;
        caught_up(&scenario)?;
        let uri = scenario.grpc_uri(&mut node.process)?;
        let target = admin_target(&uri);

        // Backing up the tally store backs up its three partitions and nothing else.
        let summary = kstore_cli::backup::create(&target, "tally", &[]).await?;
        let made: Vec<(String, u32)> = summary
            .answers
            .iter()
            .filter_map(|(_, answer)| answer.as_ref().ok())
            .flat_map(|answer| answer.backups.iter())
            .map(|b| (b.store.clone(), b.partition))
            .collect();
        ensure!(
            summary.missing.is_empty()
                && made
                    == (0..WORD_PARTITIONS)
                        .map(|p| ("tally".to_string(), p))
                        .collect::<Vec<_>>(),
            "backups made {made:?}, missing {:?}",
            summary.missing
        );
        let (_, features_backups) = kstore_cli::backup::list(&target, "features", &[]).await?;
        ensure!(
            features_backups.is_empty(),
            "the features store was backed up: {features_backups:?}"
        );
        let (_, listed) = kstore_cli::backup::list(&target, "", &[]).await?;
        ensure!(
            listed.len() == WORD_PARTITIONS as usize && listed.iter().all(|b| b.store == "tally"),
            "{listed:?}"
        );
        let verified = kstore_cli::backup::verify(&target, "tally", &[], 0).await?;
        ensure!(
            verified.results.len() == WORD_PARTITIONS as usize
                && verified.results.iter().all(|r| r.ok),
            "{verified:?}"
        );
        let ambiguous = kstore_cli::backup::verify(&target, "", &[0], listed[0].backup_id)
            .await
            .expect_err("a backup id without a store, on a node of two stores, was taken");
        ensure!(
            format!("{ambiguous:#}").contains("name the store"),
            "{ambiguous:#}"
        );
        let unknown = kstore_cli::backup::list(&target, "orders", &[])
            .await
            .expect_err("an unknown store was listed");
        ensure!(
            format!("{unknown:#}").contains("features, tally"),
            "{unknown:#}"
        );
        let status = node.process.terminate(Duration::from_secs(60))?;
        ensure!(status.success(), "exit after SIGTERM: {status}");
        let before_the_bug = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;

        // The wrong module runs for a while; the features store goes on as usual. The
        // wrong module dead-letters the records of keys that hold a Tally, and writes a
        // count for new keys.
        let wrong_from = inputs.words_sent;
        scenario.config_file = Some(wrong);
        inputs.send(&scenario, 1_000, 300).await?;
        let late = inputs.words_sent..inputs.words_sent + 40;
        send_keyed(&scenario, &words, "late", 5, late, &mut inputs.tallies).await?;
        inputs.words_sent += 40;
        let mut node = Node::start(&scenario, "node-1", "wrong").await?;
        caught_up(&scenario)?;
        let features_committed =
            scenario
                .kafka
                .committed_offsets(&app, &scenario.input, PARTITIONS)?;
        let status = node.process.terminate(Duration::from_secs(60))?;
        ensure!(status.success(), "exit after SIGTERM: {status}");

        // The tally store's plan: each partition back to its backup, the wrong stretch
        // reprocessed; the features store is not part of it.
        scenario.config_file = Some(good);
        let tally = scenario
            .config("node-1")?
            .store_configs()
            .into_iter()
            .find(|c| c.store == "tally")
            .context("the config has no tally store")?;
        let plans = point_in_time::plan(&tally, RestorePoint::Time(before_the_bug), &[])?;
        ensure!(plans.len() == WORD_PARTITIONS as usize, "{plans:?}");
        let reprocess: i64 = plans.iter().map(|p| p.events_to_reprocess()).sum();
        ensure!(
            reprocess == (inputs.words_sent - wrong_from) as i64,
            "{reprocess} records to reprocess, not {}",
            inputs.words_sent - wrong_from
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Err(error) = point_in_time::check_group_empty(&tally) {
            ensure!(
                Instant::now() < deadline,
                "the tally group did not empty: {error}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let scratch = scenario.dir.path().join("restore-scratch");
        let written = point_in_time::execute(&tally, &plans, &scratch, |step| eprintln!("{step}"))?;
        // One correction (a tombstone) per key the wrong module wrote: the five new keys.
        let corrections: u64 = written.iter().map(|(_, n)| n).sum();
        ensure!(corrections == 5, "{corrections} corrections written, not 5");
        // Only the tally group was rewound.
        let tally_committed =
            scenario
                .kafka
                .committed_offsets(&tally_group, &words, WORD_PARTITIONS)?;
        let rewound_to: Vec<i64> = plans.iter().map(|p| p.backup.input_next).collect();
        ensure!(
            tally_committed == rewound_to,
            "the tally group is at {tally_committed:?}, not {rewound_to:?}"
        );
        let features_now = scenario
            .kafka
            .committed_offsets(&app, &scenario.input, PARTITIONS)?;
        ensure!(
            features_now == features_committed,
            "the features group moved from {features_committed:?} to {features_now:?}"
        );

        // The right module again: it reprocesses the wrong stretch, and more input follows.
        inputs.send(&scenario, 500, 200).await?;
        let mut node = Node::start(&scenario, "node-1", "after").await?;
        caught_up(&scenario)?;
        let events: Vec<OrderEvent> = OrderGenerator::new(inputs.generator.clone())
            .take(inputs.events_sent as usize)
            .collect();
        wait_reads_exact(&mut node, &expected_features(&events), &inputs.tallies).await?;

        // The web console shows either store: its map and a lookup with the value as JSON.
        let console = scenario.metrics_address(&mut node.process)?;
        let cluster = console_json(&console, "/console/cluster.json?store=tally")?;
        ensure!(
            cluster["store"] == "tally"
                && cluster["partitions"] == WORD_PARTITIONS
                && cluster["stores"] == serde_json::json!(["features", "tally"]),
            "{cluster}"
        );
        let (key, (count, last)) = inputs.tallies.iter().next().context("no tallies")?;
        let looked_up = console_json(&console, &format!("/console/lookup?store=tally&key={key}"))?;
        let want = serde_json::json!({"count": count.to_string(), "last": last});
        ensure!(
            looked_up["answer"]["value"] == want,
            "{looked_up} (want the value {want})"
        );
        let unknown =
            kstore_testkit::process::http_get(&console, "/console/cluster.json?store=nope")
                .expect_err("the console showed a store the node does not serve");
        ensure!(format!("{unknown:#}").contains("404"), "{unknown:#}");
        let status = node.process.terminate(Duration::from_secs(60))?;
        ensure!(status.success(), "exit after SIGTERM: {status}");
        assert_exact_state(&scenario, &["node-1"], &events)?;
        Ok(())
    })
}

/// Returns `module` with a custom section appended: the same fold, another SHA-256, as a
/// rebuilt release of a module would have.
fn another_release(scenario: &Scenario, module: &std::path::Path, name: &str) -> Result<PathBuf> {
    let mut bytes = std::fs::read(module)?;
    let section_name = b"kstore-test-release";
    let payload = name.as_bytes();
    let size = 1 + section_name.len() + payload.len();
    ensure!(size < 128, "a one-byte section size");
    bytes.extend([0, size as u8, section_name.len() as u8]);
    bytes.extend(section_name);
    bytes.extend(payload);
    let path = scenario.dir.path().join(format!("{name}.wasm"));
    std::fs::write(&path, bytes)?;
    Ok(path)
}

/// The module versions (first input offset, SHA-256) of every tally copy `uri`'s node holds,
/// by partition and role, with each copy's error (a failed copy's, or why a held one waits).
async fn tally_modules(uri: &str) -> Result<Vec<(u32, i32, Vec<(i64, String)>, String)>> {
    let mut admin = kstore_proto::v1::admin_client::AdminClient::connect(uri.to_owned()).await?;
    let status = admin
        .partition_status(kstore_proto::v1::PartitionStatusRequest {
            store: "tally".into(),
        })
        .await?
        .into_inner();
    Ok(status
        .stores
        .into_iter()
        .map(|s| {
            let copy = s.copy.unwrap_or_default();
            let modules = s
                .modules
                .into_iter()
                .map(|m| (m.from_input_offset, m.sha256))
                .collect();
            (copy.partition, copy.role, modules, copy.error)
        })
        .collect())
}

/// Waits until every tally copy of `uri`'s node (one per partition) records exactly the
/// versions `want` gives for its partition.
async fn wait_tally_modules(uri: &str, want: impl Fn(u32) -> Vec<(i64, String)>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let copies = tally_modules(uri).await?;
        let agree = copies.len() == WORD_PARTITIONS as usize
            && copies.iter().all(|(p, _, modules, _)| *modules == want(*p));
        if agree {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the tally copies at {uri} record {copies:?}, not {:?}",
            (0..WORD_PARTITIONS).map(&want).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A module upgrade: the new release takes over each partition from one input offset that
/// the partition's changelog records, so the active and the standby copies agree on it; a
/// node started again with the earlier release does not fold a partition the new one folded
/// (its input waits, its copies state both versions and still answer reads) until its
/// store says `rollback = true`, and then
/// the earlier release takes over exactly where the input stood. Every key is exact
/// throughout, read through reflection.
#[test]
fn a_module_upgrade_switches_every_copy_at_one_input_offset_and_an_earlier_module_needs_a_rollback()
-> Result<()> {
    run_async(async {
        let mut scenario = Scenario::new("stores-upgrade", PARTITIONS).await?;
        let app = scenario.app.clone();
        let words = format!("{app}-words");
        let tally_group = format!("{app}-tally");
        scenario.kafka.create_topic(&words, WORD_PARTITIONS).await?;
        let first = kstore_testkit::guest::module("tally")?;
        let second = another_release(&scenario, &first, "tally-2")?;
        let sha = |path: &std::path::Path| -> Result<String> {
            Ok(kstore_server::processor::wasm::sha256_hex(&std::fs::read(
                path,
            )?))
        };
        let (v1, v2) = (sha(&first)?, sha(&second)?);
        ensure!(v1 != v2);
        let v1_config = tally_config(&scenario, "v1.toml", &first)?;
        let v2_config = tally_config(&scenario, "v2.toml", &second)?;
        let rollback_config = scenario.dir.path().join("rollback.toml");
        std::fs::write(
            &rollback_config,
            std::fs::read_to_string(&v1_config)?.replace(
                &format!(r#"wasm = "{}" }}"#, first.display()),
                &format!(r#"wasm = "{}", rollback = true }}"#, first.display()),
            ),
        )?;
        ensure!(std::fs::read_to_string(&rollback_config)?.contains("rollback = true"));
        let mut tallies = Tallies::new();
        let mut sent = 0;
        let caught_up = |scenario: &Scenario| {
            wait_group_caught_up(
                scenario,
                &tally_group,
                &words,
                WORD_PARTITIONS,
                Duration::from_secs(180),
            )
        };
        let no_features = std::collections::HashMap::new();

        // The first release on two nodes: each partition's active and standby record it
        // from offset 0.
        scenario.config_file = Some(v1_config.clone());
        send_words(&scenario, &words, sent..sent + 300, &mut tallies).await?;
        sent += 300;
        let mut nodes = vec![
            Node::start(&scenario, "node-1", "v1").await?,
            Node::start(&scenario, "node-2", "v1").await?,
        ];
        caught_up(&scenario)?;
        let mut uris = Vec::new();
        for node in &mut nodes {
            uris.push(scenario.grpc_uri(&mut node.process)?);
        }
        for uri in &uris {
            wait_tally_modules(uri, |_| vec![(0, v1.clone())]).await?;
        }
        for mut node in nodes {
            let status = node.process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "exit after SIGTERM: {status}");
        }

        // The second release, on both nodes: it takes over at the offset the input stood at.
        let upgraded_at = scenario.kafka.end_offsets(&words, WORD_PARTITIONS)?;
        scenario.config_file = Some(v2_config);
        let mut nodes = vec![
            Node::start(&scenario, "node-1", "v2").await?,
            Node::start(&scenario, "node-2", "v2").await?,
        ];
        send_words(&scenario, &words, sent..sent + 300, &mut tallies).await?;
        sent += 300;
        caught_up(&scenario)?;
        let upgraded = |p: u32| vec![(0, v1.clone()), (upgraded_at[p as usize], v2.clone())];
        let mut uris = Vec::new();
        for node in &mut nodes {
            uris.push(scenario.grpc_uri(&mut node.process)?);
        }
        for uri in &uris {
            wait_tally_modules(uri, upgraded).await?;
        }
        let roles: Vec<i32> = tally_modules(&uris[0])
            .await?
            .iter()
            .chain(tally_modules(&uris[1]).await?.iter())
            .map(|c| c.1)
            .collect();
        ensure!(
            roles.contains(&(kstore_proto::v1::Role::Active as i32))
                && roles.contains(&(kstore_proto::v1::Role::Standby as i32)),
            "the copies compared were not actives and standbys: {roles:?}"
        );
        wait_reads_exact(&mut nodes[0], &no_features, &tallies).await?;
        for mut node in nodes {
            let status = node.process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "exit after SIGTERM: {status}");
        }

        // A node not upgraded (the first release again) folds none of it: every tally
        // partition's input waits, and its copy, still active, states why and keeps
        // answering reads with what was folded before.
        let stalled_at = scenario.kafka.end_offsets(&words, WORD_PARTITIONS)?;
        let folded_before = tallies.clone();
        scenario.config_file = Some(v1_config);
        let mut node = Node::start(&scenario, "node-1", "v1-again").await?;
        let uri = scenario.grpc_uri(&mut node.process)?;
        send_words(&scenario, &words, sent..sent + 200, &mut tallies).await?;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let copies = tally_modules(&uri).await?;
            let refused = copies.iter().filter(|(_, role, _, error)| {
                *role == kstore_proto::v1::Role::Active as i32
                    && error.contains("earlier version")
                    && error.contains(&v1[..12])
                    && error.contains(&v2[..12])
            });
            // The cluster view says so too (Metadata, the console), cut to its bound.
            let metadata = node.metadata().await?;
            let viewed = metadata
                .nodes
                .iter()
                .flat_map(|n| n.copies.iter())
                .filter(|c| c.store == "tally" && c.error.contains("earlier version"))
                .count();
            if refused.count() == WORD_PARTITIONS as usize && viewed == WORD_PARTITIONS as usize {
                check_reads(&mut node, &no_features, &folded_before).await?;
                // `kstore status` shows each held copy with its module and reason.
                let nodes = kstore_cli::status::collect(&admin_target(&uri), "tally", &[]).await?;
                let rows: Vec<String> = nodes
                    .iter()
                    .flat_map(|(id, answer)| {
                        let copies = answer.clone().unwrap_or_default();
                        copies
                            .iter()
                            .map(|copy| kstore_cli::status::format_copy(id, copy))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                let held = rows
                    .iter()
                    .filter(|row| row.contains(&v2[..12]) && row.contains("earlier version"))
                    .count();
                ensure!(
                    held == WORD_PARTITIONS as usize,
                    "kstore status shows {held} held copies:\n{}",
                    rows.join("\n")
                );
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the tally copies did not all refuse the earlier module: {copies:?}; Metadata shows {viewed} of them"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let status = node.process.terminate(Duration::from_secs(60))?;
        ensure!(status.success(), "exit after SIGTERM: {status}");

        // With rollback = true it takes over again where the input stood when it was
        // refused: nothing was folded meanwhile.
        scenario.config_file = Some(rollback_config);
        let mut node = Node::start(&scenario, "node-1", "rollback").await?;
        let uri = scenario.grpc_uri(&mut node.process)?;
        caught_up(&scenario)?;
        wait_tally_modules(&uri, |p| {
            let mut versions = upgraded(p);
            versions.push((stalled_at[p as usize], v1.clone()));
            versions
        })
        .await?;
        wait_reads_exact(&mut node, &no_features, &tallies).await?;
        let status = node.process.terminate(Duration::from_secs(60))?;
        ensure!(status.success(), "exit after SIGTERM: {status}");
        // Node-1 keeps every release it ran, by SHA-256, for a rollback.
        let kept = scenario
            .state_dir("node-1")
            .join("modules")
            .join(&app)
            .join("tally");
        for (version, path) in [(&v1, &first), (&v2, &second)] {
            let copy = std::fs::read(kept.join(format!("{version}.wasm")))
                .with_context(|| format!("module {version} not kept in {}", kept.display()))?;
            ensure!(
                copy == std::fs::read(path)?,
                "module {version} kept changed"
            );
        }
        Ok(())
    })
}

/// Every live copy of the tally store that `node` knows of, with its input position, once
/// each partition's active and standby stand at `want[partition]`.
async fn wait_tally_positions(node: &mut Node, want: &[i64]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let metadata = node.metadata().await?;
        let copies: Vec<(String, u32, i32, i64)> = metadata
            .nodes
            .iter()
            .filter(|n| n.liveness() == kstore_proto::v1::Liveness::Live)
            .flat_map(|n| {
                n.copies
                    .iter()
                    .filter(|c| c.store == "tally")
                    .map(|c| (n.node_id.clone(), c.partition, c.role, c.input_offset))
            })
            .collect();
        let at = |partition: u32, role: kstore_proto::v1::Role| {
            copies
                .iter()
                .any(|c| c.1 == partition && c.2 == role as i32 && c.3 == want[partition as usize])
        };
        let settled = (0..want.len() as u32).all(|p| {
            at(p, kstore_proto::v1::Role::Active) && at(p, kstore_proto::v1::Role::Standby)
        });
        if settled {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the tally copies did not reach input positions {want:?}: {copies:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A store over two co-partitioned topics folds partition p of each into its partition p:
/// every key's count and last value are exact (records of one key arriving on both topics),
/// through kill -9 of a node while both topics flow, on actives and standbys alike; every
/// copy's input position is the sum of the two topics' next offsets, and the group commits
/// each topic's offsets. A point-in-time restore rewinds each topic to what the backups
/// reflect, and reprocessing ends exact. Topics with different partition counts stop the
/// node with a message that names them and their counts, and so does a group whose members
/// read another list.
#[test]
fn a_store_over_two_co_partitioned_topics_folds_both_exactly_and_refuses_topics_that_are_not()
-> Result<()> {
    run_async(async {
        let mut scenario = Scenario::new("stores-inputs", PARTITIONS).await?;
        let app = scenario.app.clone();
        let words = format!("{app}-words");
        let more = format!("{app}-more-words");
        let odd = format!("{app}-odd-words");
        let tally_group = format!("{app}-tally");
        let backup_dir = scenario.dir.path().join("backups");
        scenario
            .extra
            .push(format!("backup.dir={}", backup_dir.display()));
        scenario.extra.push("backup.interval-ms=0".into());
        scenario.kafka.create_topic(&words, WORD_PARTITIONS).await?;
        scenario.kafka.create_topic(&more, WORD_PARTITIONS).await?;
        scenario
            .kafka
            .create_topic(&odd, WORD_PARTITIONS + 1)
            .await?;
        let module = kstore_testkit::guest::module("tally")?;
        let one_input = std::fs::read_to_string(tally_config(&scenario, "one.toml", &module)?)?;
        let dir = scenario.dir.path().to_path_buf();
        let with_inputs = |name: &str, second: &str| -> Result<PathBuf> {
            let file = dir.join(name);
            let text = one_input.replace(
                &format!(r#"input-topic = "{words}""#),
                &format!(r#"input-topics = ["{words}", "{second}"]"#),
            );
            ensure!(text.contains("input-topics"), "{text}");
            std::fs::write(&file, text)?;
            Ok(file)
        };

        // Not co-partitioned: the node stops at start and says why.
        scenario.config_file = Some(with_inputs("odd.toml", &odd)?);
        let mut refused = scenario.start_node("node-1", "odd")?;
        let status = refused.wait_exit(Duration::from_secs(120))?;
        ensure!(!status.success(), "a node over {words} and {odd} ran");
        let want = format!(
            "store tally's input topics are not co-partitioned: {words} has \
             {WORD_PARTITIONS} partitions, {odd} has {} partitions",
            WORD_PARTITIONS + 1
        );
        ensure!(
            refused.output().contains(&want),
            "the refusal does not say {want:?}:\n{}",
            refused.tail()
        );

        scenario.config_file = Some(with_inputs("two.toml", &more)?);
        let mut nodes = vec![
            Node::start(&scenario, "node-1", "two").await?,
            Node::start(&scenario, "node-2", "two").await?,
        ];
        let caught_up = |scenario: &Scenario| -> Result<Vec<i64>> {
            let mut positions = vec![0; WORD_PARTITIONS as usize];
            for topic in [&words, &more] {
                wait_group_caught_up(
                    scenario,
                    &tally_group,
                    topic,
                    WORD_PARTITIONS,
                    Duration::from_secs(180),
                )?;
                let end = scenario.kafka.end_offsets(topic, WORD_PARTITIONS)?;
                for (position, end) in positions.iter_mut().zip(end) {
                    *position += end;
                }
            }
            Ok(positions)
        };
        let no_features = std::collections::HashMap::new();
        let mut tallies = Tallies::new();

        // The same keys on both topics, one topic after the other (records of two topics
        // fold in the order they arrive, so each phase waits for the one before).
        send_words(&scenario, &words, 0..300, &mut tallies).await?;
        caught_up(&scenario)?;
        send_words(&scenario, &more, 300..500, &mut tallies).await?;
        let positions = caught_up(&scenario)?;
        wait_reads_exact(&mut nodes[0], &no_features, &tallies).await?;
        wait_tally_positions(&mut nodes[0], &positions).await?;
        let metadata = nodes[0].metadata().await?;
        let info = metadata
            .stores
            .iter()
            .find(|s| s.name == "tally")
            .context("no tally store in Metadata")?;
        ensure!(
            info.input_topics == [words.clone(), more.clone()] && info.input_topic == words,
            "Metadata states the inputs {:?} (first {})",
            info.input_topics,
            info.input_topic
        );

        // Both topics flowing (each with keys of its own, so every key's last value is
        // known) while node-2 is killed and started again.
        let send_both = |from: u64, to: u64| {
            let scenario = &scenario;
            let (words, more) = (words.clone(), more.clone());
            async move {
                let mut sent = Tallies::new();
                for start in (from..to).step_by(50) {
                    let end = (start + 50).min(to);
                    send_words(scenario, &words, start..end, &mut sent).await?;
                    send_keyed(scenario, &more, "more", 11, start..end, &mut sent).await?;
                }
                Ok::<_, anyhow::Error>(sent)
            }
        };
        let sending = send_both(500, 1100);
        let killing = async {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let mut node = nodes.pop().context("node-2")?;
            node.process.kill9()?;
            Node::start(&scenario, "node-2", "after-kill").await
        };
        let (sent, restarted) = tokio::join!(sending, killing);
        nodes.push(restarted?);
        for (key, (count, last)) in sent? {
            let entry = tallies.entry(key).or_default();
            *entry = (entry.0 + count, last);
        }
        let positions = caught_up(&scenario)?;
        for node in &mut nodes {
            wait_reads_exact(node, &no_features, &tallies).await?;
        }
        wait_tally_positions(&mut nodes[0], &positions).await?;

        // Backed up now, every copy at the topics' ends; more input follows; then restored
        // to the backups: the group is rewound on each topic to the offsets the backups
        // reflect, and reprocessing gives the same state.
        let uri = scenario.grpc_uri(&mut nodes[0].process)?;
        let summary = kstore_cli::backup::create(&admin_target(&uri), "tally", &[]).await?;
        ensure!(summary.missing.is_empty(), "{:?}", summary.missing);
        let backed_up_at = (
            scenario.kafka.end_offsets(&words, WORD_PARTITIONS)?,
            scenario.kafka.end_offsets(&more, WORD_PARTITIONS)?,
        );
        let restore_to = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        for (key, (count, last)) in send_both(1100, 1400).await? {
            let entry = tallies.entry(key).or_default();
            *entry = (entry.0 + count, last);
        }
        caught_up(&scenario)?;
        for mut node in nodes {
            let status = node.process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "exit after SIGTERM: {status}");
        }
        let tally = scenario
            .config("node-1")?
            .store_configs()
            .into_iter()
            .find(|c| c.store == "tally")
            .context("the config has no tally store")?;
        let plans = point_in_time::plan(&tally, RestorePoint::Time(restore_to), &[])?;
        for plan in &plans {
            let p = plan.partition as usize;
            let want = [
                (words.as_str(), backed_up_at.0[p]),
                (more.as_str(), backed_up_at.1[p]),
            ];
            ensure!(
                plan.inputs.iter().collect::<BTreeMap<_, _>>() == BTreeMap::from(want)
                    && plan.backup.input_next == want[0].1 + want[1].1,
                "partition {p}'s backup reflects {:?} (position {}), not {want:?}",
                plan.inputs,
                plan.backup.input_next
            );
        }
        let reprocess: i64 = plans.iter().map(|p| p.events_to_reprocess()).sum();
        ensure!(
            reprocess == 600,
            "{reprocess} records to reprocess, not 600"
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Err(error) = point_in_time::check_group_empty(&tally) {
            ensure!(
                Instant::now() < deadline,
                "the tally group did not empty: {error}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let scratch = scenario.dir.path().join("restore-scratch");
        point_in_time::execute(&tally, &plans, &scratch, |step| eprintln!("{step}"))?;
        for (topic, at) in [(&words, &backed_up_at.0), (&more, &backed_up_at.1)] {
            let committed =
                scenario
                    .kafka
                    .committed_offsets(&tally_group, topic, WORD_PARTITIONS)?;
            ensure!(
                committed == *at,
                "the group is at {committed:?} of {topic}, not {at:?}"
            );
        }
        let mut nodes = vec![
            Node::start(&scenario, "node-1", "restored").await?,
            Node::start(&scenario, "node-2", "restored").await?,
        ];
        let positions = caught_up(&scenario)?;
        for node in &mut nodes {
            wait_reads_exact(node, &no_features, &tallies).await?;
        }
        wait_tally_positions(&mut nodes[0], &positions).await?;
        for mut node in nodes {
            let status = node.process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "exit after SIGTERM: {status}");
        }

        // A node whose list differs from the running members' (a change rolled out one
        // node at a time) refuses to start, naming them: members with different lists could
        // each fold partition p of their own topics, two actives of one partition.
        scenario.config_file = Some(dir.join("two.toml"));
        let mut node_1 = Node::start(&scenario, "node-1", "two-lists").await?;
        let deadline = Instant::now() + Duration::from_secs(90);
        while Layout::of_store(&node_1.metadata().await?, "tally")
            .actives
            .len()
            < WORD_PARTITIONS as usize
        {
            ensure!(Instant::now() < deadline, "node-1 took no partitions");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        scenario.config_file = Some(dir.join("one.toml"));
        let mut refused = scenario.start_node("node-2", "one-list")?;
        let status = refused.wait_exit(Duration::from_secs(120))?;
        ensure!(!status.success(), "node-2 ran with another list");
        let want = format!("store tally: members of group {tally_group} read other input topics");
        ensure!(
            refused.output().contains(&want) && refused.output().contains(&more),
            "the refusal does not say {want:?}:\n{}",
            refused.tail()
        );
        let status = node_1.process.terminate(Duration::from_secs(60))?;
        ensure!(status.success(), "exit after SIGTERM: {status}");
        Ok(())
    })
}
