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
use crate::gossip::{Gossip, GossipError, GossipedStore, SelfState};
use crate::grpc::{self, GrpcError};
use crate::ingest::{self, IngestError, IngestMetrics};
use crate::kafka::connect::{ConnectError, Connector, SettingsError};
use crate::probes::Probes;
use crate::processor::Processor;
use crate::processor::features::FeaturesProcessor;
use crate::processor::typed::{Typed, ValueType, ValueTypeError};
use crate::processor::wasm::{LoadedModule, ModuleError, WasmProcessor};
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
    /// A further store's processor could not be made.
    #[error("store {store}: {error}")]
    Processor {
        /// The store.
        store: String,
        /// Why.
        error: ProcessorError,
    },
    /// Members of a store's group read other input topics.
    #[error("{0}")]
    InputsDiffer(String),
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
        ProcessorConfig::Wasm(wasm) => {
            let bytes = LoadedModule::read(&wasm.wasm)?;
            let module = LoadedModule::from_bytes(&wasm.wasm, &bytes, wasm.limits())?;
            keep_module(config, module.digest(), &bytes);
            Box::new(WasmProcessor::new(module, wasm.outputs.clone()))
        }
    };
    Ok(match &config.value_type {
        Some(value_type) => Box::new(Typed::new(processor, ValueType::load(value_type)?)),
        None => processor,
    })
}

/// Keeps a copy of a store's module as `<state-dir>/modules/<app>/<store>/<sha256>.wasm`,
/// so that every version the store ran stays at hand for a rollback
/// (`processor.rollback`) after its file was replaced: `bytes`, the file as loaded, whose
/// SHA-256 is `digest`. A copy that cannot be written is logged; the node runs on.
fn keep_module(config: &NodeConfig, digest: &str, bytes: &[u8]) {
    let dir = config
        .state_dir
        .join("modules")
        .join(&config.app_id)
        .join(&config.store);
    let kept = dir.join(format!("{digest}.wasm"));
    if kept.exists() {
        return;
    }
    let partial = dir.join(format!("{digest}.wasm.partial"));
    let copied = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&partial, bytes))
        .and_then(|()| std::fs::rename(&partial, &kept));
    match copied {
        Ok(()) => tracing::info!(
            store = %config.store,
            kept = %kept.display(),
            "the module is kept for a rollback"
        ),
        Err(error) => tracing::warn!(
            store = %config.store,
            %error,
            kept = %kept.display(),
            "could not keep a copy of the module for a rollback"
        ),
    }
}

/// Runs a node with `processor` folding its first store (and the configured processor of
/// each further store) until `shutdown` is set (then it commits what is open and returns
/// `Ok`), or until an error stops it.
pub fn run(
    config: NodeConfig,
    processor: Box<dyn Processor>,
    shutdown: Arc<AtomicBool>,
) -> Result<(), NodeError> {
    let mut processors = vec![processor];
    for store in config.store_configs().iter().skip(1) {
        processors.push(
            configured_processor(store).map_err(|error| NodeError::Processor {
                store: store.store.clone(),
                error,
            })?,
        );
    }
    run_stores(config, processors, shutdown)
}

/// Returns the configured processor of every store of the node, its first store first (see
/// [`configured_processor`]), or the first that does not load, naming its store.
pub fn configured_processors(
    config: &NodeConfig,
) -> Result<Vec<Box<dyn Processor>>, (String, ProcessorError)> {
    config
        .store_configs()
        .iter()
        .map(|store| configured_processor(store).map_err(|error| (store.store.clone(), error)))
        .collect()
}

/// One store of a node as it starts: its configuration, partitions, copies and counters.
struct StoreParts {
    config: Arc<NodeConfig>,
    partitions: u32,
    registry: Arc<Registry>,
    ingest_metrics: Arc<IngestMetrics>,
    processor: Box<dyn Processor>,
}

/// The threads of one running store, stopped in [`RunningStore::stop`].
struct RunningStore {
    config: Arc<NodeConfig>,
    copies: Arc<Copies>,
    updater: updater::UpdaterThread,
    /// The threads that stop once ingest has ended: placement, the copies' lifecycle, the
    /// checksum scrub, the flusher and the backup schedule, in that order.
    placing: Vec<std::thread::JoinHandle<()>>,
    tracker: std::thread::JoinHandle<()>,
}

