//! Kafka without librdkafka, in pure Rust: the protocol calls kstore makes itself and the
//! local Apache Kafka broker that development, tests and CI run.
//!
//! - [`wire`]: one blocking connection to a broker, for calls librdkafka does not offer
//!   (a drained node's LeaveGroup naming its `group.instance.id`);
//! - [`sasl`]: SASL authentication on such a connection (PLAIN, SCRAM-SHA-256/512), for a
//!   broker behind SASL; TLS is the caller's (the node's), which needs native crypto;
//! - [`admin`]: whether a broker answers, a topic's partition count, creating a topic;
//! - [`local`]: the broker that `deploy/kafka/pom.xml` pins, started from Maven's jars.
//!
//! Nothing here builds native code, so `cargo xtask` (which depends on this crate) compiles
//! on a fresh machine before its setup has installed what RocksDB and librdkafka need.

pub mod admin;
pub mod local;
pub mod sasl;
pub mod wire;
