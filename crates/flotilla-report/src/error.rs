//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading a run directory or writing a
/// report. Every variant names the file (or directory) involved.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Reading, writing, renaming or creating `path` failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory the operation was about.
        path: PathBuf,
        /// The underlying operating-system error.
        #[source]
        source: std::io::Error,
    },

    /// `path` holds malformed JSON, or JSON that does not have the expected
    /// shape (a missing field, a value of the wrong type), on line `line`.
    #[error("{}: line {line}: {message}", path.display())]
    Parse {
        /// The file that failed to parse.
        path: PathBuf,
        /// The 1-based line number of the offending line in that file.
        line: usize,
        /// What is wrong with that line (includes the column where known).
        message: String,
    },

    /// `path` parsed as JSON but its content is not what a run directory
    /// should hold (for example `summary.json` is not a JSON object).
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The offending file or directory.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// Drawing the plot that was to be written to `path` failed.
    #[error("{}: cannot render plot: {message}", path.display())]
    Plot {
        /// The plot file that was being rendered.
        path: PathBuf,
        /// The message of the drawing library.
        message: String,
    },

    /// [`render_comparison`](crate::render_comparison) was given no runs;
    /// `out_dir` is where the comparison would have been written.
    #[error("{}: no runs to compare", out_dir.display())]
    NoRuns {
        /// The requested output directory.
        out_dir: PathBuf,
    },
}
