//! The simulation driver: virtual clients on one machine, a virtual clock from device
//! profiles, dropouts, deadlines and availability traces, clients trained in parallel.
//!
//! Memory stays flat in the number of clients: a client is an id, a list of sample indices
//! and a profile; models exist only for the clients of the current round. Results do not
//! depend on the number of workers: every random stream derives from (seed, round, client,
//! purpose), each client trains on a single thread of its own, and replies are folded in
//! client-id order.

use crate::config::Experiment;
use crate::local::evaluate;

use crate::EngineError;
use crate::method::{
    Assignment, ClientCtx, ClientData, ClientHalf, ClientInfo, KnownMasks, MethodState, PhaseCtx,
    PhaseEnd, Reply, ServerCtx, ServerHalf, Task,
};
use crate::sink::{ClientRecord, Event, RoundRecord, Sink};
use flotilla_core::device::{self, DeviceProfile};
use flotilla_core::seed::{self, Purpose};
use flotilla_core::{ParamSet, Tensor, safetensors_io};
use flotilla_data::{Dataset, Split};
use rand::Rng;
use rand::seq::SliceRandom;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Name of the checkpoint folder inside a run directory.
pub const CHECKPOINT_DIR: &str = "checkpoint";

/// A configured simulation, ready to run.
pub struct Simulation {
    exp: Experiment,
    run_dir: PathBuf,
    server: Box<dyn ServerHalf>,
    client: Arc<dyn ClientHalf>,
    data: Split,
    parts: Vec<Vec<usize>>,
    fleet: Vec<DeviceProfile>,
    mean: Vec<f32>,
    std: Vec<f32>,
    pools: Vec<rayon::ThreadPool>,
    /// Masks each client already holds (only clients that were sent some).
    /// Fingerprints of the masks each client holds (only clients that were sent some).
    client_masks: HashMap<u64, BTreeMap<String, u64>>,
    server_data: Option<ClientData>,
    next_round: u64,
    totals: Totals,
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
}

/// Outcome of one client in one round.
struct ClientRun {
    record: ClientRecord,
    reply: Option<Reply>,
}

