//! Point-in-time restore, for logic bugs: every chosen partition goes back to its backup
//! from before a point, and the group reprocesses the input from the offsets those backups
//! recorded (with a fixed processor).
//!
//! The changelog is the state's log, so the restore is written into it: for every key that
//! a changelog record after the backup touched, a correction record carries the key's value
//! in the backup (or a tombstone if the backup lacks it), marked with the
//! `kstore.input-rewind` header. Any copy that applies the changelog to its end (an active
//! restoring at start, a standby, a copy rebuilt from scratch) then holds the backup's state
//! and reflects the input before the backup's input offset, whatever it held before. Then
//! the group's committed input offsets (of each input topic) are rewound to the backups'
//! input offsets, and the nodes, started again, reprocess from there. Nothing is deleted;
//! the bad records stay in the changelog's history, superseded. A partition whose module switched after the
//! backup gets the backup's module history back the same way (a module that took over
//! later folded none of the input reprocessed), so the module that folded before the switch
//! folds again without `rollback`.
//!
//! The group must be empty (every node of the app stopped): Kafka refuses offset commits
//! for a group with members, and a running active would write on top of the corrections.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::backup::{Backups, CatalogEntry};
use crate::config::NodeConfig;
use crate::input_offsets::InputOffsets;
use crate::kafka::{INPUT_OFFSETS_HEADER, INPUT_REWIND_HEADER, MODULE_HISTORY_KEY, send};
use crate::store::{PartitionStore, SharedMemory};

const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

/// Where to restore to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestorePoint {
    /// Each partition's newest backup made at or before this time (ms since the epoch).
    Time(u64),
    /// One backup, by id (with exactly one partition).
    Backup(u32),
}

/// Parses a restore point's time: milliseconds since the epoch, or a UTC date and time as
/// `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM`, `YYYY-MM-DDTHH:MM:SS` (a trailing `Z` is allowed).
pub fn parse_time(text: &str) -> Result<u64, String> {
    if let Ok(millis) = text.parse::<u64>() {
        return Ok(millis);
    }
    let bad = || {
        format!(
            "{text:?} is not a time: use milliseconds since the epoch or a UTC time such as \
             2026-11-28T03:00:00Z"
        )
    };
    let text = text.trim_end_matches('Z');
    let (date, time) = text.split_once(['T', ' ']).unwrap_or((text, "00:00:00"));
    let numbers = |part: &str, sep: char| -> Result<Vec<i64>, String> {
        part.split(sep)
            .map(|n| n.parse::<i64>().map_err(|_| bad()))
            .collect()
    };
    let date = numbers(date, '-')?;
    let time = numbers(time, ':')?;
    let (&[year, month, day], [hour, minute, rest @ ..]) = (date.as_slice(), time.as_slice())
    else {
        return Err(bad());
    };
    let second = rest.first().copied().unwrap_or(0);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || *hour > 23
        || *minute > 59
        || second > 59
        || rest.len() > 1
    {
        return Err(bad());
    }
    // Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second;
    u64::try_from(seconds * 1_000).map_err(|_| bad())
}

/// What a restore does to one partition.
#[derive(Debug, Clone)]
pub struct PartitionPlan {
    /// The partition.
    pub partition: u32,
    /// The backup it goes back to.
    pub backup: CatalogEntry,
    /// The next offset per input topic the backup reflects: where the group reprocesses
    /// from.
    pub inputs: InputOffsets,
    /// The input's next position now (the sum of the input topics' end offsets).
    pub input_end: i64,
    /// The changelog's next offset now: records from the backup's offset up to it are
    /// superseded.
    pub changelog_end: i64,
}

impl PartitionPlan {
    /// Input records the group reprocesses.
    pub fn events_to_reprocess(&self) -> i64 {
        (self.input_end - self.backup.input_next).max(0)
    }
}

/// A restore could not be planned or done; each says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PointInTimeError {
    /// Nothing to restore from.
    #[error("{0}")]
    Refused(String),
    /// Kafka failed.
    #[error("{what}: {source}")]
    Kafka {
        /// What was being done.
        what: String,
        /// Why.
        source: rdkafka::error::KafkaError,
    },
    /// A backup failed.
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    /// The restored backup could not be read.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

