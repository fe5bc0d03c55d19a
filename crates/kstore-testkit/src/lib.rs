//! Test fixtures for kstore: a real Apache Kafka broker, unique topic and group names, topic
//! creation, producers that partition keys the way Java producers do, and the Kafka Streams
//! baseline.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! let kafka = kstore_testkit::kafka();
//! let topic = kafka.unique_name("orders");
//! kafka.create_topic(&topic, 12).await?;
//! let producer = kafka.producer()?;
//! # Ok(()) }
//! ```

pub mod baseline;
/// The local broker, from `kstore-kafka`.
pub use kstore_kafka::local as broker;
pub mod audit;
pub mod chaos;
mod fixture;
pub mod guest;
pub mod process;

pub use fixture::{PORT_ENV, TestKafka, kafka};
pub use kstore_kafka::local::BOOTSTRAP_ENV;
