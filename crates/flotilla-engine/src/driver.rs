//! The round loop shared by both drivers: sampling, planning, mask delivery, validation of
//! updates, aggregation, evaluation, metrics, checkpoints and resume.
//!
//! Where clients live is behind [`Fleet`]: the simulator's fleet trains virtual clients on
//! worker threads ([`crate::sim`]); the network fleet (crate `flotilla-net`) sends the same
//! task bytes to client processes. The same config and seed give the same rounds either way:
//! sampling draws from the clients available in a round with the simulator's random stream,
//! and replies are folded in client-id order.

use crate::EngineError;
use crate::config::Experiment;
use crate::held::{self, HeldLedger, Inventory};
use crate::local::{self, evaluate, evaluate_views};
use crate::method::{
    Assignment, ClientData, ClientInfo, EvalModel, HeldTensors, KnownMasks, MethodState, PhaseCtx,
    PhaseEnd, Readout, Reply, ServerCtx, ServerHalf, Task,
};
use crate::server_data::ServerData;
use crate::sink::{ClientRecord, Event, RoundRecord, Sink};
use flotilla_core::device::DeviceProfile;
use flotilla_core::seed::{self, Purpose};
use flotilla_core::{ParamSet, Tensor, safetensors_io};
use flotilla_data::Dataset;
use flotilla_models::{ModelSpec, View};
use rand::Rng;
use rand::seq::SliceRandom;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Name of the checkpoint folder inside a run directory.
pub const CHECKPOINT_DIR: &str = "checkpoint";

/// A task ready to send: the task and what its client already holds.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Receiving client.
    pub client: u64,
    /// Masks the client holds before this task (tensors under them travel masked).
    pub known: KnownMasks,
    /// Tensors of the task the client holds at the same fingerprint: they travel as
    /// references ([`crate::held`]).
    pub held: HeldTensors,
    /// The task.
    pub task: Task,
}

impl Prepared {
    /// The task's bytes for its client.
    pub fn encode(&self) -> Result<Vec<u8>, EngineError> {
        self.task.encode_for(&self.known, &self.held)
    }

    /// The same task for a client whose inventory says what it really holds: masks it lacks
    /// travel with the task, tensors it lacks travel in full. `None` when the inventory
    /// covers everything this task relies on (the usual case).
    pub fn reconcile(&self, inventory: &Inventory) -> Option<Prepared> {
        let lacks_mask = |name: &str| {
            let m = &self.known[name];
            inventory.masks.get(name) != Some(&m.fingerprint())
        };
        let masks_needed: Vec<String> = self
            .task
            .params
            .names()
            .filter(|n| self.known.contains_key(*n) && lacks_mask(n))
            .map(String::from)
            .collect();
        let tensors_lacking: Vec<String> = self
            .held
            .iter()
            .filter(|(n, fp)| inventory.tensors.get(*n) != Some(fp))
            .map(|(n, _)| n.clone())
            .collect();
        if masks_needed.is_empty() && tensors_lacking.is_empty() {
            return None;
        }
        let mut fixed = self.clone();
        for n in masks_needed {
            let m = fixed.known.remove(&n).expect("checked above");
            fixed.task.masks.push(m);
        }
        for n in tensors_lacking {
            fixed.held.remove(&n);
        }
        Some(fixed)
    }
}

/// Outcome of one client in one phase.
#[derive(Debug)]
pub struct ClientRun {
    /// What is recorded in clients.jsonl.
    pub record: ClientRecord,
    /// The accepted reply, if any.
    pub reply: Option<Reply>,
}

/// Checks one decoded reply against the task it answers; `Err` carries the refusal reason.
pub type ReplyCheck<'a> = dyn Fn(&Task, &Reply) -> Result<(), String> + Sync + 'a;

/// Where the clients of a run live.
pub trait Fleet {
    /// Clients that can be sampled in `round`, sorted by id. A network fleet may wait here
    /// until enough clients are connected.
    fn available(&mut self, round: u64) -> Result<Vec<u64>, EngineError>;

    /// What the server knows of client `c` (profile, number of examples).
    fn info(&self, c: u64) -> ClientInfo;

    /// Whether client `c` drops out of `round` before training (simulated dropouts), and why.
    fn drops_out(&self, _round: u64, _c: u64) -> Option<String> {
        None
    }

    /// Runs the tasks and returns one [`ClientRun`] per task, in task order, plus the wall
    /// time of the critical path (the longest any one worker or client was busy). Every reply
    /// must be judged with [`judge_reply`] (decoded, then passed through `check`) before it counts.
    fn execute(
        &mut self,
        tasks: Vec<Prepared>,
        server_masks: &KnownMasks,
        check: &ReplyCheck<'_>,
    ) -> Result<(Vec<ClientRun>, f64), EngineError>;

    /// Whether the fleet's clock is simulated: then the configured deadline applies to the
    /// simulated time of each client (a real fleet enforces it in wall time itself).
    fn simulated_clock(&self) -> bool {
        false
    }

    /// A client's held-out data for per-client evaluation, where the server can see it
    /// (only in simulation).
    fn holdout(&self, _c: u64) -> Result<Option<ClientData>, EngineError> {
        Ok(None)
    }

    /// Clients that lost their state (a restarted process) since the last call: the masks
    /// and tensors they held must be sent again.
    fn take_restarted(&mut self) -> Vec<u64> {
        Vec::new()
    }
}

/// The server side of a run, independent of where the clients live.
pub struct Driver {
    /// Set by [`Driver::inject_checkpoint_fault`].
    checkpoint_fault: Option<CheckpointStep>,
    exp: Experiment,
    run_dir: PathBuf,
    server: Box<dyn ServerHalf>,
    test: Dataset,
    mean: Vec<f32>,
    std: Vec<f32>,
    pools: Vec<rayon::ThreadPool>,
    /// Fingerprints of the masks each client holds (only clients that were sent some).
    client_masks: HashMap<u64, BTreeMap<String, u64>>,
    /// What each client holds of the tensors tasks told it to keep (only clients that hold
    /// some): fingerprints and sizes, never copies.
    client_tensors: HashMap<u64, HeldLedger>,
    server_data: Option<ServerData>,
    /// Labelled training images linear probes are fitted on ([`Driver::set_probe_data`]).
    probe_train: Option<Dataset>,
    next_round: u64,
    totals: Totals,
    /// Clients already told to the server half ([`ServerHalf::observe`]).
    observed: std::collections::HashSet<u64>,
}

