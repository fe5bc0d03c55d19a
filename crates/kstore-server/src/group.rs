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

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::error::ParseResponseErrorCode;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::{
    ApiKey, FindCoordinatorRequest, FindCoordinatorResponse, GroupId, LeaveGroupRequest,
    LeaveGroupResponse, RequestHeader, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

/// FindCoordinator v4 (batched keys, flexible): Kafka 3.0 and later.
const FIND_COORDINATOR_VERSION: i16 = 4;
/// LeaveGroup v5 (members by group.instance.id, with a reason): Kafka 3.2 and later.
const LEAVE_GROUP_VERSION: i16 = 5;
/// The largest answer accepted from a broker.
const MAX_RESPONSE_BYTES: usize = 16 << 20;

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
    let mut connection = Connection::open(broker, timeout)?;
    let find = FindCoordinatorRequest::default()
        .with_key_type(0)
        .with_coordinator_keys(vec![StrBytes::from_string(group.into())]);
    let found: FindCoordinatorResponse =
        connection.call(ApiKey::FindCoordinator, find, FIND_COORDINATOR_VERSION)?;
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
        Connection::open(&address, timeout)?
    };
    let leave = LeaveGroupRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.into())))
        .with_members(vec![
            MemberIdentity::default()
                .with_member_id(StrBytes::from_static_str(""))
                .with_group_instance_id(Some(StrBytes::from_string(instance_id.into())))
                .with_reason(Some(StrBytes::from_static_str("kstore drain"))),
        ]);
    let left: LeaveGroupResponse =
        coordinator.call(ApiKey::LeaveGroup, leave, LEAVE_GROUP_VERSION)?;
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

/// One connection to a broker, speaking the Kafka protocol's framing (size-prefixed).
struct Connection {
    stream: TcpStream,
    next_correlation_id: i32,
}

impl Connection {
    fn open(address: &str, timeout: Duration) -> Result<Self, String> {
        let resolved = address
            .to_socket_addrs()
            .map_err(|error| format!("resolving {address}: {error}"))?
            .next()
            .ok_or_else(|| format!("{address} resolves to nothing"))?;
        let stream = TcpStream::connect_timeout(&resolved, timeout)
            .map_err(|error| format!("connecting to {address}: {error}"))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|error| error.to_string())?;
        Ok(Connection {
            stream,
            next_correlation_id: 1,
        })
    }

    /// Sends `request` as API `key` at `version` and reads its answer.
    fn call<Req, Resp>(&mut self, key: ApiKey, request: Req, version: i16) -> Result<Resp, String>
    where
        Req: Encodable + HeaderVersion,
        Resp: Decodable + HeaderVersion,
    {
        let correlation_id = self.next_correlation_id;
        self.next_correlation_id += 1;
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(StrBytes::from_static_str("kstore")));
        let encoding = |error: anyhow::Error| format!("encoding a request: {error}");
        let mut body = BytesMut::new();
        header
            .encode(&mut body, Req::header_version(version))
            .map_err(encoding)?;
        request.encode(&mut body, version).map_err(encoding)?;
        let mut frame = BytesMut::with_capacity(body.len() + 4);
        frame.put_i32(body.len() as i32);
        frame.put_slice(&body);
        self.stream
            .write_all(&frame)
            .map_err(|error| format!("sending: {error}"))?;

        let mut size = [0u8; 4];
        self.stream
            .read_exact(&mut size)
            .map_err(|error| format!("reading the answer: {error}"))?;
        let size = i32::from_be_bytes(size);
        if size < 0 || size as usize > MAX_RESPONSE_BYTES {
            return Err(format!("an answer of {size} bytes"));
        }
        let mut answer = vec![0u8; size as usize];
        self.stream
            .read_exact(&mut answer)
            .map_err(|error| format!("reading the answer: {error}"))?;
        let mut answer = Bytes::from(answer);
        let decoding = |error: anyhow::Error| format!("decoding the answer: {error}");
        let header =
            ResponseHeader::decode(&mut answer, Resp::header_version(version)).map_err(decoding)?;
        if header.correlation_id != correlation_id {
            return Err(format!(
                "an answer to request {} where {correlation_id} was expected",
                header.correlation_id
            ));
        }
        let response = Resp::decode(&mut answer, version).map_err(decoding)?;
        if answer.has_remaining() {
            tracing::debug!(left = answer.remaining(), "bytes after a broker's answer");
        }
        Ok(response)
    }
}
