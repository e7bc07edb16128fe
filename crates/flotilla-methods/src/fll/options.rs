//! FLL's and FedSSL's `[method]` options, as the config gives them.

use super::contrastive::{Augment, Loss};
use serde::Deserialize;

/// The `[method]` table of `fll` and `fedssl`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Options {
    pub(super) name: String,
    /// `contrastive` (NT-Xent, no labels) or `supervised`.
    #[serde(default)]
    pub(super) objective: Loss,
    /// NT-Xent temperature τ.
    #[serde(default = "default_temperature")]
    pub(super) temperature: f64,
    /// Outputs of the projection head.
    #[serde(default = "default_projection_dim")]
    pub(super) projection_dim: usize,
    /// Augmentations of each view.
    #[serde(default)]
    pub(super) augment: AugmentTable,
    /// Rounds of each stage, one entry per block; default equal stages (rounds / depth, the
    /// remainder to the last stage).
    #[serde(default)]
    pub(super) stage_rounds: Option<Vec<u64>>,
    /// Depth-dropout probability of each frozen block.
    #[serde(default)]
    pub(super) dd_rate: f64,
    /// Always keep the frozen block just below the trained one.
    #[serde(default)]
    pub(super) dd_keep_last: bool,
    /// Clients keep frozen tensors between the rounds of a stage.
    #[serde(default = "yes")]
    pub(super) cache_frozen: bool,
}

/// `[method.augment]`: any subset of [`Augment`]'s fields.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AugmentTable {
    crop_min_scale: Option<f64>,
    flip: Option<f64>,
    noise: Option<f64>,
    erase: Option<f64>,
}

impl AugmentTable {
    /// The augmentations, defaults filled in.
    pub(super) fn resolve(&self) -> Augment {
        let d = Augment::default();
        Augment {
            crop_min_scale: self.crop_min_scale.unwrap_or(d.crop_min_scale),
            flip: self.flip.unwrap_or(d.flip),
            noise: self.noise.unwrap_or(d.noise),
            erase: self.erase.unwrap_or(d.erase),
        }
    }
}

fn default_temperature() -> f64 {
    0.2
}

fn default_projection_dim() -> usize {
    128
}

fn yes() -> bool {
    true
}