/// Runs a node with one processor per store (`processors[i]` folds the `i`th of
/// [`NodeConfig::store_configs`]) until `shutdown` is set (then it commits what is open and
/// returns `Ok`), or until an error stops it.
pub fn run_stores(
    config: NodeConfig,
    processors: Vec<Box<dyn Processor>>,
    shutdown: Arc<AtomicBool>,
) -> Result<(), NodeError> {
    let config = Arc::new(config);
    let store_configs = config.store_configs();
    assert_eq!(
        processors.len(),
        store_configs.len(),
        "one processor per store"
    );
    check_kafka_security(&config)?;
    let client = crate::kafka::client_config(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kstore-grpc")
        .enable_all()
        .build()?;
    let mut stores = Vec::new();
    for (store_config, processor) in store_configs.into_iter().zip(processors) {
        let topology = runtime.block_on(topics::prepare(&store_config, &client))?;
        crate::group::check_members_read_the_same_inputs(&store_config, &client)
            .map_err(NodeError::InputsDiffer)?;
        stores.push(StoreParts {
            registry: Arc::new(Registry::new(config.node_id.clone(), topology.partitions)),
            config: Arc::new(store_config),
            partitions: topology.partitions,
            ingest_metrics: Arc::new(IngestMetrics::default()),
            processor,
        });
    }
    if stores.len() > 1 {
        let names: Vec<&str> = stores.iter().map(|s| s.config.store.as_str()).collect();
        tracing::info!(stores = ?names, "serving several stores");
    }
    let probes = Arc::new(Probes::new(
        &config,
        stores
            .iter()
            .map(|store| (store.config.store.clone(), store.registry.clone()))
            .collect(),
        shutdown.clone(),
    ));

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
            stores: stores
                .iter()
                .map(|store| GossipedStore {
                    scope: store.config.gossip_scope().to_owned(),
                    registry: store.registry.clone(),
                    ingest: store.ingest_metrics.clone(),
                })
                .collect(),
            grpc_address: config.advertised(bound),
            shutdown: shutdown.clone(),
            pulse: probes.gossip.clone(),
        },
    ))?;
    for (i, probed) in probes.stores().iter().enumerate() {
        probed.watch_view(gossip.view_of(i));
    }
    // Serving stops after ingest has handed its partitions over and gossip has said the
    // node leaves, so reads keep answering while the node shuts down or drains.
    let stop_serving = Arc::new(AtomicBool::new(false));
    let drain = Arc::new(Drain::new(shutdown.clone(), config.drain_on_shutdown));
    let memory = SharedMemory::new(&config.memory);
    let mut served = Vec::new();
    let mut peer: Option<PeerService> = None;
    for (i, store) in stores.iter().enumerate() {
        let backups = Backups::from_config(&store.config, store.partitions, memory.clone());
        if let Some(backups) = &backups {
            tracing::info!(store = %store.config.store, location = %backups.location(), "backups go to a local directory");
        }
        let root = stores_root(&store.config);
        peer = Some(match peer {
            None => PeerService::new(
                store.registry.clone(),
                store.config.store.clone(),
                root,
                memory.clone(),
                config.cluster_secret.as_deref(),
            )
            .with_limits(&config.limits),
            Some(peer) => peer.with_store(store.config.store.clone(), store.registry.clone(), root),
        });
        served.push(grpc::ServedStore {
            config: store.config.clone(),
            registry: store.registry.clone(),
            view: gossip.view_of(i),
            values: grpc::ValueFormat {
                type_url: store.processor.value_type_url().map(str::to_owned),
                descriptor_set: store.processor.value_descriptor_set().map(<[u8]>::to_vec),
            },
            backups,
        });
    }
    if let Some((slot, loopback)) = &console {
        // The console shows every store of the node. It reads as a client of this node
        // does, through its Query service.
        let mut shown = crate::console::Console::new(&config.node_id, *loopback);
        for store in &served {
            let query = crate::grpc::query::QueryService::new(
                store.registry.clone(),
                store.config.clone(),
                store.view.clone(),
                store.values.type_url.clone(),
            )
            .with_tls(tls.clone());
            shown = shown.with_store(
                &store.config.store,
                store.registry.partitions(),
                store.view.clone(),
                query,
                &store.values,
            );
        }
        let _ = slot.set(shown);
    }
    let grpc_pulse = probes.grpc.clone();
    grpc_pulse.beat();
    let serving = grpc::serve(
        incoming,
        config.clone(),
        served.clone(),
        grpc::Operations {
            drain: drain.clone(),
            peer,
            tls: tls.clone(),
        },
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

    // Each store runs its own state updater, copies, placement and ingest. Every store
    // starts before any ingest does: a store that cannot start stops the node before
    // anything was folded.
    let mut running: Vec<RunningStore> = Vec::new();
    let mut ingests = Vec::new();
    for (i, store) in stores.into_iter().enumerate() {
        let probed = &probes.stores()[i];
        let started = start_store(
            &store,
            &client,
            &runtime,
            &gossip,
            i,
            &served[i],
            &memory,
            tls.clone(),
            probed.updater.clone(),
            &shutdown,
        );
        let (started, events) = match started {
            Ok(started) => started,
            Err(error) => {
                shutdown.store(true, Ordering::Relaxed);
                for mut store in running {
                    store.stop_placing();
                    store.stop();
                }
                return Err(error);
            }
        };
        let ingest = {
            let (config, partitions, copies, metrics, shutdown, pulse) = (
                store.config.clone(),
                store.partitions,
                started.copies.clone(),
                store.ingest_metrics.clone(),
                shutdown.clone(),
                probed.ingest.clone(),
            );
            let processor = store.processor;
            move || {
                // Whatever ends one store's ingest (a return or a panic), the node leaves.
                let _leave = LeaveOnDrop(shutdown.clone());
                let _store = tracing::info_span!("store", name = %config.store).entered();
                ingest::run(
                    config, partitions, processor, copies, events, metrics, shutdown, pulse,
                )
            }
        };
        running.push(started);
        ingests.push(ingest);
    }
    // The first store's ingest runs on this thread, each further one's on a thread of its
    // own.
    let mut ingests = ingests.into_iter();
    let first_ingest = ingests.next();
    let further_ingest: Vec<std::io::Result<std::thread::JoinHandle<_>>> = ingests
        .enumerate()
        .map(|(i, ingest)| {
            let thread = std::thread::Builder::new()
                .name(format!("kstore-ingest-{}", i + 1))
                .spawn(ingest);
            if thread.is_err() {
                shutdown.store(true, Ordering::Relaxed);
            }
            thread
        })
        .collect();
    let mut ingested = vec![first_ingest.map_or(Ok(Vec::new()), |ingest| ingest())];
    for thread in further_ingest {
        ingested.push(match thread {
            Ok(thread) => thread.join().unwrap_or_else(|_| {
                Err(IngestError::Node("a store's ingest thread panicked".into()))
            }),
            Err(error) => Err(IngestError::Node(format!(
                "cannot start a store's ingest thread: {error}"
            ))),
        });
    }
    shutdown.store(true, Ordering::Relaxed);
    for (i, (store, owned)) in running.iter_mut().zip(&ingested).enumerate() {
        store.stop_placing();
        if let Ok(owned) = owned
            && drain.requested()
        {
            drain::hand_over(&store.config, owned, &gossip.view_of(i));
        }
    }
    runtime.block_on(gossip.leave(Duration::from_millis(config.publish_interval_ms)));
    stop_serving.store(true, Ordering::Relaxed);
    let served = runtime.block_on(server);
    for store in running {
        store.stop();
    }
    for result in ingested {
        result?;
    }
    match served {
        Ok(result) => result?,
        Err(error) => tracing::error!(%error, "the gRPC server task failed"),
    }
    Ok(())
}

