//! Tessera's protocols as Rust types, clients and servers.
//!
//! - [`v1`]: the public `tessera.v1.Generation` API (`proto/tessera/v1/generate.proto`).
//! - [`worker::v1`]: the coordinator ↔ worker protocol
//!   (`proto/tessera/worker/v1/worker.proto`).

/// The public API, package `tessera.v1`.
pub mod v1 {
    tonic::include_proto!("tessera.v1");
}

/// The internal protocol, package `tessera.worker.v1`.
pub mod worker {
    /// Version 1 of the worker protocol.
    pub mod v1 {
        tonic::include_proto!("tessera.worker.v1");
    }
}

#[cfg(feature = "model")]
mod model;

/// The encoded `FileDescriptorSet` of both packages, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tessera_descriptor.bin"));
