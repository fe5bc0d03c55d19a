//! A node's lifecycle: check the topics, open the gRPC and metrics ports, then ingest until
//! asked to stop; then stop serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tonic::transport::server::TcpIncoming;

use crate::config::{NodeConfig, ProcessorKind};
use crate::grpc::{self, GrpcError};
use crate::ingest::{self, IngestError, IngestMetrics};
use crate::processor::Processor;
use crate::processor::features::FeaturesProcessor;
use crate::registry::Registry;
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
    let stop_serving = shutdown.clone();
    let server = runtime.spawn(grpc::serve(
        incoming,
        config.clone(),
        registry.clone(),
        processor.value_type_url().map(str::to_owned),
        async move {
            while !stop_serving.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    ));

    let tracker = {
        let (client, config, registry, metrics, shutdown) = (
            client.clone(),
            config.clone(),
            registry.clone(),
            ingest_metrics.clone(),
            shutdown.clone(),
        );
        std::thread::Builder::new()
            .name("kstore-lag".into())
            .spawn(move || {
                track_lag(&client, &config.input_topic, &registry, &metrics, &shutdown)
            })?
    };

    let ingested = ingest::run(
        config,
        topology.partitions,
        processor,
        registry,
        ingest_metrics,
        shutdown.clone(),
    );
    // Whatever ended ingest, stop serving too.
    shutdown.store(true, Ordering::Relaxed);
    let served = runtime.block_on(server);
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
        crate::metrics::publish(metrics, registry);
        std::thread::sleep(LAG_INTERVAL);
    }
}
