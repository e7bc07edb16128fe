//! The analytic memory estimate against the heap high-water mark measured by the counting
//! allocator during real local training.

use flotilla_core::ParamSet;
use flotilla_engine::alloc::{self, CountingAlloc, ThreadPeak};
use flotilla_engine::local::{CrossEntropy, OptimizerKind, Recipe, TrainJob, estimate_memory};
use flotilla_engine::method::ClientData;
use flotilla_models::{Architecture, ModelSpec, Net, View};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn data(n: usize) -> ClientData {
    flotilla_testkit::client_data(flotilla_testkit::images::pattern(n))
}

fn measure(spec: &ModelSpec, view: &View, recipe: &Recipe) -> (u64, u64) {
    measure_on(1, spec, view, recipe)
}

fn measure_on(threads: usize, spec: &ModelSpec, view: &View, recipe: &Recipe) -> (u64, u64) {
    let params: ParamSet = Net::init_params(spec, 0).unwrap();
    let d = data(4 * recipe.batch_size);
    // One warm-up run so that lazily allocated, process-wide buffers do not count.
    let ce = CrossEntropy::under(view);
    let job = TrainJob::new(spec, view, &params, &d, recipe, &ce);
    job.train().unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let measured = pool.install(|| {
        let peak = ThreadPeak::start();
        job.train().unwrap();
        peak.peak_above_start()
    });
    (
        measured,
        estimate_memory(spec, view, &params, recipe).total(),
    )
}

fn recipe(batch: usize, optimizer: OptimizerKind, momentum: f64) -> Recipe {
    Recipe {
        epochs: 1,
        batch_size: batch,
        optimizer,
        lr: 0.01,
        momentum,
        weight_decay: 0.0,
    }
}

#[test]
fn estimate_tracks_measurement() {
    assert!(alloc::is_installed());
    let resnet = ModelSpec {
        arch: Architecture::Resnet {
            blocks_per_stage: 1,
        },
        input: [1, 28, 28],
        classes: 10,
        width: 1.0,
        ranks: Default::default(),
    };
    let vit = ModelSpec {
        arch: Architecture::Vit {
            patch: 7,
            dim: 64,
            depth: 2,
            heads: 4,
            mlp_ratio: 2,
        },
        input: [1, 28, 28],
        classes: 10,
        width: 1.0,
        ranks: Default::default(),
    };
    let cases = [
        (
            "W1 cnn b32 sgd+m",
            ModelSpec::fedavg_cnn(),
            View::full(),
            recipe(32, OptimizerKind::Sgd, 0.9),
        ),
        (
            "W1 cnn b128 sgd+m",
            ModelSpec::fedavg_cnn(),
            View::full(),
            recipe(128, OptimizerKind::Sgd, 0.9),
        ),
        (
            "cnn w0.125 b32 sgd+m",
            ModelSpec {
                width: 0.125,
                ..ModelSpec::fedavg_cnn()
            },
            View::full(),
            recipe(32, OptimizerKind::Sgd, 0.9),
        ),
        (
            "cnn w0.5 b32 sgd+m",
            ModelSpec {
                width: 0.5,
                ..ModelSpec::fedavg_cnn()
            },
            View::full(),
            recipe(32, OptimizerKind::Sgd, 0.9),
        ),
        (
            "cnn b32 adam",
            ModelSpec::fedavg_cnn(),
            View::full(),
            recipe(32, OptimizerKind::Adam, 0.0),
        ),
        (
            "W2 mlp b10 sgd",
            ModelSpec::mlp_2nn(),
            View::full(),
            recipe(10, OptimizerKind::Sgd, 0.0),
        ),
        (
            "mlp b256 sgd+m",
            ModelSpec::mlp_2nn(),
            View::full(),
            recipe(256, OptimizerKind::Sgd, 0.9),
        ),
        (
            "resnet8 b32",
            resnet.clone(),
            View::full(),
            recipe(32, OptimizerKind::Sgd, 0.9),
        ),
        (
            "resnet8 prefix 1 b32",
            resnet.clone(),
            View::depth_prefix(1, 3),
            recipe(32, OptimizerKind::Sgd, 0.9),
        ),
        (
            "vit b32",
            vit,
            View::full(),
            recipe(32, OptimizerKind::Sgd, 0.9),
        ),
    ];
    let mut worst: f64 = 1.0;
    for (name, spec, view, r) in cases {
        let (measured, estimated) = measure(&spec, &view, &r);
        let mut ratio = measured as f64 / estimated as f64;
        // The fixed term covers the packing buffers (one L2-sized per training thread) that
        // the AVX2 kernels allocate; the AVX-512 kernels skip packing for the small products
        // of the MLPs, so a model whose whole footprint is a few MiB may measure up to 3 MiB
        // below its estimate there (W2's MLP 1.96 MiB against 3.86 estimated, 3.96 measured
        // with AVX2; the b256 MLP 4.28 against 6.86, 6.03 with AVX2). Only such an
        // over-estimate of a small model, never an under-estimate, is let through.
        let slack = estimated.saturating_sub(measured) <= 3 << 20 && ratio < 0.7;
        eprintln!(
            "{name:24} measured {:8.2} MiB  estimated {:8.2} MiB  ratio {ratio:.2}{}",
            measured as f64 / 1048576.0,
            estimated as f64 / 1048576.0,
            if slack {
                " (within the fixed term)"
            } else {
                ""
            }
        );
        if slack {
            ratio = 1.0;
        }
        worst = if (ratio - 1.0).abs() > (worst - 1.0).abs() {
            ratio
        } else {
            worst
        };
    }
    assert!(
        (0.7..=1.3).contains(&worst),
        "estimate off by a factor of {worst}"
    );
}

