//! Read errors: a small set of reasons, each mapped to a gRPC status code, with a
//! `google.rpc.ErrorInfo` detail whose metadata a client can act on.

use std::collections::HashMap;

use kstore_proto::ERROR_DOMAIN;
use kstore_proto::v1::{ErrorReason, PartitionHolders};
use prost::Message as _;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The type URL of the PartitionHolders status detail.
pub const PARTITION_HOLDERS_TYPE_URL: &str = "type.googleapis.com/kstore.v1.PartitionHolders";

/// Why a read failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The key is empty.
    #[error("the key is empty")]
    EmptyKey,
    /// The key is longer than the limit.
    #[error("the key has {len} bytes; the limit is {limit}")]
    KeyTooLarge {
        /// The key's length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// No store of that name.
    #[error("no store named {name:?}; this node serves {served}")]
    UnknownStore {
        /// The requested name.
        name: String,
        /// The stores this node serves, comma-separated.
        served: String,
    },
    /// The partition is out of range.
    #[error("partition {partition} is out of range; the store has {partitions} partitions")]
    PartitionOutOfRange {
        /// The requested partition.
        partition: u32,
        /// The partition count.
        partitions: u32,
    },
    /// The caller's partition is not the key's.
    #[error("the key belongs to partition {expected}, not {given}")]
    WrongPartition {
        /// The partition the caller gave.
        given: u32,
        /// The key's partition.
        expected: u32,
    },
    /// A Scan's range cannot be scanned.
    #[error("{0}")]
    InvalidRange(#[from] kstore_core::scan::RangeError),
    /// Too many keys in one MultiGet.
    #[error("{count} keys in one MultiGet; the limit is {limit}")]
    TooManyKeys {
        /// How many keys were asked for.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// This node holds no copy of the partition, and did not forward the read.
    #[error(
        "this node holds no copy of partition {partition}; {}",
        describe(holders)
    )]
    PartitionNotHosted {
        /// The partition.
        partition: u32,
        /// Who holds it, best first, as this node's view says.
        holders: PartitionHolders,
    },
    /// The copy did not reach the requested input offset in time.
    #[error(
        "partition {partition} reflects input up to offset {input_offset} (lag {lag}); \
         offset {wanted} was not reached before the deadline"
    )]
    PositionNotReached {
        /// The partition.
        partition: u32,
        /// The input offset the caller wanted reflected.
        wanted: i64,
        /// The copy's next input offset.
        input_offset: i64,
        /// The copy's lag.
        lag: i64,
    },
    /// The read was forwarded and no holder answered before the deadline.
    #[error("no answer for partition {partition} before the deadline (asked {})", asked.join(", "))]
    NoAnswer {
        /// The partition.
        partition: u32,
        /// The holders asked, in order.
        asked: Vec<String>,
    },
    /// The store failed.
    #[error("reading partition {partition} failed: {message}")]
    Store {
        /// The partition.
        partition: u32,
        /// What failed.
        message: String,
    },
    /// An admin call without the right token.
    #[error("admin calls need `authorization: Bearer <admin-token>`")]
    AdminTokenRequired,
    /// A call only the cluster's nodes may make, without the cluster's secret.
    #[error(
        "only the cluster's nodes may make this call: it needs `authorization: Bearer \
         <cluster-secret>`"
    )]
    ClusterSecretRequired,
    /// A Drain while the node drains or shuts down already.
    #[error("the node is draining or shutting down already")]
    DrainInProgress,
    /// A backup call to a node without a backup location.
    #[error("this node has no backup location; set `backup.dir`")]
    BackupsNotConfigured,
    /// A backup could not be made, listed or read.
    #[error("{message}")]
    BackupFailed {
        /// What failed.
        message: String,
    },
}

