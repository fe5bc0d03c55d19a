//! What the node's integration tests share: a scenario (topics, state directories, node
//! processes) and the expected state recomputed from the generated events.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kstore_cli::generator::GeneratorConfig;
use kstore_cli::produce::{ProduceOptions, produce};
use kstore_core::orders::OrderEvent;
use kstore_core::partitioner::partition_for_key;
use kstore_proto::v1::CustomerFeatures;
use kstore_proto::v1::query_client::QueryClient;
use kstore_proto::v1::{Liveness, MetadataRequest, MetadataResponse, Role};
use kstore_server::config::NodeConfig;
use kstore_server::processor::features::fold;
use kstore_server::store::{PartitionStore, SharedMemory};
use kstore_testkit::TestKafka;
use kstore_testkit::process::{TestProcess, wait_until};
use prost::Message as _;
use tonic::transport::Channel;

/// One test's topics, state directory and node settings.
pub struct Scenario {
    pub kafka: &'static TestKafka,
    pub app: String,
    pub input: String,
    pub partitions: u32,
    pub dir: tempfile::TempDir,
    pub extra: Vec<String>,
    /// A config file every node loads before the `--set` keys (for what keys cannot say,
    /// such as a list of further stores).
    pub config_file: Option<PathBuf>,
    /// The log of each node's latest run, by node id: where its gossip address is found.
    logs: Mutex<BTreeMap<String, PathBuf>>,
}

impl Drop for Scenario {
    /// Deletes the scenario's topics (input, changelog, dead letters, alerts) and its group.
    fn drop(&mut self) {
        let prefix = format!("{}-", self.app);
        if let Err(error) = self
            .kafka
            .delete_topics_with_prefix(&prefix, Some(&self.app))
        {
            eprintln!("could not delete the topics of {}: {error:#}", self.app);
        }
    }
}

impl Scenario {
    pub async fn new(name: &str, partitions: u32) -> Result<Self> {
        Self::on(kstore_testkit::kafka(), name, partitions).await
    }

