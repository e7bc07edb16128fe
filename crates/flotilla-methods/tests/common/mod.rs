//! Helpers shared by the method tests: a learnable synthetic dataset, a sink that keeps every
//! round's records and a hand-made reply. Each test binary uses a subset of them.
#![allow(dead_code)]

use flotilla_core::ParamSet;
use flotilla_data::Dataset;
use flotilla_engine::sink::{ClientRecord, Event, RoundRecord, Sink};
use flotilla_engine::{EngineError, Reply};

/// `n` 28×28 images whose label is the band of bright rows (rows 8·label..), over seeded noise.
pub fn synthetic(n: usize, seed: u64) -> Dataset {
    let mut x = seed.wrapping_add(17);
    let images = (0..n * 784)
        .map(|p| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let label = (p / 784) % 10;
            if (p % 784) / 78 == label {
                220
            } else {
                (x >> 60) as u8 * 8
            }
        })
        .collect();
    Dataset {
        images,
        labels: (0..n).map(|i| (i % 10) as u8).collect(),
        shape: [1, 28, 28],
        num_classes: 10,
    }
}

/// Keeps the round record and the client records of every round.
pub struct Rounds(pub Vec<(RoundRecord, Vec<ClientRecord>)>);

impl Sink for Rounds {
    fn on_event(&mut self, e: &Event<'_>) -> Result<(), EngineError> {
        if let Event::Round { round, clients } = e {
            self.0.push(((*round).clone(), clients.to_vec()));
        }
        Ok(())
    }
}

/// A round-1 reply of `client` carrying `params` for `n` examples.
pub fn reply(client: u64, params: ParamSet, n: u64) -> Reply {
    Reply {
        round: 1,
        phase: 0,
        client,
        num_examples: n,
        params,
        metrics: Default::default(),
        resources: Default::default(),
    }
}
