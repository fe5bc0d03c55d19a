//! Limits that keep a node answering reads whatever its callers do.
//!
//! [`LimitLayer`] is a tower layer in front of the node's services. A call of a limited
//! Query method is admitted only if a slot of its kind is free, and refused at once
//! otherwise (load shedding: nothing queues, so a flood costs the node one refusal per
//! call, never memory or time). The slot is held until the call's response body ends or is
//! dropped, so a WatchMetadata or ScanStream stream holds its slot (of the streams' pool)
//! for as long as it is open; Get,
//! MultiGet, Metadata and Scan share one pool of slots and are cut off at the request timeout.
//! FetchSnapshot slots belong to the sending thread instead (see `snapshot`), since a
//! stalled receiver never lets its body end.
//!
//! Tower's own `ConcurrencyLimit` frees its slot when the response's head is ready, which
//! for a stream is at its start; hence a layer of kstore's own.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use kstore_proto::v1::ErrorReason;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::http;
use tonic::{Code, Status};

use crate::config::LimitsConfig;

/// Calls refused by a limit, by method and reason.
pub const REFUSED: &str = "kstore_grpc_refused_total";

/// A call refused by one of the node's limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitError {
    /// Every read slot is taken.
    #[error(
        "this node is answering {limit} Query calls already (limits.max-concurrent-reads); \
         another copy may answer"
    )]
    Overloaded {
        /// The limit.
        limit: usize,
    },
    /// Every stream slot of the method is taken.
    #[error("this node has {limit} {method} streams open already (limits.{key})")]
    TooManyStreams {
        /// The method.
        method: &'static str,
        /// The limit.
        limit: usize,
        /// The limit's config key, below `limits`.
        key: &'static str,
    },
    /// The call ran past the request timeout.
    #[error("{method} ran longer than this node's limits.request-timeout-ms ({timeout_ms} ms)")]
    RequestTimeout {
        /// The method.
        method: &'static str,
        /// The timeout.
        timeout_ms: u64,
    },
}

impl LimitError {
    /// Returns the reason clients match on.
    pub fn reason(&self) -> ErrorReason {
        match self {
            LimitError::Overloaded { .. } => ErrorReason::Overloaded,
            LimitError::TooManyStreams { .. } => ErrorReason::TooManyStreams,
            LimitError::RequestTimeout { .. } => ErrorReason::RequestTimeout,
        }
    }

    /// Returns the gRPC status code.
    pub fn code(&self) -> Code {
        match self {
            LimitError::Overloaded { .. } | LimitError::RequestTimeout { .. } => Code::Unavailable,
            LimitError::TooManyStreams { .. } => Code::ResourceExhausted,
        }
    }

    fn metadata(&self) -> HashMap<String, String> {
        let pairs: Vec<(&str, String)> = match self {
            LimitError::Overloaded { limit } => vec![("limit", limit.to_string())],
            LimitError::TooManyStreams { method, limit, .. } => {
                vec![
                    ("method", (*method).to_owned()),
                    ("limit", limit.to_string()),
                ]
            }
            LimitError::RequestTimeout { method, timeout_ms } => vec![
                ("method", (*method).to_owned()),
                ("timeout_ms", timeout_ms.to_string()),
            ],
        };
        pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    /// Counts the refusal of a call of `method`.
    pub fn count(&self, method: &'static str) {
        metrics::counter!(REFUSED, "method" => method, "reason" => self.reason().as_str_name())
            .increment(1);
    }
}

impl From<LimitError> for Status {
    fn from(error: LimitError) -> Self {
        super::error::status_with_info(
            error.code(),
            error.to_string(),
            error.reason(),
            error.metadata(),
        )
    }
}

/// The slots of each kind of limited call, shared by every connection.
#[derive(Debug)]
pub struct Limits {
    reads: Arc<Semaphore>,
    read_limit: usize,
    watches: Arc<Semaphore>,
    watch_limit: usize,
    request_timeout: Duration,
}

impl Limits {
    /// The limits `config` sets.
    pub fn new(config: &LimitsConfig) -> Arc<Self> {
        Arc::new(Limits {
            reads: Arc::new(Semaphore::new(config.max_concurrent_reads)),
            read_limit: config.max_concurrent_reads,
            watches: Arc::new(Semaphore::new(config.max_watch_streams)),
            watch_limit: config.max_watch_streams,
            request_timeout: Duration::from_millis(config.request_timeout_ms),
        })
    }

