//! The toy method of the interface tests ([`Showcase`]): one round of two phases in which each
//! client gets a different payload, one per capability the methods need, and records what it saw.

use super::*;
use flotilla_testkit::task;

/// Plain cross-entropy training of `params`, as the test's methods train.
pub(crate) fn fit(
    spec: &ModelSpec,
    view: &View,
    params: &ParamSet,
    data: &ClientData,
    recipe: &Recipe,
    seed: u64,
) -> Result<TrainOutcome, EngineError> {
    let ce = CrossEntropy::under(view);
    TrainJob::new(spec, view, params, data, recipe, &ce)
        .seed(seed)
        .train()
}

pub(crate) fn resnet(width: f64) -> ModelSpec {
    ModelSpec {
        arch: Architecture::Resnet {
            blocks_per_stage: 1,
        },
        input: [1, 28, 28],
        classes: 10,
        width,
        ranks: Default::default(),
    }
}

/// The leading sub-block of each tensor of `full` with the shapes of `small` (HeteroFL slice).
pub(crate) fn slice_like(full: &ParamSet, small: &ParamSet) -> ParamSet {
    let mut out = small.clone();
    for t in out.iter_mut() {
        let src = full.get(&t.name).unwrap();
        let mut idx = vec![0usize; t.shape.len()];
        for v in t.data.iter_mut() {
            let mut off = 0;
            for (d, i) in idx.iter().enumerate() {
                off = off * src.shape[d] + i;
            }
            *v = src.data[off];
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }
    out
}

pub(crate) const RANK: usize = 8;
/// What the method-defined objective adds to cross-entropy.
pub(crate) const OFFSET: f64 = 10.0;
/// The correction term on `layers.2.bias`.
pub(crate) const CORRECTION: f32 = 0.5;

/// The MLP with both hidden layers factored at rank [`RANK`].
pub(crate) fn factored_mlp() -> ModelSpec {
    ModelSpec {
        ranks: BTreeMap::from([("layers.0".into(), RANK), ("layers.1".into(), RANK)]),
        ..ModelSpec::mlp_2nn()
    }
}

/// The factored MLP's view: U and V frozen, so only S (and the dense layers) train.
pub(crate) fn s_only() -> View {
    View {
        active_blocks: None,
        frozen: ["layers.0.U", "layers.0.V", "layers.1.U", "layers.1.V"]
            .map(String::from)
            .to_vec(),
    }
}

/// A method's own loss: cross-entropy plus a constant, so its mark shows in `train_loss`.
pub(crate) struct ShiftedCrossEntropy;

impl Objective for ShiftedCrossEntropy {
    type Step = ();

    fn begin_step(&self, _rng: &mut rand_chacha::ChaCha8Rng) {}

    fn loss(
        &self,
        model: &Net,
        batch: Batch<'_>,
        _step: &(),
    ) -> Result<BurnTensor<1>, EngineError> {
        let logits = model.forward(batch.x, &View::full());
        Ok(cross_entropy(logits, batch.labels, batch.classes, batch.device).add_scalar(OFFSET))
    }
}

/// What the server half saw.
#[derive(Default)]
pub(crate) struct Observed {
    pub(crate) phase0_clients: Vec<u64>,
    pub(crate) phase1_clients: Vec<u64>,
    pub(crate) replies: HashMap<u64, ParamSet>,
    pub(crate) metrics: HashMap<u64, BTreeMap<String, f64>>,
    pub(crate) server_trained: bool,
}

pub(crate) struct Showcase {
    pub(crate) resnet: ParamSet,
    pub(crate) mlp: ParamSet,
    pub(crate) mask: Mask,
    pub(crate) recipe: Recipe,
    pub(crate) seen: Arc<Mutex<Observed>>,
}

impl ServerHalf for Showcase {
    fn name(&self) -> &str {
        "showcase"
    }

    /// Gradients and the correction's two results are not the task's tensors, so those
    /// kinds have their own checks; the rest use the default subset-of-the-task check.
    fn check_reply(&self, task: &Task, reply: &Reply) -> Result<(), String> {
        let expect: Vec<&str> = match task.kind.as_str() {
            "gradients" => task.params.names().collect(),
            "count" => vec!["count"],
            "corrected" => vec!["with", "without"],
            _ => {
                for t in reply.params.iter() {
                    if task.params.get(&t.name).map(|s| &s.shape) != Some(&t.shape) {
                        return Err(format!("`{}` was not sent with this shape", t.name));
                    }
                }
                return Ok(());
            }
        };
        let got: Vec<&str> = reply.params.names().collect();
        if got != expect {
            return Err(format!("expected {expect:?}, got {got:?}"));
        }
        Ok(())
    }

    fn plan(&self, ctx: &PhaseCtx, clients: &[ClientInfo]) -> Result<Vec<Assignment>, EngineError> {
        let run = |t: Task| Assignment::Run(Box::new(t));
        let mlp = ModelSpec::mlp_2nn;
        if ctx.phase == 0 {
            // Phase 0: two clients return gradients of the global MLP (FeDLRT's basis phase),
            // the others a statistic of their data.
            return Ok(clients
                .iter()
                .map(|c| {
                    let t = match c.id {
                        6 | 7 => task(
                            ctx,
                            c.id,
                            "gradients",
                            mlp(),
                            View::full(),
                            self.mlp.clone(),
                            &self.recipe,
                        ),
                        _ => task(
                            ctx,
                            c.id,
                            "count",
                            mlp(),
                            View::full(),
                            ParamSet::new(),
                            &self.recipe,
                        ),
                    };
                    run(t)
                })
                .collect());
        }
        Ok(clients
            .iter()
            .map(|c| {
                let t = |kind: &str, model, view, params| {
                    task(ctx, c.id, kind, model, view, params, &self.recipe)
                };
                match c.id {
                    0 => run(t(
                        "train",
                        resnet(0.5),
                        View::depth_prefix(1, 3),
                        self.resnet.clone(),
                    )),
                    1 => {
                        let view = View {
                            active_blocks: None,
                            frozen: vec!["conv1".into(), "norm1".into(), "blocks.0".into()],
                        };
                        run(t("train", resnet(0.5), view, self.resnet.clone()))
                    }
                    2 => {
                        let small = Net::init_params(&resnet(0.25), 0).unwrap();
                        run(t(
                            "train",
                            resnet(0.25),
                            View::full(),
                            slice_like(&self.resnet, &small),
                        ))
                    }
                    3 => {
                        let mut task = t("train", mlp(), View::full(), self.mlp.clone());
                        task.masks = vec![self.mask.clone()];
                        run(task)
                    }
                    4 => {
                        let params = Net::init_params(&factored_mlp(), 0).unwrap();
                        run(t("train", factored_mlp(), s_only(), params))
                    }
                    5 => run(t("train", mlp(), View::full(), self.mlp.clone())),
                    6 => run(t("shifted", mlp(), View::full(), self.mlp.clone())),
                    7 => {
                        // One full-batch step, so the correction's effect is exactly −lr · c.
                        let mut task = t("corrected", mlp(), View::full(), self.mlp.clone());
                        task.recipe.batch_size = 10_000;
                        run(task)
                    }
                    _ => Assignment::Skip("not part of the showcase".into()),
                }
            })
            .collect())
    }

    fn aggregate(
        &mut self,
        ctx: &PhaseCtx,
        replies: &[Reply],
        server: &mut ServerCtx<'_>,
    ) -> Result<PhaseEnd, EngineError> {
        let mut seen = self.seen.lock().unwrap();
        let ids: Vec<u64> = replies.iter().map(|r| r.client).collect();
        if ctx.phase == 0 {
            seen.phase0_clients = ids;
            for r in replies {
                seen.replies.insert(100 + r.client, r.params.clone());
            }
            return Ok(PhaseEnd::NextPhase);
        }
        seen.phase1_clients = ids;
        for r in replies {
            seen.replies.insert(r.client, r.params.clone());
            seen.metrics.insert(r.client, r.metrics.clone());
        }
        // Server-side training on its own data (FedTSA's stage 2 runs here).
        if let Some(data) = server.server_data {
            let before = self.mlp.clone();
            self.mlp = fit(
                &ModelSpec::mlp_2nn(),
                &View::full(),
                &self.mlp,
                data,
                &self.recipe,
                7,
            )?
            .params;
            seen.server_trained = self.mlp != before;
            // One epoch over the server's data, on the server's clock.
            server.add_flops(flotilla_models::flops::training(
                &ModelSpec::mlp_2nn(),
                &View::full(),
                data.train.len(),
            ));
        }
        Ok(PhaseEnd::RoundComplete)
    }

    fn eval_models(&self) -> Vec<EvalModel> {
        vec![
            EvalModel {
                label: "resnet".into(),
                spec: resnet(0.5),
                view: View::full(),
                params: self.resnet.clone(),
                devices: None,
                readout: flotilla_engine::Readout::Classifier,
            },
            EvalModel {
                label: "mlp".into(),
                spec: ModelSpec::mlp_2nn(),
                view: View::full(),
                params: self.mlp.clone(),
                devices: None,
                readout: flotilla_engine::Readout::Classifier,
            },
        ]
    }

    fn masks(&self) -> HashMap<String, Mask> {
        HashMap::from([(self.mask.name.clone(), self.mask.clone())])
    }

    fn snapshot(&self) -> MethodState {
        MethodState {
            params: BTreeMap::from([
                ("resnet".into(), self.resnet.clone()),
                ("mlp".into(), self.mlp.clone()),
            ]),
            json: serde_json::Value::Null,
        }
    }

    fn restore(&mut self, state: MethodState) -> Result<(), EngineError> {
        self.resnet = state.params["resnet"].clone();
        self.mlp = state.params["mlp"].clone();
        Ok(())
    }
}

/// Whether training changed any frozen tensor, as client 1 checks it.
pub(crate) type FrozenCheck = Arc<Mutex<Option<bool>>>;

pub(crate) struct ShowcaseClient {
    pub(crate) frozen_unchanged: FrozenCheck,
}

pub(crate) fn reply(task: &Task, data: &ClientData, params: ParamSet) -> Reply {
    Reply {
        round: task.round,
        phase: task.phase,
        client: task.client,
        num_examples: data.train.len() as u64,
        params,
        metrics: BTreeMap::new(),
        resources: Default::default(),
    }
}

impl ClientHalf for ShowcaseClient {
    fn execute(
        &self,
        task: &Task,
        data: &ClientData,
        ctx: &ClientCtx,
    ) -> Result<Reply, EngineError> {
        let ce = CrossEntropy::under(&task.view);
        let job = || {
            TrainJob::new(
                &task.model,
                &task.view,
                &task.params,
                data,
                &task.recipe,
                &ce,
            )
        };
        match task.kind.as_str() {
            "gradients" => Ok(reply(task, data, job().gradients(2)?.grads)),
            "count" => {
                let n = data.train.len() as f32;
                Ok(reply(
                    task,
                    data,
                    ParamSet::from_tensors(vec![Tensor::new("count", vec![1], vec![n])?])?,
                ))
            }
            "train" => {
                if !task.view.frozen.is_empty() {
                    let trained =
                        fit(&task.model, &task.view, &task.params, data, &task.recipe, 1)?.params;
                    let same = task
                        .params
                        .iter()
                        .filter(|t| task.view.is_frozen(&t.name))
                        .all(|t| trained.get(&t.name) == Some(t));
                    *self.frozen_unchanged.lock().unwrap() = Some(same);
                }
                local::train_task(task, data, ctx, || Ok(CrossEntropy::under(&task.view)))
            }
            "shifted" => local::train_task(task, data, ctx, || Ok(ShiftedCrossEntropy)),
            "corrected" => {
                let bias = task.params.require("layers.2.bias")?;
                let c = Tensor::new(
                    "layers.2.bias",
                    bias.shape.clone(),
                    vec![CORRECTION; bias.numel()],
                )?;
                let correction = ParamSet::from_tensors(vec![c])?;
                let with = job().correction(&correction).train()?.params;
                let without = job().train()?.params;
                let pick = |p: &ParamSet, name: &str| -> Result<Tensor, EngineError> {
                    let t = p.require("layers.2.bias")?;
                    Ok(Tensor::new(name, t.shape.clone(), t.data.clone())?)
                };
                Ok(reply(
                    task,
                    data,
                    ParamSet::from_tensors(vec![pick(&with, "with")?, pick(&without, "without")?])?,
                ))
            }
            other => Err(EngineError::Task(format!("unknown kind {other}"))),
        }
    }
}
