//! The state updater: one thread and one changelog consumer per node that apply the
//! changelog to every local copy that is not active, standby and restoring alike, off the
//! group consumer's poll loop.
//!
//! The consumer reads committed records only, so an aborted transaction never reaches a
//! store. Records are applied in batches per partition, each batch with the position it
//! reaches in the same write batch, so an update interrupted by a crash resumes where it
//! stopped. A batch is written when it is large, when the consumer has caught up with the
//! partition, or after [`FLUSH_INTERVAL`], so a standby lags its active by about that much.
//!
//! A copy followed as a standby is followed for as long as it is wanted. A copy followed to
//! restore it (its partition was assigned to this node) is followed to the end of its
//! changelog partition and then handed back: only when no transaction is open there, so a
//! previous owner's transaction that commits late is never missed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};

use super::{CopyEvent, Work};
use crate::input_offsets::InputOffsets;
use crate::kafka::{
    INPUT_OFFSET_HEADER, INPUT_OFFSETS_HEADER, INPUT_REWIND_HEADER, MODULE_HISTORY_KEY,
};
use crate::probes::Pulse;
use crate::processor::versions::ModuleHistory;
use crate::registry::Registry;
use crate::store::{MetaUpdate, PartitionStore, Position, StoreError};

/// The most records applied to one store in one write batch.
const BATCH_RECORDS: usize = 10_000;

/// The longest a record waits in a batch before it is applied (and readable).
const FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// How long one poll of the changelog consumer waits for a record.
const POLL_TIMEOUT: Duration = Duration::from_millis(20);

/// How long an idle updater waits for a command before it comes around (for liveness).
const IDLE_ROUND: Duration = Duration::from_secs(1);

/// How often the jobs are looked over for batches due and restores at their end (not after
/// every record: a node may follow many partitions).
const SCAN_INTERVAL: Duration = Duration::from_millis(10);

/// How often a restore that waits for an open transaction asks for the changelog's end.
const END_RECHECK: Duration = Duration::from_millis(500);

/// How long one question for the changelog's end may take.
const END_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a restore finds the changelog's end out of reach before it says it waits for an
/// open transaction (before that, records on their way explain it).
const OPEN_TRANSACTION_WARNING: Duration = Duration::from_secs(2);

/// The longest a restore waits for an open transaction at the changelog's end: the broker's
/// default `transaction.max.timeout.ms`, after which no transaction can still be open.
const TRANSACTION_WAIT_LIMIT: Duration = Duration::from_secs(15 * 60);

/// Why a copy is followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// Keep it current for as long as it is wanted.
    Standby,
    /// Bring it to the end of its changelog, then report [`CopyEvent::Restored`]. The
    /// generation tells a stale restore's result from the current one.
    Restore {
        /// Which restore of the partition this is.
        generation: u64,
    },
}

enum Command {
    Follow {
        partition: i32,
        store: Arc<PartitionStore>,
        follow: Follow,
    },
    Stop {
        partition: i32,
    },
    Shutdown,
}

/// What the updater has done, for metrics.
#[derive(Debug, Default)]
pub struct UpdaterMetrics {
    /// Changelog records applied to standby and restoring copies.
    pub records: AtomicU64,
    /// Copies it stopped following because their store failed.
    pub failures: AtomicU64,
}

/// The handle of the state updater thread. Cloned handles send to the same thread.
#[derive(Clone)]
pub struct StateUpdater {
    commands: Sender<Command>,
}

impl std::fmt::Debug for StateUpdater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateUpdater").finish_non_exhaustive()
    }
}

/// The updater's thread and the restore results it reports.
#[derive(Debug)]
pub struct UpdaterThread {
    thread: Option<JoinHandle<()>>,
    updater: StateUpdater,
}

/// The channels the updater reports on.
#[derive(Debug, Clone)]
pub struct Reports {
    /// Finished restores, to ingest.
    pub restored: Sender<CopyEvent>,
    /// Copies whose store failed, to the copies' lifecycle (which retries them).
    pub failed: Sender<Work>,
}

