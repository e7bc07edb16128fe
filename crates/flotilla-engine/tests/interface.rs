//! The method interface carries what the five methods need, one capability per test.
//!
//! One run of a toy method ([`Showcase`], two phases, one round) gives each client a different
//! payload; each test below checks one capability in it, so a failure in one does not hide
//! the others:
//! - a gradient pass (phase 0, every client) — FeDLRT's basis phase, FedLin;
//! - a round with two phases on the same clients — FeDLRT;
//! - a depth prefix (skipped blocks in the forward pass) — FlexTrain, depth dropout;
//! - frozen tensors — FLL;
//! - a width-reduced model with sliced parameters — FedTSA, HeteroFL;
//! - masked values that travel as active values only — FedMap;
//! - a factored layer of which the client trains only S, in less memory — FeDLRT;
//! - an objective the method defines — FedProx, FlexTrain, FLL;
//! - a correction term added to every step — FeDLRT's variance correction, SCAFFOLD;
//! - several global models evaluated side by side — FedTSA clusters;
//! - training on the server during aggregation — FedTSA stage 2.
//!
//! Held tensors (tensors a client keeps between tasks) have their own file, `held.rs`.

use burn::tensor::Tensor as BurnTensor;
use flotilla_core::wire::Mask;
use flotilla_core::{ParamSet, Tensor};
use flotilla_data::Split;
use flotilla_engine::local::{
    self, Batch, CrossEntropy, Objective, Recipe, TrainJob, TrainOutcome, cross_entropy,
};
use flotilla_engine::sink::{ClientRecord, RoundRecord};
use flotilla_engine::{
    Assignment, ClientCtx, ClientData, ClientHalf, ClientInfo, EngineError, EvalModel, Experiment,
    MethodState, PhaseCtx, PhaseEnd, Reply, ServerCtx, ServerHalf, Simulation, Task,
};
use flotilla_models::{Architecture, ModelSpec, Net, View};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

// Peak memory is measured by the engine's counting allocator.
#[global_allocator]
static ALLOC: flotilla_engine::alloc::CountingAlloc = flotilla_engine::alloc::CountingAlloc;
#[path = "interface/showcase.rs"]
mod showcase;
use flotilla_testkit::Rounds;
use flotilla_testkit::images::patches as synthetic;
use showcase::*;

const CONFIG: &str = r#"
rounds = 1
[data]
dataset = "fashion-mnist"
num_clients = 8
partition = { kind = "iid" }
[model]
arch = "mlp"
[training]
epochs = 1
batch_size = 16
optimizer = "sgd"
lr = 0.05
[sampling]
clients_per_round = 8
[simulation]
checkpoint_every = 0
[server_data]
source = "holdout"
size = 100
[method]
name = "showcase"
"#;

/// The showcase's one round: what the server saw, the records, client 1's frozen check.
struct ShowcaseRun {
    seen: Observed,
    record: RoundRecord,
    clients: Vec<ClientRecord>,
    frozen_unchanged: Option<bool>,
    mask: Mask,
    lr: f64,
}

impl ShowcaseRun {
    fn client(&self, id: u64) -> &ClientRecord {
        self.clients.iter().find(|c| c.client == id).unwrap()
    }
}

/// Runs the showcase once for all the tests of this file.
fn showcase() -> &'static ShowcaseRun {
    static RUN: OnceLock<ShowcaseRun> = OnceLock::new();
    RUN.get_or_init(|| {
        let exp = Experiment::from_toml(CONFIG).unwrap();
        let split = Split {
            train: synthetic(500, 1),
            test: synthetic(100, 2),
        };
        let seen = Arc::new(Mutex::new(Observed::default()));
        let mlp = Net::init_params(&ModelSpec::mlp_2nn(), 0).unwrap();
        let n0 = mlp.get("layers.0.weight").unwrap().numel();
        let mask = Mask {
            name: "layers.0.weight".into(),
            active: (0..n0).map(|i| i % 4 == 0).collect(),
        };
        let lr = exp.training.lr;
        let server = Showcase {
            resnet: Net::init_params(&resnet(0.5), 0).unwrap(),
            mlp,
            mask: mask.clone(),
            recipe: exp.training.clone(),
            seen: seen.clone(),
        };
        let frozen = FrozenCheck::default();
        let client = Arc::new(ShowcaseClient {
            frozen_unchanged: frozen.clone(),
        });
        let dir = tempfile::tempdir().unwrap();
        // The server's 100 samples are held out of the 500 by `[server_data]`.
        let mut sim = Simulation::new(exp, split, Box::new(server), client, dir.path()).unwrap();
        let mut rounds = Rounds::default();
        sim.run(&mut [&mut rounds]).unwrap();
        let (record, clients) = rounds.0.remove(0);
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        let frozen_unchanged = *frozen.lock().unwrap();
        ShowcaseRun {
            seen,
            record,
            clients,
            frozen_unchanged,
            mask,
            lr,
        }
    })
}

#[test]
fn a_round_runs_two_phases_on_the_same_clients() {
    let run = showcase();
    assert_eq!(run.seen.phase0_clients, (0..8).collect::<Vec<u64>>());
    assert_eq!(run.seen.phase1_clients, run.seen.phase0_clients);
}

