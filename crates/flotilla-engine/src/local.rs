//! Local training and evaluation on burn's `flex` backend.

use crate::EngineError;
use crate::alloc::ThreadPeak;
use crate::method::{ClientCtx, ClientData, Reply, Resources, Task};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor, TensorData};
use flotilla_core::{ParamSet, seed};
use flotilla_data::Dataset;
use flotilla_models::memory::{self, MemoryEstimate, OptimizerState};
use flotilla_models::{ModelSpec, Net, View, compute_device, flops, training_device};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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

    fn build_optimizer(&self) -> ModuleOptimizer {
        let decay =
            (self.weight_decay > 0.0).then(|| WeightDecayConfig::new(self.weight_decay as f32));
        match self.optimizer {
            OptimizerKind::Sgd => {
                let momentum = (self.momentum > 0.0).then_some(MomentumConfig {
                    momentum: self.momentum,
                    dampening: 0.0,
                    nesterov: false,
                });
                SgdConfig::new()
                    .with_momentum(momentum)
                    .with_weight_decay(decay)
                    .init()
            }
            OptimizerKind::Adam => AdamConfig::new()
                .with_epsilon(1e-8)
                .with_weight_decay(decay)
                .init(),
        }
    }
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

/// Gradient masks in burn's layout, ready to multiply gradients with.
struct GradMasks(Vec<(burn::module::ParamId, usize, Tensor<1>)>);

impl GradMasks {
    fn new(
        model: &Net,
        params: &ParamSet,
        masks: &TrainMasks,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let mut out = Vec::new();
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
                Tensor::from_data(TensorData::new(values, [n]), &device.clone().inner()),
            ));
        }
        Ok(Self(out))
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
        for (id, rank, mask) in &self.0 {
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
    for _ in 0..recipe.epochs {
        order.shuffle(&mut rng);
        for batch in order.chunks(recipe.batch_size) {
            let (x, labels) = batch_input(
                &data.train,
                batch,
                &data.mean,
                &data.std,
                &mut pixels,
                &device,
            )?;
            let logits = model.forward(x, view);
            let mut loss = cross_entropy(logits, &labels, classes, &device);
            loss_sum += f64::from(loss.clone().into_scalar::<f32>());
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
            let mut grads = GradientsParams::from_grads(loss.backward(), &model);
            grad_masks.apply(&mut grads);
            model = optim.step(recipe.lr, model, grads);
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
    if data.is_empty() {
        return Err(EngineError::Task(
            "cannot evaluate on an empty dataset".into(),
        ));
    }
    check_shape(spec, data)?;
    let device = compute_device();
    let model = Net::from_params(spec, params, &device)?;
    let (mut correct, mut loss_sum) = (0usize, 0f64);
    let mut pixels = Vec::new();
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(EVAL_CHUNK) {
        let (x, labels) = batch_input(data, chunk, mean, std, &mut pixels, &device)?;
        let logits = model.forward(x, view);
        let pred = logits
            .clone()
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .map_err(|e| EngineError::Task(format!("{e:?}")))?;
        correct += pred
            .iter()
            .zip(&labels)
            .filter(|(p, l)| **p == i64::from(**l))
            .count();
        loss_sum +=
            f64::from(cross_entropy(logits, &labels, spec.classes, &device).into_scalar::<f32>())
                * chunk.len() as f64;
    }
    Ok((
        correct as f64 / data.len() as f64,
        loss_sum / data.len() as f64,
    ))
}

/// The standard client step shared by FedAvg-style methods: check the memory budget, train
/// the task's model under its view, reply with the trainable tensors and measured resources.
pub fn train_task(task: &Task, data: &ClientData, ctx: &ClientCtx) -> Result<Reply, EngineError> {
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
    let out = train_masked(
        &task.model,
        &task.view,
        &task.params,
        data,
        &task.recipe,
        shuffle,
        &ctx.masks,
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