    /// A scenario on another broker than the shared one (a secured broker of a test's own).
    pub async fn on(kafka: &'static TestKafka, name: &str, partitions: u32) -> Result<Self> {
        let app = kafka.unique_name(name);
        let input = format!("{app}-orders");
        kafka.create_topic(&input, partitions).await?;
        Ok(Scenario {
            kafka,
            app,
            input,
            partitions,
            dir: tempfile::tempdir()?,
            extra: Vec::new(),
            config_file: None,
            logs: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn args(&self, node_id: &str) -> Vec<String> {
        let mut args = vec![
            format!("node-id={node_id}"),
            format!("app-id={}", self.app),
            format!("input-topic={}", self.input),
            format!("state-dir={}", self.state_dir(node_id).display()),
            format!("kafka.bootstrap.servers={}", self.kafka.bootstrap()),
            // A killed static member's partitions wait for its session to time out, unless
            // it comes back with the same id first (which is what the tests do).
            "kafka.session.timeout.ms=10000".into(),
            // Tests run side by side: ephemeral gRPC and gossip ports, no metrics port unless
            // asked, and a cluster of their own.
            "grpc-address=127.0.0.1:0".into(),
            "metrics-address=".into(),
            "gossip-address=127.0.0.1:0".into(),
            format!("cluster-id={}", self.app),
            format!("seeds={}", self.seeds(node_id).join(",")),
        ];
        args.extend(self.extra.iter().cloned());
        let file = self
            .config_file
            .iter()
            .flat_map(|file| ["--config".to_owned(), file.display().to_string()]);
        file.chain(args.into_iter().flat_map(|a| ["--set".to_owned(), a]))
            .collect()
    }

    pub fn state_dir(&self, node_id: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("state-{node_id}"))
    }

    /// Starts a node. It joins the gossip of the nodes started before it that have logged
    /// their gossip address by now (see [`Scenario::wait_gossiping`]).
    pub fn start_node(&self, node_id: &str, run: &str) -> Result<TestProcess> {
        let log = self.dir.path().join(format!("{node_id}-{run}.log"));
        let node = TestProcess::start(
            node_id,
            Path::new(env!("CARGO_BIN_EXE_kstore-node")),
            &self.args(node_id),
            &log,
        )?;
        self.logs.lock().unwrap().insert(node_id.to_owned(), log);
        Ok(node)
    }

    /// The gossip addresses that the other nodes' latest runs logged.
    fn seeds(&self, node_id: &str) -> Vec<String> {
        let logs = self.logs.lock().unwrap();
        logs.iter()
            .filter(|(id, _)| id.as_str() != node_id)
            .filter_map(|(_, log)| {
                let output = std::fs::read_to_string(log).ok()?;
                let line = output.lines().rfind(|l| l.contains("gossiping"))?;
                let address = line.split("address=").nth(1)?.split_whitespace().next()?;
                Some(address.to_owned())
            })
            .collect()
    }

    /// Waits for the node to log its gossip address, so that nodes started after it join
    /// through it, and returns the address.
    pub fn wait_gossiping(&self, node: &mut TestProcess) -> Result<String> {
        node.logged_address("gossiping", Duration::from_secs(120))
    }

    pub fn config(&self, node_id: &str) -> Result<NodeConfig> {
        let overrides: Vec<String> = self
            .args(node_id)
            .chunks(2)
            .filter(|pair| pair[0] == "--set")
            .map(|pair| pair[1].clone())
            .collect();
        Ok(NodeConfig::load(
            self.config_file.as_deref(),
            [],
            &overrides,
        )?)
    }

    pub fn produce(&self, generator: &GeneratorConfig, count: u64) -> Result<()> {
        self.produce_from(generator, 0, count)
    }

    /// Sends the generator's events `skip..skip + count`.
    pub fn produce_from(&self, generator: &GeneratorConfig, skip: u64, count: u64) -> Result<()> {
        let summary = produce(&ProduceOptions {
            bootstrap: self.kafka.bootstrap().into(),
            topic: self.input.clone(),
            count,
            skip,
            rate: 0,
            generator: generator.clone(),
            kafka: Vec::new(),
        })?;
        ensure!(
            summary.delivered == count,
            "delivered {} of {count}",
            summary.delivered
        );
        Ok(())
    }

    /// Waits until the node's group has committed every input record.
    pub fn wait_caught_up(&self, node: &mut TestProcess, timeout: Duration) -> Result<()> {
        self.wait_committed(timeout, || match node.try_exit()? {
            Some(status) => bail!("the node exited with {status}:\n{}", node.tail()),
            None => Ok(()),
        })
    }

    /// Waits until the group has committed every input record, calling `check` in between.
    pub fn wait_committed(
        &self,
        timeout: Duration,
        mut check: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        let end = self.kafka.end_offsets(&self.input, self.partitions)?;
        wait_until(timeout, "the group to commit every input record", || {
            check()?;
            let committed =
                self.kafka
                    .committed_offsets(&self.app, &self.input, self.partitions)?;
            // A partition that never had a record has nothing to commit.
            Ok(committed.iter().zip(&end).all(|(c, e)| c >= e || *e == 0))
        })
    }

    /// Waits for the node to log its gRPC address and returns it as a URI.
    pub fn grpc_uri(&self, node: &mut TestProcess) -> Result<String> {
        let address = node.logged_address("serving gRPC", Duration::from_secs(120))?;
        Ok(format!("http://{address}"))
    }

    /// Waits for the node to log its metrics address (it may have chosen the port).
    pub fn metrics_address(&self, node: &mut TestProcess) -> Result<String> {
        node.logged_address("serving Prometheus metrics", Duration::from_secs(120))
    }

    /// Returns the committed share of the input, 0.0 to 1.0.
    pub fn progress(&self, total: u64) -> Result<f64> {
        let committed = self
            .kafka
            .committed_offsets(&self.app, &self.input, self.partitions)?;
        Ok(committed.iter().map(|&c| c.max(0) as f64).sum::<f64>() / total as f64)
    }

    /// Reads the stores of stopped nodes: partition → key → value. Where several nodes
    /// hold a partition, the copy that reflects the most input is the owner's.
    /// Each partition's newest copy must reflect the whole input.
    pub fn read_stores(
        &self,
        node_ids: &[&str],
    ) -> Result<BTreeMap<i32, BTreeMap<String, CustomerFeatures>>> {
        let end = self.kafka.end_offsets(&self.input, self.partitions)?;
        self.read_stores_at(node_ids, &end)
    }

    /// Like [`Scenario::read_stores`], where each partition's newest copy must reflect the
    /// input up to `positions[partition]` (a next offset).
    pub fn read_stores_at(
        &self,
        node_ids: &[&str],
        positions: &[i64],
    ) -> Result<BTreeMap<i32, BTreeMap<String, CustomerFeatures>>> {
        let end = positions;
        let mut stores = BTreeMap::new();
        for partition in 0..self.partitions as i32 {
            let mut newest: Option<(i64, BTreeMap<String, CustomerFeatures>)> = None;
            for node_id in node_ids {
                let config = self.config(node_id)?;
                let dir = config.store_dir(partition);
                if !dir.exists() {
                    continue;
                }
                let store = PartitionStore::open(&dir, &SharedMemory::new(&config.memory))?;
                let position = store.position()?;
                if newest
                    .as_ref()
                    .is_some_and(|(input_next, _)| *input_next >= position.input_next)
                {
                    continue;
                }
                let mut values = BTreeMap::new();
                for (key, value) in store.scan()? {
                    values.insert(
                        String::from_utf8(key)?,
                        CustomerFeatures::decode(value.as_slice())?,
                    );
                }
                newest = Some((position.input_next, values));
            }
            let (input_next, values) = newest.unwrap_or_default();
            let end = end[partition as usize];
            ensure!(
                input_next == end,
                "partition {partition}'s newest store reflects input up to {input_next}, not {end}"
            );
            stores.insert(partition, values);
        }
        Ok(stores)
    }
}

pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 24 * HOUR_MS;

/// Recomputes the headline features of one customer straight from its events, without the
/// fold, so that the fold itself is checked too.
pub fn check_against_events(features: &CustomerFeatures, events: &[&OrderEvent]) -> Result<()> {
    let last = events
        .iter()
        .map(|e| e.event_time_ms)
        .max()
        .context("no events")?;
    let first = events
        .iter()
        .map(|e| e.event_time_ms)
        .min()
        .context("no events")?;
    let hour = |t: i64| t.div_euclid(HOUR_MS);
    let minute = |t: i64| t.div_euclid(60_000);
    let in_1h = |e: &&&OrderEvent| minute(e.event_time_ms) > minute(last) - 60;
    let in_24h = |e: &&&OrderEvent| hour(e.event_time_ms) > hour(last) - 24;
    let in_7d = |e: &&&OrderEvent| hour(e.event_time_ms) > hour(last) - 168;
    let distinct = |filter: &dyn Fn(&&&OrderEvent) -> bool, field: fn(&OrderEvent) -> &str| {
        let mut values: Vec<&str> = events.iter().filter(filter).map(|e| field(e)).collect();
        values.sort_unstable();
        values.dedup();
        values.len() as u32
    };
    let within = |horizon: i64| move |e: &&&OrderEvent| e.event_time_ms > last - horizon;
    let free_24h = |e: &&&OrderEvent| e.free_delivery && e.event_time_ms > last - DAY_MS;

    ensure!(features.orders_total == events.len() as u64, "orders_total");
    ensure!(
        features.amount_total_cents == events.iter().map(|e| e.amount_cents).sum::<i64>(),
        "amount"
    );
    ensure!(
        features.first_seen_ms == first && features.last_seen_ms == last,
        "first/last seen"
    );
    let window = |f: &dyn Fn(&&&OrderEvent) -> bool| {
        let orders = events.iter().filter(f).count() as u64;
        let amount = events.iter().filter(f).map(|e| e.amount_cents).sum::<i64>();
        (orders, amount)
    };
    let stored = |w: &Option<kstore_proto::v1::WindowTotals>| {
        w.as_ref()
            .map(|w| (w.orders, w.amount_cents))
            .unwrap_or_default()
    };
    ensure!(stored(&features.last_1h) == window(&in_1h), "last_1h");
    ensure!(stored(&features.last_24h) == window(&in_24h), "last_24h");
    ensure!(stored(&features.last_7d) == window(&in_7d), "last_7d");
    ensure!(
        features.distinct_addresses_24h == distinct(&within(DAY_MS), |e| &e.delivery_address),
        "addr 24h"
    );
    ensure!(
        features.distinct_addresses_30d == distinct(&within(30 * DAY_MS), |e| &e.delivery_address),
        "addr 30d"
    );
    ensure!(
        features.distinct_instruments_30d
            == distinct(&within(30 * DAY_MS), |e| &e.payment_instrument),
        "instruments 30d"
    );
    ensure!(
        features.free_delivery_orders_24h
            == events
                .iter()
                .filter(in_24h)
                .filter(|e| e.free_delivery)
                .count() as u64,
        "free delivery orders 24h"
    );
    let free_addresses = distinct(&free_24h, |e| &e.delivery_address);
    ensure!(
        features.free_delivery_addresses_24h == free_addresses,
        "free delivery addresses 24h"
    );
    ensure!(
        features.subscription_abuse == (free_addresses > 3),
        "abuse flag"
    );
    Ok(())
}

/// Checks every customer's stored state against the events, and that each key sits in its
/// partition's store.
pub fn assert_exact_state(
    scenario: &Scenario,
    nodes: &[&str],
    events: &[OrderEvent],
) -> Result<()> {
    let end = scenario
        .kafka
        .end_offsets(&scenario.input, scenario.partitions)?;
    assert_exact_state_at(scenario, nodes, events, &end)
}

/// Like [`assert_exact_state`], for stores that reflect the input up to `positions` (next
/// offsets by partition), which `events` must be exactly.
pub fn assert_exact_state_at(
    scenario: &Scenario,
    nodes: &[&str],
    events: &[OrderEvent],
    positions: &[i64],
) -> Result<()> {
    let stores = scenario.read_stores_at(nodes, positions)?;
    let expected = expected_features(events);
    let mut by_customer: HashMap<&str, Vec<&OrderEvent>> = HashMap::new();
    for event in events {
        by_customer
            .entry(&event.customer_id)
            .or_default()
            .push(event);
    }
    let mut stored_keys = 0;
    for (partition, values) in &stores {
        for (customer, features) in values {
            stored_keys += 1;
            let want = partition_for_key(customer.as_bytes(), scenario.partitions) as i32;
            ensure!(
                want == *partition,
                "{customer} is stored in partition {partition}, not {want}"
            );
            let expected = expected
                .get(customer)
                .with_context(|| format!("unexpected key {customer}"))?;
            ensure!(
                features == expected,
                "{customer}: stored {features:?}\nexpected {expected:?}"
            );
            check_against_events(features, &by_customer[customer.as_str()])
                .with_context(|| format!("{customer} differs from its events"))?;
        }
    }
    ensure!(
        stored_keys == expected.len(),
        "stored {stored_keys} customers, expected {}",
        expected.len()
    );
    Ok(())
}

/// Folds events per customer with the library's fold (what the node must have stored).
pub fn expected_features(events: &[OrderEvent]) -> HashMap<String, CustomerFeatures> {
    let mut expected: HashMap<String, CustomerFeatures> = HashMap::new();
    for event in events {
        fold(
            expected.entry(event.customer_id.clone()).or_default(),
            event,
        );
    }
    expected
}

/// Runs a test body on a fresh runtime, bounded to ten minutes.
pub fn run_async<T, F: std::future::Future<Output = Result<T>>>(future: F) -> Result<T> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async { tokio::time::timeout(Duration::from_secs(600), future).await? })
}