/// Starts the state updater thread, which creates its Kafka clients after lowering its own
/// CPU priority to `niceness` (librdkafka's threads inherit it). Finished restores and
/// failed copies are reported on `reports`; `pulse` says it comes around. If the thread
/// dies, the registry says so (the node's health turns NOT_SERVING).
// The node wires each of these separately; a struct for them would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    client: &ClientConfig,
    changelog_topic: String,
    first_input: String,
    group_id: String,
    niceness: u8,
    registry: Arc<Registry>,
    metrics: Arc<UpdaterMetrics>,
    reports: Reports,
    pulse: Arc<Pulse>,
) -> Result<UpdaterThread, KafkaError> {
    let client = client.clone();
    let (commands, command_rx) = mpsc::channel();
    let (created_tx, created_rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("kstore-updater".into())
        .spawn(move || {
            crate::kafka::lower_priority(niceness);
            let worker = match Worker::new(&client, changelog_topic, first_input, group_id) {
                Ok(worker) => worker,
                Err(error) => {
                    let _ = created_tx.send(Err(error));
                    return;
                }
            };
            let _ = created_tx.send(Ok(()));
            let watchdog = crate::registry::Watchdog::new(registry.clone(), "state updater");
            worker.run(command_rx, &registry, &metrics, &reports, &pulse);
            pulse.stop();
            watchdog.ended_as_asked();
        })
        .expect("spawning the state updater thread");
    match created_rx.recv() {
        Ok(Ok(())) => Ok(UpdaterThread {
            thread: Some(thread),
            updater: StateUpdater { commands },
        }),
        Ok(Err(error)) => {
            let _ = thread.join();
            Err(error)
        }
        Err(_) => Err(KafkaError::ClientCreation(
            "the state updater thread ended before creating its consumer".into(),
        )),
    }
}

impl UpdaterThread {
    /// Returns a handle that sends commands to the thread.
    pub fn updater(&self) -> StateUpdater {
        self.updater.clone()
    }

    /// Stops the thread (what each copy has applied so far is written) and waits for it.
    pub fn stop(&mut self) {
        let _ = self.updater.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for UpdaterThread {
    fn drop(&mut self) {
        self.stop();
    }
}

impl StateUpdater {
    /// Applies the partition's changelog to `store`, from the position the store holds, as
    /// `follow` says. If the partition is followed already with the same store, only the
    /// reason changes (a standby that is promoted restores just the tail it has not applied
    /// yet); with another store, the old one is written and let go first.
    pub fn follow(&self, partition: i32, store: Arc<PartitionStore>, follow: Follow) {
        let _ = self.commands.send(Command::Follow {
            partition,
            store,
            follow,
        });
    }

    /// Stops following the partition. What was applied so far is kept.
    pub fn stop(&self, partition: i32) {
        let _ = self.commands.send(Command::Stop { partition });
    }
}

struct Job {
    follow: Follow,
    store: Arc<PartitionStore>,
    position: Position,
    batch: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// The partition's module history, if a record of the batch set it.
    modules: Option<ModuleHistory>,
    /// The next offset per input topic the store holds once the batch is written: what it
    /// held when the job started, advanced (or, by a rewind, replaced) by what the records
    /// applied since state.
    inputs: InputOffsets,
    /// Whether a record of the batch stated where the input stands.
    inputs_stated: bool,
    /// The store's first input topic: a record that states no offset per topic is credited
    /// to the only topic the partition has read, or to it.
    first_input: String,
    /// When the oldest record of the batch arrived.
    batch_started: Option<Instant>,
    /// Records applied since the job started or last changed its reason.
    records: u64,
    /// The consumer reached the partition's last stable offset.
    at_stable_end: bool,
    /// When the partition's end was last compared with the position.
    end_checked: Option<Instant>,
    /// Since when a restore waits for an open transaction at the partition's end.
    waiting_since: Option<Instant>,
    /// Failed questions for the partition's end, in a row.
    end_query_failures: u32,
    /// Whether the wait for an open transaction was logged.
    warned_open_transaction: bool,
}

impl Job {
    fn new(
        follow: Follow,
        store: Arc<PartitionStore>,
        position: Position,
        inputs: InputOffsets,
        first_input: String,
    ) -> Self {
        Job {
            inputs,
            inputs_stated: false,
            first_input,
            follow,
            store,
            position,
            batch: BTreeMap::new(),
            modules: None,
            batch_started: None,
            records: 0,
            at_stable_end: false,
            end_checked: None,
            waiting_since: None,
            end_query_failures: 0,
            warned_open_transaction: false,
        }
    }

    fn flush(&mut self) -> Result<bool, StoreError> {
        if self.batch.is_empty() && self.modules.is_none() {
            return Ok(false);
        }
        let meta = MetaUpdate {
            inputs: self.inputs_stated.then_some(&self.inputs),
            modules: self.modules.as_ref(),
        };
        self.store
            .apply_with_meta(&self.batch, self.position, meta)?;
        self.batch.clear();
        self.modules = None;
        self.inputs_stated = false;
        self.batch_started = None;
        Ok(true)
    }

    /// Takes what a record with `mark` states about the next offset per input topic
    /// (`None`: it states none, so the copy's position is its only topic's next offset). A
    /// record folded again (after an aborted at-least-once batch) may state less than the
    /// store holds: each topic keeps the furthest. A rewind replaces them.
    fn note_inputs(&mut self, mark: InputMark, stated: Option<InputOffsets>) {
        let stated = stated.unwrap_or_else(|| {
            let topic = self.inputs.only_topic().unwrap_or(&self.first_input);
            InputOffsets::single(topic, self.position.input_next)
        });
        match mark {
            InputMark::RewoundTo(_) => self.inputs = stated,
            InputMark::ProducedBy(_) => self.inputs.advance_to(&stated),
        }
        self.inputs_stated = true;
    }
}

/// The changelog consumer's context: reaching a partition's end is how the updater knows a
/// copy caught up, which standbys do all the time; librdkafka also reports it as an error,
/// which is not logged.
struct ChangelogContext;

impl ClientContext for ChangelogContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            tracing::error!(%error, reason, "changelog consumer error");
        }
    }
}

