//! The kstore command line's library: what `kstore produce` generates and how it sends it,
//! the `kstore backup` calls, and how keys and values are written and print, usable from
//! tests and benchmarks.

pub mod backup;
pub mod generator;
pub mod keys;
pub mod produce;
pub mod status;
pub mod values;
pub mod view;
