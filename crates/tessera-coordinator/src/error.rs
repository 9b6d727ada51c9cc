//! The coordinator's errors and the one place that maps them to gRPC status codes.

use tonic::{Code, Status};

/// Everything that can go wrong between a client's request and its last token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CoordinatorError {
    /// A request field with an unusable value.
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// A length past what the model or the server allows.
    #[error("{field}: {reason}")]
    OutOfRange { field: &'static str, reason: String },
    /// The server cannot take the request now (queue full, KV cache too small).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The cluster cannot serve: starting, or a worker has failed.
    #[error("{0}")]
    Unavailable(String),
    /// The request's deadline passed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The server is shutting down.
    #[error("{0}")]
    Cancelled(String),
    /// A bug or an unexpected answer from a worker.
    #[error("{0}")]
    Internal(String),
}

impl CoordinatorError {
    /// An INVALID_ARGUMENT naming `field`.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        CoordinatorError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// An OUT_OF_RANGE naming `field`.
    pub fn out_of_range(field: &'static str, reason: impl Into<String>) -> Self {
        CoordinatorError::OutOfRange {
            field,
            reason: reason.into(),
        }
    }

    /// The error a status from the scheduler's stream stands for (the HTTP API turns it
    /// back into its own form).
    pub fn from_status(s: &Status) -> Self {
        let m = s.message().to_string();
        match s.code() {
            Code::ResourceExhausted => CoordinatorError::ResourceExhausted(m),
            Code::Unavailable => CoordinatorError::Unavailable(m),
            Code::DeadlineExceeded => CoordinatorError::DeadlineExceeded(m),
            Code::Cancelled => CoordinatorError::Cancelled(m),
            _ => CoordinatorError::Internal(m),
        }
    }

    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            CoordinatorError::InvalidArgument { .. } => Code::InvalidArgument,
            CoordinatorError::OutOfRange { .. } => Code::OutOfRange,
            CoordinatorError::ResourceExhausted(_) => Code::ResourceExhausted,
            CoordinatorError::Unavailable(_) => Code::Unavailable,
            CoordinatorError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            CoordinatorError::Cancelled(_) => Code::Cancelled,
            CoordinatorError::Internal(_) => Code::Internal,
        }
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

/// Errors of bring-up and of the coordinator process itself (not of one request).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A configuration value that cannot work.
    #[error("config: {0}")]
    Config(String),
    /// The model could not be described or split.
    #[error(transparent)]
    Model(#[from] tessera_model::ModelError),
    /// A listener could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    /// A worker failed during bring-up.
    #[error("bring-up failed: {0}")]
    BringUp(String),
    /// The gRPC server stopped with an error.
    #[error("gRPC server: {0}")]
    Server(#[from] tonic::transport::Error),
    /// A certificate or key could not be loaded, or cannot serve.
    #[error("TLS: {0}")]
    Tls(#[from] tessera_tls::TlsError),
}