impl ReadError {
    /// A read or call of store `name`, which is not among the stores `served`.
    pub fn unknown_store<'a>(name: &str, served: impl Iterator<Item = &'a str>) -> ReadError {
        ReadError::UnknownStore {
            name: name.to_owned(),
            served: served.collect::<Vec<_>>().join(", "),
        }
    }

    /// Returns the reason clients match on.
    pub fn reason(&self) -> ErrorReason {
        match self {
            ReadError::EmptyKey => ErrorReason::EmptyKey,
            ReadError::KeyTooLarge { .. } => ErrorReason::KeyTooLarge,
            ReadError::UnknownStore { .. } => ErrorReason::UnknownStore,
            ReadError::PartitionOutOfRange { .. } => ErrorReason::PartitionOutOfRange,
            ReadError::WrongPartition { .. } => ErrorReason::WrongPartition,
            ReadError::TooManyKeys { .. } => ErrorReason::TooManyKeys,
            ReadError::InvalidRange(_) => ErrorReason::InvalidRange,
            ReadError::PartitionNotHosted { .. } => ErrorReason::PartitionNotHosted,
            ReadError::PositionNotReached { .. } => ErrorReason::PositionNotReached,
            ReadError::NoAnswer { .. } => ErrorReason::NoAnswer,
            ReadError::Store { .. } => ErrorReason::StoreError,
            ReadError::AdminTokenRequired => ErrorReason::AdminTokenRequired,
            ReadError::ClusterSecretRequired => ErrorReason::ClusterSecretRequired,
            ReadError::DrainInProgress => ErrorReason::DrainInProgress,
            ReadError::BackupsNotConfigured => ErrorReason::BackupsNotConfigured,
            ReadError::BackupFailed { .. } => ErrorReason::BackupFailed,
        }
    }

    /// Returns the gRPC status code.
    pub fn code(&self) -> Code {
        match self {
            ReadError::EmptyKey
            | ReadError::KeyTooLarge { .. }
            | ReadError::UnknownStore { .. }
            | ReadError::PartitionOutOfRange { .. }
            | ReadError::WrongPartition { .. }
            | ReadError::TooManyKeys { .. }
            | ReadError::InvalidRange(_) => Code::InvalidArgument,
            ReadError::PartitionNotHosted { .. } => Code::Unavailable,
            ReadError::PositionNotReached { .. }
            | ReadError::DrainInProgress
            | ReadError::BackupsNotConfigured => Code::FailedPrecondition,
            ReadError::NoAnswer { .. } => Code::DeadlineExceeded,
            ReadError::Store { .. } | ReadError::BackupFailed { .. } => Code::Internal,
            ReadError::AdminTokenRequired | ReadError::ClusterSecretRequired => {
                Code::Unauthenticated
            }
        }
    }

    /// Returns the values a client can act on.
    fn metadata(&self) -> HashMap<String, String> {
        let mut metadata = HashMap::new();
        let mut put = |key: &str, value: String| {
            metadata.insert(key.to_owned(), value);
        };
        match self {
            ReadError::PartitionOutOfRange {
                partition,
                partitions,
            } => {
                put("partition", partition.to_string());
                put("partitions", partitions.to_string());
            }
            ReadError::WrongPartition { given, expected } => {
                put("partition", expected.to_string());
                put("given_partition", given.to_string());
            }
            ReadError::PartitionNotHosted { partition, .. } => {
                put("partition", partition.to_string())
            }
            ReadError::PositionNotReached {
                partition,
                wanted,
                input_offset,
                lag,
            } => {
                put("partition", partition.to_string());
                put("min_input_offset", wanted.to_string());
                put("input_offset", input_offset.to_string());
                put("lag", lag.to_string());
            }
            ReadError::NoAnswer { partition, asked } => {
                put("partition", partition.to_string());
                put("asked", asked.join(","));
            }
            ReadError::Store { partition, .. } => put("partition", partition.to_string()),
            ReadError::KeyTooLarge { limit, .. } => put("limit", limit.to_string()),
            ReadError::TooManyKeys { limit, .. } => put("limit", limit.to_string()),
            ReadError::UnknownStore { served, .. } => put("store", served.clone()),
            ReadError::EmptyKey
            | ReadError::InvalidRange(_)
            | ReadError::AdminTokenRequired
            | ReadError::ClusterSecretRequired
            | ReadError::DrainInProgress
            | ReadError::BackupsNotConfigured
            | ReadError::BackupFailed { .. } => {}
        }
        metadata
    }
}

