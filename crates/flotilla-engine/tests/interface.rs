//! The method interface carries what the five planned methods need. A toy method sends each
//! client a different payload and checks, through the engine, that each capability works:
//! - a depth prefix (skipped blocks in the forward pass) — FlexTrain, depth dropout;
//! - frozen tensors — FLL;
//! - a width-reduced model with sliced parameters — FedTSA, HeteroFL;
//! - masked values that travel as active values only — FedMap;
//! - low-rank factors instead of a dense matrix — FeDLRT;
//! - a round with two phases on the same clients — FeDLRT;
//! - several global models evaluated side by side — FedTSA clusters;
//! - training on the server during aggregation — FedTSA stage 2.

use flotilla_core::wire::Mask;
use flotilla_core::{ParamSet, Tensor};
use flotilla_data::{Dataset, Split};
use flotilla_engine::local::{self, CrossEntropy, Recipe, TrainJob, TrainOutcome};

/// Plain cross-entropy training of `params`, as the test's methods train.
fn fit(
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
use flotilla_engine::sink::{Event, Sink};
use flotilla_engine::{
    Assignment, ClientCtx, ClientData, ClientHalf, ClientInfo, EngineError, EvalModel, Experiment,
    MethodState, PhaseCtx, PhaseEnd, Reply, ServerCtx, ServerHalf, Simulation, Task,
};
use flotilla_models::{Architecture, ModelSpec, Net, View};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

const RANK: usize = 8;

/// Images whose class is a bright 7×7 patch at one of ten positions, plus noise.
fn synthetic(n: usize, seed: u64) -> Dataset {
    let mut images = vec![0u8; n * 784];
    let mut labels = vec![0u8; n];
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    for i in 0..n {
        let label = (i % 10) as u8;
        labels[i] = label;
        let (r0, c0) = (2 + (label as usize / 5) * 12, 2 + (label as usize % 5) * 5);
        for p in 0..784 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let (r, c) = (p / 28, p % 28);
            let bright = r >= r0 && r < r0 + 7 && c >= c0 && c < c0 + 4;
            images[i * 784 + p] = if bright { 200 } else { (x >> 59) as u8 * 4 };
        }
    }
    Dataset {
        images,
        labels,
        shape: [1, 28, 28],
        num_classes: 10,
    }
}