impl Simulation {
    /// Loads data, partitions it, builds the fleet and checks that some client fits the plan.
    pub fn new(
        exp: Experiment,
        data: Split,
        server: Box<dyn ServerHalf>,
        client: Arc<dyn ClientHalf>,
        run_dir: &Path,
    ) -> Result<Self, EngineError> {
        let mut data = data;
        if let Some(n) = exp.data.train_limit {
            data.train = data.train.take_first(n);
        }
        if let Some(n) = exp.data.test_limit {
            data.test = data.test.take_first(n);
        }
        let parts = flotilla_data::partition(
            &data.train.labels,
            data.train.num_classes,
            exp.data.num_clients,
            &exp.data.partition,
            seed::derive(exp.seed, 0, 0, Purpose::Partition),
        )?;
        let fleet = build_fleet(&exp)?;
        let (mean, std) = exp.data.dataset.normalization();
        let workers = if exp.simulation.workers == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            exp.simulation.workers
        };
        let pools = (0..workers)
            .map(|i| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .thread_name(move |_| format!("flotilla-client-{i}"))
                    .build()
                    .map_err(|e| EngineError::Io(format!("cannot start worker threads: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let sim = Self {
            exp,
            run_dir: run_dir.to_path_buf(),
            server,
            client,
            data,
            parts,
            fleet,
            mean,
            std,
            pools,
            client_masks: HashMap::new(),
            server_data: None,
            next_round: 1,
            totals: Totals::default(),
        };
        sim.check_fleet()?;
        Ok(sim)
    }

    /// Refuses an impossible fleet: a dry-run plan must run at least one client. Clients are
    /// planned one at a time and tasks dropped at once, so memory stays flat in the fleet size.
    fn check_fleet(&self) -> Result<(), EngineError> {
        let ctx = PhaseCtx {
            round: 1,
            phase: 0,
            seed: self.exp.seed,
        };
        let mut first_reason = None;
        for c in 0..self.parts.len() as u64 {
            match self.server.plan(&ctx, &[self.info(c)])?.into_iter().next() {
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

    fn info(&self, c: u64) -> ClientInfo {
        ClientInfo {
            id: c,
            profile: self.fleet[c as usize].clone(),
            num_examples: self.train_indices(c).len(),
        }
    }

    /// The client's training indices (its partition minus the held-out share).
    fn train_indices(&self, c: u64) -> Vec<usize> {
        self.split_holdout(c).0
    }

    fn split_holdout(&self, c: u64) -> (Vec<usize>, Vec<usize>) {
        let mut idx = self.parts[c as usize].clone();
        if self.exp.data.holdout <= 0.0 || idx.len() < 2 {
            return (idx, Vec::new());
        }
        idx.shuffle(&mut seed::rng(self.exp.seed, 0, c, Purpose::Partition));
        let n_hold =
            ((idx.len() as f64 * self.exp.data.holdout).round() as usize).clamp(1, idx.len() - 1);
        let hold = idx.split_off(idx.len() - n_hold);
        idx.sort_unstable();
        let mut hold = hold;
        hold.sort_unstable();
        (idx, hold)
    }

    fn client_data(&self, c: u64) -> Result<ClientData, EngineError> {
        let (train, hold) = self.split_holdout(c);
        Ok(ClientData {
            train: self.data.train.subset(&train)?,
            holdout: self.data.train.subset(&hold)?,
            mean: self.mean.clone(),
            std: self.std.clone(),
        })
    }

    /// Restores a run from its checkpoint; the next [`Simulation::run`] continues after it.
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
        let (all, _) = safetensors_io::load(&dir.join("params.safetensors"))?;
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

    fn write_checkpoint(&self, round: u64) -> Result<(), EngineError> {
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
        // Parameters first, then the state that points at them: a crash in between leaves
        // the previous state.json, which still matches a complete earlier round.
        safetensors_io::save(&dir.join("params.safetensors"), &all, None)?;
        let state = serde_json::json!({ "round": round, "method": snap.json, "totals": self.totals, "client_masks": self.client_masks });
        safetensors_io::write_atomic(&dir.join("state.json"), state.to_string().as_bytes())?;
        Ok(())
    }

    /// Gives the server half data of its own (a proxy or synthetic set) for server-side
    /// training during aggregation; it must be disjoint from the clients' data.
    pub fn set_server_data(&mut self, data: ClientData) {
        self.server_data = Some(data);
    }

    /// The server half (for final models).
    pub fn server(&self) -> &dyn ServerHalf {
        self.server.as_ref()
    }

    /// The first round the next call of [`Simulation::run`] will run.
    pub fn next_round(&self) -> u64 {
        self.next_round
    }

    /// Runs the remaining rounds, reporting to `sinks`, and returns the summary.
    pub fn run(&mut self, sinks: &mut [&mut dyn Sink]) -> Result<serde_json::Value, EngineError> {
        let rounds = self.exp.rounds;
        emit(
            sinks,
            &Event::Started {
                first_round: self.next_round,
                rounds,
            },
        )?;
        while self.next_round <= rounds {
            let round = self.next_round;
            let (record, clients) = self.run_round(round)?;
            emit(
                sinks,
                &Event::Round {
                    round: &record,
                    clients: &clients,
                },
            )?;
            self.next_round += 1;
            let every = self.exp.simulation.checkpoint_every;
            if round == rounds || (every > 0 && round.is_multiple_of(every)) {
                self.write_checkpoint(round)?;
                emit(sinks, &Event::Checkpoint { round })?;
            }
        }
        let summary = self.summary();
        emit(sinks, &Event::Finished { summary: &summary })?;
        Ok(summary)
    }

    fn summary(&self) -> serde_json::Value {
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
            "final_test_loss": t.last_loss,
            "total_bytes_up": t.bytes_up,
            "total_bytes_down": t.bytes_down,
            "total_flops": t.flops,
            "peak_client_memory_bytes": t.peak_client_memory_bytes,
            "sim_time_s": t.sim_time_s,
            "wall_time_s": t.wall_time_s,
            "peak_rss_bytes": peak_rss_bytes(),
        })
    }

    fn sample(&self, round: u64) -> Vec<u64> {
        let mut available: Vec<u64> = (0..self.parts.len() as u64)
            .filter(|&c| self.fleet[c as usize].available(round))
            .collect();
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

    fn run_round(&mut self, round: u64) -> Result<(RoundRecord, Vec<ClientRecord>), EngineError> {
        let started = Instant::now();
        let selected = self.sample(round);
        let mut records: BTreeMap<u64, ClientRecord> = BTreeMap::new();
        let mut active = Vec::new();
        for &c in &selected {
            let p = &self.fleet[c as usize];
            let dropped = p.dropout > 0.0
                && seed::rng(self.exp.seed, round, c, Purpose::Dropout).random::<f64>() < p.dropout;
            let mut rec = blank_record(round, c, p);
            if dropped {
                rec.status = "dropped".into();
                rec.reason = Some(format!("dropped out (probability {})", p.dropout));
                tracing::debug!(round, client = c, "dropped out");
                records.insert(c, rec);
            } else {
                records.insert(c, rec);
                active.push(c);
            }
        }
        let mut phase = 0u32;
        let mut round_sim = 0.0f64;
        let mut train_wall = 0.0f64;
        loop {
            let ctx = PhaseCtx {
                round,
                phase,
                seed: self.exp.seed,
            };
            let infos: Vec<ClientInfo> = active.iter().map(|&c| self.info(c)).collect();
            let plan = self.server.plan(&ctx, &infos)?;
            let mut tasks = Vec::new();
            for (info, a) in infos.iter().zip(plan) {
                match a {
                    Assignment::Run(t) => tasks.push(*t),
                    Assignment::Skip(reason) => {
                        tracing::info!(round, client = info.id, %reason, "client skipped");
                        let r = records.get_mut(&info.id).expect("selected");
                        r.status = "skipped".into();
                        r.reason = Some(reason);
                    }
                }
            }
            let (runs, critical_path) = self.execute(tasks)?;
            train_wall += critical_path;
            let mut replies = Vec::new();
            for run in runs {
                let c = run.record.client;
                let r = records.get_mut(&c).expect("selected");
                merge_record(r, &run.record);
                if let Some(reply) = run.reply {
                    if let Some(deadline) = self.exp.fleet.deadline_s
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
            let mut server_ctx = ServerCtx {
                server_data: self.server_data.as_ref(),
            };
            let end = self.server.aggregate(&ctx, &replies, &mut server_ctx)?;
            active = replies.iter().map(|r| r.client).collect();
            match end {
                PhaseEnd::RoundComplete => break,
                PhaseEnd::NextPhase => phase += 1,
            }
        }
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
        if evaluate_now {
            let models = self.server.eval_models();
            let mut accs = Vec::new();
            let mut losses = Vec::new();
            for m in &models {
                let (a, l) =
                    self.evaluate_parallel(&m.spec, &m.view, &m.params, &self.data.test)?;
                if models.len() > 1 {
                    extra.insert(format!("test_accuracy/{}", m.label), a.into());
                }
                accs.push(a);
                losses.push(l);
            }
            if !accs.is_empty() {
                acc = Some(accs.iter().sum::<f64>() / accs.len() as f64);
                loss = Some(losses.iter().sum::<f64>() / losses.len() as f64);
            }
        }
        let mut clients = clients;
        if evaluate_now
            && self.exp.evaluation.per_client
            && let Some(m) = self.server.eval_models().into_iter().next()
        {
            let mut accs = Vec::new();
            for c in clients.iter_mut().filter(|c| c.status == "ok") {
                let data = self.client_data(c.client)?;
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
            extra,
        };
        let t = &mut self.totals;
        t.bytes_up += record.bytes_up;
        t.bytes_down += record.bytes_down;
        t.sim_time_s += record.sim_time_s;
        t.wall_time_s += record.wall_time_s;
        t.flops += record.flops;
        t.peak_client_memory_bytes = t
            .peak_client_memory_bytes
            .max(record.peak_client_memory_bytes);
        if let Some(a) = acc {
            t.best_accuracy = Some(t.best_accuracy.map_or(a, |b| b.max(a)));
            t.last_accuracy = Some(a);
            t.last_loss = loss;
        }
        Ok((record, clients))
    }

    /// Runs tasks on the worker threads; each client on one thread, results in task order.
    /// Also returns the critical path: the largest total time one worker spent inside the
    /// clients' `execute`.
    fn execute(&mut self, tasks: Vec<Task>) -> Result<(Vec<ClientRun>, f64), EngineError> {
        let server_masks = self.server.masks();
        let fingerprints: BTreeMap<&str, u64> = server_masks
            .iter()
            .map(|(n, m)| (n.as_str(), mask_fingerprint(m)))
            .collect();
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
                held.insert(m.name.clone(), mask_fingerprint(m));
            }
            if held.is_empty() {
                self.client_masks.remove(&t.client);
            }
            // What the client holds before this task: the current masks minus those attached
            // now (the client already had the same content for the rest).
            let mut known = server_masks.clone();
            for m in &t.masks {
                known.remove(&m.name);
            }
            // Encoding happens on the workers, in parallel.
            prepared.push((t.client, known, t));
        }
        let workers = self.pools.len();
        let this = &*self;
        let mut results: Vec<Option<Result<ClientRun, EngineError>>> =
            (0..prepared.len()).map(|_| None).collect();
        let mut critical_path = 0.0f64;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let prepared = &prepared;
                    let server_masks = &server_masks;
                    s.spawn(move || {
                        let mut out = Vec::new();
                        let mut busy = 0.0;
                        for i in (w..prepared.len()).step_by(workers) {
                            let (c, known, task) = &prepared[i];
                            // A fresh single-thread pool per client: burn's internal parallelism
                            // stays on that thread, and every client's heap peak counts the same
                            // one-off buffers whatever ran before it, so figures do not depend on
                            // the number of workers.
                            let r = rayon::ThreadPoolBuilder::new()
                                .num_threads(1)
                                .build()
                                .map_err(|e| {
                                    EngineError::Io(format!("cannot start a client thread: {e}"))
                                })
                                .and_then(|pool| {
                                    pool.install(|| {
                                        this.run_client(*c, known.clone(), task, server_masks)
                                    })
                                });
                            if let Ok(run) = &r {
                                busy += run.record.wall_time_s;
                            }
                            out.push((i, r));
                        }
                        (out, busy)
                    })
                })
                .collect();
            for h in handles {
                match h.join() {
                    Ok((out, busy)) => {
                        critical_path = critical_path.max(busy);
                        for (i, r) in out {
                            results[i] = Some(r);
                        }
                    }
                    Err(_) => tracing::error!("a worker thread panicked"),
                }
            }
        });
        let runs = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(EngineError::Task("a worker thread panicked".into()))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((runs, critical_path))
    }

    /// One client: decode the task bytes, execute, encode the reply, decode it server-side.
    fn run_client(
        &self,
        c: u64,
        mut known: KnownMasks,
        task: &Task,
        server_masks: &KnownMasks,
    ) -> Result<ClientRun, EngineError> {
        let profile = self.fleet[c as usize].clone();
        let mut rec = blank_record(0, c, &profile);
        let task_bytes = task.encode(&known)?;
        rec.bytes_down = task_bytes.len() as u64;
        let task = Task::decode(&task_bytes, &mut known)?;
        drop(task_bytes);
        rec.round = task.round;
        let data = self.client_data(c)?;
        let ctx = ClientCtx {
            seed: self.exp.seed,
            profile: profile.clone(),
            masks: known,
        };
        let reply = match self.client.execute(&task, &data, &ctx) {
            Ok(r) => r,
            Err(EngineError::OverBudget(reason)) => {
                tracing::info!(round = task.round, client = c, %reason, "client refused its task");
                rec.status = "skipped".into();
                rec.reason = Some(reason);
                return Ok(ClientRun {
                    record: rec,
                    reply: None,
                });
            }
            Err(e) => {
                tracing::warn!(round = task.round, client = c, error = %e, "client failed");
                rec.status = "failed".into();
                rec.reason = Some(e.to_string());
                return Ok(ClientRun {
                    record: rec,
                    reply: None,
                });
            }
        };
        let reply_bytes = reply.encode(server_masks)?;
        rec.bytes_up = reply_bytes.len() as u64;
        // The server refuses an undecodable, non-finite or misaddressed update as it would
        // from the network: the client's round fails, the run goes on.
        let decoded = Reply::decode(&reply_bytes, server_masks).and_then(|r| {
            if r.round != task.round || r.phase != task.phase || r.client != c {
                Err(EngineError::Protocol(format!(
                    "client {c} replied for another task"
                )))
            } else {
                Ok(r)
            }
        });
        let reply = match decoded {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(round = task.round, client = c, error = %e, "update refused");
                rec.status = "failed".into();
                rec.reason = Some(format!("update refused: {e}"));
                return Ok(ClientRun {
                    record: rec,
                    reply: None,
                });
            }
        };
        rec.bytes_up = reply_bytes.len() as u64;
        rec.num_examples = reply.num_examples;
        rec.train_loss = reply.metrics.get("train_loss").copied();
        rec.flops = reply.resources.flops;
        rec.peak_memory_bytes = reply.resources.peak_memory_bytes;
        rec.estimated_memory_bytes = reply.resources.estimated_memory_bytes;
        rec.wall_time_s = reply.resources.wall_time_s;
        rec.sim_time_s = profile.download_time_s(rec.bytes_down)
            + profile.compute_time_s(rec.flops)
            + profile.upload_time_s(rec.bytes_up);
        Ok(ClientRun {
            record: rec,
            reply: Some(reply),
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
        let n = data.len();
        let workers = self.pools.len().max(1);
        let chunk = crate::local::EVAL_CHUNK;
        let per = n.div_ceil(workers).div_ceil(chunk) * chunk;
        let ranges: Vec<(usize, usize)> = (0..workers)
            .map(|w| (w * per, ((w + 1) * per).min(n)))
            .filter(|(a, b)| a < b)
            .collect();
        let results: Vec<Result<(f64, f64, usize), EngineError>> = std::thread::scope(|s| {
            let hs: Vec<_> = ranges
                .iter()
                .enumerate()
                .map(|(w, &(a, b))| {
                    s.spawn(move || {
                        let idx: Vec<usize> = (a..b).collect();
                        let part = data.subset(&idx)?;
                        let (acc, loss) = self.pools[w].install(|| {
                            evaluate(spec, view, params, &part, &self.mean, &self.std)
                        })?;
                        Ok((acc, loss, b - a))
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(EngineError::Task("evaluation thread panicked".into()))
                    })
                })
                .collect()
        });
        let (mut acc, mut loss) = (0.0, 0.0);
        for r in results {
            let (a, l, k) = r?;
            acc += a * k as f64;
            loss += l * k as f64;
        }
        Ok((acc / n as f64, loss / n as f64))
    }
}

fn emit(sinks: &mut [&mut dyn Sink], e: &Event<'_>) -> Result<(), EngineError> {
    for s in sinks.iter_mut() {
        s.on_event(e)?;
    }
    Ok(())
}

fn blank_record(round: u64, c: u64, p: &DeviceProfile) -> ClientRecord {
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

/// A stable fingerprint of a mask (FNV-1a over name and bits), kept per client instead of
/// the mask itself so that memory stays flat in the number of clients.
fn mask_fingerprint(m: &flotilla_core::wire::Mask) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    m.name.bytes().for_each(&mut eat);
    for chunk in m.active.chunks(8) {
        eat(chunk
            .iter()
            .enumerate()
            .fold(0u8, |acc, (i, a)| acc | (u8::from(*a) << i)));
    }
    eat(m.active.len() as u8);
    h
}

/// Profiles for every client from the config: tiers, CSV, or unlimited devices.
pub fn build_fleet(exp: &Experiment) -> Result<Vec<DeviceProfile>, EngineError> {
    let n = exp.data.num_clients;
    if let Some(csv) = &exp.fleet.csv {
        let f = device::load_fleet_csv(csv)?;
        if f.len() != n {
            return Err(EngineError::Config(format!(
                "fleet.csv {} lists {} clients but data.num_clients is {n}",
                csv.display(),
                f.len()
            )));
        }
        return Ok(f);
    }
    if exp.fleet.tiers.is_empty() {
        return Ok(vec![DeviceProfile::unlimited(); n]);
    }
    Ok(device::assign_tiers(
        &exp.fleet.tiers,
        n,
        seed::derive(exp.seed, 0, 0, Purpose::Fleet),
    )?)
}

/// The process's peak resident set size (VmHWM from /proc/self/status), where available.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
