//! The kstore command line's library: what `kstore produce` generates and how it sends it,
//! usable from tests and benchmarks.

pub mod generator;
pub mod produce;
pub mod view;
