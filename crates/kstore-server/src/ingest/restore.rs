//! Restore: replays a partition's changelog from its store's position to the end, on a
//! thread and consumer of its own, so the group consumer's poll loop never waits for it.
//!
//! The restore consumer reads committed records only, so an aborted transaction never
//! reaches a store. A restore ends only when no transaction is open at the end of the
//! changelog partition, so a transaction that commits late is never missed. Records are
//! applied in batches, each with the position it reaches, so a restore interrupted by a
//! crash resumes where it stopped.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use super::{IngestMetrics, advance, input_offset_of};
use crate::registry::Registry;
use crate::store::{PartitionStore, Position};

/// Records applied to a store in one write batch during a restore.
const RESTORE_BATCH_RECORDS: usize = 10_000;

/// How often a restore that waits for an open transaction asks for the changelog's end.
const END_RECHECK: Duration = Duration::from_millis(500);

/// How long one question for the changelog's end may take.
const END_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest a restore waits for an open transaction at the changelog's end: the broker's
/// default `transaction.max.timeout.ms`, after which no transaction can still be open.
const TRANSACTION_WAIT_LIMIT: Duration = Duration::from_secs(15 * 60);

enum Command {
    Restore {
        partition: i32,
        generation: u64,
        store: Arc<PartitionStore>,
        position: Position,
    },
    Cancel {
        partition: i32,
    },
    Stop,
}

/// What a restore came to.
#[derive(Debug)]
pub enum RestoreEvent {
    /// The store has applied its changelog up to the end.
    Done {
        /// The partition.
        partition: i32,
        /// Which restore of the partition finished.
        generation: u64,
        /// How many changelog records were replayed.
        records: u64,
        /// The store's position afterwards.
        position: Position,
    },
    /// The restore failed; the partition cannot be served from this store.
    Failed {
        /// The partition.
        partition: i32,
        /// Why.
        reason: String,
    },
}

/// The handle of the restore thread.
pub struct Restorer {
    commands: Sender<Command>,
    events: Receiver<RestoreEvent>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Restorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restorer").finish_non_exhaustive()
    }
}

impl Restorer {
    /// Starts the restore thread with a consumer of the changelog topic.
    pub fn spawn(
        client: &ClientConfig,
        changelog_topic: String,
        group_id: String,
        registry: Arc<Registry>,
        metrics: Arc<IngestMetrics>,
    ) -> Result<Self, KafkaError> {
        // librdkafka assigns partitions only in a consumer with a group id. This consumer
        // never subscribes and never commits: it only names a group.
        let consumer: BaseConsumer = client
            .clone()
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .create()?;
        let end_offsets: BaseConsumer = client
            .clone()
            .set("isolation.level", "read_uncommitted")
            .create()?;
        let (commands, command_rx) = mpsc::channel();
        let (event_tx, events) = mpsc::channel();
        let worker = Worker {
            consumer,
            end_offsets,
            topic: changelog_topic,
            active: HashMap::new(),
            events: event_tx,
            registry,
            metrics,
        };
        let thread = std::thread::Builder::new()
            .name("kstore-restore".into())
            .spawn(move || worker.run(command_rx))
            .expect("spawning the restore thread");
        Ok(Restorer {
            commands,
            events,
            thread: Some(thread),
        })
    }

    /// Replays the partition's changelog from `position` into `store`.
    pub fn restore(
        &self,
        partition: i32,
        generation: u64,
        store: Arc<PartitionStore>,
        position: Position,
    ) {
        let _ = self.commands.send(Command::Restore {
            partition,
            generation,
            store,
            position,
        });
    }

    /// Stops restoring the partition (it was revoked). What was replayed so far is kept.
    pub fn cancel(&self, partition: i32) {
        let _ = self.commands.send(Command::Cancel { partition });
    }

