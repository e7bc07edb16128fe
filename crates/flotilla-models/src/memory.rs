//! Analytic estimate of the peak memory of local training.
//!
//! Terms, in bytes (f32 = 4 bytes):
//! - `weights`: the model's parameters (the trained copy) plus the received and the returned
//!   parameter collections, which live beside the model while a client trains;
//! - `gradients`: one value per trainable parameter;
//! - `optimizer`: per trainable parameter, 1 value for SGD with momentum, 2 for Adam, 0 for
//!   plain SGD;
//! - `activations`: every intermediate tensor of the forward pass that autodiff keeps for the
//!   backward pass, times the batch size, plus the input batch;
//! - `workspace`: the largest transient buffer of one operation (the unfolded input of a
//!   convolution), alive during one op only.
//!
//! A test in the engine compares the estimate with the heap high-water mark measured by the
//! counting allocator during a real training step.

use crate::{Architecture, ModelSpec, View};
use serde::Serialize;

/// Optimizer state per trainable parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerState {
    /// Plain SGD: no state.
    None,
    /// SGD with momentum: one buffer.
    Momentum,
    /// Adam: two moment buffers.
    Adam,
}

impl OptimizerState {
    fn buffers(self) -> usize {
        match self {
            OptimizerState::None => 0,
            OptimizerState::Momentum => 1,
            OptimizerState::Adam => 2,
        }
    }
}

/// The terms of the estimate, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MemoryEstimate {
    /// Model parameters and the parameter collections around training.
    pub weights: u64,
    /// Gradients of trainable parameters.
    pub gradients: u64,
    /// Optimizer state.
    pub optimizer: u64,
    /// Activations kept for the backward pass, and the input batch.
    pub activations: u64,
    /// Largest transient buffer of a single operation.
    pub workspace: u64,
}

impl MemoryEstimate {
    /// Sum of the terms.
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.optimizer + self.activations + self.workspace
    }
}

/// Per-sample activation values kept for backward, and the largest per-sample workspace.
fn activations_per_sample(spec: &ModelSpec, view: &View) -> (usize, usize) {
    let [c, h, w] = spec.input;
    let input = c * h * w;
    match &spec.arch {
        Architecture::Cnn => {
            let (c1, c2, f) = (spec.scaled(32), spec.scaled(64), spec.scaled(512));
            let a1 = c1 * h * w; // conv1 out, relu out
            let p1 = c1 * (h / 2) * (w / 2);
            let a2 = c2 * (h / 2) * (w / 2);
            let p2 = c2 * (h / 4) * (w / 4);
            let acts = input + 2 * a1 + p1 + 2 * a2 + p2 + 2 * f + spec.classes * 2;
            let ws = (c * 25 * h * w).max(c1 * 25 * (h / 2) * (w / 2));
            (acts, ws)
        }
        Architecture::Mlp { hidden } => {
            let acts = input
                + hidden.iter().map(|x| 2 * spec.scaled(*x)).sum::<usize>()
                + 2 * spec.classes;
            (acts, 0)
        }
        Architecture::Resnet { blocks_per_stage } => {
            let widths = [spec.scaled(16), spec.scaled(32), spec.scaled(64)];
            // stem: conv out, norm intermediates (~3 tensors), relu out
            let mut acts = input + 5 * widths[0] * h * w;
            let mut ws = c * 9 * h * w;
            let (mut hh, mut ww, mut inp) = (h, w, widths[0]);
            let mut k = 0;
            for (stage, &out) in widths.iter().enumerate() {
                for i in 0..*blocks_per_stage {
                    let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                    let (ho, wo) = (hh.div_ceil(stride), ww.div_ceil(stride));
                    if view.block_active(k) {
                        // two convs, two norms (~3 each), relu ×2, shortcut, sum
                        acts += 12 * out * ho * wo;
                        ws = ws.max(inp * 9 * ho * wo).max(out * 9 * ho * wo);
                    } else {
                        acts += out * ho * wo;
                    }
                    (hh, ww, inp) = (ho, wo, out);
                    k += 1;
                }
            }
            (acts + 2 * widths[2] + 2 * spec.classes, ws)
        }
        Architecture::Vit {
            patch,
            dim,
            depth,
            heads,
            mlp_ratio,
        } => {
            let d = spec.scaled(*dim);
            let t = (h / patch) * (w / patch) + 1;
            let mut acts = input + 3 * t * d;
            for k in 0..*depth {
                if view.block_active(k) {
                    // norms (~3 each), q k v, scores + softmax, context, proj, residuals, mlp
                    acts += 12 * t * d + 2 * heads * t * t + 3 * mlp_ratio * t * d;
                }
            }
            (acts + 4 * d + 2 * spec.classes, c * patch * patch * t)
        }
    }
}

/// Estimate for training `spec` under `view` with `batch` samples per step.
/// `params` and `trainable` are the model's parameter counts.
pub fn estimate(
    spec: &ModelSpec,
    view: &View,
    batch: usize,
    params: usize,
    trainable: usize,
    optimizer: OptimizerState,
) -> MemoryEstimate {
    let (acts, ws) = activations_per_sample(spec, view);
    MemoryEstimate {
        weights: 4 * 3 * params as u64,
        gradients: 4 * trainable as u64,
        optimizer: 4 * (optimizer.buffers() * trainable) as u64,
        activations: 4 * (acts * batch) as u64,
        workspace: 4 * (ws * batch) as u64,
    }
}
