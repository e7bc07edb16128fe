//! FLL: federated layer-wise self-supervised learning with depth dropout (Guo et al. 2023,
//! methods.md §1), and its end-to-end baseline FedSSL.
//!
//! The encoder is a ViT; its final LayerNorm and linear `head` form the projection head that
//! every stage shares (the `head` maps the class token to `projection_dim` outputs, the NT-Xent
//! space). Training runs in stages, one per block: in stage `s` a client trains block `s` and
//! the head (stage 0 also trains the patch and position embeddings) on top of blocks `0..s`,
//! which run frozen (no gradients, no optimizer state, no kept activations), and uploads only
//! what it trained. Deeper blocks do not run and are not sent.
//!
//! Depth dropout (`dd_rate` p): once per client per round, each frozen block is dropped with
//! probability p (the input skips it through its residual path); a dropped block is neither
//! sent nor run. `dd_keep_last` always keeps the block just below the trained one. The draw
//! comes from (run seed, round, client) and is written to clients.jsonl (`dd_dropped`).
//!
//! Frozen tensors are sent with `hold` when `cache_frozen` is on (the default): a client keeps
//! them and later tasks send a reference. A frozen tensor never changes again, so it travels
//! once per client for the rest of the run (while the client's cache keeps it); off, frozen
//! blocks travel every round. Both are measured in bytes_down.
//!
//! Evaluation is a linear probe on the encoder's features (the class token after the final
//! LayerNorm) over the blocks trained so far; the driver also reports the probe on raw pixels
//! and on the untrained encoder (`probe_floor` in summary.json).
//!
//! `fedssl` trains the same encoder, head and objective end to end: every tensor is sent,
//! trained and uploaded every round.

mod client;
pub mod contrastive;
mod options;

pub use client::FllClient;
use options::Options;

use contrastive::{Augment, Loss, SelfSupervised};
use flotilla_core::ParamSet;
use flotilla_core::aggregate::{self, Support};
use flotilla_core::seed::{self, Purpose};
use flotilla_engine::TaskKind;
use flotilla_engine::local::Objective;
use flotilla_engine::local::{Recipe, estimate_memory, inputs_of};
use flotilla_engine::{
    Assignment, ClientInfo, EngineError, EvalModel, Experiment, MethodState, PhaseCtx, PhaseEnd,
    Readout, Reply, ServerCtx, ServerHalf, Task, TaskCost,
};
use flotilla_models::Architecture;
use flotilla_models::{ModelSpec, Net, View, flops};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Layer-wise (FLL) or end to end (FedSSL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One block per stage, earlier blocks frozen, with depth dropout.
    Layerwise,
    /// Every tensor trained every round.
    EndToEnd,
}

/// The ViT's tensors outside the blocks that come before them (trained in stage 0 only).
const STEM: [&str; 3] = ["patch_embed", "cls_token", "pos_embed"];

/// What an FLL or FedSSL task tells the client, in `Task::options`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SslTask {
    /// The block trained (FLL), or `None` when every tensor trains (FedSSL).
    pub stage: Option<usize>,
    /// Frozen blocks dropped this round (not sent, not run).
    pub dropped: Vec<usize>,
    /// Contrastive or supervised.
    pub objective: Loss,
    /// NT-Xent temperature.
    pub temperature: f64,
    /// Augmentations of each view.
    pub augment: Augment,
    /// What the server records about the task in clients.jsonl (the stage and the draw).
    #[serde(default)]
    pub record: serde_json::Value,
}

/// The server half of FLL and FedSSL.
pub struct Fll {
    mode: Mode,
    name: String,
    spec: ModelSpec,
    recipe: Recipe,
    blocks: usize,
    /// Last round of each stage.
    stage_ends: Vec<u64>,
    objective: Loss,
    temperature: f64,
    augment: Augment,
    dd_rate: f64,
    dd_keep_last: bool,
    cache_frozen: bool,
    global: ParamSet,
    /// The deepest block trained so far (`None` before the first aggregation).
    trained: Option<usize>,
}

