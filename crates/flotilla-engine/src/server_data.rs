//! The server's own data from `[server_data]`: a slice of the training set that no client gets
//! (`source = "holdout"`), or a pair of IDX files such as a generator writes (`source = "idx"`).
//! The driver hands it to the method's aggregation as [`ServerCtx::server_data`].
//!
//! Unlabelled data (`labelled = false`) reaches the method with
//! [`ServerCtx::server_data_labelled`] false and its labels withheld: every label reads 0, so a
//! method that reads them anyway learns nothing from them instead of silently using them.
//!
//! [`ServerCtx::server_data`]: crate::ServerCtx::server_data
//! [`ServerCtx::server_data_labelled`]: crate::ServerCtx::server_data_labelled

use crate::EngineError;
use crate::config::{Experiment, ServerDataConfig, ServerDataSource};
use crate::method::ClientData;
use flotilla_core::seed::{self, Purpose};
use flotilla_data::{DataError, Dataset, IdxArray};
use rand::Rng;
use std::path::Path;

/// Data the server half may train on, and whether it may read the labels.
#[derive(Debug, Clone)]
pub struct ServerData {
    /// The samples with the dataset's normalisation (`holdout` is empty).
    pub data: ClientData,
    /// Whether the labels are the real ones; when false every label is 0.
    pub labelled: bool,
}

impl From<ClientData> for ServerData {
    /// Labelled server data.
    fn from(data: ClientData) -> Self {
        Self {
            data,
            labelled: true,
        }
    }
}

impl ServerData {
    /// Unlabelled server data: the labels of `data` are withheld (set to 0).
    pub fn unlabelled(mut data: ClientData) -> Self {
        data.train.labels.fill(0);
        data.holdout.labels.fill(0);
        Self {
            data,
            labelled: false,
        }
    }

    /// The server data `exp` configures, or `None` without a `[server_data]` section. `train`
    /// is the training set after `data.train_limit`, as the clients' partition sees it. IDX
    /// files are read here; problems are errors that name the key, the path and the fix.
    pub fn from_config(exp: &Experiment, train: &Dataset) -> Result<Option<Self>, EngineError> {
        let Some(sd) = &exp.server_data else {
            return Ok(None);
        };
        let samples = match sd.source {
            ServerDataSource::Holdout => train.subset(&holdout_indices(exp, train.len())?)?,
            ServerDataSource::Idx => load_idx(exp, sd)?,
        };
        let (mean, std) = exp.data.dataset.normalization();
        let data = ClientData {
            holdout: samples.take_first(0),
            train: samples,
            mean,
            std,
        };
        tracing::info!(
            source = ?sd.source,
            samples = data.train.len(),
            labelled = sd.labelled,
            "server data ready"
        );
        Ok(Some(if sd.labelled {
            data.into()
        } else {
            Self::unlabelled(data)
        }))
    }
}

/// The training samples kept from the clients, sorted: `server_data.size` indices (`source =
/// "holdout"`) or `server_data.withhold` indices (`source = "idx"`) below `train_len`, drawn
/// uniformly with the run seed (its own stream, [`Purpose::ServerData`]), so a holdout and a
/// withheld slice of the same size are the same samples. Empty without either. The same config
/// gives the same slice in the simulator, the server and every `join --partition` client.
pub fn holdout_indices(exp: &Experiment, train_len: usize) -> Result<Vec<usize>, EngineError> {
    let Some(sd) = exp.server_data.as_ref() else {
        return Ok(Vec::new());
    };
    let size = sd.withheld();
    let clients = exp.data.num_clients;
    // `check` compares with the dataset's official size; a shorter file still gets here.
    if size.saturating_add(clients) > train_len {
        return Err(EngineError::Config(format!(
            "`server_data.size` (or `withhold`) is {size}, but the training set read has {train_len} samples and the {clients} clients need at least one each; choose at most {}",
            train_len.saturating_sub(clients)
        )));
    }
    let mut idx: Vec<usize> = (0..train_len).collect();
    let mut rng = seed::rng(exp.seed, 0, 0, Purpose::ServerData);
    // Partial Fisher-Yates: the first `size` entries are a uniform sample.
    for i in 0..size {
        let j = rng.random_range(i..train_len);
        idx.swap(i, j);
    }
    idx.truncate(size);
    idx.sort_unstable();
    Ok(idx)
}

