//! The per-process test fixture: one shared broker, unique names, topics and clients.
//!
//! If `KSTORE_KAFKA_BOOTSTRAP` is set, tests use that broker (this is what `cargo xtask
//! test` does). Otherwise the first test of each process starts the local broker through
//! the same code as `cargo xtask kafka start`, once per machine. Each test process then
//! holds a shared lock on a lease file for its whole life, and a small supervisor next to
//! the broker stops it once no test process has held the lease for a while, so a plain
//! `cargo test` leaves no broker behind.

use std::fs::File;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};

use crate::broker::{BOOTSTRAP_ENV, Broker, DEFAULT_PORT};

/// Chooses the port of the broker that tests start when `KSTORE_KAFKA_BOOTSTRAP` is unset.
pub const PORT_ENV: &str = "KSTORE_KAFKA_PORT";

/// A broker that tests can use, with helpers that keep tests apart.
#[derive(Debug)]
pub struct TestKafka {
    bootstrap: String,
    // Held for the life of the process: while any test process holds it, the supervisor
    // keeps the broker running.
    _lease: Option<File>,
}

/// Returns the process-wide test broker, starting it on first use.
///
/// # Panics
///
/// Panics with the broker's error if no broker can be reached or started: a test without
/// its broker cannot say anything useful.
pub fn kafka() -> &'static TestKafka {
    static KAFKA: OnceLock<TestKafka> = OnceLock::new();
    KAFKA.get_or_init(|| match TestKafka::connect() {
        Ok(kafka) => kafka,
        Err(error) => panic!("no Kafka broker for tests: {error:#}"),
    })
}

impl TestKafka {
    fn connect() -> Result<Self> {
        if let Ok(bootstrap) = std::env::var(BOOTSTRAP_ENV) {
            if !crate::broker::metadata_answers(&bootstrap, Duration::from_secs(30)) {
                bail!("{BOOTSTRAP_ENV}={bootstrap} does not answer a metadata request");
            }
            return Ok(TestKafka {
                bootstrap,
                _lease: None,
            });
        }
        let port = match std::env::var(PORT_ENV) {
            Ok(port) => port
                .parse()
                .with_context(|| format!("{PORT_ENV}={port} is not a port"))?,
            Err(_) => DEFAULT_PORT,
        };
        let broker = Broker::on_port(port);
        let (_, lease) = broker.start_leased()?;
        Ok(TestKafka {
            bootstrap: broker.bootstrap(),
            _lease: Some(lease),
        })
    }

    /// Returns a handle on the broker at `bootstrap`, for tools that manage the broker
    /// themselves (such as `cargo xtask bench`).
    pub fn at(bootstrap: &str) -> Self {
        TestKafka {
            bootstrap: bootstrap.to_owned(),
            _lease: None,
        }
    }

