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
//! Partitions the group assigns are paused until the state updater has replayed their
//! changelog tail, off this thread, so a long restore cannot exceed `max.poll.interval.ms`.
//! A partition this node held as a standby replays only the tail the standby had not
//! applied yet. A revoked partition's copy stays open as a standby.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kstore_core::partitioner::partition_for_key;
use kstore_proto::v1::NodeStatus;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};

use crate::config::{MismatchPolicy, NodeConfig, ProcessingGuarantee};
use crate::probes::Pulse;
use crate::processor::{InputRecord, ProcessError, Processor, Update};
use crate::registry::Registry;
use crate::standby::Copies;
use crate::standby::updater::UpdaterEvent;
use crate::store::{PartitionStore, StoreError};

/// The header of a changelog record that holds the input offset that produced it.
pub const INPUT_OFFSET_HEADER: &str = "kstore.input-offset";
/// The header of a changelog record written by a point-in-time restore: a copy that applies
/// it reflects the input before this offset, whatever it reflected before.
pub const INPUT_REWIND_HEADER: &str = "kstore.input-rewind";
/// Dead-letter headers: why, and where the record came from.
pub const DLQ_ERROR_HEADER: &str = "kstore.error";
/// The topic the dead letter was read from.
pub const DLQ_TOPIC_HEADER: &str = "kstore.source.topic";
/// The partition the dead letter was read from.
pub const DLQ_PARTITION_HEADER: &str = "kstore.source.partition";
/// The offset the dead letter was read from.
pub const DLQ_OFFSET_HEADER: &str = "kstore.source.offset";
/// Set when the dead letter's value was cut to fit; holds the original size in bytes.
pub const DLQ_TRUNCATED_HEADER: &str = "kstore.truncated-from";

const KAFKA_TIMEOUT: Duration = Duration::from_secs(60);
const POLL_TIMEOUT: Duration = Duration::from_millis(50);
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How long a member stays in the group with no partition before it counts as started.
const EMPTY_ASSIGNMENT_GRACE: Duration = Duration::from_secs(3);
/// How long to wait after a transaction was aborted because producing failed.
const SEND_FAILURE_BACKOFF: Duration = Duration::from_millis(100);
/// Room for a record's headers and framing inside `message.max.bytes`.
const RECORD_OVERHEAD_BYTES: usize = 4096;

/// Why ingest stopped.
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
    /// A store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
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
    /// Restoring a partition failed.
    #[error("restoring partition {partition} failed: {reason}")]
    Restore {
        /// The partition.
        partition: i32,
        /// Why.
        reason: String,
    },
}

fn kafka(during: &'static str) -> impl FnOnce(KafkaError) -> IngestError {
    move |source| IngestError::Kafka { during, source }
}

/// Counters of what ingest did, for logs now and metrics later.
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
}

