//! The open training loop, one capability per test: an objective defined outside the engine,
//! the gradient pass, the additive gradient correction and soft targets.

use burn::tensor::Tensor;
use flotilla_core::{ParamSet, Tensor as NamedTensor};
use flotilla_data::Dataset;
use flotilla_engine::EngineError;
use flotilla_engine::local::{
    Batch, CrossEntropy, Objective, OptimizerKind, Recipe, SoftTargets, TrainJob, TrainMasks,
    cross_entropy, evaluate,
};
use flotilla_engine::method::ClientData;
use flotilla_models::{ModelSpec, Net, View};

use flotilla_testkit::images::noise as synthetic;

fn data(n: usize) -> ClientData {
    ClientData {
        train: synthetic(n, 1),
        holdout: synthetic(0, 2),
        mean: vec![0.5],
        std: vec![0.25],
    }
}

fn small_mlp() -> ModelSpec {
    ModelSpec {
        width: 0.25,
        ..ModelSpec::mlp_2nn()
    }
}

/// Largest |a − b| relative to the largest |b| (at least 1).
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// A method's own loss, written outside the engine: cross-entropy against class 0 whatever
/// the label. A model trained on it predicts class 0, which plain cross-entropy on these
/// labels (spread over all classes) never does.
struct AlwaysClassZero;

impl Objective for AlwaysClassZero {
    type Step = ();

    fn begin_step(&self, _rng: &mut rand_chacha::ChaCha8Rng) {}

    fn loss(&self, model: &Net, batch: Batch<'_>, _step: &()) -> Result<Tensor<1>, EngineError> {
        let zeros = vec![0u8; batch.labels.len()];
        let logits = model.forward(batch.x, &View::full());
        Ok(cross_entropy(logits, &zeros, batch.classes, batch.device))
    }
}

#[test]
fn a_method_defined_objective_drives_training() {
    let spec = small_mlp();
    let d = data(128);
    let params = Net::init_params(&spec, 3).unwrap();
    let view = View::full();
    let recipe = Recipe {
        epochs: 3,
        ..Recipe::sgd(0.1, 16)
    };
    let custom = TrainJob::new(&spec, &view, &params, &d, &recipe, &AlwaysClassZero)
        .train()
        .unwrap();
    let plain = TrainJob::new(
        &spec,
        &view,
        &params,
        &d,
        &recipe,
        &CrossEntropy::under(&view),
    )
    .train()
    .unwrap();
    // Accuracy on data whose labels are all 0 = share of predictions that are class 0.
    let zeros = Dataset {
        labels: vec![0; 128],
        ..d.train.clone()
    };
    let share_zero = |p: &ParamSet| {
        evaluate(&spec, &view, p, &zeros, &d.mean, &d.std)
            .unwrap()
            .0
    };
    assert!(
        share_zero(&custom.params) > 0.95,
        "{}",
        share_zero(&custom.params)
    );
    assert!(
        share_zero(&plain.params) < 0.5,
        "{}",
        share_zero(&plain.params)
    );
}

