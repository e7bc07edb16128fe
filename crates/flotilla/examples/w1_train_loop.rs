//! One W1 client training on synthetic images, for profilers: the loop `flotilla bench` times,
//! without the rest of the bench around it.
//!
//! ```text
//! cargo run --release --example w1_train_loop [BATCH] [SAMPLES] [THREADS]
//! ```
//! (defaults 32, 3200 and all cores; prints the samples/s of three runs.)

use flotilla::data::Dataset;
use flotilla::engine::local::{OptimizerKind, Recipe, train};
use flotilla::engine::method::ClientData;
use flotilla::models::{ModelSpec, Net, View};
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn client_data(n: usize, seed: u64) -> ClientData {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let synthetic = |n: usize, rng: &mut rand_chacha::ChaCha8Rng| Dataset {
        images: (0..n * 784).map(|_| rng.random()).collect(),
        labels: (0..n).map(|_| rng.random_range(0..10)).collect(),
        shape: [1, 28, 28],
        num_classes: 10,
    };
    ClientData {
        train: synthetic(n, &mut rng),
        holdout: synthetic(0, &mut rng),
        mean: vec![0.2860],
        std: vec![0.3530],
    }
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let batch: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(32);
    let samples: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3200);
    let threads: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or_else(rayon::current_num_threads);
    let recipe = Recipe {
        epochs: 1,
        batch_size: batch,
        optimizer: OptimizerKind::Sgd,
        lr: 0.01,
        momentum: 0.9,
        weight_decay: 0.0,
        prox_mu: 0.0,
    };
    let spec = ModelSpec::fedavg_cnn();
    let params = Net::init_params(&spec, 0)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    pool.install(|| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        train(
            &spec,
            &View::full(),
            &params,
            &client_data(batch, 1),
            &recipe,
            0,
        )?;
        let data = client_data(samples, 2);
        let runs: Vec<String> = (0..3)
            .map(|_| {
                let t = Instant::now();
                train(&spec, &View::full(), &params, &data, &recipe, 0)?;
                Ok(format!("{:.0}", samples as f64 / t.elapsed().as_secs_f64()))
            })
            .collect::<Result<_, Box<dyn std::error::Error + Send + Sync>>>()?;
        println!(
            "W1 batch {batch}, {threads} thread(s): {} samples/s",
            runs.join(" / ")
        );
        Ok(())
    })
}
