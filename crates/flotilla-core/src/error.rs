//! Errors of the core crate.

use std::path::PathBuf;

/// What can go wrong in the core: bad shapes, bad messages, bad files.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A tensor's data length does not match its shape.
    #[error("tensor `{name}`: shape {shape:?} needs {expected} values but {actual} were given")]
    ShapeMismatch {
        /// Tensor name.
        name: String,
        /// Declared shape.
        shape: Vec<usize>,
        /// Number of values the shape implies.
        expected: usize,
        /// Number of values present.
        actual: usize,
    },
    /// Two parameter collections that must agree do not.
    #[error("parameter collections disagree: {0}")]
    Incompatible(String),
    /// A named tensor is missing.
    #[error("tensor `{0}` is missing")]
    Missing(String),
    /// A message could not be decoded or failed validation.
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// A value is not finite.
    #[error("tensor `{0}` contains NaN or infinite values")]
    NonFinite(String),
    /// Aggregation was asked to fold nothing, or weights are unusable.
    #[error("aggregation: {0}")]
    Aggregation(String),
    /// A device or fleet description is invalid.
    #[error("fleet: {0}")]
    Fleet(String),
    /// File input/output failed.
    #[error("{path}: {message}")]
    File {
        /// The file concerned.
        path: PathBuf,
        /// What happened and what to do.
        message: String,
    },
}

impl CoreError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        CoreError::File {
            path: path.into(),
            message: err.to_string(),
        }
    }
}
