//! The training loop: one [`TrainJob`] value describes a run of local training, and it either
//! trains ([`TrainJob::train`]) or only measures gradients ([`TrainJob::gradients`]).

use super::input::check_shape;
use super::micro::StepEnv;
use super::objective::Objective;
use super::optim::{GradTerms, Optim, TrainMasks, from_burn_layout};
use crate::EngineError;
use crate::method::ClientData;
use crate::recipe::Recipe;
use burn::module::{Module, ParamId};
use burn::optim::GradientsParams;
use flotilla_core::{ParamSet, Tensor as NamedTensor, seed};
use flotilla_models::{ModelSpec, Net, View, training_device};
use rand::seq::SliceRandom;
use std::collections::{BTreeMap, HashMap};

/// One run of local training: the model and what of it trains, the data, the recipe, the
/// method's objective, and what every step applies to the gradient (masks, a correction).
///
/// Tensors a client already holds from earlier tasks are part of `params`: the task decoder
/// puts them back before training (see [`crate::method::Task::decode`]).
pub struct TrainJob<'a, O: Objective> {
    /// Architecture.
    pub spec: &'a ModelSpec,
    /// What of it runs and trains.
    pub view: &'a View,
    /// Every tensor of the model (PyTorch names and layouts).
    pub params: &'a ParamSet,
    /// The client's data.
    pub data: &'a ClientData,
    /// Optimizer, learning rate, batches, epochs.
    pub recipe: &'a Recipe,
    /// What each batch's loss is.
    pub objective: &'a O,
    /// Seed of the shuffling (and of the objective's per-step draws).
    pub shuffle_seed: u64,
    /// Positions held at exactly zero through every step.
    pub masks: Option<&'a TrainMasks>,
    /// A per-tensor term added to every step's gradient (PyTorch layout, trainable tensors
    /// only): variance correction, control variates.
    pub correction: Option<&'a ParamSet>,
    /// Train exactly this many steps (continuing into further epochs, each reshuffled)
    /// instead of the recipe's epochs.
    pub steps: Option<usize>,
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
    /// Steps per category of [`Objective::tally`] (e.g. per drawn depth); empty when the
    /// objective counts nothing.
    pub step_tally: BTreeMap<usize, usize>,
}

/// Result of a gradient pass.
#[derive(Debug, Clone)]
pub struct GradientOutcome {
    /// Mean over the batches of each trainable tensor's gradient (PyTorch names and
    /// layouts); masked positions are zero.
    pub grads: ParamSet,
    /// Mean loss over the batches.
    pub mean_loss: f64,
    /// Samples the gradients were taken on.
    pub samples: usize,
    /// Batches the gradients were taken on.
    pub batches: usize,
}

impl<'a, O: Objective> TrainJob<'a, O> {
    /// A job with shuffle seed 0, no masks and no correction.
    pub fn new(
        spec: &'a ModelSpec,
        view: &'a View,
        params: &'a ParamSet,
        data: &'a ClientData,
        recipe: &'a Recipe,
        objective: &'a O,
    ) -> Self {
        Self {
            spec,
            view,
            params,
            data,
            recipe,
            objective,
            shuffle_seed: 0,
            masks: None,
            correction: None,
            steps: None,
        }
    }

    /// The same job with another shuffle seed.
    pub fn seed(mut self, shuffle_seed: u64) -> Self {
        self.shuffle_seed = shuffle_seed;
        self
    }

    /// The same job with masked positions held at zero.
    pub fn masks(mut self, masks: &'a TrainMasks) -> Self {
        self.masks = Some(masks);
        self
    }

    /// The same job with `correction` added to every step's gradient.
    pub fn correction(mut self, correction: &'a ParamSet) -> Self {
        self.correction = Some(correction);
        self
    }

    /// The same job training exactly `steps` steps, whatever the recipe's epochs.
    pub fn steps(mut self, steps: usize) -> Self {
        self.steps = Some(steps);
        self
    }

    /// Checks everything that can be checked before a step runs.
    fn check(&self) -> Result<(), EngineError> {
        self.objective.check(self.spec, self.view)?;
        if self.data.train.is_empty() {
            return Err(EngineError::Task(
                "the client holds no training data".into(),
            ));
        }
        check_shape(self.spec, &self.data.train)?;
        if self.recipe.batch_size == 0 || self.recipe.epochs == 0 || self.steps == Some(0) {
            return Err(EngineError::Task(
                "batch_size, epochs and steps must be positive".into(),
            ));
        }
        if let Some(c) = self.correction {
            if let Some(t) = c.iter().find(|t| self.view.is_frozen(&t.name)) {
                return Err(EngineError::Task(format!(
                    "the correction names `{}`, which the view freezes",
                    t.name
                )));
            }
            c.check_finite()
                .map_err(|e| EngineError::Task(format!("the correction: {e}")))?;
        }
        Ok(())
    }

    /// The model on the training device with the view's tensors frozen.
    fn model(&self) -> Result<Net, EngineError> {
        Ok(Net::from_params(self.spec, self.params, &training_device())?.apply_freezing(self.view))
    }

    /// The sample order of one epoch, from the job's seed.
    fn shuffler(&self) -> (rand_chacha::ChaCha8Rng, Vec<usize>) {
        let rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(self.shuffle_seed);
        (rng, (0..self.data.train.len()).collect())
    }

