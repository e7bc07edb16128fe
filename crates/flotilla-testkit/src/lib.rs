//! Test support shared by the workspace's test suites: synthetic 28×28 image sets (so that
//! tests run without the packaged dataset), a client's data around them, and a sink that keeps
//! every round's records. Only tests depend on this crate.
#![warn(missing_docs)]

use flotilla_core::ParamSet;
use flotilla_data::Dataset;
use flotilla_engine::sink::{ClientRecord, Event, RoundRecord, Sink};
use flotilla_engine::{ClientData, EngineError, PhaseCtx, Recipe, Task};
use flotilla_models::{ModelSpec, View};

/// Synthetic image sets, 28×28 with one channel and ten classes, image `i` labelled `i % 10`.
pub mod images {
    use super::*;

    /// A 64-bit LCG stream from `seed` (Knuth's MMIX constants).
    fn stream(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x
        }
    }

    fn dataset(images: Vec<u8>, n: usize) -> Dataset {
        Dataset {
            images,
            labels: (0..n).map(|i| (i % 10) as u8).collect(),
            shape: [1, 28, 28],
            num_classes: 10,
        }
    }

    /// `n` images of uniform noise from `seed`: nothing to learn, for throughput, memory and
    /// determinism tests.
    pub fn noise(n: usize, seed: u64) -> Dataset {
        let mut next = stream(seed);
        dataset((0..n * 784).map(|_| (next() >> 56) as u8).collect(), n)
    }

    /// `n` learnable images: the label is the band of bright rows starting at row 2.8·label,
    /// over seeded noise.
    pub fn bands(n: usize, seed: u64) -> Dataset {
        let mut next = stream(seed);
        let images = (0..n * 784)
            .map(|p| {
                let noise = (next() >> 60) as u8 * 8;
                if (p % 784) / 78 == (p / 784) % 10 {
                    220
                } else {
                    noise
                }
            })
            .collect();
        dataset(images, n)
    }

    /// `n` learnable images whose class is a bright 7×4 patch at one of ten positions, over
    /// seeded noise (harder to tell apart by rows alone than [`bands`]).
    pub fn patches(n: usize, seed: u64) -> Dataset {
        let mut next = stream(seed);
        let mut images = vec![0u8; n * 784];
        for i in 0..n {
            let label = i % 10;
            let (r0, c0) = (2 + (label / 5) * 12, 2 + (label % 5) * 5);
            for p in 0..784 {
                let noise = (next() >> 59) as u8 * 4;
                let (r, c) = (p / 28, p % 28);
                let bright = r >= r0 && r < r0 + 7 && c >= c0 && c < c0 + 4;
                images[i * 784 + p] = if bright { 200 } else { noise };
            }
        }
        dataset(images, n)
    }

    /// `n` images whose pixels encode their index (no randomness): a test set of the right
    /// shape for a server that only evaluates on it.
    pub fn pattern(n: usize) -> Dataset {
        let mut images = Vec::with_capacity(n * 784);
        for i in 0..n {
            images.extend((0..784).map(|p| ((i * 7 + p) % 251) as u8));
        }
        dataset(images, n)
    }
}

/// A client's data: `train`, no held-out examples, Fashion-MNIST's normalisation.
pub fn client_data(train: Dataset) -> ClientData {
    let (mean, std) = flotilla_data::DatasetKind::FashionMnist.normalization();
    ClientData {
        holdout: train.take_first(0),
        train,
        mean,
        std,
    }
}

/// A task of `kind` for client `c` in `ctx`'s round and phase: no masks, nothing held, no
/// options.
pub fn task(
    ctx: &PhaseCtx,
    c: u64,
    kind: &str,
    model: ModelSpec,
    view: View,
    params: ParamSet,
    recipe: &Recipe,
) -> Task {
    Task {
        round: ctx.round,
        phase: ctx.phase,
        client: c,
        kind: kind.into(),
        model,
        view,
        recipe: recipe.clone(),
        params,
        masks: Vec::new(),
        hold: Vec::new(),
        options: serde_json::Value::Null,
    }
}

/// Keeps the round record and the client records of every round.
#[derive(Debug, Default)]
pub struct Rounds(pub Vec<(RoundRecord, Vec<ClientRecord>)>);

impl Sink for Rounds {
    fn on_event(&mut self, e: &Event<'_>) -> Result<(), EngineError> {
        if let Event::Round { round, clients } = e {
            self.0.push(((*round).clone(), clients.to_vec()));
        }
        Ok(())
    }
}
