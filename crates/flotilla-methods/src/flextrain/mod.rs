//! FlexTrain (Unsal et al. 2023, Algorithm 2) and the paper's baselines FedSmall and FedClass.
//!
//! One global ResNet or ViT; a device trains the prefix of blocks its memory allows (stem,
//! blocks `0..k`, classifier; deeper blocks are skipped through their shortcut). The planner
//! picks `k` per device from its profile: the deepest allowed depth whose training estimate
//! fits the device's memory. The device sends back only its prefix. While training, its own
//! depth is the detached teacher of the one-block-shallower prefix (auto-distillation,
//! β‖f(W̃_{k−1}) − sg f(W̃_k)‖²); devices of the shallowest class skip the term.
//!
//! Aggregation is the paper's by default: every reply counts for every tensor, a reply that
//! lacks a deep block counting with the current global value, weighted by examples (methods.md
//! §3.8.5–6). `aggregation = "holders"` averages each tensor only over the replies that hold
//! it (HeteroFL-style).
//!
//! Evaluation: each device uses the deepest prefix it can host; the models evaluated are one
//! prefix per capability class (depth) with its number of devices, so the reported test
//! accuracy is the mean over devices (`mean_device_accuracy`).
//!
//! Baselines (same module, same prefix machinery, no distillation):
//! - `fedsmall`: FedAvg of the largest prefix the weakest device of the fleet can train; every
//!   device trains and deploys that prefix.
//! - `fedclass`: one FedAvg model per capability class (devices of the same depth), no sharing
//!   between classes; each class deploys its own model at its depth.

use flotilla_core::ParamSet;
use flotilla_core::aggregate::{self, Support};
use flotilla_engine::local::{Recipe, estimate_memory, train_task};

mod objective;
use flotilla_engine::TaskKind;
use flotilla_engine::{
    Assignment, ClientCtx, ClientData, ClientHalf, ClientInfo, EngineError, EvalModel, Experiment,
    MethodState, PhaseCtx, PhaseEnd, Reply, ServerCtx, ServerHalf, Task,
};
use flotilla_models::{ModelSpec, View, flops};
pub use objective::{DeviceDepth, DistillOn, SampledDepth};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Which of the three methods of the paper's federated comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Federated FlexTrain: one model, each device at its own depth, with auto-distillation.
    FlexTrain,
    /// FedAvg on the largest prefix the weakest device can run.
    FedSmall,
    /// One FedAvg model per capability class, no sharing.
    FedClass,
}

/// How replies holding different prefixes are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// The paper's rule: a reply lacking a block counts with the block's global value.
    #[default]
    All,
    /// Each tensor is averaged only over the replies that trained it.
    Holders,
}

/// Which shallower prefix a device distils into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Student {
    /// One residual block shallower (the paper's k − 1).
    #[default]
    OneBlock,
    /// The next shallower capability class present in the fleet (methods.md §3.8.4 option).
    NextClass,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    name: String,
    /// Distillation weight β (0.2 in the paper).
    #[serde(default = "default_beta")]
    beta: f64,
    #[serde(default)]
    aggregation: Aggregation,
    #[serde(default)]
    student: Student,
    /// Output the distillation term compares: "logits" (default) or "softmax".
    #[serde(default)]
    distill_on: DistillOn,
    /// Depths a device may be given (the capability table); default every depth 1..=K.
    #[serde(default)]
    depths: Option<Vec<usize>>,
}

fn default_beta() -> f64 {
    0.2
}

/// What a FlexTrain task tells the client, in `Task::options`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DepthTask {
    /// Blocks the device trains (its prefix depth).
    pub depth: usize,
    /// The shallower prefix distilled toward `depth`, if any.
    pub student: Option<usize>,
    /// Distillation weight β.
    pub beta: f64,
    /// Output the distillation term compares.
    #[serde(default)]
    pub distill_on: DistillOn,
}

/// The server half of FlexTrain, FedSmall and FedClass.
pub struct FlexTrain {
    mode: Mode,
    name: String,
    spec: ModelSpec,
    recipe: Recipe,
    beta: f64,
    aggregation: Aggregation,
    student: Student,
    distill_on: DistillOn,
    blocks: usize,
    /// Allowed depths, ascending, with the training memory estimate of each.
    need: Vec<(usize, u64)>,
    init: ParamSet,
    /// The global model (FlexTrain, FedSmall).
    global: ParamSet,
    /// One model per capability class, by depth (FedClass).
    classes: BTreeMap<usize, ParamSet>,
    /// The affordable depth of every observed device that fits a prefix.
    device_depth: HashMap<u64, usize>,
}

