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
    /// The CUDA backend cannot start here: the build has no CUDA support, a CUDA library
    /// is missing, or there is no usable device. The message says which and what to do.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),
    /// NVRTC refused a kernel source; `log` is the compiler's own output.
    #[error("NVRTC could not compile {file} for {arch}: {reason}\n{log}")]
    KernelCompile {
        /// The kernel source file.
        file: String,
        /// The target architecture, `sm_80`.
        arch: String,
        /// What failed (the NVRTC status).
        reason: String,
        /// The compiler log.
        log: String,
    },
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
