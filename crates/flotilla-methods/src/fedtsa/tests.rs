use super::*;
use flotilla_core::device::DeviceProfile;
use flotilla_testkit::{client_data, images};

fn config(method: &str, extra: &str) -> Experiment {
    Experiment::from_toml(&toml(method, extra)).unwrap()
}

fn toml(method: &str, extra: &str) -> String {
    format!(
        r#"
rounds = 1
[data]
dataset = "fashion-mnist"
num_clients = 30
partition = {{ kind = "iid" }}
[model]
arch = "mlp"
hidden = [2048, 1024]
[training]
epochs = 1
batch_size = 20
optimizer = "sgd"
lr = 0.1
[sampling]
clients_per_round = 30
[server_data]
source = "holdout"
size = 1000
labelled = false
[method]
name = "{method}"
{extra}
"#
    )
}

fn server(method: &str, extra: &str) -> FedTsa {
    let exp = config(method, extra);
    FedTsa::from_config(&exp, exp.model_spec()).unwrap()
}

fn ctx() -> PhaseCtx {
    PhaseCtx {
        round: 1,
        phase: 0,
        seed: 0,
    }
}

fn device(id: u64, memory_bytes: u64) -> ClientInfo {
    ClientInfo {
        id,
        profile: DeviceProfile {
            tier: format!("d{id}"),
            memory_bytes,
            ..DeviceProfile::unlimited()
        },
        num_examples: 100,
    }
}

/// Three memory tiers of ten devices, ±10% around centres evenly spaced on a log scale: the
/// two weaker between consecutive rungs' training estimates (their geometric mean), so that
/// each tier affords exactly one rung of the ladder.
fn three_tier_fleet(s: &FedTsa) -> Vec<ClientInfo> {
    let r: Vec<f64> = s.ladder().iter().map(|r| r.memory_bytes as f64).collect();
    let weak = (r[2] * r[1]).sqrt();
    let middle = (r[1] * r[0]).sqrt();
    let mut fleet = Vec::new();
    for (tier, centre) in [weak, middle, middle * middle / weak]
        .into_iter()
        .enumerate()
    {
        for i in 0..10u64 {
            let spread = 0.9 + 0.2 * i as f64 / 9.0;
            fleet.push(device(tier as u64 * 10 + i, (centre * spread) as u64));
        }
    }
    fleet
}

fn run(a: &Assignment) -> &Task {
    match a {
        Assignment::Run(t) => t,
        Assignment::Skip(r) => panic!("skipped: {r}"),
    }
}

fn reply(task: &Task, params: ParamSet, n: u64) -> Reply {
    Reply {
        round: task.round,
        phase: task.phase,
        client: task.client,
        num_examples: n,
        params,
        metrics: Default::default(),
        resources: Default::default(),
    }
}

/// Plans round 1 for `fleet` and answers every task with the model it was sent, each value
/// moved by `shift(device)`, with 10 examples.
fn replies_moved_by(
    s: &FedTsa,
    fleet: &[ClientInfo],
    shift: impl Fn(&ClientInfo) -> f32,
) -> Vec<Reply> {
    s.plan(&ctx(), fleet)
        .unwrap()
        .iter()
        .zip(fleet)
        .map(|(a, c)| {
            let t = run(a);
            let mut p = t.params.clone();
            for t in p.iter_mut() {
                t.data.iter_mut().for_each(|v| *v += shift(c));
            }
            reply(t, p, 10)
        })
        .collect()
}

/// Mean over the server set of KL(softmax(z_a/t) ‖ softmax(z_b/t)) between two clusters.
/// `figure` of each cluster's rung, summed over the clusters.
fn over_clusters(s: &FedTsa, figure: impl Fn(&Rung) -> f64) -> f64 {
    s.clusters()
        .iter()
        .map(|c| figure(&s.ladder()[c.rung]))
        .sum()
}

