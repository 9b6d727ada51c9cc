//! What can go wrong before or around a benchmark run, in words that name the flag or the
//! file at fault. A request that fails during a run is not an error here: it is counted
//! in the run's results ([`crate::record::Failure`]).

use std::path::PathBuf;

/// Errors of the load generator.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A setting is out of its range or inconsistent with another.
    #[error("{flag} {reason}")]
    InvalidArg {
        /// The flag as a person types it, e.g. `--range-ratio`.
        flag: &'static str,
        /// Why the value is refused, e.g. `must be in [0, 1)`.
        reason: String,
    },
    /// A dataset file cannot be read or is not in the expected format.
    #[error("dataset {}: {reason}", path.display())]
    Dataset {
        /// The file as given.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The target server cannot be reached or does not answer as expected.
    #[error("target {target}: {reason}")]
    Target {
        /// The endpoint or base URL.
        target: String,
        /// What went wrong.
        reason: String,
    },
    /// A report file or folder cannot be written.
    #[error("cannot write {}: {reason}", path.display())]
    Output {
        /// The file or folder.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The tokenizer cannot be loaded or cannot encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl BenchError {
    /// A refused setting.
    pub fn invalid(flag: &'static str, reason: impl Into<String>) -> Self {
        BenchError::InvalidArg {
            flag,
            reason: reason.into(),
        }
    }
}

impl From<tessera_model::ModelError> for BenchError {
    fn from(e: tessera_model::ModelError) -> Self {
        BenchError::Tokenizer(e.to_string())
    }
}