impl FlexTrain {
    /// Builds the server half from the `[method]` table.
    pub fn from_config(
        exp: &Experiment,
        spec: ModelSpec,
        init: ParamSet,
    ) -> Result<Self, EngineError> {
        let opts: Options = crate::common::method_options(exp)?;
        let mode = match opts.name.as_str() {
            "flextrain" => Mode::FlexTrain,
            "fedsmall" => Mode::FedSmall,
            "fedclass" => Mode::FedClass,
            other => {
                return Err(EngineError::Config(format!(
                    "`method.name` `{other}` is not flextrain, fedsmall or fedclass"
                )));
            }
        };
        let blocks = spec.num_blocks();
        if blocks == 0 {
            return Err(EngineError::Config(format!(
                "{} needs a model with blocks: set [model] arch = \"resnet\" or \"vit\"",
                opts.name
            )));
        }
        if !(opts.beta.is_finite() && opts.beta >= 0.0) {
            return Err(EngineError::Config(format!(
                "`method.beta` must be a non-negative number, got {}",
                opts.beta
            )));
        }
        let depths = opts.depths.unwrap_or_else(|| (1..=blocks).collect());
        if depths.is_empty()
            || depths.windows(2).any(|w| w[0] >= w[1])
            || depths[0] == 0
            || depths[depths.len() - 1] > blocks
        {
            return Err(EngineError::Config(format!(
                "`method.depths` must be ascending depths in 1..={blocks} (the model's blocks), got {depths:?}"
            )));
        }
        let recipe = exp.training.clone();
        let need: Vec<(usize, u64)> = depths
            .iter()
            .map(|&d| {
                let view = View::trainable_prefix(d, blocks);
                (d, estimate_memory(&spec, &view, &init, &recipe).total())
            })
            .collect();
        for (d, bytes) in &need {
            tracing::debug!(
                depth = d,
                mib = *bytes as f64 / 1048576.0,
                "training memory estimate of the prefix"
            );
        }
        Ok(Self {
            mode,
            name: opts.name,
            spec,
            recipe,
            beta: if mode == Mode::FlexTrain {
                opts.beta
            } else {
                0.0
            },
            aggregation: opts.aggregation,
            student: opts.student,
            distill_on: opts.distill_on,
            blocks,
            need,
            global: init.clone(),
            init,
            classes: BTreeMap::new(),
            device_depth: HashMap::new(),
        })
    }

    /// The deepest allowed prefix whose training fits `memory_bytes`.
    pub fn affordable_depth(&self, memory_bytes: u64) -> Option<usize> {
        self.need
            .iter()
            .rev()
            .find(|(_, need)| *need <= memory_bytes)
            .map(|(d, _)| *d)
    }

    /// The training memory estimate of each allowed depth, bytes.
    pub fn memory_needs(&self) -> &[(usize, u64)] {
        &self.need
    }

    /// The global model (FlexTrain and FedSmall).
    pub fn global(&self) -> &ParamSet {
        &self.global
    }

    /// Observed devices per capability class (depth).
    pub fn class_sizes(&self) -> BTreeMap<usize, u64> {
        let mut out = BTreeMap::new();
        for d in self.device_depth.values() {
            *out.entry(*d).or_insert(0) += 1;
        }
        out
    }

    fn weakest(&self) -> Option<usize> {
        self.device_depth.values().min().copied()
    }

    /// The depth a device trains and deploys, from its affordable depth.
    fn deployed_depth(&self, affordable: usize) -> usize {
        match self.mode {
            Mode::FedSmall => self.weakest().map_or(affordable, |w| w.min(affordable)),
            Mode::FlexTrain | Mode::FedClass => affordable,
        }
    }

    /// The shallower prefix a device of `depth` distils into.
    fn student_of(&self, depth: usize) -> Option<usize> {
        if self.mode != Mode::FlexTrain || self.beta == 0.0 {
            return None;
        }
        match self.student {
            // The weakest class has nobody shallower to teach.
            Student::OneBlock => {
                (self.weakest().is_none_or(|w| depth > w) && depth > 0).then(|| depth - 1)
            }
            Student::NextClass => self
                .device_depth
                .values()
                .filter(|&&d| d < depth)
                .max()
                .copied(),
        }
    }

    fn model_of(&self, depth: usize) -> &ParamSet {
        match self.mode {
            Mode::FedClass => self.classes.get(&depth).unwrap_or(&self.init),
            _ => &self.global,
        }
    }

    /// Tensors of the depth-`depth` prefix (stem, blocks `0..depth`, classifier).
    fn prefix(params: &ParamSet, depth: usize) -> ParamSet {
        params.filter(|n| ModelSpec::in_prefix(n, depth))
    }

