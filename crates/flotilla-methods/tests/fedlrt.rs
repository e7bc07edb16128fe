//! FeDLRT and FedLin through the simulator: bytes per message against methods.md §4.5, clients
//! that drop between phases, the correction with one client, export and resume.

mod common;

use common::{Rounds, synthetic};
use flotilla_core::ParamSet;
use flotilla_data::Split;
use flotilla_engine::local::evaluate;
use flotilla_engine::sink::ClientRecord;
use flotilla_engine::sink::ClientStatus;
use flotilla_engine::{
    ClientCtx, ClientData, ClientHalf, EngineError, Experiment, Reply, Simulation, Task,
};
use flotilla_methods::fedlrt::FedLrtClient;
use flotilla_models::{ModelSpec, View, dense_export};
use std::sync::Arc;

/// 784 → 64 → 32 → 10, both hidden-feeding layers factored at r0 = 4.
fn config(method: &str, clients: usize, rounds: u64) -> String {
    format!(
        r#"
seed = 3
rounds = {rounds}
[data]
dataset = "fashion-mnist"
num_clients = {clients}
partition = {{ kind = "iid" }}
[model]
arch = "mlp"
hidden = [64, 32]
[training]
epochs = 1
batch_size = 10
optimizer = "sgd"
lr = 0.2
[sampling]
clients_per_round = {clients}
[evaluation]
every = 1
[simulation]
checkpoint_every = 0
[method]
{method}
"#
    )
}

fn split() -> Split {
    Split {
        train: synthetic(240, 2),
        test: synthetic(100, 3),
    }
}

fn simulate(
    toml: &str,
    client: Option<Arc<dyn ClientHalf>>,
) -> (Rounds, Simulation, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let exp = Experiment::from_toml(toml).unwrap();
    let (server, default_client) = flotilla_methods::build(&exp).unwrap();
    let mut sim = Simulation::new(
        exp,
        split(),
        server,
        client.unwrap_or(default_client),
        dir.path(),
    )
    .unwrap();
    let mut rounds = Rounds(Vec::new());
    sim.run(&mut [&mut rounds]).unwrap();
    (rounds, sim, dir)
}

/// Floats of each message of one FeDLRT round for one client (methods.md §4.5 per factored
/// layer, plus the dense tensors that travel with them): (down, up).
fn formula(vc: &str, layers: &[(usize, usize, usize, usize)], dense: usize) -> (usize, usize) {
    let (mut down, mut up) = (0, 0);
    for &(n, m, r, a) in layers {
        let k = a - r;
        down += (n + m) * r + r * r; // U, S, V
        up += (n + m) * r; // G_U, G_V
        down += (n + m) * k; // Ū, V̄
        up += a * a; // S̃
        match vc {
            "simplified" => {
                up += r * r; // G_S
                down += r * r; // its correction
            }
            "full" => {
                up += a * a; // G̃_c
                down += a * a; // its correction
            }
            _ => {}
        }
    }
    down += dense; // with U, S, V
    up += dense; // with S̃
    if vc != "none" {
        up += dense; // dense gradients
        down += dense; // their correction
    }
    (down, up)
}

#[test]
fn bytes_per_round_follow_the_message_formula() {
    // layers.0: 784 → 128, layers.1: 128 → 64 (U [out, r], V [in, r]), both at r0 = 32 and
    // augmented to 64; dense: both biases and the 64 → 10 classifier. At these ranks every
    // term of the formula (the smallest is r² = 1,024 floats per layer) is larger than all
    // the framing of a round, so a missing or extra term cannot hide in the tolerance.
    let dense = 128 + 64 + 64 * 10 + 10;
    for vc in ["none", "simplified", "full"] {
        let toml = config(&format!("name = \"fedlrt\"\nr0 = 32\nvc = \"{vc}\""), 2, 1)
            .replace("hidden = [64, 32]", "hidden = [128, 64]");
        let (rounds, _, _) = simulate(&toml, None);
        let (record, clients) = &rounds.0[0];
        let aug = |l: &str| {
            record.extra[&format!("augmented_rank/{l}")]
                .as_u64()
                .unwrap() as usize
        };
        assert_eq!(
            (aug("layers.0"), aug("layers.1")),
            (64, 64),
            "k = r new directions"
        );
        let (down, up) = formula(vc, &[(128, 784, 32, 64), (64, 128, 32, 64)], dense);
        let messages = if vc == "full" { 3 } else { 2 };
        for c in clients {
            assert_eq!(c.status, ClientStatus::Ok);
            // Protobuf framing, tensor names and shapes, held references and the task's
            // model, recipe and options: under 1,000 bytes per message.
            for (what, got, floats) in [("down", c.bytes_down, down), ("up", c.bytes_up, up)] {
                let extra = got as i64 - 4 * floats as i64;
                assert!(
                    (0..=1000 * messages).contains(&extra),
                    "{vc} {what}: {got} B measured, formula {} B",
                    4 * floats
                );
            }
        }
    }
}