impl IngestMetrics {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Tracks delivery reports: the next changelog offset per partition, and failures.
struct DeliveryTracker {
    changelog_topic: String,
    changelog_next: Mutex<HashMap<i32, i64>>,
    failure: Mutex<Option<String>>,
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(message) if message.topic() == self.changelog_topic => {
                let mut next = lock(&self.changelog_next);
                let entry = next.entry(message.partition()).or_insert(0);
                *entry = (*entry).max(message.offset() + 1);
            }
            Ok(_) => {}
            Err((error, message)) => {
                let mut failure = lock(&self.failure);
                failure.get_or_insert_with(|| {
                    format!(
                        "producing to {} [{}]: {error}",
                        message.topic(),
                        message.partition()
                    )
                });
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks already ends the node.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the node does with a partition it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ownership {
    /// Its changelog tail is being replayed by restore number `generation`; its input is
    /// paused. A finished restore of an earlier generation (one cancelled by a revoke before
    /// the partition came back) must not activate it.
    Restoring { generation: u64, assigned: Instant },
    /// Its input is being folded into its store.
    Active,
}

/// The open transaction: what it changed, and which input it covers.
struct OpenTransaction {
    started: Instant,
    records: usize,
    /// Bytes of keys and values in the overlay.
    overlay_bytes: usize,
    /// Pending updates per partition; `None` deletes. Readable by the processor, invisible
    /// to everyone else until the transaction commits.
    overlay: HashMap<i32, BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
    /// The first input offset per partition, where to rewind after an abort.
    first_offset: HashMap<i32, i64>,
    /// The next input offset per partition, committed with the transaction.
    next_offset: HashMap<i32, i64>,
}

/// Everything the ingest thread and the rebalance callbacks share.
struct Engine {
    config: Arc<NodeConfig>,
    partitions: u32,
    processor: Box<dyn Processor>,
    producer: BaseProducer<DeliveryTracker>,
    /// The stores of the partitions this node owns.
    stores: HashMap<i32, Arc<PartitionStore>>,
    owned: HashMap<i32, Ownership>,
    /// Per active partition, the offset after the last record folded (or rewound to). The
    /// consumer hands records over in order unless the node seeks; a record below this was
    /// handed over again and is skipped, so that it can never be folded twice.
    next_input: HashMap<i32, i64>,
    txn: Option<OpenTransaction>,
    /// Opens, hands over and retires the node's copies.
    copies: Arc<Copies>,
    /// Restores the state updater finished (or failed).
    restored: Receiver<UpdaterEvent>,
    /// Numbers restores, so that a stale restore's result is recognised.
    restore_generation: u64,
    registry: Arc<Registry>,
    metrics: Arc<IngestMetrics>,
    max_record_bytes: usize,
    /// `<app>-dlq`, formatted once.
    dlq_topic: String,
    /// An error raised inside a rebalance callback, which cannot return one.
    fatal: Option<IngestError>,
}

/// The consumer context: rebalance callbacks commit or abort the open transaction before
/// partitions leave, and pause new partitions until they are restored.
struct IngestContext {
    engine: Arc<Mutex<Engine>>,
    /// The ingest loop's pulse: a rebalance that opens, bootstraps or hands over copies is
    /// a step known to be long, never a stall.
    pulse: Arc<Pulse>,
}

impl ClientContext for IngestContext {}

impl ConsumerContext for IngestContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(partitions) = rebalance else {
            return;
        };
        let _busy = self.pulse.busy("handing over revoked partitions");
        let mut engine = lock(&self.engine);
        let input = engine.config.input_topic.clone();
        let revoked = partitions_of(partitions, &input);
        if consumer.assignment_lost() {
            // Another member may already own these partitions: committing now could
            // overwrite its work. Abort; the new owner reads the records again.
            tracing::warn!(?revoked, "assignment lost; aborting the open transaction");
            engine.abort(consumer, false);
        } else if let Err(error) = engine.commit(consumer) {
            engine.fatal.get_or_insert(error);
        }
        for partition in &revoked {
            engine.owned.remove(partition);
            engine.next_input.remove(partition);
            engine.stores.remove(partition);
            // The copy stays open and keeps answering reads as a standby, with its
            // staleness stated, until its partition runs elsewhere.
            engine.copies.revoke(*partition);
        }
        engine
            .registry
            .set_group_generation(group_generation(consumer));
        tracing::info!(?revoked, "partitions revoked");
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                let _busy = self
                    .pulse
                    .busy("opening assigned copies (checksums, bootstrap from a peer or backup)");
                // Before the first fetch: nothing is read until the store is restored.
                if let Err(error) = consumer.pause(partitions) {
                    tracing::error!(%error, "pausing newly assigned partitions failed");
                }
                let mut engine = lock(&self.engine);
                engine
                    .registry
                    .set_group_generation(group_generation(consumer));
                let input = engine.config.input_topic.clone();
                for partition in partitions_of(partitions, &input) {
                    if let Err(error) = engine.start_restore(partition) {
                        engine.fatal.get_or_insert(error);
                    }
                    engine.registry.mark_ready();
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => tracing::error!(%error, "rebalance failed"),
        }
    }
}

fn partitions_of(list: &TopicPartitionList, topic: &str) -> Vec<i32> {
    list.elements()
        .iter()
        .filter(|e| e.topic() == topic)
        .map(|e| e.partition())
        .collect()
}

impl Engine {
    fn exactly_once(&self) -> bool {
        self.config.processing_guarantee == ProcessingGuarantee::ExactlyOnce
    }

    fn store(&self, partition: i32) -> Result<Arc<PartitionStore>, IngestError> {
        self.stores
            .get(&partition)
            .cloned()
            .ok_or_else(|| IngestError::Restore {
                partition,
                reason: "the node does not own the partition".into(),
            })
    }

    fn start_restore(&mut self, partition: i32) -> Result<(), IngestError> {
        self.restore_generation += 1;
        let generation = self.restore_generation;
        // From here: a copy new to this node is bootstrapped (peer snapshot, backup) inside
        // `assign`, and that time counts toward the partition's activation.
        let assigned = Instant::now();
        let (store, position) = self.copies.assign(partition, generation)?;
        tracing::info!(
            partition,
            changelog_offset = position.changelog_next,
            input_offset = position.input_next,
            "partition assigned; restoring its changelog tail"
        );
        self.stores.insert(partition, store);
        self.next_input.remove(&partition);
        self.owned.insert(
            partition,
            Ownership::Restoring {
                generation,
                assigned,
            },
        );
        Ok(())
    }

