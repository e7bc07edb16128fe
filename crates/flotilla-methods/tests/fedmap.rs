//! FedMap invariants (methods.md §9): nested masks, exact pruning fraction with position
//! tie-break and layer floors, pruned entries exactly zero through local training and
//! aggregation, bytes on the wire equal to the active values (plus the mask when it changes),
//! and masks that survive a checkpoint.

mod common;

use common::{Rounds, synthetic};
use flotilla_core::ParamSet;
use flotilla_data::Split;
use flotilla_engine::method::KnownMasks;
use flotilla_engine::{ClientCtx, ClientData, ClientHalf, Experiment, ServerHalf, Simulation};
use flotilla_methods::fedmap::{FedMap, FedMapClient};
use flotilla_models::Net;
use std::sync::Arc;

fn config(extra: &str) -> String {
    format!(
        r#"
rounds = 6
[data]
dataset = "fashion-mnist"
num_clients = 4
partition = {{ kind = "iid" }}
[model]
arch = "mlp"
hidden = [32, 16]
[training]
epochs = 1
batch_size = 16
optimizer = "sgd"
lr = 0.05
momentum = 0.9
[sampling]
clients_per_round = 4
[simulation]
checkpoint_every = 0
[method]
name = "fedmap"
warmup = 1
period = 1
rate = 0.3
{extra}
"#
    )
}

fn server(extra: &str) -> (Experiment, FedMap) {
    let exp = Experiment::from_toml(&config(extra)).unwrap();
    let spec = exp.model_spec();
    let init = Net::init_params(&spec, 0).unwrap();
    let s = FedMap::from_config(&exp, spec, init).unwrap();
    (exp, s)
}

fn active(s: &FedMap) -> usize {
    s.counts().1
}

#[test]
fn events_are_nested_exact_and_tie_broken_by_position() {
    let (_, mut s) = server("");
    let (total, start) = s.counts();
    assert_eq!(total, start);
    let mut before_masks = s.current_masks().clone();
    for _ in 0..4 {
        let before = active(&s);
        s.prune();
        let after = active(&s);
        assert_eq!(
            after,
            (0.7 * before as f64).round() as usize,
            "exact (1 − p_G) fraction"
        );
        for (name, m) in s.current_masks() {
            let old = &before_masks[name];
            assert!(
                m.active
                    .iter()
                    .zip(&old.active)
                    .all(|(new, old)| !*new || *old),
                "{name}: a pruned weight came back"
            );
        }
        // pruned entries are exactly zero in the global model
        for (name, m) in s.current_masks() {
            let t = s.global().get(name).unwrap();
            assert!(t.data.iter().zip(&m.active).all(|(v, a)| *a || *v == 0.0));
        }
        before_masks = s.current_masks().clone();
    }
}

#[test]
fn ties_keep_earlier_positions_and_floors_hold() {
    let (exp, _) = server("min_layer_density = 0.5");
    let spec = exp.model_spec();
    let mut init: ParamSet = Net::init_params(&spec, 0).unwrap();
    // All prunable weights equal: ties everywhere. The last layer tiny: its floor must hold.
    for t in init.iter_mut() {
        let v = if t.name == "layers.2.weight" {
            1e-6
        } else {
            0.5
        };
        t.data.iter_mut().for_each(|x| *x = v);
    }
    let mut s = FedMap::from_config(&exp, spec, init).unwrap();
    s.prune();
    let m = &s.current_masks()["layers.0.weight"];
    let kept = m.count_active();
    assert!(
        kept > 0 && m.active[..kept].iter().all(|a| *a),
        "ties keep the earliest positions"
    );
    let last = &s.current_masks()["layers.2.weight"];
    assert!(
        last.count_active() * 2 >= last.active.len(),
        "layer floor of 50% holds"
    );
}

