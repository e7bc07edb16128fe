//! The backend-free core of flotilla.
//!
//! Everything here is plain data and plain functions, usable and testable without a
//! tensor backend:
//! - [`params`]: parameters as data, an ordered collection of named f32 tensors, the currency
//!   between models, aggregation, codecs, checkpoints and the wire;
//! - [`wire`]: the messages exchanged between the server half and the client half of a method,
//!   with their protobuf encoding (the simulator and the network measure the same bytes);
//! - [`aggregate`]: aggregation rules over parameter collections;
//! - [`device`]: device profiles, fleets and the virtual clock;
//! - [`seed`]: derivation of every random stream from the run seed;
//! - [`safetensors_io`]: reading and writing parameter collections as safetensors files.
#![warn(missing_docs)]

pub mod aggregate;
pub mod cluster;
pub mod device;
pub mod error;
pub mod params;
pub mod safetensors_io;
pub mod seed;
pub mod wire;

pub use error::CoreError;
pub use params::{ParamSet, Tensor};
