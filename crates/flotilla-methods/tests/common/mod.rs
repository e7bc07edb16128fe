//! Helpers shared by the method tests: the test kit's learnable synthetic dataset and round
//! sink, and a hand-made reply. Each test binary uses a subset of them.
#![allow(dead_code)]

use flotilla_core::ParamSet;
use flotilla_engine::Reply;

#[allow(unused_imports)]
pub use flotilla_testkit::Rounds;
#[allow(unused_imports)]
pub use flotilla_testkit::images::bands as synthetic;

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
