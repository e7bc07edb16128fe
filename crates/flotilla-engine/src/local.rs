//! Local training and evaluation on burn's `flex` backend.

use crate::EngineError;
use crate::alloc::ThreadPeak;
use crate::method::{ClientCtx, ClientData, Reply, Resources, Task};
use crate::sgd::FusedSgd;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use flotilla_core::{ParamSet, seed};
use flotilla_data::Dataset;
use flotilla_models::memory::{self, MemoryEstimate, OptimizerState};
use flotilla_models::{ModelSpec, Net, View, compute_device, flops, training_device};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// Which optimizer a client uses.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// SGD with optional momentum (PyTorch semantics: no dampening) and L2 weight decay.
    Sgd,
    /// Adam (β = 0.9, 0.999, ε = 1e-8) with optional L2 weight decay.
    Adam,
}

/// A local training recipe.
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
    /// FedProx proximal coefficient μ: adds (μ/2)‖w − w_global‖² to the loss (0 = off).
    #[serde(default)]
    pub prox_mu: f64,
}

impl Recipe {
    /// The optimizer state this recipe keeps per trainable parameter.
    pub fn optimizer_state(&self) -> OptimizerState {
        match self.optimizer {
            OptimizerKind::Sgd if self.momentum > 0.0 => OptimizerState::Momentum,
            OptimizerKind::Sgd => OptimizerState::None,
            OptimizerKind::Adam => OptimizerState::Adam,
        }
    }

    fn build_optimizer(&self) -> Optim {
        if self.optimizer == OptimizerKind::Sgd {
            return Optim::Fused(FusedSgd::new(self.lr, self.momentum, self.weight_decay));
        }
        let decay =
            (self.weight_decay > 0.0).then(|| WeightDecayConfig::new(self.weight_decay as f32));
        Optim::Burn(
            AdamConfig::new()
                .with_epsilon(1e-8)
                .with_weight_decay(decay)
                .init(),
        )
    }
}

/// The optimizer of a local training run.
enum Optim {
    /// SGD, fused and in place (crate::sgd).
    Fused(FusedSgd),
    /// burn's optimizer (Adam).
    Burn(ModuleOptimizer),
}

impl Optim {
    /// One step with the sum of the micro-batch gradients `parts`, masked.
    fn step(
        &mut self,
        lr: f64,
        model: Net,
        mut parts: Vec<GradientsParams>,
        masks: &GradMasks,
    ) -> Net {
        match self {
            Optim::Fused(sgd) => sgd.step(model, &mut parts, &masks.values),
            Optim::Burn(optim) => {
                let mut grads = sum_grads(&model, parts);
                masks.apply(&mut grads);
                optim.step(lr, model, grads)
            }
        }
    }
}

/// The sum of the micro-batch gradients of one step.
fn sum_grads(model: &Net, mut parts: Vec<GradientsParams>) -> GradientsParams {
    if parts.len() == 1 {
        return parts.pop().unwrap_or_default();
    }
    let mut sum = GradientsParams::new();
    for (_, id, rank) in model.param_ids() {
        fn add<const D: usize>(
            sum: &mut GradientsParams,
            parts: &mut [GradientsParams],
            id: burn::module::ParamId,
        ) {
            let total = parts
                .iter_mut()
                .filter_map(|g| g.remove::<D>(id))
                .reduce(|a, b| a + b);
            if let Some(total) = total {
                sum.register(id, total);
            }
        }
        match rank {
            1 => add::<1>(&mut sum, &mut parts, id),
            2 => add::<2>(&mut sum, &mut parts, id),
            3 => add::<3>(&mut sum, &mut parts, id),
            _ => add::<4>(&mut sum, &mut parts, id),
        }
    }
    sum
}

/// Which output of the network the auto-distillation term compares (methods.md §3.8.2: the
/// paper says "final activation layer").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DistillOn {
    /// The classifier's logits.
    #[default]
    Logits,
    /// The class probabilities (softmax of the logits): bounded, so the term cannot dominate
    /// the cross-entropy when shallow and deep logits differ in scale.
    Softmax,
}

