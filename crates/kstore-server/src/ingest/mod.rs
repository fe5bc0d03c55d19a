//! Ingest: the consumer-group loop that folds input records into the stores, exactly once.
//!
//! One thread polls the group consumer. Each record is checked (key present and on Kafka's
//! partition for it, sizes within limits), folded by the processor against the key's
//! current value (pending updates of the open transaction first, then the store), and its
//! effects are produced inside the node's Kafka transaction: the changelog record (with the
//! input offset in a header), output records and dead letters. The transaction then commits
//! together with the input offsets (exactly-once v2). Only after the commit do the updates
//! reach RocksDB, so a read never sees state that could still roll back.
//!
//! Partitions the group assigns are paused until their copy is prepared (opened, checked,
//! bootstrapped from a peer or a backup if it is new here) and the state updater has
//! replayed their changelog tail, all off this thread, so neither a long restore nor a
//! large snapshot can exceed `max.poll.interval.ms` or stall the other partitions. A
//! partition this node held as a standby replays only the tail the standby had not applied
//! yet. A revoked partition's copy stays open as a standby. A partition whose copy fails
//! (its store, or a processor that cannot run) is paused and its copy retried; the others
//! keep flowing. Only node-wide failures end ingest: this node's transactional id fenced,
//! Kafka failing a commit for longer than the poll interval allows, the state directory
//! gone.
//!
//! - [`fold`]: the pure fold step of one record;
//! - [`engine`]: the transaction engine and the rebalance callbacks;
//! - [`delivery`]: the producer's delivery reports.

mod delivery;
mod engine;
pub(crate) mod fold;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kstore_proto::v1::NodeStatus;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer};

use crate::config::{NodeConfig, ProcessingGuarantee};
use crate::kafka::{client_config, group_consumer_config, group_generation, set_default};
use crate::probes::Pulse;
use crate::processor::Processor;
use crate::standby::{Copies, CopyEvent};
use delivery::{DeliveryTracker, lock};
use engine::{Engine, IngestContext, KAFKA_TIMEOUT, kafka};

const POLL_TIMEOUT: Duration = Duration::from_millis(50);
/// The most records one round of the ingest loop takes from the consumer (those fetched
/// already; it waits only for the first).
const MAX_POLLED_RECORDS: usize = 256;
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How long a member stays in the group with no partition before it counts as started.
const EMPTY_ASSIGNMENT_GRACE: Duration = Duration::from_secs(3);
/// Room for a record's headers and framing inside `message.max.bytes`.
const RECORD_OVERHEAD_BYTES: usize = 4096;

/// Why ingest stopped: only what is node-wide. A failure confined to one partition fails
/// that partition's copy instead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// Kafka failed in a way the node cannot recover from by itself (for example, another
    /// process with the same node id fenced this one).
    #[error("kafka error during {during}: {source}")]
    Kafka {
        /// What the node was doing.
        during: &'static str,
        /// Kafka's error.
        source: KafkaError,
    },
    /// Committing kept failing with errors Kafka calls retriable for longer than a commit
    /// may take.
    #[error(
        "{during} kept failing for {budget:?} (three quarters of max.poll.interval.ms): \
         {source}; the node stops rather than be dropped from the group mid-transaction"
    )]
    CommitTimedOut {
        /// What the node was doing.
        during: &'static str,
        /// How long it tried.
        budget: Duration,
        /// Kafka's last error.
        source: KafkaError,
    },
    /// Something the whole node depends on failed (its state directory is gone).
    #[error("{0}")]
    Node(String),
}

/// Counters of what ingest did, for logs and metrics.
#[derive(Debug, Default)]
pub struct IngestMetrics {
    /// Input records read.
    pub records_in: AtomicU64,
    /// Input records the processor folded into state.
    pub records_processed: AtomicU64,
    /// Input records sent to the dead-letter topic.
    pub dead_letters: AtomicU64,
    /// Input records whose key hashes to another partition than the one they came on.
    pub partition_mismatches: AtomicU64,
    /// Transactions (or at-least-once commits) that succeeded.
    pub commits: AtomicU64,
    /// Transactions aborted, whose records are read again.
    pub aborts: AtomicU64,
    /// Records the consumer handed over again although they were folded already (skipped).
    pub redelivered: AtomicU64,
    /// Records the consumer handed over, when a copy turned active, below what its store
    /// already reflected (skipped): an exactly-once invariant violation.
    pub violations: AtomicU64,
}

