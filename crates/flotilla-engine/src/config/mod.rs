//! Experiment configuration: TOML in, a checked [`Experiment`] out.
//!
//! Unknown keys and invalid values are errors that name the key and what is allowed
//! (serde's `deny_unknown_fields` plus [`Experiment::check`]).

use crate::EngineError;
use crate::recipe::{OptimizerKind, Recipe};
use flotilla_core::device::TierSpec;
use flotilla_data::{DatasetKind, PartitionSpec};
use flotilla_models::Architecture;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

mod sections;
#[cfg(test)]
mod tests;

pub use sections::*;

/// A TOML error as one line: position and message (toml's own rendering spans several lines).
fn toml_error(text: &str, e: &toml::de::Error) -> EngineError {
    let message = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            EngineError::Config(format!("line {line}, column {column}: {message}"))
        }
        None => EngineError::Config(message),
    }
}

/// Removes keys that earlier versions wrote into run directories' config.toml and that no
/// longer mean anything, so those runs still load; refuses them where they would change the
/// run. Returns whether anything was removed.
///
/// `training.prox_mu`: FedProx's μ is `method.mu` (with `method.name = "fedprox"`). A
/// non-zero value here would silently turn any method into FedProx, so it is refused.
fn drop_legacy_keys(doc: &mut toml::Table) -> Result<bool, EngineError> {
    let Some(training) = doc.get_mut("training").and_then(|t| t.as_table_mut()) else {
        return Ok(false);
    };
    match training.get("prox_mu") {
        None => Ok(false),
        Some(v) if v.as_float() == Some(0.0) || v.as_integer() == Some(0) => {
            training.remove("prox_mu");
            Ok(true)
        }
        Some(v) => Err(EngineError::Config(format!(
            "`training.prox_mu = {v}` is not read: FedProx's μ is set under [method] \
             (name = \"fedprox\", mu = {v})"
        ))),
    }
}

/// A whole experiment, as written in a TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Run seed: every random stream derives from it.
    #[serde(default)]
    pub seed: u64,
    /// Communication rounds.
    pub rounds: u64,
    /// Data and partition.
    pub data: DataConfig,
    /// Model architecture (input shape and classes come from the dataset).
    pub model: ModelConfig,
    /// Clients' local training.
    pub training: Recipe,
    /// Client sampling.
    #[serde(default)]
    pub sampling: SamplingConfig,
    /// Server-side evaluation.
    #[serde(default)]
    pub evaluation: EvaluationConfig,
    /// Device fleet.
    #[serde(default)]
    pub fleet: FleetConfig,
    /// Simulator settings.
    #[serde(default)]
    pub simulation: SimulationConfig,
    /// Network server settings (`flotilla serve`).
    #[serde(default)]
    pub server: ServerConfig,
    /// Data of the server's own, handed to the method during aggregation (`[server_data]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_data: Option<ServerDataConfig>,
    /// Method name and its own options (checked by the method).
    pub method: toml::Table,
}

impl Experiment {
    /// Parses TOML; serde errors already name the key and the line.
    pub fn from_toml(text: &str) -> Result<Self, EngineError> {
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        let exp: Experiment = if drop_legacy_keys(&mut doc)? {
            doc.try_into()
                .map_err(|e: toml::de::Error| EngineError::Config(e.message().to_string()))?
        } else {
            toml::from_str(text).map_err(|e| toml_error(text, &e))?
        };
        exp.check()?;
        Ok(exp)
    }

    /// Applies `key.path=value` overrides (value in TOML syntax, bare words as strings).
    pub fn with_overrides(text: &str, overrides: &[String]) -> Result<Self, EngineError> {
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        for o in overrides {
            let (key, value) = o.split_once('=').ok_or_else(|| {
                EngineError::Config(format!("override `{o}` must look like key.path=value"))
            })?;
            let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|t| t.get("v").cloned())
                .unwrap_or_else(|| toml::Value::String(value.to_string()));
            let mut table = &mut doc;
            let parts: Vec<&str> = key.trim().split('.').collect();
            for p in &parts[..parts.len() - 1] {
                table = table
                    .entry(p.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .ok_or_else(|| {
                        EngineError::Config(format!("override `{o}`: `{p}` is not a table"))
                    })?;
            }
            table.insert(parts[parts.len() - 1].to_string(), value);
        }
        let text = toml::to_string(&doc).map_err(|e| EngineError::Config(e.to_string()))?;
        Self::from_toml(&text)
    }