    /// Returns the bootstrap address of the broker.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Returns a topic or group name that no other test, process or run uses.
    pub fn unique_name(&self, prefix: &str) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        format!(
            "{prefix}-{}-{}-{:x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            nanos & 0xffff_ffff
        )
    }

    /// Returns a client configuration with the bootstrap address set.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap);
        config
    }

    /// Creates a topic with `partitions` partitions (replication factor 1) and waits until
    /// every partition has a leader.
    pub async fn create_topic(&self, name: &str, partitions: u32) -> Result<()> {
        self.create_topic_with(name, partitions, &[]).await
    }

    /// Creates a topic with extra topic configs, such as `("cleanup.policy", "compact")`.
    pub async fn create_topic_with(
        &self,
        name: &str,
        partitions: u32,
        configs: &[(&str, &str)],
    ) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = self.client_config().create()?;
        let mut topic = NewTopic::new(name, partitions as i32, TopicReplication::Fixed(1));
        for (key, value) in configs {
            topic = topic.set(key, value);
        }
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for result in admin.create_topics([&topic], &options).await? {
            result.map_err(|(topic, code)| anyhow::anyhow!("creating topic {topic}: {code}"))?;
        }
        self.wait_for_leaders(name, partitions)
    }

    fn wait_for_leaders(&self, topic: &str, partitions: u32) -> Result<()> {
        let consumer: BaseConsumer = self.client_config().create()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
            let ready = metadata.topics().iter().any(|t| {
                t.name() == topic
                    && t.error().is_none()
                    && t.partitions().len() == partitions as usize
                    && t.partitions().iter().all(|p| p.leader() >= 0)
            });
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("topic {topic} has no leader for all {partitions} partitions after 30s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Deletes every topic whose name starts with `prefix`, and the consumer group named
    /// `group` if given, so that test runs do not pile up partitions on a long-lived broker.
    /// Returns how many topics it deleted. Blocking; callable from any thread, also from
    /// inside a tokio runtime (for example in a `Drop`).
    pub fn delete_topics_with_prefix(&self, prefix: &str, group: Option<&str>) -> Result<usize> {
        let consumer: BaseConsumer = self.client_config().create()?;
        let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
        let topics: Vec<String> = metadata
            .topics()
            .iter()
            .map(|t| t.name().to_owned())
            .filter(|name| name.starts_with(prefix))
            .collect();
        let admin: AdminClient<DefaultClientContext> = self.client_config().create()?;
        let group = group.map(str::to_owned);
        let deleted = topics.len();
        // A thread of its own with a small runtime: the caller may be inside a runtime.
        std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<()> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    let options =
                        AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
                    runtime.block_on(async {
                        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
                        if !names.is_empty() {
                            for result in admin.delete_topics(&names, &options).await? {
                                result.map_err(|(topic, code)| {
                                    anyhow::anyhow!("deleting topic {topic}: {code}")
                                })?;
                            }
                        }
                        if let Some(group) = &group {
                            // A group that is still in use or never existed stays; that is fine.
                            let _ = admin.delete_groups(&[group.as_str()], &options).await;
                        }
                        Ok(())
                    })
                })
                .join()
                .map_err(|_| anyhow::anyhow!("deleting topics panicked"))?
        })?;
        Ok(deleted)
    }

    /// Returns the producer configuration tests use: Java's partitioner for keyed records
    /// (`murmur2_random`; librdkafka's own default is CRC32-based), acks from all replicas.
    pub fn producer_config(&self) -> ClientConfig {
        let mut config = self.client_config();
        config
            .set("partitioner", "murmur2_random")
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5");
        config
    }

    /// Returns a producer configured by [`TestKafka::producer_config`].
    pub fn producer(&self) -> Result<FutureProducer> {
        Ok(self.producer_config().create()?)
    }

    /// Returns a consumer in `group` that reads committed records from the beginning.
    pub fn consumer(&self, group: &str) -> Result<StreamConsumer> {
        Ok(self
            .client_config()
            .set("group.id", group)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()?)
    }

    /// Returns a topic's partition count, or `None` if the topic does not exist.
    pub fn partition_count(&self, topic: &str) -> Result<Option<u32>> {
        let consumer: BaseConsumer = self.client_config().create()?;
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len() as u32))
    }

    /// Returns each partition's end offset (high watermark).
    pub fn end_offsets(&self, topic: &str, partitions: u32) -> Result<Vec<i64>> {
        let consumer: BaseConsumer = self.client_config().create()?;
        (0..partitions as i32)
            .map(|p| {
                Ok(consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(10))?
                    .1)
            })
            .collect()
    }

    /// Returns the offsets `group` has committed for each partition of `topic` (-1 for none),
    /// leaving out offsets of transactions that are still open.
    pub fn committed_offsets(&self, group: &str, topic: &str, partitions: u32) -> Result<Vec<i64>> {
        // read_uncommitted: otherwise the broker holds the answer back while a transaction
        // with offsets is open (for example, one of a node that was just killed).
        let consumer: BaseConsumer = self
            .client_config()
            .set("group.id", group)
            .set("isolation.level", "read_uncommitted")
            .create()?;
        let mut list = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            list.add_partition(topic, p);
        }
        // Right after a broker starts, the group coordinator may still be loading: retry.
        let deadline = Instant::now() + Duration::from_secs(30);
        let committed = loop {
            match consumer.committed_offsets(list.clone(), Duration::from_secs(10)) {
                Err(KafkaError::MetadataFetch(code))
                    if is_coordinator_moving(code) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                result => break result?,
            }
        };
        Ok(committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(offset) => offset,
                _ => -1,
            })
            .collect())
    }

    /// Reads every committed record of a topic, from the start to the end of each partition.
    pub fn read_all(&self, topic: &str, partitions: u32) -> Result<Vec<OwnedMessage>> {
        let mut messages = Vec::new();
        self.scan(topic, partitions, Duration::from_secs(60), |message| {
            messages.push(message.detach());
        })?;
        Ok(messages)
    }

    /// Hands every committed record of a topic to `each`, from the start to the end of each
    /// partition (as it was when the scan began), without keeping them; fails if that takes
    /// longer than `timeout`. Returns how many records it handed over.
    pub fn scan(
        &self,
        topic: &str,
        partitions: u32,
        timeout: Duration,
        mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
    ) -> Result<u64> {
        let consumer: BaseConsumer = self
            .client_config()
            .set("group.id", self.unique_name("read-all"))
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("enable.auto.commit", "false")
            .create()?;
        let mut list = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            list.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&list)?;
        let mut at_end = std::collections::HashSet::new();
        let mut count = 0;
        let deadline = Instant::now() + timeout;
        while at_end.len() < partitions as usize {
            if Instant::now() > deadline {
                bail!("reading {topic} did not reach the end of every partition in {timeout:?}");
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    each(&message);
                    count += 1;
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                }
                Some(Err(error)) => return Err(error.into()),
                None => {}
            }
        }
        Ok(count)
    }
}

/// Whether an error only means that the group coordinator is starting or moving.
fn is_coordinator_moving(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::NotCoordinator
            | RDKafkaErrorCode::CoordinatorLoadInProgress
            | RDKafkaErrorCode::CoordinatorNotAvailable
    )
}