/// How many times a checkpoint write is tried before the run ends with an error.
const CHECKPOINT_ATTEMPTS: u32 = 3;

/// The steps of a checkpoint write, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointStep {
    /// The round's parameter file is written; `state.json` still names the previous one.
    ParamsWritten,
    /// `state.json` names the new parameter file: the checkpoint is committed.
    Committed,
    /// Older parameter files are removed.
    Cleaned,
}

/// Reads a checkpoint's state text back into the types a restore reads it into.
fn check_resumable(text: &str) -> Result<(), String> {
    let state: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    state["round"].as_u64().ok_or("no round")?;
    serde_json::from_value::<Totals>(state["totals"].clone())
        .map_err(|e| format!("totals: {e}"))?;
    serde_json::from_value::<HashMap<u64, BTreeMap<String, u64>>>(state["client_masks"].clone())
        .map_err(|e| format!("client masks: {e}"))?;
    serde_json::from_value::<HashMap<u64, HeldLedger>>(state["client_tensors"].clone())
        .map_err(|e| format!("held tensors: {e}"))?;
    Ok(())
}

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct Totals {
    bytes_up: u64,
    bytes_down: u64,
    sim_time_s: f64,
    wall_time_s: f64,
    flops: f64,
    peak_client_memory_bytes: u64,
    best_accuracy: Option<f64>,
    last_accuracy: Option<f64>,
    last_loss: Option<f64>,
    /// Set when the evaluated models carry device counts.
    #[serde(default)]
    last_mean_device_accuracy: Option<f64>,
    /// Linear-probe test accuracy of the raw pixels and of the untrained models, measured
    /// before round 1 when a model is scored by a probe: the floors a learned representation
    /// must beat.
    #[serde(default)]
    probe_floor: Option<ProbeFloor>,
    /// Server-side FLOPs the method reported (absent in older checkpoints).
    #[serde(default)]
    server_flops: f64,
    /// Wall time of the server half's planning and aggregation (absent in older checkpoints).
    #[serde(default)]
    server_wall_s: f64,
}

/// What a linear probe reaches without training: on raw pixels, and on the models as
/// initialised (a random encoder).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct ProbeFloor {
    raw_pixels: f64,
    initial_model: f64,
}

impl Totals {
    /// The first figure that JSON cannot hold (NaN, infinity), by name.
    fn non_finite(&self) -> Option<&'static str> {
        let figures = [
            ("sim_time_s", Some(self.sim_time_s)),
            ("wall_time_s", Some(self.wall_time_s)),
            ("flops", Some(self.flops)),
            ("server_flops", Some(self.server_flops)),
            ("server_wall_s", Some(self.server_wall_s)),
            ("best_accuracy", self.best_accuracy),
            ("last_accuracy", self.last_accuracy),
            ("last_loss", self.last_loss),
            ("last_mean_device_accuracy", self.last_mean_device_accuracy),
            (
                "probe_floor.raw_pixels",
                self.probe_floor.as_ref().map(|f| f.raw_pixels),
            ),
            (
                "probe_floor.initial_model",
                self.probe_floor.as_ref().map(|f| f.initial_model),
            ),
        ];
        figures
            .into_iter()
            .find(|(_, v)| v.is_some_and(|v| !v.is_finite()))
            .map(|(name, _)| name)
    }
}

