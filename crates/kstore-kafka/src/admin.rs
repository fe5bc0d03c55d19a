//! Topic administration for development and tests: whether a broker answers, how many
//! partitions a topic has, and creating a topic. Enough for `cargo xtask up`, which must run
//! before librdkafka is built.

use std::time::Duration;

use kafka_protocol::error::ParseResponseErrorCode;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    ApiKey, CreateTopicsRequest, CreateTopicsResponse, MetadataRequest, MetadataResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use crate::wire::{Connection, WireError};

/// Metadata v12: Kafka 3.1 and later.
const METADATA_VERSION: i16 = 12;
/// CreateTopics v7: Kafka 3.0 and later.
const CREATE_TOPICS_VERSION: i16 = 7;

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The broker could not be reached, or its answer could not be read.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The broker answered with an error for the topic.
    #[error("topic {topic}: {error}")]
    Topic {
        /// The topic.
        topic: String,
        /// Kafka's error, and its message where the broker sent one.
        error: String,
    },
}

/// Returns whether the broker at `address` answers a metadata request within `timeout`.
pub fn answers_metadata(address: &str, timeout: Duration) -> bool {
    Connection::open(address, timeout)
        .and_then(|mut connection| {
            connection.call::<_, MetadataResponse>(
                ApiKey::Metadata,
                MetadataRequest::default().with_topics(Some(Vec::new())),
                METADATA_VERSION,
            )
        })
        .is_ok()
}

/// Returns how many partitions `topic` has, or `None` if it does not exist.
pub fn partition_count(
    address: &str,
    topic: &str,
    timeout: Duration,
) -> Result<Option<u32>, AdminError> {
    let mut connection = Connection::open(address, timeout)?;
    let request = MetadataRequest::default().with_topics(Some(vec![
        MetadataRequestTopic::default().with_name(Some(topic_name(topic))),
    ]));
    let answer: MetadataResponse = connection.call(ApiKey::Metadata, request, METADATA_VERSION)?;
    let Some(found) = answer
        .topics
        .iter()
        .find(|t| t.name.as_ref().is_some_and(|name| name.as_str() == topic))
    else {
        return Ok(None);
    };
    match found.error_code.err() {
        None => Ok(Some(found.partitions.len() as u32)),
        Some(kafka_protocol::ResponseError::UnknownTopicOrPartition) => Ok(None),
        Some(error) => Err(AdminError::Topic {
            topic: topic.into(),
            error: format!("{error:?}"),
        }),
    }
}

/// Creates `topic` with `partitions` partitions and one replica. A topic that exists already
/// is not an error.
pub fn create_topic(
    address: &str,
    topic: &str,
    partitions: u32,
    timeout: Duration,
) -> Result<(), AdminError> {
    let mut connection = Connection::open(address, timeout)?;
    let request = CreateTopicsRequest::default()
        .with_timeout_ms(i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX))
        .with_topics(vec![
            CreatableTopic::default()
                .with_name(topic_name(topic))
                .with_num_partitions(i32::try_from(partitions).unwrap_or(i32::MAX))
                .with_replication_factor(1),
        ]);
    let answer: CreateTopicsResponse =
        connection.call(ApiKey::CreateTopics, request, CREATE_TOPICS_VERSION)?;
    for result in &answer.topics {
        match result.error_code.err() {
            None | Some(kafka_protocol::ResponseError::TopicAlreadyExists) => {}
            Some(error) => {
                return Err(AdminError::Topic {
                    topic: topic.into(),
                    error: match &result.error_message {
                        Some(message) => format!("{error:?}: {}", message.as_str()),
                        None => format!("{error:?}"),
                    },
                });
            }
        }
    }
    Ok(())
}

fn topic_name(topic: &str) -> TopicName {
    TopicName(StrBytes::from_string(topic.into()))
}
