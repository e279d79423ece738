//! sidekey: an auth-proxy sidecar that injects per-tenant vendor credentials.
//!
//! Data flow: an app's request reaches [`proxy`] (the data plane), which names the tenant,
//! looks it up in the [`tenants::Snapshot`], applies the vendor's rule from [`vendors`] and
//! forwards it through the upstream client. Operators write tenants through [`control`]
//! (gRPC), which goes through the [`tenants::Catalog`] to the [`store`] and publishes a new
//! snapshot.

#![forbid(unsafe_code)]
// Nothing a request, a peer or a file can make fail may panic; unit tests may unwrap
// (clippy.toml), integration tests are other crates.
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod admin;
pub mod budget;
pub mod cli;
pub mod config;
pub mod control;
pub mod document;
pub mod intercept;
pub mod listen_addr;
pub mod log_format;
pub mod log_writer;
pub mod model;
pub mod process_metrics;
pub mod proxy;
pub mod secret;
pub mod server;
pub mod store;
pub mod syntax;
pub mod telemetry;
pub mod tenants;
pub mod tenants_file;
#[cfg(test)]
mod testing;
pub mod upstream;
pub mod vendors;

/// Generated code of the `sidekey.v1` proto package.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("sidekey.v1");

    /// The encoded descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/sidekey_descriptor.bin"));
}
