//! Every random stream of a run derives from (run seed, round, client, purpose), so results do
//! not depend on scheduling or on the number of worker threads.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// What a random stream is used for; part of its seed so that streams never collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum Purpose {
    /// Initial model weights.
    Init = 1,
    /// Data partitioning.
    Partition = 2,
    /// Assigning device profiles to clients.
    Fleet = 3,
    /// Choosing the clients of a round.
    Sampling = 4,
    /// Drawing dropouts.
    Dropout = 5,
    /// Shuffling a client's local data.
    Shuffle = 6,
    /// Method-specific randomness (depth dropout draws, for example).
    Method = 7,
    /// Server-side training.
    Server = 8,
    /// Drawing the training samples held out for the server (`[server_data] source = "holdout"`).
    ServerData = 9,
    /// Drawing the labelled training images a linear probe is fitted on.
    Probe = 10,
    /// Fitting and sampling FedTSA's server-side generator.
    Generator = 11,
}

/// SplitMix64 finaliser: a cheap, well-mixed bijection on u64.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Derives the seed of one stream.
pub fn derive(run_seed: u64, round: u64, client: u64, purpose: Purpose) -> u64 {
    let mut h = mix(run_seed);
    h = mix(h ^ round);
    h = mix(h ^ client.wrapping_mul(0xA24B_AED4_963E_E407));
    mix(h ^ purpose as u64)
}

/// A ChaCha8 generator for one stream.
pub fn rng(run_seed: u64, round: u64, client: u64, purpose: Purpose) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(derive(run_seed, round, client, purpose))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_differ_by_every_component() {
        let base = derive(1, 2, 3, Purpose::Shuffle);
        assert_eq!(base, derive(1, 2, 3, Purpose::Shuffle));
        assert_ne!(base, derive(2, 2, 3, Purpose::Shuffle));
        assert_ne!(base, derive(1, 3, 3, Purpose::Shuffle));
        assert_ne!(base, derive(1, 2, 4, Purpose::Shuffle));
        assert_ne!(base, derive(1, 2, 3, Purpose::Dropout));
        // round and client must not be interchangeable
        assert_ne!(
            derive(1, 2, 3, Purpose::Init),
            derive(1, 3, 2, Purpose::Init)
        );
    }
}
