//! FedAvg and FedProx through their server and client halves.

mod common;

use common::reply;
use flotilla_core::{ParamSet, Tensor};
use flotilla_data::Dataset;
use flotilla_engine::local::{OptimizerKind, Recipe, TrainJob};
use flotilla_engine::method::ClientData;
use flotilla_engine::{Experiment, PhaseCtx, ServerCtx};
use flotilla_methods::fedavg::FedAvg;
use flotilla_methods::fedavg::Proximal;
use flotilla_models::{ModelSpec, Net, View};

const CONFIG: &str = r#"
rounds = 1
[data]
dataset = "fashion-mnist"
num_clients = 4
partition = { kind = "iid" }
[model]
arch = "mlp"
hidden = [8]
[training]
epochs = 1
batch_size = 8
optimizer = "sgd"
lr = 0.1
[sampling]
clients_per_round = 2
[method]
name = "fedavg"
"#;

fn scaled(p: &ParamSet, v: f32) -> ParamSet {
    let mut q = p.clone();
    q.iter_mut()
        .for_each(|t| t.data.iter_mut().for_each(|x| *x = v));
    q
}

#[test]
fn fedavg_weights_by_examples_and_refuses_bad_updates() {
    let exp = Experiment::from_toml(CONFIG).unwrap();
    let spec = exp.model_spec();
    let init = Net::init_params(&spec, 0).unwrap();
    let mut server = FedAvg::from_config(&exp, spec, init.clone()).unwrap();
    let ctx = PhaseCtx {
        round: 1,
        phase: 0,
        seed: 0,
    };
    let mut wrong = ParamSet::new();
    wrong
        .push(Tensor::new("layers.0.weight", vec![1], vec![1e9]).unwrap())
        .unwrap();
    let replies = [
        reply(0, scaled(&init, 1.0), 1),
        reply(1, scaled(&init, 4.0), 3),
        reply(2, wrong, 100),
        reply(3, scaled(&init, 1e9), 0),
    ];
    flotilla_engine::ServerHalf::aggregate(&mut server, &ctx, &replies, &mut ServerCtx::default())
        .unwrap();
    // (1·1 + 3·4) / 4 = 3.25; the wrong-layout and zero-example replies are refused
    assert!(
        server
            .global()
            .iter()
            .all(|t| t.data.iter().all(|v| *v == 3.25))
    );
}

#[test]
fn fedprox_requires_mu_and_rejects_unknown_keys() {
    let err = |text: &str| {
        FedAvg::from_config(
            &Experiment::from_toml(text).unwrap(),
            ModelSpec::mlp_2nn(),
            ParamSet::new(),
        )
        .err()
        .unwrap()
        .to_string()
    };
    assert!(err(&CONFIG.replace("name = \"fedavg\"", "name = \"fedprox\"")).contains("mu"));
    assert!(
        err(&CONFIG.replace("name = \"fedavg\"", "name = \"fedavg\"\nmu = 0.1"))
            .contains("fedprox only")
    );
    assert!(
        err(&CONFIG.replace("name = \"fedavg\"", "name = \"fedavg\"\nmomentum = 0.1"))
            .contains("momentum")
    );
}

#[test]
fn proximal_term_keeps_local_weights_closer_to_the_global_model() {
    let spec = ModelSpec {
        width: 0.1,
        ..ModelSpec::mlp_2nn()
    };
    let global = Net::init_params(&spec, 0).unwrap();
    let n = 256;
    let train = Dataset {
        images: (0..n * 784).map(|i| ((i * 7919) % 256) as u8).collect(),
        labels: (0..n).map(|i| (i % 10) as u8).collect(),
        shape: [1, 28, 28],
        num_classes: 10,
    };
    let data = ClientData {
        train: train.clone(),
        holdout: train.take_first(0),
        mean: vec![0.5],
        std: vec![0.5],
    };
    let distance = |mu: f64| {
        let recipe = Recipe {
            epochs: 3,
            batch_size: 16,
            optimizer: OptimizerKind::Sgd,
            lr: 0.1,
            momentum: 0.0,
            weight_decay: 0.0,
        };
        let task = flotilla_engine::Task {
            round: 1,
            phase: 0,
            client: 0,
            kind: "train".into(),
            model: spec.clone(),
            view: View::full(),
            recipe: recipe.clone(),
            params: global.clone(),
            masks: Vec::new(),
            hold: Vec::new(),
            options: serde_json::Value::Null,
        };
        let prox = Proximal::new(&task, mu).unwrap();
        let out = TrainJob::new(&spec, &View::full(), &global, &data, &recipe, &prox)
            .seed(5)
            .train()
            .unwrap()
            .params;
        out.iter()
            .zip(global.iter())
            .flat_map(|(a, b)| {
                a.data
                    .iter()
                    .zip(&b.data)
                    .map(|(x, y)| f64::from(x - y).powi(2))
            })
            .sum::<f64>()
            .sqrt()
    };
    let (free, prox) = (distance(0.0), distance(1.0));
    assert!(free > 0.0);
    assert!(prox < 0.8 * free, "prox {prox} vs free {free}");
}
