use super::*;
use flotilla_models::dense_export;

fn config(method: &str) -> Experiment {
    Experiment::from_toml(&format!(
        r#"
rounds = 1
[data]
dataset = "fashion-mnist"
num_clients = 2
partition = {{ kind = "iid" }}
[model]
arch = "mlp"
hidden = [40, 24]
[training]
epochs = 1
batch_size = 8
optimizer = "sgd"
lr = 0.1
[sampling]
clients_per_round = 2
[method]
{method}
"#
    ))
    .unwrap()
}

fn server(method: &str) -> FedLrt {
    let exp = config(method);
    FedLrt::from_config(&exp, exp.model_spec()).unwrap()
}

fn ctx(phase: u32) -> PhaseCtx {
    PhaseCtx {
        round: 1,
        phase,
        seed: 0,
    }
}

fn clients(n: u64) -> Vec<ClientInfo> {
    (0..n)
        .map(|id| ClientInfo {
            id,
            profile: flotilla_core::device::DeviceProfile::unlimited(),
            num_examples: 10,
        })
        .collect()
}

/// Deterministic pseudo-random values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn run(a: Assignment) -> Task {
    match a {
        Assignment::Run(t) => *t,
        Assignment::Skip(r) => panic!("skipped: {r}"),
    }
}

/// A reply to `task` with noise of the expected shapes.
fn noisy_reply(task: &Task, seed: u64) -> Reply {
    let tensors = expected_reply(task)
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n = shape.iter().product();
            Tensor {
                name,
                shape,
                data: noise(n, seed * 100 + i as u64),
            }
        })
        .collect();
    Reply {
        round: task.round,
        phase: task.phase,
        client: task.client,
        num_examples: 10,
        params: ParamSet::from_tensors(tensors).unwrap(),
        metrics: Default::default(),
        resources: Default::default(),
    }
}

fn max_abs(a: &ParamSet, b: &ParamSet) -> f32 {
    a.max_abs_diff(b).unwrap()
}

/// Phase 0 with random gradients from `n` clients; returns the server and the phase-1 task
/// of client 0.
fn augmented(method: &str, n: u64) -> (FedLrt, Task) {
    let mut s = server(method);
    let tasks: Vec<Task> = s
        .plan(&ctx(0), &clients(n))
        .unwrap()
        .into_iter()
        .map(run)
        .collect();
    let replies: Vec<Reply> = tasks.iter().map(|t| noisy_reply(t, t.client + 1)).collect();
    for (t, r) in tasks.iter().zip(&replies) {
        s.check_reply(t, r).unwrap();
    }
    let end = s
        .aggregate(&ctx(0), &replies, &mut ServerCtx::default())
        .unwrap();
    assert_eq!(end, PhaseEnd::NextPhase);
    let task = run(s.plan(&ctx(1), &clients(n)).unwrap().remove(0));
    (s, task)
}

#[test]
fn augmentation_keeps_the_model_and_the_bases_orthonormal() {
    let (s, task) = augmented("name = \"fedlrt\"\nr0 = 4", 2);
    let (spec, params, _) = assemble(&task).unwrap();
    assert_eq!(spec.ranks["layers.0"], 8, "k = r new directions");
    assert_eq!(spec.ranks["layers.1"], 8);
    // Ũ S̃⁰ Ṽᵀ = U S Vᵀ: both multiplied out to the dense model.
    let before = dense_export(s.spec(), s.params()).unwrap();
    let after = dense_export(&spec, &params).unwrap();
    assert!(
        max_abs(&before, &after) < 1e-5,
        "{}",
        max_abs(&before, &after)
    );
    for name in ["layers.0.U", "layers.0.V", "layers.1.U", "layers.1.V"] {
        let m = matrix(params.require(name).unwrap());
        let err = (m.transpose() * &m - DMatrix::identity(m.ncols(), m.ncols())).amax();
        assert!(err < 1e-5, "{name}: ‖ŨᵀŨ − I‖ = {err}");
        // U is kept verbatim as the first block.
        let old = s.params().require(name).unwrap();
        let r = old.shape[1];
        let t = params.require(name).unwrap();
        for row in 0..old.shape[0] {
            assert_eq!(
                &t.data[row * t.shape[1]..row * t.shape[1] + r],
                &old.data[row * r..(row + 1) * r]
            );
        }
    }
}

