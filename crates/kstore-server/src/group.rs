//! Removing this node's static member from the consumer group, so that a drained node's
//! partitions move at once instead of after `session.timeout.ms`.
//!
//! A static member (`group.instance.id`) never leaves the group when its consumer closes,
//! and librdkafka offers no way to make it. Kafka's answer for planned scale-in is the admin
//! call RemoveMembersFromConsumerGroup (KIP-345), which is a LeaveGroup request (v3 and
//! later) that names the member's `group.instance.id`. This module sends exactly that, to
//! the group's coordinator, with the Kafka protocol as the `kafka-protocol` crate encodes
//! it, over a connection with the node's own security settings (TLS, SASL PLAIN or SCRAM:
//! [`crate::kafka::connect`]).
//!
//! Also: refusing to start a store whose group has members that read other input topics
//! ([`check_members_read_the_same_inputs`]).

use std::time::Duration;

use kafka_protocol::error::ParseResponseErrorCode;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::{
    ApiKey, ConsumerProtocolAssignment, ConsumerProtocolSubscription, FindCoordinatorRequest,
    FindCoordinatorResponse, GroupId, LeaveGroupRequest, LeaveGroupResponse,
};
use kafka_protocol::protocol::{Decodable, StrBytes};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::NodeConfig;
use crate::kafka::connect::{ConnectError, Connector, SettingsError};

/// FindCoordinator v4 (batched keys, flexible): Kafka 3.0 and later.
const FIND_COORDINATOR_VERSION: i16 = 4;
/// LeaveGroup v5 (members by group.instance.id, with a reason): Kafka 3.2 and later.
const LEAVE_GROUP_VERSION: i16 = 5;

/// Why the member could not be removed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaveError {
    /// The node's `kafka.*` security settings cannot be used for this connection.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The brokers could not be reached or answered with an error.
    #[error("removing static member {instance_id} from group {group}: {reason}")]
    Failed {
        /// The group.
        group: String,
        /// The member's group.instance.id.
        instance_id: String,
        /// What went wrong, broker by broker.
        reason: String,
    },
}

/// Checks that no member of the store's consumer group (other than this node's own static
/// member from an earlier run) subscribes to other input topics than the store's: the range
/// assignor keeps a partition's topics together only among members that read the same
/// topics, and members with other lists could each fold partition `p` of their own topics,
/// two actives of one partition. Returns why not, naming the members and their topics. A
/// group that cannot be described passes (logged).
pub fn check_members_read_the_same_inputs(
    config: &NodeConfig,
    client: &ClientConfig,
) -> Result<(), String> {
    let consumer: BaseConsumer = client
        .create()
        .map_err(|error| format!("creating a Kafka client: {error}"))?;
    let group = config.group_id();
    let mut ours: Vec<&str> = config.inputs().iter().map(String::as_str).collect();
    ours.sort_unstable();
    // Members' subscriptions are described only while the group is stable; their
    // assignments in every state.
    let groups = match consumer.fetch_group_list(Some(group), Duration::from_secs(30)) {
        Ok(groups) => groups,
        Err(error) => {
            // Not knowing is no reason not to serve.
            tracing::warn!(%error, group, "cannot describe the consumer group to compare \
                 its members' input topics");
            return Ok(());
        }
    };
    let Some(described) = groups.groups().iter().find(|g| g.name() == group) else {
        return Ok(());
    };
    if described.protocol_type() != "consumer" && !described.members().is_empty() {
        tracing::warn!(
            group,
            protocol_type = described.protocol_type(),
            "the group is \
             not a consumer group; its members' input topics are not compared"
        );
        return Ok(());
    }
    let mut others = Vec::new();
    for member in described
        .members()
        .iter()
        .filter(|m| !is_own_member(m.id(), &config.node_id))
    {
        if let Some(mut topics) = member.metadata().and_then(subscribed_topics) {
            topics.sort_unstable();
            if topics != ours {
                others.push(format!("{} reads {}", member.id(), topics.join(", ")));
            }
        } else if let Some(assigned) = member.assignment().and_then(assigned_topics)
            && let Some(foreign) = assigned.iter().find(|t| !ours.contains(&t.as_str()))
        {
            others.push(format!("{} is assigned {foreign}", member.id()));
        }
    }
    if others.is_empty() {
        return Ok(());
    }
    Err(format!(
        "store {}: members of group {group} read other input topics than this node's ({}): \
         {}; to change a store's input topics, stop every node of it, wait until the group \
         has no members (session.timeout.ms after the last one stopped), then start them all \
         with the new list",
        config.store,
        ours.join(", "),
        others.join("; ")
    ))
}

/// Whether a member id is this node's own static member: `<group.instance.id>-<UUID>`, as
/// Kafka names static members (kstore's `group.instance.id` is the node id).
fn is_own_member(member_id: &str, node_id: &str) -> bool {
    let uuid = member_id
        .strip_prefix(node_id)
        .and_then(|rest| rest.strip_prefix('-'));
    uuid.is_some_and(|uuid| {
        uuid.len() == 36
            && uuid.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_hexdigit(),
            })
    })
}

/// The topics of a consumer's subscription, as a member's metadata in the classic group
/// protocol holds it (a version, then a ConsumerProtocolSubscription); `None` if it does
/// not parse.
fn subscribed_topics(metadata: &[u8]) -> Option<Vec<String>> {
    let (version, mut rest) = metadata.split_first_chunk::<2>()?;
    // Later versions add fields after the topics, which come first in every version.
    let version = i16::from_be_bytes(*version).clamp(0, 3);
    let subscription = ConsumerProtocolSubscription::decode(&mut rest, version).ok()?;
    Some(subscription.topics.iter().map(|t| t.to_string()).collect())
}

