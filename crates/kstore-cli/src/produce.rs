//! `kstore produce`: sends generated order events to a topic at a steady rate, keyed by
//! customer id and partitioned with Kafka's murmur2 partitioner, as a Java producer would.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message};

use crate::generator::{GeneratorConfig, OrderGenerator};

/// What to send, where, and how fast.
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    /// Kafka's bootstrap servers.
    pub bootstrap: String,
    /// The input topic.
    pub topic: String,
    /// How many events to send.
    pub count: u64,
    /// How many of the generator's first events to leave out (to continue an earlier run).
    pub skip: u64,
    /// Events per second; 0 sends as fast as the producer allows.
    pub rate: u64,
    /// The events.
    pub generator: GeneratorConfig,
    /// Extra librdkafka settings.
    pub kafka: Vec<(String, String)>,
}

/// What was sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProduceSummary {
    /// Events acknowledged by the broker.
    pub delivered: u64,
    /// Per partition, the next offset after the last delivered event (for read-your-writes).
    pub next_offsets: BTreeMap<i32, i64>,
    /// How long sending took.
    pub elapsed: Duration,
}

/// When the broker acknowledged each event: per partition, (offset, milliseconds since the
/// Unix epoch), in the order the acknowledgements arrived. An acknowledged record is below
/// the partition's high watermark from then on.
pub type AckLog = BTreeMap<i32, Vec<(i64, i64)>>;

#[derive(Default)]
struct Deliveries {
    delivered: u64,
    next_offsets: BTreeMap<i32, i64>,
    first_error: Option<String>,
    /// Filled only when asked for.
    acks: Option<AckLog>,
}

struct DeliveryCounter(Mutex<Deliveries>);

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let mut deliveries = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match result {
            Ok(message) => {
                deliveries.delivered += 1;
                if let Some(acks) = deliveries.acks.as_mut() {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64);
                    acks.entry(message.partition())
                        .or_default()
                        .push((message.offset(), now));
                }
                let next = deliveries
                    .next_offsets
                    .entry(message.partition())
                    .or_insert(0);
                *next = (*next).max(message.offset() + 1);
            }
            Err((error, _)) => {
                deliveries
                    .first_error
                    .get_or_insert_with(|| error.to_string());
            }
        }
    }
}

/// Sends `options.count` generated events and waits until the broker acknowledged them all.
pub fn produce(options: &ProduceOptions) -> Result<ProduceSummary> {
    produce_logged(options, false).map(|(summary, _)| summary)
}

/// Like [`produce`], and returns when the broker acknowledged each event (for tests that
/// check what a reader could have known when).
pub fn produce_with_acks(options: &ProduceOptions) -> Result<(ProduceSummary, AckLog)> {
    produce_logged(options, true).map(|(summary, acks)| (summary, acks.unwrap_or_default()))
}

fn produce_logged(
    options: &ProduceOptions,
    log_acks: bool,
) -> Result<(ProduceSummary, Option<AckLog>)> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &options.bootstrap)
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .set("linger.ms", "10")
        .set("batch.size", "262144")
        .set("queue.buffering.max.messages", "500000");
    for (key, value) in &options.kafka {
        config.set(key, value);
    }
    let producer: ThreadedProducer<DeliveryCounter> = config
        .create_with_context(DeliveryCounter(Mutex::new(Deliveries {
            acks: log_acks.then(AckLog::new),
            ..Deliveries::default()
        })))
        .context("creating the producer")?;

    let started = Instant::now();
    let events = OrderGenerator::new(options.generator.clone())
        .skip(options.skip as usize)
        .take(options.count as usize);
    for (i, event) in events.enumerate() {
        if options.rate > 0 {
            let due = Duration::from_secs_f64(i as f64 / options.rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let payload = serde_json::to_vec(&event)?;
        let mut record = BaseRecord::to(&options.topic)
            .key(&event.customer_id)
            .payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((error, _)) => bail!("producing event {i}: {error}"),
            }
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .context("flushing")?;
    let mut deliveries = producer
        .context()
        .0
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(error) = &deliveries.first_error {
        bail!(
            "{} of {} events failed, the first with: {error}",
            options.count - deliveries.delivered,
            options.count
        );
    }
    let acks = deliveries.acks.take();
    Ok((
        ProduceSummary {
            delivered: deliveries.delivered,
            next_offsets: deliveries.next_offsets.clone(),
            elapsed: started.elapsed(),
        },
        acks,
    ))
}
