//! kstore's wire contract: the Rust code generated from `proto/kstore/v1`.

/// Version 1 of kstore's messages and services.
#[allow(missing_debug_implementations, clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/kstore.v1.rs"));
}

/// The encoded file descriptor set of every kstore proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/kstore_descriptor.bin"));