/// With one batch holding every sample, one plain SGD step moves the weights by exactly
/// −lr · g, where g is what the gradient pass returns; the pass itself changes nothing.
#[test]
fn the_gradient_pass_returns_the_gradient_of_one_step() {
    let spec = small_mlp();
    let d = data(40);
    let params = Net::init_params(&spec, 5).unwrap();
    let view = View::full();
    let ce = CrossEntropy::under(&view);
    let lr = 0.5;
    let recipe = Recipe::sgd(lr, 40);
    let job = TrainJob::new(&spec, &view, &params, &d, &recipe, &ce);
    let grads = job.gradients(1).unwrap();
    assert_eq!((grads.batches, grads.samples), (1, 40));
    assert_eq!(
        grads.grads.names().collect::<Vec<_>>(),
        params.names().collect::<Vec<_>>()
    );
    let stepped = job.train().unwrap().params;
    for (g, (before, after)) in grads.grads.iter().zip(params.iter().zip(stepped.iter())) {
        assert_eq!(g.shape, before.shape, "{}: PyTorch layout", g.name);
        let implied: Vec<f32> = before
            .data
            .iter()
            .zip(&after.data)
            .map(|(b, a)| (b - a) / lr as f32)
            .collect();
        let d = rel_diff(&g.data, &implied);
        assert!(d < 1e-4, "{}: gradient vs step differ by {d}", g.name);
        assert!(g.data.iter().any(|v| *v != 0.0), "{}: all zero", g.name);
    }
    // Mean over batches: two half batches average to about the full-batch gradient.
    let halves = TrainJob::new(&spec, &view, &params, &d, &Recipe::sgd(lr, 20), &ce)
        .gradients(5)
        .unwrap();
    assert_eq!(halves.batches, 2, "capped at the batches of one epoch");
    let full: Vec<f32> = grads.grads.iter().flat_map(|t| t.data.clone()).collect();
    let mean: Vec<f32> = halves.grads.iter().flat_map(|t| t.data.clone()).collect();
    assert!(rel_diff(&mean, &full) < 1e-4);
    // Frozen tensors have no gradient; masked positions are zero.
    let frozen = View {
        frozen: vec!["layers.0".into()],
        ..View::full()
    };
    let name = params.names().next().unwrap().to_string();
    let mask = flotilla_core::wire::Mask {
        name: name.clone(),
        active: (0..params.get(&name).unwrap().numel())
            .map(|i| i % 2 == 0)
            .collect(),
    };
    let masks: TrainMasks = [(name.clone(), mask)].into();
    let masked = TrainJob::new(&spec, &view, &params, &d, &recipe, &ce)
        .masks(&masks)
        .gradients(1)
        .unwrap();
    let g = masked.grads.get(&name).unwrap();
    assert!(g.data.iter().skip(1).step_by(2).all(|v| *v == 0.0));
    assert!(g.data.iter().step_by(2).any(|v| *v != 0.0));
    let ce_frozen = CrossEntropy::under(&frozen);
    let partial = TrainJob::new(&spec, &frozen, &params, &d, &recipe, &ce_frozen)
        .gradients(1)
        .unwrap();
    assert!(partial.grads.names().all(|n| !n.starts_with("layers.0.")));
    assert_eq!(partial.grads.len(), params.len() - 2);
}

/// A correction c added to every step's gradient moves a plain SGD step by exactly −lr · c
/// (and the first momentum step too, where v = g); masked positions stay at zero.
#[test]
fn a_correction_changes_the_step_by_exactly_the_term() {
    let spec = small_mlp();
    let d = data(32);
    let params = Net::init_params(&spec, 7).unwrap();
    let view = View::full();
    let ce = CrossEntropy::under(&view);
    let lr = 0.25f32;
    let correction = ParamSet::from_tensors(
        params
            .iter()
            .filter(|t| t.name.starts_with("layers.1."))
            .map(|t| NamedTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                data: (0..t.numel())
                    .map(|i| (i % 7) as f32 * 0.01 - 0.03)
                    .collect(),
            })
            .collect(),
    )
    .unwrap();
    for momentum in [0.0, 0.9] {
        let recipe = Recipe {
            momentum,
            ..Recipe::sgd(f64::from(lr), 32)
        };
        let job = TrainJob::new(&spec, &view, &params, &d, &recipe, &ce);
        let plain = job.train().unwrap().params;
        let corrected = TrainJob::new(&spec, &view, &params, &d, &recipe, &ce)
            .correction(&correction)
            .train()
            .unwrap()
            .params;
        for (p, c) in plain.iter().zip(corrected.iter()) {
            let expected: Vec<f32> = match correction.get(&p.name) {
                Some(term) => p
                    .data
                    .iter()
                    .zip(&term.data)
                    .map(|(v, t)| v - lr * t)
                    .collect(),
                None => p.data.clone(),
            };
            let diff = rel_diff(&c.data, &expected);
            assert!(
                diff < 1e-6,
                "momentum {momentum}, {}: off by {diff}",
                p.name
            );
        }
        assert_ne!(plain, corrected);
    }
    // Adam sees the corrected gradient too.
    let adam = Recipe {
        optimizer: OptimizerKind::Adam,
        ..Recipe::sgd(1e-3, 32)
    };
    let a = TrainJob::new(&spec, &view, &params, &d, &adam, &ce)
        .train()
        .unwrap()
        .params;
    let b = TrainJob::new(&spec, &view, &params, &d, &adam, &ce)
        .correction(&correction)
        .train()
        .unwrap()
        .params;
    assert_eq!(
        a.filter(|n| !n.starts_with("layers.1.")),
        b.filter(|n| !n.starts_with("layers.1."))
    );
    assert_ne!(a, b);
    // A correction of a frozen or unknown tensor is refused, not ignored.
    let frozen = View {
        frozen: vec!["layers.1".into()],
        ..View::full()
    };
    let ce_frozen = CrossEntropy::under(&frozen);
    let err = TrainJob::new(
        &spec,
        &frozen,
        &params,
        &d,
        &Recipe::sgd(0.1, 32),
        &ce_frozen,
    )
    .correction(&correction)
    .train()
    .unwrap_err()
    .to_string();
    assert!(err.contains("freezes"), "{err}");
    let unknown = ParamSet::from_tensors(vec![NamedTensor::zeros("nope", vec![2])]).unwrap();
    let err = TrainJob::new(&spec, &view, &params, &d, &Recipe::sgd(0.1, 32), &ce)
        .correction(&unknown)
        .train()
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a tensor of the model"), "{err}");
}