fn kafka(what: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> PointInTimeError {
    let what = what.into();
    move |source| PointInTimeError::Kafka { what, source }
}

/// Chooses each partition's backup and checks that the input still holds what must be
/// reprocessed. `partitions` empty means every partition.
pub fn plan(
    config: &NodeConfig,
    point: RestorePoint,
    partitions: &[u32],
) -> Result<Vec<PartitionPlan>, PointInTimeError> {
    let client = crate::kafka::client_config(config);
    let count = crate::topics::input_partition_count(config, &client)
        .map_err(|e| PointInTimeError::Refused(e.to_string()))?;
    let backups = Backups::from_config(config, count, SharedMemory::new(&config.memory))
        .ok_or_else(|| PointInTimeError::Refused("no backup location: set `backup.dir`".into()))?;
    let chosen: Vec<u32> = if partitions.is_empty() {
        (0..count).collect()
    } else {
        partitions.to_vec()
    };
    if let RestorePoint::Backup(id) = point
        && chosen.len() != 1
    {
        return Err(PointInTimeError::Refused(format!(
            "backup {id} names a backup of one partition: name exactly one partition"
        )));
    }
    let consumer: BaseConsumer = client.create().map_err(kafka("creating a Kafka client"))?;
    let mut plans = Vec::new();
    for partition in chosen {
        if partition >= count {
            return Err(PointInTimeError::Refused(format!(
                "partition {partition} does not exist (the input has {count})"
            )));
        }
        let (entries, _) = backups.list(partition)?;
        let backup = entries
            .into_iter()
            .rev()
            .filter(|e| backups.foreign(e, partition).is_none())
            .find(|e| match point {
                RestorePoint::Time(at) => e.created_at_ms <= at,
                RestorePoint::Backup(id) => e.backup_id == id,
            })
            .ok_or_else(|| {
                PointInTimeError::Refused(match point {
                    RestorePoint::Time(_) => format!(
                        "partition {partition} has no backup from at or before that time \
                         (`kstore backup list --partitions {partition}` shows what there is)"
                    ),
                    RestorePoint::Backup(id) => {
                        format!("partition {partition} has no backup {id}")
                    }
                })
            })?;
        let inputs = backup_inputs(config, &backup);
        let mut input_end = 0i64;
        for topic in config.inputs() {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition as i32, KAFKA_TIMEOUT)
                .map_err(kafka(format!("reading the offsets of input topic {topic}")))?;
            let next = inputs.get(topic).unwrap_or(0);
            if low > next {
                return Err(PointInTimeError::Refused(format!(
                    "partition {partition}: backup {} reflects input topic {topic} up to offset \
                     {next}, but it now starts at {low} (retention deleted the records in \
                     between), so they cannot be reprocessed; choose a later point",
                    backup.backup_id
                )));
            }
            input_end = input_end.saturating_add(high);
        }
        let (_, changelog_end) = consumer
            .fetch_watermarks(&config.changelog_topic(), partition as i32, KAFKA_TIMEOUT)
            .map_err(kafka("reading the changelog's offsets"))?;
        plans.push(PartitionPlan {
            partition,
            backup,
            inputs,
            input_end,
            changelog_end,
        });
    }
    Ok(plans)
}

/// The next offset per input topic a backup reflects: those its catalog entry states, or,
/// for a backup of a store that read one topic, its input position in the first input topic.
fn backup_inputs(config: &NodeConfig, backup: &CatalogEntry) -> InputOffsets {
    if backup.input_offsets.is_empty() {
        InputOffsets::single(&config.inputs()[0], backup.input_next)
    } else {
        InputOffsets::from_map(backup.input_offsets.clone())
    }
}

/// The headers of a correction record: the input position it rewinds to, and the next
/// offset per input topic.
fn rewind_headers(plan: &PartitionPlan) -> OwnedHeaders {
    let rewind = plan.backup.input_next.to_string();
    let offsets = plan.inputs.encode();
    OwnedHeaders::new()
        .insert(Header {
            key: INPUT_REWIND_HEADER,
            value: Some(rewind.as_bytes()),
        })
        .insert(Header {
            key: INPUT_OFFSETS_HEADER,
            value: Some(offsets.as_bytes()),
        })
}