/// What local training minimises.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", deny_unknown_fields)]
pub enum Objective {
    /// Cross-entropy of the model under the task's view (plus FedProx's term when set).
    CrossEntropy,
    /// FlexTrain on a device (Algorithm 2): the cross-entropy of the depth-`depth` prefix
    /// plus β·‖f_student − sg(f_depth)‖², where the device's own depth is the detached teacher
    /// of the shallower `student` prefix (f = logits, squared L2 norm summed over classes and
    /// averaged over the batch). No student: plain cross-entropy of the prefix.
    DeviceDepth {
        /// The device's depth: the view must be the trainable prefix of this depth.
        depth: usize,
        /// The shallower prefix pulled toward the device's depth.
        student: Option<usize>,
        /// Distillation weight β.
        beta: f64,
        /// Output compared by the distillation term.
        #[serde(default)]
        on: DistillOn,
    },
    /// Centralized FlexTrain (Algorithm 1): for every mini-batch a depth k is drawn from `pi`
    /// (entry k = probability of the depth-k prefix, k = 0..=K), and the step minimises the
    /// cross-entropy of prefix k plus β·‖f_k − sg(f_{k+1})‖² (no extra term at k = K).
    /// Blocks deeper than k get no update in that step.
    SampledDepth {
        /// Depth distribution π over 0..=K.
        pi: Vec<f64>,
        /// Distillation weight β.
        beta: f64,
        /// Output compared by the distillation term.
        #[serde(default)]
        on: DistillOn,
    },
}

/// Result of local training.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// Trained parameters (all tensors of the model).
    pub params: ParamSet,
    /// Mean training loss over all steps.
    pub mean_loss: f64,
    /// Samples processed (epochs × examples).
    pub samples: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Steps per trained depth, for the depth objectives (empty for cross-entropy).
    pub depth_steps: BTreeMap<usize, usize>,
}

/// Counts trainable and total parameters of `params` under `view`.
pub fn param_counts(params: &ParamSet, view: &View) -> (usize, usize) {
    let total = params.numel();
    let trainable = params
        .iter()
        .filter(|t| !view.is_frozen(&t.name))
        .map(|t| t.numel())
        .sum();
    (total, trainable)
}

/// The analytic memory estimate of training `params` of `spec` under `view` with `recipe`.
pub fn estimate_memory(
    spec: &ModelSpec,
    view: &View,
    params: &ParamSet,
    recipe: &Recipe,
) -> MemoryEstimate {
    let (total, trainable) = param_counts(params, view);
    memory::estimate(
        spec,
        view,
        recipe.batch_size,
        total,
        trainable,
        recipe.optimizer_state(),
    )
}

/// Flattened parameter values, for the proximal term.
struct Flatten(Vec<Tensor<1>>);

impl ModuleVisitor for Flatten {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        let n = t.shape().num_elements();
        self.0.push(t.reshape([n]));
    }
}

fn one_hot(labels: &[u8], classes: usize, device: &Device) -> Tensor<2> {
    let mut v = vec![0f32; labels.len() * classes];
    for (i, l) in labels.iter().enumerate() {
        v[i * classes + *l as usize] = 1.0;
    }
    Tensor::from_data(TensorData::new(v, [labels.len(), classes]), device)
}

fn check_shape(spec: &ModelSpec, data: &Dataset) -> Result<(), EngineError> {
    if data.shape != spec.input || data.num_classes > spec.classes {
        return Err(EngineError::Task(format!(
            "the data holds {:?} images of {} classes but the model takes {:?} inputs and {} classes",
            data.shape, data.num_classes, spec.input, spec.classes
        )));
    }
    Ok(())
}

/// The normalised input tensor and the labels of the samples `idx`; `pixels` is a reusable
/// buffer.
fn batch_input(
    data: &Dataset,
    idx: &[usize],
    mean: &[f32],
    std: &[f32],
    pixels: &mut Vec<f32>,
    device: &Device,
) -> Result<(Tensor<4>, Vec<u8>), EngineError> {
    data.try_normalized_batch(idx, mean, std, pixels)?;
    let labels = idx.iter().map(|&i| data.labels[i]).collect();
    let x = Net::input(std::mem::take(pixels), idx.len(), data.shape, device);
    Ok((x, labels))
}

