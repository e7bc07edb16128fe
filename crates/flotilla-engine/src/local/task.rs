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

/// Refuses a task whose training estimate exceeds the device's budget.
fn check_budget(estimate: &MemoryEstimate, ctx: &ClientCtx, what: &str) -> Result<(), EngineError> {
    if estimate.total() > ctx.profile.memory_bytes {
        return Err(EngineError::OverBudget(format!(
            "{what} needs about {:.1} MiB but the device allows {:.1} MiB",
            estimate.total() as f64 / 1048576.0,
            ctx.profile.memory_bytes as f64 / 1048576.0
        )));
    }
    Ok(())
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
    let estimate = estimate_memory(&task.model, &task.view, &task.params, &task.recipe);
    check_budget(&estimate, ctx, "training")?;
    let peak = ThreadPeak::start();
    let objective = objective()?;
    let shuffle = seed::derive(ctx.seed, task.round, task.client, seed::Purpose::Shuffle);
    let mut job = TrainJob::new(
        &task.model,
        &task.view,
        &task.params,
        data,
        &task.recipe,
        &objective,
    )
    .seed(shuffle)
    .masks(&ctx.masks);
    if let Some(c) = correction {
        job = job.correction(c);
    }
    if let Some(s) = steps {
        job = job.steps(s);
    }
    let out = job.train()?;
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
    let estimate = estimate_memory(&task.model, &task.view, &task.params, &stateless);
    check_budget(&estimate, ctx, "the gradient pass")?;
    let peak = ThreadPeak::start();
    let objective = objective()?;
    let shuffle = seed::derive(ctx.seed, task.round, task.client, seed::Purpose::Shuffle);
    let out = TrainJob::new(
        &task.model,
        &task.view,
        &task.params,
        data,
        &task.recipe,
        &objective,
    )
    .seed(shuffle)
    .masks(&ctx.masks)
    .gradients(batches)?;
    let mut sent = Vec::with_capacity(upload.len());
    for name in upload {
        let g = out.grads.get(name).ok_or_else(|| {
            EngineError::Task(format!(
                "the task asks for the gradient of `{name}`, which is not a trainable tensor of its model"
            ))
        })?;
        sent.push(g.clone());
    }
    let peak_memory_bytes = peak.peak_above_start();
    let mut metrics = BTreeMap::new();
    metrics.insert("train_loss".to_string(), out.mean_loss);
    Ok(Reply {
        round: task.round,
        phase: task.phase,
        client: task.client,
        num_examples: data.train.len() as u64,
        params: ParamSet::from_tensors(sent)?,
        metrics,
        resources: Resources {
            peak_memory_bytes,
            estimated_memory_bytes: estimate.total(),
            flops: flops::training(&task.model, &task.view, out.samples),
            wall_time_s: started.elapsed().as_secs_f64(),
        },
    })
}
