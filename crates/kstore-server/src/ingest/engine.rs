//! The transaction engine: what the ingest thread and the consumer's rebalance callbacks
//! share. It owns the node's transactional producer, the partitions ingest owns and their
//! stores, and the open transaction; it folds records into the transaction and commits or
//! aborts it.
//!
//! A partition ingest owns is *restoring* (its input paused while its copy is prepared and
//! its changelog tail replayed, off this thread), *active* (its records are folded), or
//! *failed* (its copy failed; its input stays paused and nothing of it is folded until the
//! copy is restored again). Exactly-once across hand-offs: when a copy turns active, the
//! next input offset it may fold of each input topic is the store's own
//! ([`PartitionStore::input_offsets`]); the consumer handing over an offset below it is an
//! invariant violation, counted, logged and never folded.
//!
//! A store over several input topics folds partition `p` of each into its partition `p`,
//! in the order the consumer hands the records over; its input position is the sum of the
//! topics' next offsets ([`crate::input_offsets`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use super::delivery::{DeliveryTracker, lock};
use super::fold::{self, Limits, Step};
use super::{IngestError, IngestMetrics};
use crate::config::{NodeConfig, ProcessingGuarantee, ProcessorConfig};
use crate::input_offsets::InputOffsets;
use crate::kafka::{
    DLQ_ERROR_HEADER, DLQ_OFFSET_HEADER, DLQ_PARTITION_HEADER, DLQ_TOPIC_HEADER,
    DLQ_TRUNCATED_HEADER, INPUT_OFFSET_HEADER, INPUT_OFFSETS_HEADER, MODULE_HISTORY_KEY, flush,
    group_generation, send,
};
use crate::probes::Pulse;
use crate::processor::versions::{ModuleCheck, ModuleHistory};
use crate::processor::{InputRecord, Outcome, ProcessError, Processor, RecordHeader, Update};
use crate::registry::Registry;
use crate::standby::{Copies, CopyEvent};
use crate::store::{MetaUpdate, PartitionStore, StoreError};

pub(super) const KAFKA_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait after a transaction was aborted because producing failed.
const SEND_FAILURE_BACKOFF: Duration = Duration::from_millis(100);

/// The most records of distinct keys handed to the processor in one call. A WebAssembly
/// module's call has a fixed cost that a run spreads; beyond about 16 records the gain
/// turns into cache misses (README, "WebAssembly processor against native").
pub(super) const MAX_PROCESSOR_BATCH: usize = 16;

/// A record taken into the open transaction, waiting for its processor call.
struct Admitted<'m> {
    message: &'m BorrowedMessage<'m>,
    /// Its place among the round's records.
    index: usize,
    /// Where it puts its partition's input, for its changelog record's headers.
    mark: RecordPosition,
    checked: Checked,
}

/// Where a record puts its partition's input.
struct RecordPosition {
    /// The record's input position: its offset, plus the next offsets of the partition's
    /// other input topics when it was taken.
    position: i64,
    /// The next offset per input topic after it (encoded), unless the partition has read
    /// only its store's first input topic.
    offsets: Option<String>,
}

/// What a record's checks found.
enum Checked {
    /// The processor sees it, with its key's current value.
    Process {
        misplaced: Option<u32>,
        current: Option<Vec<u8>>,
    },
    /// A check decided its fate (a dead letter).
    Decided(fold::Fold),
}

/// What ingest does with a partition it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ownership {
    /// Its copy is being prepared and its changelog tail replayed, for assignment number
    /// `generation`; its input is paused. A finished restore of an earlier generation (one
    /// cancelled by a revoke before the partition came back) must not activate it.
    Restoring { generation: u64, since: Instant },
    /// Its input is being folded into its store.
    Active { generation: u64 },
    /// Its copy failed: its input is paused until the copy is restored again.
    Failed { generation: u64, since: Instant },
}

impl Ownership {
    fn generation(self) -> u64 {
        match self {
            Ownership::Restoring { generation, .. }
            | Ownership::Active { generation }
            | Ownership::Failed { generation, .. } => generation,
        }
    }
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
    /// The first input offset per partition and input topic, where to rewind after an
    /// abort.
    first_offset: HashMap<i32, InputOffsets>,
    /// The next input offset per partition and input topic, committed with the transaction.
    next_offset: HashMap<i32, InputOffsets>,
    /// The module history of the partitions whose module switched in the transaction,
    /// written to their stores with its updates.
    modules: HashMap<i32, ModuleHistory>,
}

impl OpenTransaction {
    fn new() -> Self {
        OpenTransaction {
            started: Instant::now(),
            records: 0,
            overlay_bytes: 0,
            overlay: HashMap::new(),
            first_offset: HashMap::new(),
            next_offset: HashMap::new(),
            modules: HashMap::new(),
        }
    }
}

