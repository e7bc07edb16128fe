//! The standard client step: check the memory budget, train, reply with the trainable tensors
//! and the measured resources.

use super::job::TrainJob;
use super::objective::Objective;
use crate::EngineError;
use crate::alloc::ThreadPeak;
use crate::method::{ClientCtx, ClientData, Reply, Resources, Task};
use crate::recipe::Recipe;
use flotilla_core::{ParamSet, seed};
use flotilla_models::memory::{self, MemoryEstimate};
use flotilla_models::{ModelSpec, View, flops};
use std::collections::BTreeMap;
use std::time::Instant;

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

/// The standard client step of training methods: refuse a task over the device's memory
/// budget, build the objective with `objective`, train the task's model under its view with
/// it (the client's masks held at zero), and reply with the trainable tensors, `train_loss`
/// (the objective's mean loss) and the measured resources. The objective is built inside the
/// memory measurement, so what it holds (e.g. FedProx's copy of the global model) counts in
/// the client's peak.
pub fn train_task<O: Objective>(
    task: &Task,
    data: &ClientData,
    ctx: &ClientCtx,
    objective: impl FnOnce() -> Result<O, EngineError>,
) -> Result<Reply, EngineError> {
    train_task_with(task, data, ctx, objective, None, None)
}

/// `recipe` with its batch counted in model inputs: what an objective that runs several
/// inputs per sample (two augmented views) holds activations for. Planners estimate with it.
pub fn inputs_of<O: Objective>(recipe: &Recipe) -> Recipe {
    Recipe {
        batch_size: recipe.batch_size * O::INPUTS_PER_SAMPLE,
        ..recipe.clone()
    }
}

/// What a client step measures from the moment it accepts a task until its reply: wall time,
/// the analytic memory estimate and the heap high-water mark above the start.
struct Measurement {
    started: Instant,
    estimate: MemoryEstimate,
    peak: ThreadPeak,
}

impl Measurement {
    /// Refuses the task when `estimate` exceeds the device's budget (`what` names the work);
    /// otherwise starts the memory measurement.
    fn start(
        started: Instant,
        estimate: MemoryEstimate,
        ctx: &ClientCtx,
        what: &str,
    ) -> Result<Self, EngineError> {
        if estimate.total() > ctx.profile.memory_bytes {
            return Err(EngineError::OverBudget(format!(
                "{what} needs about {:.1} MiB but the device allows {:.1} MiB",
                estimate.total() as f64 / 1048576.0,
                ctx.profile.memory_bytes as f64 / 1048576.0
            )));
        }
        Ok(Self {
            started,
            estimate,
            peak: ThreadPeak::start(),
        })
    }

    /// The reply carrying `params`, `train_loss` and the measured resources of `samples`
    /// model inputs' forward and backward passes.
    fn reply(
        self,
        task: &Task,
        data: &ClientData,
        params: ParamSet,
        mean_loss: f64,
        samples: usize,
    ) -> Reply {
        let peak_memory_bytes = self.peak.peak_above_start();
        let mut metrics = BTreeMap::new();
        metrics.insert("train_loss".to_string(), mean_loss);
        Reply {
            round: task.round,
            phase: task.phase,
            client: task.client,
            num_examples: data.train.len() as u64,
            params,
            metrics,
            resources: Resources {
                peak_memory_bytes,
                estimated_memory_bytes: self.estimate.total(),
                flops: flops::training(&task.model, &task.view, samples),
                wall_time_s: self.started.elapsed().as_secs_f64(),
            },
        }
    }
}

/// The training job of `task` on `data`: its model, view, parameters and recipe, shuffled
/// by (run seed, round, client), the client's masks held at zero.
fn job<'a, O: Objective>(
    task: &'a Task,
    data: &'a ClientData,
    ctx: &'a ClientCtx,
    objective: &'a O,
) -> TrainJob<'a, O> {
    let shuffle = seed::derive(ctx.seed, task.round, task.client, seed::Purpose::Shuffle);
    TrainJob::new(
        &task.model,
        &task.view,
        &task.params,
        data,
        &task.recipe,
        objective,
    )
    .seed(shuffle)
    .masks(&ctx.masks)
}

/// [`train_task`] with `correction` added to every step's gradient (variance correction,
/// control variates) and, when `steps` is set, exactly that many local steps instead of the
/// recipe's epochs.
pub fn train_task_with<O: Objective>(
    task: &Task,
    data: &ClientData,
    ctx: &ClientCtx,
    objective: impl FnOnce() -> Result<O, EngineError>,
    correction: Option<&ParamSet>,
    steps: Option<usize>,
) -> Result<Reply, EngineError> {
    let started = Instant::now();
    let estimate = estimate_memory(
        &task.model,
        &task.view,
        &task.params,
        &inputs_of::<O>(&task.recipe),
    );
    let measurement = Measurement::start(started, estimate, ctx, "training")?;
    let objective = objective()?;
    let mut job = job(task, data, ctx, &objective);
    if let Some(c) = correction {
        job = job.correction(c);
    }
    if let Some(s) = steps {
        job = job.steps(s);
    }
    let out = job.train()?;
    let params = out.params.filter(|n| !task.view.is_frozen(n));
    Ok(measurement.reply(
        task,
        data,
        params,
        out.mean_loss,
        out.samples * O::INPUTS_PER_SAMPLE,
    ))
}

/// The gradient step of methods that exchange gradients (FeDLRT's basis phase, FedLin): refuse
/// a task over the device's memory budget, take the mean gradients of the objective over
/// `batches` local batches without a step, and reply with the gradients named in `upload`
/// (in that order), `train_loss` (the objective's mean loss on those batches) and the
/// measured resources. Every name in `upload` must be a trainable tensor of the task.
pub fn gradient_task<O: Objective>(
    task: &Task,
    data: &ClientData,
    ctx: &ClientCtx,
    objective: impl FnOnce() -> Result<O, EngineError>,
    batches: usize,
    upload: &[String],
) -> Result<Reply, EngineError> {
    let started = Instant::now();
    // A gradient pass keeps gradients but no optimizer state.
    let stateless = Recipe {
        momentum: 0.0,
        optimizer: crate::recipe::OptimizerKind::Sgd,
        ..task.recipe.clone()
    };
    let estimate = estimate_memory(
        &task.model,
        &task.view,
        &task.params,
        &inputs_of::<O>(&stateless),
    );
    let measurement = Measurement::start(started, estimate, ctx, "the gradient pass")?;
    let objective = objective()?;
    let out = job(task, data, ctx, &objective).gradients(batches)?;
    let mut sent = Vec::with_capacity(upload.len());
    for name in upload {
        let g = out.grads.get(name).ok_or_else(|| {
            EngineError::Task(format!(
                "the task asks for the gradient of `{name}`, which is not a trainable tensor of its model"
            ))
        })?;
        sent.push(g.clone());
    }
    let params = ParamSet::from_tensors(sent)?;
    Ok(measurement.reply(
        task,
        data,
        params,
        out.mean_loss,
        out.samples * O::INPUTS_PER_SAMPLE,
    ))
}