/// A running node and a Query client for it.
pub struct Node {
    pub id: String,
    pub process: TestProcess,
    pub client: QueryClient<Channel>,
}

impl Node {
    pub async fn start(scenario: &Scenario, id: &str, run: &str) -> Result<Node> {
        let mut process = scenario.start_node(id, run)?;
        let uri = scenario.grpc_uri(&mut process)?;
        scenario.wait_gossiping(&mut process)?;
        let client = QueryClient::connect(uri).await?;
        Ok(Node {
            id: id.to_owned(),
            process,
            client,
        })
    }

    pub async fn metadata(&mut self) -> Result<MetadataResponse> {
        if let Some(status) = self.process.try_exit()? {
            bail!("{} exited with {status}:\n{}", self.id, self.process.tail());
        }
        Ok(self.client.metadata(MetadataRequest {}).await?.into_inner())
    }
}

/// Who holds each partition, as one node's view says: the live active's node, and the live
/// standbys' nodes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Layout {
    pub partitions: u32,
    pub actives: BTreeMap<u32, Vec<String>>,
    pub standbys: BTreeMap<u32, BTreeSet<String>>,
}

impl Layout {
    /// The layout of the answering node's first store.
    pub fn of(metadata: &MetadataResponse) -> Layout {
        let first = metadata.stores.first().map(|s| s.name.clone());
        Self::of_store(metadata, &first.unwrap_or_default())
    }