/// Refuses unless the store's consumer group has no members.
pub fn check_group_empty(config: &NodeConfig) -> Result<(), PointInTimeError> {
    let consumer: BaseConsumer = crate::kafka::client_config(config)
        .create()
        .map_err(kafka("creating a Kafka client"))?;
    let group_id = config.group_id();
    let groups = consumer
        .fetch_group_list(Some(group_id), KAFKA_TIMEOUT)
        .map_err(kafka("describing the consumer group"))?;
    if let Some(group) = groups.groups().iter().find(|g| g.name() == group_id)
        && !group.members().is_empty()
    {
        let members: Vec<&str> = group.members().iter().map(|m| m.client_id()).collect();
        return Err(PointInTimeError::Refused(format!(
            "the group {group_id} has {} members ({}): stop every node of the app first",
            members.len(),
            members.join(", ")
        )));
    }
    Ok(())
}

/// Carries out a plan: corrections into the changelog, then the group's offsets rewound.
/// `scratch` is a directory for the restored backups (removed afterwards). Returns the
/// corrections written per partition.
pub fn execute(
    config: &NodeConfig,
    plans: &[PartitionPlan],
    scratch: &Path,
    mut progress: impl FnMut(&str),
) -> Result<Vec<(u32, u64)>, PointInTimeError> {
    check_group_empty(config)?;
    let client = crate::kafka::client_config(config);
    let count = plans.first().map_or(0, |p| p.backup.partition_count);
    let memory = SharedMemory::new(&config.memory);
    let backups = Backups::from_config(config, count, memory.clone())
        .ok_or_else(|| PointInTimeError::Refused("no backup location: set `backup.dir`".into()))?;
    let producer: BaseProducer = client
        .clone()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .map_err(kafka("creating the changelog producer"))?;
    let changelog = config.changelog_topic();
    let mut written = Vec::new();
    for plan in plans {
        let partition = plan.partition;
        let verification = backups.verify(&plan.backup)?;
        if !verification.ok() {
            return Err(PointInTimeError::Refused(format!(
                "backup {} of partition {partition} is damaged: {}",
                plan.backup.backup_id,
                verification.problems.join("; ")
            )));
        }
        let dir = scratch.join(format!("restore-{partition}"));
        let _ = std::fs::remove_dir_all(&dir);
        backups.restore(&plan.backup, &dir)?;
        let restored = PartitionStore::open(&dir, &memory)?;
        progress(&format!(
            "partition {partition}: restored backup {}; reading the changelog after it",
            plan.backup.backup_id
        ));
        let mut keys = keys_after(&client, &changelog, partition, plan.backup.changelog_next)?;
        // A module that took over after the backup (or, in a backup of a standby, a switch
        // recorded before the input it folds from) did not fold the input reprocessed from
        // the backup: the partition's module history goes back to what had folded by then.
        let backed_up = restored.module_history()?;
        let folded = backed_up.folded_before(plan.backup.input_next);
        if keys.remove(MODULE_HISTORY_KEY) || folded != backed_up {
            let history = folded.encode();
            let headers = rewind_headers(plan);
            let record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&changelog)
                .partition(partition as i32)
                .key(MODULE_HISTORY_KEY)
                .payload(history.as_slice())
                .headers(headers);
            send(&producer, record).map_err(kafka("writing the module history back"))?;
        }
        // Then one more record, so that even a partition with nothing to correct tells every
        // copy where the input stands now.
        let marker = restored_marker_key();
        let corrections = keys
            .iter()
            .map(|key| Ok::<_, PointInTimeError>((key.as_slice(), restored.get(key)?)))
            .chain(std::iter::once(Ok((marker.as_slice(), None))));
        for correction in corrections {
            let (key, value): (&[u8], Option<Vec<u8>>) = correction?;
            let headers = rewind_headers(plan);
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&changelog)
                .partition(partition as i32)
                .key(key)
                .headers(headers);
            if let Some(value) = &value {
                record = record.payload(value.as_slice());
            }
            send(&producer, record).map_err(kafka("writing a correction"))?;
        }
        producer
            .flush(KAFKA_TIMEOUT)
            .map_err(kafka("flushing the corrections"))?;
        drop(restored);
        let _ = std::fs::remove_dir_all(&dir);
        progress(&format!(
            "partition {partition}: wrote {} corrections to {changelog}",
            keys.len()
        ));
        written.push((partition, keys.len() as u64));
    }

    let mut offsets = TopicPartitionList::new();
    for plan in plans {
        for topic in config.inputs() {
            // A topic the backup read none of (added to the store later): from its start.
            let next = plan.inputs.get(topic).unwrap_or(0);
            offsets
                .add_partition_offset(topic, plan.partition as i32, Offset::Offset(next))
                .map_err(kafka("building the offsets"))?;
        }
    }
    let committer: BaseConsumer = client
        .clone()
        .set("group.id", config.group_id())
        .set("enable.auto.commit", "false")
        .create()
        .map_err(kafka("creating the group's client"))?;
    committer
        .commit(&offsets, CommitMode::Sync)
        .map_err(kafka("rewinding the group's input offsets"))?;
    progress(&format!(
        "rewound the group {}'s input offsets; start the nodes (with the fixed processor) to \
         reprocess",
        config.group_id()
    ));
    Ok(written)
}

