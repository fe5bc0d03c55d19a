//! Generates the Rust code for `proto/kstore/v1`, with the protoc that
//! `protoc-bin-vendored` ships, so no system protoc is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "../../proto/kstore/v1/features.proto",
        "../../proto/kstore/v1/query.proto",
        // Only so that gRPC reflection can describe the error details kstore sends.
        "../../proto/google/rpc/error_details.proto",
    ];
    // The protos live outside this package, where cargo does not look for changes itself.
    println!("cargo:rerun-if-changed=../../proto");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // The built-in processor's value prints as JSON (`kstore get --json`).
    for message in [
        "CustomerFeatures",
        "WindowTotals",
        "FeatureWindows",
        "Bucket",
        "SeenValue",
    ] {
        config.type_attribute(
            format!(".kstore.v1.{message}"),
            "#[derive(serde::Serialize)]",
        );
    }
    // A snapshot chunk's data is a slice of the received buffer, not a copy of it.
    config.bytes([".kstore.v1.SnapshotChunk.data"]);
    let descriptor_set = PathBuf::from(std::env::var("OUT_DIR")?).join("kstore_descriptor.bin");
    // Without the `grpc` feature, only the messages (no tonic).
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        .file_descriptor_set_path(descriptor_set)
        .compile_with_config(config, &protos, &["../../proto"])?;
    Ok(())
}
