//! The calls a read makes to one node: a Get of one key, a MultiGet of a group, or Scan pages
//! of a group of partitions, always with
//! `no_forward` (a node that holds no copy names the holders rather than forwarding), and
//! what their answers and errors mean for the read.

use kstore_core::routing::Target;
use kstore_proto::v1::query_client::QueryClient;
use kstore_proto::v1::{
    ErrorReason, GetRequest, MultiGetRequest, PartitionHolders, ReadOptions, ScanRequest,
    ScanResponse,
};
use prost::Message as _;
use tokio::time::Instant;
use tonic_types::StatusExt;

use super::{CallFuture, CallOutcome, KeyOutcome, Op, Reply};
use crate::channels::Channels;
use crate::error::AttemptError;

/// The type URL of kstore's PartitionHolders status detail.
const PARTITION_HOLDERS_TYPE_URL: &str = "type.googleapis.com/kstore.v1.PartitionHolders";

/// What every call of a read carries.
#[derive(Debug, Clone)]
pub(crate) struct CallSettings {
    /// The store.
    pub(crate) store: String,
    /// Read-your-writes: the input offset the answer must reflect.
    pub(crate) min_input_offset: Option<i64>,
}

/// Sends one call to `target` for `keys` (one for a Get), until `deadline`.
pub(crate) fn call(
    channels: &Channels,
    settings: &CallSettings,
    op: Op,
    target: &Target,
    keys: Vec<Vec<u8>>,
    deadline: Instant,
) -> CallFuture {
    let options = Some(ReadOptions {
        min_input_offset: settings.min_input_offset,
        no_forward: true,
    });
    let store = settings.store.clone();
    let channel = channels.start_read(&target.address);
    Box::pin(async move {
        let (channel, _in_flight) = match channel {
            Ok(channel) => channel,
            Err(reason) => return CallOutcome::Failed(AttemptError::Unreachable(reason), None),
        };
        let mut client = QueryClient::new(channel);
        // The node gets the whole time left, not the copy's share of it: a copy that is
        // slow rather than stalled may still answer first.
        let timeout = deadline.saturating_duration_since(Instant::now());
        let answer = match op {
            Op::Get => {
                let mut request = tonic::Request::new(GetRequest {
                    store,
                    key: keys.into_iter().next().unwrap_or_default(),
                    partition: None,
                    options,
                });
                request.set_timeout(timeout);
                tokio::time::timeout_at(deadline, client.get(request))
                    .await
                    .map(|answer| {
                        answer.map(|response| CallOutcome::Answered {
                            keys: vec![KeyOutcome::Answered(Reply::Get(response.into_inner()))],
                            holders: Vec::new(),
                        })
                    })
            }
            Op::MultiGet => {
                let mut request = tonic::Request::new(MultiGetRequest {
                    store,
                    keys,
                    options,
                });
                request.set_timeout(timeout);
                tokio::time::timeout_at(deadline, client.multi_get(request))
                    .await
                    .map(|answer| answer.map(|response| multi_get_outcome(response.into_inner())))
            }
            Op::Scan => return scan_pages(client, keys, options, timeout, deadline).await,
        };
        match answer {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(status)) => {
                let (error, holders) = classify(&status);
                CallOutcome::Failed(error, holders)
            }
            Err(_) => CallOutcome::Failed(AttemptError::TimedOut, None),
        }
    })
}