/// Reads `server_data.images` (and `labels`) and checks them against the model's input.
fn load_idx(exp: &Experiment, sd: &ServerDataConfig) -> Result<Dataset, EngineError> {
    let images_path = sd.images.as_deref().ok_or_else(|| {
        EngineError::Config("`server_data.images` is required with source = \"idx\"".into())
    })?;
    let images = read("images", images_path)?;
    let ds = exp.data.dataset;
    let (count, shape) = match images.dims[..] {
        [n, h, w] => (n, [1, h, w]),
        [n, c, h, w] => (n, [c, h, w]),
        _ => {
            return Err(EngineError::Config(format!(
                "`server_data.images`: {} holds an IDX array of shape {:?}; images must be [count, height, width] or [count, channels, height, width]",
                images_path.display(),
                images.dims
            )));
        }
    };
    let want = ds.input_shape();
    if shape != want {
        return Err(EngineError::Config(format!(
            "`server_data.images`: {} holds images of shape {shape:?} (channels, height, width), but the model takes {want:?} (data.dataset = \"{ds}\"); write images of that shape, or point the key at files made for this dataset",
            images_path.display()
        )));
    }
    let labels = match &sd.labels {
        Some(path) => {
            let labels = read("labels", path)?;
            if labels.dims != [count] {
                return Err(EngineError::Config(format!(
                    "`server_data.labels`: {} holds an IDX array of shape {:?}, but `server_data.images` ({}) holds {count} images: the label file must be [{count}], one label per image",
                    path.display(),
                    labels.dims,
                    images_path.display()
                )));
            }
            let classes = ds.num_classes();
            if let Some((i, l)) = labels
                .data
                .iter()
                .enumerate()
                .find(|&(_, &l)| usize::from(l) >= classes)
            {
                return Err(EngineError::Config(format!(
                    "`server_data.labels`: {} holds label {l} at index {i}, but the model has {classes} classes (data.dataset = \"{ds}\"); labels must be 0..={}",
                    path.display(),
                    classes - 1
                )));
            }
            labels.data
        }
        // Unlabelled images only (`check` refuses this when labelled = true).
        None => vec![0; count],
    };
    let data = Dataset::new(images.data, labels, shape, ds.num_classes())?;
    match sd.size {
        Some(n) if n > data.len() => Err(EngineError::Config(format!(
            "`server_data.size` is {n}, but {} holds only {} images; lower it, or leave it out to use them all",
            images_path.display(),
            data.len()
        ))),
        Some(n) => Ok(data.take_first(n)),
        None => Ok(data),
    }
}

/// Reads one IDX file of `[server_data]`; errors name the key and the path.
fn read(key: &str, path: &Path) -> Result<IdxArray, EngineError> {
    if !path.exists() {
        return Err(EngineError::Config(format!(
            "`server_data.{key}`: {} does not exist; point `server_data.{key}` at an IDX file (a relative path starts from the working directory)",
            path.display()
        )));
    }
    // The loader's own fixes speak of reinstalling a dataset; these files are the user's.
    flotilla_data::read_idx(path).map_err(|e| {
        EngineError::Config(match e {
            DataError::Corrupt { path, detail, .. } => format!(
                "`server_data.{key}`: {} {detail}; write it again as an IDX file of unsigned bytes (flotilla_data::encode_idx writes one)",
                path.display()
            ),
            DataError::Io { path, source, .. } => format!(
                "`server_data.{key}`: cannot read {}: {source}; check that the key names a readable file",
                path.display()
            ),
            e => format!("`server_data.{key}`: {e}"),
        })
    })
}
