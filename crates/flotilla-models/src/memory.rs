//! Analytic estimate of the peak memory of local training.
//!
//! Terms, in bytes (f32 = 4 bytes):
//! - `weights`: the model's parameters, plus, for Adam (burn's optimizer), one more copy of the
//!   trainable ones (the new value exists before the old one is freed); SGD updates in place;
//! - `gradients`: one value per trainable parameter;
//! - `optimizer`: per trainable parameter, 1 value for SGD with momentum, 2 for Adam, 0 for
//!   plain SGD;
//! - `activations`: the intermediate tensors of the forward pass that autodiff keeps for the
//!   backward pass, times the batch size, plus the input batch;
//! - `workspace`: the gradient buffer of the largest activation during the backward pass,
//!   times the batch size, plus [`BACKEND_WORKSPACE`] for the matrix kernels' packing buffers.
//!
//! The estimate is for a client on one thread. A client given n threads trains one
//! micro-batch per thread, and holds n − 1 more gradient buffers until the optimizer sums them.
//!
//! The per-layer counts of kept tensors (e.g. 8 per residual block) are this backend's, as
//! checked by the engine's `memory` test against the heap high-water mark measured by the
//! counting allocator; the estimate stays within ±30% of the measurement there.

/// Packing buffers of the matrix kernels, measured on the `flex` backend (bytes).
pub const BACKEND_WORKSPACE: u64 = 3 << 19;

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

/// Per-sample activation values kept for backward, and the largest single activation.
fn activations_per_sample(spec: &ModelSpec, view: &View) -> (usize, usize) {
    let [c, h, w] = spec.input;
    let input = c * h * w;
    match &spec.arch {
        Architecture::Cnn => {
            let (c1, c2, f) = (spec.scaled(32), spec.scaled(64), spec.scaled(512));
            let a1 = c1 * h * w; // conv outputs
            let p1 = c1 * (h / 2) * (w / 2);
            let a2 = c2 * (h / 2) * (w / 2);
            let p2 = c2 * (h / 4) * (w / 4);
            // burn's ReLU keeps its output and its max pool the input and i64 indices, and
            // the conv output is the largest buffer. The fused convolution + ReLU + pool
            // kernel (crate::kernels) keeps only a one-byte argmax per window, 1/16 of an f32
            // per input, and never stores a whole conv output: the largest per-batch buffer
            // left is the gradient of the first pooled output.
            let (kept, largest) = if crate::kernels::fast() {
                ((a1 + a2) / 16, p1.max(input))
            } else {
                (3 * (a1 + a2), a1.max(a2).max(input))
            };
            let acts = input + kept + p1 + p2 + 2 * f + spec.classes * 2;
            (acts, largest)
        }
        Architecture::Mlp { hidden } => {
            let acts = input
                + hidden.iter().map(|x| 2 * spec.scaled(*x)).sum::<usize>()
                + 2 * spec.classes;
            let largest = hidden
                .iter()
                .map(|x| spec.scaled(*x))
                .max()
                .unwrap_or(0)
                .max(input);
            (acts, largest)
        }
        Architecture::Resnet { blocks_per_stage } => {
            let widths = [spec.scaled(16), spec.scaled(32), spec.scaled(64)];
            // stem: conv out, norm, relu
            let mut acts = input + 4 * widths[0] * h * w;
            let mut largest = widths[0] * h * w;
            let (mut hh, mut ww) = (h, w);
            let mut k = 0;
            for (stage, &out) in widths.iter().enumerate() {
                for i in 0..*blocks_per_stage {
                    let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                    let (ho, wo) = (hh.div_ceil(stride), ww.div_ceil(stride));
                    // an active block keeps two conv outputs, two norms (2 each), a ReLU,
                    // the sum and its ReLU; a skipped one only its shortcut's output
                    acts += if view.block_active(k) { 8 } else { 1 } * out * ho * wo;
                    largest = largest.max(out * ho * wo);
                    (hh, ww) = (ho, wo);
                    k += 1;
                }
            }
            (acts + 2 * widths[2] + 2 * spec.classes, largest)
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
                    // norms, q k v, context, projection, residuals (8 token-width tensors),
                    // scores and softmax, the MLP's hidden layer before and after GELU; the
                    // linear kernel keeps only each layer's input
                    acts += 8 * t * d + 3 * heads * t * t + 2 * mlp_ratio * t * d;
                }
            }
            (
                acts + 4 * d + 2 * spec.classes,
                (mlp_ratio * t * d).max(heads * t * t),
            )
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
    let (acts, largest) = activations_per_sample(spec, view);
    MemoryEstimate {
        weights: 4
            * (params
                + if optimizer == OptimizerState::Adam {
                    trainable
                } else {
                    0
                }) as u64,
        gradients: 4 * trainable as u64,
        optimizer: 4 * (optimizer.buffers() * trainable) as u64,
        activations: 4 * (acts * batch) as u64,
        workspace: 4 * (largest * batch) as u64 + BACKEND_WORKSPACE,
    }
}