/// Asks one node for a page of each of `requests` (encoded `ScanRequest`s, one per
/// partition), all at once. The call fails as a whole only if the node did (every page
/// unreachable or unanswered in time); otherwise each page is answered or failed on its
/// own, and the holders named by pages the node does not hold come back with the answers.
async fn scan_pages(
    client: QueryClient<tonic::transport::Channel>,
    requests: Vec<Vec<u8>>,
    options: Option<ReadOptions>,
    timeout: std::time::Duration,
    deadline: Instant,
) -> CallOutcome {
    let mut pages = tokio::task::JoinSet::new();
    for (index, encoded) in requests.into_iter().enumerate() {
        let mut client = client.clone();
        pages.spawn(async move {
            let request = match ScanRequest::decode(encoded.as_slice()) {
                Ok(request) => request,
                Err(error) => {
                    let status = tonic::Status::internal(format!("a page request: {error}"));
                    return (index, Err(status));
                }
            };
            let mut request = tonic::Request::new(ScanRequest {
                options: Some(ReadOptions {
                    min_input_offset: request.options.and_then(|o| o.min_input_offset),
                    ..options.unwrap_or_default()
                }),
                ..request
            });
            request.set_timeout(timeout);
            let answer = match tokio::time::timeout_at(deadline, client.scan(request)).await {
                Ok(answer) => answer.map(tonic::Response::into_inner),
                Err(_) => Err(tonic::Status::deadline_exceeded(
                    "no answer before the deadline",
                )),
            };
            (index, answer)
        });
    }
    let mut answers: Vec<(usize, Result<ScanResponse, tonic::Status>)> = pages.join_all().await;
    answers.sort_by_key(|(index, _)| *index);
    let mut keys = Vec::with_capacity(answers.len());
    let mut holders = Vec::new();
    let mut failures = Vec::new();
    for (_, answer) in answers {
        match answer {
            Ok(page) => keys.push(KeyOutcome::Answered(Reply::Scan(page))),
            Err(status) => {
                let (error, hint) = classify(&status);
                holders.extend(hint.clone());
                failures.push((error.clone(), hint));
                keys.push(KeyOutcome::Failed(error));
            }
        }
    }
    // The node itself failed (unreachable, or no answer in time): the call failed. Pages
    // that failed for reasons of their own keep them.
    let node_failed = |error: &AttemptError| {
        matches!(error, AttemptError::Unreachable(_) | AttemptError::TimedOut)
    };
    if failures.len() == keys.len()
        && failures.iter().all(|(error, _)| node_failed(error))
        && let Some((error, hint)) = failures.into_iter().next()
    {
        return CallOutcome::Failed(error, hint);
    }
    CallOutcome::Answered { keys, holders }
}

/// A MultiGet's answer, per key.
fn multi_get_outcome(response: kstore_proto::v1::MultiGetResponse) -> CallOutcome {
    let keys = response
        .results
        .into_iter()
        .map(|result| match (result.error(), result.result) {
            (ErrorReason::Unspecified, Some(response)) => {
                KeyOutcome::Answered(Reply::Get(response))
            }
            (ErrorReason::Unspecified, None) => KeyOutcome::Failed(AttemptError::Status {
                code: tonic::Code::Internal,
                reason: String::new(),
                message: "the node gave neither a result nor an error for the key".into(),
            }),
            (reason, _) => KeyOutcome::Failed(key_error(reason)),
        })
        .collect();
    CallOutcome::Answered {
        keys,
        holders: response.holders,
    }
}

/// What a node's error for one key of a MultiGet means: the reasons the node would give for
/// a whole Get, with the codes it would give.
fn key_error(reason: ErrorReason) -> AttemptError {
    let code = match reason {
        ErrorReason::PartitionNotHosted => return AttemptError::NotHosted,
        ErrorReason::NoAnswer => return AttemptError::TimedOut,
        ErrorReason::EmptyKey
        | ErrorReason::KeyTooLarge
        | ErrorReason::UnknownStore
        | ErrorReason::PartitionOutOfRange
        | ErrorReason::WrongPartition
        | ErrorReason::TooManyKeys
        | ErrorReason::InvalidRange => tonic::Code::InvalidArgument,
        ErrorReason::PositionNotReached
        | ErrorReason::DrainInProgress
        | ErrorReason::BackupsNotConfigured => tonic::Code::FailedPrecondition,
        ErrorReason::AdminTokenRequired | ErrorReason::ClusterSecretRequired => {
            tonic::Code::Unauthenticated
        }
        ErrorReason::Overloaded | ErrorReason::RequestTimeout => tonic::Code::Unavailable,
        ErrorReason::TooManyStreams => tonic::Code::ResourceExhausted,
        ErrorReason::StoreError | ErrorReason::BackupFailed | ErrorReason::Unspecified => {
            tonic::Code::Internal
        }
    };
    AttemptError::Status {
        code,
        reason: reason.as_str_name().to_owned(),
        message: "the node could not read this key".into(),
    }
}