fn disagreement(s: &FedTsa, data: &ClientData, a: usize, b: usize) -> f64 {
    let p = |k: usize| {
        let c = &s.clusters()[k];
        let z = logits(
            &s.ladder()[c.rung].spec,
            &View::full(),
            &c.params,
            &data.train,
            &data.mean,
            &data.std,
        )
        .unwrap();
        softmax_rows(&z, 10, s.temperature)
    };
    let (pa, pb) = (p(a), p(b));
    let kl: f64 = pa
        .iter()
        .zip(&pb)
        .map(|(x, y)| f64::from(*x) * (f64::from(x.max(1e-12)) / f64::from(y.max(1e-12))).ln())
        .sum();
    kl / data.train.len() as f64
}

#[test]
fn the_kde_finds_three_memory_tiers_and_each_gets_the_width_it_affords() {
    let mut s = server("fedtsa", "");
    let fleet = three_tier_fleet(&s);
    s.observe(&fleet);
    let clusters = s.clusters();
    assert_eq!(clusters.len(), 3, "{:?}", s.summary());
    // Weakest first: the narrowest rung, then the middle, then the widest.
    let rungs: Vec<usize> = clusters.iter().map(|c| c.rung).collect();
    assert_eq!(rungs, vec![2, 1, 0]);
    assert!(clusters.iter().all(|c| c.devices == 10));
    for c in &fleet {
        let tier = (c.id / 10) as usize;
        assert_eq!(s.cluster_of(c.id), Some(tier), "device {}", c.id);
    }
    // Each device is sent its cluster's model at its width: FedAvg's task at that width.
    let plan = s.plan(&ctx(), &fleet).unwrap();
    for (c, a) in fleet.iter().zip(&plan) {
        let t = run(a);
        let rung = &s.ladder()[2 - (c.id / 10) as usize];
        assert!(rung.memory_bytes <= c.profile.memory_bytes);
        assert_eq!(t.model, rung.spec);
        assert_eq!(t.params.numel(), rung.init.numel());
        assert!(s.task_cost(t).memory_bytes <= c.profile.memory_bytes);
    }
    let summary = s.summary();
    assert_eq!(summary["clusters"].as_array().unwrap().len(), 3);
    assert_eq!(summary["cuts"].as_array().unwrap().len(), 2);
}

#[test]
fn a_device_that_fits_no_rung_is_skipped_with_the_reason() {
    let mut s = server("fedtsa", "");
    let narrowest = s.ladder()[2].memory_bytes;
    let weak = device(99, narrowest / 2);
    s.observe(std::slice::from_ref(&weak));
    assert!(s.clusters().is_empty());
    match &s.plan(&ctx(), &[weak]).unwrap()[0] {
        Assignment::Skip(why) => assert!(why.contains("narrowest model"), "{why}"),
        Assignment::Run(_) => panic!("a device below the narrowest model was given a task"),
    }
}

#[test]
fn the_deadline_narrows_a_slow_device() {
    let mut s = server("fedtsa", "");
    let mut slow = device(0, u64::MAX);
    slow.profile.flops_per_s = 1e6;
    // The deadline lets the slow device finish the narrowest model but not the widest.
    let t_wide = s.round_time_s(&slow, &s.ladder()[0]);
    let t_narrow = s.round_time_s(&slow, &s.ladder()[2]);
    assert!(t_narrow < t_wide);
    s.deadline_s = Some((t_narrow * 1.01).min(t_wide * 0.99));
    assert_eq!(s.capability(&slow).unwrap().rung, 2);
    s.deadline_s = None;
    assert_eq!(s.capability(&slow).unwrap().rung, 0);
}

#[test]
fn stage1_of_identical_models_is_that_model_and_one_cluster_has_no_stage2() {
    let mut s = server("fedtsa", "");
    let fleet: Vec<ClientInfo> = (0..4).map(|i| device(i, u64::MAX)).collect();
    s.observe(&fleet);
    assert_eq!(s.clusters().len(), 1);
    let before = s.clusters()[0].params.clone();
    let plan = s.plan(&ctx(), &fleet).unwrap();
    let replies: Vec<Reply> = plan
        .iter()
        .enumerate()
        .map(|(i, a)| reply(run(a), before.clone(), 10 + i as u64))
        .collect();
    let data = client_data(images::bands(50, 1));
    let mut sctx = ServerCtx::new(Some(&data), false);
    s.aggregate(&ctx(), &replies, &mut sctx).unwrap();
    assert_eq!(s.clusters()[0].params, before);
    assert_eq!(sctx.flops(), 0.0, "one cluster: no stage 2");
    assert!(!s.round_metrics().contains_key("stage2_loss"));
}