#[test]
fn tau_zero_keeps_the_augmented_rank_and_the_averaged_core() {
    let (mut s, task) = augmented("name = \"fedlrt\"\nr0 = 4\ntau = 0.0", 1);
    let reply = noisy_reply(&task, 9);
    s.check_reply(&task, &reply).unwrap();
    let (spec, mut params, _) = assemble(&task).unwrap();
    params.overwrite_with(&reply.params).unwrap();
    let expected = dense_export(&spec, &params).unwrap();
    let end = s
        .aggregate(&ctx(1), &[reply], &mut ServerCtx::default())
        .unwrap();
    assert_eq!(end, PhaseEnd::RoundComplete);
    assert_eq!(s.spec().ranks, spec.ranks, "τ = 0 truncates nothing");
    let got = dense_export(s.spec(), s.params()).unwrap();
    assert!(
        max_abs(&expected, &got) < 1e-5,
        "{}",
        max_abs(&expected, &got)
    );
    let m = s.round_metrics();
    assert_eq!(m["rank/layers.0"], 8);
    assert_eq!(m["rank_mean"], 8.0);
}

#[test]
fn truncation_keeps_the_smallest_rank_within_tolerance_and_bounds() {
    let u = DMatrix::<f64>::identity(10, 4);
    let v = DMatrix::<f64>::identity(8, 4);
    let s = DMatrix::from_diagonal(&nalgebra::DVector::from_vec(vec![10.0, 1.0, 0.1, 0.01]));
    // ‖(0.1, 0.01)‖ ≈ 0.1005 < 0.02·‖σ‖ ≈ 0.201; ‖(1, 0.1, 0.01)‖ > 0.201.
    let (nu, ns, nv) = truncate(&u, &s, &v, 0.02, 1, 4);
    assert_eq!((nu.ncols(), ns.nrows(), nv.ncols()), (2, 2, 2));
    assert!((ns[(0, 0)].abs() - 10.0).abs() < 1e-12 && (ns[(1, 1)].abs() - 1.0).abs() < 1e-12);
    assert_eq!(truncate(&u, &s, &v, 0.02, 3, 4).1.nrows(), 3, "r_min");
    assert_eq!(truncate(&u, &s, &v, 0.0, 1, 3).1.nrows(), 3, "r_max");
    assert_eq!(truncate(&u, &s, &v, 0.5, 1, 4).1.nrows(), 1);
}

#[test]
fn gradients_inside_the_basis_add_no_direction() {
    let u = DMatrix::<f64>::identity(6, 2);
    let mut g = DMatrix::<f64>::zeros(6, 2);
    g[(0, 0)] = 3.0;
    g[(1, 1)] = -2.0;
    assert_eq!(new_directions(&u, &g).ncols(), 0);
    g[(4, 0)] = 1.0;
    let d = new_directions(&u, &g);
    assert_eq!(d.ncols(), 1, "one direction outside span(U)");
    assert!((d[(4, 0)].abs() - 1.0).abs() < 1e-12);
    assert_eq!(new_directions(&u, &DMatrix::zeros(6, 2)).ncols(), 0);
}

