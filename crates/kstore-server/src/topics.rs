//! The node's topics: the inputs it reads, and the changelog, dead-letter and alert topics
//! it creates when they are missing. Input topics with different partition counts, or a
//! changelog whose partition count differs from the input's, would scatter a partition's
//! state, so they stop the node at startup.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::{NodeConfig, ProcessorConfig};

const METADATA_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the node's topics are not usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The input topic does not exist.
    #[error("input topic {topic} does not exist; create it with the partition count you want")]
    MissingInput {
        /// The input topic.
        topic: String,
    },
    /// A store's input topics have different partition counts.
    #[error(
        "store {store}'s input topics are not co-partitioned: {}; they must have the same \
         partition count (partition p of the store folds partition p of each)",
        partition_counts(.counts)
    )]
    NotCoPartitioned {
        /// The store.
        store: String,
        /// Each input topic with its partition count, as configured.
        counts: Vec<(String, u32)>,
    },
    /// The changelog has another partition count than the input.
    #[error(
        "changelog topic {changelog} has {changelog_partitions} partitions but input topic \
         {input} has {input_partitions}; they must match (partition p of the changelog holds \
         the state of input partition p)"
    )]
    ChangelogPartitionMismatch {
        /// The changelog topic.
        changelog: String,
        /// Its partition count.
        changelog_partitions: u32,
        /// The input topic.
        input: String,
        /// Its partition count.
        input_partitions: u32,
    },
    /// A topic that should exist is missing from the metadata, or has partitions without a
    /// leader.
    #[error(
        "topic {topic} is not ready (missing, or partitions without a leader) after waiting \
         {waited:?}; is the cluster healthy?"
    )]
    NotReady {
        /// The topic.
        topic: String,
        /// How long the node waited.
        waited: Duration,
    },
    /// Kafka failed.
    #[error("kafka error while checking topic {topic}: {source}")]
    Kafka {
        /// The topic.
        topic: String,
        /// Kafka's error.
        source: KafkaError,
    },
}

/// The partition counts the node runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    /// Partitions of the input topic, and so of the changelog and the stores.
    pub partitions: u32,
}

/// Checks the input topics (all there, with one partition count), creates the changelog,
/// dead-letter and alert topics if they are missing, and checks that the changelog's
/// partition count matches the input's.
pub async fn prepare(config: &NodeConfig, client: &ClientConfig) -> Result<Topology, TopicError> {
    let partitions = input_partition_count(config, client)?;
    let input = &config.inputs()[0];

    let changelog = config.changelog_topic();
    let compacted = [("cleanup.policy", "compact")];
    let changelog_partitions = ensure(config, client, &changelog, partitions, &compacted).await?;
    if changelog_partitions != partitions {
        return Err(TopicError::ChangelogPartitionMismatch {
            changelog,
            changelog_partitions,
            input: input.clone(),
            input_partitions: partitions,
        });
    }
    // A module's outputs too: a record for a topic that does not exist would abort every
    // transaction that writes one.
    let outputs = match &config.processor {
        ProcessorConfig::Wasm(wasm) => wasm.outputs.values().cloned().collect(),
        ProcessorConfig::Builtin(_) => Vec::new(),
    };
    let mut topics = vec![config.dlq_topic(), config.alerts_topic()];
    for topic in outputs {
        if !topics.contains(&topic) {
            topics.push(topic);
        }
    }
    for topic in topics {
        ensure(config, client, &topic, partitions, &[]).await?;
    }
    Ok(Topology { partitions })
}

/// Returns the partition count of a topic that exists, once the metadata shows every one of
/// its partitions with a leader: a topic that was just created (by this node or another)
/// can show up with no partitions or leaders for a moment.
async fn settled_partition_count(client: &ClientConfig, topic: &str) -> Result<u32, TopicError> {
    let kafka = |source| TopicError::Kafka {
        topic: topic.to_owned(),
        source,
    };
    let consumer: BaseConsumer = client.create().map_err(kafka)?;
    let started = tokio::time::Instant::now();
    loop {
        let metadata = consumer
            .fetch_metadata(Some(topic), METADATA_TIMEOUT)
            .map_err(kafka)?;
        let settled = metadata.topics().iter().find(|t| {
            t.name() == topic
                && t.error().is_none()
                && !t.partitions().is_empty()
                && t.partitions().iter().all(|p| p.leader() >= 0)
        });
        if let Some(found) = settled {
            return Ok(found.partitions().len() as u32);
        }
        if started.elapsed() > METADATA_TIMEOUT {
            return Err(TopicError::NotReady {
                topic: topic.to_owned(),
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Returns the partition count of the store's input topics, once each exists and all have
/// the same.
pub fn input_partition_count(
    config: &NodeConfig,
    client: &ClientConfig,
) -> Result<u32, TopicError> {
    let mut counts = Vec::new();
    for topic in config.inputs() {
        let count = partition_count(client, topic)?.ok_or_else(|| TopicError::MissingInput {
            topic: topic.clone(),
        })?;
        counts.push((topic.clone(), count));
    }
    let partitions = counts[0].1;
    if counts.iter().any(|(_, count)| *count != partitions) {
        return Err(TopicError::NotCoPartitioned {
            store: config.store.clone(),
            counts,
        });
    }
    Ok(partitions)
}

/// `a has 3 partitions, b has 4 partitions`.
fn partition_counts(counts: &[(String, u32)]) -> String {
    counts
        .iter()
        .map(|(topic, count)| format!("{topic} has {count} partitions"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Returns a topic's partition count, or `None` if it does not exist.
pub fn partition_count(client: &ClientConfig, topic: &str) -> Result<Option<u32>, TopicError> {
    let kafka = |source| TopicError::Kafka {
        topic: topic.to_owned(),
        source,
    };
    let consumer: BaseConsumer = client.create().map_err(kafka)?;
    let metadata = consumer
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .map_err(kafka)?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match found.error() {
        None => Ok(Some(found.partitions().len() as u32)),
        Some(code) if RDKafkaErrorCode::from(code) == RDKafkaErrorCode::UnknownTopicOrPartition => {
            Ok(None)
        }
        Some(code) => Err(kafka(KafkaError::MetadataFetch(code.into()))),
    }
}

/// Creates the topic with `partitions` partitions unless it exists, and returns its
/// partition count once every partition has a leader.
async fn ensure(
    config: &NodeConfig,
    client: &ClientConfig,
    topic: &str,
    partitions: u32,
    topic_configs: &[(&str, &str)],
) -> Result<u32, TopicError> {
    if partition_count(client, topic)?.is_none() {
        create(config, client, topic, partitions, topic_configs).await?;
    }
    settled_partition_count(client, topic).await
}

async fn create(
    config: &NodeConfig,
    client: &ClientConfig,
    topic: &str,
    partitions: u32,
    topic_configs: &[(&str, &str)],
) -> Result<(), TopicError> {
    let kafka = |source| TopicError::Kafka {
        topic: topic.to_owned(),
        source,
    };
    let admin: AdminClient<DefaultClientContext> = client.create().map_err(kafka)?;
    let mut new_topic = NewTopic::new(
        topic,
        partitions as i32,
        TopicReplication::Fixed(config.topic_replication_factor),
    );
    for (key, value) in topic_configs {
        new_topic = new_topic.set(key, value);
    }
    let options = AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT));
    for result in admin
        .create_topics([&new_topic], &options)
        .await
        .map_err(kafka)?
    {
        match result {
            Ok(_) => tracing::info!(topic, partitions, "created topic"),
            // Another node created it first.
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(kafka(KafkaError::AdminOp(code))),
        }
    }
    Ok(())
}
