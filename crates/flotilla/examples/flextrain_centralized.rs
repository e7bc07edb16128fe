//! Centralized FlexTrain (Algorithm 1 of the paper, methods.md §3.2) against plain training of
//! the full model ("Single"), the shape of the paper's Table 1 on Fashion-MNIST.
//!
//! One ResNet-20 at width 0.5 (9 blocks). FlexTrain draws a depth per mini-batch from π: the
//! full model with probability 0.5 and the prefixes nearest the paper's "≈35 %" and "≈15 %" of
//! the parameters (6 blocks: 24.8 %, 5 blocks: 17.9 %) with 0.25 each; the drawn prefix is
//! the student of the one-block-deeper prefix (β = 0.2 on class probabilities). Both models
//! are then evaluated at the three depths: a truncated plain model collapses, FlexTrain's
//! prefixes stay usable.
//!
//! ```text
//! cargo run --release --example flextrain_centralized [TRAIN_SAMPLES] [EPOCHS]
//! ```
//! (defaults 6000 and 2; needs `apt-get install dataset-fashion-mnist`.)

use flotilla::data::{self, DatasetKind};
use flotilla::engine::local::{OptimizerKind, Recipe, TrainJob, evaluate_views};
use flotilla::engine::method::ClientData;
use flotilla::methods::flextrain::{DistillOn, SampledDepth};
use flotilla::models::{Architecture, ModelSpec, Net, View};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let samples: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(6000);
    let epochs: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(2);
    let kind = DatasetKind::FashionMnist;
    let split = data::load(kind, &kind.default_dir())?;
    let (mean, std) = kind.normalization();
    let data = ClientData {
        train: split.train.take_first(samples),
        holdout: split.train.take_first(0),
        mean: mean.clone(),
        std: std.clone(),
    };
    let test = split.test.take_first(2000);
    let spec = ModelSpec {
        arch: Architecture::Resnet {
            blocks_per_stage: 3,
        },
        input: kind.input_shape(),
        classes: kind.num_classes(),
        width: 0.5,
        ranks: Default::default(),
    };
    let blocks = spec.num_blocks();
    let init = Net::init_params(&spec, 0)?;
    let recipe = Recipe {
        epochs,
        batch_size: 64,
        optimizer: OptimizerKind::Sgd,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 0.001,
    };
    let depths = [5usize, 6, blocks];
    let mut pi = vec![0.0; blocks + 1];
    pi[5] = 0.25;
    pi[6] = 0.25;
    pi[blocks] = 0.5;
    let share =
        |k: usize| init.filter(|n| ModelSpec::in_prefix(n, k)).numel() as f64 / init.numel() as f64;
    // Plain training of the full model is sampled-depth training with all mass on the full
    // depth and no distillation (a test in flotilla-methods checks that they are equal).
    let mut full_only = vec![0.0; blocks + 1];
    full_only[blocks] = 1.0;
    let objectives = [
        (
            "Single",
            SampledDepth {
                pi: full_only,
                beta: 0.0,
                on: DistillOn::Logits,
            },
        ),
        (
            "FlexTrain",
            SampledDepth {
                pi: pi.clone(),
                beta: 0.2,
                on: DistillOn::Softmax,
            },
        ),
    ];
    let views: Vec<View> = depths
        .iter()
        .map(|&d| View::depth_prefix(d, blocks))
        .collect();
    println!("{samples} training samples, {epochs} epochs; test accuracy (%) on 2000 test images");
    println!(
        "{:<10} {}",
        "method",
        depths
            .iter()
            .map(|&d| format!("depth {d} ({:.1} % params)", 100.0 * share(d)))
            .collect::<Vec<_>>()
            .join("  ")
    );
    for (name, objective) in &objectives {
        let started = std::time::Instant::now();
        let full = View::full();
        let out = TrainJob::new(&spec, &full, &init, &data, &recipe, objective)
            .seed(1)
            .train()?;
        let results = evaluate_views(&spec, &views, &out.params, &test, &mean, &std)?;
        let trained: f64 = out
            .step_tally
            .iter()
            .map(|(k, n)| *n as f64 * share(*k))
            .sum::<f64>()
            / out.steps as f64;
        println!(
            "{name:<10} {}   ({:.0} s, share of parameters trained per step {trained:.3})",
            results
                .iter()
                .map(|(a, _)| format!("{:>24.2}", 100.0 * a))
                .collect::<Vec<_>>()
                .join("  "),
            started.elapsed().as_secs_f64()
        );
    }
    let r_bar: f64 = pi.iter().enumerate().map(|(k, p)| p * share(k)).sum();
    println!("analytic r̄ = Σ π_k A_k / A = {r_bar:.3}");
    Ok(())
}