#[test]
fn with_one_client_the_full_correction_is_exactly_zero() {
    let (mut s, task) = augmented("name = \"fedlrt\"\nr0 = 4\nvc = \"full\"", 1);
    assert_eq!(task.kind, CORE_GRADIENTS);
    let reply = noisy_reply(&task, 5);
    s.aggregate(&ctx(1), &[reply], &mut ServerCtx::default())
        .unwrap();
    let train = run(s.plan(&ctx(2), &clients(1)).unwrap().remove(0));
    assert_eq!(train.kind, TRAIN_CORE);
    let (_, _, correction) = assemble(&train).unwrap();
    // S̃ of both layers and every dense tensor.
    assert_eq!(correction.len(), 2 + 4);
    assert!(correction.iter().all(|t| t.data.iter().all(|v| *v == 0.0)));
}

#[test]
fn corrections_sum_to_zero_over_clients() {
    let (s, _) = augmented("name = \"fedlrt\"\nr0 = 4", 3);
    let p = s.pending.as_ref().unwrap();
    assert_eq!(p.corrections.len(), 3);
    for t in p.corrections[&0].iter() {
        assert!(t.name.starts_with(CORRECTION_PREFIX));
        let sum: Vec<f32> = (0..t.numel())
            .map(|i| {
                p.corrections
                    .values()
                    .map(|c| c.get(&t.name).unwrap().data[i])
                    .sum()
            })
            .collect();
        assert!(sum.iter().all(|v| v.abs() < 1e-5), "{}: {sum:?}", t.name);
    }
    // simplified: the old-basis block only (r × r), embedded by the client.
    assert_eq!(
        p.corrections[&0].get("vc.layers.0.S").unwrap().shape,
        [4, 4]
    );
}

#[test]
fn replies_must_hold_exactly_what_the_task_asks() {
    let (s, task) = augmented("name = \"fedlrt\"\nr0 = 4", 1);
    let good = noisy_reply(&task, 1);
    s.check_reply(&task, &good).unwrap();
    let mut short = good.clone();
    short.params = good.params.filter(|n| n != "layers.0.S");
    assert!(
        s.check_reply(&task, &short)
            .unwrap_err()
            .contains("exactly")
    );
    let mut big = good.clone();
    big.params.get_mut("layers.0.S").unwrap().shape = vec![4, 16];
    assert!(s.check_reply(&task, &big).is_err());
}

#[test]
fn the_layout_matches_the_models_export() {
    let mut s = server("name = \"fedlrt\"\nr0 = 4");
    for ranks in [[4, 4], [7, 2], [20, 12]] {
        s.spec.ranks = BTreeMap::from([
            ("layers.0".to_string(), ranks[0]),
            ("layers.1".to_string(), ranks[1]),
        ]);
        let model = Net::init_params(&s.spec, 1).unwrap();
        model
            .check_same_layout(&s.layout(&s.spec.ranks).unwrap())
            .unwrap();
    }
}

#[test]
fn config_errors_name_the_key() {
    let exp = |m: &str| config(m);
    let err = |m: &str| {
        let e = exp(m);
        FedLrt::from_config(&e, e.model_spec())
            .err()
            .unwrap()
            .to_string()
    };
    assert!(err("name = \"fedlrt\"\nlayers = [\"conv9\"]").contains("method.layers"));
    assert!(err("name = \"fedlrt\"\nlayers = []").contains("fedlin"));
    assert!(err("name = \"fedlrt\"\nr_min = 5\nr_max = 4").contains("method.r_max"));
    assert!(err("name = \"fedlrt\"\ntau = 1.5").contains("method.tau"));
    assert!(err("name = \"fedlrt\"\ns_star = 0").contains("method.s_star"));
    assert!(err("name = \"fedlrt\"\nrank = 3").contains("rank"));
    assert!(err("name = \"fedlin\"\ntau = 0.1").contains("method.tau"));
    // r0 is clamped to each layer's bound min(in, out)/2: 20 and 12 here.
    let s = server("name = \"fedlrt\"\nr0 = 100");
    assert_eq!(s.spec().ranks["layers.0"], 20);
    assert_eq!(s.spec().ranks["layers.1"], 12);
}
