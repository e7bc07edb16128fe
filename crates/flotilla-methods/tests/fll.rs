//! FLL and FedSSL: the invariants of methods.md §9 (frozen blocks bit-identical, uploads of
//! exactly block s and the head, dropped blocks neither sent nor run, the memory estimate
//! against the measurement) and a run through the simulator with its linear-probe metrics.

mod common;

use common::{Rounds, synthetic};
use flotilla_core::ParamSet;
use flotilla_core::device::DeviceProfile;
use flotilla_data::Split;
use flotilla_engine::{
    Assignment, ClientCtx, ClientData, ClientHalf, ClientInfo, Experiment, PhaseCtx, Reply,
    ServerCtx, ServerHalf, Simulation, Task,
};
use flotilla_methods::fll::FllClient;
use flotilla_models::{ModelSpec, View, flops};
use std::collections::BTreeSet;

#[global_allocator]
static ALLOC: flotilla_engine::alloc::CountingAlloc = flotilla_engine::alloc::CountingAlloc;

/// A ViT of `depth` blocks of width `dim` on 28×28 images; `rounds` rounds, 3 clients, all in
/// every round.
fn config(method: &str, dim: usize, depth: usize, rounds: u64) -> String {
    format!(
        r#"
seed = 5
rounds = {rounds}
[data]
dataset = "fashion-mnist"
num_clients = 3
partition = {{ kind = "iid" }}
[model]
arch = "vit"
patch = 7
dim = {dim}
depth = {depth}
heads = 2
[training]
epochs = 1
batch_size = 16
optimizer = "adam"
lr = 0.002
[sampling]
clients_per_round = 3
[evaluation]
every = 2
probe_examples = 120
[simulation]
checkpoint_every = 0
[method]
{method}
"#
    )
}

fn experiment(method: &str, depth: usize, rounds: u64) -> Experiment {
    Experiment::from_toml(&config(method, 16, depth, rounds)).unwrap()
}

fn data(n: usize, seed: u64) -> ClientData {
    let (mean, std) = (vec![0.3], vec![0.35]);
    ClientData {
        train: synthetic(n, seed),
        holdout: synthetic(0, seed),
        mean,
        std,
    }
}

fn info(id: u64) -> ClientInfo {
    ClientInfo {
        id,
        profile: DeviceProfile::unlimited(),
        num_examples: 32,
    }
}

fn client_ctx() -> ClientCtx {
    ClientCtx {
        seed: 5,
        profile: DeviceProfile::unlimited(),
        masks: Default::default(),
    }
}

fn phase(round: u64) -> PhaseCtx {
    PhaseCtx {
        round,
        phase: 0,
        seed: 5,
    }
}

fn tasks(server: &dyn ServerHalf, round: u64, clients: u64) -> Vec<Task> {
    let infos: Vec<ClientInfo> = (0..clients).map(info).collect();
    server
        .plan(&phase(round), &infos)
        .unwrap()
        .into_iter()
        .map(|a| match a {
            Assignment::Run(t) => *t,
            Assignment::Skip(r) => panic!("skipped: {r}"),
        })
        .collect()
}

fn global(server: &dyn ServerHalf) -> ParamSet {
    server.snapshot().params["global"].clone()
}

/// What stage `s` trains: block `s`, the head (final LayerNorm and projection), and the stem
/// in stage 0.
fn trained_in_stage(name: &str, s: usize) -> bool {
    match ModelSpec::block_of(name) {
        Some(b) => b == s,
        None => name.starts_with("norm.") || name.starts_with("head.") || s == 0,
    }
}

#[test]
fn each_stage_uploads_exactly_its_block_and_the_head_and_frozen_blocks_stay_bit_identical() {
    // depth 3, 6 rounds: stages 0, 0, 1, 1, 2, 2.
    let exp = experiment("name = \"fll\"", 3, 6);
    let (mut server, client) = flotilla_methods::build(&exp).unwrap();
    let datasets: Vec<ClientData> = (0..2).map(|c| data(32, c)).collect();
    for round in 1..=6u64 {
        let s = (round as usize - 1) / 2;
        let before = global(server.as_ref());
        let mut replies: Vec<Reply> = Vec::new();
        for (c, task) in tasks(server.as_ref(), round, 2).into_iter().enumerate() {
            // Deeper blocks are neither sent nor run.
            for n in task.params.names() {
                assert!(
                    ModelSpec::block_of(n).is_none_or(|b| b <= s),
                    "{n} sent in stage {s}"
                );
            }
            assert_eq!(
                task.view.active_blocks,
                Some((0..3).map(|b| b <= s).collect())
            );
            let reply = client.execute(&task, &datasets[c], &client_ctx()).unwrap();
            let uploaded: BTreeSet<&str> = reply.params.names().collect();
            let expected: BTreeSet<&str> =
                before.names().filter(|n| trained_in_stage(n, s)).collect();
            assert_eq!(uploaded, expected, "round {round}, stage {s}");
            server.check_reply(&task, &reply).unwrap();
            replies.push(reply);
        }
        server
            .aggregate(&phase(round), &replies, &mut ServerCtx::default())
            .unwrap();
        let after = global(server.as_ref());
        for (b, a) in before.iter().zip(after.iter()) {
            if trained_in_stage(&b.name, s) {
                assert_ne!(b.data, a.data, "{} did not train in stage {s}", b.name);
            } else {
                assert_eq!(
                    b.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    a.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{} changed in stage {s}",
                    b.name
                );
            }
        }
    }
}

