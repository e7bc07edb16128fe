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
/// non-zero value here used to turn any method into FedProx without saying so.
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

/// Dataset, location and partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Dataset.
    pub dataset: DatasetKind,
    /// Folder of the dataset files (else `--data-dir`, `FLOTILLA_DATA`, the Debian path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Number of clients.
    pub num_clients: usize,
    /// How the training set is split among clients.
    pub partition: PartitionSpec,
    /// Use only the first N training samples (quick experiments, tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_limit: Option<usize>,
    /// Use only the first N test samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_limit: Option<usize>,
    /// Fraction of each client's data held out for per-client evaluation.
    #[serde(default)]
    pub holdout: f64,
}

/// Architecture and width; the dataset fixes input shape and classes. Written flat in TOML
/// (`arch = "resnet"`, `blocks_per_stage = 3`, `width = 0.5`); unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "toml::Table", into = "toml::Table")]
pub struct ModelConfig {
    /// Architecture.
    pub arch: Architecture,
    /// Width multiplier.
    pub width: f64,
}

impl TryFrom<toml::Table> for ModelConfig {
    type Error = String;

    fn try_from(mut t: toml::Table) -> Result<Self, String> {
        let width = match t.remove("width") {
            None => one(),
            Some(toml::Value::Float(f)) => f,
            Some(toml::Value::Integer(i)) => i as f64,
            Some(other) => return Err(format!("`model.width` must be a number, got {other}")),
        };
        let arch = toml::Value::Table(t)
            .try_into::<Architecture>()
            .map_err(|e| format!("[model]: {}", e.message()))?;
        Ok(Self { arch, width })
    }
}

impl From<ModelConfig> for toml::Table {
    fn from(m: ModelConfig) -> toml::Table {
        let mut t = match toml::Value::try_from(&m.arch) {
            Ok(toml::Value::Table(t)) => t,
            _ => toml::Table::new(),
        };
        t.insert("width".into(), toml::Value::Float(m.width));
        t
    }
}

fn one() -> f64 {
    1.0
}

/// How many clients take part in a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingConfig {
    /// Clients per round (exclusive with `fraction`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients_per_round: Option<usize>,
    /// Fraction of available clients per round (exclusive with `clients_per_round`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    /// Fewest clients that must complete a round for it to be aggregated.
    #[serde(default = "one_usize")]
    pub min_clients: usize,
}

fn one_usize() -> usize {
    1
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            clients_per_round: None,
            fraction: Some(0.1),
            min_clients: 1,
        }
    }
}

/// Server-side evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationConfig {
    /// Evaluate the global model(s) every K rounds (and always after the last).
    #[serde(default = "one_u64")]
    pub every: u64,
    /// Also evaluate the global model on each participating client's held-out data.
    #[serde(default)]
    pub per_client: bool,
    /// Labelled training images the linear probe is fitted on, for models scored by a probe
    /// (self-supervised encoders): a fixed, seeded sample of the training set. Evaluation
    /// only: no client trains on these labels.
    #[serde(default = "default_probe_examples")]
    pub probe_examples: usize,
}

fn default_probe_examples() -> usize {
    10_000
}

fn one_u64() -> u64 {
    1
}

impl Default for EvaluationConfig {
    fn default() -> Self {
        Self {
            every: 1,
            per_client: false,
            probe_examples: default_probe_examples(),
        }
    }
}

/// The fleet: tiers with shares, or a CSV of per-client profiles; none = unlimited devices.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Tiers with shares.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<TierSpec>,
    /// CSV of per-client profiles (see `flotilla_core::device::load_fleet_csv`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csv: Option<PathBuf>,
    /// Per-round deadline in simulated seconds: later clients are stragglers, dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_s: Option<f64>,
    /// MiB of tensors each client keeps between tasks so that they need not travel again
    /// (tensors a method marks to hold: frozen blocks, a shared basis); least recently used
    /// go first. 0 turns it off: everything travels every time. Default 256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_cache_mib: Option<f64>,
}

