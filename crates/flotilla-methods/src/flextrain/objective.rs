//! FlexTrain's training objectives: a device's depth loss with auto-distillation
//! (Algorithm 2) and centralized sampled-depth training (Algorithm 1).

use burn::tensor::Tensor;
use burn::tensor::activation::softmax;
use flotilla_engine::EngineError;
use flotilla_engine::local::{Batch, Objective, cross_entropy};
use flotilla_models::{ModelSpec, Net, View};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

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

/// FlexTrain on a device (Algorithm 2): the cross-entropy of the depth-`depth` prefix plus
/// β·‖f_student − sg(f_depth)‖², where the device's own depth is the detached teacher of the
/// shallower `student` prefix (f = logits or probabilities, squared L2 norm summed over
/// classes and averaged over the batch). No student, or β = 0: plain cross-entropy of the
/// prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceDepth {
    /// The device's depth: the view must be the trainable prefix of this depth.
    pub depth: usize,
    /// The shallower prefix pulled toward the device's depth.
    pub student: Option<usize>,
    /// Distillation weight β.
    pub beta: f64,
    /// Output compared by the distillation term.
    pub on: DistillOn,
}

impl Objective for DeviceDepth {
    type Step = ();

    fn check(&self, spec: &ModelSpec, view: &View) -> Result<(), EngineError> {
        let total = check_blocks_and_beta(spec, self.beta)?;
        if view.prefix_depth(total) != Some(self.depth) {
            return Err(EngineError::Task(format!(
                "the view must be the depth-{} prefix of the {total} blocks",
                self.depth
            )));
        }
        if self.student.is_some_and(|s| s >= self.depth) {
            return Err(EngineError::Task(format!(
                "the student depth must be below the device depth {}",
                self.depth
            )));
        }
        Ok(())
    }

    fn begin_step(&self, _rng: &mut ChaCha8Rng) {}

    fn loss(&self, model: &Net, batch: Batch<'_>, _step: &()) -> Result<Tensor<1>, EngineError> {
        let (classes, device) = (batch.classes, batch.device);
        match self.student {
            Some(s) if self.beta > 0.0 => {
                let (student, teacher) = prefix_pair(model, batch.x, s, self.depth)?;
                Ok(
                    cross_entropy(teacher.clone(), batch.labels, classes, device)
                        + distillation(student, teacher, self.beta, self.on),
                )
            }
            _ => {
                // `check` refused models without blocks before training started.
                let total = model.num_blocks();
                let logits = model.forward(batch.x, &View::depth_prefix(self.depth, total));
                Ok(cross_entropy(logits, batch.labels, classes, device))
            }
        }
    }
}

/// Centralized FlexTrain (Algorithm 1): for every mini-batch a depth k is drawn from `pi`
/// (entry k = probability of the depth-k prefix, k = 0..=K), and the step minimises the
/// cross-entropy of prefix k plus β·‖f_k − sg(f_{k+1})‖² (no extra term at k = K). Blocks
/// deeper than k get no update in that step. Steps are tallied by drawn depth.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledDepth {
    /// Depth distribution π over 0..=K.
    pub pi: Vec<f64>,
    /// Distillation weight β.
    pub beta: f64,
    /// Output compared by the distillation term.
    pub on: DistillOn,
}

impl Objective for SampledDepth {
    /// The depth drawn for the step.
    type Step = usize;

    fn check(&self, spec: &ModelSpec, view: &View) -> Result<(), EngineError> {
        let total = check_blocks_and_beta(spec, self.beta)?;
        if self.pi.len() != total + 1 {
            return Err(EngineError::Task(format!(
                "pi must give a probability for every depth 0..={total} ({} entries), got {}",
                total + 1,
                self.pi.len()
            )));
        }
        let sum: f64 = self.pi.iter().sum();
        if self.pi.iter().any(|p| !(p.is_finite() && *p >= 0.0)) || (sum - 1.0).abs() > 1e-6 {
            return Err(EngineError::Task(format!(
                "pi must be probabilities summing to 1, got {:?}",
                self.pi
            )));
        }
        if view != &View::full() {
            return Err(EngineError::Task(
                "sampled-depth training runs on the full model view".into(),
            ));
        }
        Ok(())
    }

    fn begin_step(&self, rng: &mut ChaCha8Rng) -> usize {
        draw_depth(&self.pi, rng)
    }

    fn tally(&self, depth: &usize) -> Option<usize> {
        Some(*depth)
    }

    fn loss(&self, model: &Net, batch: Batch<'_>, k: &usize) -> Result<Tensor<1>, EngineError> {
        let (classes, device, k) = (batch.classes, batch.device, *k);
        let total = model.num_blocks();
        if k < total && self.beta > 0.0 {
            let (student, teacher) = prefix_pair(model, batch.x, k, k + 1)?;
            Ok(
                cross_entropy(student.clone(), batch.labels, classes, device)
                    + distillation(student, teacher, self.beta, self.on),
            )
        } else {
            let logits = model.forward(batch.x, &View::depth_prefix(k, total));
            Ok(cross_entropy(logits, batch.labels, classes, device))
        }
    }
}

/// The model's block count, refusing models without blocks; checks β.
fn check_blocks_and_beta(spec: &ModelSpec, beta: f64) -> Result<usize, EngineError> {
    if !(beta.is_finite() && beta >= 0.0) {
        return Err(EngineError::Task(format!(
            "beta must be a non-negative number, got {beta}"
        )));
    }
    match spec.num_blocks() {
        0 => Err(EngineError::Task(
            "depth objectives need a model with blocks (resnet or vit)".into(),
        )),
        total => Ok(total),
    }
}

/// β·‖student − sg(teacher)‖²: squared L2 distance summed over classes, averaged over the
/// batch; the teacher is detached, so no gradient reaches its deeper blocks.
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

/// Draws a depth from π.
fn draw_depth(pi: &[f64], rng: &mut impl Rng) -> usize {
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
