//! FedMap (Herzog et al., arXiv 2406.19050): iterative global magnitude pruning on nested
//! masks, from scratch, with messages that shrink with the model. Spec: methods.md §5.
//!
//! What is the paper's and what is ours (the paper's text beyond the abstract was not
//! available): global, unstructured, iterative magnitude pruning with nested masks and a
//! global rate p_G are the paper's [A/S]. The schedule (dense warm-up of `warmup` rounds, an
//! event every `period` rounds, p_G = 0.2, target 0.9), ties broken by position, the per-layer
//! density floor, server-side pruning of the aggregated model, and the masked encoding (active
//! values in canonical order, the mask sent only to a client that lacks the current one) are
//! our choices, following methods.md §5.2–5.8.
//!
//! Variants, for the comparison the paper makes:
//! - `nested` (FedMap): each event prunes a fraction p_G of the *remaining* weights; a pruned
//!   weight never returns;
//! - `recompute` (non-nested baseline): each event recomputes the mask from the magnitudes of a
//!   dense shadow model in which pruned weights keep their last values, so they can return;
//! - `one-shot` (baseline): dense training, pruned once to the target at the last round.
//!
//! Prunable tensors: conv and linear weights (rank ≥ 2, named `*.weight`); biases,
//! normalisation parameters and embeddings are never pruned.

use crate::common::{check_full_model_reply, plan_full_model, valid_updates};
use flotilla_core::ParamSet;
use flotilla_core::aggregate;
use flotilla_core::wire::Mask;
use flotilla_engine::local::{CrossEntropy, Recipe, train_task};
use flotilla_engine::method::KnownMasks;
use flotilla_engine::{
    Assignment, ClientCtx, ClientData, ClientHalf, ClientInfo, EngineError, EvalModel, Experiment,
    MethodState, PhaseCtx, PhaseEnd, Reply, ServerCtx, ServerHalf, Task,
};
use flotilla_models::{ModelSpec, View};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which pruning scheme runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// FedMap: nested masks.
    Nested,
    /// Baseline: masks recomputed from dense magnitudes at each event.
    Recompute,
    /// Baseline: one pruning step to the target after the last round.
    OneShot,
}

/// The `[method]` options of FedMap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FedMapOptions {
    /// Method name (`fedmap`).
    pub name: String,
    /// Pruning scheme.
    #[serde(default = "nested")]
    pub variant: Variant,
    /// Fraction of the remaining prunable weights removed at each event (p_G).
    #[serde(default = "rate")]
    pub rate: f64,
    /// Rounds between events (T_p).
    #[serde(default = "period")]
    pub period: u64,
    /// Dense rounds before the first event.
    #[serde(default = "warmup")]
    pub warmup: u64,
    /// Pruning stops at this fraction of prunable weights removed.
    #[serde(default = "target")]
    pub target_sparsity: f64,
    /// No tensor keeps fewer than this fraction of its weights (no layer collapse).
    #[serde(default = "min_density")]
    pub min_layer_density: f64,
}

fn nested() -> Variant {
    Variant::Nested
}
fn rate() -> f64 {
    0.2
}
fn period() -> u64 {
    5
}
fn warmup() -> u64 {
    10
}
fn target() -> f64 {
    0.9
}
fn min_density() -> f64 {
    0.01
}

/// Whether a tensor is pruned: conv and linear weights.
pub fn is_prunable(name: &str, shape: &[usize]) -> bool {
    shape.len() >= 2 && name.ends_with(".weight")
}

/// The server half of FedMap and its baselines.
pub struct FedMap {
    opts: FedMapOptions,
    spec: ModelSpec,
    recipe: Recipe,
    rounds: u64,
    global: ParamSet,
    /// One mask per prunable tensor, all active at the start.
    masks: BTreeMap<String, Mask>,
    /// `recompute` only: the dense shadow whose magnitudes decide each new mask.
    shadow: Option<ParamSet>,
    events: u32,
}

impl FedMap {
    /// Builds the server half from the `[method]` table.
    pub fn from_config(
        exp: &Experiment,
        spec: ModelSpec,
        init: ParamSet,
    ) -> Result<Self, EngineError> {
        let opts: FedMapOptions = crate::common::method_options(exp)?;
        let bad = |k: &str, m: String| Err(EngineError::Config(format!("`method.{k}` {m}")));
        if !(opts.rate > 0.0 && opts.rate < 1.0) {
            return bad("rate", format!("must be in (0, 1), got {}", opts.rate));
        }
        if opts.period == 0 {
            return bad("period", "must be at least 1".into());
        }
        if !(opts.target_sparsity > 0.0 && opts.target_sparsity < 1.0) {
            return bad(
                "target_sparsity",
                format!("must be in (0, 1), got {}", opts.target_sparsity),
            );
        }
        if !(opts.min_layer_density > 0.0 && opts.min_layer_density <= 1.0) {
            return bad(
                "min_layer_density",
                format!("must be in (0, 1], got {}", opts.min_layer_density),
            );
        }
        let masks = init
            .iter()
            .filter(|t| is_prunable(&t.name, &t.shape))
            .map(|t| (t.name.clone(), Mask::full(t.name.clone(), t.numel())))
            .collect();
        let shadow = (opts.variant == Variant::Recompute).then(|| init.clone());
        Ok(Self {
            opts,
            spec,
            recipe: exp.training.clone(),
            rounds: exp.rounds,
            global: init,
            masks,
            shadow,
            events: 0,
        })
    }