impl FleetConfig {
    /// `held_cache_mib` or its default.
    pub fn held_cache_mib(&self) -> f64 {
        self.held_cache_mib
            .unwrap_or(crate::held::DEFAULT_CACHE_MIB)
    }
}

/// Simulator settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulationConfig {
    /// Clients trained in parallel (0 = number of cores). Results do not depend on it.
    #[serde(default)]
    pub workers: usize,
    /// Checkpoint every N rounds (0 = only at the end).
    #[serde(default = "five")]
    pub checkpoint_every: u64,
    /// Speed of the server's own computation in GFLOP/s (like `fleet.tiers[].gflops`): the
    /// FLOPs a method reports for its server-side work (`ServerCtx::add_flops`) add
    /// FLOPs / speed to the round's simulated time. The default, 1000 (1 TFLOP/s), is ten
    /// times an unlimited client device, about a multi-core server CPU or a small GPU.
    #[serde(default = "server_gflops")]
    pub server_gflops: f64,
}

fn five() -> u64 {
    5
}

fn server_gflops() -> f64 {
    1000.0
}

impl Default for SimulationConfig {
    fn default() -> Self {
        Self {
            workers: 0,
            checkpoint_every: 5,
            server_gflops: server_gflops(),
        }
    }
}

/// Network server settings: when a round starts, how long it may take, liveness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Connected clients needed before a round starts.
    #[serde(default = "one_usize")]
    pub min_clients: usize,
    /// Longest wait for `min_clients`, seconds; then the server stops with an error.
    #[serde(default = "ten_minutes")]
    pub wait_s: f64,
    /// Per-round deadline in wall seconds: clients not done by then are stragglers, dropped
    /// from the round.
    #[serde(default = "ten_minutes")]
    pub deadline_s: f64,
    /// Seconds between a training client's heartbeats.
    #[serde(default = "two")]
    pub heartbeat_s: f64,
    /// A client silent this long (no call, no heartbeat) is gone: its task fails at once and
    /// it is not sampled until it joins again.
    #[serde(default = "fifteen")]
    pub liveness_s: f64,
    /// Largest message accepted, MiB (gRPC's default of 4 MiB is too small for models).
    #[serde(default = "max_message_mib")]
    pub max_message_mib: usize,
    /// Most training examples a client may declare when it joins; its replies never weigh
    /// more. Unset: the size of the configured training set (what `serve` loads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_examples: Option<u64>,
    /// Bytes of updates the server buffers at once, MiB; further pushes wait for room (a
    /// single larger push is admitted alone).
    #[serde(default = "max_push_mib_in_flight")]
    pub max_push_mib_in_flight: usize,
    /// Most connections open at once; further peers wait until one closes.
    #[serde(default = "max_connections")]
    pub max_connections: usize,
    /// A connection whose peer sends nothing for this long (no TLS handshake, no call, no
    /// answer to keepalive pings) is closed, seconds.
    #[serde(default = "idle_timeout_s")]
    pub idle_timeout_s: f64,
}

fn max_push_mib_in_flight() -> usize {
    512
}

fn max_connections() -> usize {
    512
}

fn idle_timeout_s() -> f64 {
    60.0
}

fn ten_minutes() -> f64 {
    600.0
}

fn two() -> f64 {
    2.0
}

fn fifteen() -> f64 {
    15.0
}

fn max_message_mib() -> usize {
    256
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            min_clients: 1,
            wait_s: ten_minutes(),
            deadline_s: ten_minutes(),
            heartbeat_s: two(),
            liveness_s: fifteen(),
            max_message_mib: max_message_mib(),
            max_examples: None,
            max_push_mib_in_flight: max_push_mib_in_flight(),
            max_connections: max_connections(),
            idle_timeout_s: idle_timeout_s(),
        }
    }
}

/// Where the server's own data comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum ServerDataSource {
    /// `size` samples of the training set (after `data.train_limit`), drawn with the run seed
    /// and given to no client: the clients' partition covers only the rest.
    Holdout,
    /// A pair of IDX files (`images`, `labels`), e.g. written by a generator.
    Idx,
}

impl TryFrom<String> for ServerDataSource {
    type Error = String;

