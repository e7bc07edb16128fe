//! Models for flotilla on burn's pure-Rust `flex` CPU backend.
//!
//! - [`ModelSpec`] describes an architecture (FedAvg CNN, 2NN MLP, CIFAR ResNet, isotropic ViT)
//!   with input shape, classes, width multiplier and depth; [`Net`] is the built model.
//! - Parameters cross the crate boundary only as [`flotilla_core::ParamSet`], with PyTorch names
//!   and layouts: [`Net::export`] and [`Net::from_params`] round-trip bit-identically.
//! - [`View`] selects what a client runs and trains: active blocks (depth prefix, depth
//!   dropout), frozen tensors.
//! - [`ModelSpec::ranks`] factors linear layers as W = U S Vᵀ (FeDLRT); [`dense_export`]
//!   multiplies the factors out for the unfactored model.
//! - [`Net::features`] is the representation each classifier reads.
//! - [`flops`] and [`memory`] give the per-layer FLOP formulas and the analytic memory estimate.
//!
//! Burn-specific code stays in this crate; the rest of flotilla talks to [`Net`].
#![warn(missing_docs)]

mod arch;
mod factored;
pub mod flops;
pub mod kernels;
mod layers;
pub mod memory;
mod net;
mod spec;

pub use factored::dense_export;
pub use net::{Net, compute_device, training_device};
pub use spec::{Architecture, ModelError, ModelSpec, View};