/// Soft targets that are one-hot rows of the labels train exactly as cross-entropy; softened
/// targets train differently; malformed targets are refused.
#[test]
fn soft_targets_generalise_cross_entropy() {
    let spec = small_mlp();
    let d = data(48);
    let params = Net::init_params(&spec, 9).unwrap();
    let view = View::full();
    let recipe = Recipe::sgd(0.1, 16);
    let plain = TrainJob::new(
        &spec,
        &view,
        &params,
        &d,
        &recipe,
        &CrossEntropy::under(&view),
    )
    .seed(4)
    .train()
    .unwrap();
    let mut one_hot = vec![0f32; 48 * 10];
    for (i, l) in d.train.labels.iter().enumerate() {
        one_hot[i * 10 + *l as usize] = 1.0;
    }
    let hard = SoftTargets::from_probs(one_hot.clone(), 10, &view).unwrap();
    let soft_run = TrainJob::new(&spec, &view, &params, &d, &recipe, &hard)
        .seed(4)
        .train()
        .unwrap();
    assert_eq!(soft_run.params, plain.params);
    assert_eq!(soft_run.mean_loss, plain.mean_loss);
    // The same rows as logits at a high temperature are nearly uniform targets.
    let logits: Vec<f32> = one_hot.iter().map(|p| p * 5.0).collect();
    let warm = SoftTargets::from_logits(&logits, 10, 10.0, &view).unwrap();
    let warm_run = TrainJob::new(&spec, &view, &params, &d, &recipe, &warm)
        .seed(4)
        .train()
        .unwrap();
    assert_ne!(warm_run.params, plain.params);
    assert!(SoftTargets::from_probs(vec![0.5; 10], 10, &view).is_err());
    assert!(SoftTargets::from_probs(vec![0.1; 15], 10, &view).is_err());
    assert!(SoftTargets::from_logits(&logits, 10, 0.0, &view).is_err());
    // Fewer targets than samples: a clear error, not a panic.
    let short = SoftTargets::from_probs(one_hot[..100].to_vec(), 10, &view).unwrap();
    let err = TrainJob::new(&spec, &view, &params, &d, &recipe, &short)
        .train()
        .unwrap_err()
        .to_string();
    assert!(err.contains("no soft target"), "{err}");
}

#[test]
fn a_step_count_replaces_the_epochs() {
    let spec = small_mlp();
    let params = Net::init_params(&spec, 0).unwrap();
    let d = data(50);
    let view = View::full();
    let ce = CrossEntropy::under(&view);
    let recipe = Recipe {
        epochs: 3,
        ..Recipe::sgd(0.1, 16)
    };
    // 50 examples in batches of 16 are 4 steps per epoch (16, 16, 16, 2).
    let three = TrainJob::new(&spec, &view, &params, &d, &recipe, &ce)
        .train()
        .unwrap();
    assert_eq!((three.steps, three.samples), (12, 150));
    let short = TrainJob::new(&spec, &view, &params, &d, &recipe, &ce)
        .steps(3)
        .train()
        .unwrap();
    assert_eq!((short.steps, short.samples), (3, 48));
    let long = TrainJob::new(&spec, &view, &params, &d, &recipe, &ce)
        .steps(6)
        .train()
        .unwrap();
    assert_eq!(
        (long.steps, long.samples),
        (6, 50 + 32),
        "into a second epoch"
    );
    assert!(
        TrainJob::new(&spec, &view, &params, &d, &recipe, &ce)
            .steps(0)
            .train()
            .is_err()
    );
}