/// Mean cross-entropy of logits against labels.
fn cross_entropy(logits: Tensor<2>, labels: &[u8], classes: usize, device: &Device) -> Tensor<1> {
    let n = labels.len() as f32;
    (log_softmax(logits, 1) * one_hot(labels, classes, device))
        .sum()
        .neg()
        / n
}

/// Binary masks enforced during local training, by tensor name (positions in PyTorch layout).
pub type TrainMasks = std::collections::HashMap<String, flotilla_core::wire::Mask>;

/// Gradient masks in burn's layout, ready to multiply gradients with: as tensors (for burn's
/// optimizers) and as values (for the fused SGD).
struct GradMasks {
    tensors: Vec<(burn::module::ParamId, usize, Tensor<1>)>,
    values: HashMap<burn::module::ParamId, Vec<f32>>,
}

impl GradMasks {
    fn new(
        model: &Net,
        params: &ParamSet,
        masks: &TrainMasks,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let mut out = Vec::new();
        let mut by_id = HashMap::new();
        for (name, id, rank) in model.param_ids() {
            let Some(mask) = masks.get(&name) else {
                continue;
            };
            let t = params.require(&name)?;
            if mask.active.len() != t.numel() {
                return Err(EngineError::Task(format!(
                    "mask `{name}` has {} positions, the tensor {}",
                    mask.active.len(),
                    t.numel()
                )));
            }
            let mut values: Vec<f32> = mask
                .active
                .iter()
                .map(|a| if *a { 1.0 } else { 0.0 })
                .collect();
            // Linear weights live transposed in the model ([in, out]).
            if rank == 2 {
                let (r, c) = (t.shape[0], t.shape[1]);
                let mut tr = vec![0f32; values.len()];
                for i in 0..r {
                    for j in 0..c {
                        tr[j * r + i] = values[i * c + j];
                    }
                }
                values = tr;
            }
            let n = values.len();
            out.push((
                id,
                rank,
                Tensor::from_data(
                    TensorData::new(values.clone(), [n]),
                    &device.clone().inner(),
                ),
            ));
            by_id.insert(id, values);
        }
        Ok(Self {
            tensors: out,
            values: by_id,
        })
    }

    /// Zeroes the gradients of masked positions. The received values are zero there, so with
    /// zero gradients (and so zero momentum and Adam moments) they stay exactly zero.
    fn apply(&self, grads: &mut GradientsParams) {
        fn one<const D: usize>(
            grads: &mut GradientsParams,
            id: burn::module::ParamId,
            mask: &Tensor<1>,
        ) {
            if let Some(g) = grads.remove::<D>(id) {
                let dims = g.dims();
                grads.register(id, g * mask.clone().reshape(dims));
            }
        }
        for (id, rank, mask) in &self.tensors {
            match rank {
                1 => one::<1>(grads, *id, mask),
                2 => one::<2>(grads, *id, mask),
                3 => one::<3>(grads, *id, mask),
                _ => one::<4>(grads, *id, mask),
            }
        }
    }
}

/// Trains `params` of `spec` under `view` on `data` for the recipe's epochs. Shuffling
/// derives from `shuffle_seed`. With `recipe.prox_mu > 0`, `params` is the proximal anchor.
pub fn train(
    spec: &ModelSpec,
    view: &View,
    params: &ParamSet,
    data: &ClientData,
    recipe: &Recipe,
    shuffle_seed: u64,
) -> Result<TrainOutcome, EngineError> {
    train_masked(
        spec,
        view,
        params,
        data,
        recipe,
        shuffle_seed,
        &TrainMasks::new(),
    )
}

/// [`train`] with masked positions held at exactly zero through every optimizer step.
pub fn train_masked(
    spec: &ModelSpec,
    view: &View,
    params: &ParamSet,
    data: &ClientData,
    recipe: &Recipe,
    shuffle_seed: u64,
    masks: &TrainMasks,
) -> Result<TrainOutcome, EngineError> {
    train_with(
        spec,
        view,
        params,
        data,
        recipe,
        shuffle_seed,
        masks,
        &Objective::CrossEntropy,
    )
}

