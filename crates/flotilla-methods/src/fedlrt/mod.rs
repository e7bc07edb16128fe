//! FeDLRT (Schotthöfer & Laiu 2024): federated dynamical low-rank training, and FedLin (Mitra
//! et al. 2021) as its dense special case. Specification: methods.md §4.
//!
//! Every factored linear layer is `W = U S Vᵀ` with a basis (U, V, orthonormal columns) that
//! all clients share. A round has two phases, three with full variance correction:
//!
//! 0. **Basis gradients.** The server sends U, S, V and the dense tensors; each client
//!    returns the mean gradients G_U, G_V over `grad_batches` local batches (and G_S and the
//!    dense gradients when a correction needs them). The server averages them and augments
//!    each basis: Ū = orth((I − UUᵀ) G_U) by two passes of Gram–Schmidt and a column-pivoted
//!    QR (nalgebra), so that U stays verbatim as the first block of Ũ = [U | Ū] and
//!    S̃⁰ = [[S, 0], [0, 0]] represents the same W exactly.
//! 1. *(full correction only)* **Core gradients.** Clients return ∇_S̃ L_c at S̃⁰.
//! 2. **Core training.** The server sends only Ū, V̄ (U, V, S and the dense tensors are held
//!    from phase 0 and travel by fingerprint) and each client's correction V_c; clients train
//!    S̃ and the dense tensors for s* steps with U, V frozen; the server averages them and
//!    truncates each S̃ by SVD at relative tolerance τ within [r_min, r_max], setting the new
//!    U, S, V.
//!
//! Choices where the paper is silent (methods.md §4.9), also in docs/methods/fedlrt.md:
//! - The classifier (the last linear layer) stays dense, as the authors' code keeps it;
//!   convolutions are never factored (the engine factors linear layers only), so a CNN's
//!   first conv stays dense as in the paper.
//! - The correction applies to every tensor a client trains: S's old-basis block
//!   (`simplified`) or all of S̃ (`full`), and the dense tensors (both; their gradient in
//!   phase 0 is taken at the point they are trained from, so it is exact). With no factored
//!   layer the round is exactly FedLin, which is how `fedlin` is built.
//! - Gradients and cores are averaged with example weights (the theory's uniform weights are
//!   the IID special case), and the correction uses the same weights, so Σ w_c V_c = 0.
//! - The number of new directions per layer is min(r, min(n, m) − r) and fewer when G_U or
//!   G_V has (numerically) lower rank in the complement of the basis; r_max (default
//!   min(n, m)/2) bounds the rank after truncation, so the augmented 2r always fits.
//! - After truncation, U and V are re-orthonormalised by QR with the triangular factors
//!   folded into S (U S Vᵀ unchanged), so f32 rounding cannot accumulate over rounds.
//! - A client that drops between phases leaves the round: the core average uses the others
//!   (the gradient average it contributed to has already set the new directions).
//!
//! Clients are stateless between tasks: a client's own G_{S,c} is not kept on the client;
//! the server sends each client its correction V_c = G − G_c, which costs the same bytes as
//! broadcasting G (§4.5) and lets the same client code run in the simulator and over the
//! network.

use crate::common::{method_options, require_kind};
use flotilla_core::aggregate;
use flotilla_core::{ParamSet, Tensor};
use flotilla_engine::TaskKind;
use flotilla_engine::local::{
    CrossEntropy, Recipe, estimate_memory, gradient_task, train_task_with,
};
use flotilla_engine::{
    Assignment, ClientCtx, ClientData, ClientHalf, ClientInfo, EngineError, EvalModel, Experiment,
    MethodState, PhaseCtx, PhaseEnd, Reply, ServerCtx, ServerHalf, Task,
};
use flotilla_models::{ModelSpec, Net, View};
use nalgebra::DMatrix;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

mod client;
mod correction;
mod linalg;
mod server;
#[cfg(test)]
mod tests;

pub use client::FedLrtClient;
use client::*;
use correction::*;
use linalg::*;
pub use server::FedLrt;