impl Driver {
    /// A driver for `exp` evaluating on `test`, writing checkpoints under `run_dir`.
    /// `workers` threads evaluate in parallel (results do not depend on it).
    pub fn new(
        exp: Experiment,
        test: Dataset,
        server: Box<dyn ServerHalf>,
        run_dir: &Path,
        workers: usize,
    ) -> Result<Self, EngineError> {
        let (mean, std) = exp.data.dataset.normalization();
        let pools = (0..workers.max(1))
            .map(|i| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .thread_name(move |_| format!("flotilla-eval-{i}"))
                    .build()
                    .map_err(|e| EngineError::Io(format!("cannot start worker threads: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            checkpoint_fault: None,
            exp,
            run_dir: run_dir.to_path_buf(),
            server,
            test,
            mean,
            std,
            pools,
            client_masks: HashMap::new(),
            client_tensors: HashMap::new(),
            server_data: None,
            probe_train: None,
            next_round: 1,
            totals: Totals::default(),
            observed: std::collections::HashSet::new(),
        })
    }

    /// The experiment.
    pub fn experiment(&self) -> &Experiment {
        &self.exp
    }

    /// The server half (for final models).
    pub fn server(&self) -> &dyn ServerHalf {
        self.server.as_ref()
    }

    /// The first round the next call of [`Driver::run`] will run.
    pub fn next_round(&self) -> u64 {
        self.next_round
    }

    /// Gives the server half data of its own (a proxy or synthetic set) for server-side
    /// training during aggregation; it must be disjoint from the clients' data. A plain
    /// [`ClientData`] is labelled; [`ServerData::from_config`] reads `[server_data]`.
    pub fn set_server_data(&mut self, data: impl Into<ServerData>) {
        self.server_data = Some(data.into());
    }

    /// Gives the driver the training set linear probes draw their labelled images from (a
    /// fixed sample of `[evaluation] probe_examples`, from the run seed). Needed only when a
    /// model is scored by a probe ([`Readout::LinearProbe`]), and kept only then; the labels
    /// are used for evaluation only.
    pub fn set_probe_data(&mut self, train: &Dataset) -> Result<(), EngineError> {
        let probed = self
            .server
            .eval_models()
            .iter()
            .any(|m| m.readout == Readout::LinearProbe);
        if !probed {
            return Ok(());
        }
        let n = self.exp.evaluation.probe_examples.min(train.len());
        let mut idx: Vec<usize> = (0..train.len()).collect();
        let mut rng = seed::rng(self.exp.seed, 0, 0, Purpose::Probe);
        idx.shuffle(&mut rng);
        idx.truncate(n);
        idx.sort_unstable();
        self.probe_train = Some(train.subset(&idx)?);
        Ok(())
    }

    /// Tells the server half about `clients` it has not seen yet.
    fn observe(&mut self, clients: impl Iterator<Item = ClientInfo>) {
        for info in clients {
            if self.observed.insert(info.id) {
                self.server.observe(std::slice::from_ref(&info));
            }
        }
    }

    /// Tells the server half the whole fleet, then refuses an impossible fleet: a dry-run
    /// plan must run at least one of `clients`. Clients are planned one at a time, so memory
    /// stays flat in the fleet size.
    pub fn check_fleet(
        &mut self,
        clients: impl Iterator<Item = ClientInfo> + Clone,
    ) -> Result<(), EngineError> {
        self.observe(clients.clone());
        let ctx = PhaseCtx {
            round: 1,
            phase: 0,
            seed: self.exp.seed,
        };
        let mut first_reason = None;
        for info in clients {
            match self.server.plan(&ctx, &[info])?.into_iter().next() {
                Some(Assignment::Run(_)) => return Ok(()),
                Some(Assignment::Skip(r)) => {
                    first_reason.get_or_insert(r);
                }
                None => {}
            }
        }
        Err(EngineError::Config(format!(
            "impossible fleet: no client fits any plan of method `{}` (e.g. {}); give the devices more memory in [fleet] or choose a smaller model",
            self.server.name(),
            first_reason.unwrap_or_default()
        )))
    }

    /// Restores a run from its checkpoint; the next [`Driver::run`] continues after it.
    pub fn restore_checkpoint(&mut self) -> Result<u64, EngineError> {
        let dir = self.run_dir.join(CHECKPOINT_DIR);
        let state_path = dir.join("state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| {
            EngineError::Io(format!(
                "{}: {e}; is this a run directory with a checkpoint?",
                state_path.display()
            ))
        })?;
        let state: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            EngineError::Io(format!(
                "{}: corrupt checkpoint ({e})",
                state_path.display()
            ))
        })?;
        let round = state["round"]
            .as_u64()
            .ok_or_else(|| EngineError::Io(format!("{}: no round", state_path.display())))?;
        let totals: Totals = serde_json::from_value(state["totals"].clone())
            .map_err(|e| EngineError::Io(e.to_string()))?;
        // Which masks each client holds decides what travels next; absent in old checkpoints.
        self.client_masks =
            serde_json::from_value(state["client_masks"].clone()).unwrap_or_default();
        self.client_tensors =
            serde_json::from_value(state["client_tensors"].clone()).unwrap_or_default();
        // Older checkpoints have one unversioned parameter file.
        let params_file = state["params"].as_str().unwrap_or("params.safetensors");
        if params_file.contains(['/', '\\']) {
            return Err(EngineError::Io(format!(
                "{}: `params` must name a file in the checkpoint folder, got {params_file:?}",
                state_path.display()
            )));
        }
        let (all, _) = safetensors_io::load(&dir.join(params_file))?;
        let mut params: BTreeMap<String, ParamSet> = BTreeMap::new();
        for t in all.into_tensors() {
            let (set, name) = t
                .name
                .split_once('/')
                .ok_or_else(|| EngineError::Io("checkpoint tensor without a set name".into()))?;
            let (set, name) = (set.to_string(), name.to_string());
            params.entry(set).or_default().push(Tensor { name, ..t })?;
        }
        self.server.restore(MethodState {
            params,
            json: state["method"].clone(),
        })?;
        self.totals = totals;
        self.next_round = round + 1;
        Ok(round)
    }

    /// Writes the checkpoint of a completed round as one atomic commit: the parameters go to
    /// a new file named after the round (`params-<round>.safetensors`), then `state.json`,
    /// which names that file, replaces the previous one by a single rename, and only then are
    /// older parameter files removed. A crash at any point leaves a `state.json` that names a
    /// complete parameter file of the same round. Before the commit the state is read back
    /// into its types, so a checkpoint that could not be resumed is never written.
    pub fn write_checkpoint(&self, round: u64) -> Result<(), EngineError> {
        self.write_checkpoint_steps(round, CheckpointStep::Cleaned)
    }

    /// [`Driver::write_checkpoint`] stopped after `last`, as a crash there would leave it.
    fn write_checkpoint_steps(&self, round: u64, last: CheckpointStep) -> Result<(), EngineError> {
        let dir = self.run_dir.join(CHECKPOINT_DIR);
        std::fs::create_dir_all(&dir)
            .map_err(|e| EngineError::Io(format!("{}: {e}", dir.display())))?;
        let snap = self.server.snapshot();
        let mut all = ParamSet::new();
        for (set, p) in &snap.params {
            for t in p.iter() {
                all.push(Tensor {
                    name: format!("{set}/{}", t.name),
                    ..t.clone()
                })?;
            }
        }
        if let Some(field) = self.totals.non_finite() {
            return Err(EngineError::Method(format!(
                "the run's total `{field}` is not a finite number after round {round}; the checkpoint was not written"
            )));
        }
        let params_file = format!("params-{round:06}.safetensors");
        let state = serde_json::json!({ "round": round, "params": params_file, "method": snap.json, "totals": self.totals, "client_masks": self.client_masks, "client_tensors": self.client_tensors });
        let text = state.to_string();
        check_resumable(&text).map_err(|e| {
            EngineError::Method(format!(
                "the checkpoint of round {round} could not be resumed ({e}); it was not written"
            ))
        })?;
        safetensors_io::save(&dir.join(&params_file), &all, None)?;
        if last == CheckpointStep::ParamsWritten {
            return Ok(());
        }
        safetensors_io::write_atomic(&dir.join("state.json"), text.as_bytes())?;
        if last == CheckpointStep::Committed {
            return Ok(());
        }
        // Older parameter files (and the unversioned one of older runs) are no longer named.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".safetensors")
                    && name.starts_with("params")
                    && name != params_file
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    /// Makes the next checkpoint write stop after `step`, as if the process died there, and
    /// the run end with an error: for tests of crash consistency.
    pub fn inject_checkpoint_fault(&mut self, step: CheckpointStep) {
        self.checkpoint_fault = Some(step);
    }

    /// Writes a checkpoint, retrying a failed write twice (a full disk or a transient error
    /// may clear); the last failure ends the run with an error that says so.
    fn checkpoint(&mut self, round: u64) -> Result<(), EngineError> {
        if let Some(step) = self.checkpoint_fault.take() {
            self.write_checkpoint_steps(round, step)?;
            return Err(EngineError::Io(format!(
                "checkpoint of round {round} interrupted after {step:?} (injected fault)"
            )));
        }
        let mut attempt = 1;
        loop {
            match self.write_checkpoint(round) {
                Ok(()) => return Ok(()),
                Err(e) if attempt < CHECKPOINT_ATTEMPTS => {
                    tracing::warn!(round, attempt, error = %e, "checkpoint write failed; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(500 * attempt as u64));
                    attempt += 1;
                }
                Err(e) => {
                    return Err(EngineError::Io(format!(
                        "checkpoint of round {round} failed {CHECKPOINT_ATTEMPTS} times, last: {e}"
                    )));
                }
            }
        }
    }

    /// Runs the remaining rounds on `fleet`, reporting to `sinks`, and returns the summary.
    /// `checkpoint_every` = 0 checkpoints only after the last round.
    pub fn run(
        &mut self,
        fleet: &mut dyn Fleet,
        sinks: &mut [&mut dyn Sink],
        checkpoint_every: u64,
    ) -> Result<serde_json::Value, EngineError> {
        let rounds = self.exp.rounds;
        if self.next_round == 1 {
            self.measure_probe_floor()?;
        }
        emit(
            sinks,
            &Event::Started {
                first_round: self.next_round,
                rounds,
            },
        )?;
        while self.next_round <= rounds {
            let round = self.next_round;
            let (record, clients) = self.run_round(round, fleet)?;
            emit(
                sinks,
                &Event::Round {
                    round: &record,
                    clients: &clients,
                },
            )?;
            self.next_round += 1;
            if round == rounds || (checkpoint_every > 0 && round.is_multiple_of(checkpoint_every)) {
                self.checkpoint(round)?;
                emit(sinks, &Event::Checkpoint { round })?;
            }
        }
        let summary = self.summary();
        emit(sinks, &Event::Finished { summary: &summary })?;
        Ok(summary)
    }

    /// The figures of summary.json.
    pub fn summary(&self) -> serde_json::Value {
        let t = &self.totals;
        let params = self
            .server
            .eval_models()
            .first()
            .map(|m| m.params.numel())
            .unwrap_or(0);
        serde_json::json!({
            "method": self.server.name(),
            "rounds": self.exp.rounds,
            "seed": self.exp.seed,
            "num_clients": self.exp.data.num_clients,
            "model_parameters": params,
            "final_test_accuracy": t.last_accuracy,
            "best_test_accuracy": t.best_accuracy,
            "final_mean_device_accuracy": t.last_mean_device_accuracy,
            "final_test_loss": t.last_loss,
            "probe_floor": t.probe_floor,
            "total_bytes_up": t.bytes_up,
            "total_bytes_down": t.bytes_down,
            "total_flops": t.flops,
            "total_server_flops": t.server_flops,
            "server_wall_s": t.server_wall_s,
            "peak_client_memory_bytes": t.peak_client_memory_bytes,
            "sim_time_s": t.sim_time_s,
            "wall_time_s": t.wall_time_s,
            "peak_rss_bytes": peak_rss_bytes(),
        })
    }

    /// The clients of `round`: a uniform sample of the available ones, from the run's
    /// sampling stream, sorted by id.
    fn sample(&self, round: u64, mut available: Vec<u64>) -> Vec<u64> {
        let k = self.exp.clients_per_round(available.len());
        let mut rng = seed::rng(self.exp.seed, round, 0, Purpose::Sampling);
        // Partial Fisher-Yates: the first k entries are a uniform sample.
        for i in 0..k {
            let j = rng.random_range(i..available.len());
            available.swap(i, j);
        }
        let mut chosen = available[..k].to_vec();
        chosen.sort_unstable();
        chosen
    }

    /// Attaches to each task the server masks its client lacks (by fingerprint), finds the
    /// tensors it already holds, and records what the client holds after the task.
    fn prepare(&mut self, tasks: Vec<Task>, server_masks: &KnownMasks) -> Vec<Prepared> {
        let fingerprints: BTreeMap<&str, u64> = server_masks
            .iter()
            .map(|(n, m)| (n.as_str(), m.fingerprint()))
            .collect();
        let cap = held::cache_bytes(self.exp.fleet.held_cache_mib());
        let mut prepared = Vec::with_capacity(tasks.len());
        for mut t in tasks {
            // A server mask travels with a task only to a client that lacks its current
            // version, and only for a tensor the task sends.
            let held = self.client_masks.entry(t.client).or_default();
            for (name, fp) in &fingerprints {
                let sends_tensor = t.params.get(name).is_some();
                let already_attached = t.masks.iter().any(|m| m.name == *name);
                if sends_tensor && !already_attached && held.get(*name) != Some(fp) {
                    t.masks.push(server_masks[*name].clone());
                }
            }
            for m in &t.masks {
                held.insert(m.name.clone(), m.fingerprint());
            }
            if held.is_empty() {
                self.client_masks.remove(&t.client);
            }
            // Tensors to keep, in task order, exactly as the client's cache will see them:
            // a tensor it holds at this fingerprint travels as a reference.
            let ledger = self.client_tensors.entry(t.client).or_default();
            let mut by_reference = HeldTensors::new();
            for tensor in t.params.iter().filter(|x| t.hold.contains(&x.name)) {
                let fp = flotilla_core::wire::fingerprint(tensor);
                if ledger.holds(&tensor.name, fp) {
                    by_reference.insert(tensor.name.clone(), fp);
                }
                ledger.record(&tensor.name, fp, 4 * tensor.numel() as u64, cap);
            }
            if ledger.is_empty() {
                self.client_tensors.remove(&t.client);
            }
            // What the client holds before this task: the current masks minus those attached
            // now (the client already had the same content for the rest).
            let mut known = server_masks.clone();
            for m in &t.masks {
                known.remove(&m.name);
            }
            prepared.push(Prepared {
                client: t.client,
                known,
                held: by_reference,
                task: t,
            });
        }
        prepared
    }

    fn run_round(
        &mut self,
        round: u64,
        fleet: &mut dyn Fleet,
    ) -> Result<(RoundRecord, Vec<ClientRecord>), EngineError> {
        let started = Instant::now();
        for c in fleet.take_restarted() {
            self.client_masks.remove(&c);
            self.client_tensors.remove(&c);
        }
        let available = fleet.available(round)?;
        if available.iter().any(|c| !self.observed.contains(c)) {
            let fresh: Vec<ClientInfo> = available
                .iter()
                .filter(|c| !self.observed.contains(c))
                .map(|&c| fleet.info(c))
                .collect();
            self.observe(fresh.into_iter());
        }
        let selected = self.sample(round, available);
        let mut records: BTreeMap<u64, ClientRecord> = BTreeMap::new();
        let mut active = Vec::new();
        for &c in &selected {
            let mut rec = blank_record(round, c, &fleet.info(c).profile);
            if let Some(reason) = fleet.drops_out(round, c) {
                rec.status = "dropped".into();
                tracing::debug!(round, client = c, %reason, "dropped out");
                rec.reason = Some(reason);
            } else {
                active.push(c);
            }
            records.insert(c, rec);
        }
        let mut phase = 0u32;
        let mut round_sim = 0.0f64;
        let mut train_wall = 0.0f64;
        // The server half's own work: wall time of its plan and aggregate calls, and the
        // FLOPs it reports through ServerCtx.
        let mut server_wall = 0.0f64;
        let mut server_flops = 0.0f64;
        loop {
            let ctx = PhaseCtx {
                round,
                phase,
                seed: self.exp.seed,
            };
            let infos: Vec<ClientInfo> = active.iter().map(|&c| fleet.info(c)).collect();
            let plan_started = Instant::now();
            let plan = self.server.plan(&ctx, &infos)?;
            server_wall += plan_started.elapsed().as_secs_f64();
            let mut tasks = Vec::new();
            for (info, a) in infos.iter().zip(plan) {
                match a {
                    Assignment::Run(t) => {
                        // What the server decided for this client (e.g. a depth-dropout
                        // draw), recorded in its clients.jsonl line.
                        if let Some(record) = t.options.get("record").and_then(|r| r.as_object()) {
                            let r = records.get_mut(&info.id).expect("selected");
                            r.extra.extend(record.clone());
                        }
                        tasks.push(*t)
                    }
                    Assignment::Skip(reason) => {
                        tracing::info!(round, client = info.id, %reason, "client skipped");
                        let r = records.get_mut(&info.id).expect("selected");
                        r.status = "skipped".into();
                        r.reason = Some(reason);
                    }
                }
            }
            let server_masks = self.server.masks();
            let prepared = self.prepare(tasks, &server_masks);
            let declared: HashMap<u64, u64> = infos
                .iter()
                .map(|i| (i.id, i.num_examples as u64))
                .collect();
            let server = &*self.server;
            let check = |task: &Task, reply: &Reply| -> Result<(), String> {
                check_reply(task, reply, declared.get(&task.client).copied())?;
                server.check_reply(task, reply)
            };
            let (runs, critical_path) = fleet.execute(prepared, &server_masks, &check)?;
            train_wall += critical_path;
            let simulated = fleet.simulated_clock();
            let mut replies = Vec::new();
            for run in runs {
                let c = run.record.client;
                let r = records.get_mut(&c).expect("selected");
                merge_record(r, &run.record);
                if let Some(reply) = run.reply {
                    if let Some(deadline) = self.exp.fleet.deadline_s
                        && simulated
                        && r.sim_time_s > deadline
                    {
                        r.status = "straggler".into();
                        r.reason = Some(format!(
                            "took {:.1} s of simulated time, over the {deadline} s deadline",
                            r.sim_time_s
                        ));
                        continue;
                    }
                    replies.push(reply);
                }
            }
            replies.sort_by_key(|r| r.client);
            for r in &replies {
                round_sim = round_sim.max(records[&r.client].sim_time_s);
            }
            if let Some(deadline) = self.exp.fleet.deadline_s
                && records.values().any(|r| r.status == "straggler")
            {
                round_sim = round_sim.max(deadline);
            }
            if replies.len() < self.exp.sampling.min_clients {
                tracing::warn!(
                    round,
                    phase,
                    replies = replies.len(),
                    min = self.exp.sampling.min_clients,
                    "too few clients completed; the round is not aggregated"
                );
                break;
            }
            let mut server_ctx = ServerCtx::new(
                self.server_data.as_ref().map(|d| &d.data),
                self.server_data.as_ref().is_some_and(|d| d.labelled),
            );
            let aggregate_started = Instant::now();
            let end = self.server.aggregate(&ctx, &replies, &mut server_ctx)?;
            server_wall += aggregate_started.elapsed().as_secs_f64();
            let flops = server_ctx.flops();
            if !(flops.is_finite() && flops >= 0.0) {
                return Err(EngineError::Method(format!(
                    "`{}` reported {flops} server FLOPs in round {round} phase {phase}; ServerCtx::add_flops takes finite, non-negative counts",
                    self.server.name()
                )));
            }
            server_flops += flops;
            active = replies.iter().map(|r| r.client).collect();
            match end {
                PhaseEnd::RoundComplete => break,
                PhaseEnd::NextPhase => phase += 1,
            }
        }
        // The server computes after the clients' replies are in, so its time adds to the round.
        round_sim += server_flops / (self.exp.simulation.server_gflops * 1e9);
        let clients: Vec<ClientRecord> = records.into_values().collect();
        let ok_count = clients.iter().filter(|c| c.status == "ok").count();
        let train_losses: Vec<f64> = clients
            .iter()
            .filter(|c| c.status == "ok")
            .filter_map(|c| c.train_loss)
            .collect();
        let evaluate_now =
            round.is_multiple_of(self.exp.evaluation.every) || round == self.exp.rounds;
        let mut extra = self.server.round_metrics();
        let (mut acc, mut loss) = (None, None);
        let eval_started = Instant::now();
        let mut device_acc = None;
        if evaluate_now {
            let models = self.server.eval_models();
            let results = self.evaluate_models(&models)?;
            for (m, (a, _)) in models.iter().zip(&results) {
                if models.len() > 1 {
                    extra.insert(format!("test_accuracy/{}", m.label), (*a).into());
                }
            }
            // Per-device means when the models say how many devices deploy them.
            let weights: Vec<f64> = models
                .iter()
                .map(|m| m.devices.map_or(1.0, |d| d as f64))
                .collect();
            let total: f64 = weights.iter().sum();
            if total > 0.0 {
                let mean = |f: fn(&(f64, Option<f64>)) -> f64| {
                    results
                        .iter()
                        .zip(&weights)
                        .map(|(r, w)| f(r) * w)
                        .sum::<f64>()
                        / total
                };
                acc = Some(mean(|r| r.0));
                loss = results
                    .iter()
                    .all(|r| r.1.is_some())
                    .then(|| mean(|r| r.1.unwrap_or(0.0)));
                if models.iter().any(|m| m.readout == Readout::LinearProbe) {
                    extra.insert("probe_accuracy".into(), acc.into());
                }
                if models.iter().any(|m| m.devices.is_some()) {
                    extra.insert("mean_device_accuracy".into(), acc.into());
                    device_acc = acc;
                }
            }
        }
        let mut clients = clients;
        if evaluate_now
            && self.exp.evaluation.per_client
            && let Some(m) = self.server.eval_models().into_iter().next()
        {
            let mut accs = Vec::new();
            for c in clients.iter_mut().filter(|c| c.status == "ok") {
                let Some(data) = fleet.holdout(c.client)? else {
                    continue;
                };
                let (a, _) = evaluate(
                    &m.spec,
                    &m.view,
                    &m.params,
                    &data.holdout,
                    &self.mean,
                    &self.std,
                )?;
                c.extra.insert("holdout_accuracy".into(), a.into());
                accs.push(a);
            }
            if !accs.is_empty() {
                let mean = accs.iter().sum::<f64>() / accs.len() as f64;
                let var = accs.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / accs.len() as f64;
                extra.insert("client_accuracy_mean".into(), mean.into());
                extra.insert("client_accuracy_std".into(), var.sqrt().into());
            }
        }
        let eval_wall = eval_started.elapsed().as_secs_f64();
        let wall = started.elapsed().as_secs_f64();
        // Time outside local training and evaluation: planning, encoding, decoding,
        // aggregation, bookkeeping (the figure the W2 overhead benchmark reports).
        extra.insert("train_wall_s".into(), train_wall.into());
        extra.insert("eval_wall_s".into(), eval_wall.into());
        extra.insert(
            "overhead_s".into(),
            (wall - train_wall - eval_wall).max(0.0).into(),
        );
        let record = RoundRecord {
            round,
            test_accuracy: acc,
            test_loss: loss,
            train_loss: (!train_losses.is_empty())
                .then(|| train_losses.iter().sum::<f64>() / train_losses.len() as f64),
            clients: ok_count as u64,
            bytes_up: clients.iter().map(|c| c.bytes_up).sum(),
            bytes_down: clients.iter().map(|c| c.bytes_down).sum(),
            sim_time_s: round_sim,
            wall_time_s: wall,
            peak_client_memory_bytes: clients
                .iter()
                .map(|c| c.peak_memory_bytes)
                .max()
                .unwrap_or(0),
            flops: clients.iter().map(|c| c.flops).sum(),
            server_flops,
            server_wall_s: server_wall,
            extra,
        };
        let t = &mut self.totals;
        t.bytes_up += record.bytes_up;
        t.bytes_down += record.bytes_down;
        t.sim_time_s += record.sim_time_s;
        t.wall_time_s += record.wall_time_s;
        t.flops += record.flops;
        t.server_flops += record.server_flops;
        t.server_wall_s += record.server_wall_s;
        t.peak_client_memory_bytes = t
            .peak_client_memory_bytes
            .max(record.peak_client_memory_bytes);
        if let Some(a) = acc {
            t.best_accuracy = Some(t.best_accuracy.map_or(a, |b| b.max(a)));
            t.last_accuracy = Some(a);
            t.last_loss = loss;
            t.last_mean_device_accuracy = device_acc;
        }
        Ok((record, clients))
    }

    /// Evaluates the models on the test set, one (accuracy, loss) each; a model scored by a
    /// linear probe has no loss. Models that share architecture and parameters and differ
    /// only in their view are evaluated together, so depth prefixes of one model share their
    /// trunk.
    fn evaluate_models(
        &self,
        models: &[EvalModel],
    ) -> Result<Vec<(f64, Option<f64>)>, EngineError> {
        let mut results = vec![(0.0, None); models.len()];
        let mut done = vec![false; models.len()];
        for i in 0..models.len() {
            if done[i] {
                continue;
            }
            if models[i].readout == Readout::LinearProbe {
                let m = &models[i];
                results[i] = (self.probe(&m.spec, &m.view, &m.params)?, None);
                done[i] = true;
                continue;
            }
            let group: Vec<usize> = (i..models.len())
                .filter(|&j| {
                    !done[j]
                        && models[j].readout == Readout::Classifier
                        && models[j].spec == models[i].spec
                        && models[j].params == models[i].params
                })
                .collect();
            let views: Vec<View> = group.iter().map(|&j| models[j].view.clone()).collect();
            let r = self.evaluate_parallel_views(
                &models[i].spec,
                &views,
                &models[i].params,
                &self.test,
            )?;
            for (&j, (a, l)) in group.iter().zip(r) {
                results[j] = (a, Some(l));
                done[j] = true;
            }
        }
        Ok(results)
    }

    /// The labelled images probes are fitted on, or an error that says how to provide them.
    fn probe_train(&self) -> Result<&Dataset, EngineError> {
        self.probe_train.as_ref().ok_or_else(|| {
            EngineError::Config(format!(
                "method `{}` scores its model with a linear probe, which needs labelled training images; this driver was given none (Driver::set_probe_data)",
                self.server.name()
            ))
        })
    }

    /// Test accuracy of a linear probe on the features of `params` under `view`, the features
    /// computed on the workers in chunks aligned to the evaluator's, so the result is
    /// identical for any number of workers.
    fn probe(&self, spec: &ModelSpec, view: &View, params: &ParamSet) -> Result<f64, EngineError> {
        let train = self.probe_train()?;
        let features = |data: &Dataset| -> Result<Vec<f32>, EngineError> {
            let parts = self.on_workers(data.len(), |a, b| {
                let idx: Vec<usize> = (a..b).collect();
                let part = data.subset(&idx)?;
                local::probe::features(spec, view, params, &part, &self.mean, &self.std)
            })?;
            Ok(parts.into_iter().flatten().collect())
        };
        let (train_f, test_f) = (features(train)?, features(&self.test)?);
        local::fit_and_score(
            (&train_f, &train.labels),
            (&test_f, &self.test.labels),
            spec.feature_dim(),
            self.test.num_classes,
            &local::ProbeConfig::default(),
        )
    }

    /// Before round 1, when a model is scored by a linear probe: the probe's test accuracy on
    /// raw pixels and on the untrained models, the floors the trained encoder must beat.
    fn measure_probe_floor(&mut self) -> Result<(), EngineError> {
        let models = self.server.eval_models();
        let Some(m) = models.iter().find(|m| m.readout == Readout::LinearProbe) else {
            return Ok(());
        };
        let train = self.probe_train()?;
        let pixels = |d: &Dataset| -> Vec<f32> { d.images.iter().map(|&p| f32::from(p)).collect() };
        let dim = train.image_size();
        let raw_pixels = local::fit_and_score(
            (&pixels(train), &train.labels),
            (&pixels(&self.test), &self.test.labels),
            dim,
            self.test.num_classes,
            &local::ProbeConfig::default(),
        )?;
        let initial_model = self.probe(&m.spec, &m.view, &m.params)?;
        tracing::info!(
            raw_pixels,
            initial_model,
            "linear-probe floors: raw pixels and the untrained model"
        );
        self.totals.probe_floor = Some(ProbeFloor {
            raw_pixels,
            initial_model,
        });
        Ok(())
    }

    /// Runs `work(start, end)` on each worker for consecutive ranges of `0..n`, aligned to the
    /// evaluator's fixed chunk, and returns the results in range order.
    fn on_workers<T: Send>(
        &self,
        n: usize,
        work: impl Fn(usize, usize) -> Result<T, EngineError> + Sync,
    ) -> Result<Vec<T>, EngineError> {
        let workers = self.pools.len().max(1);
        let chunk = crate::local::EVAL_CHUNK;
        let per = n.div_ceil(workers).div_ceil(chunk) * chunk;
        let ranges: Vec<(usize, usize)> = (0..workers)
            .map(|w| (w * per, ((w + 1) * per).min(n)))
            .filter(|(a, b)| a < b)
            .collect();
        let work = &work;
        std::thread::scope(|s| {
            let hs: Vec<_> = ranges
                .iter()
                .enumerate()
                .map(|(w, &(a, b))| s.spawn(move || self.pools[w].install(|| work(a, b))))
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(EngineError::Task("evaluation thread panicked".into()))
                    })
                })
                .collect()
        })
    }

    /// Test-set evaluation split over the workers in chunks aligned to the evaluator's fixed
    /// chunk size, so the result is identical for any number of workers.
    pub fn evaluate_parallel(
        &self,
        spec: &flotilla_models::ModelSpec,
        view: &flotilla_models::View,
        params: &ParamSet,
        data: &Dataset,
    ) -> Result<(f64, f64), EngineError> {
        Ok(self.evaluate_parallel_views(spec, std::slice::from_ref(view), params, data)?[0])
    }

    /// [`Driver::evaluate_parallel`] for several views of the same parameters.
    pub fn evaluate_parallel_views(
        &self,
        spec: &flotilla_models::ModelSpec,
        views: &[View],
        params: &ParamSet,
        data: &Dataset,
    ) -> Result<Vec<(f64, f64)>, EngineError> {
        let n = data.len();
        let results = self.on_workers(n, |a, b| {
            let idx: Vec<usize> = (a..b).collect();
            let part = data.subset(&idx)?;
            let r = evaluate_views(spec, views, params, &part, &self.mean, &self.std)?;
            Ok((r, b - a))
        })?;
        let mut sums = vec![(0.0, 0.0); views.len()];
        for (part, k) in results {
            for (s, (a, l)) in sums.iter_mut().zip(part) {
                s.0 += a * k as f64;
                s.1 += l * k as f64;
            }
        }
        Ok(sums
            .into_iter()
            .map(|(a, l)| (a / n as f64, l / n as f64))
            .collect())
    }
}