    /// The prefix depth a reply holds: one past its deepest block.
    fn reply_depth(reply: &Reply) -> usize {
        reply
            .params
            .names()
            .filter_map(ModelSpec::block_of)
            .max()
            .map_or(0, |b| b + 1)
    }

    fn averaged(
        &self,
        base: &ParamSet,
        replies: &[&Reply],
        support: Support,
    ) -> Result<ParamSet, EngineError> {
        let contribs = crate::common::contributions(replies);
        Ok(aggregate::weighted_mean_partial(base, &contribs, support)?)
    }

    /// Fraction of the model's parameters in the depth-`depth` prefix (A_k / A).
    fn param_fraction(&self, depth: usize) -> f64 {
        let in_prefix: usize = self
            .init
            .iter()
            .filter(|t| ModelSpec::in_prefix(&t.name, depth))
            .map(|t| t.numel())
            .sum();
        in_prefix as f64 / self.init.numel() as f64
    }

    /// Fraction of the full model's forward FLOPs the depth-`depth` prefix costs.
    fn flop_fraction(&self, depth: usize) -> f64 {
        flops::forward_per_sample(&self.spec, &View::depth_prefix(depth, self.blocks))
            / flops::forward_per_sample(&self.spec, &View::full())
    }
}

impl ServerHalf for FlexTrain {
    fn name(&self) -> &str {
        &self.name
    }

    fn observe(&mut self, clients: &[ClientInfo]) {
        for c in clients {
            match self.affordable_depth(c.profile.memory_bytes) {
                Some(d) => {
                    self.device_depth.insert(c.id, d);
                    if self.mode == Mode::FedClass && !self.classes.contains_key(&d) {
                        self.classes.insert(d, self.init.clone());
                    }
                }
                None => {
                    self.device_depth.remove(&c.id);
                }
            }
        }
    }

    fn plan(&self, ctx: &PhaseCtx, clients: &[ClientInfo]) -> Result<Vec<Assignment>, EngineError> {
        Ok(clients
            .iter()
            .map(|c| {
                let Some(affordable) = self.affordable_depth(c.profile.memory_bytes) else {
                    let (d, need) = self.need[0];
                    return Assignment::Skip(format!(
                        "the {} device has {:.1} MiB, which fits no prefix of the model: the shallowest allowed (depth {d}) needs about {:.1} MiB",
                        c.profile.tier,
                        c.profile.memory_bytes as f64 / 1048576.0,
                        need as f64 / 1048576.0
                    ));
                };
                let depth = self.deployed_depth(affordable);
                let options = DepthTask {
                    depth,
                    student: self.student_of(depth),
                    beta: self.beta,
                    distill_on: self.distill_on,
                };
                Assignment::Run(Box::new(Task {
                    round: ctx.round,
                    phase: ctx.phase,
                    client: c.id,
                    kind: TaskKind::TRAIN,
                    model: self.spec.clone(),
                    view: View::trainable_prefix(depth, self.blocks),
                    recipe: self.recipe.clone(),
                    params: Self::prefix(self.model_of(depth), depth),
                    masks: Vec::new(),
                    hold: Vec::new(),
                    options: serde_json::to_value(options).expect("serialisable"),
                }))
            })
            .collect())
    }

    /// A reply holds exactly the prefix the task sent: no deeper block, nothing missing.
    fn check_reply(&self, task: &Task, reply: &Reply) -> Result<(), String> {
        task.params
            .check_same_layout(&reply.params)
            .map_err(|e| format!("update does not match the task's prefix: {e}"))
    }

    fn aggregate(
        &mut self,
        _ctx: &PhaseCtx,
        replies: &[Reply],
        _server: &mut ServerCtx<'_>,
    ) -> Result<PhaseEnd, EngineError> {
        if replies.is_empty() {
            return Ok(PhaseEnd::RoundComplete);
        }
        match self.mode {
            Mode::FlexTrain | Mode::FedSmall => {
                let support = match self.aggregation {
                    Aggregation::All => Support::All,
                    Aggregation::Holders => Support::Holders,
                };
                let all: Vec<&Reply> = replies.iter().collect();
                self.global = self.averaged(&self.global, &all, support)?;
            }
            Mode::FedClass => {
                let mut by_class: BTreeMap<usize, Vec<&Reply>> = BTreeMap::new();
                for r in replies {
                    by_class.entry(Self::reply_depth(r)).or_default().push(r);
                }
                for (depth, group) in by_class {
                    let base = self.model_of(depth).clone();
                    let new = self.averaged(&base, &group, Support::All)?;
                    self.classes.insert(depth, new);
                }
            }
        }
        Ok(PhaseEnd::RoundComplete)
    }

