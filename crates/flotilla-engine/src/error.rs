//! Engine errors.

use flotilla_core::CoreError;
use flotilla_data::DataError;
use flotilla_models::ModelError;

/// What can go wrong running an experiment. Every message names the problem and the fix.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The experiment configuration is invalid.
    #[error("config: {0}")]
    Config(String),
    /// Dataset problems.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Model problems.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Core problems (shapes, messages, files, fleets).
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A message between the halves is malformed or from an incompatible peer.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A client could not execute its task.
    #[error("task: {0}")]
    Task(String),
    /// A task would exceed the device's memory budget; it is refused, never run.
    #[error("over memory budget: {0}")]
    OverBudget(String),
    /// A method rejected the replies or its state.
    #[error("method: {0}")]
    Method(String),
    /// File input/output around the run directory.
    #[error("{0}")]
    Io(String),
}
