//! One training step split into micro-batches, one per thread.

use super::input::batch_input;
use super::objective::{Batch, Objective};
use crate::EngineError;
use crate::method::ClientData;
use burn::optim::GradientsParams;
use burn::tensor::Device;
use flotilla_models::Net;

/// What every step of a run shares: the data, the objective, the model's classes, the device.
pub(crate) struct StepEnv<'a, O: Objective> {
    pub(crate) data: &'a ClientData,
    pub(crate) objective: &'a O,
    pub(crate) classes: usize,
    pub(crate) device: &'a Device,
}

impl<O: Objective> StepEnv<'_, O> {
    /// Mean loss and gradients of one step on the samples `batch`: one set of gradients, or
    /// one per micro-batch when the step runs on `threads` threads (see [`micro_batch_grads`]).
    pub(crate) fn grads(
        &self,
        model: &Net,
        batch: &[usize],
        step: &O::Step,
        threads: usize,
        pixels: &mut Vec<f32>,
    ) -> Result<(f64, Vec<GradientsParams>), EngineError> {
        let parts = micro_batch_count(threads, batch.len(), self.objective.mixes_samples());
        if parts > 1 {
            return micro_batch_grads(model, batch, parts, self, step);
        }
        let d = self.data;
        let (x, labels) = batch_input(&d.train, batch, &d.mean, &d.std, pixels, self.device)?;
        let input = Batch {
            x,
            labels: &labels,
            indices: batch,
            classes: self.classes,
            device: self.device,
        };
        let loss = self.objective.loss(model, input, step)?;
        let value = f64::from(loss.clone().into_scalar::<f32>());
        Ok((
            value,
            vec![GradientsParams::from_grads(loss.backward(), model)],
        ))
    }
}

/// The smallest micro-batch worth its own thread: below it, forking the model and summing
/// gradients cost more than the split saves.
const MIN_MICRO_BATCH: usize = 4;

/// How many micro-batches a step of `batch` samples runs as on `threads` threads: one per
/// thread, none smaller than [`MIN_MICRO_BATCH`]; one when the objective couples the samples
/// of a batch (splitting would change its loss).
pub(crate) fn micro_batch_count(threads: usize, batch: usize, mixes_samples: bool) -> usize {
    if mixes_samples {
        return 1;
    }
    threads.min(batch / MIN_MICRO_BATCH).max(1)
}

/// Mean loss and per-micro-batch gradients of one step run as `parts` micro-batches at once.
///
/// Every micro-batch runs forward and backward on its own fork of the model (separate autodiff
/// graphs) with the kernels kept on its thread ([`flotilla_models::kernels::serial`]), and
/// the optimizer sums the micro-batch gradients. An objective's loss is a mean over samples
/// plus sample-independent terms, and no layer mixes samples (group and layer norms only), so
/// each micro-batch's loss weighted by its share of the batch gives the whole batch's loss and
/// gradients, up to the order of float sums. This keeps every op of the step busy on all
/// threads, where splitting each op across the threads left the cheap, serial ones
/// (activations, losses, bookkeeping) on one.
fn micro_batch_grads<O: Objective>(
    model: &Net,
    batch: &[usize],
    parts: usize,
    env: &StepEnv<'_, O>,
    step: &O::Step,
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
                    let d = env.data;
                    let (x, labels) =
                        batch_input(&d.train, idx, &d.mean, &d.std, &mut Vec::new(), env.device)?;
                    let batch = Batch {
                        x,
                        labels: &labels,
                        indices: idx,
                        classes: env.classes,
                        device: env.device,
                    };
                    let loss = env.objective.loss(&fork, batch, step)? * (idx.len() as f32 / total);
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
