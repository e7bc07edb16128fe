//! A client given several threads trains each step as one micro-batch per thread; the result
//! must be the one-thread result, up to the order of float sums.

use flotilla_core::ParamSet;
use flotilla_data::Dataset;
use flotilla_engine::local::{
    DistillOn, Objective, OptimizerKind, Recipe, TrainMasks, TrainOutcome, train_with,
};
use flotilla_engine::method::ClientData;
use flotilla_models::{Architecture, ModelSpec, Net, View};

fn synthetic(n: usize, seed: u64) -> Dataset {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 56) as u8
    };
    let images = (0..n * 784).map(|_| next()).collect();
    let labels = (0..n).map(|i| (i % 10) as u8).collect();
    Dataset {
        images,
        labels,
        shape: [1, 28, 28],
        num_classes: 10,
    }
}

fn run(
    threads: usize,
    spec: &ModelSpec,
    params: &ParamSet,
    data: &ClientData,
    recipe: &Recipe,
    objective: &Objective,
) -> TrainOutcome {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool")
        .install(|| {
            train_with(
                spec,
                &View::full(),
                params,
                data,
                recipe,
                3,
                &TrainMasks::new(),
                objective,
            )
        })
        .expect("training")
}

fn assert_close(what: &str, a: &ParamSet, b: &ParamSet) {
    let scale = b
        .iter()
        .flat_map(|t| t.data.iter())
        .fold(1f32, |m, v| m.max(v.abs()));
    let diff = a.max_abs_diff(b).expect("same layout");
    assert!(diff <= 1e-4 * scale, "{what}: max difference {diff}");
}

/// CNN, MLP and a GroupNorm ResNet under plain cross-entropy and FlexTrain's sampled-depth
/// objective; 2 and 3 threads (batches of 16 split 6/6/4, and a last batch of 10 that splits
/// 5/5: no micro-batch under four samples),
/// SGD with momentum and weight decay, and Adam.
#[test]
fn micro_batches_match_one_thread() {
    let resnet = ModelSpec {
        arch: Architecture::Resnet {
            blocks_per_stage: 1,
        },
        input: [1, 28, 28],
        classes: 10,
        width: 0.25,
        ranks: Default::default(),
    };
    let data = ClientData {
        train: synthetic(42, 1),
        holdout: synthetic(0, 2),
        mean: vec![0.5],
        std: vec![0.25],
    };
    let sgd = Recipe {
        epochs: 1,
        batch_size: 16,
        optimizer: OptimizerKind::Sgd,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-3,
        prox_mu: 0.0,
    };
    let adam = Recipe {
        optimizer: OptimizerKind::Adam,
        lr: 1e-3,
        ..sgd.clone()
    };
    let sampled = Objective::SampledDepth {
        pi: vec![0.0, 0.3, 0.3, 0.4],
        beta: 0.2,
        on: DistillOn::Softmax,
    };
    let cases = [
        (ModelSpec::fedavg_cnn(), &sgd, &Objective::CrossEntropy),
        (ModelSpec::mlp_2nn(), &adam, &Objective::CrossEntropy),
        (resnet.clone(), &sgd, &Objective::CrossEntropy),
        (resnet, &sgd, &sampled),
    ];
    for (spec, recipe, objective) in cases {
        let params = Net::init_params(&spec, 4).expect("params");
        let one = run(1, &spec, &params, &data, recipe, objective);
        assert!(
            one.params.max_abs_diff(&params).expect("layout") > 1e-3,
            "training moved nothing"
        );
        for threads in [2, 3] {
            let many = run(threads, &spec, &params, &data, recipe, objective);
            let what = format!(
                "{:?} {:?} on {threads} threads",
                spec.arch, recipe.optimizer
            );
            assert_close(&what, &many.params, &one.params);
            assert!(
                (many.mean_loss - one.mean_loss).abs() <= 1e-5 * one.mean_loss.abs().max(1.0),
                "{what}: loss {} vs {}",
                many.mean_loss,
                one.mean_loss
            );
            assert_eq!(many.depth_steps, one.depth_steps, "{what}: depth draws");
            assert_eq!((many.steps, many.samples), (one.steps, one.samples));
        }
    }
}
