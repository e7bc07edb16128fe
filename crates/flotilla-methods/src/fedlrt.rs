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
const BASIS: &str = "basis-gradients";
const CORE_GRADIENTS: &str = "core-gradients";
const TRAIN_CORE: &str = "train-core";

/// Names of the new basis directions and of the per-client corrections in a task.
const NEW_U: &str = "U_new";
const NEW_V: &str = "V_new";
const CORRECTION_PREFIX: &str = "vc.";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    name: String,
    /// Layers to factor (names as in `ModelSpec::linear_layers`); default: every linear
    /// layer but the classifier.
    #[serde(default)]
    layers: Option<Vec<String>>,
    /// Initial rank.
    #[serde(default)]
    r0: Option<usize>,
    #[serde(default)]
    r_min: Option<usize>,
    #[serde(default)]
    r_max: Option<usize>,
    /// Relative truncation tolerance τ.
    #[serde(default)]
    tau: Option<f64>,
    /// Local core steps s* (default: `training.epochs` passes over the local data).
    #[serde(default)]
    s_star: Option<usize>,
    #[serde(default)]
    vc: Option<Correction>,
    /// Batches of the gradient passes (default: 4 without a correction, else one full pass
    /// over the local data).
    #[serde(default)]
    grad_batches: Option<usize>,
}

/// Defaults (methods.md §4.6): τ = 0.05, r0 = 32, r_min = 2.
const DEFAULT_TAU: f64 = 0.05;
const DEFAULT_R0: usize = 32;
const DEFAULT_R_MIN: usize = 2;
/// Batches of the gradient pass without a correction: the augmentation only needs the
/// directions of the gradient, which a few batches estimate (methods-notes: a full pass would
/// cost as much as the local epoch).
const BASIS_ONLY_GRAD_BATCHES: usize = 4;
/// With a correction the gradient pass is one full pass over the local data (the gradient
/// of the client's loss, as in the theory and in FedLin): a correction from a few batches adds
/// the same sampling error to every local step, and with 32 Dirichlet(0.5) clients at
/// lr 0.2 training diverged (docs/results/fedlrt).
const FULL_PASS: usize = usize::MAX;

/// A factored layer: `U` `[out, r]`, `V` `[in, r]`, and its rank bound.
#[derive(Debug, Clone, PartialEq)]
struct Layer {
    name: String,
    inp: usize,
    out: usize,
    r_max: usize,
}

impl Layer {
    fn tensor(&self, leaf: &str) -> String {
        format!("{}.{leaf}", self.name)
    }
}

/// What a task of this module tells its client besides the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LrtTask {
    /// Batches of a gradient pass.
    grad_batches: usize,
    /// Local steps of core training (`None`: the recipe's epochs).
    #[serde(default)]
    steps: Option<usize>,
    /// Gradients to return (gradient tasks).
    #[serde(default)]
    upload: Vec<String>,
}

/// What the tasks of one phase share.
struct TaskShape<'a> {
    kind: &'static str,
    /// The model the client assembles.
    spec: &'a ModelSpec,
    view: View,
    options: LrtTask,
}

/// What phase 0 left for the next phases of the same round.
#[derive(Debug, Clone)]
struct Pending {
    round: u64,
    /// The model at the augmented ranks.
    spec: ModelSpec,
    /// `<layer>.U_new` `[out, k]` and `<layer>.V_new` `[in, k]` per layer.
    new_dirs: ParamSet,
    /// Each client's correction, tensors named `vc.<tensor>`.
    corrections: BTreeMap<u64, ParamSet>,
}

/// The server half of FeDLRT (and of FedLin: no factored layer).
pub struct FedLrt {
    name: String,
    spec: ModelSpec,
    recipe: Recipe,
    layers: Vec<Layer>,
    r_min: usize,
    tau: f64,
    steps: Option<usize>,
    vc: Correction,
    grad_batches: usize,
    /// The global model: factors of the factored layers, every other tensor dense.
    params: ParamSet,
    pending: Option<Pending>,
    /// Ranks after the last augmentation, reported per round.
    augmented: BTreeMap<String, usize>,
    /// Names and shapes of the dense model's tensors, in export order.
    dense_layout: Vec<(String, Vec<usize>)>,
}