    /// The current global model (pruned entries are exactly zero).
    pub fn global(&self) -> &ParamSet {
        &self.global
    }

    /// The current masks.
    pub fn current_masks(&self) -> &BTreeMap<String, Mask> {
        &self.masks
    }

    /// Prunable weights in total and still active.
    pub fn counts(&self) -> (usize, usize) {
        let total = self.masks.values().map(|m| m.active.len()).sum();
        let active = self.masks.values().map(Mask::count_active).sum();
        (total, active)
    }

    fn apply_masks(&mut self) {
        for t in self.global.iter_mut() {
            if let Some(m) = self.masks.get(&t.name) {
                for (v, a) in t.data.iter_mut().zip(&m.active) {
                    if !*a {
                        *v = 0.0;
                    }
                }
            }
        }
    }

    /// Whether this round ends with a pruning event.
    fn event_due(&self, round: u64) -> bool {
        match self.opts.variant {
            Variant::OneShot => round == self.rounds,
            _ => {
                round >= self.opts.warmup
                    && (round - self.opts.warmup).is_multiple_of(self.opts.period)
                    && round > 0
            }
        }
    }

    /// One pruning event. `nested`: removes `rate` of the active weights with the smallest
    /// magnitude; `recompute`: keeps the largest shadow magnitudes at the new density;
    /// `one-shot`: prunes straight to the target. Ties break by position (tensor order, then
    /// index), and no tensor drops below the density floor.
    pub fn prune(&mut self) {
        let (total, active) = self.counts();
        let floor_active = ((1.0 - self.opts.target_sparsity) * total as f64).ceil() as usize;
        let keep = match self.opts.variant {
            // exactly (1 − p_G) of what is active now
            Variant::Nested => {
                (((1.0 - self.opts.rate) * active as f64).round() as usize).max(floor_active)
            }
            // the same density schedule, recomputed from scratch
            Variant::Recompute => {
                let density = (1.0 - self.opts.rate).powi(self.events as i32 + 1);
                ((density * total as f64).round() as usize).max(floor_active)
            }
            Variant::OneShot => floor_active,
        };
        let source = self.shadow.as_ref().unwrap_or(&self.global);
        let nested = self.opts.variant != Variant::Recompute;
        // Candidates: (|w|, tensor index, position); nested schemes rank only active weights.
        let mut ranked: Vec<(f32, usize, usize)> = Vec::new();
        let names: Vec<String> = self.masks.keys().cloned().collect();
        for (ti, name) in names.iter().enumerate() {
            let (mask, values) = (
                &self.masks[name],
                &source
                    .get(name)
                    .expect("mask names come from the model")
                    .data,
            );
            for (i, (v, a)) in values.iter().zip(&mask.active).enumerate() {
                if *a || !nested {
                    ranked.push((v.abs(), ti, i));
                }
            }
        }
        if keep >= ranked.len() && nested {
            return;
        }
        // Largest first; ties by position so the kept set is exact and reproducible.
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let floors: Vec<usize> = names
            .iter()
            .map(|n| {
                ((self.opts.min_layer_density * self.masks[n].active.len() as f64).ceil() as usize)
                    .max(1)
            })
            .collect();
        let mut new: Vec<Vec<bool>> = names
            .iter()
            .map(|n| vec![false; self.masks[n].active.len()])
            .collect();
        let mut kept_per: Vec<usize> = vec![0; names.len()];
        // Each tensor first keeps its floor (its largest weights), then the global ranking
        // fills the remaining budget.
        for &(_, ti, i) in &ranked {
            if kept_per[ti] < floors[ti] {
                new[ti][i] = true;
                kept_per[ti] += 1;
            }
        }
        let mut kept: usize = kept_per.iter().sum();
        for &(_, ti, i) in &ranked {
            if kept >= keep {
                break;
            }
            if !new[ti][i] {
                new[ti][i] = true;
                kept += 1;
            }
        }
        for (name, active) in names.iter().zip(new) {
            self.masks.get_mut(name).expect("known").active = active;
        }
        self.events += 1;
        if let Some(shadow) = &self.shadow {
            // Reactivated weights restart from their shadow value.
            let shadow = shadow.clone();
            for t in self.global.iter_mut() {
                if self.masks.contains_key(&t.name) {
                    t.data
                        .copy_from_slice(&shadow.get(&t.name).expect("same layout").data);
                }
            }
        }
        self.apply_masks();
    }
}

