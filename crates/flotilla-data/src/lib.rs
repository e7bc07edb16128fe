//! Datasets, data location and federated partitioners for flotilla.
//!
//! * [`load`] reads MNIST / Fashion-MNIST (IDX, raw or gzip) and CIFAR-10
//!   (binary version) into an in-memory [`Dataset`] pair.
//! * [`resolve_data_dir`] decides where the data lives.
//! * [`partition()`] splits sample indices among clients (IID, Dirichlet label
//!   skew, McMahan shards, quantity skew) and [`summarize`] describes the result.
//!
//! Every file problem comes back as a [`DataError`] that names the path and
//! the fix; no file content makes the loaders panic.
#![warn(missing_docs)]

mod dataset;
mod error;
mod idx;
mod kind;
mod load;
mod location;
pub mod partition;

pub use dataset::{Dataset, Split};
pub use error::DataError;
pub use idx::{IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, IdxArray, encode_idx, read_idx};
pub use kind::DatasetKind;
pub use load::{CIFAR_RECORD_BYTES, load};
pub use location::{DATA_ENV_VAR, resolve_data_dir, resolve_data_dir_with_env};
pub use partition::{ClientSummary, PartitionSpec, PartitionSummary, partition, summarize};