fn resnet(width: f64) -> ModelSpec {
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
fn slice_like(full: &ParamSet, small: &ParamSet) -> ParamSet {
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

/// U [n×r], S [r×r], V [m×r] with orthonormal U, V spanning leading coordinates, and
/// S = Uᵀ W V: the projection of W on that basis.
fn factors(w: &Tensor, r: usize) -> (Tensor, Tensor, Tensor) {
    let (n, m) = (w.shape[0], w.shape[1]);
    let mut u = vec![0f32; n * r];
    let mut v = vec![0f32; m * r];
    for i in 0..r {
        u[i * r + i] = 1.0;
        v[i * r + i] = 1.0;
    }
    let s: Vec<f32> = (0..r * r).map(|k| w.data[(k / r) * m + k % r]).collect();
    (
        Tensor::new(format!("{}.U", w.name), vec![n, r], u).unwrap(),
        Tensor::new(format!("{}.S", w.name), vec![r, r], s).unwrap(),
        Tensor::new(format!("{}.V", w.name), vec![m, r], v).unwrap(),
    )
}

#[derive(Default)]
struct Observed {
    phase0_clients: Vec<u64>,
    phase1_clients: Vec<u64>,
    reply_names: HashMap<u64, Vec<String>>,
    frozen_unchanged: Option<bool>,
    lowrank_reply_shape: Option<Vec<usize>>,
    server_trained: bool,
    masked_active: usize,
}

struct Showcase {
    resnet: ParamSet,
    mlp: ParamSet,
    mask: Mask,
    recipe: Recipe,
    seen: Arc<Mutex<Observed>>,
}

impl Showcase {
    fn task(
        &self,
        ctx: &PhaseCtx,
        c: &ClientInfo,
        kind: &str,
        model: ModelSpec,
        view: View,
        params: ParamSet,
    ) -> Assignment {
        Assignment::Run(Box::new(Task {
            round: ctx.round,
            phase: ctx.phase,
            client: c.id,
            kind: kind.into(),
            model,
            view,
            recipe: self.recipe.clone(),
            params,
            masks: Vec::new(),
            options: serde_json::Value::Null,
        }))
    }
}

impl ServerHalf for Showcase {
    fn name(&self) -> &str {
        "showcase"
    }

    /// The first phase asks each client for a tensor the task did not send (its example
    /// count), so that phase overrides the default subset-of-the-task check.
    fn check_reply(&self, task: &Task, reply: &Reply) -> Result<(), String> {
        if task.kind == "count" {
            return match reply.params.get("count") {
                Some(t) if t.shape == [1] && reply.params.len() == 1 => Ok(()),
                _ => Err("the count phase expects one tensor `count` of shape [1]".into()),
            };
        }
        for t in reply.params.iter() {
            if task.params.get(&t.name).map(|s| &s.shape) != Some(&t.shape) {
                return Err(format!("`{}` was not sent with this shape", t.name));
            }
        }
        Ok(())
    }

    fn plan(&self, ctx: &PhaseCtx, clients: &[ClientInfo]) -> Result<Vec<Assignment>, EngineError> {
        if ctx.phase == 0 {
            // Phase 0: every client reports a statistic (like FeDLRT's basis gradients).
            return Ok(clients
                .iter()
                .map(|c| {
                    self.task(
                        ctx,
                        c,
                        "count",
                        ModelSpec::mlp_2nn(),
                        View::full(),
                        ParamSet::new(),
                    )
                })
                .collect());
        }
        Ok(clients
            .iter()
            .map(|c| match c.id {
                0 => self.task(
                    ctx,
                    c,
                    "train",
                    resnet(0.5),
                    View::depth_prefix(1, 3),
                    self.resnet.clone(),
                ),
                1 => {
                    let view = View {
                        active_blocks: None,
                        frozen: vec!["conv1".into(), "norm1".into(), "blocks.0".into()],
                    };
                    self.task(ctx, c, "train", resnet(0.5), view, self.resnet.clone())
                }
                2 => {
                    let small = Net::init_params(&resnet(0.25), 0).unwrap();
                    self.task(
                        ctx,
                        c,
                        "train",
                        resnet(0.25),
                        View::full(),
                        slice_like(&self.resnet, &small),
                    )
                }
                3 => {
                    let Assignment::Run(mut t) = self.task(
                        ctx,
                        c,
                        "train",
                        ModelSpec::mlp_2nn(),
                        View::full(),
                        self.mlp.clone(),
                    ) else {
                        unreachable!()
                    };
                    t.masks = vec![self.mask.clone()];
                    Assignment::Run(t)
                }
                4 => {
                    let w = self.mlp.get("layers.1.weight").unwrap();
                    let (u, s, v) = factors(w, RANK);
                    let mut p = self.mlp.filter(|n| n != "layers.1.weight");
                    for t in [u, s, v] {
                        p.push(t).unwrap();
                    }
                    self.task(ctx, c, "lowrank", ModelSpec::mlp_2nn(), View::full(), p)
                }
                _ => Assignment::Skip("not part of the showcase".into()),
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
            return Ok(PhaseEnd::NextPhase);
        }
        seen.phase1_clients = ids;
        for r in replies {
            seen.reply_names
                .insert(r.client, r.params.names().map(String::from).collect());
            if r.client == 1 {
                let same = ["conv1.weight", "blocks.0.conv1.weight"]
                    .iter()
                    .all(|n| r.params.get(n).is_none());
                seen.frozen_unchanged = Some(same);
            }
            if r.client == 3 {
                let w = r.params.get("layers.0.weight").unwrap();
                seen.masked_active = w
                    .data
                    .iter()
                    .zip(&self.mask.active)
                    .filter(|(v, a)| **a || **v != 0.0)
                    .count();
            }
            if r.client == 4 {
                seen.lowrank_reply_shape =
                    r.params.get("layers.1.weight.S").map(|t| t.shape.clone());
            }
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
            },
            EvalModel {
                label: "mlp".into(),
                spec: ModelSpec::mlp_2nn(),
                view: View::full(),
                params: self.mlp.clone(),
                devices: None,
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

struct ShowcaseClient {
    frozen_checked: Arc<Mutex<Option<bool>>>,
}

impl ClientHalf for ShowcaseClient {
    fn execute(
        &self,
        task: &Task,
        data: &ClientData,
        ctx: &ClientCtx,
    ) -> Result<Reply, EngineError> {
        match task.kind.as_str() {
            "count" => Ok(Reply {
                round: task.round,
                phase: task.phase,
                client: task.client,
                num_examples: data.train.len() as u64,
                params: ParamSet::from_tensors(vec![Tensor::new(
                    "count",
                    vec![1],
                    vec![data.train.len() as f32],
                )?])?,
                metrics: BTreeMap::new(),
                resources: Default::default(),
            }),
            "train" => {
                let reply =
                    local::train_task(task, data, ctx, || Ok(CrossEntropy::under(&task.view)))?;
                if !task.view.frozen.is_empty() {
                    // Frozen tensors are neither sent back nor changed by training.
                    let trained =
                        fit(&task.model, &task.view, &task.params, data, &task.recipe, 1)?.params;
                    let same = task
                        .params
                        .iter()
                        .filter(|t| task.view.is_frozen(&t.name))
                        .all(|t| trained.get(&t.name) == Some(t));
                    *self.frozen_checked.lock().unwrap() = Some(same);
                }
                Ok(reply)
            }
            "lowrank" => {
                // Rebuild W = U S Vᵀ, train the dense model, project back: S' = Uᵀ W' V.
                let (u, s, v) = (
                    task.params.require("layers.1.weight.U")?,
                    task.params.require("layers.1.weight.S")?,
                    task.params.require("layers.1.weight.V")?,
                );
                let (n, r, m) = (u.shape[0], u.shape[1], v.shape[0]);
                let mut w = vec![0f32; n * m];
                for i in 0..n {
                    for j in 0..m {
                        let mut acc = 0.0;
                        for a in 0..r {
                            for b in 0..r {
                                acc += u.data[i * r + a] * s.data[a * r + b] * v.data[j * r + b];
                            }
                        }
                        w[i * m + j] = acc;
                    }
                }
                let mut dense = task
                    .params
                    .filter(|name| !name.starts_with("layers.1.weight."));
                dense.push(Tensor::new("layers.1.weight", vec![n, m], w)?)?;
                let dense = ParamSet::from_tensors(
                    Net::init_params(&task.model, 0)?
                        .names()
                        .map(|name| dense.get(name).unwrap().clone())
                        .collect(),
                )?;
                let trained = fit(&task.model, &task.view, &dense, data, &task.recipe, 2)?;
                let w2 = trained.params.require("layers.1.weight")?;
                let mut s2 = vec![0f32; r * r];
                for a in 0..r {
                    for b in 0..r {
                        let mut acc = 0.0;
                        for i in 0..n {
                            for j in 0..m {
                                acc += u.data[i * r + a] * w2.data[i * m + j] * v.data[j * r + b];
                            }
                        }
                        s2[a * r + b] = acc;
                    }
                }
                let mut params = trained.params.filter(|name| name != "layers.1.weight");
                params.push(Tensor::new("layers.1.weight.S", vec![r, r], s2)?)?;
                Ok(Reply {
                    round: task.round,
                    phase: task.phase,
                    client: task.client,
                    num_examples: data.train.len() as u64,
                    params,
                    metrics: BTreeMap::new(),
                    resources: Default::default(),
                })
            }
            other => Err(EngineError::Task(format!("unknown kind {other}"))),
        }
    }
}

struct Collect(
    Vec<(
        flotilla_engine::sink::RoundRecord,
        Vec<flotilla_engine::sink::ClientRecord>,
    )>,
);

impl Sink for Collect {
    fn on_event(&mut self, e: &Event<'_>) -> Result<(), EngineError> {
        if let Event::Round { round, clients } = e {
            self.0.push(((*round).clone(), clients.to_vec()));
        }
        Ok(())
    }
}

const CONFIG: &str = r#"
rounds = 1
[data]
dataset = "fashion-mnist"
num_clients = 5
partition = { kind = "iid" }
[model]
arch = "mlp"
[training]
epochs = 1
batch_size = 16
optimizer = "sgd"
lr = 0.05
[sampling]
clients_per_round = 5
[simulation]
checkpoint_every = 0
[server_data]
source = "holdout"
size = 100
[method]
name = "showcase"
"#;

#[test]
fn every_capability_travels_through_the_interface() {
    let exp = Experiment::from_toml(CONFIG).unwrap();
    let split = Split {
        train: synthetic(400, 1),
        test: synthetic(100, 2),
    };
    let seen = Arc::new(Mutex::new(Observed::default()));
    let mlp = Net::init_params(&ModelSpec::mlp_2nn(), 0).unwrap();
    let n0 = mlp.get("layers.0.weight").unwrap().numel();
    let mask = Mask {
        name: "layers.0.weight".into(),
        active: (0..n0).map(|i| i % 4 == 0).collect(),
    };
    let server = Showcase {
        resnet: Net::init_params(&resnet(0.5), 0).unwrap(),
        mlp,
        mask,
        recipe: exp.training.clone(),
        seen: seen.clone(),
    };
    let frozen = Arc::new(Mutex::new(None));
    let client = Arc::new(ShowcaseClient {
        frozen_checked: frozen.clone(),
    });
    let dir = tempfile::tempdir().unwrap();
    // The server's 100 samples are held out of the 400 by `[server_data]`.
    let mut sim = Simulation::new(exp, split, Box::new(server), client, dir.path()).unwrap();
    let mut rounds = Collect(Vec::new());
    sim.run(&mut [&mut rounds]).unwrap();

    let seen = seen.lock().unwrap();
    let (record, clients) = &rounds.0[0];
    // two phases on the same five clients
    assert_eq!(seen.phase0_clients, vec![0, 1, 2, 3, 4]);
    assert_eq!(seen.phase1_clients, seen.phase0_clients);
    // depth prefix: fewer FLOPs than the full model on the same data
    let c = |id: u64| clients.iter().find(|c| c.client == id).unwrap();
    let full_flops =
        flotilla_models::flops::training(&resnet(0.5), &View::full(), c(0).num_examples as usize);
    assert!(
        c(0).flops > 0.0 && c(0).flops < 0.7 * full_flops,
        "{} vs {full_flops}",
        c(0).flops
    );
    // frozen: not sent back, not changed
    assert_eq!(seen.frozen_unchanged, Some(true));
    assert_eq!(*frozen.lock().unwrap(), Some(true));
    // width slice: the client trained the narrow model (its reply has narrow shapes)
    assert!(seen.reply_names[&2].contains(&"blocks.0.conv1.weight".to_string()));
    assert!(c(2).bytes_up < c(0).bytes_up / 2);
    // masked values: a quarter of layers.0.weight travels, in both directions
    let mlp_dense_bytes = 4 * 199_210;
    let masked_bytes = 4 * (199_210 - n0 + n0 / 4);
    assert!(
        c(3).bytes_down as usize > masked_bytes
            && (c(3).bytes_down as usize) < masked_bytes + 25_000,
        "{}",
        c(3).bytes_down
    );
    assert!((c(3).bytes_up as usize) < mlp_dense_bytes - 3 * 4 * n0 / 4 + 2_000);
    assert_eq!(seen.masked_active, n0 / 4);
    // low-rank factors: r×r coefficients back instead of a 200×200 matrix
    assert_eq!(seen.lowrank_reply_shape, Some(vec![RANK, RANK]));
    assert!((c(4).bytes_up as usize) < mlp_dense_bytes - 4 * (200 * 200 - RANK * RANK) + 2_000);
    // several global models, each evaluated
    assert!(
        record.extra.contains_key("test_accuracy/resnet")
            && record.extra.contains_key("test_accuracy/mlp")
    );
    // server-side training happened on the server's data, held out of the clients' 400
    assert!(seen.server_trained);
    assert_eq!(
        clients.iter().map(|c| c.num_examples).sum::<u64>(),
        300,
        "clients train on what the server's slice leaves"
    );
    assert_eq!(
        record.server_flops,
        flotilla_models::flops::training(&ModelSpec::mlp_2nn(), &View::full(), 100)
    );
    assert!(record.server_wall_s > 0.0);
}