impl ConsumerContext for ChangelogContext {}

struct Worker {
    consumer: BaseConsumer<ChangelogContext>,
    /// Asks for end offsets read-uncommitted: the high watermark, past open transactions.
    end_offsets: BaseConsumer,
    topic: String,
    /// The store's first input topic ([`Job::first_input`]).
    first_input: String,
    jobs: HashMap<i32, Job>,
    last_scan: Instant,
}

impl Worker {
    fn new(
        client: &ClientConfig,
        topic: String,
        first_input: String,
        group_id: String,
    ) -> Result<Self, KafkaError> {
        // librdkafka assigns partitions only in a consumer with a group id. This consumer
        // never subscribes and never commits: it only names a group.
        let consumer: BaseConsumer<ChangelogContext> = client
            .clone()
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .create_with_context(ChangelogContext)?;
        let end_offsets: BaseConsumer = client
            .clone()
            .set("isolation.level", "read_uncommitted")
            .create()?;
        Ok(Worker {
            consumer,
            end_offsets,
            topic,
            first_input,
            jobs: HashMap::new(),
            last_scan: Instant::now(),
        })
    }

    fn run(
        mut self,
        commands: Receiver<Command>,
        registry: &Registry,
        metrics: &UpdaterMetrics,
        reports: &Reports,
        pulse: &Pulse,
    ) {
        loop {
            pulse.beat();
            // Idle: wait for work (coming around now and then, for liveness). Busy: take
            // every waiting command between polls.
            let command = if self.jobs.is_empty() {
                match commands.recv_timeout(IDLE_ROUND) {
                    Err(RecvTimeoutError::Timeout) => continue,
                    other => other,
                }
            } else {
                commands.recv_timeout(Duration::ZERO)
            };
            match command {
                Ok(Command::Follow {
                    partition,
                    store,
                    follow,
                }) => self.follow(partition, store, follow, registry, reports),
                Ok(Command::Stop { partition }) => {
                    self.finish(partition, registry, reports, false);
                }
                Ok(Command::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                    let partitions: Vec<i32> = self.jobs.keys().copied().collect();
                    for partition in partitions {
                        self.finish(partition, registry, reports, false);
                    }
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.poll(registry, metrics, reports);
                }
            }
        }
    }

