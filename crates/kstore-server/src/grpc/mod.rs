//! The node's gRPC server: Query, Admin, health and reflection on one port; and forwarding
//! of reads to the node that holds their partition.

pub mod admin;
pub mod error;
pub mod forward;
pub mod limits;
pub mod query;
pub mod stores;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kstore_proto::v1::admin_server::AdminServer;
use kstore_proto::v1::peer_server::PeerServer;
use kstore_proto::v1::query_server::QueryServer;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use kstore_core::cluster::ClusterView;
use tokio::sync::watch;

use crate::config::NodeConfig;
use crate::registry::Registry;
use admin::{AdminService, AdminStore};
use query::QueryService;
use stores::{StoreQueries, StoreQuery};

/// How often the server pings an idle connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long the server waits for a ping's answer before it closes the connection.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Streams a client may reset before the server accepted them, per connection, before the
/// connection is closed (h2's guard against a flood of resets; its default is 20). Clients
/// that hedge, or give a stalled copy up after a share of their deadline, cancel calls as a
/// matter of course: on a busy node those cancellations pile up, and 20 closed the
/// connection, failing every call on it. The concurrency limit bounds the work instead.
const MAX_PENDING_RESET_STREAMS: usize = 1024;

/// Why the gRPC server stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GrpcError {
    /// Reflection could not be built from the descriptor sets.
    #[error("building gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// One store the node serves.
#[derive(Debug, Clone)]
pub struct ServedStore {
    /// The store's configuration (`NodeConfig::store_configs`).
    pub config: Arc<NodeConfig>,
    /// Its local copies.
    pub registry: Arc<Registry>,
    /// Every node with its copies of the store.
    pub view: watch::Receiver<Arc<ClusterView>>,
    /// How its values are answered.
    pub values: ValueFormat,
    /// Its backups, if a backup location is configured.
    pub backups: Option<Arc<crate::backup::Backups>>,
}

/// What the Admin service acts on beyond the local copies.
#[derive(Debug, Clone)]
pub struct Operations {
    /// The node's drain.
    pub drain: Arc<crate::drain::Drain>,
    /// The Peer service (snapshots of every store for other nodes).
    pub peer: Option<crate::snapshot::PeerService>,
    /// The node's TLS identity: set, the port serves TLS only, and reads are forwarded over
    /// TLS.
    pub tls: Option<Arc<crate::tls::Tls>>,
}

/// How a store's values are answered: typed (an `Any` of `type_url`) or raw, and the
/// descriptor set reflection serves for a type of the user's.
#[derive(Debug, Clone, Default)]
pub struct ValueFormat {
    /// The values' `google.protobuf.Any` type URL; `None`: raw bytes.
    pub type_url: Option<String>,
    /// An encoded `FileDescriptorSet` defining the type, served over reflection.
    pub descriptor_set: Option<Vec<u8>>,
}

/// A reflection service describing kstore's protos, health's and the value types' sets.
/// kstore's own files come first: a file of the same name in a value type's set (an
/// imported google/protobuf one, say) is then ignored, as is one a set before it defined.
fn described<'a>(
    builder: tonic_reflection::server::Builder<'a>,
    value_sets: &[&'a [u8]],
) -> tonic_reflection::server::Builder<'a> {
    let mut builder = builder
        .register_encoded_file_descriptor_set(kstore_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    for set in value_sets {
        builder = builder.register_encoded_file_descriptor_set(set);
    }
    builder
}

