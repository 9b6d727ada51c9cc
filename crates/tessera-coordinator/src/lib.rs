//! The Tessera coordinator: it owns the public API, the tokenizer, the queue, the
//! scheduler and every generated token; the workers each hold one shard of the model.
//!
//! [`Coordinator::start`] opens the gRPC listener (public API, health, reflection and
//! worker registration, which moves to a listener of its own under mutual TLS), waits for
//! `tp × pp` workers, brings them up (assign, collectives, load, warm-up) and then serves
//! until stopped or until a worker fails.

pub mod api;
pub mod blocks;
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
