//! The one error type of the model crate.

use std::path::PathBuf;

/// Everything that can go wrong describing, splitting or loading a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A preset name that is not in [`crate::PRESETS`].
    #[error("unknown preset `{name}`; known presets: {known}")]
    UnknownPreset { name: String, known: String },
    /// A configuration field with an unusable value.
    #[error("invalid model config: {field} = {value}: {reason}")]
    InvalidConfig {
        field: &'static str,
        value: String,
        reason: String,
    },
    /// A TP × PP split that this model cannot take.
    #[error("impossible split tp={tp} pp={pp}: {reason}")]
    ImpossibleSplit {
        tp: usize,
        pp: usize,
        reason: String,
    },
    /// A file that could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A checkpoint file that is not what it claims to be.
    #[error("corrupt checkpoint {}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// A tensor the model needs that the checkpoint does not hold.
    #[error("checkpoint {} has no tensor `{name}`", path.display())]
    MissingTensor { path: PathBuf, name: String },
    /// A tensor whose shape differs from the one the config implies.
    #[error("tensor `{name}` has shape {found:?}, the config implies {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A tensor stored in a dtype the readers do not handle.
    #[error("tensor `{name}` has dtype {dtype}; supported: F32, BF16, F16")]
    UnsupportedDtype { name: String, dtype: String },
    /// Tokenizer failures: a bad tokenizer file or an id it cannot decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// Result alias of the model crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        ModelError::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