/// Turns a node's error answer into an attempt error, with the holders it named. Every way
/// of saying "no answer in time" (the client's own deadline, the node's DEADLINE_EXCEEDED or
/// NO_ANSWER, tonic's "Timeout expired") becomes [`AttemptError::TimedOut`], so that the
/// condition reads the same wherever it arose.
pub(crate) fn classify(status: &tonic::Status) -> (AttemptError, Option<PartitionHolders>) {
    let reason = status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default();
    if reason == ErrorReason::PartitionNotHosted.as_str_name() {
        let hint = tonic_types::pb::Status::decode(status.details())
            .ok()
            .and_then(|rich| {
                rich.details
                    .into_iter()
                    .find(|any| any.type_url == PARTITION_HOLDERS_TYPE_URL)
            })
            .and_then(|any| PartitionHolders::decode(any.value.as_slice()).ok());
        return (AttemptError::NotHosted, hint);
    }
    let timed_out = reason == ErrorReason::NoAnswer.as_str_name()
        || status.code() == tonic::Code::DeadlineExceeded
        || (status.code() == tonic::Code::Cancelled
            && status.message() == tonic::TimeoutExpired(()).to_string());
    let error = if timed_out {
        AttemptError::TimedOut
    } else if status.code() == tonic::Code::Unavailable && reason.is_empty() {
        AttemptError::Unreachable(status.message().to_owned())
    } else {
        AttemptError::Status {
            code: status.code(),
            reason,
            message: status.message().to_owned(),
        }
    };
    (error, None)
}

/// Whether another copy may answer where one failed with `error`. Matched exhaustively: a
/// new kind of error must say whether it is worth another copy.
pub(crate) fn retriable(error: &AttemptError) -> bool {
    match error {
        AttemptError::Unreachable(_)
        | AttemptError::NotHosted
        | AttemptError::TimedOut
        | AttemptError::Cancelled => true,
        AttemptError::Status { code, .. } => matches!(
            code,
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
                | tonic::Code::Internal
                | tonic::Code::ResourceExhausted
                | tonic::Code::Aborted
        ),
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::ErrorDetails;

    use super::*;

    #[test]
    fn every_way_of_running_out_of_time_reads_the_same() {
        for status in [
            tonic::Status::deadline_exceeded("deadline has elapsed"),
            tonic::Status::cancelled("Timeout expired"),
            tonic::Status::with_error_details(
                tonic::Code::DeadlineExceeded,
                "no answer for partition 3 before the deadline (asked node-2)",
                ErrorDetails::with_error_info("NO_ANSWER", "kstore", []),
            ),
        ] {
            let (error, _) = classify(&status);
            assert_eq!(error, AttemptError::TimedOut, "{status:?}");
            assert_eq!(error.to_string(), "no answer before the deadline");
        }
        // A cancellation for another reason is not a timeout.
        let (error, _) = classify(&tonic::Status::cancelled("the caller went away"));
        assert!(matches!(
            error,
            AttemptError::Status {
                code: tonic::Code::Cancelled,
                ..
            }
        ));
        assert!(retriable(&error));
    }

    #[test]
    fn refusals_any_node_would_give_are_not_retried() {
        let (error, _) = classify(&tonic::Status::with_error_details(
            tonic::Code::FailedPrecondition,
            "offset 9 was not reached before the deadline",
            ErrorDetails::with_error_info("POSITION_NOT_REACHED", "kstore", []),
        ));
        assert!(!retriable(&error));
        assert!(!retriable(&key_error(ErrorReason::KeyTooLarge)));
        assert!(retriable(&key_error(ErrorReason::StoreError)));
        assert_eq!(
            key_error(ErrorReason::PartitionNotHosted),
            AttemptError::NotHosted
        );
        let (error, _) = classify(&tonic::Status::unavailable("connection refused"));
        assert_eq!(
            error,
            AttemptError::Unreachable("connection refused".into())
        );
    }
}
