//! The one error type of the runtime.

use tessera_model::ModelError;

/// Everything that can fail while loading a shard or running a step.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Reading or validating the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A step input that breaks the contract; `field` names the offending input.
    #[error("invalid {field}: {reason}")]
    InvalidInput { field: &'static str, reason: String },
    /// Not enough KV-cache blocks for the request.
    #[error("KV cache exhausted: {reason}")]
    KvExhausted { reason: String },
    /// A collective peer went away or sent something unexpected.
    #[error("collective: {0}")]
    Collective(String),
    /// A backend could not run an operation.
    #[error("backend: {0}")]
    Backend(String),
}

/// Result alias of the runtime.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

impl RuntimeError {
    /// Shorthand for [`RuntimeError::InvalidInput`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        RuntimeError::InvalidInput {
            field,
            reason: reason.into(),
        }
    }
}