#[test]
fn fedlrt_learns_and_reports_ranks_and_the_exported_dense_model_agrees() {
    let toml = config("name = \"fedlrt\"\nr0 = 6\ntau = 0.1", 3, 4);
    let (rounds, sim, _dir) = simulate(&toml, None);
    let last = &rounds.0.last().unwrap().0;
    let acc = last.test_accuracy.unwrap();
    assert!(acc > 0.5, "accuracy {acc} on a learnable synthetic task");
    for r in &rounds.0 {
        let (a, b) = (
            r.0.extra["rank/layers.0"].as_u64().unwrap(),
            r.0.extra["rank/layers.1"].as_u64().unwrap(),
        );
        assert!((2..=32).contains(&a) && (2..=16).contains(&b), "{a} {b}");
        let mean = r.0.extra["rank_mean"].as_f64().unwrap();
        assert_eq!(mean, (a + b) as f64 / 2.0);
    }
    let model = sim.server().eval_models().remove(0);
    assert!(!model.spec.ranks.is_empty());
    let dense = dense_export(&model.spec, &model.params).unwrap();
    let plain = ModelSpec {
        ranks: Default::default(),
        ..model.spec.clone()
    };
    let test = synthetic(100, 3);
    let (mean, std) = (vec![0.2860], vec![0.3530]);
    let (a1, _) = evaluate(
        &model.spec,
        &View::full(),
        &model.params,
        &test,
        &mean,
        &std,
    )
    .unwrap();
    let (a2, _) = evaluate(&plain, &View::full(), &dense, &test, &mean, &std).unwrap();
    assert!((a1 - a2).abs() <= 0.01, "factored {a1}, dense {a2}");
}

/// FeDLRT's client, but client 1 stops answering after the basis phase.
struct DropsAfterBasis;

impl ClientHalf for DropsAfterBasis {
    fn execute(
        &self,
        task: &Task,
        data: &ClientData,
        ctx: &ClientCtx,
    ) -> Result<Reply, EngineError> {
        if task.client == 1 && task.phase > 0 {
            return Err(EngineError::Task("connection lost".into()));
        }
        FedLrtClient.execute(task, data, ctx)
    }
}

fn statuses(clients: &[ClientRecord]) -> Vec<&str> {
    clients.iter().map(|c| c.status.as_str()).collect()
}

#[test]
fn a_client_that_drops_between_phases_leaves_the_round_to_the_others() {
    for vc in ["simplified", "full"] {
        let toml = config(&format!("name = \"fedlrt\"\nr0 = 4\nvc = \"{vc}\""), 3, 2);
        let (rounds, _, _) = simulate(&toml, Some(Arc::new(DropsAfterBasis)));
        for (record, clients) in &rounds.0 {
            assert_eq!(statuses(clients), ["ok", "failed", "ok"], "{vc}");
            assert_eq!(record.clients, 2);
            assert!(record.test_accuracy.is_some());
            assert!(record.extra.contains_key("rank/layers.0"));
        }
    }
}

