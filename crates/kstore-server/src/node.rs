//! A node's lifecycle: check the topics, then ingest until asked to stop.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use rdkafka::ClientConfig;

use crate::config::{NodeConfig, ProcessorKind};
use crate::ingest::{self, IngestError, IngestMetrics};
use crate::processor::Processor;
use crate::processor::features::FeaturesProcessor;
use crate::topics::{self, TopicError};

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
    let mut client = ClientConfig::new();
    for (key, value) in &config.kafka {
        client.set(key, value);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let topology = runtime.block_on(topics::prepare(&config, &client))?;
    let metrics = Arc::new(IngestMetrics::default());
    ingest::run(
        Arc::new(config),
        topology.partitions,
        processor,
        metrics,
        shutdown,
    )?;
    Ok(())
}