impl Fll {
    /// Builds the server half from the `[method]` table; the initial encoder is drawn from
    /// the run seed.
    pub fn from_config(exp: &Experiment, spec: ModelSpec) -> Result<Self, EngineError> {
        let opts: Options = crate::common::method_options(exp)?;
        let mode = match opts.name.as_str() {
            "fll" => Mode::Layerwise,
            "fedssl" => Mode::EndToEnd,
            other => {
                return Err(EngineError::Config(format!(
                    "`method.name`: `{other}` is not fll or fedssl"
                )));
            }
        };
        let bad = |key: &str, msg: String| EngineError::Config(format!("`method.{key}` {msg}"));
        let Architecture::Vit { depth, .. } = spec.arch else {
            return Err(EngineError::Config(format!(
                "`{}` trains a ViT encoder (`model.arch = \"vit\"`), so that one projection head serves every stage",
                opts.name
            )));
        };
        if !spec.ranks.is_empty() {
            return Err(EngineError::Config(format!(
                "`{}` trains dense blocks; remove `model.ranks`",
                opts.name
            )));
        }
        if !(opts.temperature.is_finite() && opts.temperature > 0.0) {
            return Err(bad(
                "temperature",
                format!("must be positive, got {}", opts.temperature),
            ));
        }
        if opts.projection_dim < 2 {
            return Err(bad(
                "projection_dim",
                format!("must be at least 2, got {}", opts.projection_dim),
            ));
        }
        if !(0.0..=1.0).contains(&opts.dd_rate) {
            return Err(bad(
                "dd_rate",
                format!("must be in [0, 1], got {}", opts.dd_rate),
            ));
        }
        let augment = opts.augment.resolve();
        augment
            .validate()
            .map_err(|e| EngineError::Config(format!("[method]: {e}")))?;
        if mode == Mode::EndToEnd && (opts.dd_rate > 0.0 || opts.stage_rounds.is_some()) {
            return Err(EngineError::Config(
                "`fedssl` trains end to end: `method.dd_rate` and `method.stage_rounds` belong to `fll`".into(),
            ));
        }
        let stage_rounds = match opts.stage_rounds {
            Some(r) => {
                if r.len() != depth || r.contains(&0) {
                    return Err(bad(
                        "stage_rounds",
                        format!(
                            "must list one positive round count per block ({depth}), got {r:?}"
                        ),
                    ));
                }
                r
            }
            None => {
                let per = (exp.rounds / depth as u64).max(1);
                let mut r = vec![per; depth];
                r[depth - 1] += exp.rounds.saturating_sub(per * depth as u64);
                r
            }
        };
        let stage_ends = stage_rounds
            .iter()
            .scan(0u64, |end, r| {
                *end += r;
                Some(*end)
            })
            .collect();
        let spec = ModelSpec {
            classes: opts.projection_dim,
            ..spec
        };
        let global = Net::init_params(&spec, exp.seed)?;
        Ok(Self {
            mode,
            name: opts.name,
            spec,
            recipe: exp.training.clone(),
            blocks: depth,
            stage_ends,
            objective: opts.objective,
            temperature: opts.temperature,
            augment,
            dd_rate: opts.dd_rate,
            dd_keep_last: opts.dd_keep_last,
            cache_frozen: opts.cache_frozen,
            global,
            trained: None,
        })
    }

    /// The block trained in `round` (FLL): stages follow `stage_rounds`, rounds past the
    /// schedule stay in the last stage.
    pub fn stage_of(&self, round: u64) -> usize {
        self.stage_ends
            .iter()
            .position(|&end| round <= end)
            .unwrap_or(self.blocks - 1)
    }

    /// The frozen blocks client `client` drops in `round` when block `stage` trains: each
    /// of blocks `0..stage` with probability `dd_rate`, the last one kept under
    /// `dd_keep_last`, from the (seed, round, client) method stream.
    pub fn dropped_blocks(&self, seed: u64, round: u64, client: u64, stage: usize) -> Vec<usize> {
        if self.dd_rate == 0.0 {
            return Vec::new();
        }
        let mut rng = seed::rng(seed, round, client, Purpose::Method);
        (0..stage)
            .filter(|&j| {
                let drop = rng.random_bool(self.dd_rate);
                drop && !(self.dd_keep_last && j + 1 == stage)
            })
            .collect()
    }

    /// The view of a client that trains block `stage` with `dropped` frozen blocks skipped:
    /// blocks `0..=stage` run except the dropped ones, everything but block `stage` and the
    /// head is frozen (the stem too after stage 0).
    pub fn stage_view(&self, stage: usize, dropped: &[usize]) -> View {
        let mut frozen: Vec<String> = (0..self.blocks)
            .filter(|&j| j != stage)
            .map(|j| format!("blocks.{j}"))
            .collect();
        if stage > 0 {
            frozen.extend(STEM.iter().map(|s| s.to_string()));
        }
        View {
            active_blocks: Some(
                (0..self.blocks)
                    .map(|j| j <= stage && !dropped.contains(&j))
                    .collect(),
            ),
            frozen,
        }
    }

    /// The tensors a stage-`stage` client needs: the stem, the kept frozen blocks, block
    /// `stage` and the head.
    fn stage_params(&self, view: &View) -> ParamSet {
        self.global
            .filter(|n| ModelSpec::block_of(n).is_none_or(|b| view.block_active(b)))
    }

