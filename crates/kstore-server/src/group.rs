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

use std::time::Duration;

use kafka_protocol::error::ParseResponseErrorCode;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::{
    ApiKey, FindCoordinatorRequest, FindCoordinatorResponse, GroupId, LeaveGroupRequest,
    LeaveGroupResponse,
};
use kafka_protocol::protocol::StrBytes;

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
