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
use crate::config::{NodeConfig, ProcessorConfig, ProcessorKind};
use crate::drain::{self, Drain};
use crate::gossip::{Gossip, GossipError, SelfState};
use crate::grpc::{self, GrpcError};
use crate::ingest::{self, IngestError, IngestMetrics};
use crate::kafka::connect::{ConnectError, Connector, SettingsError};
use crate::probes::Probes;
use crate::processor::Processor;
use crate::processor::features::FeaturesProcessor;
use crate::processor::typed::{Typed, ValueType, ValueTypeError};
use crate::processor::wasm::{ModuleError, WasmProcessor};
use crate::registry::Registry;
use crate::registry::Watchdog;
use crate::snapshot::{PeerService, SnapshotFetcher};
use crate::standby::updater::{self, UpdaterMetrics};
use crate::standby::{Bootstrap, Copies, placement};
use crate::store::SharedMemory;
use crate::topics::{self, TopicError};

/// How often the node looks at the input's end offsets (for lag) and publishes metrics.
const LAG_INTERVAL: Duration = Duration::from_millis(500);

/// How long the start-up check of the Kafka security settings waits for a broker.
const KAFKA_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a node stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The topics are missing or do not fit together.
    #[error(transparent)]
    Topics(#[from] TopicError),
    /// The `kafka.*` security settings cannot be used (a file they name, a missing key).
    #[error(transparent)]
    KafkaSettings(SettingsError),
    /// The brokers refused the `kafka.*` security settings (an untrusted certificate, wrong
    /// credentials).
    #[error(transparent)]
    KafkaRefused(ConnectError),
    /// Ingest failed.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// The gRPC server failed.
    #[error(transparent)]
    Grpc(#[from] GrpcError),
    /// The TLS certificates cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
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

/// Checks at start that the brokers accept the node's Kafka security settings, over the
/// path the drain's LeaveGroup takes (TLS, SASL). Wrong settings stop the node with what to
/// fix, rather than leaving librdkafka to retry them forever; a broker that cannot be
/// reached now is only logged (librdkafka keeps trying); settings that kstore's own
/// connections do not speak are logged as what they cost: a drain then waits for the
/// session timeout. PLAINTEXT has nothing to check, and its nodes start as before.
fn check_kafka_security(config: &NodeConfig) -> Result<(), NodeError> {
    let connector = match Connector::from_settings(&config.kafka) {
        Ok(connector) => connector,
        Err(error @ SettingsError::Unsupported { .. }) => {
            tracing::warn!(
                %error,
                "a drained node cannot leave the consumer group with these settings: its \
                 partitions will move only after the session timeout"
            );
            return Ok(());
        }
        Err(error) => return Err(NodeError::KafkaSettings(error)),
    };
    if !connector.is_secured() {
        return Ok(());
    }
    let bootstrap = config
        .kafka
        .get("bootstrap.servers")
        .map(String::as_str)
        .unwrap_or_default();
    match connector.check(bootstrap, KAFKA_CHECK_TIMEOUT) {
        Ok(broker) => {
            tracing::info!(%broker, security = %connector.describe(), "the brokers accept the node's Kafka security settings");
            Ok(())
        }
        Err(error) if error.is_configuration() => Err(NodeError::KafkaRefused(error)),
        Err(error) => {
            tracing::warn!(%error, "cannot check the Kafka security settings now; the Kafka clients keep trying");
            Ok(())
        }
    }
}

/// Why the configured processor could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    /// The WebAssembly module does not load.
    #[error("invalid value for `processor.wasm`: {0}")]
    Module(#[from] ModuleError),
    /// The value type does not load.
    #[error("invalid value for `value-type`: {0}")]
    ValueType(#[from] ValueTypeError),
}

/// Returns the processor the configuration names: a built-in one, or a WebAssembly module
/// loaded and checked now, with its value type if the config names one (a module or a
/// descriptor set that does not load is an error naming its file).
pub fn configured_processor(config: &NodeConfig) -> Result<Box<dyn Processor>, ProcessorError> {
    let processor: Box<dyn Processor> = match &config.processor {
        ProcessorConfig::Builtin(ProcessorKind::Features) => {
            Box::new(FeaturesProcessor::new(config.alerts_topic()))
        }
        ProcessorConfig::Wasm(wasm) => Box::new(WasmProcessor::from_config(wasm)?),
    };
    Ok(match &config.value_type {
        Some(value_type) => Box::new(Typed::new(processor, ValueType::load(value_type)?)),
        None => processor,
    })
}

/// Runs a node with `processor` until `shutdown` is set (then it commits what is open and
/// returns `Ok`), or until an error stops it.
pub fn run(
    config: NodeConfig,
    processor: Box<dyn Processor>,
    shutdown: Arc<AtomicBool>,
) -> Result<(), NodeError> {
    let config = Arc::new(config);
    check_kafka_security(&config)?;
    let client = crate::kafka::client_config(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kstore-grpc")
        .enable_all()
        .build()?;
    let topology = runtime.block_on(topics::prepare(&config, &client))?;
    let registry = Arc::new(Registry::new(config.node_id.clone(), topology.partitions));
    let ingest_metrics = Arc::new(IngestMetrics::default());
    let probes = Arc::new(Probes::new(&config, registry.clone(), shutdown.clone()));

    let mut console = None;
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
                let slot = crate::metrics::install(listener, probes.clone())
                    .map_err(std::io::Error::other)?;
                std::io::Result::Ok((bound, slot))
            })
            .map_err(|error| listen_error(error.to_string()))?;
        let (bound, slot) = bound;
        console = Some((slot, bound.ip().is_loopback()));
        // The bound address, which differs from the configured one when its port is 0.
        tracing::info!(
            address = %bound,
            "serving Prometheus metrics at /metrics, probes at /startupz /readyz /livez, the web console at /console"
        );
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
    // The node's certificate must name the host it is advertised as: that is the name its
    // peers and clients verify.
    let tls = match &config.tls {
        Some(settings) => {
            let advertised = config.advertised(bound);
            let tls = crate::tls::Tls::load(settings.clone(), crate::tls::host_of(&advertised))?;
            runtime.spawn(tls.clone().watch());
            Some(tls)
        }
        None => {
            if !bound.ip().is_loopback() {
                tracing::warn!(
                    address = %bound,
                    "gRPC is plaintext beyond loopback: reads travel unencrypted (set [tls])"
                );
            }
            None
        }
    };

    let gossip = runtime.block_on(Gossip::start(
        &config,
        SelfState {
            registry: registry.clone(),
            ingest: ingest_metrics.clone(),
            grpc_address: config.advertised(bound),
            shutdown: shutdown.clone(),
            pulse: probes.gossip.clone(),
        },
    ))?;
    probes.watch_view(gossip.view());
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
    let values = grpc::ValueFormat {
        type_url: processor.value_type_url().map(str::to_owned),
        descriptor_set: processor.value_descriptor_set().map(<[u8]>::to_vec),
    };
    if let Some((slot, loopback)) = &console {
        // The console reads as a client of this node does, through its Query service.
        let query = crate::grpc::query::QueryService::new(
            registry.clone(),
            config.clone(),
            gossip.view(),
            values.type_url.clone(),
        )
        .with_tls(tls.clone());
        let _ = slot.set(crate::console::Console::new(
            &config.node_id,
            &config.store,
            registry.partitions(),
            gossip.view(),
            query,
            &values,
            *loopback,
        ));
    }
    let grpc_pulse = probes.grpc.clone();
    grpc_pulse.beat();
    let serving = grpc::serve(
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
                    config.cluster_secret.as_deref(),
                )
                .with_limits(&config.limits),
            ),
            tls: tls.clone(),
        },
        values.clone(),
        {
            let stop_serving = stop_serving.clone();
            async move {
                while !stop_serving.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        },
    );
    let server = runtime.spawn(async move {
        let served = serving.await;
        grpc_pulse.stop();
        served
    });

    // Restored and failed copies go to ingest; the updater's failures go to the copies'
    // lifecycle, which retries them.
    let (events_tx, events) = std::sync::mpsc::channel();
    let (work_tx, work_rx) = std::sync::mpsc::channel();
    let updater_metrics = Arc::new(UpdaterMetrics::default());
    let mut updater_thread = updater::spawn(
        &client,
        config.changelog_topic(),
        format!("{}-{}-updater", config.app_id, config.node_id),
        config.ingest_niceness,
        registry.clone(),
        updater_metrics.clone(),
        updater::Reports {
            restored: events_tx.clone(),
            failed: work_tx.clone(),
        },
        probes.updater.clone(),
    )
    .map_err(NodeError::Updater)?;
    let (copies, lifecycle_thread) = Copies::start(
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
                    config.cluster_secret.clone(),
                    memory,
                )
                .with_limits(&config.limits)
                .with_tls(tls.clone())
                .with_first_view_wait(first_view_wait(&config)),
            ),
            backups: backups.clone(),
        },
        events_tx,
        (work_tx, work_rx),
    )?;
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
            let watchdog = Watchdog::new(registry.clone(), "background checksum check");
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
                    watchdog.ended_as_asked();
                })
        })
        .transpose()?;
    let flusher = {
        let (copies, shutdown) = (copies.clone(), shutdown.clone());
        let interval = Duration::from_millis(config.store_flush_interval_ms);
        std::thread::Builder::new()
            .name("kstore-flush".into())
            .spawn(move || {
                let watchdog = Watchdog::new(copies.registry().clone(), "store flusher");
                flush_copies(&copies, interval, &shutdown);
                watchdog.ended_as_asked();
            })?
    };
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
                let watchdog = Watchdog::new(registry.clone(), "lag tracker");
                track_lag(
                    &client,
                    &config.input_topic,
                    &registry,
                    &metrics,
                    &updater_metrics,
                    &shutdown,
                );
                watchdog.ended_as_asked();
            })?
    };

    let ingested = ingest::run(
        config.clone(),
        topology.partitions,
        processor,
        copies.clone(),
        events,
        ingest_metrics,
        shutdown.clone(),
        probes.ingest.clone(),
    );
    // Whatever ended ingest, the node leaves.
    shutdown.store(true, Ordering::Relaxed);
    let _ = placement.join();
    copies.stop();
    let _ = lifecycle_thread.join();
    if let Some(scrub) = scrub {
        let _ = scrub.join();
    }
    let _ = flusher.join();
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
    // Ingest and the updater have written their last: a restart starts from here.
    copies.flush_all();
    let _ = tracker.join();
    ingested?;
    match served {
        Ok(result) => result?,
        Err(error) => tracing::error!(%error, "the gRPC server task failed"),
    }
    Ok(())
}