    fn follow(
        &mut self,
        partition: i32,
        store: Arc<PartitionStore>,
        follow: Follow,
        registry: &Registry,
        reports: &Reports,
    ) {
        if let Some(job) = self.jobs.get_mut(&partition) {
            if Arc::ptr_eq(&job.store, &store) {
                if job.follow != follow {
                    tracing::debug!(
                        partition,
                        ?follow,
                        "the copy is now followed for another reason"
                    );
                    job.follow = follow;
                    job.records = 0;
                    job.waiting_since = None;
                    job.warned_open_transaction = false;
                    job.end_checked = None;
                }
                return;
            }
            self.finish(partition, registry, reports, false);
        }
        // What the store holds now is what it has applied, whoever wrote it last.
        let stored = store
            .position()
            .and_then(|position| Ok((position, store.input_offsets(&self.first_input)?)));
        let (position, inputs) = match stored {
            Ok(stored) => stored,
            Err(error) => {
                report_failure(partition, error.to_string(), error.is_corruption(), reports);
                return;
            }
        };
        let mut list = TopicPartitionList::new();
        let offset = Offset::Offset(position.changelog_next);
        if let Err(error) = list
            .add_partition_offset(&self.topic, partition, offset)
            .and_then(|()| self.consumer.incremental_assign(&list))
        {
            let reason = format!("assigning changelog partition: {error}");
            report_failure(partition, reason, false, reports);
            return;
        }
        self.jobs.insert(
            partition,
            Job::new(follow, store, position, inputs, self.first_input.clone()),
        );
    }

