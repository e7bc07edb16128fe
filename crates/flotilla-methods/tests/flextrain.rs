//! FlexTrain invariants (methods.md §9) and the behaviour of its baselines: uploads hold only
//! the device's prefix, β = 0 is plain cross-entropy, full-depth aggregation is FedAvg, the
//! paper's and the holders-only aggregation rules, a device that fits no prefix is refused
//! with a reason, FedClass keeps classes apart, FedSmall trains the weakest device's depth,
//! centralized training leaves blocks deeper than the drawn depth untouched, and measured
//! upload bytes follow the prefix's parameter count.

mod common;

use common::{Rounds, reply, synthetic};
use flotilla_core::ParamSet;
use flotilla_core::device::DeviceProfile;
use flotilla_data::Split;
use flotilla_engine::local::{CrossEntropy, Objective, Recipe, TrainJob};
use flotilla_engine::sink::{ClientRecord, ClientStatus};
use flotilla_engine::{
    Assignment, ClientCtx, ClientData, ClientHalf, ClientInfo, Experiment, PhaseCtx, ServerCtx,
    ServerHalf, Simulation, Task,
};
use flotilla_methods::fedavg::FedAvg;
use flotilla_methods::flextrain::{DeviceDepth, DistillOn, SampledDepth};
use flotilla_methods::flextrain::{FlexTrain, FlexTrainClient};
use flotilla_models::{ModelSpec, Net, View};

// Measured peak memory needs the counting allocator, as in the `flotilla` binary.
#[global_allocator]
static ALLOC: flotilla_engine::alloc::CountingAlloc = flotilla_engine::alloc::CountingAlloc;

/// ResNet-8 at width 0.25: 3 blocks (one per stage), fast enough for tests.
fn config(method: &str, extra: &str, tiers: &str) -> String {
    format!(
        r#"
rounds = 2
[data]
dataset = "fashion-mnist"
num_clients = 6
partition = {{ kind = "iid" }}
[model]
arch = "resnet"
blocks_per_stage = 1
width = 0.25
[training]
epochs = 1
batch_size = 16
optimizer = "sgd"
lr = 0.05
momentum = 0.9
[sampling]
clients_per_round = 6
[simulation]
checkpoint_every = 0
[method]
name = "{method}"
{extra}
{tiers}
"#
    )
}

fn server(method: &str, extra: &str) -> FlexTrain {
    let exp = Experiment::from_toml(&config(method, extra, "")).unwrap();
    let spec = exp.model_spec();
    let init = Net::init_params(&spec, 0).unwrap();
    FlexTrain::from_config(&exp, spec, init).unwrap()
}

fn client_data(n: usize, seed: u64) -> ClientData {
    ClientData {
        train: synthetic(n, seed),
        holdout: synthetic(0, seed),
        mean: vec![0.2860],
        std: vec![0.3530],
    }
}

fn device(id: u64, memory_bytes: u64) -> ClientInfo {
    ClientInfo {
        id,
        profile: DeviceProfile {
            tier: format!("mem-{memory_bytes}"),
            memory_bytes,
            ..DeviceProfile::unlimited()
        },
        num_examples: 32,
    }
}

/// A budget between the estimates of depth `d` and `d + 1`.
fn budget_for(s: &FlexTrain, d: usize) -> u64 {
    let needs = s.memory_needs();
    let at = needs.iter().position(|(k, _)| *k == d).unwrap();
    match needs.get(at + 1) {
        Some((_, next)) => (needs[at].1 + next) / 2,
        None => needs[at].1 + (1 << 20),
    }
}

fn ctx() -> PhaseCtx {
    PhaseCtx {
        round: 1,
        phase: 0,
        seed: 0,
    }
}

fn tasks(s: &FlexTrain, fleet: &[ClientInfo]) -> Vec<Task> {
    s.plan(&ctx(), fleet)
        .unwrap()
        .into_iter()
        .map(|a| match a {
            Assignment::Run(t) => *t,
            Assignment::Skip(r) => panic!("skipped: {r}"),
        })
        .collect()
}

fn depth_of(t: &Task) -> usize {
    t.view.prefix_depth(3).unwrap()
}

