//! What local training minimises: the [`Objective`] trait, the batch it sees, and the losses
//! methods build their objectives from (cross-entropy on labels, on soft targets, and
//! temperature-scaled distillation).
//!
//! The engine owns the loop (shuffling, batching, micro-batches, the optimizer, masks,
//! corrections); a method owns its loss. FedAvg uses [`CrossEntropy`]; FedProx, FlexTrain and
//! the later methods define theirs in `flotilla-methods` without touching the engine.

use crate::EngineError;
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use flotilla_models::{ModelSpec, Net, View};
use rand_chacha::ChaCha8Rng;

/// One batch (or one micro-batch of a step) as the objective sees it.
pub struct Batch<'a> {
    /// Normalised inputs `[n, C, H, W]` on the training device.
    pub x: Tensor<4>,
    /// The samples' labels, in batch order.
    pub labels: &'a [u8],
    /// The samples' positions in the client's training set (to look up per-sample targets).
    pub indices: &'a [usize],
    /// Number of classes of the model.
    pub classes: usize,
    /// The device the model trains on.
    pub device: &'a Device,
}

/// What a method's client minimises on each batch.
///
/// The engine calls [`Objective::begin_step`] once per optimizer step (with the run's method
/// stream, so draws are reproducible) and then [`Objective::loss`] on the step's batch, or on
/// each of its micro-batches when a client trains on several threads. It weights each
/// micro-batch's loss by its share of the step's samples, so `loss` must be a mean over the
/// batch's samples plus terms that do not depend on the samples (e.g. a weight penalty).
/// An objective whose loss couples the samples of a batch (a contrastive loss, batch
/// statistics) says so with [`Objective::mixes_samples`], and its batches are never split.
pub trait Objective: Sync {
    /// What a step decides before its batch runs (e.g. the depth drawn for it), shared by all
    /// of the step's micro-batches. `()` for objectives that decide nothing.
    type Step: Sync;

    /// Model inputs each sample becomes (2 for a contrastive objective that runs two
    /// augmented views of every image). The engine charges FLOPs and estimates activation
    /// memory for this many inputs per sample.
    const INPUTS_PER_SAMPLE: usize = 1;

    /// Checks the objective against the model and view before training starts; the error
    /// says what does not fit.
    fn check(&self, _spec: &ModelSpec, _view: &View) -> Result<(), EngineError> {
        Ok(())
    }

    /// Whether the loss of a batch couples its samples, so that the batch must not be split
    /// into micro-batches.
    fn mixes_samples(&self) -> bool {
        false
    }

    /// Decides what the next step needs, drawing from `rng` if it must.
    fn begin_step(&self, rng: &mut ChaCha8Rng) -> Self::Step;

    /// A category to count steps by in [`crate::local::TrainOutcome::step_tally`] (e.g. the
    /// drawn depth); `None` counts nothing.
    fn tally(&self, _step: &Self::Step) -> Option<usize> {
        None
    }

    /// The loss of `model` on one batch.
    fn loss(
        &self,
        model: &Net,
        batch: Batch<'_>,
        step: &Self::Step,
    ) -> Result<Tensor<1>, EngineError>;
}

/// Mean cross-entropy of the model's logits under the task's view against the labels.
#[derive(Debug, Clone)]
pub struct CrossEntropy {
    /// The view the logits are computed under (the task's).
    pub view: View,
}

impl CrossEntropy {
    /// Cross-entropy under `view`.
    pub fn under(view: &View) -> Self {
        Self { view: view.clone() }
    }
}

impl Objective for CrossEntropy {
    type Step = ();

    fn begin_step(&self, _rng: &mut ChaCha8Rng) {}

    fn loss(&self, model: &Net, batch: Batch<'_>, _step: &()) -> Result<Tensor<1>, EngineError> {
        let logits = model.forward(batch.x, &self.view);
        Ok(cross_entropy(
            logits,
            batch.labels,
            batch.classes,
            batch.device,
        ))
    }
}

/// One-hot rows for `labels`.
pub fn one_hot(labels: &[u8], classes: usize, device: &Device) -> Tensor<2> {
    let mut v = vec![0f32; labels.len() * classes];
    for (i, l) in labels.iter().enumerate() {
        v[i * classes + *l as usize] = 1.0;
    }
    Tensor::from_data(TensorData::new(v, [labels.len(), classes]), device)
}

/// Mean cross-entropy of `logits` `[n, classes]` against integer labels.
pub fn cross_entropy(
    logits: Tensor<2>,
    labels: &[u8],
    classes: usize,
    device: &Device,
) -> Tensor<1> {
    let n = labels.len() as f32;
    (log_softmax(logits, 1) * one_hot(labels, classes, device))
        .sum()
        .neg()
        / n
}

/// Mean cross-entropy of `logits` against soft targets `[n, classes]` (probabilities: rows
/// that sum to 1), −(1/n) Σᵢ Σ_c p_ic log softmax(z_i)_c. With one-hot targets it equals
/// [`cross_entropy`]. The targets are constants: no gradient flows into them.
pub fn soft_cross_entropy(logits: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
    let n = logits.dims()[0] as f32;
    (log_softmax(logits, 1) * targets.detach()).sum().neg() / n
}

