//! Kafka plumbing that ingest, the state updater and point-in-time restore share: the record
//! headers kstore writes, one builder for the node's client settings, sending and flushing
//! with librdkafka's queue in mind, and the CPU priority of the threads that talk to Kafka.
//! [`connect`] opens connections of kstore's own (outside librdkafka) with the same
//! security settings.

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};

use crate::config::NodeConfig;

pub mod connect;

/// The header of a changelog record that holds the input position of the record that
/// produced it: its input offset, plus, for a store over several input topics, the next
/// offsets of the partition's other input topics ([`crate::input_offsets`]).
pub const INPUT_OFFSET_HEADER: &str = "kstore.input-offset";
/// The header of a changelog record of a partition that has read more than one input topic:
/// the next offset per input topic after the record that produced it (`topic=offset,…`);
/// on a point-in-time restore's corrections, those it rewinds to. A record without it came
/// from a partition that read one topic, the first of its input topics now.
pub const INPUT_OFFSETS_HEADER: &str = "kstore.input-offsets";
/// The header of a changelog record written by a point-in-time restore: a copy that applies
/// it reflects the input before this offset, whatever it reflected before.
pub const INPUT_REWIND_HEADER: &str = "kstore.input-rewind";
/// The key of the changelog records that hold a partition's module history
/// ([`crate::processor::versions`]): a copy that applies one takes its value as the store's
/// module history. Its prefix is reserved ([`kstore_core::keys::RESERVED_KEY_PREFIX`]), so
/// no user key is ever this one.
pub const MODULE_HISTORY_KEY: &[u8] = b"\0kstore-module-history";
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

/// Returns the client settings every Kafka client of the node starts from: the user's
/// `kafka.*` keys, verbatim.
pub fn client_config(config: &NodeConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    for (key, value) in &config.kafka {
        client.set(key, value);
    }
    client
}

/// Returns the settings of the input's group consumer: the node's client settings, its
/// group with static membership (`group.instance.id` = node id), the configured assignor
/// (classic protocol), and exactly-once reading.
pub fn group_consumer_config(config: &NodeConfig) -> ClientConfig {
    let mut consumer = client_config(config);
    consumer
        .set("group.id", config.group_id())
        .set("group.instance.id", &config.node_id)
        .set(
            "partition.assignment.strategy",
            config.group_assignor.kafka_name(),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed");
    set_default(&mut consumer, "auto.offset.reset", "earliest");
    consumer
}

/// Sets a client setting unless the user's `kafka.*` settings already chose one.
pub fn set_default(config: &mut ClientConfig, key: &str, value: &str) {
    if config.get(key).is_none() {
        config.set(key, value);
    }
}

/// Sends a record, waiting for room in the producer's queue.
pub fn send<C, K, P>(
    producer: &BaseProducer<C>,
    mut record: BaseRecord<'_, K, P>,
) -> Result<(), KafkaError>
where
    C: ProducerContext<DeliveryOpaque = ()>,
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

/// Waits until every record sent so far is acknowledged, serving delivery reports.
///
/// `BaseProducer::flush` (and so `commit_transaction`, which flushes first) polls in slices
/// of 100 ms, and `BaseProducer::poll` always waits out its whole timeout: every flush that
/// finds a record in flight costs at least 100 ms. Polling in 1 ms slices here leaves the
/// flush inside `commit_transaction` nothing to wait for.
pub fn flush<C>(producer: &BaseProducer<C>, timeout: Duration) -> Result<(), KafkaError>
where
    C: ProducerContext<DeliveryOpaque = ()>,
{
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

/// Lowers the calling thread's CPU priority to `niceness` before it creates the Kafka
/// clients and opens the stores, whose threads inherit it: when the CPU is short, reads win
/// over ingestion.
pub fn lower_priority(niceness: u8) {
    use thread_priority::{ThreadPriority, ThreadPriorityValue, set_current_thread_priority};
    if niceness == 0 {
        return;
    }
    let priority = ThreadPriorityValue::try_from(crossplatform_priority(niceness))
        .map(ThreadPriority::Crossplatform);
    match priority.map(set_current_thread_priority) {
        Ok(Ok(())) => tracing::debug!(niceness, "the thread runs at a lower CPU priority"),
        Ok(Err(error)) => tracing::warn!(?error, "cannot lower a thread's CPU priority"),
        Err(error) => tracing::warn!(error, "cannot lower a thread's CPU priority"),
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

/// Returns the consumer-group generation the consumer is in (-1 outside the group).
///
/// rdkafka does not expose it, but librdkafka does (`rd_kafka_consumer_group_metadata`,
/// then its generation id); the group metadata object is freed right away.
#[allow(unsafe_code)]
pub fn group_generation<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> i32 {
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
    #[cfg(target_os = "linux")]
    fn threads_get_exactly_the_configured_niceness() {
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

    #[test]
    fn user_settings_win_over_defaults() {
        let mut config = NodeConfig::default();
        config.kafka.insert("linger.ms".into(), "50".into());
        let mut client = client_config(&config);
        set_default(&mut client, "linger.ms", "5");
        set_default(&mut client, "acks", "all");
        assert_eq!(client.get("linger.ms"), Some("50"));
        assert_eq!(client.get("acks"), Some("all"));
    }
}