    /// Trains for the recipe's epochs and returns every tensor of the model.
    pub fn train(&self) -> Result<TrainOutcome, EngineError> {
        self.check()?;
        let device = training_device();
        let mut model = self.model()?;
        let masks = TrainMasks::new();
        let terms = GradTerms::new(
            &model,
            self.params,
            self.masks.unwrap_or(&masks),
            self.correction,
            &device,
        )?;
        let mut optim = Optim::new(self.recipe);
        let (mut rng, mut order) = self.shuffler();
        let mut step_rng = seed::rng(self.shuffle_seed, 0, 0, seed::Purpose::Method);
        let env = StepEnv {
            data: self.data,
            objective: self.objective,
            classes: self.spec.classes,
            device: &device,
        };
        let threads = rayon::current_num_threads();
        let mut pixels = Vec::new();
        let (mut loss_sum, mut steps, mut samples) = (0.0f64, 0usize, 0usize);
        let mut step_tally = BTreeMap::new();
        let (epochs, max_steps) = match self.steps {
            Some(s) => (usize::MAX, s),
            None => (self.recipe.epochs, usize::MAX),
        };
        for _ in 0..epochs {
            if steps == max_steps {
                break;
            }
            order.shuffle(&mut rng);
            for batch in order.chunks(self.recipe.batch_size) {
                if steps == max_steps {
                    break;
                }
                let step = self.objective.begin_step(&mut step_rng);
                if let Some(k) = self.objective.tally(&step) {
                    *step_tally.entry(k).or_insert(0) += 1;
                }
                let (loss, grads) = env.grads(&model, batch, &step, threads, &mut pixels)?;
                loss_sum += loss;
                model = optim.step(self.recipe.lr, model, grads, &terms);
                steps += 1;
                samples += batch.len();
            }
        }
        let params = model.valid().export();
        params.check_finite().map_err(|_| {
            EngineError::Task(
                "training diverged: parameters hold NaN or infinity; lower the learning rate"
                    .into(),
            )
        })?;
        Ok(TrainOutcome {
            params,
            mean_loss: loss_sum / steps as f64,
            samples,
            steps,
            step_tally,
        })
    }

    /// Mean gradients of the objective over the first `batches` batches of the first epoch's
    /// order (all batches of an epoch at most), without an optimizer step: the model is left
    /// as it was. Only trainable tensors have a gradient; masked positions are zero.
    pub fn gradients(&self, batches: usize) -> Result<GradientOutcome, EngineError> {
        self.check()?;
        if batches == 0 {
            return Err(EngineError::Task(
                "a gradient pass needs at least one batch".into(),
            ));
        }
        let device = training_device();
        let model = self.model()?;
        let (mut rng, mut order) = self.shuffler();
        order.shuffle(&mut rng);
        let mut step_rng = seed::rng(self.shuffle_seed, 0, 0, seed::Purpose::Method);
        let env = StepEnv {
            data: self.data,
            objective: self.objective,
            classes: self.spec.classes,
            device: &device,
        };
        let threads = rayon::current_num_threads();
        let ids = model.param_ids();
        let mut sums: HashMap<ParamId, Vec<f32>> = HashMap::new();
        let (mut loss_sum, mut used, mut samples) = (0.0f64, 0usize, 0usize);
        let mut pixels = Vec::new();
        for batch in order.chunks(self.recipe.batch_size).take(batches) {
            let step = self.objective.begin_step(&mut step_rng);
            let (loss, parts) = env.grads(&model, batch, &step, threads, &mut pixels)?;
            for mut g in parts {
                for (_, id, rank) in &ids {
                    let Some(values) = take_grad(&mut g, *id, *rank) else {
                        continue;
                    };
                    let sum = sums.entry(*id).or_insert_with(|| vec![0.0; values.len()]);
                    sum.iter_mut().zip(&values).for_each(|(s, v)| *s += v);
                }
            }
            loss_sum += loss;
            used += 1;
            samples += batch.len();
        }
        let scale = 1.0 / used as f32;
        let mut out = Vec::new();
        for (name, id, _) in &ids {
            let Some(sum) = sums.remove(id) else {
                continue;
            };
            let shape = self.params.require(name)?.shape.clone();
            let mut data = from_burn_layout(&sum, &shape);
            data.iter_mut().for_each(|v| *v *= scale);
            if let Some(mask) = self.masks.and_then(|m| m.get(name)) {
                data.iter_mut()
                    .zip(&mask.active)
                    .filter(|(_, a)| !**a)
                    .for_each(|(v, _)| *v = 0.0);
            }
            out.push(NamedTensor {
                name: name.clone(),
                shape,
                data,
            });
        }
        let grads = ParamSet::from_tensors(out)?;
        grads
            .check_finite()
            .map_err(|_| EngineError::Task("the gradients hold NaN or infinity".into()))?;
        Ok(GradientOutcome {
            grads,
            mean_loss: loss_sum / used as f64,
            samples,
            batches: used,
        })
    }
}

/// The gradient of one parameter as plain values in burn's layout, if it has one.
fn take_grad(grads: &mut GradientsParams, id: ParamId, rank: usize) -> Option<Vec<f32>> {
    fn one<const D: usize>(grads: &mut GradientsParams, id: ParamId) -> Option<Vec<f32>> {
        grads
            .remove::<D>(id)
            .and_then(|t| t.into_data().try_into_vec::<f32>().ok())
    }
    match rank {
        1 => one::<1>(grads, id),
        2 => one::<2>(grads, id),
        3 => one::<3>(grads, id),
        _ => one::<4>(grads, id),
    }
}
