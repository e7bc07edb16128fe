//! FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020).
//!
//! Server: sends the global model to every selected client whose memory budget fits the
//! training estimate (others are skipped with the reason), then averages the replies
//! weighted by example count. FedProx is FedAvg whose clients add (μ/2)‖w − w_global‖² to
//! their loss. Optional robust rules (coordinate-wise median, trimmed mean) replace the mean
//! for fleets that may contain broken devices.

use crate::common::{check_full_model_reply, checkpoint_global, plan_full_model, valid_updates};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use flotilla_core::ParamSet;
use flotilla_core::aggregate;
use flotilla_engine::local::{Batch, CrossEntropy, Objective, Recipe, train_task};
use flotilla_engine::{
    Assignment, ClientCtx, ClientData, ClientHalf, ClientInfo, EngineError, EvalModel, Experiment,
    MethodState, PhaseCtx, PhaseEnd, Reply, ServerCtx, ServerHalf, Task,
};
use flotilla_models::{ModelSpec, Net, View};
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

/// What a FedAvg or FedProx task tells its client besides the model.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxTask {
    /// FedProx μ.
    mu: f64,
}

/// The server half of FedAvg / FedProx.
pub struct FedAvg {
    name: String,
    spec: ModelSpec,
    recipe: Recipe,
    /// FedProx μ (`None` for FedAvg).
    mu: Option<f64>,
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
        let recipe = exp.training.clone();
        match (opts.name.as_str(), opts.mu) {
            ("fedprox", Some(mu)) if mu.is_finite() && mu >= 0.0 => {}
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
            mu: opts.mu,
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
        let mut plan = plan_full_model(ctx, clients, &self.spec, &self.recipe, &self.global, "");
        if let Some(mu) = self.mu {
            let options = serde_json::to_value(ProxTask { mu }).expect("serialisable");
            for a in &mut plan {
                if let Assignment::Run(task) = a {
                    task.options = options.clone();
                }
            }
        }
        Ok(plan)
    }

    fn check_reply(&self, _task: &Task, reply: &Reply) -> Result<(), String> {
        check_full_model_reply(&self.global, reply)
    }

    /// The mean rule is a plain example-weighted mean: a network server folds it as replies
    /// arrive. The robust rules need every reply at once.
    fn mean_fold(&self, _ctx: &PhaseCtx) -> Option<aggregate::MeanFold> {
        (self.aggregator == Aggregator::Mean).then(|| aggregate::MeanFold::new(&self.global))
    }

    fn aggregate(
        &mut self,
        ctx: &PhaseCtx,
        replies: &[Reply],
        server: &mut ServerCtx<'_>,
    ) -> Result<PhaseEnd, EngineError> {
        if let Some(mean) = server.take_mean() {
            // Folded as the replies arrived, after the same checks `valid_updates` makes.
            self.global = mean;
            return Ok(PhaseEnd::RoundComplete);
        }
        let valid = valid_updates(ctx, &self.global, replies)?;
        let contribs = crate::common::contributions(&valid[..]);
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
            readout: flotilla_engine::Readout::Classifier,
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

/// FedProx's local objective (Li et al. 2020): cross-entropy plus (μ/2)‖w − w_global‖² over
/// the trainable tensors, where w_global is the model the task sent. The proximal term does
/// not depend on the samples, so micro-batches weighted by their share still sum to the
/// step's loss.
pub struct Proximal {
    mu: f32,
    /// The received model's tensors, flattened in visiting order, as constants on the
    /// training device.
    anchor: Vec<Tensor<1>>,
    ce: CrossEntropy,
}

impl Proximal {
    /// The objective anchored at `task`'s model.
    pub fn new(task: &Task, mu: f64) -> Result<Self, EngineError> {
        let device = flotilla_models::training_device();
        let plain = Net::from_params(
            &task.model,
            &task.params,
            &flotilla_models::compute_device(),
        )?;
        let mut f = Flatten::default();
        plain.visit(&mut f);
        let anchor = f
            .values
            .into_iter()
            .map(|t| Tensor::from_data(t.into_data(), &device))
            .collect();
        Ok(Self {
            mu: mu as f32,
            anchor,
            ce: CrossEntropy::under(&task.view),
        })
    }
}

impl Objective for Proximal {
    type Step = ();

    fn begin_step(&self, _rng: &mut rand_chacha::ChaCha8Rng) {}

    fn loss(&self, model: &Net, batch: Batch<'_>, step: &()) -> Result<Tensor<1>, EngineError> {
        let loss = self.ce.loss(model, batch, step)?;
        if self.mu == 0.0 {
            return Ok(loss);
        }
        let mut f = Flatten::default();
        model.visit(&mut f);
        // Frozen tensors equal their anchor: only the trainable ones carry the term.
        let prox = f
            .values
            .into_iter()
            .zip(&self.anchor)
            .zip(&f.trainable)
            .filter(|(_, trainable)| **trainable)
            .map(|((w, a), _)| (w - a.clone()).square().sum())
            .reduce(|a, b| a + b);
        Ok(match prox {
            Some(prox) => loss + prox * (self.mu / 2.0),
            None => loss,
        })
    }
}

/// Flattened parameter values in visiting order, and whether each trains (meaningful on the
/// training device only).
#[derive(Default)]
struct Flatten {
    values: Vec<Tensor<1>>,
    trainable: Vec<bool>,
}

impl ModuleVisitor for Flatten {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        self.trainable.push(param.is_require_grad());
        let n = t.shape().num_elements();
        self.values.push(t.reshape([n]));
    }
}

/// The client half of FedAvg / FedProx (and of FedTSA and its baselines, whose tasks are
/// FedAvg's at a width): local training of the received model.
pub struct FedAvgClient;

impl ClientHalf for FedAvgClient {
    fn execute(
        &self,
        task: &Task,
        data: &ClientData,
        ctx: &ClientCtx,
    ) -> Result<Reply, EngineError> {
        crate::common::require_train(task, "fedavg")?;
        if task.options.is_null() {
            return train_task(task, data, ctx, || Ok(CrossEntropy::under(&task.view)));
        }
        let opts: ProxTask = serde_json::from_value(task.options.clone())
            .map_err(|e| EngineError::Task(format!("fedprox task options: {e}")))?;
        if !(opts.mu.is_finite() && opts.mu >= 0.0) {
            return Err(EngineError::Task(format!(
                "fedprox μ must be a non-negative number, got {}",
                opts.mu
            )));
        }
        train_task(task, data, ctx, || Proximal::new(task, opts.mu))
    }
}
