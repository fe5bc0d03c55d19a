//! The kstore command line's library: what `kstore produce` generates and how it sends it,
//! and the `kstore backup` calls, usable from tests and benchmarks.

pub mod backup;
pub mod generator;
pub mod produce;
pub mod view;
