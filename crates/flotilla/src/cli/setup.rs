//! What every command does first: read the config and load the data it names.

use anyhow::{Context, Result};
use flotilla_data::{DatasetKind, Split};
use flotilla_engine::Experiment;
use std::path::Path;

/// Reads and checks a config file, applying overrides.
pub fn load_config(path: &Path, overrides: &[String]) -> Result<Experiment> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let exp = Experiment::with_overrides(&text, overrides)
        .with_context(|| format!("in {}", path.display()))?;
    Ok(exp)
}

/// Loads the dataset the config names, from the resolved folder, cut to the config's
/// `data.train_limit` and `data.test_limit`: the data every command works on.
pub fn load_data(exp: &Experiment, cli_dir: Option<&Path>) -> Result<Split> {
    let kind: DatasetKind = exp.data.dataset;
    let dir = flotilla_data::resolve_data_dir(cli_dir, exp.data.dir.as_deref(), kind);
    let mut data = flotilla_data::load(kind, &dir)?;
    if let Some(n) = exp.data.train_limit {
        data.train = data.train.take_first(n);
    }
    if let Some(n) = exp.data.test_limit {
        data.test = data.test.take_first(n);
    }
    Ok(data)
}