    /// The view, tensors and options of `client`'s task in `round`.
    fn task_parts(&self, ctx: &PhaseCtx, client: u64) -> (View, ParamSet, SslTask) {
        match self.mode {
            Mode::EndToEnd => {
                let task = SslTask {
                    stage: None,
                    dropped: Vec::new(),
                    objective: self.objective,
                    temperature: self.temperature,
                    augment: self.augment,
                    record: serde_json::Value::Null,
                };
                (View::full(), self.global.clone(), task)
            }
            Mode::Layerwise => {
                let stage = self.stage_of(ctx.round);
                let dropped = self.dropped_blocks(ctx.seed, ctx.round, client, stage);
                let view = self.stage_view(stage, &dropped);
                let params = self.stage_params(&view);
                let record = serde_json::json!({ "stage": stage, "dd_dropped": dropped });
                let task = SslTask {
                    stage: Some(stage),
                    dropped,
                    objective: self.objective,
                    temperature: self.temperature,
                    augment: self.augment,
                    record,
                };
                (view, params, task)
            }
        }
    }

    /// The training memory estimate of a task with `view` (every block of the model is
    /// built on the client; the objective runs two views of each image).
    fn memory_need(&self, view: &View) -> u64 {
        estimate_memory(
            &self.spec,
            view,
            &self.global,
            &inputs_of::<SelfSupervised>(&self.recipe),
        )
        .total()
    }

    /// The encoder as evaluated: the blocks trained so far (all of them for FedSSL).
    fn eval_view(&self) -> View {
        match self.mode {
            Mode::EndToEnd => View::full(),
            Mode::Layerwise => {
                let through = self.trained.unwrap_or(0);
                View::depth_prefix(through + 1, self.blocks)
            }
        }
    }
}

impl ServerHalf for Fll {
    fn name(&self) -> &str {
        &self.name
    }

    fn plan(&self, ctx: &PhaseCtx, clients: &[ClientInfo]) -> Result<Vec<Assignment>, EngineError> {
        Ok(clients
            .iter()
            .map(|c| {
                let (view, params, options) = self.task_parts(ctx, c.id);
                let need = self.memory_need(&view);
                if need > c.profile.memory_bytes {
                    return Assignment::Skip(format!(
                        "training {} needs about {:.1} MiB, the {} device has {:.1} MiB",
                        options
                            .stage
                            .map_or("the whole encoder".to_string(), |s| format!("block {s}")),
                        need as f64 / 1048576.0,
                        c.profile.tier,
                        c.profile.memory_bytes as f64 / 1048576.0
                    ));
                }
                let hold = if self.cache_frozen {
                    params
                        .names()
                        .filter(|n| view.is_frozen(n))
                        .map(str::to_string)
                        .collect()
                } else {
                    Vec::new()
                };
                Assignment::Run(Box::new(Task {
                    round: ctx.round,
                    phase: ctx.phase,
                    client: c.id,
                    kind: TaskKind::TRAIN,
                    model: self.spec.clone(),
                    view,
                    recipe: self.recipe.clone(),
                    params,
                    masks: Vec::new(),
                    hold,
                    options: serde_json::to_value(options).expect("serialisable"),
                }))
            })
            .collect())
    }

    /// A reply holds exactly what the task trained: block `s` and the head (and the stem in
    /// stage 0), every tensor for FedSSL; nothing frozen, nothing missing.
    fn check_reply(&self, task: &Task, reply: &Reply) -> Result<(), String> {
        let trained = task.params.filter(|n| !task.view.is_frozen(n));
        trained
            .check_same_layout(&reply.params)
            .map_err(|e| format!("update does not match the tensors the task trains: {e}"))
    }

    fn aggregate(
        &mut self,
        ctx: &PhaseCtx,
        replies: &[Reply],
        _server: &mut ServerCtx<'_>,
    ) -> Result<PhaseEnd, EngineError> {
        if replies.is_empty() {
            return Ok(PhaseEnd::RoundComplete);
        }
        let contribs = crate::common::contributions(replies);
        self.global = aggregate::weighted_mean_partial(&self.global, &contribs, Support::Holders)?;
        self.trained = Some(match self.mode {
            Mode::EndToEnd => self.blocks - 1,
            Mode::Layerwise => {
                let s = self.stage_of(ctx.round);
                self.trained.map_or(s, |t| t.max(s))
            }
        });
        Ok(PhaseEnd::RoundComplete)
    }

    /// Two augmented views of every sample go through the model.
    fn task_cost(&self, task: &Task) -> TaskCost {
        TaskCost {
            memory_bytes: self.memory_need(&task.view),
            flops_per_sample: flops::training(
                &task.model,
                &task.view,
                SelfSupervised::INPUTS_PER_SAMPLE,
            ),
        }
    }