/// How long a node that has just started waits for gossip to reach another node before a
/// new copy gives up on peers' snapshots: 30 gossip rounds, between 1 and 10 seconds. A node
/// without seeds starts a cluster and does not wait.
fn first_view_wait(config: &NodeConfig) -> Duration {
    if config.seeds.is_empty() {
        return Duration::ZERO;
    }
    Duration::from_millis(config.gossip_interval_ms.saturating_mul(30))
        .clamp(Duration::from_secs(1), Duration::from_secs(10))
}

/// Flushes every copy that changed, every `interval`, until `shutdown`: without a WAL, this
/// bounds what a crash makes a copy replay.
fn flush_copies(copies: &Copies, interval: Duration, shutdown: &AtomicBool) {
    let mut next = std::time::Instant::now() + interval;
    while !shutdown.load(Ordering::Relaxed) {
        if std::time::Instant::now() >= next {
            copies.flush_all();
            next = std::time::Instant::now() + interval;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
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
            // Taken before asking: every record acknowledged by then is below the end seen.
            let seen = std::time::SystemTime::now();
            match consumer.fetch_watermarks(input, copy.partition, Duration::from_secs(2)) {
                Ok((_, high)) => registry.set_input_end(copy.partition, high, seen),
                Err(error) => tracing::debug!(%error, partition = copy.partition, "end offset"),
            }
        }
        crate::metrics::publish(metrics, updater_metrics, registry);
        std::thread::sleep(LAG_INTERVAL);
    }
}