    fn poll(&mut self, registry: &Registry, metrics: &UpdaterMetrics, reports: &Reports) {
        match self.consumer.poll(POLL_TIMEOUT) {
            None => {}
            Some(Ok(message)) => {
                let partition = message.partition();
                let full = Self::take(&mut self.jobs, &message, metrics);
                drop(message);
                if full {
                    self.flush(partition, registry, metrics, reports);
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                if let Some(job) = self.jobs.get_mut(&partition) {
                    job.at_stable_end = true;
                    job.end_checked = None;
                }
                self.flush(partition, registry, metrics, reports);
            }
            Some(Err(error)) => tracing::warn!(%error, "changelog consumer error"),
        }
        if self.last_scan.elapsed() < SCAN_INTERVAL {
            return;
        }
        self.last_scan = Instant::now();
        let due: Vec<i32> = self
            .jobs
            .iter()
            .filter(|(_, job)| {
                job.batch_started
                    .is_some_and(|started| started.elapsed() >= FLUSH_INTERVAL)
            })
            .map(|(partition, _)| *partition)
            .collect();
        for partition in due {
            self.flush(partition, registry, metrics, reports);
        }
        self.finish_restores_at_end(registry, reports);
    }

    /// Adds a changelog record to its partition's batch; returns whether the batch is full.
    fn take(
        jobs: &mut HashMap<i32, Job>,
        message: &BorrowedMessage<'_>,
        metrics: &UpdaterMetrics,
    ) -> bool {
        let Some(job) = jobs.get_mut(&message.partition()) else {
            return false;
        };
        let key = message.key().unwrap_or_default();
        if key == MODULE_HISTORY_KEY {
            match ModuleHistory::decode(message.payload().unwrap_or_default()) {
                Ok(history) => job.modules = Some(history),
                Err(error) => tracing::error!(
                    %error,
                    partition = message.partition(),
                    offset = message.offset(),
                    "a changelog record of the module history does not parse; ignored"
                ),
            }
        } else {
            job.batch
                .insert(key.to_vec(), message.payload().map(<[u8]>::to_vec));
        }
        job.batch_started.get_or_insert_with(Instant::now);
        let mark = input_mark_of(message);
        advance(&mut job.position, message.offset(), mark);
        if let Some(mark) = mark
            && let Some(stated) = input_offsets_of(message)
        {
            job.note_inputs(mark, stated);
        }
        // New records after the end was reached: the end is further on now.
        job.at_stable_end = false;
        job.records += 1;
        metrics.records.fetch_add(1, Ordering::Relaxed);
        job.batch.len() >= BATCH_RECORDS
    }

    /// Writes a partition's batch and publishes the position it reached, so that reads of
    /// the copy see it.
    fn flush(
        &mut self,
        partition: i32,
        registry: &Registry,
        metrics: &UpdaterMetrics,
        reports: &Reports,
    ) {
        let Some(job) = self.jobs.get_mut(&partition) else {
            return;
        };
        match job.flush() {
            Ok(true) => registry.set_position_of(&job.store, job.position),
            Ok(false) => {}
            Err(error) => {
                self.jobs.remove(&partition);
                self.unassign(partition);
                metrics.failures.fetch_add(1, Ordering::Relaxed);
                report_failure(
                    partition,
                    format!("updating the copy from its changelog: {error}"),
                    error.is_corruption(),
                    reports,
                );
            }
        }
    }

    /// Finishes the restores that reached the end of their changelog partition with no
    /// transaction open there.
    ///
    /// A read-committed consumer reaches "the end" at the last stable offset. If a previous
    /// owner's transaction is still open there (a node that stalled between writing its
    /// changelog and committing), it may yet commit, together with input offsets beyond
    /// this store's position; a restore that stopped before it would lose its updates. So a
    /// restore ends only when its position (past records and transaction markers) reaches
    /// the high watermark. Until then the copy stays readable as a restoring copy.
    fn finish_restores_at_end(&mut self, registry: &Registry, reports: &Reports) {
        let due: Vec<i32> = self
            .jobs
            .iter()
            .filter(|(_, job)| {
                matches!(job.follow, Follow::Restore { .. })
                    && job.at_stable_end
                    && job
                        .end_checked
                        .is_none_or(|checked| checked.elapsed() >= END_RECHECK)
            })
            .map(|(partition, _)| *partition)
            .collect();
        for partition in due {
            if self.transaction_open_at_end(partition) == Some(false) {
                self.finish(partition, registry, reports, true);
            }
        }
    }

    /// Whether the changelog partition ends in an open transaction; `None` if that cannot
    /// be told right now (it is asked again shortly).
    fn transaction_open_at_end(&mut self, partition: i32) -> Option<bool> {
        let job = self.jobs.get_mut(&partition)?;
        job.end_checked = Some(Instant::now());
        let (start, end) =
            match self
                .end_offsets
                .fetch_watermarks(&self.topic, partition, END_QUERY_TIMEOUT)
            {
                Ok(watermarks) => {
                    job.end_query_failures = 0;
                    watermarks
                }
                Err(error) => {
                    job.end_query_failures += 1;
                    if job.end_query_failures % 20 == 1 {
                        tracing::warn!(
                            %error,
                            partition,
                            failures = job.end_query_failures,
                            "cannot ask for the changelog's end; the restore asks again"
                        );
                    }
                    return None;
                }
            };
        // The consumer's position moves past every record and transaction marker it hands
        // over. Before it handed over any, it is where the restore began, or the log's start
        // if that was deleted.
        let position = self
            .consumer
            .position()
            .ok()
            .and_then(|positions| {
                positions
                    .find_partition(&self.topic, partition)
                    .and_then(|p| p.offset().to_raw())
            })
            .unwrap_or(-1)
            .max(job.position.changelog_next)
            .max(start);
        if position >= end {
            return Some(false);
        }
        // Short of the end: records not read yet, or an open transaction.
        let waiting_since = *job.waiting_since.get_or_insert_with(Instant::now);
        if waiting_since.elapsed() >= OPEN_TRANSACTION_WARNING && !job.warned_open_transaction {
            job.warned_open_transaction = true;
            tracing::warn!(
                partition,
                position,
                end,
                "the changelog partition ends in an open transaction (a previous owner's); the \
                 restore waits until it commits or aborts"
            );
        }
        // The broker aborts any transaction after transaction.max.timeout.ms (15 minutes by
        // default): past that, whatever keeps the position short of the end is no open
        // transaction.
        if waiting_since.elapsed() >= TRANSACTION_WAIT_LIMIT {
            tracing::warn!(
                partition,
                position,
                end,
                "the changelog's end stayed out of reach for {TRANSACTION_WAIT_LIMIT:?}; the \
                 restore ends where it is"
            );
            return Some(false);
        }
        Some(true)
    }

    /// Writes what is left, stops reading the partition and, if `restored`, reports it.
    fn finish(&mut self, partition: i32, registry: &Registry, reports: &Reports, restored: bool) {
        let Some(mut job) = self.jobs.remove(&partition) else {
            return;
        };
        self.unassign(partition);
        match job.flush() {
            Ok(_) => registry.set_position_of(&job.store, job.position),
            Err(error) => {
                report_failure(
                    partition,
                    format!("updating the copy from its changelog: {error}"),
                    error.is_corruption(),
                    reports,
                );
                return;
            }
        }
        if let (true, Follow::Restore { generation }) = (restored, job.follow) {
            let _ = reports.restored.send(CopyEvent::Restored {
                partition,
                generation,
                records: job.records,
                position: job.position,
            });
        }
    }

    fn unassign(&self, partition: i32) {
        let mut list = TopicPartitionList::new();
        list.add_partition(&self.topic, partition);
        if let Err(error) = self.consumer.incremental_unassign(&list) {
            tracing::warn!(%error, partition, "unassigning a changelog partition");
        }
    }
}

/// A copy the updater could not update goes to the copies' lifecycle: it fails, and is
/// retried (ingest hears of it if it owns the partition).
fn report_failure(partition: i32, reason: String, damaged: bool, reports: &Reports) {
    let _ = reports.failed.send(Work::Failed {
        partition,
        reason,
        damaged,
    });
}

/// Changelog records whose input-offset or rewind header does not hold an offset (the
/// record is applied; the copy's input position does not move for it).
pub const BAD_HEADERS: &str = "kstore_changelog_bad_headers_total";

/// Returns the input offset that a changelog record carries in its header.
pub(crate) fn input_mark_of(message: &BorrowedMessage<'_>) -> Option<InputMark> {
    use rdkafka::message::Headers;
    let headers = message.headers()?;
    let value = |name: &str| headers.iter().find(|h| h.key == name).map(|h| h.value);
    match input_mark(value(INPUT_REWIND_HEADER), value(INPUT_OFFSET_HEADER)) {
        Ok(mark) => mark,
        Err(()) => {
            metrics::counter!(BAD_HEADERS).increment(1);
            tracing::debug!(
                offset = message.offset(),
                partition = message.partition(),
                "a changelog record's input header does not hold an offset"
            );
            None
        }
    }
}

/// Returns the next offset per input topic that a changelog record of a store over several
/// input topics carries (`Some(None)`: the record carries none), or `None` if its header
/// does not parse.
fn input_offsets_of(message: &BorrowedMessage<'_>) -> Option<Option<InputOffsets>> {
    use rdkafka::message::Headers;
    let Some(header) = message
        .headers()
        .and_then(|headers| headers.iter().find(|h| h.key == INPUT_OFFSETS_HEADER))
    else {
        return Some(None);
    };
    match InputOffsets::decode(header.value.unwrap_or_default()) {
        Ok(offsets) => Some(Some(offsets)),
        Err(error) => {
            metrics::counter!(BAD_HEADERS).increment(1);
            tracing::debug!(
                %error,
                offset = message.offset(),
                partition = message.partition(),
                "a changelog record's input offsets header does not parse"
            );
            None
        }
    }
}

/// The input mark of a record's header values (`None`: no such header; `Some(None)`: a
/// header without a value). A rewind wins over an input offset. `Err` if a header present
/// does not hold an offset.
fn input_mark(
    rewind: Option<Option<&[u8]>>,
    produced: Option<Option<&[u8]>>,
) -> Result<Option<InputMark>, ()> {
    let offset = |value: Option<&[u8]>| value.and_then(parse_offset).ok_or(());
    if let Some(value) = rewind {
        return offset(value).map(|o| Some(InputMark::RewoundTo(o)));
    }
    if let Some(value) = produced {
        return offset(value).map(|o| Some(InputMark::ProducedBy(o)));
    }
    Ok(None)
}

/// Parses an offset as a header holds it: decimal ASCII digits only (no sign, no space),
/// below `i64::MAX` (so that the offset after it is one too).
fn parse_offset(text: &[u8]) -> Option<i64> {
    if text.is_empty() || text.len() > 19 || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(text)
        .ok()?
        .parse::<i64>()
        .ok()
        .filter(|&offset| offset < i64::MAX)
}

/// What a changelog record says about the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InputMark {
    /// The input record at this offset produced it.
    ProducedBy(i64),
    /// A point-in-time restore wrote it: from here on the copy reflects the input before
    /// this offset (which the group reprocesses from).
    RewoundTo(i64),
}

