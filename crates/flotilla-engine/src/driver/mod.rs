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
use crate::held::HeldLedger;
use crate::method::{
    Assignment, ClientInfo, PhaseCtx, PhaseEnd, Readout, Reply, ServerCtx, ServerHalf, Task,
};
use crate::server_data::ServerData;
use crate::sink::{ClientRecord, ClientStatus, Event, RoundRecord, Sink};
use flotilla_core::ParamSet;
use flotilla_core::seed::{self, Purpose};
use flotilla_data::Dataset;
use rand::Rng;
use rand::seq::SliceRandom;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

mod checkpoint;
mod evaluation;

mod fleet;
mod record;
mod replies;

pub use checkpoint::{CHECKPOINT_DIR, CheckpointStep};
pub use fleet::{ClientRun, Fleet, Prepared, ReplyCheck};
use record::{ProbeFloor, RoundCost, RoundEval, Totals};
pub use replies::{blank_record, fold_reply, judge_reply};
use replies::{check_reply, merge_record};

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

    /// One round: sample the clients, then per phase plan, deliver and collect, aggregate;
    /// then evaluate and record.
    fn run_round(
        &mut self,
        round: u64,
        fleet: &mut dyn Fleet,
    ) -> Result<(RoundRecord, Vec<ClientRecord>), EngineError> {
        let started = Instant::now();
        let (mut records, mut active) = self.begin_round(round, fleet)?;
        let mut cost = RoundCost::default();
        let mut phase = 0u32;
        loop {
            let ctx = PhaseCtx {
                round,
                phase,
                seed: self.exp.seed,
            };
            let infos: Vec<ClientInfo> = active.iter().map(|&c| fleet.info(c)).collect();
            let tasks = self.plan_phase(&ctx, &infos, &mut records, &mut cost)?;
            let (replies, mean) =
                self.deliver_and_collect(&ctx, tasks, &infos, fleet, &mut records, &mut cost)?;
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
            let end = self.aggregate_phase(&ctx, &replies, mean, &mut cost)?;
            active = replies.iter().map(|r| r.client).collect();
            match end {
                PhaseEnd::RoundComplete => break,
                PhaseEnd::NextPhase => phase += 1,
            }
        }
        // The server computes after the clients' replies are in, so its time adds to the round.
        cost.sim_s += cost.server_flops / (self.exp.simulation.server_gflops * 1e9);
        let mut clients: Vec<ClientRecord> = records.into_values().collect();
        let eval_started = Instant::now();
        let eval = self.evaluate_round(round, &mut clients, fleet)?;
        let eval_wall = eval_started.elapsed().as_secs_f64();
        let record = self.record_round(round, &clients, eval, cost, started, eval_wall);
        Ok((record, clients))
    }

    /// The round's clients: forgets what restarted clients held, tells the server half about
    /// newly available clients, samples, and marks the ones that drop out. Returns every
    /// selected client's record and the ones still active.
    fn begin_round(
        &mut self,
        round: u64,
        fleet: &mut dyn Fleet,
    ) -> Result<(BTreeMap<u64, ClientRecord>, Vec<u64>), EngineError> {
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
                rec.status = ClientStatus::Dropped;
                tracing::debug!(round, client = c, %reason, "dropped out");
                rec.reason = Some(reason);
            } else {
                active.push(c);
            }
            records.insert(c, rec);
        }
        Ok((records, active))
    }

    /// The server half's plan for one phase: the tasks to send. Skipped clients are marked
    /// with the reason; what the server decided for a client (`options.record`, e.g. a
    /// depth-dropout draw) goes into its clients.jsonl line.
    fn plan_phase(
        &self,
        ctx: &PhaseCtx,
        infos: &[ClientInfo],
        records: &mut BTreeMap<u64, ClientRecord>,
        cost: &mut RoundCost,
    ) -> Result<Vec<Task>, EngineError> {
        let plan_started = Instant::now();
        let plan = self.server.plan(ctx, infos)?;
        cost.server_wall_s += plan_started.elapsed().as_secs_f64();
        let mut tasks = Vec::new();
        for (info, a) in infos.iter().zip(plan) {
            let r = records.get_mut(&info.id).expect("selected");
            match a {
                Assignment::Run(t) => {
                    if let Some(record) = t.options.get("record").and_then(|r| r.as_object()) {
                        r.extra.extend(record.clone());
                    }
                    tasks.push(*t)
                }
                Assignment::Skip(reason) => {
                    tracing::info!(round = ctx.round, client = info.id, %reason, "client skipped");
                    r.status = ClientStatus::Skipped;
                    r.reason = Some(reason);
                }
            }
        }
        Ok(tasks)
    }

    /// Sends the tasks with what each client lacks, runs them on the fleet, and returns the
    /// accepted replies in client-id order. Every reply is checked (addressing, example count,
    /// the method's own check); on a simulated clock a reply past the deadline is a straggler's
    /// and does not count.
    ///
    /// On a wall clock, when the method's aggregation is a plain weighted mean
    /// ([`ServerHalf::mean_fold`]), the fleet folds replies in as they arrive: the replies
    /// come back without tensors, and their mean with them.
    #[allow(clippy::too_many_arguments)]
    fn deliver_and_collect(
        &mut self,
        ctx: &PhaseCtx,
        tasks: Vec<Task>,
        infos: &[ClientInfo],
        fleet: &mut dyn Fleet,
        records: &mut BTreeMap<u64, ClientRecord>,
        cost: &mut RoundCost,
    ) -> Result<(Vec<Reply>, Option<ParamSet>), EngineError> {
        let server_masks = self.server.masks();
        // A simulated clock may still turn a reply away after the fact (the deadline below),
        // so only a wall-clock fleet folds as replies arrive.
        let mut fold = if fleet.simulated_clock() {
            None
        } else {
            self.server.mean_fold(ctx)
        };
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
        let (runs, critical_path) =
            fleet.execute(prepared, &server_masks, &check, fold.as_mut())?;
        cost.train_wall_s += critical_path;
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
                    r.status = ClientStatus::Straggler;
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
            cost.sim_s = cost.sim_s.max(records[&r.client].sim_time_s);
        }
        if let Some(deadline) = self.exp.fleet.deadline_s
            && records
                .values()
                .any(|r| r.status == ClientStatus::Straggler)
        {
            cost.sim_s = cost.sim_s.max(deadline);
        }
        let mean = match fold {
            Some(f) if !f.is_empty() => Some(f.finish()?),
            _ => None,
        };
        Ok((replies, mean))
    }

    /// Folds the phase's replies into the server half, timing it and taking the server-side
    /// FLOPs it reports.
    fn aggregate_phase(
        &mut self,
        ctx: &PhaseCtx,
        replies: &[Reply],
        mean: Option<ParamSet>,
        cost: &mut RoundCost,
    ) -> Result<PhaseEnd, EngineError> {
        let mut server_ctx = ServerCtx::new(
            self.server_data.as_ref().map(|d| &d.data),
            self.server_data.as_ref().is_some_and(|d| d.labelled),
        )
        .with_mean(mean);
        let aggregate_started = Instant::now();
        let end = self.server.aggregate(ctx, replies, &mut server_ctx)?;
        cost.server_wall_s += aggregate_started.elapsed().as_secs_f64();
        let flops = server_ctx.flops();
        if !(flops.is_finite() && flops >= 0.0) {
            return Err(EngineError::Method(format!(
                "`{}` reported {flops} server FLOPs in round {} phase {}; ServerCtx::add_flops takes finite, non-negative counts",
                self.server.name(),
                ctx.round,
                ctx.phase
            )));
        }
        cost.server_flops += flops;
        Ok(end)
    }
}

fn emit(sinks: &mut [&mut dyn Sink], e: &Event<'_>) -> Result<(), EngineError> {
    for s in sinks.iter_mut() {
        s.on_event(e)?;
    }
    Ok(())
}

/// The process's peak resident set size (VmHWM from /proc/self/status), where available.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