    /// Resumes the input of partitions whose restore finished.
    fn resume_restored(
        &mut self,
        consumer: &BaseConsumer<IngestContext>,
    ) -> Result<(), IngestError> {
        while let Ok(event) = self.restored.try_recv() {
            match event {
                UpdaterEvent::Restored {
                    partition,
                    generation,
                    records,
                    position,
                } => {
                    let Some(Ownership::Restoring {
                        generation: current,
                        assigned,
                    }) = self.owned.get(&partition).copied()
                    else {
                        continue;
                    };
                    if current != generation {
                        continue;
                    }
                    let ready_in = assigned.elapsed();
                    tracing::info!(
                        partition,
                        records,
                        changelog_offset = position.changelog_next,
                        input_offset = position.input_next,
                        ready_in_ms = ready_in.as_millis() as u64,
                        "restore finished; the partition is active"
                    );
                    metrics::histogram!(crate::metrics::ACTIVATION_TIME).record(ready_in);
                    self.owned.insert(partition, Ownership::Active);
                    self.copies.activate(partition, position);
                    let mut list = TopicPartitionList::new();
                    list.add_partition(&self.config.input_topic, partition);
                    consumer
                        .resume(&list)
                        .map_err(kafka("resuming a restored partition"))?;
                }
                UpdaterEvent::Failed { partition, reason } => {
                    return Err(IngestError::Restore { partition, reason });
                }
            }
        }
        Ok(())
    }

    fn txn_due(&self) -> bool {
        self.txn.as_ref().is_some_and(|txn| {
            txn.records >= self.config.max_transaction_records
                || txn.overlay_bytes >= self.config.max_transaction_bytes
                || txn.started.elapsed() >= Duration::from_millis(self.config.commit_interval_ms)
        })
    }

    /// Folds one input record into the open transaction.
    fn handle(
        &mut self,
        message: &BorrowedMessage<'_>,
        consumer: &BaseConsumer<IngestContext>,
    ) -> Result<(), IngestError> {
        let partition = message.partition();
        let offset = message.offset();
        if self.owned.get(&partition) != Some(&Ownership::Active) {
            // Fetched before the pause took hold: read it again once the partition is ours.
            if self.owned.contains_key(&partition) {
                consumer
                    .seek(
                        message.topic(),
                        partition,
                        Offset::Offset(offset),
                        KAFKA_TIMEOUT,
                    )
                    .map_err(kafka("rewinding a restoring partition"))?;
            }
            return Ok(());
        }
        if let Some(&next) = self.next_input.get(&partition)
            && offset < next
        {
            IngestMetrics::add(&self.metrics.redelivered, 1);
            tracing::warn!(
                partition,
                offset,
                next,
                "the consumer handed over a record already folded; skipped"
            );
            return Ok(());
        }
        self.next_input.insert(partition, offset + 1);
        IngestMetrics::add(&self.metrics.records_in, 1);
        if self.txn.is_none() {
            if self.exactly_once() {
                self.producer
                    .begin_transaction()
                    .map_err(kafka("beginning a transaction"))?;
            }
            self.txn = Some(OpenTransaction {
                started: Instant::now(),
                records: 0,
                overlay_bytes: 0,
                overlay: HashMap::new(),
                first_offset: HashMap::new(),
                next_offset: HashMap::new(),
            });
        }
        let txn = self.txn.as_mut().expect("opened above");
        txn.records += 1;
        txn.first_offset.entry(partition).or_insert(offset);
        txn.next_offset.insert(partition, offset + 1);

        let sent = match self.fold(message) {
            Ok(()) => Ok(()),
            Err(FoldError::Bad(reason)) => self.dead_letter(message, &reason),
            Err(FoldError::Send(error)) => Err(error),
            Err(FoldError::Store(error)) => return Err(error.into()),
        };
        if let Err(error) = sent {
            // Some of the record's effects may be in the transaction and some not: none of
            // it may commit. Abort, and read the transaction's records again.
            tracing::error!(%error, "producing failed; aborting the transaction");
            self.abort(consumer, true);
            std::thread::sleep(SEND_FAILURE_BACKOFF);
        }
        Ok(())
    }