/// Knowledge distillation at temperature `t` (Hinton et al. 2015): t² · KL(softmax(teacher/t)
/// ‖ softmax(student/t)), averaged over the batch. The t² keeps the gradient's scale
/// independent of t; the teacher is detached.
pub fn distillation_kl(student: Tensor<2>, teacher: Tensor<2>, t: f64) -> Tensor<1> {
    let p = softmax(teacher / t as f32, 1);
    kl_to_probs(student, p, t)
}

/// t² · KL(p ‖ softmax(student/t)), averaged over the batch, for targets `p` `[n, classes]`
/// already given as probabilities (e.g. the mean of several models' softened outputs, as in
/// deep mutual learning). The targets are constants: no gradient flows into them.
pub fn kl_to_probs(student: Tensor<2>, targets: Tensor<2>, t: f64) -> Tensor<1> {
    let n = student.dims()[0] as f32;
    let t32 = t as f32;
    let p = targets.detach();
    let log_p = p.clone().clamp_min(1e-12).log();
    let log_q = log_softmax(student / t32, 1);
    (p * (log_p - log_q)).sum() * (t32 * t32 / n)
}

/// Row-wise softmax of `logits / t` for row-major `[samples, classes]` logits, in f64 and
/// shifted by each row's maximum so that large logits do not overflow.
pub fn softmax_rows(logits: &[f32], classes: usize, t: f64) -> Vec<f32> {
    let mut probs = Vec::with_capacity(logits.len());
    for row in logits.chunks(classes) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x));
        let e: Vec<f64> = row.iter().map(|z| (f64::from(z - max) / t).exp()).collect();
        let s: f64 = e.iter().sum();
        probs.extend(e.iter().map(|x| (x / s) as f32));
    }
    probs
}

/// Per-sample soft targets for a client's training set: row `i` is the target of sample `i`.
/// Targets are probabilities, or logits turned into probabilities at a temperature, so that a
/// model can be trained towards another model's outputs (distillation between models).
#[derive(Debug, Clone)]
pub struct SoftTargets {
    /// Row-major `[samples, classes]` probabilities.
    probs: Vec<f32>,
    classes: usize,
    /// The view the student's logits are computed under.
    view: View,
}

impl SoftTargets {
    /// Targets given as probabilities `[samples, classes]`; each row must be finite,
    /// non-negative and sum to 1 (within 1e-3).
    pub fn from_probs(probs: Vec<f32>, classes: usize, view: &View) -> Result<Self, EngineError> {
        if classes == 0 || !probs.len().is_multiple_of(classes) {
            return Err(EngineError::Task(format!(
                "soft targets hold {} values, not a whole number of rows of {classes} classes",
                probs.len()
            )));
        }
        for (i, row) in probs.chunks(classes).enumerate() {
            let sum: f32 = row.iter().sum();
            if row.iter().any(|p| !(p.is_finite() && *p >= 0.0)) || (sum - 1.0).abs() > 1e-3 {
                return Err(EngineError::Task(format!(
                    "soft target row {i} is not a probability vector (sum {sum})"
                )));
            }
        }
        Ok(Self {
            probs,
            classes,
            view: view.clone(),
        })
    }

    /// Targets given as logits `[samples, classes]`, softened at temperature `t > 0`.
    pub fn from_logits(
        logits: &[f32],
        classes: usize,
        t: f64,
        view: &View,
    ) -> Result<Self, EngineError> {
        if !(t.is_finite() && t > 0.0) {
            return Err(EngineError::Task(format!(
                "the temperature must be positive, got {t}"
            )));
        }
        if classes == 0 || !logits.len().is_multiple_of(classes) {
            return Err(EngineError::Task(format!(
                "soft targets hold {} values, not a whole number of rows of {classes} classes",
                logits.len()
            )));
        }
        Self::from_probs(softmax_rows(logits, classes, t), classes, view)
    }

    /// Number of samples with a target.
    pub fn len(&self) -> usize {
        self.probs.len() / self.classes
    }

    /// Whether no sample has a target.
    pub fn is_empty(&self) -> bool {
        self.probs.is_empty()
    }

    fn rows(&self, indices: &[usize], device: &Device) -> Result<Tensor<2>, EngineError> {
        let c = self.classes;
        let mut v = Vec::with_capacity(indices.len() * c);
        for &i in indices {
            let row = self.probs.get(i * c..(i + 1) * c).ok_or_else(|| {
                EngineError::Task(format!(
                    "sample {i} has no soft target ({} targets)",
                    self.len()
                ))
            })?;
            v.extend_from_slice(row);
        }
        Ok(Tensor::from_data(
            TensorData::new(v, [indices.len(), c]),
            device,
        ))
    }
}

impl Objective for SoftTargets {
    type Step = ();

    fn check(&self, spec: &ModelSpec, _view: &View) -> Result<(), EngineError> {
        if spec.classes != self.classes {
            return Err(EngineError::Task(format!(
                "soft targets have {} classes but the model has {}",
                self.classes, spec.classes
            )));
        }
        Ok(())
    }

    fn begin_step(&self, _rng: &mut ChaCha8Rng) {}

    fn loss(&self, model: &Net, batch: Batch<'_>, _step: &()) -> Result<Tensor<1>, EngineError> {
        let targets = self.rows(batch.indices, batch.device)?;
        Ok(soft_cross_entropy(
            model.forward(batch.x, &self.view),
            targets,
        ))
    }
}