/// Sets the node's shutdown flag when dropped.
struct LeaveOnDrop(Arc<AtomicBool>);

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Where a store's copies' directories are; checkpoints for snapshots are made beside them.
fn stores_root(config: &NodeConfig) -> std::path::PathBuf {
    config
        .store_dir(0)
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| config.state_dir.clone())
}

/// Starts one store's state updater, copies' lifecycle, placement, checksum scrub, flusher,
/// backup schedule and lag tracker. Returns them, and the events its ingest takes.
#[allow(clippy::too_many_arguments)]
fn start_store(
    store: &StoreParts,
    client: &ClientConfig,
    runtime: &tokio::runtime::Runtime,
    gossip: &Gossip,
    index: usize,
    served: &grpc::ServedStore,
    memory: &SharedMemory,
    tls: Option<Arc<crate::tls::Tls>>,
    updater_pulse: Arc<crate::probes::Pulse>,
    shutdown: &Arc<AtomicBool>,
) -> Result<
    (
        RunningStore,
        std::sync::mpsc::Receiver<crate::standby::CopyEvent>,
    ),
    NodeError,
> {
    let config = &store.config;
    let registry = &store.registry;
    let backups = &served.backups;
    // Restored and failed copies go to ingest; the updater's failures go to the copies'
    // lifecycle, which retries them.
    let (events_tx, events) = std::sync::mpsc::channel();
    let (work_tx, work_rx) = std::sync::mpsc::channel();
    let updater_metrics = Arc::new(UpdaterMetrics::default());
    let updater_thread = updater::spawn(
        client,
        config.changelog_topic(),
        config.inputs()[0].clone(),
        format!("{}-{}-updater", config.group_id(), config.node_id),
        config.ingest_niceness,
        registry.clone(),
        updater_metrics.clone(),
        updater::Reports {
            restored: events_tx.clone(),
            failed: work_tx.clone(),
        },
        updater_pulse,
    )
    .map_err(NodeError::Updater)?;
    let (copies, lifecycle) = Copies::start(
        config.clone(),
        registry.clone(),
        memory.clone(),
        updater_thread.updater(),
        Bootstrap {
            peers: Some(
                SnapshotFetcher::new(
                    runtime.handle().clone(),
                    gossip.view_of(index),
                    config.node_id.clone(),
                    config.store.clone(),
                    config.cluster_secret.clone(),
                    memory.clone(),
                )
                .with_limits(&config.limits)
                .with_tls(tls)
                .with_first_view_wait(first_view_wait(config)),
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
        gossip.view_of(index),
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
    let backup_schedule = match backups {
        Some(backups) => backup::spawn_schedule(
            backups.clone(),
            registry.clone(),
            gossip.view_of(index),
            shutdown.clone(),
        )?,
        None => None,
    };

    let tracker = {
        let (client, config, registry, metrics, updater_metrics, shutdown) = (
            client.clone(),
            config.clone(),
            registry.clone(),
            store.ingest_metrics.clone(),
            updater_metrics.clone(),
            shutdown.clone(),
        );
        std::thread::Builder::new()
            .name("kstore-lag".into())
            .spawn(move || {
                let watchdog = Watchdog::new(registry.clone(), "lag tracker");
                track_lag(
                    &client,
                    &config,
                    &registry,
                    &metrics,
                    &updater_metrics,
                    &shutdown,
                );
                watchdog.ended_as_asked();
            })?
    };
    let running = RunningStore {
        config: config.clone(),
        copies,
        updater: updater_thread,
        placing: [
            Some(placement),
            Some(lifecycle),
            scrub,
            Some(flusher),
            backup_schedule,
        ]
        .into_iter()
        .flatten()
        .collect(),
        tracker,
    };
    Ok((running, events))
}

impl RunningStore {
    /// Stops placing copies and the copies' lifecycle, once ingest has ended: what is left
    /// runs until the node has left the cluster.
    fn stop_placing(&mut self) {
        let mut threads = std::mem::take(&mut self.placing).into_iter();
        // Placement first, so that it asks the lifecycle for nothing more.
        if let Some(placement) = threads.next() {
            let _ = placement.join();
        }
        self.copies.stop();
        for thread in threads {
            let _ = thread.join();
        }
    }

    /// Stops the state updater once the node has stopped serving, and flushes every copy:
    /// a restart starts from here.
    fn stop(mut self) {
        self.updater.stop();
        // Ingest and the updater have written their last: a restart starts from here.
        self.copies.flush_all();
        let _ = self.tracker.join();
    }
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

/// Looks at the input's end offsets for every local copy of a store, and publishes its
/// metrics.
fn track_lag(
    client: &ClientConfig,
    config: &NodeConfig,
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
            // The input's end, as a position: the sum of the input topics' end offsets.
            let mut end = 0i64;
            for input in config.inputs() {
                match consumer.fetch_watermarks(input, copy.partition, Duration::from_secs(2)) {
                    Ok((_, high)) => end = end.saturating_add(high),
                    Err(error) => {
                        tracing::debug!(%error, input, partition = copy.partition, "end offset");
                        end = -1;
                        break;
                    }
                }
            }
            if end >= 0 {
                registry.set_input_end(copy.partition, end, seen);
            }
        }
        crate::metrics::publish(&config.store, metrics, updater_metrics, registry);
        std::thread::sleep(LAG_INTERVAL);
    }
}
