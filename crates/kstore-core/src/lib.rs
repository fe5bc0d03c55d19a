//! kstore's pure logic: decisions that take plain data in and give plain data out, with no
//! I/O, so that they can be unit- and property-tested without Kafka.

pub mod cluster;
pub mod features;
pub mod keys;
pub mod orders;
pub mod partitioner;
pub mod placement;
pub mod probes;
pub mod routing;
pub mod scan;