    fn eval_models(&self) -> Vec<EvalModel> {
        vec![EvalModel {
            label: "encoder".into(),
            spec: self.spec.clone(),
            view: self.eval_view(),
            params: self.global.clone(),
            devices: None,
            readout: Readout::LinearProbe,
        }]
    }

    fn round_metrics(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        let trained = self.trained.map_or(0, |t| t + 1);
        m.insert("trained_blocks".into(), trained.into());
        m
    }

    fn snapshot(&self) -> MethodState {
        MethodState {
            params: BTreeMap::from([("global".to_string(), self.global.clone())]),
            json: serde_json::json!({ "trained": self.trained }),
        }
    }

    fn restore(&mut self, state: MethodState) -> Result<(), EngineError> {
        self.global = crate::common::checkpoint_global(&state, &self.global)?.clone();
        self.trained = match &state.json["trained"] {
            serde_json::Value::Null => None,
            v => Some(
                v.as_u64()
                    .filter(|&t| (t as usize) < self.blocks)
                    .ok_or_else(|| {
                        EngineError::Method(format!("checkpoint: `trained` is {v}, not a block"))
                    })? as usize,
            ),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A depth-4 ViT experiment of 10 rounds with `method` as its `[method]` table.
    fn experiment(method: &str) -> Experiment {
        toml::from_str(&format!(
            r#"
            seed = 1
            rounds = 10
            [data]
            dataset = "fashion-mnist"
            num_clients = 4
            partition = {{ kind = "iid" }}
            [model]
            arch = "vit"
            patch = 7
            dim = 16
            depth = 4
            heads = 2
            [training]
            epochs = 1
            batch_size = 16
            optimizer = "adam"
            lr = 0.001
            [method]
            {method}
            "#
        ))
        .unwrap()
    }

    fn server(method: &str) -> Fll {
        let exp = experiment(method);
        Fll::from_config(&exp, exp.model_spec()).unwrap()
    }

    #[test]
    fn equal_stages_give_the_remainder_to_the_last() {
        let s = server("name = \"fll\"");
        let stages: Vec<usize> = (1..=12).map(|r| s.stage_of(r)).collect();
        assert_eq!(stages, [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3]);
    }

    #[test]
    fn a_stage_view_trains_one_block_and_the_head() {
        let s = server("name = \"fll\"");
        let v = s.stage_view(2, &[0]);
        assert_eq!(v.active_blocks, Some(vec![false, true, true, false]));
        let trainable: Vec<&str> = s.global.names().filter(|n| !v.is_frozen(n)).collect();
        assert!(!trainable.is_empty());
        for n in &trainable {
            assert!(
                n.starts_with("blocks.2.") || n.starts_with("norm.") || n.starts_with("head."),
                "{n} trains in stage 2"
            );
        }
        let v0 = s.stage_view(0, &[]);
        assert!(
            !v0.is_frozen("patch_embed.weight"),
            "stage 0 trains the stem"
        );
        assert!(v.is_frozen("patch_embed.weight"), "later stages do not");
    }

    #[test]
    fn depth_dropout_draws_follow_the_rate_and_the_seed() {
        let none = server("name = \"fll\"");
        assert!(none.dropped_blocks(1, 3, 2, 3).is_empty());
        let all = server("name = \"fll\"\ndd_rate = 1.0");
        assert_eq!(all.dropped_blocks(1, 3, 2, 3), vec![0, 1, 2]);
        let keep = server("name = \"fll\"\ndd_rate = 1.0\ndd_keep_last = true");
        assert_eq!(keep.dropped_blocks(1, 3, 2, 3), vec![0, 1]);
        let half = server("name = \"fll\"\ndd_rate = 0.5");
        let a = half.dropped_blocks(7, 3, 2, 3);
        assert_eq!(a, half.dropped_blocks(7, 3, 2, 3), "seeded");
        let total: usize = (0..400)
            .map(|c| half.dropped_blocks(7, 3, c, 3).len())
            .sum();
        let rate = total as f64 / 1200.0;
        assert!((rate - 0.5).abs() < 0.06, "drop rate {rate}");
    }

    #[test]
    fn bad_options_name_the_key() {
        let exp = experiment("name = \"fll\"\nstage_rounds = [1, 2]");
        let e = Fll::from_config(&exp, exp.model_spec()).err().unwrap();
        assert!(e.to_string().contains("stage_rounds"), "{e}");
        let mut cnn = exp.clone();
        cnn.model.arch = Architecture::Cnn;
        let e = Fll::from_config(&cnn, cnn.model_spec()).err().unwrap();
        assert!(e.to_string().contains("vit"), "{e}");
    }
}