/// Checks a depth objective against the model and view.
fn check_objective(
    spec: &ModelSpec,
    view: &View,
    objective: &Objective,
) -> Result<(), EngineError> {
    let total = spec.num_blocks();
    let bad = |m: String| Err(EngineError::Task(m));
    if let Objective::DeviceDepth { beta, .. } | Objective::SampledDepth { beta, .. } = objective
        && !(beta.is_finite() && *beta >= 0.0)
    {
        return bad(format!("beta must be a non-negative number, got {beta}"));
    }
    match objective {
        Objective::CrossEntropy => Ok(()),
        _ if total == 0 => bad("depth objectives need a model with blocks (resnet or vit)".into()),
        Objective::DeviceDepth { depth, student, .. } => {
            if view.prefix_depth(total) != Some(*depth) {
                return bad(format!(
                    "the view must be the depth-{depth} prefix of the {total} blocks"
                ));
            }
            if student.is_some_and(|s| s >= *depth) {
                return bad(format!(
                    "the student depth must be below the device depth {depth}"
                ));
            }
            Ok(())
        }
        Objective::SampledDepth { pi, .. } => {
            if pi.len() != total + 1 {
                return bad(format!(
                    "pi must give a probability for every depth 0..={total} ({} entries), got {}",
                    total + 1,
                    pi.len()
                ));
            }
            let sum: f64 = pi.iter().sum();
            if pi.iter().any(|p| !(p.is_finite() && *p >= 0.0)) || (sum - 1.0).abs() > 1e-6 {
                return bad(format!("pi must be probabilities summing to 1, got {pi:?}"));
            }
            if view != &View::full() {
                return bad("sampled-depth training runs on the full model view".into());
            }
            Ok(())
        }
    }
}

/// β·‖student − sg(teacher)‖²: squared L2 distance summed over classes, averaged over the batch;
/// the teacher is detached, so no gradient reaches its deeper blocks.
fn distillation(student: Tensor<2>, teacher: Tensor<2>, beta: f64, on: DistillOn) -> Tensor<1> {
    let b = student.dims()[0] as f32;
    let teacher = teacher.detach();
    let diff = match on {
        DistillOn::Logits => student - teacher,
        DistillOn::Softmax => softmax(student, 1) - softmax(teacher, 1),
    };
    diff.square().sum() * (beta as f32 / b)
}

/// Logits of a shallower and a deeper prefix, from one pass over their shared blocks.
fn prefix_pair(
    model: &Net,
    x: Tensor<4>,
    shallow: usize,
    deep: usize,
) -> Result<(Tensor<2>, Tensor<2>), EngineError> {
    match <[Tensor<2>; 2]>::try_from(model.forward_depths(x, &[shallow, deep])?) {
        Ok([s, d]) => Ok((s, d)),
        Err(_) => Err(EngineError::Task(
            "expected the logits of two prefixes".into(),
        )),
    }
}

/// The smallest micro-batch worth its own thread: below it, forking the model and summing
/// gradients cost more than the split saves.
const MIN_MICRO_BATCH: usize = 4;

/// What one training step needs besides the model and the batch.
struct StepInput<'a> {
    data: &'a ClientData,
    objective: &'a Objective,
    view: &'a View,
    /// The depth of this step (the device's, or the one drawn for the step).
    depth: Option<usize>,
    classes: usize,
    total_blocks: usize,
    device: &'a Device,
}

impl StepInput<'_> {
    /// The objective's loss on one batch: a mean over its samples.
    fn loss(&self, model: &Net, x: Tensor<4>, labels: &[u8]) -> Result<Tensor<1>, EngineError> {
        let (classes, device) = (self.classes, self.device);
        Ok(match (self.objective, self.depth) {
            (
                Objective::DeviceDepth {
                    student: Some(s),
                    beta,
                    on,
                    ..
                },
                Some(depth),
            ) if *beta > 0.0 => {
                let (student, teacher) = prefix_pair(model, x, *s, depth)?;
                cross_entropy(teacher.clone(), labels, classes, device)
                    + distillation(student, teacher, *beta, *on)
            }
            (Objective::SampledDepth { beta, on, .. }, Some(k)) => {
                if k < self.total_blocks && *beta > 0.0 {
                    let (student, teacher) = prefix_pair(model, x, k, k + 1)?;
                    cross_entropy(student.clone(), labels, classes, device)
                        + distillation(student, teacher, *beta, *on)
                } else {
                    let logits = model.forward(x, &View::depth_prefix(k, self.total_blocks));
                    cross_entropy(logits, labels, classes, device)
                }
            }
            _ => cross_entropy(model.forward(x, self.view), labels, classes, device),
        })
    }
}