/// The checks every reply passes before it counts, whatever the method: addressed to the
/// task it answers, and an example count between 1 and what the client declared.
fn check_reply(task: &Task, reply: &Reply, declared: Option<u64>) -> Result<(), String> {
    if reply.round != task.round || reply.phase != task.phase || reply.client != task.client {
        return Err(format!(
            "reply for round {} phase {} client {} answers a task for round {} phase {} client {}",
            reply.round, reply.phase, reply.client, task.round, task.phase, task.client
        ));
    }
    if reply.num_examples == 0 {
        return Err("reply claims 0 training examples".into());
    }
    if let Some(n) = declared
        && reply.num_examples > n
    {
        return Err(format!(
            "reply claims {} training examples, the client declared {n}",
            reply.num_examples
        ));
    }
    Ok(())
}

/// Judges reply bytes as the server does for any driver: decodes them (protocol version,
/// tensor encodings, finite values), then `check`. An accepted reply fills the client's record
/// (`sim_time_s` is the profile's estimate of download + compute + upload on the device); a
/// refused one marks the client's round failed with the reason, logged, which is also
/// returned so a network client can be told.
pub fn judge_reply(
    mut rec: ClientRecord,
    bytes: &[u8],
    server_masks: &KnownMasks,
    task: &Task,
    check: &ReplyCheck<'_>,
    profile: &DeviceProfile,
) -> (ClientRun, Result<(), String>) {
    let decoded = Reply::decode(bytes, server_masks)
        .map_err(|e| e.to_string())
        .and_then(|reply| check(task, &reply).map(|()| reply));
    match decoded {
        Ok(reply) => {
            rec.num_examples = reply.num_examples;
            rec.train_loss = reply.metrics.get("train_loss").copied();
            rec.flops = reply.resources.flops;
            rec.peak_memory_bytes = reply.resources.peak_memory_bytes;
            rec.estimated_memory_bytes = reply.resources.estimated_memory_bytes;
            rec.wall_time_s = reply.resources.wall_time_s;
            rec.sim_time_s = profile.download_time_s(rec.bytes_down)
                + profile.compute_time_s(rec.flops)
                + profile.upload_time_s(rec.bytes_up);
            let run = ClientRun {
                record: rec,
                reply: Some(reply),
            };
            (run, Ok(()))
        }
        Err(reason) => {
            tracing::warn!(round = rec.round, client = rec.client, %reason, "update refused");
            rec.status = "failed".into();
            rec.reason = Some(format!("update refused: {reason}"));
            let run = ClientRun {
                record: rec,
                reply: None,
            };
            (run, Err(reason))
        }
    }
}