/// Everything the ingest thread and the rebalance callbacks share.
pub(super) struct Engine {
    config: Arc<NodeConfig>,
    limits: Limits,
    processor: Box<dyn Processor>,
    /// The processor's version (a module's SHA-256) and whether the store may roll back to
    /// it; none for a built-in processor.
    module: Option<(String, bool)>,
    /// Active partitions whose module history agrees with the processor's version (in the
    /// store, or in the open transaction's switch).
    module_checked: HashSet<i32>,
    /// Active partitions whose module is a later version than the processor's: their input
    /// is paused for as long as they are owned here, and their copies serve reads.
    held: HashSet<i32>,
    pub(super) producer: BaseProducer<DeliveryTracker>,
    /// The stores of the partitions that are active here.
    stores: HashMap<i32, Arc<PartitionStore>>,
    owned: HashMap<i32, Ownership>,
    /// Per active partition and input topic, the next input offset it may fold: the
    /// store's own when the copy turned active, then the offset after the last record
    /// folded (or rewound to). A record below it would be folded twice: it is skipped.
    next_input: HashMap<i32, InputOffsets>,
    /// Per active partition, the next offset per input topic its store reflects (committed).
    committed_input: HashMap<i32, InputOffsets>,
    /// Active partitions that have folded no record since they turned active: a record
    /// below their `next_input` is an exactly-once violation (the consumer started below
    /// what the store reflects), not a record handed over again.
    fresh: HashSet<i32>,
    txn: Option<OpenTransaction>,
    /// Opens, hands over, fails and retires the node's copies.
    copies: Arc<Copies>,
    /// Restored and failed copies of the partitions ingest owns.
    events: Receiver<CopyEvent>,
    /// Numbers assignments, so that a stale restore's result is recognised.
    generation: u64,
    registry: Arc<Registry>,
    metrics: Arc<IngestMetrics>,
    /// `<app>-dlq`, formatted once.
    dlq_topic: String,
    /// An error raised inside a rebalance callback, which cannot return one.
    pub(super) fatal: Option<IngestError>,
    /// How many records the ingest loop's round has polled so far: a partition rewound now
    /// (sought back or revoked, also inside a rebalance callback of the next poll) makes the
    /// round's records of it polled before stale.
    poll_mark: usize,
    /// Per input partition rewound this round (by the input topic's place in the config,
    /// and the partition), how many of the round's records were polled before: its records
    /// among those are stale (read again from where it was rewound to, or by the
    /// partition's next owner) and never folded.
    stale_before: HashMap<(usize, i32), usize>,
}

/// The consumer context: rebalance callbacks commit or abort the open transaction before
/// partitions leave, and pause new partitions until they are restored.
pub(super) struct IngestContext {
    pub(super) engine: Arc<std::sync::Mutex<Engine>>,
    /// The ingest loop's pulse: handing revoked partitions over (a commit) is a step known
    /// to be long, never a stall.
    pub(super) pulse: Arc<Pulse>,
}

impl ClientContext for IngestContext {}

impl ConsumerContext for IngestContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(partitions) = rebalance else {
            return;
        };
        let _busy = self.pulse.busy("handing over revoked partitions");
        let mut engine = lock(&self.engine);
        let (revoked, _) = partitions_of(partitions, engine.config.inputs());
        if consumer.assignment_lost() {
            // Another member may already own these partitions: committing now could
            // overwrite its work. Abort; the new owner reads the records again.
            tracing::warn!(?revoked, "assignment lost; aborting the open transaction");
            engine.abort(consumer, false);
        } else if std::thread::panicking() {
            // The ingest thread panicked in the middle of a record (dropping the consumer
            // revokes): what the transaction holds may not be whole. Abort.
            tracing::error!(?revoked, "ingest panicked; aborting the open transaction");
            engine.abort(consumer, false);
        } else if let Err(error) = engine.commit(consumer) {
            engine.fatal.get_or_insert(error);
        }
        for partition in &revoked {
            engine.mark_revoked(*partition);
            if engine.owned.remove(partition).is_none() {
                // Only some of its input topics were assigned here: it was never taken.
                continue;
            }
            engine.next_input.remove(partition);
            engine.committed_input.remove(partition);
            engine.fresh.remove(partition);
            engine.module_checked.remove(partition);
            engine.release_held(*partition);
            engine.stores.remove(partition);
            // The copy stays open and keeps answering reads as a standby, with its
            // staleness stated, until its partition runs elsewhere.
            engine.copies.revoke(*partition);
        }
        let generation = group_generation(consumer);
        engine.registry.set_group_generation(generation);
        tracing::info!(
            ?revoked,
            group_generation = generation,
            "partitions revoked"
        );
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                // Before the first fetch: nothing is read until the copy is restored.
                if let Err(error) = consumer.pause(partitions) {
                    tracing::error!(%error, "pausing newly assigned partitions failed");
                }
                let mut engine = lock(&self.engine);
                let generation = group_generation(consumer);
                engine.registry.set_group_generation(generation);
                let (assigned, split) = partitions_of(partitions, engine.config.inputs());
                tracing::info!(
                    ?assigned,
                    group_generation = generation,
                    "partitions assigned"
                );
                if !split.is_empty() {
                    // Another member would fold the rest of the partition's input: two
                    // actives of one partition. It stays paused until one member gets all.
                    tracing::error!(
                        ?split,
                        inputs = %engine.config.inputs().join(", "),
                        "partitions of which only some input topics were assigned here (do \
                         the group's members read different input-topics?); not folded here"
                    );
                }
                for partition in assigned {
                    engine.assign(partition);
                }
                engine.registry.mark_ready();
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => tracing::error!(%error, "rebalance failed"),
        }
    }
}