    /// Runs the checks and the processor, and produces the record's effects.
    fn fold(&mut self, message: &BorrowedMessage<'_>) -> Result<(), FoldError> {
        let partition = message.partition();
        let key = match message.key() {
            Some(key) if !key.is_empty() => key,
            _ => return Err(FoldError::Bad("record has no key".into())),
        };
        if key.len() > self.config.max_key_bytes {
            return Err(FoldError::Bad(format!(
                "key of {} bytes exceeds max-key-bytes {}",
                key.len(),
                self.config.max_key_bytes
            )));
        }
        let value_len = message.payload_len();
        if value_len > self.config.max_value_bytes {
            return Err(FoldError::Bad(format!(
                "value of {value_len} bytes exceeds max-value-bytes {}",
                self.config.max_value_bytes
            )));
        }
        let expected = partition_for_key(key, self.partitions) as i32;
        if expected != partition {
            IngestMetrics::add(&self.metrics.partition_mismatches, 1);
            tracing::warn!(
                key = %String::from_utf8_lossy(key),
                partition,
                expected,
                offset = message.offset(),
                "key arrived on another partition than Kafka's partitioner gives it; \
                 its producer does not use the murmur2 partitioner"
            );
            if self.config.partition_mismatch == MismatchPolicy::Dlq {
                return Err(FoldError::Bad(format!(
                    "key belongs to partition {expected}, arrived on partition {partition}"
                )));
            }
        }

        let current = self
            .current_value(partition, key)
            .map_err(FoldError::Store)?;
        let record = InputRecord {
            topic: message.topic(),
            partition,
            offset: message.offset(),
            key,
            value: message.payload(),
        };
        let outcome = self
            .processor
            .process(&record, current.as_deref())
            .map_err(|error: ProcessError| FoldError::Bad(error.to_string()))?;
        let too_big = |what: &str, len: usize| {
            format!("{what} of {len} bytes is larger than a Kafka record can be")
        };
        if let Update::Put(value) = &outcome.update
            && key.len() + value.len() > self.max_record_bytes
        {
            return Err(FoldError::Bad(too_big(
                "new state",
                key.len() + value.len(),
            )));
        }
        if let Some(output) = outcome
            .outputs
            .iter()
            .find(|o| o.key.len() + o.value.len() > self.max_record_bytes)
        {
            return Err(FoldError::Bad(too_big(
                "output record",
                output.key.len() + output.value.len(),
            )));
        }

        let offset_text = message.offset().to_string();
        let headers = OwnedHeaders::new().insert(Header {
            key: INPUT_OFFSET_HEADER,
            value: Some(offset_text.as_bytes()),
        });
        let changelog = &self.producer.context().changelog_topic;
        let pending = match outcome.update {
            Update::Unchanged => None,
            Update::Put(value) => {
                let record = BaseRecord::to(changelog)
                    .partition(partition)
                    .key(key)
                    .payload(value.as_slice())
                    .headers(headers);
                send(&self.producer, record).map_err(FoldError::Send)?;
                Some(Some(value))
            }
            Update::Delete => {
                let record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(changelog)
                    .partition(partition)
                    .key(key)
                    .headers(headers);
                send(&self.producer, record).map_err(FoldError::Send)?;
                Some(None)
            }
        };
        if let Some(value) = pending {
            let txn = self
                .txn
                .as_mut()
                .expect("a record is only folded inside a transaction");
            let size = |value: &Option<Vec<u8>>| key.len() + value.as_ref().map_or(0, Vec::len);
            txn.overlay_bytes += size(&value);
            let replaced = txn
                .overlay
                .entry(partition)
                .or_default()
                .insert(key.to_vec(), value);
            if let Some(replaced) = replaced {
                txn.overlay_bytes -= size(&replaced);
            }
        }
        for output in &outcome.outputs {
            let record = BaseRecord::to(&output.topic)
                .key(output.key.as_slice())
                .payload(output.value.as_slice());
            send(&self.producer, record).map_err(FoldError::Send)?;
        }
        IngestMetrics::add(&self.metrics.records_processed, 1);
        Ok(())
    }

    /// Returns the key's value as the open transaction sees it.
    fn current_value(&self, partition: i32, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(pending) = self
            .txn
            .as_ref()
            .and_then(|txn| txn.overlay.get(&partition))
            .and_then(|o| o.get(key))
        {
            return Ok(pending.clone());
        }
        match self.stores.get(&partition) {
            Some(store) => store.get(key),
            None => Ok(None),
        }
    }