fn emit(sinks: &mut [&mut dyn Sink], e: &Event<'_>) -> Result<(), EngineError> {
    for s in sinks.iter_mut() {
        s.on_event(e)?;
    }
    Ok(())
}

/// A client's record before it runs: status `ok`, no figures.
pub fn blank_record(round: u64, c: u64, p: &DeviceProfile) -> ClientRecord {
    ClientRecord {
        round,
        client: c,
        tier: p.tier.clone(),
        status: "ok".into(),
        ..Default::default()
    }
}

/// Adds one phase's figures to the round's record of a client.
fn merge_record(into: &mut ClientRecord, phase: &ClientRecord) {
    into.bytes_up += phase.bytes_up;
    into.bytes_down += phase.bytes_down;
    into.flops += phase.flops;
    into.wall_time_s += phase.wall_time_s;
    into.sim_time_s += phase.sim_time_s;
    into.peak_memory_bytes = into.peak_memory_bytes.max(phase.peak_memory_bytes);
    into.estimated_memory_bytes = into
        .estimated_memory_bytes
        .max(phase.estimated_memory_bytes);
    into.num_examples = into.num_examples.max(phase.num_examples);
    if phase.train_loss.is_some() {
        into.train_loss = phase.train_loss;
    }
    if phase.status != "ok" {
        into.status = phase.status.clone();
        into.reason = phase.reason.clone();
    }
}