/// The position a store reaches after applying a changelog record at `offset` that carries
/// `mark`.
pub(crate) fn advance(position: &mut Position, offset: i64, mark: Option<InputMark>) {
    position.changelog_next = position.changelog_next.max(offset.saturating_add(1));
    match mark {
        Some(InputMark::ProducedBy(input)) => {
            position.input_next = position.input_next.max(input.saturating_add(1));
        }
        Some(InputMark::RewoundTo(input)) => position.input_next = input,
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_rewind_wins_and_a_header_that_holds_no_offset_is_refused() {
        assert_eq!(
            input_mark(Some(Some(b"40")), Some(Some(b"99"))),
            Ok(Some(InputMark::RewoundTo(40)))
        );
        assert_eq!(
            input_mark(None, Some(Some(b"99"))),
            Ok(Some(InputMark::ProducedBy(99)))
        );
        assert_eq!(input_mark(None, None), Ok(None));
        let max = i64::MAX.to_string();
        for bad in [
            &b""[..],
            b"-1",
            b"+1",
            b" 1",
            b"1e3",
            b"0x10",
            max.as_bytes(),
            b"\xff",
        ] {
            assert_eq!(input_mark(None, Some(Some(bad))), Err(()), "{bad:?}");
        }
        assert_eq!(input_mark(Some(None), None), Err(()));
    }

    proptest! {
        #[test]
        fn offset_headers_round_trip_and_any_bytes_never_panic(
            offset in 0..i64::MAX,
            bytes in proptest::collection::vec(any::<u8>(), 0..24),
            changelog in any::<i64>(),
            start in any::<(i64, i64)>(),
        ) {
            prop_assert_eq!(parse_offset(offset.to_string().as_bytes()), Some(offset));
            let parsed = parse_offset(&bytes);
            if let Some(parsed) = parsed {
                prop_assert!((0..i64::MAX).contains(&parsed));
            }
            // Whatever the record says, applying it never panics.
            let mut position = Position { changelog_next: start.0, input_next: start.1 };
            let mark = input_mark(None, Some(Some(&bytes))).ok().flatten();
            advance(&mut position, changelog, mark);
            advance(&mut position, changelog, Some(InputMark::ProducedBy(i64::MAX)));
        }
    }
}