    // By hand so that an unknown source names its key (serde's message names only the value).
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "holdout" => Ok(Self::Holdout),
            "idx" => Ok(Self::Idx),
            _ => Err(format!(
                "`server_data.source = \"{s}\"` is not a source: use \"holdout\" (a slice of the training set no client gets) or \"idx\" (a pair of IDX files)"
            )),
        }
    }
}

/// `[server_data]`: data the server half may train on during aggregation (a proxy set for
/// distillation, FedTSA's stage 2). Relative paths start from the working directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerDataConfig {
    /// `holdout` or `idx`.
    pub source: ServerDataSource,
    /// Holdout: samples held out (required). IDX: use only the first N (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<usize>,
    /// Whether the method may read the labels. Unlabelled data reaches the method with
    /// `ServerCtx::server_data_labelled` false and every label withheld (read as 0).
    #[serde(default = "yes")]
    pub labelled: bool,
    /// IDX: image file, `[count, height, width]` or `[count, channels, height, width]` bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<PathBuf>,
    /// IDX: label file, `[count]` bytes below the dataset's class count (may be left out
    /// when `labelled = false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<PathBuf>,
}

fn yes() -> bool {
    true
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
        {
            return bad(
                "server.min_clients / max_message_mib / max_connections / max_push_mib_in_flight",
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
                let Some(size) = sd.size else {
                    return bad(
                        "server_data.size",
                        "is required with source = \"holdout\": the number of training samples held out for the server, e.g. size = 6000".into(),
                    );
                };
                let ds = self.data.dataset;
                let total = self
                    .data
                    .train_limit
                    .map_or(ds.train_len(), |l| l.min(ds.train_len()));
                let clients = self.data.num_clients;
                if size.saturating_add(clients) > total {
                    return bad(
                        "server_data.size",
                        format!(
                            "is {size}, but the training set has {total} samples ({ds}{}) and the {clients} clients need at least one each; choose at most {}{}",
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
                        ),
                    );
                }
            }
            ServerDataSource::Idx => {
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

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
rounds = 2
[data]
dataset = "fashion-mnist"
num_clients = 10
partition = { kind = "iid" }
[model]
arch = "mlp"
[training]
epochs = 1
batch_size = 10
optimizer = "sgd"
lr = 0.1
[sampling]
clients_per_round = 5
[method]
name = "fedavg"
"#;

    #[test]
    fn parses_and_checks() {
        let e = Experiment::from_toml(BASE).unwrap();
        assert_eq!(e.model_spec().input, [1, 28, 28]);
        assert_eq!(e.clients_per_round(10), 5);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Experiment::from_toml(&BASE.replace("lr = 0.1", "lr = 0.1\nlearning_rate = 3"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("learning_rate"), "{err}");
    }

    #[test]
    fn invalid_values_are_named() {
        for (from, to, key) in [
            ("lr = 0.1", "lr = -1.0", "training.lr"),
            (
                "clients_per_round = 5",
                "clients_per_round = 50",
                "sampling.clients_per_round",
            ),
            ("rounds = 2", "rounds = 0", "rounds"),
            ("name = \"fedavg\"", "nom = \"x\"", "method.name"),
        ] {
            let err = Experiment::from_toml(&BASE.replace(from, to))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        let err = Experiment::from_toml(&BASE.replace("\"fashion-mnist\"", "\"imagenet\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("imagenet") && err.contains("fashion-mnist"),
            "{err}"
        );
    }

    #[test]
    fn model_section_is_flat_and_strict() {
        let e = Experiment::from_toml(&BASE.replace(
            "arch = \"mlp\"",
            "arch = \"resnet\"\nblocks_per_stage = 3\nwidth = 0.5",
        ))
        .unwrap();
        assert_eq!(
            e.model.arch,
            Architecture::Resnet {
                blocks_per_stage: 3
            }
        );
        assert_eq!(e.model.width, 0.5);
        let err =
            Experiment::from_toml(&BASE.replace("arch = \"mlp\"", "arch = \"mlp\"\ndepth = 3"))
                .unwrap_err()
                .to_string();
        assert!(err.contains("depth"), "{err}");
        let back = Experiment::from_toml(&toml::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn server_data_parses_and_is_written_back() {
        let text =
            format!("{BASE}\n[server_data]\nsource = \"holdout\"\nsize = 6000\nlabelled = false\n");
        let e = Experiment::from_toml(&text).unwrap();
        let sd = e.server_data.as_ref().unwrap();
        assert_eq!(sd.source, ServerDataSource::Holdout);
        assert_eq!((sd.size, sd.labelled), (Some(6000), false));
        assert_eq!(e.simulation.server_gflops, 1000.0);
        // The resolved config (config.toml in the run directory) shows the section.
        let resolved = toml::to_string(&e).unwrap();
        assert!(resolved.contains("[server_data]"), "{resolved}");
        assert!(resolved.contains("server_gflops"), "{resolved}");
        assert_eq!(Experiment::from_toml(&resolved).unwrap(), e);
        // Without the section nothing is written.
        let plain = toml::to_string(&Experiment::from_toml(BASE).unwrap()).unwrap();
        assert!(!plain.contains("server_data"), "{plain}");

        let idx = format!(
            "{BASE}\n[server_data]\nsource = \"idx\"\nimages = \"gen/images.idx\"\nlabels = \"gen/labels.idx\"\n"
        );
        let e = Experiment::from_toml(&idx).unwrap();
        let sd = e.server_data.unwrap();
        assert_eq!(sd.source, ServerDataSource::Idx);
        assert!(sd.labelled);
        assert_eq!(sd.images.unwrap(), PathBuf::from("gen/images.idx"));
    }

    #[test]
    fn server_data_errors_name_the_key() {
        let sd = |body: &str| format!("{BASE}\n[server_data]\n{body}\n");
        for (text, key, hint) in [
            (
                sd("source = \"holdout\""),
                "server_data.size",
                "size = 6000",
            ),
            (
                sd("source = \"holdout\"\nsize = 59995"),
                "server_data.size",
                "at most 59990",
            ),
            (
                BASE.replace("num_clients = 10", "num_clients = 10\ntrain_limit = 500")
                    + "\n[server_data]\nsource = \"holdout\"\nsize = 500\n",
                "server_data.size",
                "data.train_limit",
            ),
            (
                sd("source = \"holdout\"\nsize = 0"),
                "server_data.size",
                "at least 1",
            ),
            (
                sd("source = \"holdout\"\nsize = 10\nimages = \"a.idx\""),
                "server_data.images",
                "source = \"idx\"",
            ),
            (
                sd("source = \"idx\""),
                "server_data.images",
                "IDX image file",
            ),
            (
                sd("source = \"idx\"\nimages = \"a.idx\""),
                "server_data.labels",
                "labelled = false",
            ),
            (
                sd("source = \"holdout\"\nsize = 10\nlabeled = true"),
                "labeled",
                "",
            ),
            (
                BASE.replace("[method]", "[simulation]\nserver_gflops = 0\n[method]"),
                "simulation.server_gflops",
                "positive",
            ),
        ] {
            let err = Experiment::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(hint), "{key}: {err}");
        }
        // An unknown source is named with the ones that exist.
        let err = Experiment::from_toml(&sd("source = \"generator\"\nsize = 10"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server_data.source")
                && err.contains("generator")
                && err.contains("holdout")
                && err.contains("idx"),
            "{err}"
        );
        // Unlabelled IDX images need no label file.
        Experiment::from_toml(&sd(
            "source = \"idx\"\nimages = \"a.idx\"\nlabelled = false",
        ))
        .unwrap();
    }

    #[test]
    fn overrides_apply() {
        let e = Experiment::with_overrides(
            BASE,
            &[
                "rounds=7".into(),
                "training.lr=0.5".into(),
                "method.name=fedprox".into(),
            ],
        )
        .unwrap();
        assert_eq!(e.rounds, 7);
        assert_eq!(e.training.lr, 0.5);
        assert_eq!(e.method_name(), "fedprox");
        assert!(Experiment::with_overrides(BASE, &["rounds".into()]).is_err());
    }
}