    /// Takes a slot of `kind` for a call of `method`, or says why there is none.
    fn admit(&self, method: &'static str, kind: Kind) -> Result<OwnedSemaphorePermit, LimitError> {
        let (slots, error) = match kind {
            Kind::Read => (
                &self.reads,
                LimitError::Overloaded {
                    limit: self.read_limit,
                },
            ),
            Kind::Watch => (
                &self.watches,
                LimitError::TooManyStreams {
                    method,
                    limit: self.watch_limit,
                    key: "max-watch-streams",
                },
            ),
        };
        slots.clone().try_acquire_owned().map_err(|_| error)
    }
}

/// Which pool of slots a call takes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A unary Query call, with the request timeout.
    Read,
    /// A stream: WatchMetadata, or ScanStream (whose pages each have the read deadline).
    Watch,
}

/// The limited method a request path names, with its kind.
fn limited(path: &str) -> Option<(&'static str, Kind)> {
    let method = path
        .strip_prefix('/')?
        .strip_prefix(kstore_proto::v1::query_server::SERVICE_NAME)?
        .strip_prefix('/')?;
    match method {
        "Get" => Some(("Get", Kind::Read)),
        "MultiGet" => Some(("MultiGet", Kind::Read)),
        "Metadata" => Some(("Metadata", Kind::Read)),
        "Scan" => Some(("Scan", Kind::Read)),
        "WatchMetadata" => Some(("WatchMetadata", Kind::Watch)),
        "ScanStream" => Some(("ScanStream", Kind::Watch)),
        _ => None,
    }
}

/// Applies [`Limits`] to the services below it.
#[derive(Debug, Clone)]
pub struct LimitLayer {
    limits: Arc<Limits>,
}

impl LimitLayer {
    /// A layer that enforces `limits`.
    pub fn new(limits: Arc<Limits>) -> Self {
        LimitLayer { limits }
    }
}

impl<S> tower::Layer<S> for LimitLayer {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Limited<S> {
        Limited {
            inner,
            limits: self.limits.clone(),
        }
    }
}

/// A service with [`Limits`] in front of it.
#[derive(Debug, Clone)]
pub struct Limited<S> {
    inner: S,
    limits: Arc<Limits>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// The most of a refused call's request that is read (a Query request is a few hundred
/// bytes; tonic's own limit on a message is 4 MiB).
const DRAIN_BYTES: usize = 4 << 20;

/// How long a refused call's request is waited for.
const DRAIN_TIME: Duration = Duration::from_millis(100);

/// Reads a refused call's request, at most [`DRAIN_BYTES`] for at most [`DRAIN_TIME`], and
/// throws it away. Answering before the request has arrived makes HTTP/2 reset the stream
/// while the client still sends it, and h2 (0.4.20) counts a small DATA frame that arrives
/// on such a reset stream against the connection's budget of small frames and never gives
/// it back: some two thousand such refusals over a connection's life, and h2 closes the
/// caller's whole connection (GOAWAY ENHANCE_YOUR_CALM), failing the admitted calls on it
/// too.
async fn drain<B: Body + Send>(body: B) {
    use http_body_util::BodyExt;
    let mut body = std::pin::pin!(body);
    let read = async {
        let mut seen = 0usize;
        while seen < DRAIN_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => {
                    seen += frame.data_ref().map_or(0, bytes::Buf::remaining);
                }
                Some(Err(_)) | None => return,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, read).await;
}

impl<S, B> tower::Service<http::Request<B>> for Limited<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some((method, kind)) = limited(request.uri().path()) else {
            return Box::pin(self.inner.call(request));
        };
        let slot = match self.limits.admit(method, kind) {
            Ok(slot) => slot,
            Err(refused) => {
                refused.count(method);
                tracing::debug!(method, %refused, "refused a call");
                let body = request.into_body();
                return Box::pin(async move {
                    drain(body).await;
                    Ok(Status::from(refused).into_http())
                });
            }
        };
        let answer = self.inner.call(request);
        let timeout = (kind == Kind::Read).then_some(self.limits.request_timeout);
        Box::pin(async move {
            let response = match timeout {
                None => answer.await?,
                Some(timeout) => match tokio::time::timeout(timeout, answer).await {
                    Ok(response) => response?,
                    Err(_) => {
                        let refused = LimitError::RequestTimeout {
                            method,
                            timeout_ms: timeout.as_millis() as u64,
                        };
                        refused.count(method);
                        tracing::warn!(method, %refused, "a call timed out");
                        return Ok(Status::from(refused).into_http());
                    }
                },
            };
            Ok(response.map(|body| tonic::body::Body::new(SlotBody::new(body, slot))))
        })
    }
}

