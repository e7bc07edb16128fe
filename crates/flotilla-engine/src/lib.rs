//! The flotilla engine: the method interface, local training, the simulation driver,
//! measurement (counting allocator, FLOP formulas, memory estimates) and the event sinks.
//!
//! See ARCHITECTURE.md at the repository root for the bird's-eye view.
#![warn(missing_docs)]

pub mod alloc;
pub mod config;
pub mod driver;
mod error;
pub mod held;
pub mod local;
pub mod method;
pub mod recipe;
pub mod server_data;
pub mod sim;
pub mod sink;

pub use config::Experiment;
pub use driver::{Driver, Fleet};
pub use error::EngineError;
pub use method::{
    Assignment, ClientCtx, ClientData, ClientHalf, ClientInfo, EvalModel, MethodState, PhaseCtx,
    PhaseEnd, Readout, Reply, ServerCtx, ServerHalf, Task, TaskCost, TaskKind,
};
pub use recipe::{OptimizerKind, Recipe};
pub use sim::Simulation;
