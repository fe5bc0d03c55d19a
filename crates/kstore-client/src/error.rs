//! The client's errors: what went wrong, for which partition, with every host tried and
//! why each attempt failed.

use std::time::Duration;

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// No seed address was given.
    #[error("no seed addresses: give at least one node's gRPC address")]
    NoSeeds,
    /// A seed is not an address.
    #[error("seed {seed:?} is not a usable address: {reason}")]
    BadSeed {
        /// The seed.
        seed: String,
        /// Why.
        reason: String,
    },
    /// No seed answered Metadata.
    #[error("no seed answered: {}", describe_tried(.tried))]
    Unreachable {
        /// Each seed tried and why it failed.
        tried: Vec<(String, String)>,
    },
    /// The seeds belong to another cluster than the one asked for.
    #[error("{seed} belongs to cluster {found:?}, not {expected:?}")]
    WrongCluster {
        /// The seed.
        seed: String,
        /// The cluster asked for.
        expected: String,
        /// The seed's cluster.
        found: String,
    },
    /// A setting is out of range.
    #[error("bad client setting {setting}: {reason}")]
    InvalidSetting {
        /// The setting (the builder method's name).
        setting: &'static str,
        /// Why.
        reason: String,
    },
    /// The cluster serves no store of that name.
    #[error("the cluster serves no store {store:?}; it serves {served:?}")]
    UnknownStore {
        /// The store asked for.
        store: String,
        /// The stores the cluster serves.
        served: Vec<String>,
    },
}

fn describe_tried(tried: &[(String, String)]) -> String {
    tried
        .iter()
        .map(|(seed, why)| format!("{seed}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why one attempt of a read failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttemptError {
    /// The node could not be reached (connection refused or reset, no route).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The node holds no copy of the partition (the client's view was stale).
    #[error("the node holds no copy of the partition")]
    NotHosted,
    /// The node did not answer before the read's deadline.
    #[error("no answer before the deadline")]
    TimedOut,
    /// A hedge to another node answered first, so this attempt was cancelled.
    #[error("cancelled: another attempt answered first")]
    Cancelled,
    /// The node answered with another error.
    #[error("{code:?} {reason}: {message}")]
    Status {
        /// The gRPC code.
        code: tonic::Code,
        /// kstore's error reason (`ErrorInfo.reason`), if any.
        reason: String,
        /// The message.
        message: String,
    },
}

/// Why a copy was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Sent {
    /// It is the plan's first copy.
    First,
    /// The copy asked before it failed, or no longer held the partition.
    AfterFailure,
    /// The copy asked before had not answered after the hedge delay.
    Hedge,
    /// The copy asked before had not answered within its share of the deadline (a stalled
    /// or paused node).
    AfterStall,
}

impl std::fmt::Display for Sent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sent::First => "first",
            Sent::AfterFailure => "after a failure",
            Sent::Hedge => "hedge",
            Sent::AfterStall => "after a stall",
        })
    }
}

/// One attempt of a read: which node was asked, and what came of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The node asked.
    pub node_id: String,
    /// Its gRPC address.
    pub address: String,
    /// Why it was asked.
    pub sent: Sent,
    /// How long it took (or ran, if it was cancelled or out of time).
    pub elapsed: Duration,
    /// `None` if it answered.
    pub error: Option<AttemptError>,
}

/// Why a read failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The key is empty (checked before any network call).
    #[error("the key is empty")]
    EmptyKey,
    /// A per-read option is out of range (checked before any network call).
    #[error("bad read option {option}: {reason}")]
    InvalidOption {
        /// The option (the field of `ReadOptions`).
        option: &'static str,
        /// Why.
        reason: String,
    },
    /// A scan's range, limit, partition or token is refused (checked before any network
    /// call), or a node's page made no sense.
    #[error("bad scan {what}: {reason}")]
    InvalidScan {
        /// What is wrong: `range`, `limit`, `partition`, `token` or `answer`.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The key is longer than the nodes accept (checked before any network call).
    #[error("the key has {len} bytes; the limit is {limit}")]
    KeyTooLarge {
        /// The key's length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// No live copy of the partition qualifies under the read policy.
    #[error("no live copy of partition {partition} qualifies under {policy}")]
    NoCopy {
        /// The partition.
        partition: u32,
        /// The policy, described.
        policy: String,
    },
    /// Every copy asked failed.
    #[error("every copy of partition {partition} failed: {}", describe_attempts(.attempts))]
    Failed {
        /// The partition.
        partition: u32,
        /// Each attempt and why it failed.
        attempts: Vec<Attempt>,
    },
    /// No copy answered within the request timeout. Under `ActiveOnly` (or when no other
    /// copy is within `max_lag`) the one copy asked had the whole timeout.
    #[error("no answer for partition {partition} before the deadline ({timeout:?}): {}", describe_attempts(.attempts))]
    TimedOut {
        /// The partition.
        partition: u32,
        /// The timeout.
        timeout: Duration,
        /// Each attempt so far.
        attempts: Vec<Attempt>,
    },
    /// A node refused the read for a reason another node would give too (a bad request, or
    /// a position bound not reached before the deadline).
    #[error("partition {partition}: {error}")]
    Rejected {
        /// The partition.
        partition: u32,
        /// The node's answer.
        error: AttemptError,
        /// Each attempt.
        attempts: Vec<Attempt>,
    },
    /// The value is not the protobuf message asked for.
    #[error("the value of partition {partition}'s key does not decode as {type_name}: {reason}")]
    Decode {
        /// The partition.
        partition: u32,
        /// The type asked for.
        type_name: &'static str,
        /// Why.
        reason: String,
    },
}

fn describe_attempts(attempts: &[Attempt]) -> String {
    if attempts.is_empty() {
        return "no copy was asked".into();
    }
    attempts
        .iter()
        .map(|a| match &a.error {
            Some(error) => format!("{} ({}, {}): {error}", a.node_id, a.address, a.sent),
            None => format!("{} ({}, {}): answered", a.node_id, a.address, a.sent),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl ReadError {
    /// Returns the partition the read was for, if it got that far.
    pub fn partition(&self) -> Option<u32> {
        match self {
            ReadError::EmptyKey
            | ReadError::InvalidOption { .. }
            | ReadError::InvalidScan { .. }
            | ReadError::KeyTooLarge { .. } => None,
            ReadError::NoCopy { partition, .. }
            | ReadError::Failed { partition, .. }
            | ReadError::TimedOut { partition, .. }
            | ReadError::Rejected { partition, .. }
            | ReadError::Decode { partition, .. } => Some(*partition),
        }
    }

    /// Returns the attempts made, best first.
    pub fn attempts(&self) -> &[Attempt] {
        match self {
            ReadError::Failed { attempts, .. }
            | ReadError::TimedOut { attempts, .. }
            | ReadError::Rejected { attempts, .. } => attempts,
            ReadError::EmptyKey
            | ReadError::InvalidOption { .. }
            | ReadError::InvalidScan { .. }
            | ReadError::KeyTooLarge { .. }
            | ReadError::NoCopy { .. }
            | ReadError::Decode { .. } => &[],
        }
    }
}

/// Describes a status with the chain of errors behind it: a connection that failed says
/// why (a TLS handshake's certificate error, say), not only "transport error".
pub(crate) fn describe_status(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        let said = error.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = error.source();
    }
    text
}
