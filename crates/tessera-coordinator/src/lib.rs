//! The Tessera coordinator: it owns the public API, the tokenizer, the queue, the
//! scheduler and every generated token; the workers each hold one shard of the model.
//!
//! [`Coordinator::start`] opens the gRPC listener (public API, health, reflection and
//! worker registration, which moves to a listener of its own under mutual TLS), waits for
//! `tp × pp` workers, brings them up (assign, collectives over TCP or NCCL, load, warm-up)
//! and then serves until stopped or until a worker fails.

pub mod api;
pub mod auth;
pub mod blocks;
pub mod collectives;
pub mod config;
pub mod detok;
pub mod error;
pub mod http;
pub mod membership;
pub mod metrics;
pub mod registration;
pub mod scheduler;
pub mod server;
pub mod state;
pub mod tls;
pub mod workers;

pub use config::{ConfigFile, CoordinatorConfig, ModelSource};
pub use error::{CoordinatorError, StartError};
pub use server::Coordinator;
pub use state::ClusterState;

/// Entry points of the fuzz targets in `fuzz/`: steps of request handling that are private
/// to the crate, reached as a request reaches them. Not part of the coordinator's API.
#[doc(hidden)]
pub mod fuzzing {
    use tessera_proto::v1::GenerateRequest;

    use crate::http::ApiError;

    /// A `POST /v1/completions` body read and converted as the HTTP handler does, up to the
    /// validation the gRPC API shares.
    pub fn completion_request(body: &[u8], served: &str) -> Result<GenerateRequest, ApiError> {
        crate::http::completion_request(body, served)
    }
}
