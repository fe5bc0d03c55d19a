//! kstore's wire contract: the Rust code generated from `proto/kstore/v1`, and the error
//! reasons that go with it.

/// Version 1 of kstore's messages and services.
#[allow(missing_debug_implementations, clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/kstore.v1.rs"));
}

/// The encoded file descriptor set of every kstore proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/kstore_descriptor.bin"));

/// The `google.rpc.ErrorInfo` domain of kstore's errors.
pub const ERROR_DOMAIN: &str = "kstore.io";

/// The type URL of the built-in processor's value inside a `google.protobuf.Any`.
pub const CUSTOMER_FEATURES_TYPE_URL: &str = "type.googleapis.com/kstore.v1.CustomerFeatures";