/// Variance correction of the core training (methods.md §4.4 step 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Correction {
    /// No correction: FedAvg on the coefficients (drifts with client heterogeneity).
    None,
    /// Correct the old-basis block with G_S − G_{S,c} from phase 0: no extra exchange.
    Simplified,
    /// Correct all of S̃ with G̃ − G̃_c, taken at S̃⁰ in an extra phase.
    Full,
}

/// Task kinds of this module.
pub(super) const BASIS: TaskKind = TaskKind::named("basis-gradients");
pub(super) const CORE_GRADIENTS: TaskKind = TaskKind::named("core-gradients");
pub(super) const TRAIN_CORE: TaskKind = TaskKind::named("train-core");

/// Names of the new basis directions and of the per-client corrections in a task.
pub(super) const NEW_U: &str = "U_new";
pub(super) const NEW_V: &str = "V_new";
pub(super) const CORRECTION_PREFIX: &str = "vc.";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Options {
    pub(super) name: String,
    /// Layers to factor (names as in `ModelSpec::linear_layers`); default: every linear
    /// layer but the classifier.
    #[serde(default)]
    pub(super) layers: Option<Vec<String>>,
    /// Initial rank.
    #[serde(default)]
    r0: Option<usize>,
    #[serde(default)]
    pub(super) r_min: Option<usize>,
    #[serde(default)]
    pub(super) r_max: Option<usize>,
    /// Relative truncation tolerance τ.
    #[serde(default)]
    pub(super) tau: Option<f64>,
    /// Local core steps s* (default: `training.epochs` passes over the local data).
    #[serde(default)]
    pub(super) s_star: Option<usize>,
    #[serde(default)]
    pub(super) vc: Option<Correction>,
    /// Batches of the gradient passes (default: 4 without a correction, else one full pass
    /// over the local data).
    #[serde(default)]
    pub(super) grad_batches: Option<usize>,
}

/// Defaults (methods.md §4.6): τ = 0.05, r0 = 32, r_min = 2.
pub(super) const DEFAULT_TAU: f64 = 0.05;
pub(super) const DEFAULT_R0: usize = 32;
pub(super) const DEFAULT_R_MIN: usize = 2;
/// Batches of the gradient pass without a correction: the augmentation only needs the
/// directions of the gradient, which a few batches estimate (methods-notes: a full pass would
/// cost as much as the local epoch).
pub(super) const BASIS_ONLY_GRAD_BATCHES: usize = 4;
/// With a correction the gradient pass is one full pass over the local data (the gradient
/// of the client's loss, as in the theory and in FedLin): a correction from a few batches adds
/// the same sampling error to every local step, and with 32 Dirichlet(0.5) clients at
/// lr 0.2 training diverged (docs/results/fedlrt).
pub(super) const FULL_PASS: usize = usize::MAX;

/// A factored layer: `U` `[out, r]`, `V` `[in, r]`, and its rank bound.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Layer {
    pub(super) name: String,
    pub(super) inp: usize,
    pub(super) out: usize,
    pub(super) r_max: usize,
}

impl Layer {
    fn tensor(&self, leaf: &str) -> String {
        format!("{}.{leaf}", self.name)
    }
}

/// What a task of this module tells its client besides the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LrtTask {
    /// Batches of a gradient pass.
    pub(super) grad_batches: usize,
    /// Local steps of core training (`None`: the recipe's epochs).
    #[serde(default)]
    pub(super) steps: Option<usize>,
    /// Gradients to return (gradient tasks).
    #[serde(default)]
    pub(super) upload: Vec<String>,
}

/// What the tasks of one phase share.
pub(super) struct TaskShape<'a> {
    pub(super) kind: TaskKind,
    /// The model the client assembles.
    pub(super) spec: &'a ModelSpec,
    pub(super) view: View,
    pub(super) options: LrtTask,
}

/// What phase 0 left for the next phases of the same round.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    pub(super) round: u64,
    /// The model at the augmented ranks.
    pub(super) spec: ModelSpec,
    /// `<layer>.U_new` `[out, k]` and `<layer>.V_new` `[in, k]` per layer.
    pub(super) new_dirs: ParamSet,
    /// Each client's correction, tensors named `vc.<tensor>`.
    pub(super) corrections: BTreeMap<u64, ParamSet>,
}
