//! FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020).
//!
//! Server: sends the global model to every selected client whose memory budget fits the
//! training estimate (others are skipped with the reason), then averages the replies
//! weighted by example count. FedProx is FedAvg whose clients add (μ/2)‖w − w_global‖² to
//! their loss. Optional robust rules (coordinate-wise median, trimmed mean) replace the mean
//! for fleets that may contain broken devices.

use crate::common::{check_full_model_reply, checkpoint_global, plan_full_model, valid_updates};
use flotilla_core::ParamSet;
use flotilla_core::aggregate::{self, Contribution};
use flotilla_engine::local::{Recipe, train_task};
use flotilla_engine::{
    Assignment, ClientCtx, ClientData, ClientHalf, ClientInfo, EngineError, EvalModel, Experiment,
    MethodState, PhaseCtx, PhaseEnd, Reply, ServerCtx, ServerHalf, Task,
};
use flotilla_models::{ModelSpec, View};
use serde::Deserialize;
use std::collections::BTreeMap;

/// How replies are folded.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregator {
    /// Example-weighted mean (FedAvg).
    Mean,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean, dropping `trim` replies from each end.
    TrimmedMean,
    /// Multi-Krum: the mean of the `krum_select` replies closest to their neighbours,
    /// tolerating `byzantine` faulty ones.
    Krum,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    name: String,
    /// FedProx μ (fedprox only).
    #[serde(default)]
    mu: Option<f64>,
    #[serde(default = "mean")]
    aggregator: Aggregator,
    #[serde(default)]
    trim: usize,
    /// Faulty clients Krum tolerates.
    #[serde(default)]
    byzantine: usize,
    /// Replies Krum averages (1: classic Krum).
    #[serde(default = "one")]
    krum_select: usize,
}

fn one() -> usize {
    1
}

fn mean() -> Aggregator {
    Aggregator::Mean
}

/// The server half of FedAvg / FedProx.
pub struct FedAvg {
    name: String,
    spec: ModelSpec,
    recipe: Recipe,
    global: ParamSet,
    aggregator: Aggregator,
    trim: usize,
    byzantine: usize,
    krum_select: usize,
}

impl FedAvg {
    /// Builds the server half from the `[method]` table.
    pub fn from_config(
        exp: &Experiment,
        spec: ModelSpec,
        init: ParamSet,
    ) -> Result<Self, EngineError> {
        let opts: Options = crate::common::method_options(exp)?;
        let mut recipe = exp.training.clone();
        match (opts.name.as_str(), opts.mu) {
            ("fedprox", Some(mu)) if mu.is_finite() && mu >= 0.0 => recipe.prox_mu = mu,
            ("fedprox", Some(mu)) => {
                return Err(EngineError::Config(format!(
                    "`method.mu` must be a non-negative number, got {mu}"
                )));
            }
            ("fedprox", None) => {
                return Err(EngineError::Config(
                    "`method.mu` is required for fedprox (e.g. mu = 0.01)".into(),
                ));
            }
            (_, Some(_)) => {
                return Err(EngineError::Config(
                    "`method.mu` applies to fedprox only".into(),
                ));
            }
            _ => {}
        }
        if opts.aggregator == Aggregator::TrimmedMean && opts.trim == 0 {
            return Err(EngineError::Config(
                "`method.trim` must be at least 1 with aggregator = \"trimmed-mean\"".into(),
            ));
        }
        if opts.krum_select == 0 {
            return Err(EngineError::Config(
                "`method.krum_select` must be at least 1 (1 is classic Krum)".into(),
            ));
        }
        Ok(Self {
            name: opts.name,
            spec,
            recipe,
            global: init,
            aggregator: opts.aggregator,
            trim: opts.trim,
            byzantine: opts.byzantine,
            krum_select: opts.krum_select,
        })
    }

    /// The current global model.
    pub fn global(&self) -> &ParamSet {
        &self.global
    }
}

impl ServerHalf for FedAvg {
    fn name(&self) -> &str {
        &self.name
    }

    fn plan(&self, ctx: &PhaseCtx, clients: &[ClientInfo]) -> Result<Vec<Assignment>, EngineError> {
        Ok(plan_full_model(
            ctx,
            clients,
            &self.spec,
            &self.recipe,
            &self.global,
            "",
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
        let contribs: Vec<Contribution> = valid
            .iter()
            .map(|r| Contribution {
                params: &r.params,
                weight: r.num_examples as f64,
            })
            .collect();
        self.global = match self.aggregator {
            Aggregator::Mean => aggregate::weighted_mean(&contribs)?,
            Aggregator::Median => aggregate::coordinate_median(&contribs)?,
            Aggregator::TrimmedMean => aggregate::trimmed_mean(&contribs, self.trim)?,
            // Too few replies for Krum's guarantee: keep the model rather than trust them.
            Aggregator::Krum if contribs.len() <= 2 * self.byzantine + 2 => {
                tracing::warn!(
                    round = ctx.round,
                    replies = contribs.len(),
                    byzantine = self.byzantine,
                    "too few replies for Krum (needs more than 2·byzantine + 2); the model is kept"
                );
                return Ok(PhaseEnd::RoundComplete);
            }
            Aggregator::Krum => aggregate::krum(
                &contribs,
                self.byzantine,
                self.krum_select.min(contribs.len() - self.byzantine),
            )?,
        };
        Ok(PhaseEnd::RoundComplete)
    }

    fn eval_models(&self) -> Vec<EvalModel> {
        vec![EvalModel {
            label: "global".into(),
            spec: self.spec.clone(),
            view: View::full(),
            params: self.global.clone(),
            devices: None,
        }]
    }

    fn snapshot(&self) -> MethodState {
        MethodState {
            params: BTreeMap::from([("global".to_string(), self.global.clone())]),
            json: serde_json::Value::Null,
        }
    }

    fn restore(&mut self, state: MethodState) -> Result<(), EngineError> {
        self.global = checkpoint_global(&state, &self.global)?.clone();
        Ok(())
    }
}

/// The client half of FedAvg / FedProx: local training of the received model.
pub struct FedAvgClient;

impl ClientHalf for FedAvgClient {
    fn execute(
        &self,
        task: &Task,
        data: &ClientData,
        ctx: &ClientCtx,
    ) -> Result<Reply, EngineError> {
        crate::common::require_train(task, "fedavg")?;
        train_task(task, data, ctx)
    }
}