    /// The layout of `store`.
    pub fn of_store(metadata: &MetadataResponse, store: &str) -> Layout {
        let mut layout = Layout {
            partitions: metadata
                .stores
                .iter()
                .find(|s| s.name == store)
                .map_or(0, |s| s.partitions),
            ..Layout::default()
        };
        for node in metadata
            .nodes
            .iter()
            .filter(|n| n.liveness() == Liveness::Live)
        {
            for copy in node.copies.iter().filter(|c| c.store == store) {
                match copy.role() {
                    Role::Active => layout
                        .actives
                        .entry(copy.partition)
                        .or_default()
                        .push(node.node_id.clone()),
                    Role::Standby => {
                        layout
                            .standbys
                            .entry(copy.partition)
                            .or_default()
                            .insert(node.node_id.clone());
                    }
                    _ => {}
                }
            }
        }
        layout
    }

    /// Whether each partition has one active and `standbys` standbys on other nodes, all on
    /// `members`.
    pub fn complete(&self, members: &[&str], standbys: usize) -> bool {
        (0..self.partitions).all(|p| {
            let Some([active]) = self.actives.get(&p).map(Vec::as_slice) else {
                return false;
            };
            let held = self.standbys.get(&p).cloned().unwrap_or_default();
            held.len() == standbys
                && !held.contains(active)
                && members.contains(&active.as_str())
                && held.iter().all(|n| members.contains(&n.as_str()))
        })
    }