    fn eval_models(&self) -> Vec<EvalModel> {
        let sizes = self.class_sizes();
        let model = |depth: usize, devices: u64| EvalModel {
            label: format!("depth-{depth}"),
            spec: self.spec.clone(),
            view: View::depth_prefix(depth, self.blocks),
            params: self.model_of(depth).clone(),
            devices: Some(devices),
            readout: flotilla_engine::Readout::Classifier,
        };
        if sizes.is_empty() {
            // No fleet observed yet: the full model.
            return vec![EvalModel {
                label: "global".into(),
                spec: self.spec.clone(),
                view: View::full(),
                params: self.global.clone(),
                devices: None,
                readout: flotilla_engine::Readout::Classifier,
            }];
        }
        match self.mode {
            Mode::FedSmall => {
                let depth = *sizes.keys().next().expect("non-empty");
                vec![model(depth, sizes.values().sum())]
            }
            Mode::FlexTrain | Mode::FedClass => sizes.iter().map(|(&d, &n)| model(d, n)).collect(),
        }
    }

    /// The fleet's expected share of parameters and of FLOPs a device trains (r̄ of
    /// methods.md §3.2 with π = the fleet's depth shares; FedSmall: everyone at its depth).
    fn round_metrics(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        let sizes = self.class_sizes();
        let devices: u64 = sizes.values().sum();
        if devices == 0 {
            return m;
        }
        let (mut params, mut flops) = (0.0, 0.0);
        for (&d, &n) in &sizes {
            let depth = self.deployed_depth(d);
            params += n as f64 * self.param_fraction(depth);
            flops += n as f64 * self.flop_fraction(depth);
        }
        m.insert(
            "expected_param_fraction".into(),
            (params / devices as f64).into(),
        );
        m.insert(
            "expected_flop_fraction".into(),
            (flops / devices as f64).into(),
        );
        m
    }

    fn snapshot(&self) -> MethodState {
        let params = match self.mode {
            Mode::FedClass => self
                .classes
                .iter()
                .map(|(d, p)| (format!("class-{d}"), p.clone()))
                .collect(),
            _ => BTreeMap::from([("global".to_string(), self.global.clone())]),
        };
        MethodState {
            params,
            json: serde_json::Value::Null,
        }
    }

    fn restore(&mut self, state: MethodState) -> Result<(), EngineError> {
        match self.mode {
            Mode::FedClass => {
                let mut classes = BTreeMap::new();
                for (name, p) in state.params {
                    let depth = name
                        .strip_prefix("class-")
                        .and_then(|d| d.parse::<usize>().ok())
                        .ok_or_else(|| {
                            EngineError::Method(format!(
                                "checkpoint holds an unknown model `{name}`"
                            ))
                        })?;
                    self.init.check_same_layout(&p)?;
                    classes.insert(depth, p);
                }
                self.classes.extend(classes);
            }
            _ => self.global = crate::common::checkpoint_global(&state, &self.global)?.clone(),
        }
        Ok(())
    }
}

/// The client half: fills the blocks it was not sent (skipped, so their values never reach
/// the output), trains its prefix with auto-distillation and replies with the prefix only.
pub struct FlexTrainClient;

impl ClientHalf for FlexTrainClient {
    fn execute(
        &self,
        task: &Task,
        data: &ClientData,
        ctx: &ClientCtx,
    ) -> Result<Reply, EngineError> {
        crate::common::require_train(task, "flextrain")?;
        let opts: DepthTask = serde_json::from_value(task.options.clone())
            .map_err(|e| EngineError::Task(format!("flextrain task options: {e}")))?;
        let blocks = task.model.num_blocks();
        if task.view != View::trainable_prefix(opts.depth, blocks) {
            return Err(EngineError::Task(format!(
                "the task's view is not the trainable depth-{} prefix",
                opts.depth
            )));
        }
        if let Some(name) = task
            .params
            .names()
            .find(|n| !ModelSpec::in_prefix(n, opts.depth))
        {
            return Err(EngineError::Task(format!(
                "the task sends `{name}`, deeper than its depth {}",
                opts.depth
            )));
        }
        // Zeros for the skipped blocks: they run as shortcuts and are frozen, so neither the
        // output nor the reply depends on them.
        let filled = crate::common::with_unsent_zeroed(task)?;
        let objective = DeviceDepth {
            depth: opts.depth,
            student: opts.student,
            beta: opts.beta,
            on: opts.distill_on,
        };
        train_task(&filled, data, ctx, || Ok(objective))
    }
}