/// The topics of a consumer's assignment (a version, then a ConsumerProtocolAssignment),
/// each once; `None` if it does not parse or assigns nothing.
fn assigned_topics(assignment: &[u8]) -> Option<Vec<String>> {
    let (version, mut rest) = assignment.split_first_chunk::<2>()?;
    let version = i16::from_be_bytes(*version).clamp(0, 3);
    let assignment = ConsumerProtocolAssignment::decode(&mut rest, version).ok()?;
    let mut topics: Vec<String> = assignment
        .assigned_partitions
        .iter()
        .map(|p| p.topic.to_string())
        .collect();
    topics.dedup();
    (!topics.is_empty()).then_some(topics)
}

/// Removes the static member `instance_id` from `group`, through the first of `bootstrap`
/// (comma-separated `host:port`) that answers, connecting as `connector` says.
pub fn remove_static_member(
    connector: &Connector,
    bootstrap: &str,
    group: &str,
    instance_id: &str,
    timeout: Duration,
) -> Result<(), LeaveError> {
    let failed = |reason: String| LeaveError::Failed {
        group: group.into(),
        instance_id: instance_id.into(),
        reason,
    };
    let mut errors = Vec::new();
    for broker in bootstrap
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
    {
        match leave_through(connector, broker, group, instance_id, timeout) {
            Ok(()) => return Ok(()),
            Err(error) => errors.push(format!("{broker}: {error}")),
        }
    }
    Err(failed(errors.join("; ")))
}

fn leave_through(
    connector: &Connector,
    broker: &str,
    group: &str,
    instance_id: &str,
    timeout: Duration,
) -> Result<(), String> {
    let failure = |address: &str, error| connector.call_failure(address, error).to_string();
    let mut connection = connector
        .connect(broker, timeout)
        .map_err(|e: ConnectError| e.to_string())?;
    let find = FindCoordinatorRequest::default()
        .with_key_type(0)
        .with_coordinator_keys(vec![StrBytes::from_string(group.into())]);
    let found: FindCoordinatorResponse = connection
        .call(ApiKey::FindCoordinator, find, FIND_COORDINATOR_VERSION)
        .map_err(|e| failure(broker, e))?;
    let coordinator = found
        .coordinators
        .first()
        .ok_or("the broker named no coordinator")?;
    if let Some(error) = coordinator.error_code.err() {
        return Err(format!("finding the group coordinator: {error:?}"));
    }
    let address = format!("{}:{}", coordinator.host.as_str(), coordinator.port);
    let mut coordinator = if address == broker {
        connection
    } else {
        connector
            .connect(&address, timeout)
            .map_err(|e| e.to_string())?
    };
    let leave = LeaveGroupRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.into())))
        .with_members(vec![
            MemberIdentity::default()
                .with_member_id(StrBytes::from_static_str(""))
                .with_group_instance_id(Some(StrBytes::from_string(instance_id.into())))
                .with_reason(Some(StrBytes::from_static_str("kstore drain"))),
        ]);
    let left: LeaveGroupResponse = coordinator
        .call(ApiKey::LeaveGroup, leave, LEAVE_GROUP_VERSION)
        .map_err(|e| failure(&address, e))?;
    if let Some(error) = left.error_code.err() {
        return Err(format!("leaving the group: {error:?}"));
    }
    for member in &left.members {
        if let Some(error) = member.error_code.err() {
            return Err(format!("removing the member: {error:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kafka_protocol::protocol::Encodable;

    use super::*;

    #[test]
    fn a_members_subscribed_topics_are_read_from_its_metadata() {
        for version in [0i16, 1, 3] {
            let subscription = ConsumerProtocolSubscription::default().with_topics(vec![
                StrBytes::from_static_str("words"),
                StrBytes::from_static_str("more-words"),
            ]);
            let mut metadata = bytes::BytesMut::new();
            metadata.extend_from_slice(&version.to_be_bytes());
            subscription.encode(&mut metadata, version).unwrap();
            assert_eq!(
                subscribed_topics(&metadata),
                Some(vec!["words".to_owned(), "more-words".to_owned()]),
                "version {version}"
            );
        }
        assert_eq!(subscribed_topics(&[0]), None);
        assert_eq!(subscribed_topics(&[0, 0, 0, 0, 0, 9]), None);
    }

    #[test]
    fn a_members_assigned_topics_are_read_from_its_assignment() {
        use kafka_protocol::messages::consumer_protocol_assignment::TopicPartition;
        let assignment = ConsumerProtocolAssignment::default().with_assigned_partitions(vec![
            TopicPartition::default()
                .with_topic(StrBytes::from_static_str("words").into())
                .with_partitions(vec![0, 2]),
        ]);
        let mut bytes = bytes::BytesMut::new();
        bytes.extend_from_slice(&1i16.to_be_bytes());
        assignment.encode(&mut bytes, 1).unwrap();
        assert_eq!(assigned_topics(&bytes), Some(vec!["words".to_owned()]));
        assert_eq!(assigned_topics(&[0, 0]), None);
    }

    #[test]
    fn only_this_nodes_static_member_is_its_own() {
        let uuid = "0f8fad5b-d9cb-469f-a165-70867728950e";
        assert!(is_own_member(&format!("node-1-{uuid}"), "node-1"));
        assert!(!is_own_member(&format!("node-10-{uuid}"), "node-1"));
        assert!(!is_own_member(&format!("kstore-1-{uuid}"), "kstore"));
        assert!(!is_own_member("node-1-", "node-1"));
        assert!(!is_own_member(&format!("node-2-{uuid}"), "node-1"));
    }
}