/// A response body that holds its call's slot until it ends or is dropped.
#[derive(Debug)]
struct SlotBody<B> {
    body: B,
    slot: Option<OwnedSemaphorePermit>,
}

impl<B> SlotBody<B> {
    fn new(body: B, slot: OwnedSemaphorePermit) -> Self {
        SlotBody {
            body,
            slot: Some(slot),
        }
    }
}

impl<B: Body + Unpin> Body for SlotBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.slot = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tonic_types::StatusExt;
    use tower::{Layer, Service, ServiceExt};

    use super::*;

    fn config(reads: usize, watches: usize, timeout_ms: u64) -> LimitsConfig {
        LimitsConfig {
            max_concurrent_reads: reads,
            max_watch_streams: watches,
            request_timeout_ms: timeout_ms,
            ..LimitsConfig::default()
        }
    }

    /// A service that answers after `delay` with a body of one frame (a body at its end
    /// already would be dropped at once, and its slot with it).
    fn slow(
        delay: Duration,
    ) -> impl tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = Infallible,
        Future = impl Send + 'static,
    > + Clone {
        tower::service_fn(
            move |_request: http::Request<tonic::body::Body>| async move {
                tokio::time::sleep(delay).await;
                let body = http_body_util::Full::new(tonic::codegen::Bytes::from_static(b"frame"));
                Ok::<_, Infallible>(http::Response::new(tonic::body::Body::new(body)))
            },
        )
    }

    fn request(method: &str) -> http::Request<tonic::body::Body> {
        http::Request::builder()
            .uri(format!("http://node/kstore.v1.Query/{method}"))
            .body(tonic::body::Body::empty())
            .unwrap()
    }

    fn status_of(response: &http::Response<tonic::body::Body>) -> Option<Status> {
        Status::from_header_map(response.headers())
    }

    #[test]
    fn only_query_methods_are_limited() {
        assert_eq!(limited("/kstore.v1.Query/Get"), Some(("Get", Kind::Read)));
        assert_eq!(
            limited("/kstore.v1.Query/WatchMetadata"),
            Some(("WatchMetadata", Kind::Watch))
        );
        assert_eq!(limited("/kstore.v1.Admin/Drain"), None);
        assert_eq!(limited("/kstore.v1.Peer/FetchSnapshot"), None);
        assert_eq!(limited("/kstore.v1.Query/Get/more"), None);
        assert_eq!(limited("/grpc.health.v1.Health/Check"), None);
        assert_eq!(limited(""), None);
    }

    #[tokio::test]
    async fn reads_beyond_the_limit_are_refused_at_once_and_a_slot_frees_when_a_body_ends() {
        let mut service = LimitLayer::new(Limits::new(&config(2, 1, 60_000)))
            .layer(slow(Duration::from_millis(200)));
        let first = service.ready().await.unwrap().call(request("Get"));
        let second = service.ready().await.unwrap().call(request("MultiGet"));
        // Both slots are taken while the two calls run: the third is refused now.
        let third = service
            .ready()
            .await
            .unwrap()
            .call(request("Metadata"))
            .await
            .unwrap();
        let refused = status_of(&third).expect("a refusal");
        assert_eq!(refused.code(), Code::Unavailable);
        let info = refused.get_details_error_info().expect("an ErrorInfo");
        assert_eq!(info.reason, "OVERLOADED");
        assert_eq!(info.metadata.get("limit").map(String::as_str), Some("2"));
        assert!(refused.message().contains("max-concurrent-reads"));
        // Other services are not limited.
        let health = http::Request::builder()
            .uri("http://node/grpc.health.v1.Health/Check")
            .body(tonic::body::Body::empty())
            .unwrap();
        let other = service.ready().await.unwrap().call(health);

        let (first, second, other) = tokio::join!(first, second, other);
        assert!(status_of(other.as_ref().unwrap()).is_none());
        // The bodies still hold their slots; dropping one frees one.
        drop(first);
        let fourth = service.ready().await.unwrap().call(request("Get"));
        let fifth = service
            .ready()
            .await
            .unwrap()
            .call(request("Get"))
            .await
            .unwrap();
        assert_eq!(status_of(&fifth).unwrap().code(), Code::Unavailable);
        assert!(status_of(&fourth.await.unwrap()).is_none());
        drop(second);
    }

    #[tokio::test]
    async fn watch_streams_have_their_own_limit_and_hold_it_while_open() {
        let mut service =
            LimitLayer::new(Limits::new(&config(1, 2, 60_000))).layer(slow(Duration::ZERO));
        let mut open = Vec::new();
        for _ in 0..2 {
            let response = service
                .ready()
                .await
                .unwrap()
                .call(request("WatchMetadata"))
                .await
                .unwrap();
            assert!(status_of(&response).is_none());
            open.push(response);
        }
        let refused = service
            .ready()
            .await
            .unwrap()
            .call(request("WatchMetadata"))
            .await
            .unwrap();
        let refused = status_of(&refused).unwrap();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        let info = refused.get_details_error_info().unwrap();
        assert_eq!(info.reason, "TOO_MANY_STREAMS");
        assert_eq!(
            info.metadata.get("method").map(String::as_str),
            Some("WatchMetadata")
        );
        // Reads still have their slot while the streams are open.
        let read = service.ready().await.unwrap().call(request("Get")).await;
        assert!(status_of(&read.unwrap()).is_none());
        // A stream that ends (its body read to the end) gives its slot back.
        let body = open.pop().unwrap().into_body();
        let _ = http_body_util::BodyExt::collect(body).await;
        let again = service
            .ready()
            .await
            .unwrap()
            .call(request("WatchMetadata"))
            .await
            .unwrap();
        assert!(status_of(&again).is_none());
    }

    #[tokio::test]
    async fn a_read_past_the_request_timeout_is_answered_unavailable_and_frees_its_slot() {
        let mut service =
            LimitLayer::new(Limits::new(&config(1, 1, 100))).layer(slow(Duration::from_secs(3600)));
        let timed_out = service
            .ready()
            .await
            .unwrap()
            .call(request("Get"))
            .await
            .unwrap();
        let status = status_of(&timed_out).unwrap();
        assert_eq!(status.code(), Code::Unavailable);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "REQUEST_TIMEOUT");
        assert_eq!(
            info.metadata.get("timeout_ms").map(String::as_str),
            Some("100")
        );
        // The slot came back: the next read is admitted (and times out in turn).
        let next = service
            .ready()
            .await
            .unwrap()
            .call(request("Get"))
            .await
            .unwrap();
        assert_eq!(
            status_of(&next)
                .unwrap()
                .get_details_error_info()
                .unwrap()
                .reason,
            "REQUEST_TIMEOUT"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_survives_thousands_of_refusals_in_bursts() {
        use kstore_core::cluster::ClusterView;
        use kstore_proto::v1::GetRequest;
        use kstore_proto::v1::query_client::QueryClient;
        use kstore_proto::v1::query_server::QueryServer;

        let incoming =
            tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let address = incoming.local_addr().unwrap();
        let mut config = crate::config::NodeConfig::default();
        // Every read refused.
        config.limits.max_concurrent_reads = 0;
        let (_view, view) = tokio::sync::watch::channel(Arc::new(ClusterView::default()));
        let query = crate::grpc::query::QueryService::new(
            Arc::new(crate::registry::Registry::new("n1", 4)),
            Arc::new(config.clone()),
            view,
            None,
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .layer(LimitLayer::new(Limits::new(&config.limits)))
                .add_service(QueryServer::new(query))
                .serve_with_incoming(incoming),
        );
        let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let client = QueryClient::new(channel);
        for burst in 0..40 {
            let mut calls = tokio::task::JoinSet::new();
            for _ in 0..500 {
                let mut client = client.clone();
                calls.spawn(async move {
                    client
                        .get(GetRequest {
                            store: "features".into(),
                            key: b"customer-1".to_vec(),
                            partition: None,
                            options: None,
                        })
                        .await
                });
            }
            while let Some(answer) = calls.join_next().await {
                let status = answer.unwrap().unwrap_err();
                assert_eq!(
                    (
                        status.code(),
                        status.get_details_error_info().map(|i| i.reason)
                    ),
                    (Code::Unavailable, Some("OVERLOADED".to_owned())),
                    "burst {burst}: {status:?}"
                );
            }
        }
    }
}
