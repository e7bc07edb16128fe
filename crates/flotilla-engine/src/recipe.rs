//! The local training recipe a task carries: optimizer, learning rate, batches, epochs.
//!
//! It lives beside [`crate::method::Task`] rather than in [`crate::local`] so that the method
//! interface and the training loop do not import each other.

use flotilla_models::memory::OptimizerState;
use serde::{Deserialize, Serialize};

/// Which optimizer a client uses.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// SGD with optional momentum (PyTorch semantics: no dampening) and L2 weight decay.
    Sgd,
    /// Adam (β = 0.9, 0.999, ε = 1e-8) with optional L2 weight decay.
    Adam,
}

/// A local training recipe: what the `[training]` table sets and every task carries.
///
/// Loss terms that belong to a method (FedProx's proximal term, distillation) are not part of
/// the recipe: the method's client half brings them as its [`crate::local::Objective`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Passes over the local data.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Learning rate.
    pub lr: f64,
    /// SGD momentum (0 = none).
    #[serde(default)]
    pub momentum: f64,
    /// L2 weight decay.
    #[serde(default)]
    pub weight_decay: f64,
}

impl Recipe {
    /// Plain SGD at learning rate `lr` with batches of `batch_size`, one epoch.
    pub fn sgd(lr: f64, batch_size: usize) -> Self {
        Self {
            epochs: 1,
            batch_size,
            optimizer: OptimizerKind::Sgd,
            lr,
            momentum: 0.0,
            weight_decay: 0.0,
        }
    }

    /// The optimizer state this recipe keeps per trainable parameter.
    pub fn optimizer_state(&self) -> OptimizerState {
        match self.optimizer {
            OptimizerKind::Sgd if self.momentum > 0.0 => OptimizerState::Momentum,
            OptimizerKind::Sgd => OptimizerState::None,
            OptimizerKind::Adam => OptimizerState::Adam,
        }
    }
}