/// How many micro-batches a step of `batch` samples runs as on `threads` threads: one per
/// thread, none smaller than [`MIN_MICRO_BATCH`].
fn micro_batch_count(threads: usize, batch: usize) -> usize {
    threads.min(batch / MIN_MICRO_BATCH).max(1)
}

/// Mean loss and per-micro-batch gradients of one step run as `parts` micro-batches at once.
///
/// Every micro-batch runs forward and backward on its own fork of the model (separate autodiff
/// graphs) with the kernels kept on its thread ([`flotilla_models::kernels::serial`]), and
/// the optimizer sums the micro-batch gradients. Every loss here is a mean over samples and
/// no layer mixes samples (group and layer norms only), so each micro-batch's loss weighted by
/// its share of the batch gives the whole batch's loss and gradients, up to the order of
/// float sums. This keeps every op of the step busy on all threads, where splitting each op
/// across the threads left the cheap, serial ones (activations, losses, bookkeeping) on one.
fn micro_batch_grads(
    model: &Net,
    batch: &[usize],
    parts: usize,
    step: &StepInput,
) -> Result<(f64, Vec<GradientsParams>), EngineError> {
    use rayon::prelude::*;
    let total = batch.len() as f32;
    let chunks: Vec<&[usize]> = batch.chunks(batch.len().div_ceil(parts)).collect();
    // Memory the micro-batches allocate counts in the client's measurement.
    let scope = crate::alloc::Scope::current();
    let results: Vec<Result<(f64, GradientsParams), EngineError>> = chunks
        .par_iter()
        .map(|idx| {
            scope.enter(|| {
                flotilla_models::kernels::serial(|| {
                    let fork = model.fork();
                    let (x, labels) = batch_input(
                        &step.data.train,
                        idx,
                        &step.data.mean,
                        &step.data.std,
                        &mut Vec::new(),
                        step.device,
                    )?;
                    let loss = step.loss(&fork, x, &labels)? * (idx.len() as f32 / total);
                    let value = f64::from(loss.clone().into_scalar::<f32>());
                    Ok((value, GradientsParams::from_grads(loss.backward(), &fork)))
                })
            })
        })
        .collect();
    let mut loss = 0.0;
    let mut grads = Vec::with_capacity(results.len());
    for r in results {
        let (l, g) = r?;
        loss += l;
        grads.push(g);
    }
    Ok((loss, grads))
}

/// Draws a depth from π.
fn draw_depth(pi: &[f64], rng: &mut impl rand::Rng) -> usize {
    let u: f64 = rng.random();
    let mut acc = 0.0;
    for (k, p) in pi.iter().enumerate() {
        acc += p;
        if u < acc {
            return k;
        }
    }
    // Rounding left u above the running sum: the deepest depth with mass.
    pi.iter().rposition(|p| *p > 0.0).unwrap_or(pi.len() - 1)
}

