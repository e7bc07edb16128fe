//! Pieces shared by the methods: the full-model plan and update check, contributions, option
//! parsing, and the task a client trains when it was sent only part of its model.

use flotilla_core::ParamSet;
use flotilla_core::aggregate::Contribution;
use flotilla_engine::TaskKind;
use flotilla_engine::local::{Recipe, estimate_memory};
use flotilla_engine::{
    Assignment, ClientInfo, EngineError, Experiment, MethodState, PhaseCtx, Reply, Task,
};
use flotilla_models::{ModelSpec, Net, View};

/// One `train` task per client carrying `params`, or a skip with the reason when the
/// training estimate exceeds the client's memory budget. `note` is appended to the reason.
pub fn plan_full_model(
    ctx: &PhaseCtx,
    clients: &[ClientInfo],
    spec: &ModelSpec,
    recipe: &Recipe,
    params: &ParamSet,
    note: &str,
) -> Vec<Assignment> {
    let view = View::full();
    let need = estimate_memory(spec, &view, params, recipe).total();
    clients
        .iter()
        .map(|c| {
            if need > c.profile.memory_bytes {
                Assignment::Skip(format!(
                    "training the model needs about {:.1} MiB, the {} device has {:.1} MiB{note}",
                    need as f64 / 1048576.0,
                    c.profile.tier,
                    c.profile.memory_bytes as f64 / 1048576.0
                ))
            } else {
                Assignment::Run(Box::new(Task {
                    round: ctx.round,
                    phase: ctx.phase,
                    client: c.id,
                    kind: TaskKind::TRAIN,
                    model: spec.clone(),
                    view: view.clone(),
                    recipe: recipe.clone(),
                    params: params.clone(),
                    masks: Vec::new(),
                    hold: Vec::new(),
                    options: serde_json::Value::Null,
                }))
            }
        })
        .collect()
}

/// The reply check of full-model methods: every tensor of the model comes back, with its
/// shape, so that the update can be averaged.
pub fn check_full_model_reply(global: &ParamSet, reply: &Reply) -> Result<(), String> {
    global
        .check_same_layout(&reply.params)
        .map_err(|e| format!("update does not match the task's tensors: {e}"))
}

/// Each reply's tensors weighted by its example count: what example-weighted rules (FedAvg's
/// mean, the robust rules, partial-support means) fold. Accepts `&[Reply]` and `&[&Reply]`.
pub fn contributions<'a, R: std::borrow::Borrow<Reply>>(replies: &'a [R]) -> Vec<Contribution<'a>> {
    replies
        .iter()
        .map(|r| {
            let r = r.borrow();
            Contribution {
                params: &r.params,
                weight: r.num_examples as f64,
            }
        })
        .collect()
}

/// The replies fit to average into `global`: same layout and at least one example. The others
/// are refused with a log line, never averaged; none left is an error.
pub fn valid_updates<'a>(
    ctx: &PhaseCtx,
    global: &ParamSet,
    replies: &'a [Reply],
) -> Result<Vec<&'a Reply>, EngineError> {
    let valid: Vec<&Reply> = replies
        .iter()
        .filter(|r| match global.check_same_layout(&r.params) {
            Ok(()) if r.num_examples > 0 => true,
            Ok(()) => {
                tracing::warn!(
                    round = ctx.round,
                    client = r.client,
                    "update refused: zero examples"
                );
                false
            }
            Err(e) => {
                tracing::warn!(round = ctx.round, client = r.client, error = %e, "update refused");
                false
            }
        })
        .collect();
    if valid.is_empty() {
        return Err(EngineError::Method("no valid update to aggregate".into()));
    }
    Ok(valid)
}

/// Refuses a task whose kind is not `train`, naming the method whose client received it.
pub fn require_train(task: &Task, method: &str) -> Result<(), EngineError> {
    require_kind(task, &[TaskKind::TRAIN], method)
}

/// Refuses a task whose kind is not one of `kinds`, naming the method whose client received it.
pub fn require_kind(task: &Task, kinds: &[TaskKind], method: &str) -> Result<(), EngineError> {
    if !kinds.contains(&task.kind) {
        return Err(EngineError::Task(format!(
            "{method} clients do {} tasks, not `{}`",
            kinds
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", "),
            task.kind
        )));
    }
    Ok(())
}

/// The `[method]` table read as a method's options; the error names the table.
pub fn method_options<T: serde::de::DeserializeOwned>(exp: &Experiment) -> Result<T, EngineError> {
    toml::Value::Table(exp.method.clone())
        .try_into()
        .map_err(|e| EngineError::Config(format!("[method]: {e}")))
}

/// The `global` model of a checkpoint, checked against the layout of the current one.
pub fn checkpoint_global<'a>(
    state: &'a MethodState,
    current: &ParamSet,
) -> Result<&'a ParamSet, EngineError> {
    let global = state
        .params
        .get("global")
        .ok_or_else(|| EngineError::Method("checkpoint lacks the global model".into()))?;
    current.check_same_layout(global)?;
    Ok(global)
}

/// `task` with every tensor of its model: the ones it sends, and zeros for the ones it does
/// not (blocks its view skips, so their values never reach the output or the reply). A task
/// that sends a tensor its model lacks is refused.
pub fn with_unsent_zeroed(task: &Task) -> Result<Task, EngineError> {
    let mut full = Net::init_params(&task.model, 0)?;
    if let Some(name) = task.params.names().find(|n| full.get(n).is_none()) {
        return Err(EngineError::Task(format!(
            "the task sends `{name}`, which is not part of its model"
        )));
    }
    for t in full.iter_mut() {
        match task.params.get(&t.name) {
            Some(sent) => t.clone_from(sent),
            None => t.data.iter_mut().for_each(|v| *v = 0.0),
        }
    }
    Ok(Task {
        params: full,
        ..task.clone()
    })
}
