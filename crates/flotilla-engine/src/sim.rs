//! The simulation driver: virtual clients on one machine, a virtual clock from device
//! profiles, dropouts, deadlines and availability traces, clients trained in parallel.
//!
//! Memory stays flat in the number of clients: a client is an id, a list of sample indices
//! and a profile; models exist only for the clients of the current round. Results do not
//! depend on the number of workers: every random stream derives from (seed, round, client,
//! purpose), each client trains on a single thread of its own, and replies are folded in
//! client-id order. The round loop itself is [`Driver`]'s, shared with the network server.

use crate::EngineError;
use crate::config::Experiment;
use crate::driver::{ClientRun, Driver, Fleet, Prepared, ReplyCheck, blank_record, judge_reply};
use crate::method::{ClientCtx, ClientData, ClientHalf, ClientInfo, KnownMasks, ServerHalf};
use crate::server_data::{self, ServerData};
use crate::sink::ClientStatus;
use crate::sink::Sink;
use flotilla_core::ParamSet;
use flotilla_core::device::{self, DeviceProfile};
use flotilla_core::seed::{self, Purpose};
use flotilla_data::{Dataset, Split};
use rand::Rng;
use rand::seq::SliceRandom;
use std::path::Path;
use std::sync::Arc;

pub use crate::driver::{CHECKPOINT_DIR, peak_rss_bytes};

/// A configured simulation, ready to run.
pub struct Simulation {
    driver: Driver,
    fleet: LocalFleet,
    checkpoint_every: u64,
}

/// Virtual clients: partitions of one training set, profiles, and worker threads.
pub struct LocalFleet {
    seed: u64,
    holdout: f64,
    client: Arc<dyn ClientHalf>,
    train: Dataset,
    parts: Vec<Vec<usize>>,
    profiles: Vec<DeviceProfile>,
    mean: Vec<f32>,
    std: Vec<f32>,
    workers: usize,
}

impl Simulation {
    /// Loads data, partitions it, builds the fleet, reads the configured server data (given to
    /// the method during aggregation) and checks that some client fits the plan.
    pub fn new(
        exp: Experiment,
        data: Split,
        server: Box<dyn ServerHalf>,
        client: Arc<dyn ClientHalf>,
        run_dir: &Path,
    ) -> Result<Self, EngineError> {
        let workers = if exp.simulation.workers == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            exp.simulation.workers
        };
        let (fleet, test) = LocalFleet::new(&exp, data, client, workers)?;
        let server_data = ServerData::from_config(&exp, &fleet.train)?;
        let checkpoint_every = exp.simulation.checkpoint_every;
        let mut driver = Driver::new(exp, test, server, run_dir, workers)?;
        if let Some(d) = server_data {
            driver.set_server_data(d);
        }
        driver.set_probe_data(&fleet.train)?;
        driver.check_fleet((0..fleet.parts.len() as u64).map(|c| fleet.info(c)))?;
        Ok(Self {
            driver,
            fleet,
            checkpoint_every,
        })
    }

    /// Restores a run from its checkpoint; the next [`Simulation::run`] continues after it.
    pub fn restore_checkpoint(&mut self) -> Result<u64, EngineError> {
        self.driver.restore_checkpoint()
    }

    /// Makes the next checkpoint write stop after `step` as a crash would, and the run end
    /// with an error (see [`Driver::inject_checkpoint_fault`]).
    pub fn inject_checkpoint_fault(&mut self, step: crate::driver::CheckpointStep) {
        self.driver.inject_checkpoint_fault(step);
    }

    /// Gives the server half data of its own (a proxy or synthetic set) for server-side
    /// training during aggregation, replacing what `[server_data]` configured; it must be
    /// disjoint from the clients' data. A plain [`ClientData`] is labelled.
    pub fn set_server_data(&mut self, data: impl Into<ServerData>) {
        self.driver.set_server_data(data);
    }

    /// The server half (for final models).
    pub fn server(&self) -> &dyn ServerHalf {
        self.driver.server()
    }

    /// The first round the next call of [`Simulation::run`] will run.
    pub fn next_round(&self) -> u64 {
        self.driver.next_round()
    }

    /// Runs the remaining rounds, reporting to `sinks`, and returns the summary.
    pub fn run(&mut self, sinks: &mut [&mut dyn Sink]) -> Result<serde_json::Value, EngineError> {
        self.driver
            .run(&mut self.fleet, sinks, self.checkpoint_every)
    }

    /// Test-set evaluation split over the workers, identical for any number of workers.
    pub fn evaluate_parallel(
        &self,
        spec: &flotilla_models::ModelSpec,
        view: &flotilla_models::View,
        params: &ParamSet,
        data: &Dataset,
    ) -> Result<(f64, f64), EngineError> {
        self.driver.evaluate_parallel(spec, view, params, data)
    }
}

