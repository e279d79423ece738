//! Compiles `proto/` with protox (pure Rust), so building sidekey needs no `protoc`.

/// The files compiled: the API, and the `google.rpc` types its errors carry in their
/// details (`grpc-status-details-bin` is a `google.rpc.Status` holding e.g. a
/// `google.rpc.BadRequest`), so that reflection serves them and tools decode the details.
const ROOTS: [&str; 3] = [
    "sidekey/v1/tenant.proto",
    "google/rpc/status.proto",
    "google/rpc/error_details.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // With every import (google/protobuf, google/api), each file once, and the comments.
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_files(ROOTS)?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // The whole set feeds gRPC server reflection. Encoded by protox, not through
    // prost-types, which would drop the options' extensions (google.api.field_behavior...).
    std::fs::write(
        out.join("sidekey_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    let fds = compiler.file_descriptor_set();
    // Rust code only for sidekey.v1: the google.protobuf types come from prost-types, the
    // google.rpc ones from tonic-types, and google.api holds only annotations (options,
    // which change neither the generated code nor the wire format).
    let mut api = fds;
    api.file.retain(|f| {
        !f.package().starts_with("google.rpc") && !f.package().starts_with("google.api")
    });
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(api)?;
    Ok(())
}