/// Names the holders for a person: "held by node-2 (active, lag 0), node-3 (standby, lag 4)".
fn describe(holders: &PartitionHolders) -> String {
    if holders.holders.is_empty() {
        return "no node is known to hold it".into();
    }
    let named: Vec<String> = holders
        .holders
        .iter()
        .map(|h| {
            let role = kstore_core::cluster::role_name(h.role());
            format!(
                "{} at {} ({role}, lag {})",
                h.node_id, h.grpc_address, h.lag
            )
        })
        .collect();
    format!("held by {}", named.join(", "))
}

/// A status with a `google.rpc.ErrorInfo` detail: kstore's domain, `reason` by name, and
/// `metadata`.
pub(crate) fn status_with_info(
    code: Code,
    message: String,
    reason: ErrorReason,
    metadata: HashMap<String, String>,
) -> Status {
    let details = ErrorDetails::with_error_info(reason.as_str_name(), ERROR_DOMAIN, metadata);
    Status::with_error_details(code, message, details)
}

impl From<ReadError> for Status {
    fn from(error: ReadError) -> Self {
        let status = status_with_info(
            error.code(),
            error.to_string(),
            error.reason(),
            error.metadata(),
        );
        let ReadError::PartitionNotHosted { holders, .. } = &error else {
            return status;
        };
        // Add the holders beside the ErrorInfo, as a detail of kstore's own type.
        let mut rich = tonic_types::pb::Status::decode(status.details()).unwrap_or_default();
        rich.details.push(prost_types::Any {
            type_url: PARTITION_HOLDERS_TYPE_URL.into(),
            value: holders.encode_to_vec(),
        });
        Status::with_details(status.code(), status.message(), rich.encode_to_vec().into())
    }
}

/// Returns the PartitionHolders detail of a status, if it has one.
pub fn partition_holders(status: &Status) -> Option<PartitionHolders> {
    let rich = tonic_types::pb::Status::decode(status.details()).ok()?;
    rich.details
        .iter()
        .find(|any| any.type_url == PARTITION_HOLDERS_TYPE_URL)
        .and_then(|any| PartitionHolders::decode(any.value.as_slice()).ok())
}

#[cfg(test)]
mod tests {
    use kstore_proto::v1::Role;

    use super::*;

    #[test]
    fn statuses_carry_reason_and_metadata() {
        let status = Status::from(ReadError::PositionNotReached {
            partition: 3,
            wanted: 100,
            input_offset: 90,
            lag: 15,
        });
        assert_eq!(status.code(), Code::FailedPrecondition);
        let info = status
            .get_details_error_info()
            .expect("an ErrorInfo detail");
        assert_eq!(info.reason, "POSITION_NOT_REACHED");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(
            info.metadata.get("input_offset").map(String::as_str),
            Some("90")
        );
        assert_eq!(
            info.metadata.get("partition").map(String::as_str),
            Some("3")
        );
    }

    #[test]
    fn partition_not_hosted_carries_the_holders() {
        let holders = PartitionHolders {
            partition: 5,
            holders: vec![kstore_proto::v1::Holder {
                node_id: "node-2".into(),
                grpc_address: "127.0.0.1:50052".into(),
                role: Role::Active as i32,
                lag: 0,
                liveness: kstore_proto::v1::Liveness::Live as i32,
                incarnation: 1,
                version: 9,
            }],
        };
        let status = Status::from(ReadError::PartitionNotHosted {
            partition: 5,
            holders: holders.clone(),
        });
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.get_details_error_info().unwrap().reason,
            "PARTITION_NOT_HOSTED"
        );
        assert_eq!(partition_holders(&status), Some(holders));
        assert!(
            status
                .message()
                .contains("node-2 at 127.0.0.1:50052 (active, lag 0)"),
            "{}",
            status.message()
        );
    }
}
