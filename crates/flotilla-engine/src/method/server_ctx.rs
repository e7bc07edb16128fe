//! What a server half gets during aggregation.

use super::ClientData;
use flotilla_core::ParamSet;

/// Server-side context for aggregation: lets a method train on server data and report what
/// that costs.
#[derive(Default)]
pub struct ServerCtx<'a> {
    /// Server-side data (a proxy or synthetic set), if the run configures one (`[server_data]`
    /// or `Driver::set_server_data`). Normalise it with its own `mean` and `std`.
    pub server_data: Option<&'a ClientData>,
    /// Whether the method may use `server_data`'s labels. When false they are withheld: every
    /// label reads 0, so only the images carry information.
    pub server_data_labelled: bool,
    /// FLOPs reported through [`ServerCtx::add_flops`].
    flops: f64,
    /// The replies' mean, folded as they arrived ([`ServerHalf::mean_fold`]).
    mean: Option<ParamSet>,
}

impl<'a> ServerCtx<'a> {
    /// A context with `server_data`, labelled or not, and no FLOPs reported yet.
    pub fn new(server_data: Option<&'a ClientData>, labelled: bool) -> Self {
        Self {
            server_data,
            server_data_labelled: labelled && server_data.is_some(),
            flops: 0.0,
            mean: None,
        }
    }

    /// The same context holding `mean`, the phase's replies folded as they arrived.
    pub fn with_mean(mut self, mean: Option<ParamSet>) -> Self {
        self.mean = mean;
        self
    }

    /// The example-weighted mean of this phase's replies when the server folded them as they
    /// arrived ([`ServerHalf::mean_fold`]); the replies passed to `aggregate` then carry no
    /// tensors. `None`: the replies are whole.
    pub fn take_mean(&mut self) -> Option<ParamSet> {
        self.mean.take()
    }

    /// Reports FLOPs of server-side work (training, distillation, generation) in this call,
    /// e.g. `flotilla_models::flops::training(..)`. They appear as `server_flops` in
    /// metrics.jsonl and add FLOPs / `simulation.server_gflops` to the round's simulated time.
    pub fn add_flops(&mut self, flops: f64) {
        self.flops += flops;
    }

    /// FLOPs reported so far.
    pub fn flops(&self) -> f64 {
        self.flops
    }
}