impl IngestMetrics {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Runs ingest on the calling thread until `shutdown` is set, then commits what is open and
/// leaves the partitions (their copies stay open as standbys until the node exits), and
/// returns the partitions it owned. `events` tells it of its partitions' restored and
/// failed copies; `pulse` says it comes around.
// The node wires each of these separately; a struct for them would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn run(
    config: Arc<NodeConfig>,
    partitions: u32,
    processor: Box<dyn Processor>,
    copies: Arc<Copies>,
    events: Receiver<CopyEvent>,
    metrics: Arc<IngestMetrics>,
    shutdown: Arc<AtomicBool>,
    pulse: Arc<Pulse>,
) -> Result<Vec<i32>, IngestError> {
    crate::kafka::lower_priority(config.ingest_niceness);
    let client = client_config(&config);
    let max_record_bytes = config
        .kafka
        .get("message.max.bytes")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1_000_000)
        .saturating_sub(RECORD_OVERHEAD_BYTES);
    let limits = fold::Limits {
        partitions,
        max_key_bytes: config.max_key_bytes,
        max_value_bytes: config.max_value_bytes,
        max_record_bytes,
        partition_mismatch: config.partition_mismatch,
    };

    let mut producer_config = client;
    producer_config
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random");
    set_default(&mut producer_config, "linger.ms", "5");
    if config.processing_guarantee == ProcessingGuarantee::ExactlyOnce {
        producer_config.set(
            "transactional.id",
            format!("{}-{}", config.group_id(), config.node_id),
        );
        // A transaction lasts about commit-interval-ms. If this node dies with one open, the
        // broker aborts it after this timeout, and the partition's next owner waits for that
        // before its restore ends: 10 s rather than librdkafka's 60 s.
        set_default(&mut producer_config, "transaction.timeout.ms", "10000");
    }
    let producer: BaseProducer<DeliveryTracker> = producer_config
        .create_with_context(DeliveryTracker::new(config.changelog_topic()))
        .map_err(kafka("creating the producer"))?;
    if config.processing_guarantee == ProcessingGuarantee::ExactlyOnce {
        // Fences any earlier incarnation of this node and aborts its open transaction.
        producer
            .init_transactions(KAFKA_TIMEOUT)
            .map_err(kafka("initializing transactions"))?;
    }

    let registry = copies.registry().clone();
    let engine = Arc::new(Mutex::new(Engine::new(
        config.clone(),
        limits,
        processor,
        producer,
        copies,
        events,
        metrics.clone(),
    )));

    let consumer_config = group_consumer_config(&config);
    let consumer: BaseConsumer<IngestContext> = consumer_config
        .create_with_context(IngestContext {
            engine: engine.clone(),
            pulse: pulse.clone(),
        })
        .map_err(kafka("creating the group consumer"))?;
    consumer
        .subscribe(
            &config
                .inputs()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .map_err(kafka("subscribing"))?;
    tracing::info!(
        inputs = %config.inputs().join(", "),
        partitions,
        guarantee = ?config.processing_guarantee,
        "ingest started"
    );

    let result = poll_loop(&consumer, &engine, &registry, &metrics, &shutdown, &pulse);
    pulse.stop();
    let owned = lock(&engine).owned();
    let finished = match result {
        Ok(()) => lock(&engine).finish(&consumer),
        Err(error) => {
            // Closing the consumer revokes its partitions, and a revoke commits what is
            // open: abort first, so that nothing from before the failure commits.
            lock(&engine).abort(&consumer, false);
            Err(error)
        }
    };
    // Closing the consumer runs the revoke callback (nothing left to commit by then).
    drop(consumer);
    lock(&engine).close();
    log_progress(&metrics);
    finished.map(|()| owned)
}