#[test]
fn with_one_client_the_correction_changes_nothing() {
    // The same gradient pass for all three (the defaults differ: 4 batches without a
    // correction, a full pass with one), so only the correction term differs.
    let model = |vc: &str| -> ParamSet {
        let method = format!("name = \"fedlrt\"\nr0 = 4\nvc = \"{vc}\"\ngrad_batches = 4");
        let (_, sim, _) = simulate(&config(&method, 1, 2), None);
        sim.server().eval_models().remove(0).params
    };
    let none = model("none");
    for vc in ["simplified", "full"] {
        let other = model(vc);
        let diff = none.max_abs_diff(&other).unwrap();
        assert!(none == other, "{vc} differs from none by {diff}");
    }
}

#[test]
fn fedlin_is_the_dense_round_with_a_correction_and_differs_from_fedavg() {
    let (lin, sim, _) = simulate(&config("name = \"fedlin\"", 3, 3), None);
    let model = sim.server().eval_models().remove(0);
    assert!(model.spec.ranks.is_empty());
    assert!(lin.0.last().unwrap().0.test_accuracy.unwrap() > 0.5);
    assert!(!lin.0[0].0.extra.contains_key("rank_mean"));
    let (_, avg, _) = simulate(&config("name = \"fedavg\"", 3, 3), None);
    assert_ne!(model.params, avg.server().eval_models().remove(0).params);
}

#[test]
fn a_resumed_run_continues_at_the_checkpointed_ranks() {
    let method = "name = \"fedlrt\"\nr0 = 4\ntau = 0.2";
    let straight = {
        let (_, sim, _) = simulate(&config(method, 2, 3), None);
        sim.server().eval_models().remove(0)
    };
    let dir = tempfile::tempdir().unwrap();
    let toml = config(method, 2, 3).replace("checkpoint_every = 0", "checkpoint_every = 1");
    let first = Experiment::from_toml(&toml.replace("rounds = 3", "rounds = 2")).unwrap();
    let (server, client) = flotilla_methods::build(&first).unwrap();
    Simulation::new(first, split(), server, client, dir.path())
        .unwrap()
        .run(&mut [])
        .unwrap();
    let exp = Experiment::from_toml(&toml).unwrap();
    let (server, client) = flotilla_methods::build(&exp).unwrap();
    let mut sim = Simulation::new(exp, split(), server, client, dir.path()).unwrap();
    assert_eq!(sim.restore_checkpoint().unwrap(), 2);
    sim.run(&mut []).unwrap();
    let resumed = sim.server().eval_models().remove(0);
    assert_eq!(resumed.spec.ranks, straight.spec.ranks);
    assert_eq!(resumed.params, straight.params);
}

/// FeDLRT's client, keeping what every client sends back after training its core.
struct Recording(std::sync::Mutex<Vec<(u64, ParamSet)>>);

impl ClientHalf for Recording {
    fn execute(
        &self,
        task: &Task,
        data: &ClientData,
        ctx: &ClientCtx,
    ) -> Result<Reply, EngineError> {
        let reply = FedLrtClient.execute(task, data, ctx)?;
        if task.kind == "train-core" {
            let mut seen = self.0.lock().unwrap();
            seen.push((task.client, reply.params.clone()));
        }
        Ok(reply)
    }
}

#[test]
fn the_full_correction_turns_every_clients_step_into_the_global_one() {
    // One local step on the client's whole data (batch = all 80 examples): the step's gradient
    // is the one the correction was taken from, so G̃_c + (G̃ − G̃_c) = G̃ and every client
    // computes the same core and dense tensors, whatever its data.
    for (vc, same) in [("full", true), ("none", false)] {
        let method = format!("name = \"fedlrt\"\nr0 = 4\nvc = \"{vc}\"\ns_star = 1");
        let toml = config(&method, 3, 1).replace("batch_size = 10", "batch_size = 80");
        let recording = Arc::new(Recording(Default::default()));
        simulate(&toml, Some(recording.clone()));
        let seen = recording.0.lock().unwrap();
        assert_eq!(seen.len(), 3);
        let spread = seen[1..]
            .iter()
            .map(|(_, p)| p.max_abs_diff(&seen[0].1).unwrap())
            .fold(0f32, f32::max);
        if same {
            assert!(spread < 1e-5, "{vc}: clients differ by {spread}");
        } else {
            assert!(
                spread > 1e-3,
                "{vc}: clients should differ, spread {spread}"
            );
        }
    }
}