#[test]
fn kl_toward_a_models_own_outputs_is_zero_and_moves_nothing() {
    let s = server("fedtsa", "");
    let rung = &s.ladder()[1];
    let data = client_data(images::bands(40, 2));
    let z = logits(
        &rung.spec,
        &View::full(),
        &rung.init,
        &data.train,
        &data.mean,
        &data.std,
    )
    .unwrap();
    let objective = TargetKl {
        probs: softmax_rows(&z, 10, 3.0),
        classes: 10,
        t: 3.0,
    };
    let recipe = Recipe::sgd(0.5, 10);
    let out = TrainJob::new(
        &rung.spec,
        &View::full(),
        &rung.init,
        &data,
        &recipe,
        &objective,
    )
    .train()
    .unwrap();
    assert!(out.mean_loss.abs() < 1e-5, "loss {}", out.mean_loss);
    for (a, b) in out.params.iter().zip(rung.init.iter()) {
        let moved = a
            .data
            .iter()
            .zip(b.data.iter())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(moved < 1e-5, "`{}` moved by {moved}", a.name);
    }
}

#[test]
fn mutual_learning_brings_the_cluster_models_together_and_reports_its_flops() {
    let mut s = server(
        "fedtsa",
        "server_samples = 200\nrefresh = 100\nserver_lr = 0.5",
    );
    let fleet = three_tier_fleet(&s);
    s.observe(&fleet);
    let data = client_data(images::bands(300, 3));
    let before = disagreement(&s, &data, 0, 2);
    let mut sctx = ServerCtx::new(Some(&data), false);
    // No replies this round: stage 1 keeps every model, stage 2 still runs.
    s.aggregate(&ctx(), &[], &mut sctx).unwrap();
    let after = disagreement(&s, &data, 0, 2);
    assert!(after < 0.5 * before, "disagreement {before} -> {after}");
    assert!(s.round_metrics().contains_key("stage2_loss"));
    // Server FLOPs: per chunk of 100, a forward of every model for the targets, then a
    // training pass of every model over the chunk.
    let forward = over_clusters(&s, |r| r.forward_flops);
    let train = over_clusters(&s, |r| r.train_flops);
    let expected = 200.0 * (forward + train);
    assert!(
        (sctx.flops() - expected).abs() <= 1e-9 * expected,
        "{} vs {expected}",
        sctx.flops()
    );
}

#[test]
fn stage1_only_and_smallest_leave_the_server_data_alone() {
    for (name, clusters) in [("fedtsa-stage1", 3), ("fedavg-smallest", 1)] {
        let mut s = server(name, "");
        let fleet = three_tier_fleet(&s);
        s.observe(&fleet);
        assert_eq!(s.clusters().len(), clusters, "{name}");
        let data = client_data(images::bands(50, 4));
        let mut sctx = ServerCtx::new(Some(&data), false);
        s.aggregate(&ctx(), &[], &mut sctx).unwrap();
        assert_eq!(sctx.flops(), 0.0, "{name}");
    }
    // FedAvg-smallest gives every device the narrowest model the weakest can train.
    let mut s = server("fedavg-smallest", "");
    let fleet = three_tier_fleet(&s);
    s.observe(&fleet);
    let narrow = s.ladder()[2].spec.clone();
    for a in s.plan(&ctx(), &fleet).unwrap() {
        assert_eq!(run(&a).model, narrow);
    }
    assert_eq!(s.eval_models()[0].label, "smallest");
    assert_eq!(s.eval_models()[0].devices, Some(30));
}

#[test]
fn feddf_distils_every_cluster_toward_the_round_ensemble() {
    let mut s = server("feddf", "server_samples = 100\nrefresh = 100");
    let fleet = three_tier_fleet(&s);
    s.observe(&fleet);
    let replies = replies_moved_by(&s, &fleet, |_| 0.0);
    let data = client_data(images::bands(100, 5));
    let mut sctx = ServerCtx::new(Some(&data), false);
    s.aggregate(&ctx(), &replies, &mut sctx).unwrap();
    // Teachers: the 30 client models' forwards; students: the 3 cluster models' training.
    let forward: f64 = fleet
        .iter()
        .map(|c| s.ladder()[s.clusters()[s.cluster_of(c.id).unwrap()].rung].forward_flops)
        .sum();
    let train = over_clusters(&s, |r| r.train_flops);
    let expected = 100.0 * (forward + train);
    assert!((sctx.flops() - expected).abs() <= 1e-9 * expected);
}