#[test]
fn a_reply_with_a_frozen_or_missing_tensor_is_refused() {
    let exp = experiment("name = \"fll\"", 3, 6);
    let (server, client) = flotilla_methods::build(&exp).unwrap();
    let task = tasks(server.as_ref(), 3, 1).remove(0); // stage 1
    let reply = client.execute(&task, &data(32, 0), &client_ctx()).unwrap();
    server.check_reply(&task, &reply).unwrap();
    let mut frozen = reply.clone();
    frozen
        .params
        .push(task.params.get("blocks.0.fc1.weight").unwrap().clone())
        .unwrap();
    assert!(
        server.check_reply(&task, &frozen).is_err(),
        "a frozen block came back"
    );
    let missing = Reply {
        params: reply.params.filter(|n| !n.starts_with("head.")),
        ..reply
    };
    assert!(
        server.check_reply(&task, &missing).is_err(),
        "the head is missing"
    );
}

#[test]
fn a_dropped_block_is_neither_sent_nor_run() {
    // Round 5 of 6 trains block 2 of 3; with p = 1 both frozen blocks are dropped.
    let samples = 32;
    for (rate, keep_last, dropped) in [
        ("0.0", false, vec![]),
        ("1.0", false, vec![0, 1]),
        ("1.0", true, vec![0]),
    ] {
        let exp = experiment(
            &format!("name = \"fll\"\ndd_rate = {rate}\ndd_keep_last = {keep_last}"),
            3,
            6,
        );
        let (server, client) = flotilla_methods::build(&exp).unwrap();
        let task = tasks(server.as_ref(), 5, 1).remove(0);
        assert_eq!(task.options["dropped"], serde_json::json!(dropped));
        for b in 0..3 {
            let runs = b == 2 || !dropped.contains(&b);
            assert_eq!(task.view.block_active(b), runs, "block {b}");
            let sent = task
                .params
                .names()
                .any(|n| ModelSpec::block_of(n) == Some(b));
            assert_eq!(sent, runs, "block {b} sent: {sent}, runs: {runs}");
        }
        // The client's FLOPs are those of the blocks that run: two views of every sample,
        // frozen blocks forward only.
        let reply = client
            .execute(&task, &data(samples, 1), &client_ctx())
            .unwrap();
        let want = flops::training(&task.model, &task.view, 2 * samples);
        assert_eq!(reply.resources.flops, want);
        let all_run = View {
            active_blocks: Some(vec![true; 3]),
            ..task.view.clone()
        };
        if !dropped.is_empty() {
            assert!(reply.resources.flops < flops::training(&task.model, &all_run, 2 * samples));
        }
    }
}

#[test]
fn a_task_that_sends_a_block_it_does_not_run_is_refused() {
    let exp = experiment("name = \"fll\"\ndd_rate = 1.0", 3, 6);
    let (server, _) = flotilla_methods::build(&exp).unwrap();
    let mut task = tasks(server.as_ref(), 5, 1).remove(0);
    let g = global(server.as_ref());
    for t in g.iter().filter(|t| ModelSpec::block_of(&t.name) == Some(0)) {
        task.params.push(t.clone()).unwrap();
    }
    let e = FllClient
        .execute(&task, &data(16, 0), &client_ctx())
        .unwrap_err();
    assert!(
        e.to_string().contains("block 0 is sent but does not run"),
        "{e}"
    );
}