#[test]
fn the_planner_gives_each_device_the_deepest_prefix_its_memory_fits() {
    let mut s = server("flextrain", "");
    let needs = s.memory_needs().to_vec();
    assert_eq!(needs.iter().map(|(d, _)| *d).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(needs.windows(2).all(|w| w[0].1 < w[1].1), "{needs:?}");
    let fleet: Vec<ClientInfo> = (1..=3)
        .map(|d| device(d as u64, budget_for(&s, d)))
        .collect();
    s.observe(&fleet);
    let ts = tasks(&s, &fleet);
    assert_eq!(ts.iter().map(depth_of).collect::<Vec<_>>(), [1, 2, 3]);
    for t in &ts {
        let d = depth_of(t);
        // Only the prefix travels: stem, blocks below d, classifier.
        assert!(t.params.names().all(|n| ModelSpec::in_prefix(n, d)));
        assert!(t.params.names().any(|n| n.starts_with("fc.")));
        let opts = &t.options;
        // The weakest class skips distillation; the others teach their k − 1 prefix.
        let expected = if d == 1 {
            serde_json::Value::Null
        } else {
            (d - 1).into()
        };
        assert_eq!(opts["student"], expected, "depth {d}");
    }
}

#[test]
fn a_device_that_fits_no_prefix_is_refused_with_the_reason() {
    let s = server("flextrain", "");
    let tiny = s.memory_needs()[0].1 - 1;
    match s.plan(&ctx(), &[device(0, tiny)]).unwrap().pop().unwrap() {
        Assignment::Skip(reason) => {
            assert!(reason.contains("fits no prefix"), "{reason}");
            assert!(reason.contains("depth 1"), "{reason}");
        }
        Assignment::Run(_) => panic!("a device below the shallowest estimate got a task"),
    }
}

#[test]
fn uploads_hold_exactly_the_device_prefix() {
    let mut s = server("flextrain", "");
    let fleet: Vec<ClientInfo> = (1..=3)
        .map(|d| device(d as u64, budget_for(&s, d)))
        .collect();
    s.observe(&fleet);
    let data = client_data(32, 1);
    for t in tasks(&s, &fleet) {
        let d = depth_of(&t);
        let cctx = ClientCtx {
            seed: 0,
            profile: fleet[d - 1].profile.clone(),
            masks: Default::default(),
        };
        let reply = FlexTrainClient.execute(&t, &data, &cctx).unwrap();
        assert!(
            reply.params.names().all(|n| ModelSpec::in_prefix(n, d)),
            "depth {d} uploaded a deeper block"
        );
        s.check_reply(&t, &reply).unwrap();
        assert_ne!(reply.params, t.params, "depth {d} trained nothing");
        // A reply carrying a deeper block than its task is refused.
        let mut forged = reply.clone();
        if d < 3 {
            forged
                .params
                .push(flotilla_core::Tensor::zeros(
                    format!("blocks.{d}.conv1.weight"),
                    vec![1],
                ))
                .unwrap();
            assert!(s.check_reply(&t, &forged).is_err());
        }
    }
}

fn recipe() -> Recipe {
    Recipe {
        epochs: 1,
        batch_size: 16,
        optimizer: flotilla_engine::local::OptimizerKind::Sgd,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 0.001,
    }
}

/// Local training without masks; panics on error (a test helper).
fn fit<O: Objective>(
    spec: &ModelSpec,
    view: &View,
    init: &ParamSet,
    data: &ClientData,
    recipe: &Recipe,
    seed: u64,
    objective: &O,
) -> flotilla_engine::local::TrainOutcome {
    TrainJob::new(spec, view, init, data, recipe, objective)
        .seed(seed)
        .train()
        .unwrap()
}

fn spec() -> ModelSpec {
    Experiment::from_toml(&config("flextrain", "", ""))
        .unwrap()
        .model_spec()
}

#[test]
fn beta_zero_is_plain_cross_entropy_and_beta_above_zero_is_not() {
    let spec = spec();
    let init = Net::init_params(&spec, 3).unwrap();
    let data = client_data(48, 2);
    let view = View::trainable_prefix(2, 3);
    let plain = fit(
        &spec,
        &view,
        &init,
        &data,
        &recipe(),
        7,
        &CrossEntropy::under(&view),
    );
    let run = |objective: &DeviceDepth| fit(&spec, &view, &init, &data, &recipe(), 7, objective);
    let device = |beta: f64, on: DistillOn| DeviceDepth {
        depth: 2,
        student: Some(1),
        beta,
        on,
    };
    let zero = run(&device(0.0, DistillOn::Logits));
    assert_eq!(plain.params, zero.params);
    assert_eq!(plain.mean_loss, zero.mean_loss);
    for on in [DistillOn::Logits, DistillOn::Softmax] {
        let distilled = run(&device(0.2, on));
        assert_ne!(plain.params, distilled.params, "{on:?}");
        assert!(
            distilled.mean_loss > plain.mean_loss,
            "{on:?}: the term adds to the loss"
        );
    }
    // Centralized: all mass on the full depth and β = 0 is plain training of the full model.
    let full = fit(
        &spec,
        &View::full(),
        &init,
        &data,
        &recipe(),
        7,
        &SampledDepth {
            pi: vec![0.0, 0.0, 0.0, 1.0],
            beta: 0.0,
            on: DistillOn::Logits,
        },
    );
    let plain_full = fit(
        &spec,
        &View::full(),
        &init,
        &data,
        &recipe(),
        7,
        &CrossEntropy::under(&View::full()),
    );
    assert_eq!(full.params, plain_full.params);
}

fn block_tensors(p: &ParamSet, from: usize) -> ParamSet {
    p.filter(|n| !ModelSpec::in_prefix(n, from))
}

#[test]
fn centralized_steps_never_update_blocks_deeper_than_the_drawn_depth() {
    let spec = spec();
    let init = Net::init_params(&spec, 4).unwrap();
    let data = client_data(64, 3);
    // Depth 1 or 2 only; depth 2 draws distil toward depth 3, whose block is a detached teacher.
    let out = fit(
        &spec,
        &View::full(),
        &init,
        &data,
        &recipe(),
        9,
        &SampledDepth {
            pi: vec![0.0, 0.5, 0.5, 0.0],
            beta: 0.2,
            on: DistillOn::Logits,
        },
    );
    assert_eq!(block_tensors(&out.params, 2), block_tensors(&init, 2));
    assert_ne!(block_tensors(&out.params, 1), block_tensors(&init, 1));
    assert_eq!(out.step_tally.keys().copied().collect::<Vec<_>>(), [1, 2]);
    assert_eq!(out.step_tally.values().sum::<usize>(), out.steps);
}

#[test]
fn sampled_depths_follow_pi_so_the_trained_share_matches_the_analytic_r_bar() {
    let spec = spec();
    let init = Net::init_params(&spec, 0).unwrap();
    let data = client_data(16 * 200, 4);
    let pi = vec![0.0, 0.25, 0.25, 0.5];
    let out = fit(
        &spec,
        &View::full(),
        &init,
        &data,
        &Recipe {
            lr: 0.0,
            momentum: 0.0,
            weight_decay: 0.0,
            ..recipe()
        },
        11,
        &SampledDepth {
            pi: pi.clone(),
            beta: 0.0,
            on: DistillOn::Logits,
        },
    );
    let share =
        |k: usize| init.filter(|n| ModelSpec::in_prefix(n, k)).numel() as f64 / init.numel() as f64;
    let analytic: f64 = pi.iter().enumerate().map(|(k, p)| p * share(k)).sum();
    let measured: f64 = out
        .step_tally
        .iter()
        .map(|(k, n)| *n as f64 * share(*k))
        .sum::<f64>()
        / out.steps as f64;
    // 200 draws: the standard error of the mean share is under 0.03.
    assert!(
        (analytic - measured).abs() < 0.1,
        "analytic {analytic}, measured {measured}"
    );
}

fn perturbed(p: &ParamSet, by: f32) -> ParamSet {
    let mut q = p.clone();
    for (i, t) in q.iter_mut().enumerate() {
        for (j, v) in t.data.iter_mut().enumerate() {
            *v += by * ((i * 31 + j) % 7) as f32;
        }
    }
    q
}

#[test]
fn aggregation_with_every_device_at_full_depth_is_fedavg() {
    let exp = Experiment::from_toml(&config("fedavg", "", "")).unwrap();
    let spec = exp.model_spec();
    let init = Net::init_params(&spec, 0).unwrap();
    let mut fedavg = FedAvg::from_config(&exp, spec, init.clone()).unwrap();
    let mut flex = server("flextrain", "");
    flex.observe(&[device(0, u64::MAX), device(1, u64::MAX)]);
    let replies = vec![
        reply(0, perturbed(&init, 0.01), 30),
        reply(1, perturbed(&init, -0.02), 10),
    ];
    let mut sctx = ServerCtx::default();
    fedavg.aggregate(&ctx(), &replies, &mut sctx).unwrap();
    flex.aggregate(&ctx(), &replies, &mut sctx).unwrap();
    for (a, b) in fedavg.global().iter().zip(flex.global().iter()) {
        assert_eq!(a.name, b.name);
        for (x, y) in a.data.iter().zip(&b.data) {
            assert!(
                (x - y).abs() <= 1e-6 * x.abs().max(1.0),
                "{}: {x} vs {y}",
                a.name
            );
        }
    }
}

#[test]
fn deep_blocks_shrink_toward_the_global_under_the_papers_rule_and_not_under_holders() {
    for (rule, expect_deep) in [("all", 0.25f32), ("holders", 1.0)] {
        let mut s = server("flextrain", &format!("aggregation = \"{rule}\""));
        let init = s.global().clone();
        let deep = |p: &ParamSet| p.filter(|n| ModelSpec::block_of(n) == Some(2));
        let shallow = |p: &ParamSet| p.filter(|n| ModelSpec::in_prefix(n, 2));
        // Device 0 trained the full model (+1 everywhere, 1 example), device 1 only the
        // depth-2 prefix (+1, 3 examples).
        let plus_one = |p: &ParamSet| {
            let mut q = p.clone();
            q.iter_mut()
                .for_each(|t| t.data.iter_mut().for_each(|v| *v += 1.0));
            q
        };
        let replies = vec![
            reply(0, plus_one(&init), 1),
            reply(1, shallow(&plus_one(&init)), 3),
        ];
        s.aggregate(&ctx(), &replies, &mut ServerCtx::default())
            .unwrap();
        for (new, old) in deep(s.global()).iter().zip(deep(&init).iter()) {
            for (x, y) in new.data.iter().zip(&old.data) {
                assert!(
                    (x - y - expect_deep).abs() < 1e-5,
                    "{rule}: {} moved {}",
                    new.name,
                    x - y
                );
            }
        }
        for (new, old) in shallow(s.global()).iter().zip(shallow(&init).iter()) {
            for (x, y) in new.data.iter().zip(&old.data) {
                assert!((x - y - 1.0).abs() < 1e-5, "{rule}: {}", new.name);
            }
        }
    }
}

#[test]
fn fedsmall_trains_the_weakest_depth_and_fedclass_keeps_classes_apart() {
    let mut small = server("fedsmall", "");
    let fleet = |s: &FlexTrain| -> Vec<ClientInfo> {
        vec![
            device(0, budget_for(s, 2)),
            device(1, budget_for(s, 3)),
            device(2, budget_for(s, 3)),
        ]
    };
    let f = fleet(&small);
    small.observe(&f);
    assert_eq!(
        tasks(&small, &f).iter().map(depth_of).collect::<Vec<_>>(),
        [2, 2, 2]
    );
    assert!(
        tasks(&small, &f)
            .iter()
            .all(|t| t.options["student"].is_null())
    );
    let evals = small.eval_models();
    assert_eq!(evals.len(), 1);
    assert_eq!(evals[0].devices, Some(3));

    let mut class = server("fedclass", "");
    let f = fleet(&class);
    class.observe(&f);
    let ts = tasks(&class, &f);
    assert_eq!(ts.iter().map(depth_of).collect::<Vec<_>>(), [2, 3, 3]);
    let before = class.eval_models();
    // Only the depth-3 class replies: the depth-2 class model must not move.
    let r = reply(1, perturbed(&ts[1].params, 0.5), 10);
    class
        .aggregate(&ctx(), &[r], &mut ServerCtx::default())
        .unwrap();
    let after = class.eval_models();
    let by_label = |v: &[flotilla_engine::EvalModel], l: &str| {
        v.iter().find(|m| m.label == l).unwrap().params.clone()
    };
    assert_eq!(by_label(&before, "depth-2"), by_label(&after, "depth-2"));
    assert_ne!(by_label(&before, "depth-3"), by_label(&after, "depth-3"));
    assert_eq!(
        after.iter().map(|m| m.devices).collect::<Vec<_>>(),
        [Some(1), Some(2)]
    );
}

#[test]
fn a_simulated_fleet_reports_mean_device_accuracy_and_bytes_per_prefix() {
    let probe = server("flextrain", "");
    let mib = |b: u64| b as f64 / 1048576.0;
    let tier = |name: &str, share: u32, mem: f64| {
        format!(
            "[[fleet.tiers]]\nname = \"{name}\"\nshare = {share}\nmemory_mib = {mem}\ngflops = 1\nuplink_mbps = 10\ndownlink_mbps = 10\n"
        )
    };
    let tiers = [
        tier("weak", 2, mib(budget_for(&probe, 1))),
        tier("mid", 2, mib(budget_for(&probe, 2))),
        tier("strong", 1, mib(budget_for(&probe, 3))),
        tier("too-small", 1, mib(probe.memory_needs()[0].1) / 2.0),
    ]
    .concat();
    let exp = Experiment::from_toml(&config("flextrain", "", &tiers)).unwrap();
    let (server, client) = flotilla_methods::build(&exp).unwrap();
    let split = Split {
        train: synthetic(240, 5),
        test: synthetic(100, 6),
    };
    let dir = tempfile::tempdir().unwrap();
    let mut sim = Simulation::new(exp, split, server, client, dir.path()).unwrap();
    let mut rounds = Rounds(Vec::new());
    let summary = sim.run(&mut [&mut rounds]).unwrap();
    let (record, clients) = rounds.0.last().unwrap();
    // The device that fits no prefix is refused with the reason, every round.
    let refused: Vec<&ClientRecord> = clients.iter().filter(|c| c.tier == "too-small").collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].status, ClientStatus::Skipped);
    assert!(
        refused[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("fits no prefix")
    );
    // Mean device accuracy: the per-depth accuracies weighted by the devices of each class
    // (2 at depth 1, 2 at depth 2, 1 at depth 3; the refused device deploys nothing).
    let acc = |k: &str| record.extra[k].as_f64().unwrap();
    let expected = (2.0 * acc("test_accuracy/depth-1")
        + 2.0 * acc("test_accuracy/depth-2")
        + acc("test_accuracy/depth-3"))
        / 5.0;
    assert!((acc("mean_device_accuracy") - expected).abs() < 1e-12);
    assert_eq!(record.test_accuracy, Some(acc("mean_device_accuracy")));
    assert_eq!(
        summary["final_mean_device_accuracy"].as_f64(),
        Some(acc("mean_device_accuracy"))
    );
    // Measured uplink bytes per device: 4 bytes per prefix parameter plus a small envelope.
    let init = Net::init_params(&sim.server().eval_models()[0].spec, 0).unwrap();
    let depth_of_tier = |t: &str| match t {
        "weak" => 1,
        "mid" => 2,
        _ => 3,
    };
    for c in clients.iter().filter(|c| c.status == ClientStatus::Ok) {
        let k = depth_of_tier(&c.tier);
        let prefix = init.filter(|n| ModelSpec::in_prefix(n, k)).numel() as u64;
        assert!(
            c.bytes_up >= 4 * prefix && c.bytes_up < 4 * prefix + 4096,
            "{}: {} bytes for {prefix} parameters",
            c.tier,
            c.bytes_up
        );
        assert!(c.peak_memory_bytes > 0);
    }
    // Measured peak memory grows with the depth a device trains.
    let peak = |t: &str| {
        clients
            .iter()
            .filter(|c| c.tier == t && c.status == ClientStatus::Ok)
            .map(|c| c.peak_memory_bytes)
            .max()
            .unwrap()
    };
    assert!(peak("weak") < peak("mid") && peak("mid") < peak("strong"));
}