    /// Value checks that serde cannot express.
    pub fn check(&self) -> Result<(), EngineError> {
        let bad = |key: &str, msg: String| Err(EngineError::Config(format!("`{key}` {msg}")));
        if self.rounds == 0 {
            return bad("rounds", "must be at least 1".into());
        }
        let sv = &self.server;
        for (key, v) in [
            ("server.wait_s", sv.wait_s),
            ("server.deadline_s", sv.deadline_s),
            ("server.heartbeat_s", sv.heartbeat_s),
            ("server.liveness_s", sv.liveness_s),
            ("server.idle_timeout_s", sv.idle_timeout_s),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(
                    key,
                    format!("must be a positive number of seconds, got {v}"),
                );
            }
        }
        if sv.liveness_s <= sv.heartbeat_s {
            return bad(
                "server.liveness_s",
                format!(
                    "({}) must exceed server.heartbeat_s ({}), or live clients are declared gone",
                    sv.liveness_s, sv.heartbeat_s
                ),
            );
        }
        if sv.idle_timeout_s <= sv.heartbeat_s {
            return bad(
                "server.idle_timeout_s",
                format!(
                    "({}) must exceed server.heartbeat_s ({}), or waiting clients are cut off",
                    sv.idle_timeout_s, sv.heartbeat_s
                ),
            );
        }
        if sv.min_clients == 0
            || sv.max_message_mib == 0
            || sv.max_connections == 0
            || sv.max_push_mib_in_flight == 0
            || sv.max_task_mib_in_flight == 0
            || sv.flow_window_kib == 0
        {
            return bad(
                "server.min_clients / max_message_mib / max_connections / max_push_mib_in_flight / max_task_mib_in_flight / flow_window_kib",
                "must be at least 1".into(),
            );
        }
        if self.data.num_clients == 0 {
            return bad("data.num_clients", "must be at least 1".into());
        }
        if self.data.train_limit == Some(0) || self.data.test_limit == Some(0) {
            return bad(
                "data.train_limit/test_limit",
                "must be at least 1 when set".into(),
            );
        }
        if !(0.0..0.9).contains(&self.data.holdout) {
            return bad(
                "data.holdout",
                format!("must be in [0, 0.9), got {}", self.data.holdout),
            );
        }
        let t = &self.training;
        if t.epochs == 0 || t.batch_size == 0 {
            return bad(
                "training",
                "epochs and batch_size must be at least 1".into(),
            );
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return bad(
                "training.lr",
                format!("must be a positive number, got {}", t.lr),
            );
        }
        if !(0.0..1.0).contains(&t.momentum) {
            return bad(
                "training.momentum",
                format!("must be in [0, 1), got {}", t.momentum),
            );
        }
        if t.momentum > 0.0 && t.optimizer == OptimizerKind::Adam {
            return bad(
                "training.momentum",
                "applies to sgd only; Adam has its own moments".into(),
            );
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return bad(
                "training.weight_decay",
                format!("must be non-negative, got {}", t.weight_decay),
            );
        }
        let s = &self.sampling;
        match (s.clients_per_round, s.fraction) {
            (Some(_), Some(_)) => {
                return bad(
                    "sampling",
                    "takes `clients_per_round` or `fraction`, not both".into(),
                );
            }
            (None, None) => {
                return bad("sampling", "needs `clients_per_round` or `fraction`".into());
            }
            (Some(0), _) => return bad("sampling.clients_per_round", "must be at least 1".into()),
            (Some(k), _) if k > self.data.num_clients => {
                return bad(
                    "sampling.clients_per_round",
                    format!(
                        "is {k} but there are only {} clients",
                        self.data.num_clients
                    ),
                );
            }
            (_, Some(f)) if !(f > 0.0 && f <= 1.0) => {
                return bad("sampling.fraction", format!("must be in (0, 1], got {f}"));
            }
            _ => {}
        }
        if s.min_clients == 0 {
            return bad("sampling.min_clients", "must be at least 1".into());
        }
        if self.evaluation.every == 0 {
            return bad("evaluation.every", "must be at least 1".into());
        }
        if self.evaluation.probe_examples == 0 {
            return bad(
                "evaluation.probe_examples",
                "must be at least 1 (the labelled images a linear probe is fitted on)".into(),
            );
        }
        if self.evaluation.per_client && self.data.holdout == 0.0 {
            return bad(
                "evaluation.per_client",
                "needs `data.holdout` > 0 (held-out local data)".into(),
            );
        }
        if !self.fleet.tiers.is_empty() && self.fleet.csv.is_some() {
            return bad("fleet", "takes `tiers` or `csv`, not both".into());
        }
        if let Some(d) = self.fleet.deadline_s
            && !(d.is_finite() && d > 0.0)
        {
            return bad(
                "fleet.deadline_s",
                format!("must be a positive number of seconds, got {d}"),
            );
        }
        if let Some(c) = self.fleet.held_cache_mib
            && !(c.is_finite() && c >= 0.0)
        {
            return bad(
                "fleet.held_cache_mib",
                format!("must be a number of MiB, 0 or more (0 turns the cache off), got {c}"),
            );
        }
        let gflops = self.simulation.server_gflops;
        if !(gflops.is_finite() && gflops > 0.0) {
            return bad(
                "simulation.server_gflops",
                format!("must be a positive number of GFLOP/s, got {gflops}"),
            );
        }
        if let Some(sd) = &self.server_data {
            self.check_server_data(sd)?;
        }
        match self.method.get("name") {
            Some(toml::Value::String(_)) => Ok(()),
            _ => bad(
                "method.name",
                "is required, e.g. name = \"fedavg\" (available: fedavg, fedprox)".into(),
            ),
        }
    }

    /// The samples `[server_data]` keeps from the clients leave every client at least one.
    fn check_withheld(&self, sd: &ServerDataConfig, key: &str) -> Result<(), EngineError> {
        let size = sd.withheld();
        let ds = self.data.dataset;
        let total = self
            .data
            .train_limit
            .map_or(ds.train_len(), |l| l.min(ds.train_len()));
        let clients = self.data.num_clients;
        if size.saturating_add(clients) > total {
            return Err(EngineError::Config(format!(
                "`{key}` is {size}, but the training set has {total} samples ({ds}{}) and the {clients} clients need at least one each; choose at most {}{}",
                if self.data.train_limit.is_some() {
                    ", after data.train_limit"
                } else {
                    ""
                },
                total.saturating_sub(clients),
                if self.data.train_limit.is_some() {
                    " or raise data.train_limit"
                } else {
                    ""
                },
            )));
        }
        Ok(())
    }

    /// `[server_data]` checks that need no file: the keys each source takes, and a held-out
    /// slice that leaves every client at least one sample.
    fn check_server_data(&self, sd: &ServerDataConfig) -> Result<(), EngineError> {
        let bad = |key: &str, msg: String| Err(EngineError::Config(format!("`{key}` {msg}")));
        if sd.size == Some(0) {
            return bad("server_data.size", "must be at least 1 when set".into());
        }
        match sd.source {
            ServerDataSource::Holdout => {
                for (key, set) in [
                    ("server_data.images", sd.images.is_some()),
                    ("server_data.labels", sd.labels.is_some()),
                ] {
                    if set {
                        return bad(
                            key,
                            "applies to source = \"idx\" only; a holdout comes from the training set (remove the key, or set source = \"idx\")".into(),
                        );
                    }
                }
                if sd.size.is_none() {
                    return bad(
                        "server_data.size",
                        "is required with source = \"holdout\": the number of training samples held out for the server, e.g. size = 6000".into(),
                    );
                }
                if sd.withhold.is_some() {
                    return bad(
                        "server_data.withhold",
                        "applies to source = \"idx\" only; a holdout already keeps `size` samples from the clients (remove the key)".into(),
                    );
                }
                self.check_withheld(sd, "server_data.size")?;
            }
            ServerDataSource::Idx => {
                if sd.withhold == Some(0) {
                    return bad("server_data.withhold", "must be at least 1 when set".into());
                }
                self.check_withheld(sd, "server_data.withhold")?;
                if sd.images.is_none() {
                    return bad(
                        "server_data.images",
                        "is required with source = \"idx\": the path of an IDX image file (e.g. written by a generator)".into(),
                    );
                }
                if sd.labels.is_none() && sd.labelled {
                    return bad(
                        "server_data.labels",
                        "is required with source = \"idx\" and labelled = true: the path of an IDX label file; or set labelled = false to give the method the images only".into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// The method name.
    pub fn method_name(&self) -> &str {
        self.method
            .get("name")
            .and_then(|v| v.as_str())
            .unwrap_or("")
    }

    /// The model spec for the configured dataset.
    pub fn model_spec(&self) -> flotilla_models::ModelSpec {
        flotilla_models::ModelSpec {
            arch: self.model.arch.clone(),
            input: self.data.dataset.input_shape(),
            classes: self.data.dataset.num_classes(),
            width: self.model.width,
            ranks: Default::default(),
        }
    }

    /// Clients to sample from `available` clients.
    pub fn clients_per_round(&self, available: usize) -> usize {
        match (self.sampling.clients_per_round, self.sampling.fraction) {
            (Some(k), _) => k.min(available),
            (_, Some(f)) => {
                ((f * available as f64).ceil() as usize).clamp(1.min(available), available)
            }
            _ => available,
        }
    }
}