impl ServerHalf for FedMap {
    fn name(&self) -> &str {
        &self.opts.name
    }

    fn plan(&self, ctx: &PhaseCtx, clients: &[ClientInfo]) -> Result<Vec<Assignment>, EngineError> {
        let note = " (unstructured sparsity saves bytes on the wire, not training memory)";
        Ok(plan_full_model(
            ctx,
            clients,
            &self.spec,
            &self.recipe,
            &self.global,
            note,
        ))
    }

    fn check_reply(&self, _task: &Task, reply: &Reply) -> Result<(), String> {
        check_full_model_reply(&self.global, reply)
    }

    fn aggregate(
        &mut self,
        ctx: &PhaseCtx,
        replies: &[Reply],
        _server: &mut ServerCtx<'_>,
    ) -> Result<PhaseEnd, EngineError> {
        let valid = valid_updates(ctx, &self.global, replies)?;
        let contribs = crate::common::contributions(&valid[..]);
        self.global = aggregate::weighted_mean(&contribs)?;
        self.apply_masks();
        if let Some(shadow) = &mut self.shadow {
            for t in shadow.iter_mut() {
                let g = self.global.get(&t.name).expect("same layout");
                match self.masks.get(&t.name) {
                    Some(m) => t
                        .data
                        .iter_mut()
                        .zip(&g.data)
                        .zip(&m.active)
                        .filter(|(_, a)| **a)
                        .for_each(|((s, v), _)| *s = *v),
                    None => t.data.copy_from_slice(&g.data),
                }
            }
        }
        let (total, active) = self.counts();
        let sparsity = 1.0 - active as f64 / total as f64;
        if self.event_due(ctx.round) && sparsity < self.opts.target_sparsity - 1e-9 {
            self.prune();
            let (_, after) = self.counts();
            tracing::info!(
                round = ctx.round,
                active_before = active,
                active_after = after,
                "pruning event"
            );
        }
        Ok(PhaseEnd::RoundComplete)
    }

    fn eval_models(&self) -> Vec<EvalModel> {
        vec![EvalModel {
            label: "global".into(),
            spec: self.spec.clone(),
            view: View::full(),
            params: self.global.clone(),
            devices: None,
            readout: flotilla_engine::Readout::Classifier,
        }]
    }

    fn round_metrics(&self) -> serde_json::Map<String, serde_json::Value> {
        let (total, active) = self.counts();
        let other: usize = self
            .global
            .iter()
            .filter(|t| !self.masks.contains_key(&t.name))
            .map(|t| t.numel())
            .sum();
        let mut m = serde_json::Map::new();
        m.insert(
            "sparsity".into(),
            (1.0 - active as f64 / total as f64).into(),
        );
        m.insert("active_params".into(), (active + other).into());
        m.insert("pruning_events".into(), self.events.into());
        m
    }

    fn masks(&self) -> KnownMasks {
        self.masks
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn snapshot(&self) -> MethodState {
        let mut params = BTreeMap::from([("global".to_string(), self.global.clone())]);
        if let Some(s) = &self.shadow {
            params.insert("shadow".into(), s.clone());
        }
        MethodState {
            params,
            json: serde_json::json!({ "masks": self.masks, "events": self.events }),
        }
    }

    fn restore(&mut self, state: MethodState) -> Result<(), EngineError> {
        let global = crate::common::checkpoint_global(&state, &self.global)?;
        let masks: BTreeMap<String, Mask> = serde_json::from_value(state.json["masks"].clone())
            .map_err(|e| EngineError::Method(format!("checkpoint masks: {e}")))?;
        if masks.keys().ne(self.masks.keys()) {
            return Err(EngineError::Method(
                "checkpoint masks do not match the model".into(),
            ));
        }
        self.global = global.clone();
        self.masks = masks;
        self.events = state.json["events"].as_u64().unwrap_or(0) as u32;
        if self.shadow.is_some() {
            self.shadow = state.params.get("shadow").cloned();
        }
        Ok(())
    }
}

/// The client half: local training with the masks held at zero.
pub struct FedMapClient;

impl ClientHalf for FedMapClient {
    fn execute(
        &self,
        task: &Task,
        data: &ClientData,
        ctx: &ClientCtx,
    ) -> Result<Reply, EngineError> {
        crate::common::require_train(task, "fedmap")?;
        train_task(task, data, ctx, || Ok(CrossEntropy::under(&task.view)))
    }
}
