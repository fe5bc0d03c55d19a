//! The kstore node: ingest of keyed events into per-partition RocksDB stores, exactly once,
//! with restore from the changelog and dead letters for bad input; standby copies kept
//! current by a state updater and placed by a cluster view that gossip shares; and its gRPC
//! Query and Admin services, health, reflection and Prometheus metrics.
//!
//! The binary `kstore-node` runs the built-in processor; a user's own binary can call
//! [`node::run`] with a [`processor::Processor`] of its own.

pub mod access;
pub mod backup;
pub mod config;
pub mod console;
pub mod drain;
pub mod gossip;
pub mod group;
pub mod grpc;
pub mod ingest;
pub mod input_offsets;
pub mod kafka;
pub mod metrics;
pub mod node;
pub mod point_in_time;
pub mod probes;
pub mod processor;
pub mod registry;
pub mod snapshot;
pub mod standby;
pub mod store;
pub mod tls;
pub mod topics;