#[test]
fn a_gradient_pass_returns_gradients_of_every_trainable_tensor() {
    let run = showcase();
    let grads = &run.seen.replies[&106];
    let mlp = Net::init_params(&ModelSpec::mlp_2nn(), 0).unwrap();
    for t in mlp.iter() {
        let g = grads.require(&t.name).unwrap();
        assert_eq!(g.shape, t.shape, "{}", t.name);
        assert!(g.data.iter().all(|v| v.is_finite()), "{}", t.name);
        assert!(
            g.data.iter().any(|v| *v != 0.0),
            "{} has a zero gradient",
            t.name
        );
    }
    // Different clients' data give different gradients.
    assert_ne!(run.seen.replies[&106], run.seen.replies[&107]);
    assert_eq!(
        run.seen.replies[&100].require("count").unwrap().data,
        vec![50.0]
    );
}

#[test]
fn a_depth_prefix_costs_fewer_flops() {
    let run = showcase();
    let c0 = run.client(0);
    let full =
        flotilla_models::flops::training(&resnet(0.5), &View::full(), c0.num_examples as usize);
    assert!(
        c0.flops > 0.0 && c0.flops < 0.7 * full,
        "{} vs {full}",
        c0.flops
    );
}

#[test]
fn frozen_tensors_are_neither_changed_nor_sent_back() {
    let run = showcase();
    assert_eq!(run.frozen_unchanged, Some(true));
    let back = &run.seen.replies[&1];
    assert!(back.get("conv1.weight").is_none() && back.get("blocks.0.conv1.weight").is_none());
    assert!(back.get("blocks.1.conv1.weight").is_some());
}

#[test]
fn a_width_slice_trains_the_narrow_model() {
    let run = showcase();
    let narrow = Net::init_params(&resnet(0.25), 0).unwrap();
    let back = &run.seen.replies[&2];
    for t in back.iter() {
        assert_eq!(
            Some(&t.shape),
            narrow.get(&t.name).map(|n| &n.shape),
            "{}",
            t.name
        );
    }
    assert!(run.client(2).bytes_up < run.client(0).bytes_up / 2);
}

#[test]
fn masked_values_travel_as_active_values_only() {
    let run = showcase();
    let n0 = run.mask.active.len();
    let mlp_dense_bytes = 4 * 199_210;
    let masked_bytes = 4 * (199_210 - n0 + n0 / 4);
    let c3 = run.client(3);
    assert!(
        c3.bytes_down as usize > masked_bytes && (c3.bytes_down as usize) < masked_bytes + 25_000,
        "{}",
        c3.bytes_down
    );
    assert!((c3.bytes_up as usize) < mlp_dense_bytes - 3 * 4 * n0 / 4 + 2_000);
    // Training kept the inactive positions at zero.
    let w = run.seen.replies[&3].require("layers.0.weight").unwrap();
    let nonzero_outside = w
        .data
        .iter()
        .zip(&run.mask.active)
        .filter(|(v, a)| !**a && **v != 0.0)
        .count();
    assert_eq!(nonzero_outside, 0);
}

#[test]
fn a_factored_client_trains_only_s_in_less_memory_than_the_dense_one() {
    let run = showcase();
    let back = &run.seen.replies[&4];
    for layer in ["layers.0", "layers.1"] {
        assert_eq!(
            back.require(&format!("{layer}.S")).unwrap().shape,
            vec![RANK, RANK]
        );
        assert!(
            back.get(&format!("{layer}.U")).is_none() && back.get(&format!("{layer}.V")).is_none()
        );
    }
    assert!(back.get("layers.0.weight").is_none());
    let (factored, dense) = (run.client(4), run.client(5));
    // r×r coefficients travel back instead of two dense matrices.
    assert!(
        factored.bytes_up * 20 < dense.bytes_up,
        "{} vs {}",
        factored.bytes_up,
        dense.bytes_up
    );
    // Measured by the counting allocator: no gradient or optimizer state for U and V, and no
    // dense W formed.
    assert!(
        factored.peak_memory_bytes > 0 && factored.peak_memory_bytes * 2 < dense.peak_memory_bytes,
        "factored peak {} B, dense peak {} B",
        factored.peak_memory_bytes,
        dense.peak_memory_bytes
    );
}

#[test]
fn a_method_defined_objective_is_what_the_client_minimises() {
    let run = showcase();
    let shifted = run.seen.metrics[&6]["train_loss"];
    let plain = run.seen.metrics[&5]["train_loss"];
    // The same model, data size and recipe: the losses differ by the objective's offset,
    // up to the two clients' different data.
    assert!(
        (shifted - plain - OFFSET).abs() < 1.0,
        "shifted {shifted}, plain {plain}"
    );
    assert_eq!(run.client(6).train_loss, Some(shifted));
}

#[test]
fn a_correction_changes_the_step_by_exactly_the_term() {
    let run = showcase();
    let back = &run.seen.replies[&7];
    let (with, without) = (
        back.require("with").unwrap(),
        back.require("without").unwrap(),
    );
    let expected = -(run.lr as f32) * CORRECTION;
    for (a, b) in with.data.iter().zip(&without.data) {
        assert!((a - b - expected).abs() < 1e-6, "{a} − {b} ≠ {expected}");
    }
}

#[test]
fn several_global_models_are_evaluated_side_by_side() {
    let run = showcase();
    assert!(run.record.extra.contains_key("test_accuracy/resnet"));
    assert!(run.record.extra.contains_key("test_accuracy/mlp"));
}

#[test]
fn the_server_trains_on_its_own_data() {
    let run = showcase();
    assert!(run.seen.server_trained);
    assert_eq!(
        run.clients.iter().map(|c| c.num_examples).sum::<u64>(),
        400,
        "clients train on what the server's slice leaves"
    );
    assert_eq!(
        run.record.server_flops,
        flotilla_models::flops::training(&ModelSpec::mlp_2nn(), &View::full(), 100)
    );
    assert!(run.record.server_wall_s > 0.0);
}