impl LocalFleet {
    /// Partitions the training set of `data` over the configured clients (after the
    /// configured limits, without the server's held-out slice) and builds their profiles;
    /// returns the fleet and the test set.
    pub fn new(
        exp: &Experiment,
        data: Split,
        client: Arc<dyn ClientHalf>,
        workers: usize,
    ) -> Result<(Self, Dataset), EngineError> {
        let mut data = data;
        if let Some(n) = exp.data.train_limit {
            data.train = data.train.take_first(n);
        }
        if let Some(n) = exp.data.test_limit {
            data.test = data.test.take_first(n);
        }
        let parts = partition_clients(exp, &data.train)?;
        let profiles = build_fleet(exp)?;
        let (mean, std) = exp.data.dataset.normalization();
        Ok((
            Self {
                seed: exp.seed,
                holdout: exp.data.holdout,
                client,
                train: data.train,
                parts,
                profiles,
                mean,
                std,
                workers: workers.max(1),
            },
            data.test,
        ))
    }

    /// Client `c`'s data: its partition split into training and held-out examples. A client
    /// process joining a deployment with `--partition K` holds exactly this.
    pub fn client_data(&self, c: u64) -> Result<ClientData, EngineError> {
        let (train, hold) = split_holdout(&self.parts[c as usize], self.holdout, self.seed, c);
        Ok(ClientData {
            train: self.train.subset(&train)?,
            holdout: self.train.subset(&hold)?,
            mean: self.mean.clone(),
            std: self.std.clone(),
        })
    }

    /// Number of clients.
    pub fn len(&self) -> usize {
        self.parts.len()
    }

    /// Whether there are no clients.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The tasks' indices, most expected work first (training FLOPs of the client's
    /// examples over the recipe's epochs); ties keep task order.
    fn longest_first(&self, tasks: &[Prepared]) -> Vec<usize> {
        let cost = |p: &Prepared| {
            let examples = self.parts.get(p.client as usize).map_or(0, Vec::len);
            let per_sample = flotilla_models::flops::training(&p.task.model, &p.task.view, 1);
            per_sample * (examples * p.task.recipe.epochs) as f64
        };
        let costs: Vec<f64> = tasks.iter().map(cost).collect();
        let mut order: Vec<usize> = (0..tasks.len()).collect();
        order.sort_by(|&a, &b| costs[b].total_cmp(&costs[a]));
        order
    }

    /// One client: decode the task bytes, execute, encode the reply, decode and check it
    /// server-side, exactly as over the network.
    fn run_client(
        &self,
        prepared: &Prepared,
        server_masks: &KnownMasks,
        check: &ReplyCheck<'_>,
    ) -> Result<ClientRun, EngineError> {
        let c = prepared.client;
        let profile = &self.profiles[c as usize];
        let mut known = prepared.known.clone();
        let mut rec = blank_record(prepared.task.round, c, profile);
        let task_bytes = prepared.encode()?;
        rec.bytes_down = task_bytes.len() as u64;
        // A virtual client's cache: what the driver's ledger says it holds, which is the
        // task's own tensor wherever the fingerprints agree.
        let mut cache = crate::held::TensorCache::new(u64::MAX);
        for t in prepared.task.params.iter() {
            if let Some(&fp) = prepared.held.get(&t.name) {
                cache.keep(t, fp);
            }
        }
        let task = crate::Task::decode_with(&task_bytes, &mut known, &mut cache)?;
        drop(cache);
        drop(task_bytes);
        let data = self.client_data(c)?;
        let ctx = ClientCtx {
            seed: self.seed,
            profile: profile.clone(),
            masks: known,
        };
        let reply = match self.client.execute(&task, &data, &ctx) {
            Ok(r) => r,
            Err(EngineError::OverBudget(reason)) => {
                tracing::info!(round = task.round, client = c, %reason, "client refused its task");
                rec.status = ClientStatus::Skipped;
                rec.reason = Some(reason);
                return Ok(ClientRun {
                    record: rec,
                    reply: None,
                });
            }
            Err(e) => {
                tracing::warn!(round = task.round, client = c, error = %e, "client failed");
                rec.status = ClientStatus::Failed;
                rec.reason = Some(e.to_string());
                return Ok(ClientRun {
                    record: rec,
                    reply: None,
                });
            }
        };
        let reply_bytes = reply.encode(server_masks)?;
        rec.bytes_up = reply_bytes.len() as u64;
        // The server refuses an undecodable, non-finite, misaddressed or misshapen update
        // as it would from the network: the client's round fails, the run goes on.
        Ok(judge_reply(
            rec,
            &reply_bytes,
            server_masks,
            &prepared.task,
            check,
            profile,
        )
        .0)
    }
}

