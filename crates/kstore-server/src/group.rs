//! Removing this node's static member from the consumer group, so that a drained node's
//! partitions move at once instead of after `session.timeout.ms`.
//!
//! A static member (`group.instance.id`) never leaves the group when its consumer closes,
//! and librdkafka offers no way to make it. Kafka's answer for planned scale-in is the admin
//! call RemoveMembersFromConsumerGroup (KIP-345), which is a LeaveGroup request (v3 and
//! later) that names the member's `group.instance.id`. This module sends exactly that, to
//! the group's coordinator, with the Kafka protocol as the `kafka-protocol` crate encodes
//! it. It speaks PLAINTEXT only: behind TLS or SASL the partitions move after the session
//! timeout instead, and the drain says so.

use std::time::Duration;

use kafka_protocol::error::ParseResponseErrorCode;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::{
    ApiKey, FindCoordinatorRequest, FindCoordinatorResponse, GroupId, LeaveGroupRequest,
    LeaveGroupResponse,
};
use kafka_protocol::protocol::StrBytes;
use kstore_kafka::wire::Connection;

/// FindCoordinator v4 (batched keys, flexible): Kafka 3.0 and later.
const FIND_COORDINATOR_VERSION: i16 = 4;
/// LeaveGroup v5 (members by group.instance.id, with a reason): Kafka 3.2 and later.
const LEAVE_GROUP_VERSION: i16 = 5;

/// Why the member could not be removed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaveError {
    /// The client settings use a security protocol this module does not speak.
    #[error(
        "removing a static member needs a PLAINTEXT listener, and security.protocol is \
         {protocol}; the partitions move after session.timeout.ms instead"
    )]
    Unsupported {
        /// The configured security protocol.
        protocol: String,
    },
    /// The brokers could not be reached or answered with an error.
    #[error("removing static member {instance_id} from group {group}: {reason}")]
    Failed {
        /// The group.
        group: String,
        /// The member's group.instance.id.
        instance_id: String,
        /// What went wrong.
        reason: String,
    },
}

/// Removes the static member `instance_id` from `group`, through the first of `bootstrap`
/// (comma-separated `host:port`) that answers.
pub fn remove_static_member(
    bootstrap: &str,
    security_protocol: Option<&str>,
    group: &str,
    instance_id: &str,
    timeout: Duration,
) -> Result<(), LeaveError> {
    if let Some(protocol) = security_protocol
        && !protocol.eq_ignore_ascii_case("plaintext")
    {
        return Err(LeaveError::Unsupported {
            protocol: protocol.into(),
        });
    }
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
        match leave_through(broker, group, instance_id, timeout) {
            Ok(()) => return Ok(()),
            Err(error) => errors.push(format!("{broker}: {error}")),
        }
    }
    Err(failed(errors.join("; ")))
}

fn leave_through(
    broker: &str,
    group: &str,
    instance_id: &str,
    timeout: Duration,
) -> Result<(), String> {
    let mut connection = Connection::open(broker, timeout).map_err(|e| e.to_string())?;
    let find = FindCoordinatorRequest::default()
        .with_key_type(0)
        .with_coordinator_keys(vec![StrBytes::from_string(group.into())]);
    let found: FindCoordinatorResponse = connection
        .call(ApiKey::FindCoordinator, find, FIND_COORDINATOR_VERSION)
        .map_err(|e| e.to_string())?;
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
        Connection::open(&address, timeout).map_err(|e| e.to_string())?
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
        .map_err(|e| e.to_string())?;
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
