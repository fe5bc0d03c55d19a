//! Several stores in one cluster: the built-in features store and a store of a WebAssembly
//! module (`kstore-guest`'s `tally` example, its values a protobuf message of its own) fed
//! from a topic of its own, on three nodes of one gossip cluster. Each store has its own
//! actives and standbys; both stay exact through kill -9 of a node and a rolling restart
//! with both inputs flowing, and through every node each store's values read exactly what
//! its input says; an unknown store is refused naming the stores served.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kstore_cli::generator::{GeneratorConfig, OrderGenerator};
use kstore_core::orders::OrderEvent;
use kstore_proto::v1::{CustomerFeatures, ErrorReason, GetRequest, get_response};
use prost::Message as _;
use rdkafka::producer::FutureRecord;
use tonic_types::StatusExt;

use common::{Layout, Node, Scenario, assert_exact_state, expected_features, run_async};

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
    let producer = scenario.kafka.producer()?;
    for i in range {
        let key = format!("word-{:02}", i % 23);
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
        let set = kstore_testkit::guest::tally_descriptor_set(scenario.dir.path())?;
        let module = kstore_testkit::guest::module("tally")?;
        let tally_group = format!("{app}-tally");
        let file = scenario.dir.path().join("stores.toml");
        std::fs::write(
            &file,
            format!(
                r#"
[[stores]]
name = "tally"
input-topic = "{words}"
processor = {{ wasm = "{module}" }}
value-type = {{ descriptor-set = "{set}", message = "acme.v1.Tally" }}
changelog-topic = "{app}-tally-changelog"
dead-letter-topic = "{app}-tally-dlq"
group-id = "{tally_group}"
"#,
                module = module.display(),
                set = set.display(),
            ),
        )?;
        scenario.config_file = Some(file);

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
