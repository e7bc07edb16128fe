//! A client given several threads trains each step as one micro-batch per thread; the result
//! must be the one-thread result, up to the order of float sums.

use burn::tensor::Tensor;
use flotilla_core::ParamSet;
use flotilla_engine::EngineError;
use flotilla_engine::local::{
    Batch, CrossEntropy, Objective, OptimizerKind, Recipe, TrainJob, TrainOutcome, cross_entropy,
};
use flotilla_engine::method::ClientData;
use flotilla_models::{Architecture, ModelSpec, Net, View};

use flotilla_testkit::images::noise as synthetic;

fn run<O: Objective>(
    threads: usize,
    spec: &ModelSpec,
    params: &ParamSet,
    data: &ClientData,
    recipe: &Recipe,
    objective: &O,
) -> TrainOutcome {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool")
        .install(|| {
            TrainJob::new(spec, &View::full(), params, data, recipe, objective)
                .seed(3)
                .train()
        })
        .expect("training")
}

/// A loss that couples the samples of a batch: cross-entropy plus the variance over the batch
/// of the first logit, scaled by a factor drawn per step. Split into micro-batches, the
/// variance term would change.
struct BatchCoupled {
    declared: bool,
}

impl Objective for BatchCoupled {
    type Step = f32;

    fn mixes_samples(&self) -> bool {
        self.declared
    }

    fn begin_step(&self, rng: &mut rand_chacha::ChaCha8Rng) -> f32 {
        rand::Rng::random_range(rng, 0.5..1.5)
    }

    fn tally(&self, scale: &f32) -> Option<usize> {
        Some((*scale * 10.0) as usize)
    }

    fn loss(&self, model: &Net, batch: Batch<'_>, scale: &f32) -> Result<Tensor<1>, EngineError> {
        let logits = model.forward(batch.x, &View::full());
        let first = logits.clone().narrow(1, 0, 1);
        let centred = first.clone() - first.mean_dim(0);
        let var = centred.square().mean();
        Ok(cross_entropy(logits, batch.labels, batch.classes, batch.device) + var * *scale)
    }
}

fn assert_close(what: &str, a: &ParamSet, b: &ParamSet) {
    let scale = b
        .iter()
        .flat_map(|t| t.data.iter())
        .fold(1f32, |m, v| m.max(v.abs()));
    let diff = a.max_abs_diff(b).expect("same layout");
    assert!(diff <= 1e-4 * scale, "{what}: max difference {diff}");
}

/// CNN, MLP and a GroupNorm ResNet under plain cross-entropy; 2 and 3 threads (batches of 16 split 6/6/4, and a last batch of 10 that splits
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
    };
    let adam = Recipe {
        optimizer: OptimizerKind::Adam,
        lr: 1e-3,
        ..sgd.clone()
    };
    let ce = CrossEntropy::under(&View::full());
    let cases = [
        (ModelSpec::fedavg_cnn(), &sgd),
        (ModelSpec::mlp_2nn(), &adam),
        (resnet, &sgd),
    ];
    for (spec, recipe) in cases {
        let params = Net::init_params(&spec, 4).expect("params");
        let objective = &ce;
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
            assert_eq!((many.steps, many.samples), (one.steps, one.samples));
        }
    }
}

/// An objective that declares that its loss couples the samples of a batch is never split:
/// on 3 threads it trains exactly as on one (same step draws, same values). Undeclared, the
/// split changes its loss, which shows the test can see the difference.
#[test]
fn objectives_that_mix_samples_keep_whole_batches() {
    let spec = ModelSpec {
        width: 0.25,
        ..ModelSpec::mlp_2nn()
    };
    let data = ClientData {
        train: synthetic(48, 5),
        holdout: synthetic(0, 6),
        mean: vec![0.5],
        std: vec![0.25],
    };
    let recipe = Recipe::sgd(0.1, 16);
    let params = Net::init_params(&spec, 2).expect("params");
    let declared = BatchCoupled { declared: true };
    let one = run(1, &spec, &params, &data, &recipe, &declared);
    let three = run(3, &spec, &params, &data, &recipe, &declared);
    assert_eq!(
        three.params, one.params,
        "a declared objective must not be split"
    );
    assert_eq!(three.step_tally, one.step_tally);
    assert_eq!(one.step_tally.values().sum::<usize>(), one.steps);
    let undeclared = BatchCoupled { declared: false };
    let split = run(3, &spec, &params, &data, &recipe, &undeclared);
    assert!(
        (split.mean_loss - one.mean_loss).abs() > 1e-6,
        "splitting a batch-coupled loss should change it ({} vs {})",
        split.mean_loss,
        one.mean_loss
    );
}
