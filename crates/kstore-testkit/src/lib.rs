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
pub mod broker;
pub mod chaos;
mod fixture;
pub mod process;

pub use fixture::{BOOTSTRAP_ENV, PORT_ENV, TestKafka, kafka};