    /// Sends the input record to the dead-letter topic, with why and where from.
    fn dead_letter(
        &mut self,
        message: &BorrowedMessage<'_>,
        reason: &str,
    ) -> Result<(), KafkaError> {
        tracing::warn!(
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            reason,
            "record sent to the dead-letter topic"
        );
        let partition_text = message.partition().to_string();
        let offset_text = message.offset().to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: DLQ_ERROR_HEADER,
                value: Some(reason.as_bytes()),
            })
            .insert(Header {
                key: DLQ_TOPIC_HEADER,
                value: Some(message.topic().as_bytes()),
            })
            .insert(Header {
                key: DLQ_PARTITION_HEADER,
                value: Some(partition_text.as_bytes()),
            })
            .insert(Header {
                key: DLQ_OFFSET_HEADER,
                value: Some(offset_text.as_bytes()),
            });
        // Keep as much of the record as a Kafka record can carry.
        let room = self.max_record_bytes / 2;
        let key = message.key().map(|k| &k[..k.len().min(room)]);
        let payload = message.payload().map(|p| &p[..p.len().min(room)]);
        let original = message.key().map_or(0, <[u8]>::len) + message.payload_len();
        let kept = key.map_or(0, <[u8]>::len) + payload.map_or(0, <[u8]>::len);
        let original_text = original.to_string();
        if kept < original {
            headers = headers.insert(Header {
                key: DLQ_TRUNCATED_HEADER,
                value: Some(original_text.as_bytes()),
            });
        }
        let mut record: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(&self.dlq_topic).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        send(&self.producer, record)?;
        IngestMetrics::add(&self.metrics.dead_letters, 1);
        Ok(())
    }

    /// Commits the open transaction with its input offsets, then applies its updates to
    /// the stores. A transaction that must abort is aborted and its records read again.
    fn commit(&mut self, consumer: &BaseConsumer<IngestContext>) -> Result<(), IngestError> {
        let Some(txn) = self.txn.as_ref() else {
            return Ok(());
        };
        let started = Instant::now();
        let mut offsets = TopicPartitionList::new();
        for (partition, next) in &txn.next_offset {
            offsets
                .add_partition_offset(&self.config.input_topic, *partition, Offset::Offset(*next))
                .map_err(kafka("building the offsets to commit"))?;
        }
        let committed = if self.exactly_once() {
            self.commit_transaction(consumer, &offsets)
        } else {
            self.commit_at_least_once(consumer, &offsets)
        };
        match committed {
            Ok(()) => {}
            Err(Retry::Abort(reason)) => {
                tracing::warn!(
                    reason,
                    "aborting the transaction; its records will be read again"
                );
                self.abort(consumer, true);
                return Ok(());
            }
            Err(Retry::Fatal(error)) => {
                // Never leave it open: closing the consumer would commit it on revoke.
                self.abort(consumer, false);
                return Err(error);
            }
        }

        let txn = self.txn.take().expect("checked above");
        let changelog_next = std::mem::take(&mut *lock(&self.producer.context().changelog_next));
        for (partition, next_input) in &txn.next_offset {
            let store = self.store(*partition)?;
            // The registry holds every owned store's position; no need to read RocksDB.
            let mut position = match self.registry.get(*partition) {
                Some(copy) => copy.position(),
                None => store.position()?,
            };
            position.input_next = *next_input;
            if let Some(next) = changelog_next.get(partition) {
                position.changelog_next = *next;
            }
            let empty = BTreeMap::new();
            store.apply(txn.overlay.get(partition).unwrap_or(&empty), position)?;
            self.registry.set_position(*partition, position);
        }
        IngestMetrics::add(&self.metrics.commits, 1);
        metrics::histogram!(crate::metrics::COMMIT_LATENCY).record(started.elapsed());
        Ok(())
    }

    fn commit_transaction(
        &self,
        consumer: &BaseConsumer<IngestContext>,
        offsets: &TopicPartitionList,
    ) -> Result<(), Retry> {
        let group = consumer.group_metadata().ok_or_else(|| {
            Retry::Abort("the consumer has no group metadata (not in the group)".into())
        })?;
        // The poll loop waits while a commit runs: all of it, retries included, must end
        // well before max.poll.interval.ms.
        let budget = commit_budget(&self.config);
        let deadline = Instant::now() + budget;
        let remaining = || {
            deadline
                .saturating_duration_since(Instant::now())
                .min(KAFKA_TIMEOUT)
        };
        retry_transactional(
            "sending offsets to the transaction",
            budget,
            deadline,
            || {
                self.producer
                    .send_offsets_to_transaction(offsets, &group, remaining())
            },
        )?;
        flush(&self.producer, remaining()).map_err(|source| {
            if Instant::now() >= deadline {
                Retry::Fatal(IngestError::CommitTimedOut {
                    during: "flushing the transaction's records",
                    budget,
                    source,
                })
            } else {
                Retry::Abort(format!("flushing: {source}"))
            }
        })?;
        retry_transactional("committing the transaction", budget, deadline, || {
            self.producer.commit_transaction(remaining())
        })
    }

    fn commit_at_least_once(
        &self,
        consumer: &BaseConsumer<IngestContext>,
        offsets: &TopicPartitionList,
    ) -> Result<(), Retry> {
        flush(&self.producer, KAFKA_TIMEOUT)
            .map_err(|error| Retry::Abort(format!("flushing: {error}")))?;
        if let Some(failure) = lock(&self.producer.context().failure).take() {
            return Err(Retry::Abort(failure));
        }
        consumer
            .commit(offsets, rdkafka::consumer::CommitMode::Sync)
            .map_err(|error| Retry::Abort(format!("committing offsets: {error}")))
    }

    /// Drops the open transaction: aborts it (exactly-once), forgets its updates and, if
    /// `rewind`, seeks the input back so that its records are read again.
    fn abort(&mut self, consumer: &BaseConsumer<IngestContext>, rewind: bool) {
        let Some(txn) = self.txn.take() else { return };
        // librdkafka's abort waits until every outstanding record's delivery report has been
        // served, and rdkafka serves them only when the producer is polled: without this the
        // abort hangs for its whole timeout (as it did in a rebalance that failed a commit).
        if let Err(error) = flush(&self.producer, KAFKA_TIMEOUT) {
            tracing::warn!(%error, "records still in flight before aborting");
        }
        if self.exactly_once()
            && let Err(error) = self.producer.abort_transaction(KAFKA_TIMEOUT)
        {
            let fatal = IngestError::Kafka {
                during: "aborting a transaction",
                source: error,
            };
            self.fatal.get_or_insert(fatal);
        }
        lock(&self.producer.context().changelog_next).clear();
        lock(&self.producer.context().failure).take();
        IngestMetrics::add(&self.metrics.aborts, 1);
        for (partition, first) in &txn.first_offset {
            // The aborted records are read again (or, without a rewind, by whoever owns the
            // partition next).
            if rewind {
                self.next_input.insert(*partition, *first);
            } else {
                self.next_input.remove(partition);
            }
        }
        if rewind {
            for (partition, first) in txn.first_offset {
                if !self.owned.contains_key(&partition) {
                    continue;
                }
                let seek = consumer.seek(
                    &self.config.input_topic,
                    partition,
                    Offset::Offset(first),
                    KAFKA_TIMEOUT,
                );
                if let Err(error) = seek {
                    let fatal = IngestError::Kafka {
                        during: "rewinding after an abort",
                        source: error,
                    };
                    self.fatal.get_or_insert(fatal);
                }
            }
        }
    }
}