/// Local training with any [`Objective`]; masked positions stay at exactly zero.
#[allow(clippy::too_many_arguments)]
pub fn train_with(
    spec: &ModelSpec,
    view: &View,
    params: &ParamSet,
    data: &ClientData,
    recipe: &Recipe,
    shuffle_seed: u64,
    masks: &TrainMasks,
    objective: &Objective,
) -> Result<TrainOutcome, EngineError> {
    check_objective(spec, view, objective)?;
    if data.train.is_empty() {
        return Err(EngineError::Task(
            "the client holds no training data".into(),
        ));
    }
    check_shape(spec, &data.train)?;
    if recipe.batch_size == 0 || recipe.epochs == 0 {
        return Err(EngineError::Task(
            "batch_size and epochs must be positive".into(),
        ));
    }
    let device = training_device();
    let mut model = Net::from_params(spec, params, &device)?.apply_freezing(view);
    let anchor: Option<Vec<Tensor<1>>> = (recipe.prox_mu > 0.0).then(|| {
        let plain =
            Net::from_params(spec, params, &compute_device()).expect("same params built above");
        let mut f = Flatten(Vec::new());
        plain.visit(&mut f);
        // Constants on the training device: no gradient flows into the anchor.
        f.0.into_iter()
            .map(|t| Tensor::from_data(t.into_data(), &device))
            .collect()
    });
    let grad_masks = GradMasks::new(&model, params, masks, &device)?;
    let mut optim = recipe.build_optimizer();
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(shuffle_seed);
    let mut order: Vec<usize> = (0..data.train.len()).collect();
    let mut pixels = Vec::new();
    let (mut loss_sum, mut steps, mut samples) = (0.0f64, 0usize, 0usize);
    let classes = spec.classes;
    let total_blocks = spec.num_blocks();
    let mut depth_rng = seed::rng(shuffle_seed, 0, 0, seed::Purpose::Method);
    let mut depth_steps = BTreeMap::new();
    // One micro-batch per thread (see `micro_batch_grads`). FedProx's term is a function of
    // the weights, not a mean over samples, so it keeps the one-batch path.
    let threads = if anchor.is_none() {
        rayon::current_num_threads()
    } else {
        1
    };
    for _ in 0..recipe.epochs {
        order.shuffle(&mut rng);
        for batch in order.chunks(recipe.batch_size) {
            let depth = match objective {
                Objective::CrossEntropy => None,
                Objective::DeviceDepth { depth, .. } => Some(*depth),
                Objective::SampledDepth { pi, .. } => Some(draw_depth(pi, &mut depth_rng)),
            };
            if let Some(k) = depth {
                *depth_steps.entry(k).or_insert(0) += 1;
            }
            let step = StepInput {
                data,
                objective,
                view,
                depth,
                classes,
                total_blocks,
                device: &device,
            };
            let parts = micro_batch_count(threads, batch.len());
            let (loss, grads) = if parts > 1 {
                micro_batch_grads(&model, batch, parts, &step)?
            } else {
                let (x, labels) = batch_input(
                    &data.train,
                    batch,
                    &data.mean,
                    &data.std,
                    &mut pixels,
                    &device,
                )?;
                let mut loss = step.loss(&model, x, &labels)?;
                let value = f64::from(loss.clone().into_scalar::<f32>());
                if let Some(anchor) = &anchor {
                    let mut f = Flatten(Vec::new());
                    model.visit(&mut f);
                    let prox =
                        f.0.into_iter()
                            .zip(anchor)
                            .map(|(w, a)| (w - a.clone()).square().sum())
                            .reduce(|a, b| a + b);
                    if let Some(prox) = prox {
                        loss = loss + prox * (recipe.prox_mu as f32 / 2.0);
                    }
                }
                (
                    value,
                    vec![GradientsParams::from_grads(loss.backward(), &model)],
                )
            };
            loss_sum += loss;
            model = optim.step(recipe.lr, model, grads, &grad_masks);
            steps += 1;
            samples += batch.len();
        }
    }
    let params = model.valid().export();
    params.check_finite().map_err(|_| {
        EngineError::Task(
            "training diverged: parameters hold NaN or infinity; lower the learning rate".into(),
        )
    })?;
    Ok(TrainOutcome {
        params,
        mean_loss: loss_sum / steps as f64,
        samples,
        steps,
        depth_steps,
    })
}

/// Samples per evaluation forward pass. Fixed, so results do not depend on threads; small
/// enough that a convolution's unfolded input stays a few MiB.
pub const EVAL_CHUNK: usize = 100;

/// Accuracy and mean loss of a model on a dataset, in fixed chunks of [`EVAL_CHUNK`] samples
/// (so the result does not depend on threads).
pub fn evaluate(
    spec: &ModelSpec,
    view: &View,
    params: &ParamSet,
    data: &Dataset,
    mean: &[f32],
    std: &[f32],
) -> Result<(f64, f64), EngineError> {
    Ok(evaluate_views(spec, std::slice::from_ref(view), params, data, mean, std)?[0])
}