#[test]
fn client_training_keeps_pruned_entries_at_zero() {
    let (exp, mut s) = server("");
    s.prune();
    s.prune();
    let ctx0 = flotilla_engine::PhaseCtx {
        round: 9,
        phase: 0,
        seed: 0,
    };
    let info = flotilla_engine::ClientInfo {
        id: 0,
        profile: flotilla_core::device::DeviceProfile::unlimited(),
        num_examples: 64,
    };
    let task = match s.plan(&ctx0, &[info]).unwrap().remove(0) {
        flotilla_engine::Assignment::Run(t) => *t,
        _ => panic!("planned a skip"),
    };
    let masks: KnownMasks = s.masks();
    let data = ClientData {
        train: synthetic(64, 1),
        holdout: synthetic(0, 1),
        mean: vec![0.3],
        std: vec![0.3],
    };
    let ctx = ClientCtx {
        seed: 0,
        profile: flotilla_core::device::DeviceProfile::unlimited(),
        masks,
    };
    let reply = FedMapClient.execute(&task, &data, &ctx).unwrap();
    let mut moved = false;
    for (name, m) in s.current_masks() {
        let (new, old) = (
            reply.params.get(name).unwrap(),
            task.params.get(name).unwrap(),
        );
        assert!(
            new.data.iter().zip(&m.active).all(|(v, a)| *a || *v == 0.0),
            "{name}: pruned entry changed"
        );
        moved |= new
            .data
            .iter()
            .zip(&old.data)
            .zip(&m.active)
            .any(|((a, b), act)| *act && a != b);
    }
    assert!(moved, "active entries trained");
    let _ = exp;
}

fn simulate(dir: &std::path::Path, extra: &str) -> Rounds {
    let exp = Experiment::from_toml(&config(extra)).unwrap();
    let (server, client) = flotilla_methods::build(&exp).unwrap();
    let split = Split {
        train: synthetic(400, 2),
        test: synthetic(100, 3),
    };
    let mut sim = Simulation::new(exp, split, server, client, dir).unwrap();
    let mut rounds = Rounds(Vec::new());
    sim.run(&mut [&mut rounds]).unwrap();
    rounds
}

#[test]
fn bytes_follow_the_active_count_and_masks_travel_only_when_changed() {
    // rate 0.3 with target 0.5: events end rounds 1 (→ 0.3) and 2 (→ 0.5, capped), then stop.
    let dir = tempfile::tempdir().unwrap();
    let rounds = simulate(dir.path(), "target_sparsity = 0.5");
    let total_params = 784 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10;
    let prunable = 784 * 32 + 32 * 16 + 16 * 10;
    let sparsities: Vec<f64> = rounds
        .0
        .iter()
        .map(|(r, _)| r.extra["sparsity"].as_f64().unwrap())
        .collect();
    assert!(
        (sparsities[0] - 0.3).abs() < 1e-3 && (sparsities[1] - 0.5).abs() < 1e-3,
        "{sparsities:?}"
    );
    assert!(
        sparsities[2..].iter().all(|s| (s - 0.5).abs() < 1e-3),
        "pruning stops at the target"
    );
    let mut prev_active = total_params;
    for (r, clients) in &rounds.0 {
        let active = r.extra["active_params"].as_u64().unwrap() as usize;
        assert_eq!(
            active,
            total_params - prunable
                + (prunable as f64 * (1.0 - sparsities[r.round as usize - 1])).round() as usize
        );
        for c in clients {
            // up: 4 bytes per active value of the model the round trained, plus < 1 KiB of
            // names, shapes and metrics
            let (up, down) = (c.bytes_up as usize, c.bytes_down as usize);
            assert!(
                up >= 4 * prev_active && up < 4 * prev_active + 1024,
                "round {}: up {up} vs {}",
                r.round,
                4 * prev_active
            );
            assert!(down >= 4 * prev_active);
            let extra = down - 4 * prev_active;
            if r.round <= 3 {
                // rounds 1-3 carry a mask the clients lack (the initial one, then each new one):
                // a bitmap of prunable/8 bytes or delta indices, whichever is smaller
                assert!(
                    extra > prunable / 16 && extra < prunable / 8 + 1024,
                    "round {}: {extra} extra bytes",
                    r.round
                );
            } else {
                assert!(
                    extra < 1024,
                    "round {}: no mask should travel, got {extra} extra bytes",
                    r.round
                );
            }
        }
        prev_active = active;
    }
    assert!(rounds.0.last().unwrap().0.test_accuracy.unwrap() > 0.2);
}

#[test]
fn masks_survive_a_checkpoint() {
    let (_, mut s) = server("");
    s.prune();
    let snap = s.snapshot();
    let (_, mut fresh) = server("");
    fresh.restore(snap).unwrap();
    assert_eq!(fresh.current_masks(), s.current_masks());
    assert_eq!(fresh.global(), s.global());
    fresh.prune();
    s.prune();
    assert_eq!(
        fresh.current_masks(),
        s.current_masks(),
        "continues with the same masks"
    );
    let _ = Arc::new(0);
}