/// Why a record was not folded.
enum FoldError {
    /// The record is bad: it goes to the dead-letter topic.
    Bad(String),
    /// Producing its effects failed: the transaction must abort.
    Send(KafkaError),
    /// The store failed: the node stops.
    Store(StoreError),
}

/// How a failed commit continues.
enum Retry {
    /// Abort the transaction and read its records again.
    Abort(String),
    /// Stop the node.
    Fatal(IngestError),
}

/// Runs a transactional call, retrying what Kafka says is retriable until `deadline`.
fn retry_transactional(
    during: &'static str,
    budget: Duration,
    deadline: Instant,
    mut call: impl FnMut() -> Result<(), KafkaError>,
) -> Result<(), Retry> {
    for attempt in 1u32.. {
        match call() {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(error)) if error.is_retriable() => {
                if Instant::now() >= deadline {
                    let source = KafkaError::Transaction(error);
                    let error = IngestError::CommitTimedOut {
                        during,
                        budget,
                        source,
                    };
                    return Err(Retry::Fatal(error));
                }
                tracing::warn!(%error, attempt, during, "retrying");
                // Some retriable errors return at once: do not spin.
                let pause = Duration::from_millis(100 * u64::from(attempt.min(10)));
                std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
            }
            Err(KafkaError::Transaction(error)) if error.txn_requires_abort() => {
                return Err(Retry::Abort(format!("{during}: {error}")));
            }
            Err(source) => return Err(Retry::Fatal(IngestError::Kafka { during, source })),
        }
    }
    unreachable!("the loop returns")
}

/// How long one commit may take, retries included: three quarters of the consumer's
/// `max.poll.interval.ms` (librdkafka's default is five minutes), and at least a second.
/// (A commit that fails for good then aborts, which may take up to `KAFKA_TIMEOUT` more;
/// the node stops after that anyway.)
fn commit_budget(config: &NodeConfig) -> Duration {
    let max_poll_interval_ms: u64 = config
        .kafka
        .get("max.poll.interval.ms")
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(300_000);
    Duration::from_millis(max_poll_interval_ms / 4 * 3).max(Duration::from_secs(1))
}

/// Waits until every record sent so far is acknowledged, serving delivery reports.
///
/// `BaseProducer::flush` (and so `commit_transaction`, which flushes first) polls in slices
/// of 100 ms, and `BaseProducer::poll` always waits out its whole timeout: every flush that
/// finds a record in flight costs at least 100 ms. Polling in 1 ms slices here leaves the
/// flush inside `commit_transaction` nothing to wait for.
fn flush(producer: &BaseProducer<DeliveryTracker>, timeout: Duration) -> Result<(), KafkaError> {
    let deadline = Instant::now() + timeout;
    while producer.in_flight_count() > 0 {
        if Instant::now() > deadline {
            return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
        }
        producer.poll(Duration::from_millis(1));
    }
    // Serve the last delivery reports.
    producer.poll(Duration::ZERO);
    Ok(())
}

/// Sends a record, waiting for room in the producer's queue.
pub(crate) fn send<C, K, P>(
    producer: &BaseProducer<C>,
    mut record: BaseRecord<'_, K, P>,
) -> Result<(), KafkaError>
where
    C: rdkafka::producer::ProducerContext<DeliveryOpaque = ()>,
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                producer.poll(Duration::from_millis(1));
            }
            Err((error, _)) => return Err(error),
        }
    }
}