/// [`evaluate`] for several views of the same parameters, one (accuracy, loss) per view. When
/// every view is a depth prefix, the blocks the prefixes share run once per batch
/// ([`Net::forward_depths`]).
pub fn evaluate_views(
    spec: &ModelSpec,
    views: &[View],
    params: &ParamSet,
    data: &Dataset,
    mean: &[f32],
    std: &[f32],
) -> Result<Vec<(f64, f64)>, EngineError> {
    if data.is_empty() {
        return Err(EngineError::Task(
            "cannot evaluate on an empty dataset".into(),
        ));
    }
    check_shape(spec, data)?;
    let device = compute_device();
    let model = Net::from_params(spec, params, &device)?;
    // Shared trunk when every view is a depth prefix (and there is more than one).
    let total = spec.num_blocks();
    let depths: Option<Vec<usize>> = (views.len() > 1 && total > 0)
        .then(|| views.iter().map(|v| v.prefix_depth(total)).collect())
        .flatten();
    let sorted: Option<Vec<usize>> = depths.as_ref().map(|d| {
        let mut s = d.clone();
        s.sort_unstable();
        s.dedup();
        s
    });
    let mut correct = vec![0usize; views.len()];
    let mut loss_sum = vec![0f64; views.len()];
    let mut pixels = Vec::new();
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(EVAL_CHUNK) {
        let (x, labels) = batch_input(data, chunk, mean, std, &mut pixels, &device)?;
        let logits: Vec<Tensor<2>> = match (&depths, &sorted) {
            (Some(depths), Some(sorted)) => {
                let out = model.forward_depths(x, sorted)?;
                depths
                    .iter()
                    .map(|d| out[sorted.binary_search(d).expect("listed")].clone())
                    .collect()
            }
            _ => views.iter().map(|v| model.forward(x.clone(), v)).collect(),
        };
        for (i, logits) in logits.into_iter().enumerate() {
            let pred = logits
                .clone()
                .argmax(1)
                .into_data()
                .convert::<i64>()
                .try_into_vec::<i64>()
                .map_err(|e| EngineError::Task(format!("{e:?}")))?;
            correct[i] += pred
                .iter()
                .zip(&labels)
                .filter(|(p, l)| **p == i64::from(**l))
                .count();
            loss_sum[i] += f64::from(
                cross_entropy(logits, &labels, spec.classes, &device).into_scalar::<f32>(),
            ) * chunk.len() as f64;
        }
    }
    let n = data.len() as f64;
    Ok(correct
        .iter()
        .zip(&loss_sum)
        .map(|(c, l)| (*c as f64 / n, l / n))
        .collect())
}

/// The standard client step shared by FedAvg-style methods: check the memory budget, train
/// the task's model under its view, reply with the trainable tensors and measured resources.
pub fn train_task(task: &Task, data: &ClientData, ctx: &ClientCtx) -> Result<Reply, EngineError> {
    train_task_with(task, data, ctx, &Objective::CrossEntropy)
}

/// [`train_task`] with another [`Objective`] (FlexTrain's depth distillation).
pub fn train_task_with(
    task: &Task,
    data: &ClientData,
    ctx: &ClientCtx,
    objective: &Objective,
) -> Result<Reply, EngineError> {
    let started = Instant::now();
    let estimate = estimate_memory(&task.model, &task.view, &task.params, &task.recipe);
    if estimate.total() > ctx.profile.memory_bytes {
        return Err(EngineError::OverBudget(format!(
            "training needs about {:.1} MiB but the device allows {:.1} MiB",
            estimate.total() as f64 / 1048576.0,
            ctx.profile.memory_bytes as f64 / 1048576.0
        )));
    }
    let peak = ThreadPeak::start();
    let shuffle = seed::derive(ctx.seed, task.round, task.client, seed::Purpose::Shuffle);
    let out = train_with(
        &task.model,
        &task.view,
        &task.params,
        data,
        &task.recipe,
        shuffle,
        &ctx.masks,
        objective,
    )?;
    let params = out.params.filter(|n| !task.view.is_frozen(n));
    let peak_memory_bytes = peak.peak_above_start();
    let mut metrics = BTreeMap::new();
    metrics.insert("train_loss".to_string(), out.mean_loss);
    Ok(Reply {
        round: task.round,
        phase: task.phase,
        client: task.client,
        num_examples: data.train.len() as u64,
        params,
        metrics,
        resources: Resources {
            peak_memory_bytes,
            estimated_memory_bytes: estimate.total(),
            flops: flops::training(&task.model, &task.view, out.samples),
            wall_time_s: started.elapsed().as_secs_f64(),
        },
    })
}