/// The key of the record that marks a restore in a partition with nothing to correct: a
/// tombstone for a key no processor writes (it starts with a NUL byte).
fn restored_marker_key() -> Vec<u8> {
    b"\0kstore-point-in-time-restore".to_vec()
}

/// The keys of the committed changelog records of `partition` from `from` to its end now.
fn keys_after(
    client: &ClientConfig,
    changelog: &str,
    partition: u32,
    from: i64,
) -> Result<BTreeSet<Vec<u8>>, PointInTimeError> {
    let consumer: BaseConsumer = client
        .clone()
        .set("group.id", "kstore-point-in-time-restore")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .map_err(kafka("creating the changelog reader"))?;
    let (_, end) = consumer
        .fetch_watermarks(changelog, partition as i32, KAFKA_TIMEOUT)
        .map_err(kafka("reading the changelog's end"))?;
    let mut keys = BTreeSet::new();
    if from >= end {
        return Ok(keys);
    }
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(changelog, partition as i32, Offset::Offset(from))
        .map_err(kafka("assigning the changelog"))?;
    consumer
        .assign(&assignment)
        .map_err(kafka("assigning the changelog"))?;
    let marker = restored_marker_key();
    loop {
        match consumer.poll(KAFKA_TIMEOUT) {
            None => {
                return Err(PointInTimeError::Refused(format!(
                    "the changelog {changelog} gave no records for {KAFKA_TIMEOUT:?} before its \
                     end ({end}); is a transaction left open?"
                )));
            }
            Some(Ok(message)) => {
                if let Some(key) = message.key()
                    && key != marker.as_slice()
                {
                    keys.insert(key.to_vec());
                }
                if message.offset() + 1 >= end {
                    return Ok(keys);
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
                // The end: the records up to the end offset were control records or aborted.
                let position = consumer
                    .position()
                    .map_err(kafka("reading the changelog position"))?;
                let at = position
                    .elements()
                    .first()
                    .and_then(|e| e.offset().to_raw())
                    .unwrap_or(end);
                if at >= end {
                    return Ok(keys);
                }
            }
            Some(Err(error)) => return Err(kafka("reading the changelog")(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_points_parse_as_utc() {
        assert_eq!(parse_time("0"), Ok(0));
        assert_eq!(parse_time("1795824000000"), Ok(1_795_824_000_000));
        assert_eq!(parse_time("2026-11-28"), Ok(1_795_824_000_000));
        assert_eq!(parse_time("2026-11-28T00:00:00Z"), Ok(1_795_824_000_000));
        assert_eq!(
            parse_time("2000-02-29T01:02:03"),
            Ok(951_782_400_000 + 3_723_000)
        );
        assert_eq!(
            parse_time("2026-11-28T03:30"),
            Ok(1_795_824_000_000 + 12_600_000)
        );
        for bad in ["yesterday", "2026-13-01", "2026-11-28T25:00", "2026-11"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