/// A client on two threads trains one micro-batch per thread; the measurement counts what both
/// threads allocate: above the one-thread peak by a good part of the second micro-batch's
/// gradient buffer (the threads' peaks do not coincide exactly: measured 0.57 of it on the
/// few-row linear kernels, 0.89 on the GEMM), at most by that buffer. Uncounted, the second
/// thread would leave the measurement at or below the one-thread peak (the halved batch's
/// activations are not part of it).
#[test]
fn measurement_counts_every_micro_batch_thread() {
    let spec = ModelSpec::fedavg_cnn();
    let r = recipe(32, OptimizerKind::Sgd, 0.9);
    let (one, _) = measure_on(1, &spec, &View::full(), &r);
    let (two, _) = measure_on(2, &spec, &View::full(), &r);
    let gradients = 4 * Net::init_params(&spec, 0).unwrap().numel() as u64;
    eprintln!(
        "one thread {:.2} MiB, two threads {:.2} MiB, one gradient {:.2} MiB",
        one as f64 / 1048576.0,
        two as f64 / 1048576.0,
        gradients as f64 / 1048576.0
    );
    assert!(
        two as f64 >= one as f64 + 0.4 * gradients as f64,
        "two threads measured {two} bytes, one thread {one}: a thread went uncounted"
    );
    assert!(
        (two as f64) <= one as f64 + 1.3 * gradients as f64,
        "two threads measured {two} bytes, one thread {one}"
    );
}

fn frozen(names: Vec<String>, active: Option<Vec<bool>>) -> View {
    View {
        active_blocks: active,
        frozen: names,
    }
}

fn report(name: &str, measured: u64, estimated: u64) -> f64 {
    let ratio = measured as f64 / estimated as f64;
    eprintln!(
        "{name:24} measured {:8.2} MiB  estimated {:8.2} MiB  ratio {ratio:.2}",
        measured as f64 / 1048576.0,
        estimated as f64 / 1048576.0
    );
    ratio
}