    /// Returns a finished restore, if any.
    pub fn try_event(&self) -> Option<RestoreEvent> {
        self.events.try_recv().ok()
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Restorer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Job {
    generation: u64,
    store: Arc<PartitionStore>,
    position: Position,
    batch: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    records: u64,
    /// The consumer reached the partition's last stable offset.
    at_stable_end: bool,
    /// When the partition's end was last compared with the position.
    end_checked: Option<Instant>,
    /// Since when the restore waits for an open transaction at the partition's end.
    waiting_since: Option<Instant>,
    /// Failed questions for the partition's end, in a row.
    end_query_failures: u32,
}

impl Job {
    fn flush(&mut self) -> Result<(), String> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.store
            .apply(&self.batch, self.position)
            .map_err(|e| e.to_string())?;
        self.batch.clear();
        Ok(())
    }
}

struct Worker {
    consumer: BaseConsumer,
    /// Asks for end offsets read-uncommitted: the high watermark, past open transactions.
    end_offsets: BaseConsumer,
    topic: String,
    active: HashMap<i32, Job>,
    events: Sender<RestoreEvent>,
    registry: Arc<Registry>,
    metrics: Arc<IngestMetrics>,
}

impl Worker {
    fn run(mut self, commands: Receiver<Command>) {
        loop {
            // Idle: wait for work. Busy: take commands between polls.
            let command = if self.active.is_empty() {
                match commands.recv() {
                    Ok(command) => Some(command),
                    Err(_) => return,
                }
            } else {
                match commands.recv_timeout(Duration::ZERO) {
                    Ok(command) => Some(command),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            };
            match command {
                Some(Command::Restore {
                    partition,
                    generation,
                    store,
                    position,
                }) => {
                    self.start(partition, generation, store, position);
                }
                Some(Command::Cancel { partition }) => self.finish(partition, false),
                Some(Command::Stop) => return,
                None => self.poll(),
            }
        }
    }

    fn start(
        &mut self,
        partition: i32,
        generation: u64,
        store: Arc<PartitionStore>,
        position: Position,
    ) {
        if self.active.contains_key(&partition) {
            self.finish(partition, false);
        }
        let mut list = TopicPartitionList::new();
        let offset = Offset::Offset(position.changelog_next);
        if let Err(error) = list
            .add_partition_offset(&self.topic, partition, offset)
            .and_then(|()| self.consumer.incremental_assign(&list))
        {
            let reason = format!("assigning changelog partition: {error}");
            let _ = self.events.send(RestoreEvent::Failed { partition, reason });
            return;
        }
        self.active.insert(
            partition,
            Job {
                generation,
                store,
                position,
                batch: BTreeMap::new(),
                records: 0,
                at_stable_end: false,
                end_checked: None,
                waiting_since: None,
                end_query_failures: 0,
            },
        );
    }

    fn poll(&mut self) {
        match self.consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(message)) => {
                let Some(job) = self.active.get_mut(&message.partition()) else {
                    return;
                };
                let key = message.key().unwrap_or_default().to_vec();
                job.batch.insert(key, message.payload().map(<[u8]>::to_vec));
                advance(
                    &mut job.position,
                    message.offset(),
                    input_offset_of(&message),
                );
                job.records += 1;
                IngestMetrics::add(&self.metrics.restored_records, 1);
                if job.batch.len() >= RESTORE_BATCH_RECORDS {
                    let partition = message.partition();
                    drop(message);
                    match job.flush() {
                        // Reads of the restoring copy see its progress.
                        Ok(()) => self.registry.set_position(partition, job.position),
                        Err(reason) => self.fail(partition, reason),
                    }
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                if let Some(job) = self.active.get_mut(&partition) {
                    job.at_stable_end = true;
                    job.end_checked = None;
                }
            }
            Some(Err(error)) => tracing::warn!(%error, "restore consumer error"),
        }
        self.finish_jobs_at_end();
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
    fn finish_jobs_at_end(&mut self) {
        let due: Vec<i32> = self
            .active
            .iter()
            .filter(|(_, job)| {
                job.at_stable_end
                    && job
                        .end_checked
                        .is_none_or(|checked| checked.elapsed() >= END_RECHECK)
            })
            .map(|(partition, _)| *partition)
            .collect();
        for partition in due {
            if self.transaction_open_at_end(partition) == Some(false) {
                self.finish(partition, true);
            }
        }
    }

    /// Whether the changelog partition ends in an open transaction; `None` if that cannot
    /// be told right now (it is asked again shortly).
    fn transaction_open_at_end(&mut self, partition: i32) -> Option<bool> {
        let job = self.active.get_mut(&partition)?;
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
        let waiting_since = *job.waiting_since.get_or_insert_with(|| {
            tracing::warn!(
                partition,
                position,
                end,
                "the changelog partition ends in an open transaction (a previous owner's); the \
                 restore waits until it commits or aborts"
            );
            Instant::now()
        });
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

    fn fail(&mut self, partition: i32, reason: String) {
        self.active.remove(&partition);
        self.unassign(partition);
        let _ = self.events.send(RestoreEvent::Failed { partition, reason });
    }

    /// Applies what is left, stops reading the partition and, if `done`, reports it.
    fn finish(&mut self, partition: i32, done: bool) {
        let Some(mut job) = self.active.remove(&partition) else {
            return;
        };
        self.unassign(partition);
        if let Err(reason) = job.flush() {
            let _ = self.events.send(RestoreEvent::Failed { partition, reason });
            return;
        }
        if done {
            let event = RestoreEvent::Done {
                partition,
                generation: job.generation,
                records: job.records,
                position: job.position,
            };
            let _ = self.events.send(event);
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