    pub fn standbys_per_node(&self) -> BTreeMap<&str, usize> {
        let mut counts = BTreeMap::new();
        for node in self.standbys.values().flatten() {
            *counts.entry(node.as_str()).or_default() += 1;
        }
        counts
    }
}

/// Waits until every node in `nodes` serves the same complete layout over `members`, in
/// which every member holds a standby, and returns it.
pub async fn wait_for_agreement(
    nodes: &mut [&mut Node],
    members: &[&str],
    timeout: Duration,
) -> Result<Layout> {
    let deadline = Instant::now() + timeout;
    let mut last = Vec::new();
    loop {
        last.clear();
        for node in nodes.iter_mut() {
            last.push((node.id.clone(), Layout::of(&node.metadata().await?)));
        }
        let first = &last[0].1;
        let everyone_holds_a_standby = first.standbys_per_node().len() == members.len();
        if first.complete(members, 1)
            && everyone_holds_a_standby
            && last.iter().all(|(_, layout)| layout == first)
        {
            return Ok(first.clone());
        }
        if Instant::now() > deadline {
            bail!("the nodes did not agree on a complete layout over {members:?}: {last:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What `kstore backup` calls a node with, for the node at `uri`.
pub fn admin_target(uri: &str) -> kstore_cli::backup::AdminTarget {
    kstore_cli::backup::AdminTarget {
        seeds: vec![uri.trim_start_matches("http://").to_owned()],
        token: None,
        tls: None,
        timeout: Duration::from_secs(120),
    }
}