/// Runs ingest on the calling thread until `shutdown` is set, then commits what is open and
/// leaves the partitions (their copies stay open as standbys until the node exits), and
/// returns the partitions it owned. `restored` receives the state updater's restore results.
// The node wires each of these separately; a struct for them would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn run(
    config: Arc<NodeConfig>,
    partitions: u32,
    processor: Box<dyn Processor>,
    copies: Arc<Copies>,
    restored: Receiver<UpdaterEvent>,
    metrics: Arc<IngestMetrics>,
    shutdown: Arc<AtomicBool>,
    pulse: Arc<Pulse>,
) -> Result<Vec<i32>, IngestError> {
    lower_priority(config.ingest_niceness);
    let mut client = ClientConfig::new();
    for (key, value) in &config.kafka {
        client.set(key, value);
    }
    let max_record_bytes = config
        .kafka
        .get("message.max.bytes")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1_000_000)
        .saturating_sub(RECORD_OVERHEAD_BYTES);

    let mut producer_config = client.clone();
    producer_config
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random");
    set_default(&mut producer_config, "linger.ms", "5");
    if config.processing_guarantee == ProcessingGuarantee::ExactlyOnce {
        producer_config.set(
            "transactional.id",
            format!("{}-{}", config.app_id, config.node_id),
        );
        // A transaction lasts about commit-interval-ms. If this node dies with one open, the
        // broker aborts it after this timeout, and the partition's next owner waits for that
        // before its restore ends: 10 s rather than librdkafka's 60 s.
        set_default(&mut producer_config, "transaction.timeout.ms", "10000");
    }
    let tracker = DeliveryTracker {
        changelog_topic: config.changelog_topic(),
        changelog_next: Mutex::new(HashMap::new()),
        failure: Mutex::new(None),
    };
    let producer: BaseProducer<DeliveryTracker> = producer_config
        .create_with_context(tracker)
        .map_err(kafka("creating the producer"))?;
    if config.processing_guarantee == ProcessingGuarantee::ExactlyOnce {
        // Fences any earlier incarnation of this node and aborts its open transaction.
        producer
            .init_transactions(KAFKA_TIMEOUT)
            .map_err(kafka("initializing transactions"))?;
    }

    let registry = copies.registry().clone();
    let engine = Arc::new(Mutex::new(Engine {
        config: config.clone(),
        partitions,
        processor,
        producer,
        stores: HashMap::new(),
        owned: HashMap::new(),
        next_input: HashMap::new(),
        txn: None,
        copies,
        restored,
        restore_generation: 0,
        registry,
        metrics: metrics.clone(),
        max_record_bytes,
        dlq_topic: config.dlq_topic(),
        fatal: None,
    }));

    let mut consumer_config = client;
    consumer_config
        .set("group.id", config.group_id())
        .set("group.instance.id", &config.node_id)
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed");
    set_default(&mut consumer_config, "auto.offset.reset", "earliest");
    let consumer: BaseConsumer<IngestContext> = consumer_config
        .create_with_context(IngestContext {
            engine: engine.clone(),
            pulse: pulse.clone(),
        })
        .map_err(kafka("creating the group consumer"))?;
    consumer
        .subscribe(&[&config.input_topic])
        .map_err(kafka("subscribing"))?;
    tracing::info!(
        input = %config.input_topic,
        partitions,
        guarantee = ?config.processing_guarantee,
        "ingest started"
    );

    let result = poll_loop(&consumer, &engine, &metrics, &shutdown, &pulse);
    pulse.stop();
    let mut owned: Vec<i32> = lock(&engine).owned.keys().copied().collect();
    owned.sort_unstable();
    let finished = match result {
        Ok(()) => lock(&engine).commit(&consumer),
        Err(error) => {
            // Closing the consumer revokes its partitions, and a revoke commits what is
            // open: abort first, so that nothing from before the failure commits.
            lock(&engine).abort(&consumer, false);
            Err(error)
        }
    };
    // Closing the consumer runs the revoke callback (nothing left to commit by then).
    drop(consumer);
    let mut engine = lock(&engine);
    if let Err(error) = flush(&engine.producer, KAFKA_TIMEOUT) {
        tracing::warn!(%error, "flushing the producer at shutdown");
    }
    engine.stores.clear();
    log_progress(&metrics);
    finished.map(|()| owned)
}

/// Lowers the calling thread's CPU priority to `niceness` before it creates the Kafka
/// clients and opens the stores, whose threads inherit it: when the CPU is short, reads win
/// over ingestion.
pub(crate) fn lower_priority(niceness: u8) {
    use thread_priority::{ThreadPriority, ThreadPriorityValue, set_current_thread_priority};
    if niceness == 0 {
        return;
    }
    let priority = ThreadPriorityValue::try_from(crossplatform_priority(niceness))
        .map(ThreadPriority::Crossplatform);
    match priority.map(set_current_thread_priority) {
        Ok(Ok(())) => tracing::debug!(niceness, "ingest runs at a lower CPU priority"),
        Ok(Err(error)) => tracing::warn!(?error, "cannot lower the ingest thread's priority"),
        Err(error) => tracing::warn!(error, "cannot lower the ingest thread's priority"),
    }
}

/// The `thread-priority` cross-platform value (0..=99) that it maps to `niceness` on Linux:
/// it maps p to niceness ⌊39 · (1 − p/99)⌋ − 20, so this is the largest p giving at least
/// that niceness.
fn crossplatform_priority(niceness: u8) -> u8 {
    let wanted = f32::from(niceness.min(19)) + 20.0;
    (0..=99u8)
        .rev()
        .find(|&p| (39.0 * (1.0 - f32::from(p) / 99.0)).floor() >= wanted)
        .unwrap_or(0)
}