impl FedLrt {
    /// Builds the server half from the `[method]` table: `fedlrt`, or `fedlin` (every layer
    /// dense, the correction of FeDLRT's `simplified` variant on all tensors).
    pub fn from_config(exp: &Experiment, dense: ModelSpec) -> Result<Self, EngineError> {
        let opts: Options = method_options(exp)?;
        let fedlin = opts.name == "fedlin";
        if fedlin {
            for (key, set) in [
                ("layers", opts.layers.is_some()),
                ("r0", opts.r0.is_some()),
                ("r_min", opts.r_min.is_some()),
                ("r_max", opts.r_max.is_some()),
                ("tau", opts.tau.is_some()),
                ("vc", opts.vc.is_some()),
            ] {
                if set {
                    return Err(EngineError::Config(format!(
                        "`method.{key}` applies to fedlrt; fedlin trains every layer dense with its own correction"
                    )));
                }
            }
        }
        let all = dense.linear_layers();
        let names: Vec<String> = match (&opts.layers, fedlin) {
            (_, true) => Vec::new(),
            (Some(l), false) => l.clone(),
            (None, false) => all[..all.len().saturating_sub(1)]
                .iter()
                .map(|(n, _, _)| n.clone())
                .collect(),
        };
        if names.is_empty() && !fedlin {
            return Err(EngineError::Config(
                "`method.layers` names no layer to factor; for the dense variance-corrected baseline use method.name = \"fedlin\"".into(),
            ));
        }
        let r_min = opts.r_min.unwrap_or(DEFAULT_R_MIN);
        if r_min == 0 {
            return Err(EngineError::Config(
                "`method.r_min` must be at least 1".into(),
            ));
        }
        let mut layers = Vec::new();
        let mut spec = dense.clone();
        for name in &names {
            let Some((_, inp, out)) = all.iter().find(|(n, _, _)| n == name) else {
                return Err(EngineError::Config(format!(
                    "`method.layers`: the model has no linear layer `{name}` (its linear layers: {})",
                    all.iter()
                        .map(|(n, _, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            let half = (*inp).min(*out) / 2;
            let r_max = opts.r_max.map_or(half, |r| r.min(half));
            if r_max < r_min {
                return Err(EngineError::Config(format!(
                    "`method.r_max` for layer `{name}` is {r_max} (at most min(in, out)/2 = {half}), below `method.r_min` = {r_min}"
                )));
            }
            let r0 = opts.r0.unwrap_or(DEFAULT_R0).clamp(r_min, r_max);
            spec.ranks.insert(name.clone(), r0);
            layers.push(Layer {
                name: name.clone(),
                inp: *inp,
                out: *out,
                r_max,
            });
        }
        if layers.len() != spec.ranks.len() {
            return Err(EngineError::Config(
                "`method.layers` names a layer twice".into(),
            ));
        }
        let tau = opts.tau.unwrap_or(DEFAULT_TAU);
        if !(tau.is_finite() && (0.0..1.0).contains(&tau)) {
            return Err(EngineError::Config(format!(
                "`method.tau` must be in [0, 1), got {tau}"
            )));
        }
        if opts.s_star == Some(0) {
            return Err(EngineError::Config(
                "`method.s_star` must be at least 1 local step".into(),
            ));
        }
        let vc = match (fedlin, opts.vc) {
            (true, _) => Correction::Simplified,
            (false, vc) => vc.unwrap_or(Correction::Simplified),
        };
        let grad_batches = opts.grad_batches.unwrap_or(if vc == Correction::None {
            BASIS_ONLY_GRAD_BATCHES
        } else {
            FULL_PASS
        });
        if grad_batches == 0 {
            return Err(EngineError::Config(
                "`method.grad_batches` must be at least 1".into(),
            ));
        }
        let params = Net::init_params(&spec, exp.seed)?;
        let dense_layout = Net::init_params(&dense, 0)?
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        Ok(Self {
            name: opts.name,
            spec,
            recipe: exp.training.clone(),
            layers,
            r_min,
            tau,
            steps: opts.s_star,
            vc,
            grad_batches,
            params,
            pending: None,
            augmented: BTreeMap::new(),
            dense_layout,
        })
    }

    /// The current global model (factors and dense tensors).
    pub fn params(&self) -> &ParamSet {
        &self.params
    }

    /// The current model description (its `ranks` are the current ranks).
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Zero tensors with the names, shapes and order of the model at `ranks` (a factored
    /// layer exports U, S, V where the dense one has its weight), without the SVDs of an
    /// initialisation.
    fn layout(&self, ranks: &BTreeMap<String, usize>) -> Result<ParamSet, EngineError> {
        let mut out = Vec::with_capacity(self.dense_layout.len() + 2 * ranks.len());
        for (name, shape) in &self.dense_layout {
            let factored = name
                .strip_suffix(".weight")
                .and_then(|l| ranks.get(l).map(|r| (l, *r)));
            match factored {
                Some((layer, r)) => {
                    let [out_f, in_f] = shape[..] else {
                        return Err(EngineError::Method(format!(
                            "`{name}` is not a matrix, it cannot be factored"
                        )));
                    };
                    out.push(Tensor::zeros(format!("{layer}.U"), vec![out_f, r]));
                    out.push(Tensor::zeros(format!("{layer}.S"), vec![r, r]));
                    out.push(Tensor::zeros(format!("{layer}.V"), vec![in_f, r]));
                }
                None => out.push(Tensor::zeros(name.clone(), shape.clone())),
            }
        }
        Ok(ParamSet::from_tensors(out)?)
    }

    fn is_factor(&self, name: &str) -> bool {
        self.layers
            .iter()
            .any(|l| ["U", "S", "V"].iter().any(|leaf| name == l.tensor(leaf)))
    }

    /// Names of the tensors trained densely (and FedAvg'd): everything but the factors.
    fn dense_names(&self) -> Vec<String> {
        self.params
            .names()
            .filter(|n| !self.is_factor(n))
            .map(String::from)
            .collect()
    }

    /// The gradients phase 0 asks for.
    fn basis_upload(&self) -> Vec<String> {
        let mut up = Vec::new();
        for l in &self.layers {
            up.push(l.tensor("U"));
            up.push(l.tensor("V"));
            if self.vc == Correction::Simplified {
                up.push(l.tensor("S"));
            }
        }
        if self.vc != Correction::None {
            up.extend(self.dense_names());
        }
        up
    }

    /// U and V of every factored layer: frozen while the core trains.
    fn bases(&self) -> Vec<String> {
        self.layers
            .iter()
            .flat_map(|l| [l.tensor("U"), l.tensor("V")])
            .collect()
    }

    fn pending(&self, ctx: &PhaseCtx) -> Result<&Pending, EngineError> {
        self.pending
            .as_ref()
            .filter(|p| p.round == ctx.round)
            .ok_or_else(|| {
                EngineError::Method(format!(
                    "{}: phase {} of round {} planned before its basis phase was aggregated",
                    self.name, ctx.phase, ctx.round
                ))
            })
    }

    fn task(&self, ctx: &PhaseCtx, client: u64, shape: &TaskShape<'_>, params: ParamSet) -> Task {
        // Everything but the corrections stays on the client until the round ends.
        let hold = params
            .names()
            .filter(|n| !n.starts_with(CORRECTION_PREFIX))
            .map(String::from)
            .collect();
        Task {
            round: ctx.round,
            phase: ctx.phase,
            client,
            kind: shape.kind.into(),
            model: shape.spec.clone(),
            view: shape.view.clone(),
            recipe: self.recipe.clone(),
            params,
            masks: Vec::new(),
            hold,
            options: serde_json::to_value(&shape.options).expect("serialisable"),
        }
    }

    /// One task per client, or a skip when the assembled model's training does not fit.
    fn plan_with(
        &self,
        ctx: &PhaseCtx,
        clients: &[ClientInfo],
        shape: &TaskShape<'_>,
        params_for: impl Fn(u64) -> Result<ParamSet, EngineError>,
    ) -> Result<Vec<Assignment>, EngineError> {
        // The estimate of the assembled model (what the client builds), not of the pieces.
        let layout = self.layout(&shape.spec.ranks)?;
        let need = estimate_memory(shape.spec, &shape.view, &layout, &self.recipe).total();
        clients
            .iter()
            .map(|c| {
                if need > c.profile.memory_bytes {
                    Ok(Assignment::Skip(format!(
                        "{} at ranks {:?} needs about {:.1} MiB, the {} device has {:.1} MiB",
                        self.name,
                        shape.spec.ranks,
                        need as f64 / 1048576.0,
                        c.profile.tier,
                        c.profile.memory_bytes as f64 / 1048576.0
                    )))
                } else {
                    let task = self.task(ctx, c.id, shape, params_for(c.id)?);
                    Ok(Assignment::Run(Box::new(task)))
                }
            })
            .collect()
    }

    fn core_view(&self) -> View {
        View {
            active_blocks: None,
            frozen: self.bases(),
        }
    }

    /// Phase 0's aggregate: average the gradients, augment the bases, set the corrections.
    fn aggregate_basis(&mut self, ctx: &PhaseCtx, replies: &[Reply]) -> Result<(), EngineError> {
        let mean = weighted(replies)?;
        let mut spec = self.spec.clone();
        let mut dirs = Vec::new();
        for l in &self.layers {
            let r = self.spec.ranks[&l.name];
            let u = matrix(self.params.require(&l.tensor("U"))?);
            let v = matrix(self.params.require(&l.tensor("V"))?);
            let gu = matrix(mean.require(&l.tensor("U"))?);
            let gv = matrix(mean.require(&l.tensor("V"))?);
            let limit = r.min(l.inp.min(l.out) - r);
            let (nu, nv) = (new_directions(&u, &gu), new_directions(&v, &gv));
            let k = limit.min(nu.ncols()).min(nv.ncols());
            spec.ranks.insert(l.name.clone(), r + k);
            dirs.push(tensor(&l.tensor(NEW_U), &nu.columns(0, k).into_owned()));
            dirs.push(tensor(&l.tensor(NEW_V), &nv.columns(0, k).into_owned()));
        }
        // U and V get no correction (they are frozen while the core trains), and no tensor
        // does without one.
        let bases = self.bases();
        let corrected =
            |name: &str| self.vc != Correction::None && !bases.iter().any(|b| b == name);
        let mut corrections = BTreeMap::new();
        for reply in replies {
            let vc = correction_terms(&mean, &reply.params, corrected)?;
            corrections.insert(reply.client, ParamSet::from_tensors(vc)?);
        }
        tracing::debug!(round = ctx.round, ranks = ?spec.ranks, "bases augmented");
        self.pending = Some(Pending {
            round: ctx.round,
            spec,
            new_dirs: ParamSet::from_tensors(dirs)?,
            corrections,
        });
        Ok(())
    }

    /// Full correction: the mean of the core gradients at S̃⁰ sets each client's S̃ term.
    fn aggregate_core_gradients(&mut self, replies: &[Reply]) -> Result<(), EngineError> {
        let mean = weighted(replies)?;
        let pending = self.pending.as_mut().expect("checked by the caller");
        let mut corrections = BTreeMap::new();
        for reply in replies {
            // A client that missed phase 0 has no dense correction: it cannot be here.
            let mut vc = pending
                .corrections
                .remove(&reply.client)
                .unwrap_or_default();
            for t in correction_terms(&mean, &reply.params, |_| true)? {
                vc.push(t)?;
            }
            corrections.insert(reply.client, vc);
        }
        pending.corrections = corrections;
        Ok(())
    }

    /// The last phase's aggregate: average S̃ and the dense tensors, truncate, new factors.
    fn aggregate_core(&mut self, ctx: &PhaseCtx, replies: &[Reply]) -> Result<(), EngineError> {
        let mean = weighted(replies)?;
        let pending = self.pending.take().expect("checked by the caller");
        let mut out = Vec::with_capacity(self.params.len());
        let mut ranks = self.spec.ranks.clone();
        for t in self.params.iter() {
            if !self.is_factor(&t.name) {
                out.push(mean.require(&t.name)?.clone());
            }
        }
        for l in &self.layers {
            let u = matrix(self.params.require(&l.tensor("U"))?);
            let v = matrix(self.params.require(&l.tensor("V"))?);
            let u_aug = hcat(&u, &matrix(pending.new_dirs.require(&l.tensor(NEW_U))?));
            let v_aug = hcat(&v, &matrix(pending.new_dirs.require(&l.tensor(NEW_V))?));
            let s = matrix(mean.require(&l.tensor("S"))?);
            let (nu, ns, nv) = truncate(&u_aug, &s, &v_aug, self.tau, self.r_min, l.r_max);
            ranks.insert(l.name.clone(), ns.nrows());
            out.push(tensor(&l.tensor("U"), &nu));
            out.push(tensor(&l.tensor("S"), &ns));
            out.push(tensor(&l.tensor("V"), &nv));
        }
        let mut spec = self.spec.clone();
        spec.ranks = ranks;
        // Keep the model's tensor order (the layout PyTorch and checkpoints see).
        let order = self.layout(&spec.ranks)?;
        let by_name: HashMap<String, Tensor> =
            out.into_iter().map(|t| (t.name.clone(), t)).collect();
        let mut params = Vec::with_capacity(order.len());
        for t in order.iter() {
            params.push(by_name.get(&t.name).cloned().ok_or_else(|| {
                EngineError::Method(format!("{}: no value for `{}`", self.name, t.name))
            })?);
        }
        let params = ParamSet::from_tensors(params)?;
        order.check_same_layout(&params)?;
        tracing::debug!(round = ctx.round, ranks = ?spec.ranks, "cores truncated");
        self.params = params;
        self.spec = spec;
        self.augmented = pending.spec.ranks;
        Ok(())
    }

    fn last_phase(&self) -> u32 {
        if self.vc == Correction::Full { 2 } else { 1 }
    }
}

/// A client's correction for each tensor of `mean` that `keep` admits: the mean gradient
/// minus the client's own, named `vc.<tensor>`.
fn correction_terms(
    mean: &ParamSet,
    own: &ParamSet,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<Tensor>, EngineError> {
    let mut out = Vec::new();
    for t in mean.iter().filter(|t| keep(&t.name)) {
        let mine = own.require(&t.name)?;
        out.push(Tensor {
            name: format!("{CORRECTION_PREFIX}{}", t.name),
            shape: t.shape.clone(),
            data: t.data.iter().zip(&mine.data).map(|(g, c)| g - c).collect(),
        });
    }
    Ok(out)
}

/// The example-weighted mean of the replies' tensors.
fn weighted(replies: &[Reply]) -> Result<ParamSet, EngineError> {
    let contribs = crate::common::contributions(replies);
    Ok(aggregate::weighted_mean(&contribs)?)
}

/// A 2-D tensor as an f64 matrix.
fn matrix(t: &Tensor) -> DMatrix<f64> {
    DMatrix::from_row_iterator(t.shape[0], t.shape[1], t.data.iter().map(|v| f64::from(*v)))
}

/// An f64 matrix as a row-major f32 tensor.
fn tensor(name: &str, m: &DMatrix<f64>) -> Tensor {
    Tensor {
        name: name.into(),
        shape: vec![m.nrows(), m.ncols()],
        data: m.transpose().as_slice().iter().map(|v| *v as f32).collect(),
    }
}

fn hcat(a: &DMatrix<f64>, b: &DMatrix<f64>) -> DMatrix<f64> {
    let mut m = DMatrix::zeros(a.nrows(), a.ncols() + b.ncols());
    m.columns_mut(0, a.ncols()).copy_from(a);
    m.columns_mut(a.ncols(), b.ncols()).copy_from(b);
    m
}

/// Relative size below which a direction of the gradient counts as already in the basis
/// (methods.md §4.9 gap 2).
const NEGLIGIBLE: f64 = 1e-6;

/// Orthonormal directions of `g`'s range outside span(`u`) (u orthonormal), strongest first:
/// the residual (I − UUᵀ)G twice (two-pass Gram–Schmidt keeps it orthogonal to U in floating
/// point), then a column-pivoted QR of the residual, keeping the columns whose pivot is above
/// [`NEGLIGIBLE`] × ‖G‖_F.
fn new_directions(u: &DMatrix<f64>, g: &DMatrix<f64>) -> DMatrix<f64> {
    let scale = g.norm();
    if scale == 0.0 || !scale.is_finite() {
        return DMatrix::zeros(u.nrows(), 0);
    }
    let mut r = g - u * (u.transpose() * g);
    r -= u * (u.transpose() * &r);
    let qr = r.col_piv_qr();
    let tri = qr.r();
    let k = (0..tri.nrows().min(tri.ncols()))
        .take_while(|&i| tri[(i, i)].abs() > NEGLIGIBLE * scale)
        .count();
    qr.q().columns(0, k).into_owned()
}

/// Truncation (methods.md §4.3 step 5): P Σ Qᵀ = svd(S̃); the smallest rank r₁ whose dropped
/// singular values have norm below τ‖S̃‖_F, clamped to [r_min, r_max] and to S̃'s size; then
/// U = Ũ P₁, V = Ṽ Q₁, S = Σ₁, re-orthonormalised by QR with the factors folded into S.
fn truncate(
    u_aug: &DMatrix<f64>,
    s: &DMatrix<f64>,
    v_aug: &DMatrix<f64>,
    tau: f64,
    r_min: usize,
    r_max: usize,
) -> (DMatrix<f64>, DMatrix<f64>, DMatrix<f64>) {
    let a = s.nrows();
    let svd = s.clone().svd(true, true);
    let sigma = &svd.singular_values;
    let threshold = tau * sigma.norm();
    // tail[i] = ‖σ_i..‖₂
    let mut tail = vec![0.0; a + 1];
    for i in (0..a).rev() {
        tail[i] = (tail[i + 1] * tail[i + 1] + sigma[i] * sigma[i]).sqrt();
    }
    let keep = (0..=a).find(|&r1| tail[r1] < threshold).unwrap_or(a);
    let r1 = keep.max(r_min).min(r_max).min(a).max(1);
    let p = svd.u.expect("requested").columns(0, r1).into_owned();
    let q = svd.v_t.expect("requested").rows(0, r1).transpose();
    let sig = DMatrix::from_diagonal(&sigma.rows(0, r1).into_owned());
    let (qu, ru) = (u_aug * p).qr().unpack();
    let (qv, rv) = (v_aug * q).qr().unpack();
    (qu, ru * sig * rv.transpose(), qv)
}

impl ServerHalf for FedLrt {
    fn name(&self) -> &str {
        &self.name
    }

    fn plan(&self, ctx: &PhaseCtx, clients: &[ClientInfo]) -> Result<Vec<Assignment>, EngineError> {
        let opts = |upload: Vec<String>| LrtTask {
            grad_batches: self.grad_batches,
            steps: self.steps,
            upload,
        };
        if ctx.phase == 0 {
            let shape = TaskShape {
                kind: BASIS,
                spec: &self.spec,
                view: View::full(),
                options: opts(self.basis_upload()),
            };
            return self.plan_with(ctx, clients, &shape, |_| Ok(self.params.clone()));
        }
        let pending = self.pending(ctx)?;
        let mut base = self.params.clone();
        for t in pending.new_dirs.iter() {
            base.push(t.clone())?;
        }
        if ctx.phase < self.last_phase() {
            // Only S̃'s gradient is wanted: the dense tensors are frozen as well.
            let mut view = self.core_view();
            view.frozen.extend(self.dense_names());
            let shape = TaskShape {
                kind: CORE_GRADIENTS,
                spec: &pending.spec,
                view,
                options: opts(self.layers.iter().map(|l| l.tensor("S")).collect()),
            };
            return self.plan_with(ctx, clients, &shape, |_| Ok(base.clone()));
        }
        let shape = TaskShape {
            kind: TRAIN_CORE,
            spec: &pending.spec,
            view: self.core_view(),
            options: opts(Vec::new()),
        };
        self.plan_with(ctx, clients, &shape, |c| {
            let mut params = base.clone();
            if self.vc != Correction::None {
                let vc = pending.corrections.get(&c).ok_or_else(|| {
                    EngineError::Method(format!(
                        "{}: client {c} has no correction for round {}",
                        self.name, ctx.round
                    ))
                })?;
                for t in vc.iter() {
                    params.push(t.clone())?;
                }
            }
            Ok(params)
        })
    }

    fn check_reply(&self, task: &Task, reply: &Reply) -> Result<(), String> {
        let expected = expected_reply(task).map_err(|e| e.to_string())?;
        let got: Vec<(&str, &[usize])> = reply
            .params
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        let want: Vec<(&str, &[usize])> = expected
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        if got != want {
            return Err(format!(
                "a `{}` reply must hold exactly {} tensors ({}), got {} ({})",
                task.kind,
                want.len(),
                describe(&want),
                got.len(),
                describe(&got)
            ));
        }
        // The driver has already refused a reply with zero examples.
        Ok(())
    }

    fn aggregate(
        &mut self,
        ctx: &PhaseCtx,
        replies: &[Reply],
        _server: &mut ServerCtx<'_>,
    ) -> Result<PhaseEnd, EngineError> {
        if ctx.phase == 0 {
            self.aggregate_basis(ctx, replies)?;
            return Ok(PhaseEnd::NextPhase);
        }
        self.pending(ctx)?;
        if ctx.phase < self.last_phase() {
            self.aggregate_core_gradients(replies)?;
            return Ok(PhaseEnd::NextPhase);
        }
        self.aggregate_core(ctx, replies)?;
        Ok(PhaseEnd::RoundComplete)
    }

    fn eval_models(&self) -> Vec<EvalModel> {
        vec![EvalModel {
            label: "global".into(),
            spec: self.spec.clone(),
            view: View::full(),
            params: self.params.clone(),
            devices: None,
            readout: flotilla_engine::Readout::Classifier,
        }]
    }

    fn round_metrics(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        if self.layers.is_empty() {
            return m;
        }
        let mut sum = 0usize;
        for l in &self.layers {
            let r = self.spec.ranks[&l.name];
            sum += r;
            m.insert(format!("rank/{}", l.name), r.into());
            if let Some(a) = self.augmented.get(&l.name) {
                m.insert(format!("augmented_rank/{}", l.name), (*a).into());
            }
        }
        m.insert(
            "rank_mean".into(),
            (sum as f64 / self.layers.len() as f64).into(),
        );
        // methods.md §4.8: c.r. = 1 − #params(low-rank) / #params(dense).
        let dense: usize = self.layers.iter().map(|l| l.inp * l.out).sum();
        let factored: usize = self
            .layers
            .iter()
            .map(|l| {
                let r = self.spec.ranks[&l.name];
                (l.inp + l.out) * r + r * r
            })
            .sum();
        m.insert(
            "compression".into(),
            (1.0 - factored as f64 / dense as f64).into(),
        );
        m
    }

    fn snapshot(&self) -> MethodState {
        MethodState {
            params: BTreeMap::from([("global".to_string(), self.params.clone())]),
            json: serde_json::json!({ "ranks": self.spec.ranks }),
        }
    }

    fn restore(&mut self, state: MethodState) -> Result<(), EngineError> {
        let ranks: BTreeMap<String, usize> = serde_json::from_value(state.json["ranks"].clone())
            .map_err(|e| EngineError::Method(format!("checkpoint ranks: {e}")))?;
        if ranks.keys().ne(self.spec.ranks.keys()) {
            return Err(EngineError::Method(format!(
                "the checkpoint factors layers {:?}, the config {:?}",
                ranks.keys().collect::<Vec<_>>(),
                self.spec.ranks.keys().collect::<Vec<_>>()
            )));
        }
        let mut spec = self.spec.clone();
        spec.ranks = ranks;
        spec.validate()?;
        let global = state
            .params
            .get("global")
            .ok_or_else(|| EngineError::Method("checkpoint lacks the global model".into()))?;
        self.layout(&spec.ranks)?.check_same_layout(global)?;
        self.spec = spec;
        self.params = global.clone();
        self.pending = None;
        Ok(())
    }
}

fn describe(list: &[(&str, &[usize])]) -> String {
    const SHOWN: usize = 6;
    let mut s: Vec<String> = list
        .iter()
        .take(SHOWN)
        .map(|(n, sh)| format!("{n} {sh:?}"))
        .collect();
    if list.len() > SHOWN {
        s.push(format!("… {} more", list.len() - SHOWN));
    }
    s.join(", ")
}

/// The tensors, with shapes, that the reply to `task` must hold, in order.
fn expected_reply(task: &Task) -> Result<Vec<(String, Vec<usize>)>, EngineError> {
    let opts: LrtTask = serde_json::from_value(task.options.clone())
        .map_err(|e| EngineError::Task(format!("fedlrt task options: {e}")))?;
    let (_, params, _) = assemble(task)?;
    let shape = |n: &str| -> Result<(String, Vec<usize>), EngineError> {
        Ok((n.to_string(), params.require(n)?.shape.clone()))
    };
    match task.kind.as_str() {
        BASIS | CORE_GRADIENTS => opts.upload.iter().map(|n| shape(n)).collect(),
        TRAIN_CORE => params
            .iter()
            .filter(|t| !task.view.is_frozen(&t.name))
            .map(|t| shape(&t.name))
            .collect(),
        other => Err(EngineError::Task(format!(
            "unknown fedlrt task kind `{other}`"
        ))),
    }
}

/// The model a client builds from a task: for each factored layer of `task.model` whose U
/// and V arrive with new directions, Ũ = [U | U_new], Ṽ = [V | V_new] and S̃⁰ = [[S, 0],
/// [0, 0]]; the corrections `vc.<tensor>` become a correction set (an r × r S correction is
/// the top-left block of the augmented one). Returns (spec, params, correction).
fn assemble(task: &Task) -> Result<(ModelSpec, ParamSet, ParamSet), EngineError> {
    let spec = task.model.clone();
    let p = &task.params;
    let mut params = Vec::with_capacity(p.len());
    let mut correction = Vec::new();
    for t in p.iter() {
        if let Some(target) = t.name.strip_prefix(CORRECTION_PREFIX) {
            correction.push(Tensor {
                name: target.to_string(),
                ..t.clone()
            });
            continue;
        }
        let Some((layer, leaf)) = t.name.rsplit_once('.') else {
            params.push(t.clone());
            continue;
        };
        let Some(a) = spec.rank_of(layer) else {
            params.push(t.clone());
            continue;
        };
        match leaf {
            "U" | "V" => {
                let extra = format!("{layer}.{}", if leaf == "U" { NEW_U } else { NEW_V });
                let base = matrix_checked(t)?;
                let full = match p.get(&extra) {
                    Some(n) => hcat(&base, &matrix_checked(n)?),
                    None => base,
                };
                if full.ncols() != a {
                    return Err(EngineError::Task(format!(
                        "`{}` has {} columns with its new directions, the model's rank is {a}",
                        t.name,
                        full.ncols()
                    )));
                }
                params.push(tensor(&t.name, &full));
            }
            "S" => params.push(embed(t, a)?),
            NEW_U | NEW_V => {}
            _ => params.push(t.clone()),
        }
    }
    let correction = correction
        .into_iter()
        .map(|t| match t.name.rsplit_once('.') {
            Some((layer, "S")) => match spec.rank_of(layer) {
                Some(a) => embed(&t, a),
                None => Ok(t),
            },
            _ => Ok(t),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((
        spec,
        ParamSet::from_tensors(params)?,
        ParamSet::from_tensors(correction)?,
    ))
}

fn matrix_checked(t: &Tensor) -> Result<DMatrix<f64>, EngineError> {
    if t.shape.len() != 2 {
        return Err(EngineError::Task(format!(
            "`{}` must be a matrix, it has shape {:?}",
            t.name, t.shape
        )));
    }
    Ok(matrix(t))
}

/// An `r × r` matrix as the top-left block of an `a × a` zero matrix.
fn embed(t: &Tensor, a: usize) -> Result<Tensor, EngineError> {
    let r = match t.shape.as_slice() {
        [r, c] if r == c && *r <= a => *r,
        _ => {
            return Err(EngineError::Task(format!(
                "`{}` has shape {:?}; a core of rank {a} needs a square matrix of at most {a} × {a}",
                t.name, t.shape
            )));
        }
    };
    let mut data = vec![0f32; a * a];
    for i in 0..r {
        data[i * a..i * a + r].copy_from_slice(&t.data[i * r..(i + 1) * r]);
    }
    Ok(Tensor {
        name: t.name.clone(),
        shape: vec![a, a],
        data,
    })
}

/// The client half of FeDLRT and FedLin: gradient passes and core training.
pub struct FedLrtClient;

impl ClientHalf for FedLrtClient {
    fn execute(
        &self,
        task: &Task,
        data: &ClientData,
        ctx: &ClientCtx,
    ) -> Result<Reply, EngineError> {
        require_kind(task, &[BASIS, CORE_GRADIENTS, TRAIN_CORE], "fedlrt")?;
        let opts: LrtTask = serde_json::from_value(task.options.clone())
            .map_err(|e| EngineError::Task(format!("fedlrt task options: {e}")))?;
        if opts.grad_batches == 0 || opts.steps == Some(0) {
            return Err(EngineError::Task(
                "fedlrt task options: grad_batches and steps must be positive".into(),
            ));
        }
        let (model, params, correction) = assemble(task)?;
        let local = Task {
            model,
            params,
            ..task.clone()
        };
        let ce = || Ok(CrossEntropy::under(&task.view));
        if task.kind == TRAIN_CORE {
            let correction = (!correction.is_empty()).then_some(&correction);
            return train_task_with(&local, data, ctx, ce, correction, opts.steps);
        }
        gradient_task(&local, data, ctx, ce, opts.grad_batches, &opts.upload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_models::dense_export;

    fn config(method: &str) -> Experiment {
        Experiment::from_toml(&format!(
            r#"
rounds = 1
[data]
dataset = "fashion-mnist"
num_clients = 2
partition = {{ kind = "iid" }}
[model]
arch = "mlp"
hidden = [40, 24]
[training]
epochs = 1
batch_size = 8
optimizer = "sgd"
lr = 0.1
[sampling]
clients_per_round = 2
[method]
{method}
"#
        ))
        .unwrap()
    }

    fn server(method: &str) -> FedLrt {
        let exp = config(method);
        FedLrt::from_config(&exp, exp.model_spec()).unwrap()
    }

    fn ctx(phase: u32) -> PhaseCtx {
        PhaseCtx {
            round: 1,
            phase,
            seed: 0,
        }
    }

    fn clients(n: u64) -> Vec<ClientInfo> {
        (0..n)
            .map(|id| ClientInfo {
                id,
                profile: flotilla_core::device::DeviceProfile::unlimited(),
                num_examples: 10,
            })
            .collect()
    }

    /// Deterministic pseudo-random values in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn run(a: Assignment) -> Task {
        match a {
            Assignment::Run(t) => *t,
            Assignment::Skip(r) => panic!("skipped: {r}"),
        }
    }

    /// A reply to `task` with noise of the expected shapes.
    fn noisy_reply(task: &Task, seed: u64) -> Reply {
        let tensors = expected_reply(task)
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let n = shape.iter().product();
                Tensor {
                    name,
                    shape,
                    data: noise(n, seed * 100 + i as u64),
                }
            })
            .collect();
        Reply {
            round: task.round,
            phase: task.phase,
            client: task.client,
            num_examples: 10,
            params: ParamSet::from_tensors(tensors).unwrap(),
            metrics: Default::default(),
            resources: Default::default(),
        }
    }

    fn max_abs(a: &ParamSet, b: &ParamSet) -> f32 {
        a.max_abs_diff(b).unwrap()
    }

    /// Phase 0 with random gradients from `n` clients; returns the server and the phase-1 task
    /// of client 0.
    fn augmented(method: &str, n: u64) -> (FedLrt, Task) {
        let mut s = server(method);
        let tasks: Vec<Task> = s
            .plan(&ctx(0), &clients(n))
            .unwrap()
            .into_iter()
            .map(run)
            .collect();
        let replies: Vec<Reply> = tasks.iter().map(|t| noisy_reply(t, t.client + 1)).collect();
        for (t, r) in tasks.iter().zip(&replies) {
            s.check_reply(t, r).unwrap();
        }
        let end = s
            .aggregate(&ctx(0), &replies, &mut ServerCtx::default())
            .unwrap();
        assert_eq!(end, PhaseEnd::NextPhase);
        let task = run(s.plan(&ctx(1), &clients(n)).unwrap().remove(0));
        (s, task)
    }

    #[test]
    fn augmentation_keeps_the_model_and_the_bases_orthonormal() {
        let (s, task) = augmented("name = \"fedlrt\"\nr0 = 4", 2);
        let (spec, params, _) = assemble(&task).unwrap();
        assert_eq!(spec.ranks["layers.0"], 8, "k = r new directions");
        assert_eq!(spec.ranks["layers.1"], 8);
        // Ũ S̃⁰ Ṽᵀ = U S Vᵀ: both multiplied out to the dense model.
        let before = dense_export(s.spec(), s.params()).unwrap();
        let after = dense_export(&spec, &params).unwrap();
        assert!(
            max_abs(&before, &after) < 1e-5,
            "{}",
            max_abs(&before, &after)
        );
        for name in ["layers.0.U", "layers.0.V", "layers.1.U", "layers.1.V"] {
            let m = matrix(params.require(name).unwrap());
            let err = (m.transpose() * &m - DMatrix::identity(m.ncols(), m.ncols())).amax();
            assert!(err < 1e-5, "{name}: ‖ŨᵀŨ − I‖ = {err}");
            // U is kept verbatim as the first block.
            let old = s.params().require(name).unwrap();
            let r = old.shape[1];
            let t = params.require(name).unwrap();
            for row in 0..old.shape[0] {
                assert_eq!(
                    &t.data[row * t.shape[1]..row * t.shape[1] + r],
                    &old.data[row * r..(row + 1) * r]
                );
            }
        }
    }

    #[test]
    fn tau_zero_keeps_the_augmented_rank_and_the_averaged_core() {
        let (mut s, task) = augmented("name = \"fedlrt\"\nr0 = 4\ntau = 0.0", 1);
        let reply = noisy_reply(&task, 9);
        s.check_reply(&task, &reply).unwrap();
        let (spec, mut params, _) = assemble(&task).unwrap();
        params.overwrite_with(&reply.params).unwrap();
        let expected = dense_export(&spec, &params).unwrap();
        let end = s
            .aggregate(&ctx(1), &[reply], &mut ServerCtx::default())
            .unwrap();
        assert_eq!(end, PhaseEnd::RoundComplete);
        assert_eq!(s.spec().ranks, spec.ranks, "τ = 0 truncates nothing");
        let got = dense_export(s.spec(), s.params()).unwrap();
        assert!(
            max_abs(&expected, &got) < 1e-5,
            "{}",
            max_abs(&expected, &got)
        );
        let m = s.round_metrics();
        assert_eq!(m["rank/layers.0"], 8);
        assert_eq!(m["rank_mean"], 8.0);
    }

    #[test]
    fn truncation_keeps_the_smallest_rank_within_tolerance_and_bounds() {
        let u = DMatrix::<f64>::identity(10, 4);
        let v = DMatrix::<f64>::identity(8, 4);
        let s = DMatrix::from_diagonal(&nalgebra::DVector::from_vec(vec![10.0, 1.0, 0.1, 0.01]));
        // ‖(0.1, 0.01)‖ ≈ 0.1005 < 0.02·‖σ‖ ≈ 0.201; ‖(1, 0.1, 0.01)‖ > 0.201.
        let (nu, ns, nv) = truncate(&u, &s, &v, 0.02, 1, 4);
        assert_eq!((nu.ncols(), ns.nrows(), nv.ncols()), (2, 2, 2));
        assert!((ns[(0, 0)].abs() - 10.0).abs() < 1e-12 && (ns[(1, 1)].abs() - 1.0).abs() < 1e-12);
        assert_eq!(truncate(&u, &s, &v, 0.02, 3, 4).1.nrows(), 3, "r_min");
        assert_eq!(truncate(&u, &s, &v, 0.0, 1, 3).1.nrows(), 3, "r_max");
        assert_eq!(truncate(&u, &s, &v, 0.5, 1, 4).1.nrows(), 1);
    }

    #[test]
    fn gradients_inside_the_basis_add_no_direction() {
        let u = DMatrix::<f64>::identity(6, 2);
        let mut g = DMatrix::<f64>::zeros(6, 2);
        g[(0, 0)] = 3.0;
        g[(1, 1)] = -2.0;
        assert_eq!(new_directions(&u, &g).ncols(), 0);
        g[(4, 0)] = 1.0;
        let d = new_directions(&u, &g);
        assert_eq!(d.ncols(), 1, "one direction outside span(U)");
        assert!((d[(4, 0)].abs() - 1.0).abs() < 1e-12);
        assert_eq!(new_directions(&u, &DMatrix::zeros(6, 2)).ncols(), 0);
    }

    #[test]
    fn with_one_client_the_full_correction_is_exactly_zero() {
        let (mut s, task) = augmented("name = \"fedlrt\"\nr0 = 4\nvc = \"full\"", 1);
        assert_eq!(task.kind, CORE_GRADIENTS);
        let reply = noisy_reply(&task, 5);
        s.aggregate(&ctx(1), &[reply], &mut ServerCtx::default())
            .unwrap();
        let train = run(s.plan(&ctx(2), &clients(1)).unwrap().remove(0));
        assert_eq!(train.kind, TRAIN_CORE);
        let (_, _, correction) = assemble(&train).unwrap();
        // S̃ of both layers and every dense tensor.
        assert_eq!(correction.len(), 2 + 4);
        assert!(correction.iter().all(|t| t.data.iter().all(|v| *v == 0.0)));
    }

    #[test]
    fn corrections_sum_to_zero_over_clients() {
        let (s, _) = augmented("name = \"fedlrt\"\nr0 = 4", 3);
        let p = s.pending.as_ref().unwrap();
        assert_eq!(p.corrections.len(), 3);
        for t in p.corrections[&0].iter() {
            assert!(t.name.starts_with(CORRECTION_PREFIX));
            let sum: Vec<f32> = (0..t.numel())
                .map(|i| {
                    p.corrections
                        .values()
                        .map(|c| c.get(&t.name).unwrap().data[i])
                        .sum()
                })
                .collect();
            assert!(sum.iter().all(|v| v.abs() < 1e-5), "{}: {sum:?}", t.name);
        }
        // simplified: the old-basis block only (r × r), embedded by the client.
        assert_eq!(
            p.corrections[&0].get("vc.layers.0.S").unwrap().shape,
            [4, 4]
        );
    }

    #[test]
    fn replies_must_hold_exactly_what_the_task_asks() {
        let (s, task) = augmented("name = \"fedlrt\"\nr0 = 4", 1);
        let good = noisy_reply(&task, 1);
        s.check_reply(&task, &good).unwrap();
        let mut short = good.clone();
        short.params = good.params.filter(|n| n != "layers.0.S");
        assert!(
            s.check_reply(&task, &short)
                .unwrap_err()
                .contains("exactly")
        );
        let mut big = good.clone();
        big.params.get_mut("layers.0.S").unwrap().shape = vec![4, 16];
        assert!(s.check_reply(&task, &big).is_err());
    }

    #[test]
    fn the_layout_matches_the_models_export() {
        let mut s = server("name = \"fedlrt\"\nr0 = 4");
        for ranks in [[4, 4], [7, 2], [20, 12]] {
            s.spec.ranks = BTreeMap::from([
                ("layers.0".to_string(), ranks[0]),
                ("layers.1".to_string(), ranks[1]),
            ]);
            let model = Net::init_params(&s.spec, 1).unwrap();
            model
                .check_same_layout(&s.layout(&s.spec.ranks).unwrap())
                .unwrap();
        }
    }

    #[test]
    fn config_errors_name_the_key() {
        let exp = |m: &str| config(m);
        let err = |m: &str| {
            let e = exp(m);
            FedLrt::from_config(&e, e.model_spec())
                .err()
                .unwrap()
                .to_string()
        };
        assert!(err("name = \"fedlrt\"\nlayers = [\"conv9\"]").contains("method.layers"));
        assert!(err("name = \"fedlrt\"\nlayers = []").contains("fedlin"));
        assert!(err("name = \"fedlrt\"\nr_min = 5\nr_max = 4").contains("method.r_max"));
        assert!(err("name = \"fedlrt\"\ntau = 1.5").contains("method.tau"));
        assert!(err("name = \"fedlrt\"\ns_star = 0").contains("method.s_star"));
        assert!(err("name = \"fedlrt\"\nrank = 3").contains("rank"));
        assert!(err("name = \"fedlin\"\ntau = 0.1").contains("method.tau"));
        // r0 is clamped to each layer's bound min(in, out)/2: 20 and 12 here.
        let s = server("name = \"fedlrt\"\nr0 = 100");
        assert_eq!(s.spec().ranks["layers.0"], 20);
        assert_eq!(s.spec().ranks["layers.1"], 12);
    }
}