/// Serves Query (and Admin, if enabled) for every store in `stores` (the node's first store
/// first), health and reflection on `incoming` until `shutdown` completes. Health says
/// NOT_SERVING until every store's copies are open. Admin acts on every store.
pub async fn serve(
    incoming: TcpIncoming,
    config: Arc<NodeConfig>,
    stores: Vec<ServedStore>,
    operations: Operations,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GrpcError> {
    let query = QueryServer::new(StoreQueries::new(
        stores
            .iter()
            .map(|store| StoreQuery {
                name: store.config.store.clone(),
                service: QueryService::new(
                    store.registry.clone(),
                    store.config.clone(),
                    store.view.clone(),
                    store.values.type_url.clone(),
                )
                .with_tls(operations.tls.clone()),
                view: store.view.clone(),
            })
            .collect(),
    ));
    let admin = config.admin_enabled.then(|| {
        AdminServer::new(AdminService::new(
            stores
                .iter()
                .map(|store| {
                    AdminStore::new(store.config.store.clone(), store.registry.clone())
                        .with_backups(store.backups.clone(), store.view.clone())
                })
                .collect(),
            config.admin_token.clone(),
            operations.drain.clone(),
        ))
    });

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_not_serving::<QueryServer<StoreQueries>>()
        .await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let registries: Vec<Arc<Registry>> = stores.iter().map(|s| s.registry.clone()).collect();
    tokio::spawn(report_health(registries, reporter));

    let value_sets: Vec<&[u8]> = stores
        .iter()
        .filter_map(|store| store.values.descriptor_set.as_deref())
        .collect();
    let reflection = described(tonic_reflection::server::Builder::configure(), &value_sets);
    let reflection_v1alpha =
        described(tonic_reflection::server::Builder::configure(), &value_sets).build_v1alpha()?;

    let router = Server::builder()
        // A connection whose peer is gone (not merely slow) is closed within a minute, and
        // with it every stream and slot it held.
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESET_STREAMS))
        .layer(limits::LimitLayer::new(limits::Limits::new(&config.limits)))
        .add_service(health)
        .add_service(reflection.build_v1()?)
        .add_service(reflection_v1alpha)
        .add_service(query)
        .add_optional_service(admin)
        .add_optional_service(
            operations
                .peer
                .map(|peer| PeerServer::new(peer).max_encoding_message_size(4 << 20)),
        );
    match operations.tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls.incoming(incoming), shutdown)
                .await?
        }
        None => {
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?
        }
    }
    Ok(())
}

/// Keeps health current: NOT_SERVING until every store's copies are open, then SERVING
/// while nothing node-wide is wrong (a thread of the node that died turns it NOT_SERVING,
/// with the reason in the log).
async fn report_health(
    registries: Vec<Arc<Registry>>,
    reporter: tonic_health::server::HealthReporter,
) {
    for registry in &registries {
        registry.wait_ready().await;
    }
    let mut changes = tokio_stream::StreamMap::new();
    for (i, registry) in registries.iter().enumerate() {
        changes.insert(
            i,
            tokio_stream::wrappers::WatchStream::from_changes(registry.watch_problems()),
        );
    }
    loop {
        let problems: Vec<_> = registries
            .iter()
            .flat_map(|registry| registry.watch_problems().borrow().clone())
            .collect();
        let status = if problems.is_empty() {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        reporter
            .set_service_status(
                <QueryServer<StoreQueries> as tonic::server::NamedService>::NAME,
                status,
            )
            .await;
        reporter.set_service_status("", status).await;
        match status {
            tonic_health::ServingStatus::Serving => {
                tracing::info!("stores open; health is SERVING");
            }
            _ => tracing::error!(?problems, "health is NOT_SERVING"),
        }
        if tokio_stream::StreamExt::next(&mut changes).await.is_none() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    use super::*;

    #[tokio::test]
    async fn health_is_serving_once_the_stores_are_open_and_until_a_thread_dies() {
        let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let address = incoming.local_addr().unwrap();
        let registry = Arc::new(Registry::new("n1", 4));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (_view, view_rx) = watch::channel(Arc::new(ClusterView::default()));
        let config = Arc::new(NodeConfig::default());
        let server = tokio::spawn(serve(
            incoming,
            config.clone(),
            vec![ServedStore {
                config,
                registry: registry.clone(),
                view: view_rx,
                values: ValueFormat::default(),
                backups: None,
            }],
            Operations {
                drain: Arc::new(crate::drain::Drain::new(Arc::default(), false)),
                peer: None,
                tls: None,
            },
            async move {
                let _ = stopped.await;
            },
        ));
        let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel);
        let status = |service: &str| {
            let mut health = health.clone();
            let request = HealthCheckRequest {
                service: service.into(),
            };
            async move { health.check(request).await.unwrap().into_inner().status() }
        };
        for service in ["", "kstore.v1.Query"] {
            assert_eq!(
                status(service).await,
                ServingStatus::NotServing,
                "{service:?}"
            );
        }

        registry.mark_ready();
        let serving = async {
            while status("").await != ServingStatus::Serving {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), serving)
            .await
            .expect("health turns SERVING once the stores are open");
        assert_eq!(status("kstore.v1.Query").await, ServingStatus::Serving);

        // A thread of the node dies: NOT_SERVING.
        drop(crate::registry::Watchdog::new(
            registry.clone(),
            "state updater",
        ));
        let not_serving = async {
            while status("").await != ServingStatus::NotServing {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), not_serving)
            .await
            .expect("health turns NOT_SERVING when a thread of the node dies");
        assert_eq!(status("kstore.v1.Query").await, ServingStatus::NotServing);
        let unknown = health
            .check(HealthCheckRequest {
                service: "no.such.Service".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
