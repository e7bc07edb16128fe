//! The sections of an experiment config, one type each, with their defaults.

use super::*;

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

pub(super) fn one() -> f64 {
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

pub(super) fn one_usize() -> usize {
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

pub(super) fn default_probe_examples() -> usize {
    10_000
}

pub(super) fn one_u64() -> u64 {
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

pub(super) fn five() -> u64 {
    5
}

pub(super) fn server_gflops() -> f64 {
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
    /// Bytes of updates the server buffers at once, MiB, from admission until their verdict;
    /// further pushes wait for room (a single larger push is admitted alone).
    #[serde(default = "max_push_mib_in_flight")]
    pub max_push_mib_in_flight: usize,
    /// Bytes of tasks the server holds encoded at once, MiB: a task is encoded when its
    /// client pulls it, and further pulls wait for room until it has been sent (a single
    /// larger task is sent alone).
    #[serde(default = "max_task_mib_in_flight")]
    pub max_task_mib_in_flight: usize,
    /// HTTP/2 flow-control window per connection and stream, KiB: how much of an update a
    /// client may send before the server reads it, so the most a client waiting for
    /// admission makes the server buffer. Upload speed per client is at most about this
    /// window per round-trip time: raise it for fast clients on long links.
    #[serde(default = "flow_window_kib")]
    pub flow_window_kib: usize,
    /// Most connections open at once; further peers wait until one closes.
    #[serde(default = "max_connections")]
    pub max_connections: usize,
    /// A connection whose peer sends nothing for this long (no TLS handshake, no call, no
    /// answer to keepalive pings) is closed, seconds.
    #[serde(default = "idle_timeout_s")]
    pub idle_timeout_s: f64,
}

pub(super) fn max_push_mib_in_flight() -> usize {
    64
}

pub(super) fn flow_window_kib() -> usize {
    64
}

pub(super) fn max_task_mib_in_flight() -> usize {
    64
}

pub(super) fn max_connections() -> usize {
    512
}

pub(super) fn idle_timeout_s() -> f64 {
    60.0
}

pub(super) fn ten_minutes() -> f64 {
    600.0
}

pub(super) fn two() -> f64 {
    2.0
}

pub(super) fn fifteen() -> f64 {
    15.0
}

pub(super) fn max_message_mib() -> usize {
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
            max_task_mib_in_flight: max_task_mib_in_flight(),
            flow_window_kib: flow_window_kib(),
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
    /// IDX: also keep this many training samples from the clients, the very slice `source =
    /// "holdout"` with `size = withhold` would hold out: the images a generator was fitted on
    /// (`flotilla generate`), so that the clients' data stays disjoint from what the server's
    /// images came from, and equal to the holdout run's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withhold: Option<usize>,
}

impl ServerDataConfig {
    /// Training samples kept from the clients: `size` for a holdout, `withhold` for IDX files.
    pub fn withheld(&self) -> usize {
        match self.source {
            ServerDataSource::Holdout => self.size.unwrap_or(0),
            ServerDataSource::Idx => self.withhold.unwrap_or(0),
        }
    }
}

pub(super) fn yes() -> bool {
    true
}