/// The partitions of the list's input topics, in order: those listed for every input
/// topic, and those listed for only some.
fn partitions_of(list: &TopicPartitionList, inputs: &[String]) -> (Vec<i32>, Vec<i32>) {
    let mut topics: BTreeMap<i32, usize> = BTreeMap::new();
    for element in list.elements() {
        if inputs.iter().any(|input| input == element.topic()) {
            *topics.entry(element.partition()).or_default() += 1;
        }
    }
    let (whole, split): (Vec<_>, Vec<_>) = topics
        .into_iter()
        .partition(|(_, count)| *count == inputs.len());
    (
        whole.into_iter().map(|(p, _)| p).collect(),
        split.into_iter().map(|(p, _)| p).collect(),
    )
}

/// How a failed commit continues.
enum Retry {
    /// Abort the transaction and read its records again.
    Abort(String),
    /// Stop the node.
    Fatal(IngestError),
}

impl Engine {
    /// An engine with nothing owned yet.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        config: Arc<NodeConfig>,
        limits: Limits,
        processor: Box<dyn Processor>,
        producer: BaseProducer<DeliveryTracker>,
        copies: Arc<Copies>,
        events: Receiver<CopyEvent>,
        metrics: Arc<IngestMetrics>,
    ) -> Self {
        let registry = copies.registry().clone();
        let dlq_topic = config.dlq_topic();
        let rollback = matches!(&config.processor, ProcessorConfig::Wasm(wasm) if wasm.rollback);
        let module = processor
            .version()
            .map(|version| (version.to_string(), rollback));
        Engine {
            config,
            limits,
            processor,
            module,
            module_checked: HashSet::new(),
            held: HashSet::new(),
            producer,
            stores: HashMap::new(),
            owned: HashMap::new(),
            next_input: HashMap::new(),
            committed_input: HashMap::new(),
            fresh: HashSet::new(),
            txn: None,
            copies,
            events,
            generation: 0,
            registry,
            metrics,
            dlq_topic,
            fatal: None,
            poll_mark: 0,
            stale_before: HashMap::new(),
        }
    }

    fn exactly_once(&self) -> bool {
        self.config.processing_guarantee == ProcessingGuarantee::ExactlyOnce
    }

    /// The partition of each input topic.
    fn input_partitions(&self, partition: i32) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for input in self.config.inputs() {
            list.add_partition(input, partition);
        }
        list
    }

    /// Returns the partitions ingest owns, sorted.
    pub(super) fn owned(&self) -> Vec<i32> {
        let mut owned: Vec<i32> = self.owned.keys().copied().collect();
        owned.sort_unstable();
        owned
    }

    /// Takes a newly assigned partition: its copy is prepared and restored off this thread,
    /// and reported back as [`CopyEvent::Restored`].
    fn assign(&mut self, partition: i32) {
        self.generation += 1;
        let generation = self.generation;
        tracing::info!(
            partition,
            generation,
            "partition assigned; restoring its copy"
        );
        self.next_input.remove(&partition);
        self.committed_input.remove(&partition);
        self.fresh.remove(&partition);
        self.module_checked.remove(&partition);
        self.release_held(partition);
        self.owned.insert(
            partition,
            Ownership::Restoring {
                generation,
                since: Instant::now(),
            },
        );
        self.copies.assign(partition, generation);
    }

    /// Acts on what became of the owned partitions' copies: a restored copy turns active and
    /// its input resumes; a failed one's input is paused.
    pub(super) fn follow_copies(
        &mut self,
        consumer: &BaseConsumer<IngestContext>,
    ) -> Result<(), IngestError> {
        while let Ok(event) = self.events.try_recv() {
            match event {
                CopyEvent::Restored {
                    partition,
                    generation,
                    records,
                    position,
                } => {
                    let since = match self.owned.get(&partition).copied() {
                        Some(Ownership::Restoring {
                            generation: current,
                            since,
                        })
                        | Some(Ownership::Failed {
                            generation: current,
                            since,
                        }) if current == generation => since,
                        _ => continue,
                    };
                    // Gone meanwhile (failed again): its next restore reports again.
                    let Some(copy) = self.registry.get(partition) else {
                        continue;
                    };
                    let inputs = match copy.store.input_offsets(&self.config.inputs()[0]) {
                        Ok(inputs) => inputs,
                        Err(error) => {
                            let reason = format!("reading the store's input offsets: {error}");
                            self.fail_partition(
                                partition,
                                &reason,
                                error.is_corruption(),
                                consumer,
                            );
                            continue;
                        }
                    };
                    let ready_in = since.elapsed();
                    tracing::info!(
                        partition,
                        records,
                        changelog_offset = position.changelog_next,
                        input_offset = position.input_next,
                        input_offsets = %inputs.encode(),
                        ready_in_ms = ready_in.as_millis() as u64,
                        "restore finished; the partition is active"
                    );
                    metrics::histogram!(crate::metrics::ACTIVATION_TIME).record(ready_in);
                    self.stores.insert(partition, copy.store.clone());
                    self.owned
                        .insert(partition, Ownership::Active { generation });
                    // The guard starts at what the store reflects, never empty.
                    self.next_input.insert(partition, inputs.clone());
                    self.committed_input.insert(partition, inputs);
                    self.fresh.insert(partition);
                    self.copies.activate(partition, position);
                    consumer
                        .resume(&self.input_partitions(partition))
                        .map_err(kafka("resuming a restored partition"))?;
                }
                CopyEvent::Failed {
                    partition,
                    generation,
                    reason,
                } => {
                    if self.owned.get(&partition).map(|o| o.generation()) == Some(generation) {
                        tracing::warn!(partition, reason, "the partition's copy failed");
                        self.pause_failed(partition, consumer);
                    }
                }
            }
        }
        Ok(())
    }

    /// Stops folding a partition whose copy failed: its input is paused (and, if the open
    /// transaction holds its records, the transaction aborts and its records are read
    /// again), until its copy is restored again.
    fn pause_failed(&mut self, partition: i32, consumer: &BaseConsumer<IngestContext>) {
        let Some(ownership) = self.owned.get(&partition).copied() else {
            return;
        };
        if matches!(ownership, Ownership::Failed { .. }) {
            return;
        }
        if let Err(error) = consumer.pause(&self.input_partitions(partition)) {
            tracing::error!(%error, partition, "pausing a failed partition");
        }
        if self
            .txn
            .as_ref()
            .is_some_and(|txn| txn.first_offset.contains_key(&partition))
        {
            // None of the partition's records may commit without its store: abort, and read
            // the transaction's records (of every partition) again.
            self.abort(consumer, true);
        }
        self.stores.remove(&partition);
        self.next_input.remove(&partition);
        self.committed_input.remove(&partition);
        self.fresh.remove(&partition);
        self.module_checked.remove(&partition);
        self.release_held(partition);
        // Not marked rewound unless the abort above sought it back: its records polled but
        // not folded must be sought back to (by the first of them, as a paused partition's),
        // or its resume would start past them.
        self.owned.insert(
            partition,
            Ownership::Failed {
                generation: ownership.generation(),
                since: Instant::now(),
            },
        );
    }

    /// The partition's copy failed here (its store, or the processor): ingest pauses it and
    /// the copies' lifecycle retries it. The node's other partitions keep flowing.
    fn fail_partition(
        &mut self,
        partition: i32,
        reason: &str,
        damaged: bool,
        consumer: &BaseConsumer<IngestContext>,
    ) {
        self.pause_failed(partition, consumer);
        self.copies.fail(partition, reason, damaged);
    }

    pub(super) fn txn_due(&self) -> bool {
        self.txn.as_ref().is_some_and(|txn| {
            txn.records >= self.config.max_transaction_records
                || txn.overlay_bytes >= self.config.max_transaction_bytes
                || txn.started.elapsed() >= Duration::from_millis(self.config.commit_interval_ms)
        })
    }

    /// Folds the round's polled input records into the open transaction, in order. Runs of
    /// records with distinct keys (at most [`MAX_PROCESSOR_BATCH`]) go to the processor in
    /// one call. A record of a partition rewound after it was polled (an abort, which seeks
    /// its partitions back; a revoke in a later poll's rebalance; an earlier record of a
    /// paused partition, which seeks it back to itself) is stale and left: the partition's
    /// records are read again from where it was rewound to, which is at or before that
    /// record, or by its next owner. A partition paused without a seek (its copy failed
    /// after its records committed) is sought back by its first record not folded.
    pub(super) fn handle_batch(
        &mut self,
        messages: &[BorrowedMessage<'_>],
        consumer: &BaseConsumer<IngestContext>,
    ) -> Result<(), IngestError> {
        // From here on, a rewind makes every record of the round that is not folded yet
        // stale.
        self.poll_mark = messages.len();
        let mut start = 0;
        while start < messages.len() {
            let keys = messages[start..]
                .iter()
                .map(|message| message.key().unwrap_or_default());
            let run = distinct_key_run(keys, MAX_PROCESSOR_BATCH);
            self.handle_run(&messages[start..start + run], start, consumer)?;
            start += run;
            // The transaction's bounds hold between runs, not only between rounds.
            if self.txn_due() {
                self.commit(consumer)?;
            }
        }
        Ok(())
    }

    /// Starts a round of the ingest loop: no record polled yet, none stale.
    pub(super) fn start_round(&mut self) {
        self.poll_mark = 0;
        self.stale_before.clear();
    }

    /// Notes that the round has polled `polled` records so far (before its next poll).
    pub(super) fn set_poll_mark(&mut self, polled: usize) {
        self.poll_mark = polled;
    }

    /// Notes that `partition` was revoked: the round's records of it polled so far, of
    /// every input topic, are stale.
    fn mark_revoked(&mut self, partition: i32) {
        for input in 0..self.config.inputs().len() {
            self.stale_before.insert((input, partition), self.poll_mark);
        }
    }

    /// Notes that `topic`'s `partition` was sought back: the round's records of it polled
    /// so far are stale. A partition only paused is not rewound: its first record polled
    /// but not folded seeks it back to itself.
    fn mark_rewound(&mut self, topic: &str, partition: i32) {
        let input = self.input_index(topic);
        self.stale_before.insert((input, partition), self.poll_mark);
    }

    /// Whether the round's `index`th record, of `topic`'s `partition`, was polled before
    /// that was rewound.
    fn is_stale(&self, topic: &str, partition: i32, index: usize) -> bool {
        self.stale_before
            .get(&(self.input_index(topic), partition))
            .is_some_and(|&before| index < before)
    }

    /// The input topic's place among the store's input topics.
    fn input_index(&self, topic: &str) -> usize {
        self.config
            .inputs()
            .iter()
            .position(|input| input == topic)
            .unwrap_or(usize::MAX)
    }

    /// Folds records with distinct keys: each record's checks and its place in the
    /// transaction first, in order; then one processor call for those that passed; then
    /// each record's effects, in order.
    fn handle_run(
        &mut self,
        run: &[BorrowedMessage<'_>],
        first_index: usize,
        consumer: &BaseConsumer<IngestContext>,
    ) -> Result<(), IngestError> {
        let mut admitted = Vec::with_capacity(run.len());
        for (i, message) in run.iter().enumerate() {
            if let Some(record) = self.admit(message, first_index + i, consumer)? {
                admitted.push(record);
            }
        }
        let headers: Vec<Vec<RecordHeader<'_>>> =
            admitted.iter().map(|a| record_headers(a.message)).collect();
        let records: Vec<InputRecord<'_>> = admitted
            .iter()
            .zip(&headers)
            .map(|(a, headers)| input_record(a.message, headers))
            .collect();
        let batch: Vec<(InputRecord<'_>, Option<&[u8]>)> = admitted
            .iter()
            .zip(&records)
            .filter_map(|(a, record)| match &a.checked {
                Checked::Process { current, .. } => Some((*record, current.as_deref())),
                Checked::Decided(_) => None,
            })
            .collect();
        let mut processed = if batch.is_empty() {
            Vec::new()
        } else {
            let results = self.processor.process_batch(&batch);
            if results.len() == batch.len() {
                results
            } else {
                let reason = format!(
                    "the processor returned {} results for {} records",
                    results.len(),
                    batch.len()
                );
                batch
                    .iter()
                    .map(|_| Err(ProcessError::Unavailable(reason.clone())))
                    .collect()
            }
        }
        .into_iter();
        drop(batch);
        for (record, admitted) in records.iter().zip(admitted) {
            let fold = match admitted.checked {
                Checked::Decided(fold) => fold,
                Checked::Process { misplaced, .. } => {
                    let Some(result) = processed.next() else {
                        unreachable!("one result per record processed");
                    };
                    fold::Fold {
                        step: fold::step_of(&self.limits, record.key, result),
                        misplaced,
                    }
                }
            };
            // An abort or a failed copy while this run was handled rewound the partition:
            // the record is read again.
            if self.is_stale(record.topic, record.partition, admitted.index) {
                continue;
            }
            self.apply(admitted.message, record, fold, &admitted.mark, consumer);
        }
        Ok(())
    }

    /// Takes an input record into the open transaction if its partition is active here and
    /// it was not folded already, and checks it; returns it with its key's current value
    /// if the processor is to see it, or with its fate if a check decided it.
    fn admit<'m>(
        &mut self,
        message: &'m BorrowedMessage<'m>,
        index: usize,
        consumer: &BaseConsumer<IngestContext>,
    ) -> Result<Option<Admitted<'m>>, IngestError> {
        let partition = message.partition();
        let topic = message.topic();
        let offset = message.offset();
        if self.is_stale(topic, partition, index) {
            return Ok(None);
        }
        let folding = matches!(self.owned.get(&partition), Some(Ownership::Active { .. }))
            && !self.held.contains(&partition);
        if !folding {
            // Fetched before the pause took hold (a restoring, failed or held partition): read
            // it again once the partition folds here.
            if self.owned.contains_key(&partition) {
                consumer
                    .seek(
                        message.topic(),
                        partition,
                        Offset::Offset(offset),
                        KAFKA_TIMEOUT,
                    )
                    .map_err(kafka("rewinding a paused partition"))?;
                self.mark_rewound(topic, partition);
            }
            return Ok(None);
        }
        if let Some(next) = self.next_input.get(&partition).and_then(|n| n.get(topic))
            && offset < next
        {
            if self.fresh.contains(&partition) {
                IngestMetrics::add(&self.metrics.violations, 1);
                tracing::error!(
                    topic,
                    partition,
                    offset,
                    store_input_next = next,
                    "exactly-once violation: the consumer started below what the store \
                     already reflects; the record is not folded again"
                );
            } else {
                IngestMetrics::add(&self.metrics.redelivered, 1);
                tracing::warn!(
                    topic,
                    partition,
                    offset,
                    next,
                    "the consumer handed over a record already folded; skipped"
                );
            }
            return Ok(None);
        }
        self.fresh.remove(&partition);
        let committed = &self.committed_input;
        let guard = self
            .next_input
            .entry(partition)
            .or_insert_with(|| committed.get(&partition).cloned().unwrap_or_default());
        let position = guard.position_of(topic, offset);
        guard.set(topic, offset + 1);
        // A record without the offsets per topic is credited to the only topic the
        // partition has read, or the first input topic.
        let stated = guard.len() > 1 || topic != self.config.inputs()[0];
        let mark = RecordPosition {
            position,
            offsets: stated.then(|| guard.encode()),
        };
        IngestMetrics::add(&self.metrics.records_in, 1);
        if self.txn.is_none() {
            if self.exactly_once() {
                self.producer
                    .begin_transaction()
                    .map_err(kafka("beginning a transaction"))?;
            }
            self.txn = Some(OpenTransaction::new());
        }
        let txn = self.txn.as_mut().expect("opened above");
        txn.records += 1;
        let first = txn.first_offset.entry(partition).or_default();
        if first.get(topic).is_none() {
            first.set(topic, offset);
        }
        txn.next_offset
            .entry(partition)
            .or_default()
            .set(topic, offset + 1);
        if !self.check_module(partition, position, consumer) {
            return Ok(None);
        }

        let headers = record_headers(message);
        let record = input_record(message, &headers);
        let misplaced = match fold::check(&self.limits, &record) {
            Ok(misplaced) => misplaced,
            Err(decided) => {
                return Ok(Some(Admitted {
                    message,
                    index,
                    mark,
                    checked: Checked::Decided(decided),
                }));
            }
        };
        match current_value(self.txn.as_ref(), &self.stores, partition, record.key) {
            Ok(current) => Ok(Some(Admitted {
                message,
                index,
                mark,
                checked: Checked::Process { misplaced, current },
            })),
            Err(error) => {
                let reason = format!("reading the store: {error}");
                self.fail_partition(partition, &reason, error.is_corruption(), consumer);
                Ok(None)
            }
        }
    }

    /// Before a partition's record at input position `position` is folded (the first since the partition
    /// turned active, or since a switch aborted), checks the processor's version against
    /// the partition's module history: a new version's switch is written into the open
    /// transaction; an earlier version holds the partition ([`Engine::hold`]). Returns
    /// whether the record may be folded.
    fn check_module(
        &mut self,
        partition: i32,
        position: i64,
        consumer: &BaseConsumer<IngestContext>,
    ) -> bool {
        if self.module_checked.contains(&partition) {
            return true;
        }
        let Some((version, rollback)) = self.module.clone() else {
            return true;
        };
        let Some(store) = self.stores.get(&partition) else {
            return true;
        };
        let history = match store.module_history() {
            Ok(history) => history,
            Err(error) => {
                let reason = format!("reading the store's module history: {error}");
                self.fail_partition(partition, &reason, error.is_corruption(), consumer);
                return false;
            }
        };
        match history.check(&version, position, rollback) {
            ModuleCheck::Current => {}
            ModuleCheck::Refuse(reason) => {
                self.hold(partition, reason, consumer);
                return false;
            }
            ModuleCheck::Switch(next) => {
                let value = next.encode();
                let record: BaseRecord<'_, [u8], [u8]> =
                    BaseRecord::to(self.producer.context().changelog_topic())
                        .partition(partition)
                        .key(MODULE_HISTORY_KEY)
                        .payload(value.as_slice());
                if let Err(error) = send(&self.producer, record) {
                    tracing::error!(%error, "producing a module switch failed; aborting the transaction");
                    self.abort(consumer, true);
                    std::thread::sleep(SEND_FAILURE_BACKOFF);
                    return false;
                }
                tracing::info!(
                    store = %self.config.store,
                    partition,
                    from_input_offset = position,
                    module = %version,
                    previous = history.current().map_or("none", |v| v.digest.as_str()),
                    "the partition's module switches"
                );
                self.txn
                    .as_mut()
                    .expect("a record is only checked inside a transaction")
                    .modules
                    .insert(partition, next);
            }
        }
        self.module_checked.insert(partition);
        true
    }

    /// Stops folding an active partition whose module is a later version than the
    /// processor's: its input is paused for as long as the partition is owned here (the
    /// module cannot change while the node runs), and its copy keeps serving reads, its
    /// lag growing, with `reason` stated as its error. The open transaction, which holds
    /// the partition's record, aborts and its records are read again.
    fn hold(&mut self, partition: i32, reason: String, consumer: &BaseConsumer<IngestContext>) {
        tracing::error!(
            store = %self.config.store,
            partition,
            reason,
            "not folding with an earlier module; the partition's input waits"
        );
        if let Err(error) = consumer.pause(&self.input_partitions(partition)) {
            tracing::error!(%error, partition, "pausing a held partition");
        }
        self.abort(consumer, true);
        self.held.insert(partition);
        if let Some(copy) = self.registry.get(partition) {
            copy.hold(Some(reason));
        }
    }

    /// Forgets that a partition was held (it left, or its copy is prepared again).
    fn release_held(&mut self, partition: i32) {
        if self.held.remove(&partition)
            && let Some(copy) = self.registry.get(partition)
        {
            copy.hold(None);
        }
    }

    /// Carries out a record's fold in the open transaction: its update and outputs, or its
    /// dead letter; or, if the processor cannot run, fails the partition's copy.
    fn apply(
        &mut self,
        message: &BorrowedMessage<'_>,
        record: &InputRecord<'_>,
        folded: fold::Fold,
        mark: &RecordPosition,
        consumer: &BaseConsumer<IngestContext>,
    ) {
        let partition = record.partition;
        if let Some(expected) = folded.misplaced {
            IngestMetrics::add(&self.metrics.partition_mismatches, 1);
            tracing::warn!(
                key = %String::from_utf8_lossy(record.key),
                partition,
                expected,
                offset = record.offset,
                "key arrived on another partition than Kafka's partitioner gives it; \
                 its producer does not use the murmur2 partitioner"
            );
        }
        let sent = match folded.step {
            Step::Folded(outcome) => self.produce(message, outcome, mark),
            Step::DeadLetter(reason) => self.dead_letter(message, &reason),
            Step::Unavailable(reason) => {
                let reason = format!("the processor cannot run: {reason}");
                self.fail_partition(partition, &reason, false, consumer);
                return;
            }
        };
        if let Err(error) = sent {
            // Some of the record's effects may be in the transaction and some not: none of
            // it may commit. Abort, and read the transaction's records again.
            tracing::error!(%error, "producing failed; aborting the transaction");
            self.abort(consumer, true);
            std::thread::sleep(SEND_FAILURE_BACKOFF);
        }
    }

    /// Produces a folded record's effects in the open transaction: its changelog record
    /// (with its input position in a header, and for a store over several input topics the
    /// next offset per topic in another) and output records; its update joins the
    /// transaction's overlay.
    fn produce(
        &mut self,
        message: &BorrowedMessage<'_>,
        outcome: Outcome,
        mark: &RecordPosition,
    ) -> Result<(), KafkaError> {
        let partition = message.partition();
        let key = message.key().unwrap_or_default();
        let position_text = mark.position.to_string();
        let mut headers = OwnedHeaders::new().insert(Header {
            key: INPUT_OFFSET_HEADER,
            value: Some(position_text.as_bytes()),
        });
        if let Some(offsets) = &mark.offsets {
            headers = headers.insert(Header {
                key: INPUT_OFFSETS_HEADER,
                value: Some(offsets.as_bytes()),
            });
        }
        let changelog = self.producer.context().changelog_topic();
        let pending = match outcome.update {
            Update::Unchanged => None,
            Update::Put(value) => {
                let record = BaseRecord::to(changelog)
                    .partition(partition)
                    .key(key)
                    .payload(value.as_slice())
                    .headers(headers);
                send(&self.producer, record)?;
                Some(Some(value))
            }
            Update::Delete => {
                let record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(changelog)
                    .partition(partition)
                    .key(key)
                    .headers(headers);
                send(&self.producer, record)?;
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
            send(&self.producer, record)?;
        }
        IngestMetrics::add(&self.metrics.records_processed, 1);
        Ok(())
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
        let room = self.limits.max_record_bytes / 2;
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
    /// the stores. A transaction that must abort is aborted and its records read again. A
    /// store that cannot apply its updates fails its copy (the updates are in the committed
    /// changelog, which the copy's restore applies); the other partitions go on.
    pub(super) fn commit(
        &mut self,
        consumer: &BaseConsumer<IngestContext>,
    ) -> Result<(), IngestError> {
        let Some(txn) = self.txn.as_ref() else {
            return Ok(());
        };
        let started = Instant::now();
        let mut offsets = TopicPartitionList::new();
        for (partition, next) in &txn.next_offset {
            for (topic, next) in next.iter() {
                offsets
                    .add_partition_offset(topic, *partition, Offset::Offset(next))
                    .map_err(kafka("building the offsets to commit"))?;
            }
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
        let changelog_next = self.producer.context().take_changelog_next();
        let mut failed: Vec<(i32, StoreError)> = Vec::new();
        for (partition, next_input) in &txn.next_offset {
            let Some(store) = self.stores.get(partition) else {
                continue;
            };
            let inputs = self.committed_input.entry(*partition).or_default();
            inputs.update(next_input);
            // The registry holds every owned store's position; no need to read RocksDB.
            let position = match self.registry.get(*partition) {
                Some(copy) => Ok(copy.position()),
                None => store.position(),
            };
            let empty = BTreeMap::new();
            let applied = position.and_then(|mut position| {
                position.input_next = inputs.position();
                if let Some(next) = changelog_next.get(partition) {
                    position.changelog_next = *next;
                }
                let meta = MetaUpdate {
                    inputs: Some(inputs),
                    modules: txn.modules.get(partition),
                };
                store
                    .apply_with_meta(txn.overlay.get(partition).unwrap_or(&empty), position, meta)
                    .map(|()| position)
            });
            match applied {
                Ok(position) => self.registry.set_position(*partition, position),
                Err(error) => failed.push((*partition, error)),
            }
        }
        for (partition, error) in failed {
            let reason = format!("writing committed updates to the store: {error}");
            self.fail_partition(partition, &reason, error.is_corruption(), consumer);
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
        if let Some(failure) = self.producer.context().take_failure() {
            return Err(Retry::Abort(failure));
        }
        consumer
            .commit(offsets, rdkafka::consumer::CommitMode::Sync)
            .map_err(|error| Retry::Abort(format!("committing offsets: {error}")))
    }

    /// Drops the open transaction: aborts it (exactly-once), forgets its updates and, if
    /// `rewind`, seeks the input back so that its records are read again.
    pub(super) fn abort(&mut self, consumer: &BaseConsumer<IngestContext>, rewind: bool) {
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
        self.producer.context().clear();
        IngestMetrics::add(&self.metrics.aborts, 1);
        // A switch in the aborted transaction never happened: check again.
        for partition in txn.modules.keys() {
            self.module_checked.remove(partition);
        }
        for (partition, first) in &txn.first_offset {
            for (topic, _) in first.iter() {
                self.mark_rewound(topic, *partition);
            }
            // The aborted records are read again (or, without a rewind, by whoever owns the
            // partition next). The guard goes back to where the partition stood before the
            // transaction (a rewound topic's first record may lie past that, beyond a gap of
            // transaction markers).
            match (self.next_input.get_mut(partition), rewind) {
                (Some(guard), true) => {
                    *guard = self
                        .committed_input
                        .get(partition)
                        .cloned()
                        .unwrap_or_default();
                }
                _ => {
                    self.next_input.remove(partition);
                }
            }
        }
        if rewind {
            for (partition, first) in txn.first_offset {
                if !self.owned.contains_key(&partition) {
                    continue;
                }
                for (topic, first) in first.iter() {
                    let seek =
                        consumer.seek(topic, partition, Offset::Offset(first), KAFKA_TIMEOUT);
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

    /// Commits what is open and flushes the producer, at shutdown.
    pub(super) fn finish(
        &mut self,
        consumer: &BaseConsumer<IngestContext>,
    ) -> Result<(), IngestError> {
        self.commit(consumer)
    }

    /// Lets go of the stores, at shutdown (after the consumer closed).
    pub(super) fn close(&mut self) {
        if let Err(error) = flush(&self.producer, KAFKA_TIMEOUT) {
            tracing::warn!(%error, "flushing the producer at shutdown");
        }
        self.stores.clear();
    }
}

/// Returns a record's headers as a processor sees them (no allocation for a record without).
/// Returns how many of `keys` (not empty; at least one, at most `max`) go to the processor in one
/// call: up to the first key that repeats one before it, since a record must see the
/// value its key's record before it left.
fn distinct_key_run<'k>(keys: impl Iterator<Item = &'k [u8]>, max: usize) -> usize {
    let mut seen = HashSet::new();
    keys.take(max.max(1))
        .take_while(|key| seen.insert(*key))
        .count()
        .max(1)
}

/// The record as the processor sees it.
fn input_record<'a>(
    message: &'a BorrowedMessage<'_>,
    headers: &'a [RecordHeader<'a>],
) -> InputRecord<'a> {
    InputRecord {
        topic: message.topic(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().unwrap_or_default(),
        value: message.payload(),
        timestamp_ms: message.timestamp().to_millis(),
        headers,
    }
}

fn record_headers<'a>(message: &'a BorrowedMessage<'_>) -> Vec<RecordHeader<'a>> {
    message.headers().map_or_else(Vec::new, |headers| {
        headers
            .iter()
            .map(|header| RecordHeader {
                key: header.key,
                value: header.value,
            })
            .collect()
    })
}

/// Returns the key's value as the open transaction sees it: its pending update if it has
/// one, else the store's.
fn current_value(
    txn: Option<&OpenTransaction>,
    stores: &HashMap<i32, Arc<PartitionStore>>,
    partition: i32,
    key: &[u8],
) -> Result<Option<Vec<u8>>, StoreError> {
    if let Some(pending) = txn
        .and_then(|txn| txn.overlay.get(&partition))
        .and_then(|o| o.get(key))
    {
        return Ok(pending.clone());
    }
    match stores.get(&partition) {
        Some(store) => store.get(key),
        None => Ok(None),
    }
}

pub(super) fn kafka(during: &'static str) -> impl FnOnce(KafkaError) -> IngestError {
    move |source| IngestError::Kafka { during, source }
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

#[cfg(test)]
mod tests {
    use rdkafka::error::RDKafkaErrorCode;

    use super::*;

    #[test]
    fn a_partition_is_taken_only_with_every_input_topic() {
        let inputs = ["words".to_owned(), "more".to_owned()];
        let mut list = TopicPartitionList::new();
        for (topic, partition) in [("words", 0), ("more", 0), ("words", 2), ("other", 1)] {
            list.add_partition(topic, partition);
        }
        assert_eq!(partitions_of(&list, &inputs), (vec![0], vec![2]));
        assert_eq!(partitions_of(&list, &inputs[..1]), (vec![0, 2], vec![]));
    }

    #[test]
    fn a_run_for_the_processor_ends_before_a_key_repeats_or_at_its_limit() {
        let run = |keys: &[&str], max| distinct_key_run(keys.iter().map(|k| k.as_bytes()), max);
        assert_eq!(run(&["a", "b", "c"], 16), 3);
        // The second "a" must see the first one's value: it starts the next run.
        assert_eq!(run(&["a", "b", "a", "c"], 16), 2);
        assert_eq!(run(&["a", "a"], 16), 1);
        assert_eq!(run(&["a", "b", "c", "d"], 2), 2);
        // A run holds at least one record, whatever the limit.
        assert_eq!(run(&["a"], 0), 1);
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
    fn a_pending_update_wins_over_the_store() {
        let mut txn = OpenTransaction::new();
        txn.overlay
            .entry(3)
            .or_default()
            .insert(b"k".to_vec(), None);
        let stores = HashMap::new();
        assert_eq!(current_value(Some(&txn), &stores, 3, b"k").unwrap(), None);
        txn.overlay
            .entry(3)
            .or_default()
            .insert(b"k".to_vec(), Some(b"v".to_vec()));
        assert_eq!(
            current_value(Some(&txn), &stores, 3, b"k").unwrap(),
            Some(b"v".to_vec())
        );
        // No copy, no pending update: nothing.
        assert_eq!(current_value(None, &stores, 3, b"k").unwrap(), None);
    }
}
