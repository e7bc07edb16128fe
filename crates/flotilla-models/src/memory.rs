//! Analytic estimate of the peak memory of local training.
//!
//! Terms, in bytes (f32 = 4 bytes):
//! - `weights`: the model's parameters, plus, for Adam (burn's optimizer), one more copy of the
//!   trainable ones (the new value exists before the old one is freed); SGD updates in place;
//! - `gradients`: one value per trainable parameter;
//! - `optimizer`: per trainable parameter, 1 value for SGD with momentum, 2 for Adam, 0 for
//!   plain SGD;
//! - `activations`: the intermediate tensors of the forward pass that autodiff keeps for the
//!   backward pass, times the batch size, plus the input batch. Layers before the first
//!   trainable tensor (in forward order) keep nothing: their inputs need no gradient, so burn
//!   records no graph for them. A frozen layer after a trainable one keeps what it keeps when
//!   trained, since the gradient must pass through it. A factored layer (FeDLRT) keeps its
//!   r-wide intermediates, and its input only when V is trainable;
//! - `workspace`: the gradient buffer of the largest activation during the backward pass,
//!   times the batch size, or, when larger, the part of the exported copy of the parameters
//!   (which training returns while the model still exists) that the gradients and activations
//!   do not already cover, plus [`BACKEND_WORKSPACE`] for the matrix kernels' packing buffers.
//!
//! The estimate is for a client on one thread. A client given n threads trains one
//! micro-batch per thread, and holds n − 1 more gradient buffers until the optimizer sums them.
//!
//! The per-layer counts of kept tensors (e.g. 8 per residual block) are this backend's, as
//! checked by the engine's `memory` test against the heap high-water mark measured by the
//! counting allocator; the estimate stays within ±30% of the measurement there.

/// Buffers of a training step that do not scale with the model: the matrix kernels' packing
/// buffers and the step's fixed staging, measured on the `flex` backend (bytes). Calibrated on
/// the smallest models of the engine's `memory` test, where this term dominates: with 1.5 MiB
/// a CNN at width 0.125 measured 1.33× its estimate; with 2.25 MiB every case there is within
/// 0.81–1.14× with the AVX2 GEMM kernels. The AVX-512 kernels skip the packing buffers for
/// the small products of MLPs, which then measure up to 3 MiB under their estimate (a safe
/// over-estimate; the test allows it for small models only).
pub const BACKEND_WORKSPACE: u64 = 9 << 18;

use crate::flops::{Pass, Tracker, leaf};
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
    /// Largest transient buffer: of a single operation, or the part of the exported
    /// parameters not covered by gradients and activations (see the module docs).
    pub workspace: u64,
}

impl MemoryEstimate {
    /// Sum of the terms.
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.optimizer + self.activations + self.workspace
    }
}

/// Per-sample values a linear layer's products keep for backward, walking it with `tr`: a
/// dense layer keeps its input once its output is tracked; a factored one keeps its input only
/// when V is trainable (burn's matmul keeps an operand only for the other's gradient), and
/// the r-wide intermediates of ·Sᵀ and ·Uᵀ once they are tracked. `input_counted`: the input is
/// the batch, which is counted on its own.
fn linear_kept(
    spec: &ModelSpec,
    tr: &mut Tracker,
    name: &str,
    inp: usize,
    input_counted: bool,
) -> usize {
    let input = if input_counted { 0 } else { inp };
    let bias = [leaf(name, "bias")];
    match spec.rank_of(name) {
        None => {
            tr.product(&leaf(name, "weight"), &bias);
            if tr.tracked() { input } else { 0 }
        }
        Some(r) => {
            let mut kept = 0;
            if tr.product(&leaf(name, "V"), &[]) == Pass::Train {
                kept += input;
            }
            tr.product(&leaf(name, "S"), &[]);
            if tr.tracked() {
                kept += r;
            }
            tr.product(&leaf(name, "U"), &bias);
            if tr.tracked() {
                kept += r;
            }
            kept
        }
    }
}

