//! The reference workloads (W1: the FedAvg CNN on Fashion-MNIST-shaped images; W2: the 2NN
//! MLP) as the benchmarks and the profiling example build them.

use flotilla_data::Dataset;
use flotilla_engine::local::{OptimizerKind, Recipe};
use flotilla_engine::method::ClientData;

/// `n` random 28×28 images (uniform bytes, labels 0..10) from `seed`.
pub fn synthetic_images(n: usize, seed: u64) -> Dataset {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let images: Vec<u8> = (0..n * 784).map(|_| rng.random()).collect();
    let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..10)).collect();
    Dataset {
        images,
        labels,
        shape: [1, 28, 28],
        num_classes: 10,
    }
}

/// `n` random W1 images as one client's data, from `seed`, with Fashion-MNIST's
/// normalisation.
pub fn client_data(n: usize, seed: u64) -> ClientData {
    ClientData {
        train: synthetic_images(n, seed),
        holdout: synthetic_images(0, seed),
        mean: vec![0.2860],
        std: vec![0.3530],
    }
}

/// W1's local training recipe (one epoch, SGD 0.01 with momentum 0.9) at `batch`.
pub fn w1_recipe(batch: usize) -> Recipe {
    Recipe {
        epochs: 1,
        batch_size: batch,
        optimizer: OptimizerKind::Sgd,
        lr: 0.01,
        momentum: 0.9,
        weight_decay: 0.0,
    }
}