/// Sets a client setting unless the user's `kafka.*` settings already chose one.
fn set_default(config: &mut ClientConfig, key: &str, value: &str) {
    if config.get(key).is_none() {
        config.set(key, value);
    }
}

fn poll_loop(
    consumer: &BaseConsumer<IngestContext>,
    engine: &Mutex<Engine>,
    metrics: &IngestMetrics,
    shutdown: &AtomicBool,
    pulse: &Pulse,
) -> Result<(), IngestError> {
    let mut last_log = Instant::now();
    // Since when the member has been in the group with no partition, before it is started.
    let mut empty_since: Option<Instant> = None;
    while !shutdown.load(Ordering::Relaxed) {
        pulse.beat();
        // Rebalance callbacks run inside poll and lock the engine: never poll holding it.
        let message = consumer.poll(POLL_TIMEOUT);
        let mut engine = lock(engine);
        if let Some(error) = engine.fatal.take() {
            return Err(error);
        }
        engine.resume_restored(consumer)?;
        match message {
            Some(Ok(message)) => engine.handle(&message, consumer)?,
            Some(Err(error)) => tracing::warn!(%error, "consumer error"),
            None => {}
        }
        if engine.txn_due() {
            engine.commit(consumer)?;
        }
        engine.producer.poll(Duration::ZERO);
        if let Some(error) = engine.fatal.take() {
            return Err(error);
        }
        if engine.registry.status() == NodeStatus::Starting {
            // A member assigned nothing (more members than partitions) has opened all it
            // will once that has held a while: a cooperative rebalance often hands a joining
            // member nothing first, and its partitions a moment later.
            let empty = engine.owned.is_empty() && group_generation(consumer) > 0;
            empty_since = empty.then(|| empty_since.unwrap_or_else(Instant::now));
            if empty_since.is_some_and(|since| since.elapsed() >= EMPTY_ASSIGNMENT_GRACE) {
                tracing::info!("no partition assigned; serving reads by forwarding them");
                engine.registry.mark_ready();
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
        "ingest progress"
    );
}

/// Returns the consumer-group generation the consumer is in (-1 outside the group).
///
/// rdkafka does not expose it, but librdkafka does (`rd_kafka_consumer_group_metadata`,
/// then its generation id); the group metadata object is freed right away.
#[allow(unsafe_code)]
fn group_generation<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> i32 {
    use rdkafka::bindings as rd;
    let client = consumer.client().native_ptr();
    // SAFETY: `client` is the live handle of `consumer`, borrowed for this call. The group
    // metadata object is newly allocated by librdkafka, read once, and destroyed here; a
    // null one (no group) is never dereferenced.
    unsafe {
        let metadata = rd::rd_kafka_consumer_group_metadata(client);
        if metadata.is_null() {
            return -1;
        }
        let generation = rd::rd_kafka_consumer_group_metadata_generation_id(metadata);
        rd::rd_kafka_consumer_group_metadata_destroy(metadata);
        generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the calling thread's niceness from /proc.
    fn current_niceness() -> i32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        // Field 19 of stat; the first after ')' is field 3.
        fields[16].parse().unwrap()
    }

    #[test]
    fn a_commit_ends_well_before_the_poll_interval() {
        let mut config = NodeConfig::default();
        assert_eq!(commit_budget(&config), Duration::from_secs(225));
        config
            .kafka
            .insert("max.poll.interval.ms".into(), "60000".into());
        assert_eq!(commit_budget(&config), Duration::from_secs(45));
        config
            .kafka
            .insert("max.poll.interval.ms".into(), "2".into());
        assert_eq!(commit_budget(&config), Duration::from_secs(1));
    }

    #[test]
    fn non_retriable_commit_errors_are_not_retried() {
        let mut calls = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        let result = retry_transactional("committing", Duration::from_secs(60), deadline, || {
            calls += 1;
            Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut))
        });
        assert!(matches!(
            result,
            Err(Retry::Fatal(IngestError::Kafka { .. }))
        ));
        assert_eq!(calls, 1);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn ingest_threads_get_exactly_the_configured_niceness() {
        for niceness in 0..=19u8 {
            let seen = std::thread::spawn(move || {
                let before = current_niceness();
                lower_priority(niceness);
                (before, current_niceness())
            })
            .join()
            .unwrap();
            // A thread starts at the process's niceness; 0 leaves it there. (Going below
            // the process's niceness needs privileges: not checked.)
            if niceness == 0 {
                assert_eq!(seen.1, seen.0, "ingest-niceness 0");
            } else if i32::from(niceness) >= seen.0 {
                assert_eq!(seen.1, i32::from(niceness), "ingest-niceness {niceness}");
            }
        }
    }
}