#[test]
fn a_reply_at_another_width_is_refused() {
    let mut s = server("fedtsa", "");
    let fleet = three_tier_fleet(&s);
    s.observe(&fleet);
    let plan = s.plan(&ctx(), &fleet).unwrap();
    let weak = run(&plan[0]);
    let wide = reply(weak, s.ladder()[0].init.clone(), 10);
    let why = s.check_reply(weak, &wide).unwrap_err();
    assert!(why.contains("cluster's model"), "{why}");
    assert!(
        s.check_reply(weak, &reply(weak, weak.params.clone(), 10))
            .is_ok()
    );
}

#[test]
fn a_checkpoint_restores_every_cluster_model_before_or_after_the_fleet_is_seen() {
    let mut s = server("fedtsa-stage1", "");
    let fleet = three_tier_fleet(&s);
    s.observe(&fleet);
    // Move every model away from its initial weights.
    let replies = replies_moved_by(&s, &fleet, |_| 0.25);
    s.aggregate(&ctx(), &replies, &mut ServerCtx::default())
        .unwrap();
    let state = s.snapshot();
    let models =
        |s: &FedTsa| -> Vec<ParamSet> { s.clusters().iter().map(|c| c.params.clone()).collect() };
    for restore_first in [true, false] {
        let mut t = server("fedtsa-stage1", "");
        if restore_first {
            t.restore(state.clone()).unwrap();
            t.observe(&fleet);
        } else {
            t.observe(&fleet);
            t.restore(state.clone()).unwrap();
        }
        assert_eq!(models(&t), models(&s), "restore first: {restore_first}");
    }
    // A checkpoint whose width the config no longer lists is refused with the reason.
    let mut narrow_only = server("fedtsa-stage1", "widths = [1.0]");
    let err = narrow_only.restore(state).unwrap_err().to_string();
    assert!(err.contains("no longer lists"), "{err}");
}

#[test]
fn bad_options_are_refused_with_the_key() {
    let exp = config("fedtsa", "widths = [1.0, 1.5]");
    let err = FedTsa::from_config(&exp, exp.model_spec())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("method.widths"), "{err}");
    let exp = config("fedtsa", "temperature = 0");
    let err = FedTsa::from_config(&exp, exp.model_spec())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("method.temperature"), "{err}");
    let exp = config("fedtsa", "stage = 2");
    assert!(FedTsa::from_config(&exp, exp.model_spec()).is_err());
    let text = toml("fedtsa", "");
    let start = text.find("[server_data]").unwrap();
    let end = text.find("[method]").unwrap();
    let exp = Experiment::from_toml(&(text[..start].to_string() + &text[end..])).unwrap();
    let err = FedTsa::from_config(&exp, exp.model_spec())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("[server_data]"), "{err}");
}

#[test]
fn heterofl_averages_each_value_over_the_widths_that_hold_it() {
    let mut s = server("heterofl", "");
    let fleet = three_tier_fleet(&s);
    s.observe(&fleet);
    let global = s.global.clone().unwrap();
    // Every device of tier k sends back its slice plus k + 1.
    let replies = replies_moved_by(&s, &fleet, |c| (c.id / 10 + 1) as f32);
    s.aggregate(&ctx(), &replies, &mut ServerCtx::default())
        .unwrap();
    let after = s.global.clone().unwrap();
    // A tensor the narrow model holds only part of.
    let narrow = &s.ladder()[2].init;
    let t = narrow
        .iter()
        .find(|t| t.shape != global.get(&t.name).unwrap().shape)
        .unwrap();
    let (g, a) = (global.get(&t.name).unwrap(), after.get(&t.name).unwrap());
    // Its first value is in every slice: the mean shift (1 + 2 + 3) / 3; its last value only
    // in the widest model's: shift 3.
    assert!((a.data[0] - (g.data[0] + 2.0)).abs() < 1e-5);
    let last = g.data.len() - 1;
    assert!((a.data[last] - (g.data[last] + 3.0)).abs() < 1e-5);
    // Each cluster's model is its slice of the new global model.
    for c in s.clusters() {
        let slice = aggregate::leading_slice(&after, &s.ladder()[c.rung].init).unwrap();
        assert_eq!(c.params, slice);
    }
    // The checkpoint brings the global model back.
    let mut t = server("heterofl", "");
    t.restore(s.snapshot()).unwrap();
    t.observe(&fleet);
    assert_eq!(t.global, s.global);
    assert_eq!(t.clusters()[0].params, s.clusters()[0].params);
}