#[test]
fn the_memory_estimate_tracks_the_measured_peak_for_both_methods() {
    // The issue's width (96) at depth 4 and a batch of 32 (64 inputs with the two views).
    let mut peaks = Vec::new();
    for method in ["fedssl", "fll"] {
        let toml = config(&format!("name = \"{method}\""), 96, 4, 8)
            .replace("batch_size = 16", "batch_size = 32");
        let exp = Experiment::from_toml(&toml).unwrap();
        let (server, client) = flotilla_methods::build(&exp).unwrap();
        // Round 7: stage 3, three frozen blocks below the trained one.
        let task = tasks(server.as_ref(), 7, 1).remove(0);
        let reply = client.execute(&task, &data(64, 2), &client_ctx()).unwrap();
        let (est, peak) = (
            reply.resources.estimated_memory_bytes as f64,
            reply.resources.peak_memory_bytes as f64,
        );
        let ratio = est / peak;
        assert!(
            (0.7..=1.3).contains(&ratio),
            "{method}: estimate {est} vs measured {peak} (ratio {ratio:.2})"
        );
        peaks.push(peak);
    }
    assert!(
        peaks[0] > 2.0 * peaks[1],
        "end-to-end {} vs layer-wise {}",
        peaks[0],
        peaks[1]
    );
}

#[test]
fn fedssl_sends_trains_and_uploads_every_tensor() {
    let exp = experiment("name = \"fedssl\"", 3, 2);
    let (server, client) = flotilla_methods::build(&exp).unwrap();
    let task = tasks(server.as_ref(), 1, 1).remove(0);
    assert_eq!(task.view, View::full());
    let g = global(server.as_ref());
    assert_eq!(task.params, g);
    let reply = client.execute(&task, &data(32, 0), &client_ctx()).unwrap();
    g.check_same_layout(&reply.params).unwrap();
    for (a, b) in g.iter().zip(reply.params.iter()) {
        assert_ne!(a.data, b.data, "{} did not train", a.name);
    }
}

#[test]
fn a_simulated_run_reports_the_probe_its_floors_and_each_clients_draw() {
    let exp = experiment("name = \"fll\"\ndd_rate = 0.5", 3, 6);
    let (server, client) = flotilla_methods::build(&exp).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let split = Split {
        train: synthetic(150, 1),
        test: synthetic(60, 2),
    };
    let mut sim = Simulation::new(exp, split, server, client, dir.path()).unwrap();
    let mut rounds = Rounds(Vec::new());
    let summary = sim.run(&mut [&mut rounds]).unwrap();
    // The bright band marks the label: raw pixels separate the classes.
    let floor = &summary["probe_floor"];
    assert!(floor["raw_pixels"].as_f64().unwrap() > 0.9, "{floor}");
    assert!(floor["initial_model"].as_f64().is_some(), "{floor}");
    for (record, clients) in &rounds.0 {
        let evaluated = record.round % 2 == 0;
        assert_eq!(record.test_accuracy.is_some(), evaluated);
        assert_eq!(record.extra.contains_key("probe_accuracy"), evaluated);
        assert!(record.test_loss.is_none(), "a probe has no test loss");
        let stage = (record.round as usize - 1) / 2;
        for c in clients {
            assert_eq!(c.extra["stage"], serde_json::json!(stage));
            let dropped = c.extra["dd_dropped"].as_array().unwrap();
            assert!(
                dropped
                    .iter()
                    .all(|b| (b.as_u64().unwrap() as usize) < stage)
            );
        }
        assert_eq!(record.extra["trained_blocks"], serde_json::json!(stage + 1));
    }
    let last = &rounds.0.last().unwrap().0;
    assert_eq!(
        summary["final_test_accuracy"].as_f64(),
        last.test_accuracy,
        "the summary reports the last probe"
    );
}

#[test]
fn frozen_blocks_travel_once_with_the_cache_and_every_round_without() {
    let down = |cache: bool| -> Vec<u64> {
        let exp = experiment(&format!("name = \"fll\"\ncache_frozen = {cache}"), 3, 6);
        let (server, client) = flotilla_methods::build(&exp).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let split = Split {
            train: synthetic(150, 1),
            test: synthetic(30, 2),
        };
        let mut sim = Simulation::new(exp, split, server, client, dir.path()).unwrap();
        let mut rounds = Rounds(Vec::new());
        sim.run(&mut [&mut rounds]).unwrap();
        rounds.0.iter().map(|(r, _)| r.bytes_down).collect()
    };
    let (cached, uncached) = (down(true), down(false));
    // Stage 0 (rounds 1, 2) freezes nothing: the same bytes either way.
    assert_eq!(cached[..2], uncached[..2]);
    // Round 3 (stage 1) first freezes the stem and block 0: they travel either way. From then
    // on, a client that holds a frozen tensor is sent a reference: it never changes again.
    // (Three clients, all in every round, so every client holds what it was sent.)
    assert!(
        cached[2].abs_diff(uncached[2]) < 1000,
        "{cached:?} {uncached:?}"
    );
    for r in 3..6 {
        assert!(
            cached[r] + 10_000 < uncached[r],
            "round {}: {cached:?} {uncached:?}",
            r + 1
        );
    }
}
