//! A node's lifecycle: check the topics, open the gRPC and metrics ports, join the cluster's
//! gossip, start the state updater and placement, then ingest until asked to stop; then say
//! it leaves, and stop serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tonic::transport::server::TcpIncoming;

use crate::backup::{self, Backups};
use crate::config::{NodeConfig, ProcessorKind};
use crate::drain::{self, Drain};
use crate::gossip::{Gossip, GossipError, SelfState};
use crate::grpc::{self, GrpcError};
use crate::ingest::{self, IngestError, IngestMetrics};
use crate::processor::Processor;
use crate::processor::features::FeaturesProcessor;
use crate::registry::Registry;
use crate::snapshot::{PeerService, SnapshotFetcher};
use crate::standby::updater::{self, UpdaterMetrics};
use crate::standby::{Bootstrap, Copies, placement};
use crate::store::SharedMemory;
use crate::topics::{self, TopicError};

/// How often the node looks at the input's end offsets (for lag) and publishes metrics.
const LAG_INTERVAL: Duration = Duration::from_millis(500);

/// Why a node stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The topics are missing or do not fit together.
    #[error(transparent)]
    Topics(#[from] TopicError),
    /// Ingest failed.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// The gRPC server failed.
    #[error(transparent)]
    Grpc(#[from] GrpcError),
    /// Gossip could not start.
    #[error(transparent)]
    Gossip(#[from] GossipError),
    /// The state updater could not start.
    #[error("starting the state updater: {0}")]
    Updater(rdkafka::error::KafkaError),
    /// A port could not be opened.
    #[error("cannot listen on {what} address {address}: {reason}")]
    Listen {
        /// Which port.
        what: &'static str,
        /// The address.
        address: String,
        /// Why.
        reason: String,
    },
    /// The node could not start its runtime.
    #[error("starting the runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Returns the processor the configuration names.
pub fn builtin_processor(config: &NodeConfig) -> Box<dyn Processor> {
    match config.processor {
        ProcessorKind::Features => Box::new(FeaturesProcessor::new(config.alerts_topic())),
    }
}

/// Runs a node with `processor` until `shutdown` is set (then it commits what is open and
/// returns `Ok`), or until an error stops it.
pub fn run(
    config: NodeConfig,
    processor: Box<dyn Processor>,
    shutdown: Arc<AtomicBool>,
) -> Result<(), NodeError> {
    let config = Arc::new(config);
    let mut client = ClientConfig::new();
    for (key, value) in &config.kafka {
        client.set(key, value);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kstore-grpc")
        .enable_all()
        .build()?;
    let topology = runtime.block_on(topics::prepare(&config, &client))?;
    let registry = Arc::new(Registry::new(config.node_id.clone(), topology.partitions));
    let ingest_metrics = Arc::new(IngestMetrics::default());

    if !config.metrics_address.is_empty() {
        let listen_error = |reason: String| NodeError::Listen {
            what: "metrics",
            address: config.metrics_address.clone(),
            reason,
        };
        let address: std::net::SocketAddr = config
            .metrics_address
            .parse()
            .map_err(|_| listen_error("not an address".into()))?;
        let bound = runtime
            .block_on(async {
                let listener = tokio::net::TcpListener::bind(address).await?;
                let bound = listener.local_addr()?;
                crate::metrics::install(listener).map_err(std::io::Error::other)?;
                std::io::Result::Ok(bound)
            })
            .map_err(|error| listen_error(error.to_string()))?;
        // The bound address, which differs from the configured one when its port is 0.
        tracing::info!(address = %bound, "serving Prometheus metrics at /metrics");
    }

    let listen_error = |reason: String| NodeError::Listen {
        what: "grpc",
        address: config.grpc_address.clone(),
        reason,
    };
    let address = config
        .grpc_address
        .parse()
        .map_err(|_| listen_error("not an address".into()))?;
    let incoming = runtime
        .block_on(async { TcpIncoming::bind(address) })
        .map_err(|error| listen_error(error.to_string()))?
        .with_nodelay(Some(true));
    // The bound address, which differs from the configured one when its port is 0.
    let bound = incoming
        .local_addr()
        .map_err(|error| listen_error(error.to_string()))?;
    tracing::info!(address = %bound, "serving gRPC");

    let gossip = runtime.block_on(Gossip::start(
        &config,
        SelfState {
            registry: registry.clone(),
            ingest: ingest_metrics.clone(),
            grpc_address: config.advertised(bound).to_string(),
            shutdown: shutdown.clone(),
        },
    ))?;
    // Serving stops after ingest has handed its partitions over and gossip has said the
    // node leaves, so reads keep answering while the node shuts down or drains.
    let stop_serving = Arc::new(AtomicBool::new(false));
    let drain = Arc::new(Drain::new(shutdown.clone(), config.drain_on_shutdown));
    let memory = SharedMemory::new(&config.memory);
    let backups = Backups::from_config(&config, topology.partitions, memory.clone());
    // Where the stores' directories are; checkpoints for snapshots are made beside them.
    let stores_root = config
        .store_dir(0)
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| config.state_dir.clone());
    if let Some(backups) = &backups {
        tracing::info!(location = %backups.location(), "backups go to a local directory");
    }
    let server = runtime.spawn(grpc::serve(
        incoming,
        config.clone(),
        registry.clone(),
        gossip.view(),
        grpc::Operations {
            drain: drain.clone(),
            backups: backups.clone(),
            peer: Some(
                PeerService::new(
                    registry.clone(),
                    config.store.clone(),
                    stores_root.clone(),
                    memory.clone(),
                    config.admin_token.clone(),
                )
                .with_limits(&config.limits),
            ),
        },
        processor.value_type_url().map(str::to_owned),
        {
            let stop_serving = stop_serving.clone();
            async move {
                while !stop_serving.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        },
    ));

    let (restored_tx, restored) = std::sync::mpsc::channel();
    let updater_metrics = Arc::new(UpdaterMetrics::default());
    let mut updater_thread = updater::spawn(
        &client,
        config.changelog_topic(),
        format!("{}-{}-updater", config.app_id, config.node_id),
        config.ingest_niceness,
        registry.clone(),
        updater_metrics.clone(),
        restored_tx,
    )
    .map_err(NodeError::Updater)?;
    let copies = Arc::new(Copies::new(
        config.clone(),
        registry.clone(),
        memory.clone(),
        updater_thread.updater(),
        Bootstrap {
            peers: Some(
                SnapshotFetcher::new(
                    runtime.handle().clone(),
                    gossip.view(),
                    config.node_id.clone(),
                    config.store.clone(),
                    config.admin_token.clone(),
                    memory,
                )
                .with_limits(&config.limits),
            ),
            backups: backups.clone(),
        },
    ));
    let placement = placement::spawn(
        copies.clone(),
        config.node_id.clone(),
        config.num_standbys,
        gossip.view(),
        shutdown.clone(),
    )?;

    let scrub = (config.verify_interval_ms > 0)
        .then(|| {
            let (copies, shutdown) = (copies.clone(), shutdown.clone());
            let interval = Duration::from_millis(config.verify_interval_ms);
            std::thread::Builder::new()
                .name("kstore-verify".into())
                .spawn(move || {
                    let mut next = std::time::Instant::now() + interval;
                    while !shutdown.load(Ordering::Relaxed) {
                        if std::time::Instant::now() >= next {
                            copies.scrub(&shutdown);
                            next = std::time::Instant::now() + interval;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                })
        })
        .transpose()?;
    let backup_schedule = match &backups {
        Some(backups) => backup::spawn_schedule(
            backups.clone(),
            registry.clone(),
            gossip.view(),
            shutdown.clone(),
        )?,
        None => None,
    };

    let tracker = {
        let (client, config, registry, metrics, updater_metrics, shutdown) = (
            client.clone(),
            config.clone(),
            registry.clone(),
            ingest_metrics.clone(),
            updater_metrics.clone(),
            shutdown.clone(),
        );
        std::thread::Builder::new()
            .name("kstore-lag".into())
            .spawn(move || {
                track_lag(
                    &client,
                    &config.input_topic,
                    &registry,
                    &metrics,
                    &updater_metrics,
                    &shutdown,
                )
            })?
    };

    let ingested = ingest::run(
        config.clone(),
        topology.partitions,
        processor,
        copies,
        restored,
        ingest_metrics,
        shutdown.clone(),
    );
    // Whatever ended ingest, the node leaves.
    shutdown.store(true, Ordering::Relaxed);
    let _ = placement.join();
    if let Some(scrub) = scrub {
        let _ = scrub.join();
    }
    if let Some(schedule) = backup_schedule {
        let _ = schedule.join();
    }
    if let Ok(owned) = &ingested
        && drain.requested()
    {
        drain::hand_over(&config, owned, &gossip.view());
    }
    runtime.block_on(gossip.leave(Duration::from_millis(config.publish_interval_ms)));
    stop_serving.store(true, Ordering::Relaxed);
    let served = runtime.block_on(server);
    updater_thread.stop();
    let _ = tracker.join();
    ingested?;
    match served {
        Ok(result) => result?,
        Err(error) => tracing::error!(%error, "the gRPC server task failed"),
    }
    Ok(())
}

/// Looks at the input's end offsets for every local copy, and publishes metrics.
fn track_lag(
    client: &ClientConfig,
    input: &str,
    registry: &Registry,
    metrics: &IngestMetrics,
    updater_metrics: &UpdaterMetrics,
    shutdown: &AtomicBool,
) {
    let consumer: BaseConsumer = match client.create() {
        Ok(consumer) => consumer,
        Err(error) => {
            tracing::error!(%error, "cannot create the lag tracker's consumer; lag stays unknown");
            return;
        }
    };
    while !shutdown.load(Ordering::Relaxed) {
        for copy in registry.all() {
            match consumer.fetch_watermarks(input, copy.partition, Duration::from_secs(2)) {
                Ok((_, high)) => registry.set_input_end(copy.partition, high),
                Err(error) => tracing::debug!(%error, partition = copy.partition, "end offset"),
            }
        }
        crate::metrics::publish(metrics, updater_metrics, registry);
        std::thread::sleep(LAG_INTERVAL);
    }
}