fn poll_loop(
    consumer: &BaseConsumer<IngestContext>,
    engine: &Mutex<Engine>,
    registry: &crate::registry::Registry,
    metrics: &IngestMetrics,
    shutdown: &AtomicBool,
    pulse: &Pulse,
) -> Result<(), IngestError> {
    let mut last_log = Instant::now();
    // Since when the member has been in the group with no partition, before it is started.
    let mut empty_since: Option<Instant> = None;
    while !shutdown.load(Ordering::Relaxed) {
        pulse.beat();
        // What became of the copies is acted on before polling, never between a poll and
        // the handling of the record it returned: a copy that failed aborts the open
        // transaction and rewinds its partitions, and a record polled before that rewind
        // would be folded past it, moving the redelivery guard beyond the rewound records,
        // which would then be skipped as folded already and lost.
        {
            let mut engine = lock(engine);
            engine.start_round();
            engine.follow_copies(consumer)?;
        }
        // Rebalance callbacks run inside poll and lock the engine: never poll holding it.
        // The records already fetched come along (up to MAX_POLLED_RECORDS), so that the
        // processor sees runs of them.
        let mut messages = Vec::new();
        let mut error = None;
        let mut wait = POLL_TIMEOUT;
        while messages.len() < MAX_POLLED_RECORDS {
            if !messages.is_empty() {
                // A rebalance inside this poll may rewind a partition: the records of it
                // polled so far are then stale.
                lock(engine).set_poll_mark(messages.len());
            }
            match consumer.poll(wait) {
                Some(Ok(message)) => messages.push(message),
                Some(Err(polled)) => {
                    error = Some(polled);
                    break;
                }
                None => break,
            }
            wait = Duration::ZERO;
        }
        let mut engine = lock(engine);
        if let Some(error) = engine.fatal.take() {
            return Err(error);
        }
        if let Some(reason) = registry.fatal() {
            return Err(IngestError::Node(reason));
        }
        engine.handle_batch(&messages, consumer)?;
        drop(messages);
        if let Some(error) = error {
            // A fatal error (another process took this node's group.instance.id) stops the
            // consumer for good: ingest ends rather than sit out of the group.
            if let Some((code, reason)) = consumer.client().fatal_error() {
                tracing::error!(%code, reason, "fatal consumer error; ingest stops");
                return Err(IngestError::Kafka {
                    during: "consuming",
                    source: KafkaError::MessageConsumptionFatal(code),
                });
            }
            tracing::warn!(%error, "consumer error");
        }
        if engine.txn_due() {
            engine.commit(consumer)?;
        }
        engine.producer.poll(Duration::ZERO);
        if let Some(error) = engine.fatal.take() {
            return Err(error);
        }
        if registry.status() == NodeStatus::Starting {
            // A member assigned nothing (more members than partitions) has opened all it
            // will once that has held a while: a cooperative rebalance often hands a joining
            // member nothing first, and its partitions a moment later.
            let empty = engine.owned().is_empty() && group_generation(consumer) > 0;
            empty_since = empty.then(|| empty_since.unwrap_or_else(Instant::now));
            if empty_since.is_some_and(|since| since.elapsed() >= EMPTY_ASSIGNMENT_GRACE) {
                tracing::info!("no partition assigned; serving reads by forwarding them");
                registry.mark_ready();
            }
        }
        drop(engine);
        if last_log.elapsed() >= PROGRESS_LOG_INTERVAL {
            log_progress(metrics);
            last_log = Instant::now();
        }
    }
    tracing::info!("shutting down: committing the open transaction");
    Ok(())
}

fn log_progress(metrics: &IngestMetrics) {
    let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    tracing::info!(
        records_in = get(&metrics.records_in),
        processed = get(&metrics.records_processed),
        dead_letters = get(&metrics.dead_letters),
        partition_mismatches = get(&metrics.partition_mismatches),
        commits = get(&metrics.commits),
        aborts = get(&metrics.aborts),
        redelivered = get(&metrics.redelivered),
        violations = get(&metrics.violations),
        "ingest progress"
    );
}
