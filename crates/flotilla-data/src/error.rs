//! The crate's error type.

use std::path::{Path, PathBuf};

/// Everything that can go wrong while locating, reading or splitting a dataset.
///
/// File errors always name the full path and say how to fix the problem, so
/// they can be shown to a user as they are.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// A dataset file does not exist.
    #[error("dataset file {} not found{}: {fix}", .path.display(), fmt_also_tried(.also_tried))]
    NotFound {
        /// The path that was expected.
        path: PathBuf,
        /// Other paths that were tried as well.
        also_tried: Vec<PathBuf>,
        /// What the user should do about it.
        fix: String,
    },
    /// A dataset file exists but could not be read.
    #[error("cannot read dataset file {}: {source}; {fix}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
        /// What the user should do about it.
        fix: String,
    },
    /// A dataset file is truncated, has a bad header, bad gzip data or bad contents.
    #[error("dataset file {} {detail}; {fix}", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong, phrased to follow the path ("is truncated: ...").
        detail: String,
        /// What the user should do about it.
        fix: String,
    },
    /// A sample index is not below the dataset length.
    #[error("sample index {index} is out of range for a dataset of {len} samples")]
    IndexOutOfRange {
        /// The offending index.
        index: usize,
        /// The dataset length.
        len: usize,
    },
    /// A dataset's fields are inconsistent with each other.
    #[error("inconsistent dataset: {0}")]
    InvalidDataset(String),
    /// Normalisation parameters do not fit the dataset.
    #[error("invalid normalisation: {0}")]
    InvalidNormalization(String),
    /// A dataset name that is not known.
    #[error("unknown dataset `{0}`: expected one of fashion-mnist, mnist, cifar10")]
    UnknownDataset(String),
    /// A partition request that cannot be satisfied as given.
    #[error("invalid partition: {0}")]
    InvalidPartition(String),
    /// The Dirichlet partitioner could not meet the minimum client size.
    #[error(
        "dirichlet partition (alpha = {alpha}, min_size = {min_size}) of {num_samples} samples \
         over {num_clients} clients gave some client fewer than {min_size} samples in all \
         {attempts} attempts; raise alpha, lower min_size or use fewer clients"
    )]
    DirichletGaveUp {
        /// Concentration parameter.
        alpha: f64,
        /// Required minimum samples per client.
        min_size: usize,
        /// Number of clients.
        num_clients: usize,
        /// Number of samples being split.
        num_samples: usize,
        /// How many draws were tried.
        attempts: usize,
    },
}

fn fmt_also_tried(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return String::new();
    }
    let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    format!(" (also looked for {})", list.join(", "))
}

impl DataError {
    /// Shorthand for a [`DataError::Corrupt`].
    pub(crate) fn corrupt(path: &Path, detail: impl Into<String>, fix: &str) -> Self {
        DataError::Corrupt {
            path: path.to_path_buf(),
            detail: detail.into(),
            fix: fix.to_string(),
        }
    }
}