/// Per-sample activation values kept for backward, and the largest single activation that
/// the backward pass makes a gradient buffer for.
///
/// Layers before the first trainable tensor run without a graph (see [`crate::flops::Pass`]):
/// they keep nothing, and their activations are freed as the forward pass moves on, so they
/// count towards neither term.
fn activations_per_sample(spec: &ModelSpec, view: &View) -> (usize, usize) {
    let [c, h, w] = spec.input;
    let input = c * h * w;
    let mut tr = Tracker::new(view);
    let norm = |p: &str| [leaf(p, "weight"), leaf(p, "bias")];
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
            let fast = crate::kernels::flotilla_kernels();
            let conv_kept = |a: usize| if fast { a / 16 } else { 3 * a };
            let mut acts = input;
            let mut largest = input;
            tr.product("conv1.weight", &["conv1.bias".into()]);
            if tr.tracked() {
                acts += conv_kept(a1);
                largest = largest.max(if fast { p1 } else { a1 });
            }
            tr.product("conv2.weight", &["conv2.bias".into()]);
            if tr.tracked() {
                acts += p1 + conv_kept(a2);
                largest = largest.max(if fast { p1 } else { a2 });
            }
            acts += linear_kept(spec, &mut tr, "fc1", p2, false);
            if tr.tracked() {
                acts += f; // the ReLU's output
            }
            acts += linear_kept(spec, &mut tr, "fc2", f, false);
            if tr.tracked() {
                acts += spec.classes * 2;
            }
            (acts, largest)
        }
        Architecture::Mlp { hidden } => {
            let layers = spec.linear_layers();
            let last = layers.len() - 1;
            let mut acts = input;
            for (i, (name, inp, out)) in layers.into_iter().enumerate() {
                acts += linear_kept(spec, &mut tr, &name, inp, i == 0);
                if tr.tracked() {
                    // a hidden layer's ReLU keeps its output; the logits and log-softmax
                    acts += if i < last { out } else { 2 * out };
                }
            }
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
            let mut acts = input;
            let mut largest = 0;
            tr.product("conv1.weight", &norm("norm1"));
            if tr.tracked() {
                // stem: conv out, norm, relu
                acts += 4 * widths[0] * h * w;
                largest = widths[0] * h * w;
            }
            let (mut hh, mut ww) = (h, w);
            let mut k = 0;
            for (stage, &out) in widths.iter().enumerate() {
                for i in 0..*blocks_per_stage {
                    let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                    let (ho, wo) = (hh.div_ceil(stride), ww.div_ceil(stride));
                    let active = view.block_active(k);
                    if active {
                        let b = format!("blocks.{k}");
                        tr.product(&format!("{b}.conv1.weight"), &norm(&format!("{b}.norm1")));
                        tr.product(&format!("{b}.conv2.weight"), &norm(&format!("{b}.norm2")));
                    }
                    if tr.tracked() {
                        // an active block keeps two conv outputs, two norms (2 each), a
                        // ReLU, the sum and its ReLU; a skipped one only its shortcut's output
                        acts += if active { 8 } else { 1 } * out * ho * wo;
                        largest = largest.max(out * ho * wo);
                    }
                    (hh, ww) = (ho, wo);
                    k += 1;
                }
            }
            acts += linear_kept(spec, &mut tr, "fc", widths[2], false);
            if tr.tracked() {
                acts += widths[2] + 2 * spec.classes;
            }
            (acts, largest.max(widths[2]))
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
            let mut acts = input;
            // a block's MLP hidden layer or its attention scores
            let block_largest = (mlp_ratio * t * d).max(heads * t * t);
            let mut largest = d;
            tr.product("patch_embed.weight", &["patch_embed.bias".into()]);
            tr.params(&["cls_token".into(), "pos_embed".into()]);
            if tr.tracked() {
                acts += 3 * t * d;
                largest = block_largest;
            }
            for k in 0..*depth {
                if !view.block_active(k) {
                    continue;
                }
                let b = format!("blocks.{k}");
                // The block's tensors in forward order; the kept activations are counted per
                // block (a block a gradient reaches keeps all of them).
                tr.params(&norm(&format!("{b}.norm1")));
                let start = tr.clone();
                for p in ["q", "k", "v"] {
                    let mut branch = start.clone();
                    linear_kept(spec, &mut branch, &format!("{b}.attn.{p}"), d, false);
                    tr.join(&branch);
                }
                linear_kept(spec, &mut tr, &format!("{b}.attn.proj"), d, false);
                tr.params(&norm(&format!("{b}.norm2")));
                linear_kept(spec, &mut tr, &format!("{b}.fc1"), d, false);
                linear_kept(spec, &mut tr, &format!("{b}.fc2"), mlp_ratio * d, false);
                if tr.tracked() {
                    // norms, q k v, context, projection, residuals (8 token-width tensors),
                    // scores and softmax, the MLP's hidden layer before and after GELU; the
                    // linear kernel keeps only each layer's input
                    acts += 8 * t * d + 3 * heads * t * t + 2 * mlp_ratio * t * d;
                    largest = block_largest;
                }
            }
            tr.params(&norm("norm"));
            acts += linear_kept(spec, &mut tr, "head", d, false);
            if tr.tracked() {
                // the class token's slice, the final norm and the logits
                acts += 3 * d + 2 * spec.classes;
            }
            (acts, largest)
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
    let gradients = 4 * trainable as u64;
    let activations = 4 * (acts * batch) as u64;
    // Training ends by exporting every parameter while the model still exists. When most
    // tensors are frozen (few gradients, few kept activations) that copy, not the backward
    // pass, sets the peak; with everything trainable the gradients alone already match it.
    let export = (4 * params as u64).saturating_sub(gradients + activations);
    MemoryEstimate {
        weights: 4
            * (params
                + if optimizer == OptimizerState::Adam {
                    trainable
                } else {
                    0
                }) as u64,
        gradients,
        optimizer: 4 * (optimizer.buffers() * trainable) as u64,
        activations,
        workspace: (4 * (largest * batch) as u64).max(export) + BACKEND_WORKSPACE,
    }
}