#[test]
fn fedrolex_windows_roll_one_unit_per_round_and_write_back_where_they_were_taken() {
    let mut s = server("fedrolex", "");
    let fleet = three_tier_fleet(&s);
    s.observe(&fleet);
    let global = s.global.clone().unwrap();
    let weak = &fleet[..1];
    let task = |s: &FedTsa, round: u64| {
        let ctx = PhaseCtx {
            round,
            phase: 0,
            seed: 0,
        };
        run(&s.plan(&ctx, weak).unwrap()[0]).clone()
    };
    let (r1, r2) = (task(&s, 1), task(&s, 2));
    // The narrowest model's first layer: 512 of the 2,048 units, starting at unit `round`.
    let (w1, w2) = (
        r1.params.get("layers.0.weight").unwrap(),
        r2.params.get("layers.0.weight").unwrap(),
    );
    let g = global.get("layers.0.weight").unwrap();
    assert_eq!(w1.shape, vec![512, 784]);
    assert_eq!(
        &w1.data[..784],
        &g.data[784..2 * 784],
        "round 1 starts at unit 1"
    );
    assert_eq!(
        &w2.data[..784],
        &g.data[2 * 784..3 * 784],
        "round 2 starts at unit 2"
    );
    assert_eq!(
        &w1.data[784..2 * 784],
        &w2.data[..784],
        "the window moved by one unit"
    );
    // Its second layer: rows from its own window (units 1..), columns from the first layer's
    // (units 1..): element (0, 0) is the global's (1, 1), element (0, 1) its (1, 2).
    let (h1, gh) = (
        r1.params.get("layers.1.weight").unwrap(),
        global.get("layers.1.weight").unwrap(),
    );
    assert_eq!(h1.shape, vec![256, 512]);
    assert_eq!(h1.data[0], gh.data[2048 + 1]);
    assert_eq!(h1.data[1], gh.data[2048 + 2]);

    // A round in which the weak device returns its window plus 1: exactly those values move.
    let mut p = r1.params.clone();
    for t in p.iter_mut() {
        t.data.iter_mut().for_each(|v| *v += 1.0);
    }
    s.aggregate(&ctx(), &[reply(&r1, p, 10)], &mut ServerCtx::default())
        .unwrap();
    let after = s.global.clone().unwrap();
    let (a, g) = (
        after.get("layers.0.weight").unwrap(),
        global.get("layers.0.weight").unwrap(),
    );
    for unit in [0usize, 1, 512, 513] {
        let moved = a.data[unit * 784] - g.data[unit * 784];
        let inside = (1..=512).contains(&unit);
        assert_eq!(moved, if inside { 1.0 } else { 0.0 }, "unit {unit}");
    }
    // The weak cluster is evaluated with the window its devices get next (round 2's).
    assert_eq!(s.clusters()[0].params, task(&s, 2).params);
    // The classifier's classes are never rolled.
    let out = s.ladder()[2]
        .init
        .get("layers.2.weight")
        .unwrap()
        .shape
        .clone();
    assert_eq!(out[0], 10);
}

#[test]
fn fedrolex_needs_a_cnn_or_an_mlp() {
    let text = toml("fedrolex", "").replace(
        "arch = \"mlp\"\nhidden = [2048, 1024]",
        "arch = \"resnet\"\nblocks_per_stage = 1",
    );
    let exp = Experiment::from_toml(&text).unwrap();
    let err = FedTsa::from_config(&exp, exp.model_spec())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("cnn") && err.contains("heterofl"), "{err}");
}
