//! The optimizer of a local training run, and what it applies to every step's gradient:
//! masks (positions held at zero) and an additive correction (variance correction, control
//! variates).

use super::sgd::FusedSgd;
use crate::EngineError;
use crate::recipe::{OptimizerKind, Recipe};
use burn::module::ParamId;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use flotilla_core::ParamSet;
use flotilla_core::wire::Mask;
use flotilla_models::Net;
use std::collections::HashMap;

/// Binary masks enforced during local training, by tensor name (positions in PyTorch layout).
pub type TrainMasks = HashMap<String, Mask>;

/// The optimizer of a local training run.
pub(crate) enum Optim {
    /// SGD, fused and in place (`local::sgd`).
    Fused(FusedSgd),
    /// burn's optimizer (Adam).
    Burn(ModuleOptimizer),
}

impl Optim {
    pub(crate) fn new(recipe: &Recipe) -> Self {
        if recipe.optimizer == OptimizerKind::Sgd {
            return Optim::Fused(FusedSgd::new(
                recipe.lr,
                recipe.momentum,
                recipe.weight_decay,
            ));
        }
        let decay =
            (recipe.weight_decay > 0.0).then(|| WeightDecayConfig::new(recipe.weight_decay as f32));
        Optim::Burn(
            AdamConfig::new()
                .with_epsilon(1e-8)
                .with_weight_decay(decay)
                .init(),
        )
    }

    /// One step with the sum of the micro-batch gradients `parts`, plus the correction, masked.
    pub(crate) fn step(
        &mut self,
        lr: f64,
        model: Net,
        mut parts: Vec<GradientsParams>,
        terms: &GradTerms,
    ) -> Net {
        match self {
            Optim::Fused(sgd) => sgd.step(model, &mut parts, &terms.masks, &terms.corrections),
            Optim::Burn(optim) => {
                let mut grads = sum_grads(&model, parts);
                terms.apply(&mut grads);
                optim.step(lr, model, grads)
            }
        }
    }
}

/// The sum of the micro-batch gradients of one step.
pub(crate) fn sum_grads(model: &Net, mut parts: Vec<GradientsParams>) -> GradientsParams {
    if parts.len() == 1 {
        return parts.pop().unwrap_or_default();
    }
    let mut sum = GradientsParams::new();
    for (_, id, rank) in model.param_ids() {
        fn add<const D: usize>(
            sum: &mut GradientsParams,
            parts: &mut [GradientsParams],
            id: ParamId,
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

/// PyTorch-layout values of a tensor in burn's layout: linear weights live transposed in the
/// model (`[in, out]`), every other tensor as PyTorch stores it.
pub(crate) fn to_burn_layout(values: &[f32], shape: &[usize]) -> Vec<f32> {
    match shape {
        [r, c] => transpose(values, *r, *c),
        _ => values.to_vec(),
    }
}

/// Values in burn's layout back in PyTorch's (`shape` is PyTorch's): the inverse of
/// [`to_burn_layout`].
pub(crate) fn from_burn_layout(values: &[f32], shape: &[usize]) -> Vec<f32> {
    match shape {
        [r, c] => transpose(values, *c, *r),
        _ => values.to_vec(),
    }
}

/// The transpose of a row-major `rows × cols` matrix.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = values[i * cols + j];
        }
    }
    out
}

/// What every step adds to and masks out of the gradient, per parameter, in burn's layout.
/// The gradient a step applies is `mask · (Σ micro-batch gradients + correction)`; weight
/// decay then adds to it as usual.
#[derive(Default)]
pub(crate) struct GradTerms {
    /// 0/1 per position (fused SGD).
    pub(crate) masks: HashMap<ParamId, Vec<f32>>,
    /// Additive term per position (fused SGD).
    pub(crate) corrections: HashMap<ParamId, Vec<f32>>,
    /// The same as tensors of rank 1, for burn's optimizers.
    tensors: Vec<(ParamId, usize, Option<Tensor<1>>, Option<Tensor<1>>)>,
}

impl GradTerms {
    /// Terms for `model` from masks and corrections named as in `params` (PyTorch layout).
    /// A correction must name a trainable tensor of the model and match its shape.
    pub(crate) fn new(
        model: &Net,
        params: &ParamSet,
        masks: &TrainMasks,
        correction: Option<&ParamSet>,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let mut terms = GradTerms::default();
        let inner = device.clone().inner();
        let ids = model.param_ids();
        if let Some(c) = correction {
            for t in c.iter() {
                let Some(p) = params.get(&t.name) else {
                    return Err(EngineError::Task(format!(
                        "the correction names `{}`, which is not a tensor of the model",
                        t.name
                    )));
                };
                if p.shape != t.shape {
                    return Err(EngineError::Task(format!(
                        "the correction of `{}` has shape {:?}, the tensor {:?}",
                        t.name, t.shape, p.shape
                    )));
                }
            }
        }
        for (name, id, rank) in ids {
            let mask = match masks.get(&name) {
                Some(mask) => {
                    let t = params.require(&name)?;
                    if mask.active.len() != t.numel() {
                        return Err(EngineError::Task(format!(
                            "mask `{name}` has {} positions, the tensor {}",
                            mask.active.len(),
                            t.numel()
                        )));
                    }
                    let values: Vec<f32> = mask
                        .active
                        .iter()
                        .map(|a| if *a { 1.0 } else { 0.0 })
                        .collect();
                    Some(to_burn_layout(&values, &t.shape))
                }
                None => None,
            };
            let corr = correction
                .and_then(|c| c.get(&name))
                .map(|t| to_burn_layout(&t.data, &t.shape));
            if mask.is_none() && corr.is_none() {
                continue;
            }
            let as_tensor = |v: &Vec<f32>| {
                Tensor::<1>::from_data(TensorData::new(v.clone(), [v.len()]), &inner)
            };
            terms.tensors.push((
                id,
                rank,
                mask.as_ref().map(as_tensor),
                corr.as_ref().map(as_tensor),
            ));
            if let Some(m) = mask {
                terms.masks.insert(id, m);
            }
            if let Some(c) = corr {
                terms.corrections.insert(id, c);
            }
        }
        Ok(terms)
    }

    /// Adds the corrections to `grads` and zeroes masked positions. The received values are
    /// zero there, so with zero gradients (and so zero momentum and Adam moments) they stay
    /// exactly zero.
    pub(crate) fn apply(&self, grads: &mut GradientsParams) {
        fn one<const D: usize>(
            grads: &mut GradientsParams,
            id: ParamId,
            mask: Option<&Tensor<1>>,
            corr: Option<&Tensor<1>>,
        ) {
            if let Some(mut g) = grads.remove::<D>(id) {
                let dims = g.dims();
                if let Some(c) = corr {
                    g = g + c.clone().reshape(dims);
                }
                if let Some(m) = mask {
                    g = g * m.clone().reshape(dims);
                }
                grads.register(id, g);
            }
        }
        for (id, rank, mask, corr) in &self.tensors {
            let (m, c) = (mask.as_ref(), corr.as_ref());
            match rank {
                1 => one::<1>(grads, *id, m, c),
                2 => one::<2>(grads, *id, m, c),
                3 => one::<3>(grads, *id, m, c),
                _ => one::<4>(grads, *id, m, c),
            }
        }
    }
}