/// The process's peak resident set size (VmHWM from /proc/self/status), where available.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_f64() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>(),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(-0.0),
            Just(f64::MAX),
            Just(f64::MIN_POSITIVE),
        ]
    }

    proptest! {
        /// Whatever numbers the totals hold, a checkpoint is either refused before it is
        /// written or read back exactly: never written and then unloadable or altered.
        #[test]
        fn a_checkpoint_that_passes_the_check_loads_back(
            sim in any_f64(), wall in any_f64(), flops in any_f64(), server in any_f64(),
            acc in proptest::option::of(any_f64()), up in any::<u64>(), mem in any::<u64>(),
            masks in proptest::collection::hash_map(any::<u64>(), proptest::collection::btree_map("[a-z.]{1,8}", any::<u64>(), 0..3), 0..3),
        ) {
            let totals = Totals {
                bytes_up: up,
                bytes_down: up / 2,
                sim_time_s: sim,
                wall_time_s: wall,
                flops,
                peak_client_memory_bytes: mem,
                best_accuracy: acc,
                last_accuracy: acc,
                last_loss: acc,
                last_mean_device_accuracy: None,
                server_flops: server,
                server_wall_s: wall,
            };
            let text = serde_json::json!({
                "round": 3, "totals": totals, "client_masks": masks, "client_tensors": {}
            })
            .to_string();
            let finite = [sim, wall, flops, server].iter().all(|v| v.is_finite())
                && acc.is_none_or(f64::is_finite);
            // What write_checkpoint checks before it writes anything.
            let written = totals.non_finite().is_none() && check_resumable(&text).is_ok();
            prop_assert_eq!(written, finite);
            if written {
                let state: serde_json::Value = serde_json::from_str(&text).unwrap();
                let back: Totals = serde_json::from_value(state["totals"].clone()).unwrap();
                prop_assert_eq!(back.flops.to_bits(), flops.to_bits());
                prop_assert_eq!(back.bytes_up, up);
            }
        }
    }
}