/// Frozen layers before the first trainable tensor run without an autodiff graph: their
/// outputs are computed from tensors that need no gradient, so burn tracks nothing and keeps
/// nothing for them (FLL's frozen encoder prefix). The estimate leaves them out, and the
/// measured peak falls well below training the same layers.
#[test]
fn frozen_prefix_keeps_no_activations() {
    // FLL on a ViT: depth 8, stage s trains block s and the head; blocks 0..s and the
    // embedding are frozen, deeper blocks are not run yet.
    let (depth, s) = (8, 6);
    let vit = ModelSpec {
        arch: Architecture::Vit {
            patch: 7,
            dim: 96,
            depth,
            heads: 4,
            mlp_ratio: 2,
        },
        input: [1, 28, 28],
        classes: 10,
        width: 1.0,
        ranks: Default::default(),
    };
    let names: Vec<String> = Net::init_params(&vit, 0)
        .unwrap()
        .names()
        .map(String::from)
        .collect();
    for n in [
        "patch_embed.weight",
        "cls_token",
        "pos_embed",
        "blocks.0.attn.q.weight",
        "norm.weight",
        "head.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} not in {names:?}");
    }
    let mut stem: Vec<String> = ["patch_embed", "cls_token", "pos_embed"]
        .map(String::from)
        .to_vec();
    stem.extend((0..s).map(|k| format!("blocks.{k}")));
    stem.extend((s + 1..depth).map(|k| format!("blocks.{k}")));
    let active = Some((0..depth).map(|k| k <= s).collect());
    let vit_stage = frozen(stem, active);
    let vit_all = View::trainable_prefix(s + 1, depth);

    // A ResNet-14 training its last stage only.
    let resnet = ModelSpec {
        arch: Architecture::Resnet {
            blocks_per_stage: 2,
        },
        input: [1, 28, 28],
        classes: 10,
        width: 1.0,
        ranks: Default::default(),
    };
    let mut prefix: Vec<String> = ["conv1", "norm1"].map(String::from).to_vec();
    prefix.extend((0..4).map(|k| format!("blocks.{k}")));
    let resnet_stage = frozen(prefix, None);

    let mut ratios = Vec::new();
    let mut pairs = Vec::new();
    for (name, spec, view, full, r) in [
        (
            "vit8 stage 6 b64",
            &vit,
            &vit_stage,
            &vit_all,
            recipe(64, OptimizerKind::Sgd, 0.9),
        ),
        (
            "vit8 stage 6 b32 adam",
            &vit,
            &vit_stage,
            &vit_all,
            recipe(32, OptimizerKind::Adam, 0.0),
        ),
        (
            "resnet14 last stage b32",
            &resnet,
            &resnet_stage,
            &View::full(),
            recipe(32, OptimizerKind::Sgd, 0.9),
        ),
    ] {
        let (m, e) = measure(spec, view, &r);
        ratios.push(report(name, m, e));
        let (mf, ef) = measure(spec, full, &r);
        ratios.push(report("  same, all trained", mf, ef));
        pairs.push((name, m, mf));
    }
    for ratio in ratios {
        assert!(
            (0.7..=1.3).contains(&ratio),
            "estimate off by a factor of {ratio}"
        );
    }
    for (name, prefix, full) in pairs {
        assert!(
            (prefix as f64) < 0.6 * full as f64,
            "{name}: the frozen prefix measured {prefix} bytes, training everything {full}"
        );
    }
}

/// FeDLRT's coefficient step trains S (and the biases) with the bases U and V frozen: U and V
/// get no gradient and no optimizer state. A factored 784-512-512-10 MLP (both hidden layers
/// rank 32) against the dense one, and against the same factored model with U and V trained.
#[test]
fn frozen_bases_hold_no_gradient_or_optimizer_state() {
    let dense = ModelSpec {
        arch: Architecture::Mlp {
            hidden: vec![512, 512],
        },
        input: [1, 28, 28],
        classes: 10,
        width: 1.0,
        ranks: Default::default(),
    };
    let factored = ModelSpec {
        ranks: [("layers.0".to_string(), 32), ("layers.1".to_string(), 32)].into(),
        ..dense.clone()
    };
    let bases: Vec<String> = ["layers.0.U", "layers.0.V", "layers.1.U", "layers.1.V"]
        .map(String::from)
        .to_vec();
    let p = Net::init_params(&factored, 0).unwrap();
    let basis_values: usize = bases.iter().map(|n| p.get(n).unwrap().numel()).sum();
    let coefficient_step = frozen(bases, None);
    for (name, r, state) in [
        ("sgd+m", recipe(32, OptimizerKind::Sgd, 0.9), 2),
        // Adam: gradient, two moments, and the new value beside the old one
        ("adam", recipe(32, OptimizerKind::Adam, 0.0), 4),
    ] {
        let (md, ed) = measure(&dense, &View::full(), &r);
        let (mf, ef) = measure(&factored, &coefficient_step, &r);
        let (ma, ea) = measure(&factored, &View::full(), &r);
        let ratios = [
            report(&format!("mlp 512x2 dense {name}"), md, ed),
            report(&format!("  rank 32, S only {name}"), mf, ef),
            report(&format!("  rank 32, all {name}"), ma, ea),
        ];
        for ratio in ratios {
            assert!(
                (0.7..=1.3).contains(&ratio),
                "estimate off by a factor of {ratio}"
            );
        }
        // (0.35: about 2.4 MiB of batch and runtime sit in both peaks, and the dense step's
        // linear layers allocate no packing buffer on the few-row kernels.)
        assert!(
            (mf as f64) < 0.35 * md as f64,
            "{name}: the factored coefficient step measured {mf} bytes, the dense model {md}"
        );
        // Training U and V as well adds their gradient and optimizer state; frozen, they had
        // none. (Peaks are not additive, so the difference falls somewhat short of it.)
        let expected = (4 * state * basis_values) as f64;
        let extra = ma as f64 - mf as f64;
        eprintln!(
            "  U and V trained add {:.3} MiB; their gradient and state are {:.3} MiB",
            extra / 1048576.0,
            expected / 1048576.0
        );
        assert!(
            (0.5..=1.3).contains(&(extra / expected)),
            "{name}: training U and V added {extra} bytes, their gradient and state are {expected}"
        );
    }
}