impl Fleet for LocalFleet {
    fn available(&mut self, round: u64) -> Result<Vec<u64>, EngineError> {
        Ok((0..self.parts.len() as u64)
            .filter(|&c| self.profiles[c as usize].available(round))
            .collect())
    }

    fn info(&self, c: u64) -> ClientInfo {
        ClientInfo {
            id: c,
            profile: self.profiles[c as usize].clone(),
            num_examples: split_holdout(&self.parts[c as usize], self.holdout, self.seed, c)
                .0
                .len(),
        }
    }

    fn drops_out(&self, round: u64, c: u64) -> Option<String> {
        let p = &self.profiles[c as usize];
        (p.dropout > 0.0
            && seed::rng(self.seed, round, c, Purpose::Dropout).random::<f64>() < p.dropout)
            .then(|| format!("dropped out (probability {})", p.dropout))
    }

    fn simulated_clock(&self) -> bool {
        true
    }

    fn holdout(&self, c: u64) -> Result<Option<ClientData>, EngineError> {
        self.client_data(c).map(Some)
    }

    /// Each client on one worker thread, longest first, a free worker taking the next client;
    /// the critical path is the largest total time one worker spent inside the clients'
    /// `execute`.
    fn execute(
        &mut self,
        tasks: Vec<Prepared>,
        server_masks: &KnownMasks,
        check: &ReplyCheck<'_>,
        // Never given: the simulated clock may still turn replies away after the fact.
        _fold: Option<&mut flotilla_core::aggregate::MeanFold>,
    ) -> Result<(Vec<ClientRun>, f64), EngineError> {
        let workers = self.workers;
        let this = &*self;
        let mut results: Vec<Option<Result<ClientRun, EngineError>>> =
            (0..tasks.len()).map(|_| None).collect();
        let mut critical_path = 0.0f64;
        // Longest first, each worker taking the next client when it is free: a round of
        // clients of very different sizes (Dirichlet splits) then ends with the workers nearly
        // together instead of one finishing a long list while the others idle. Each client's
        // result depends only on its own task, so the order does not change any number.
        let order = self.longest_first(&tasks);
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    let (tasks, order, next) = (&tasks, &order, &next);
                    s.spawn(move || {
                        let mut out = Vec::new();
                        let mut busy = 0.0;
                        while let Some(&i) =
                            order.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                        {
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
                                    pool.install(|| this.run_client(&tasks[i], server_masks, check))
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
}

/// The clients' partition of `train` (the training set after `data.train_limit`): sample
/// indices into `train`, one list per client. With `[server_data] source = "holdout"` only the
/// samples outside the server's slice ([`server_data::holdout_indices`]) are partitioned; without
/// it the partition is that of the whole set.
pub fn partition_clients(
    exp: &Experiment,
    train: &Dataset,
) -> Result<Vec<Vec<usize>>, EngineError> {
    let seed = seed::derive(exp.seed, 0, 0, Purpose::Partition);
    let held = server_data::holdout_indices(exp, train.len())?;
    let (n, spec) = (exp.data.num_clients, &exp.data.partition);
    if held.is_empty() {
        return Ok(flotilla_data::partition(
            &train.labels,
            train.num_classes,
            n,
            spec,
            seed,
        )?);
    }
    // Partition the remaining samples as a dataset of their own, then map back.
    let mut is_held = vec![false; train.len()];
    for &i in &held {
        is_held[i] = true;
    }
    let rest: Vec<usize> = (0..train.len()).filter(|&i| !is_held[i]).collect();
    let labels: Vec<u8> = rest.iter().map(|&i| train.labels[i]).collect();
    let parts = flotilla_data::partition(&labels, train.num_classes, n, spec, seed)?;
    Ok(parts
        .into_iter()
        .map(|p| p.into_iter().map(|j| rest[j]).collect())
        .collect())
}

/// A client's partition split into (training, held-out) indices, deterministic from the seed.
fn split_holdout(part: &[usize], holdout: f64, seed: u64, c: u64) -> (Vec<usize>, Vec<usize>) {
    let mut idx = part.to_vec();
    if holdout <= 0.0 || idx.len() < 2 {
        return (idx, Vec::new());
    }
    idx.shuffle(&mut seed::rng(seed, 0, c, Purpose::Partition));
    let n_hold = ((idx.len() as f64 * holdout).round() as usize).clamp(1, idx.len() - 1);
    let mut hold = idx.split_off(idx.len() - n_hold);
    idx.sort_unstable();
    hold.sort_unstable();
    (idx, hold)
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
