//! FedTSA (Fan et al., ECCV 2024): capability clusters, a width-reduced model per cluster,
//! stage 1 weight averaging inside each cluster, stage 2 deep mutual learning between the
//! cluster models on the server's own data (methods.md §2), and the baselines that share its
//! machinery.
//!
//! **Capability.** The model ladder is the configured model at each width of `widths`
//! (default {1, 1/2, 1/4} of `[model] width`). A device can afford a rung when the rung's
//! training-memory estimate fits its memory budget and, with a `[fleet] deadline_s`, when its
//! simulated round (download, `training.epochs` passes over its data, upload) fits the
//! deadline: computed here, as FlexTrain computes its depth. The KDE needs one continuous
//! number per device, so the capability is the device's headroom on the widest rung,
//! log₂ min(memory / memory needed, deadline / round time): a device that affords the widest
//! model twice over scores 1, one that has half of what it needs scores −1. (The discrete
//! affordable rung would put every device of a tier on one value; the paper clusters the
//! devices' resources, so the headroom keeps their spread.)
//!
//! **Clusters.** A Gaussian KDE with Scott's bandwidth over the capabilities, cut at the
//! density minima, at most `max_clusters` ([`flotilla_core::cluster`]). Each cluster's model
//! is the widest rung that every member affords (its weakest member decides, §2.2 step 5).
//! Clusters are recomputed whenever the server observes new devices; a cluster keeps the model
//! of the earlier cluster with the same width, a new width starts from its initial weights.
//!
//! **Round.** Every sampled device trains its cluster's model with cross-entropy (no extra
//! client cost: a device's task is FedAvg's at that width, and FedAvg's client half,
//! [`crate::fedavg::FedAvgClient`], executes it). Stage 1: the example-weighted mean
//! of the replies of each cluster; a cluster without replies keeps its model. Stage 2 (with
//! two or more clusters): for `server_epochs` passes over `server_samples` images drawn from
//! `[server_data]` each round, each cluster model m minimises
//! T² · KL(p̄₋ₘ ‖ softmax(zₘ/T)), where p̄₋ₘ is the mean of the *other* models' softened outputs
//! softmax(z_r/T), held constant (stop-gradient). Mutual learning updates the models
//! together; here the targets are recomputed from the current models every `refresh` images
//! (256 by default, every 4 batches of 64), and every model then takes its steps on those
//! images: with `refresh` equal to the batch size this is the lockstep update of deep mutual
//! learning, larger values trade that for fewer forward passes. Labels of the server data are
//! never read.
//!
//! **Baselines** (same clusters, same client tasks):
//! - `fedtsa-stage1`: FedTSA without stage 2 (clusters only).
//! - `feddf`: ensemble distillation (Lin et al. 2020) in place of mutual learning: every
//!   cluster model is distilled toward the fixed ensemble of this round's client models
//!   (the mean of their logits, softened at T) on the same server images.
//! - `fedavg-smallest`: one model at the width the weakest device affords, FedAvg over every
//!   device.
//! - `heterofl`: parameter sharing across widths (Diao et al. 2021): one global model at the
//!   widest rung; a cluster trains the leading slice of every tensor at its width, and each
//!   global value is averaged over the replies that hold it
//!   ([`aggregate::sliced_weighted_mean`]).
//! - `fedrolex`: HeteroFL with rolling slices (Alam et al. 2022): in round r a layer of C units
//!   at width p trains units (r + i) mod C, i < ⌈p·C⌉, so every unit of the global model is
//!   trained by every width over the rounds (CNN and MLP models; a flattened convolution output
//!   rolls by whole channels). A cluster is evaluated (and saved) with the window its devices
//!   would be sent next.

pub mod denoiser;
pub mod generator;

use flotilla_core::ParamSet;
use flotilla_core::aggregate;
use flotilla_core::cluster::{Clustering, kde_clusters};
use flotilla_core::seed::{self, Purpose};
use flotilla_engine::TaskKind;
use flotilla_engine::local::{
    Batch, Objective, Recipe, TrainJob, estimate_memory, kl_to_probs, logits, softmax_rows,
};
use flotilla_engine::{
    Assignment, ClientData, ClientInfo, EngineError, EvalModel, Experiment, MethodState, PhaseCtx,
    PhaseEnd, Readout, Reply, ServerCtx, ServerHalf, Task,
};
use flotilla_models::{ModelSpec, Net, View, flops};
use rand::seq::SliceRandom;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};

/// Which method of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// FedTSA: clusters, stage 1, stage 2 mutual learning.
    FedTsa,
    /// FedTSA without stage 2.
    Stage1Only,
    /// Clusters and stage 1, then ensemble distillation from the round's client models.
    FedDf,
    /// FedAvg on the model the weakest device affords.
    Smallest,
    /// HeteroFL: one global model, each cluster trains its leading width slice.
    HeteroFl,
    /// FedRolex: HeteroFL with slices that roll one unit per round.
    FedRolex,
}

/// What a dimension of a tensor indexes, for FedRolex's rolling windows.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    /// Inputs, kernel positions or classes: never sliced.
    All,
    /// The units of hidden layer `l`.
    Units(usize),
    /// The units of hidden layer `l`, each a contiguous group of features (a flattened
    /// convolution output, channel-major).
    Grouped(usize),
}

/// The role of every dimension of every tensor of a CNN or MLP, or `None` for the other
/// architectures.
fn rolling_roles(spec: &ModelSpec) -> Option<BTreeMap<String, Vec<Role>>> {
    use Role::{All, Grouped, Units};
    let mut roles = BTreeMap::new();
    let mut layer = |name: &str, weight: Vec<Role>, bias: Role| {
        roles.insert(format!("{name}.weight"), weight);
        roles.insert(format!("{name}.bias"), vec![bias]);
    };
    match &spec.arch {
        flotilla_models::Architecture::Cnn => {
            layer("conv1", vec![Units(0), All, All, All], Units(0));
            layer("conv2", vec![Units(1), Units(0), All, All], Units(1));
            layer("fc1", vec![Units(2), Grouped(1)], Units(2));
            layer("fc2", vec![All, Units(2)], All);
        }
        flotilla_models::Architecture::Mlp { hidden } => {
            for i in 0..=hidden.len() {
                let out = if i < hidden.len() { Units(i) } else { All };
                let inp = if i == 0 { All } else { Units(i - 1) };
                layer(&format!("layers.{i}"), vec![out, inp], out);
            }
        }
        _ => return None,
    }
    Some(roles)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    name: String,
    #[serde(default = "default_widths")]
    widths: Vec<f64>,
    #[serde(default = "default_max_clusters")]
    max_clusters: usize,
    #[serde(default = "default_temperature")]
    temperature: f64,
    #[serde(default = "default_server_samples")]
    server_samples: usize,
    #[serde(default = "default_server_epochs")]
    server_epochs: usize,
    #[serde(default)]
    server_lr: Option<f64>,
    #[serde(default)]
    server_batch: Option<usize>,
    #[serde(default = "default_refresh")]
    refresh: usize,
}

fn default_widths() -> Vec<f64> {
    vec![1.0, 0.5, 0.25]
}
fn default_max_clusters() -> usize {
    4
}
fn default_temperature() -> f64 {
    3.0
}
fn default_server_samples() -> usize {
    2000
}
fn default_server_epochs() -> usize {
    1
}
fn default_refresh() -> usize {
    256
}

/// One model of the ladder.
#[derive(Debug, Clone)]
pub struct Rung {
    /// Width relative to the configured model.
    pub width: f64,
    /// The model at this width.
    pub spec: ModelSpec,
    /// Its initial weights (from the run seed).
    pub init: ParamSet,
    /// Training memory estimate, bytes.
    pub memory_bytes: u64,
    /// Training FLOPs per sample.
    pub train_flops: f64,
    /// Forward FLOPs per sample.
    pub forward_flops: f64,
    /// Bytes of the model's tensors (f32), each way.
    pub model_bytes: u64,
}

/// What the server concluded about one device.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Capability {
    /// Headroom on the widest rung, log₂.
    score: f64,
    /// Index of the widest affordable rung (0 = widest).
    rung: usize,
}

/// One capability cluster and its model.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Index into the ladder of the cluster's model.
    pub rung: usize,
    /// Devices in the cluster.
    pub devices: u64,
    /// Lowest and highest capability of its members.
    pub capability: (f64, f64),
    /// The cluster's model.
    pub params: ParamSet,
}

/// The server half of FedTSA and its baselines.
pub struct FedTsa {
    mode: Mode,
    name: String,
    seed: u64,
    recipe: Recipe,
    stage2_recipe: Recipe,
    deadline_s: Option<f64>,
    ladder: Vec<Rung>,
    max_clusters: usize,
    temperature: f64,
    server_samples: usize,
    server_epochs: usize,
    refresh: usize,
    devices: BTreeMap<u64, Capability>,
    clustering: Option<Clustering>,
    clusters: Vec<Cluster>,
    device_cluster: HashMap<u64, usize>,
    /// Models restored from a checkpoint before the fleet was observed, by rung.
    restored: Vec<Cluster>,
    /// HeteroFL's and FedRolex's global model at the widest rung (`None` for the other modes).
    global: Option<ParamSet>,
    /// Dimension roles for FedRolex's windows (CNN and MLP only).
    roles: Option<BTreeMap<String, Vec<Role>>>,
    /// Mean stage-2 loss of the last round (None: no stage 2 ran).
    stage2_loss: Option<f64>,
    /// The last round aggregated (FedRolex's evaluation takes the next round's windows).
    rounds_done: u64,
}

impl FedTsa {
    /// Builds the server half from the `[method]` table; `spec` is the widest model.
    pub fn from_config(exp: &Experiment, spec: ModelSpec) -> Result<Self, EngineError> {
        let opts: Options = crate::common::method_options(exp)?;
        let mode = match opts.name.as_str() {
            "fedtsa" => Mode::FedTsa,
            "fedtsa-stage1" => Mode::Stage1Only,
            "feddf" => Mode::FedDf,
            "fedavg-smallest" => Mode::Smallest,
            "heterofl" => Mode::HeteroFl,
            "fedrolex" => Mode::FedRolex,
            other => {
                return Err(EngineError::Config(format!(
                    "`method.name` `{other}` is not fedtsa, fedtsa-stage1, feddf, fedavg-smallest, heterofl or fedrolex"
                )));
            }
        };
        let bad =
            |key: &str, why: String| Err(EngineError::Config(format!("`method.{key}` {why}")));
        if opts.widths.is_empty()
            || opts
                .widths
                .iter()
                .any(|w| !(w.is_finite() && *w > 0.0 && *w <= 1.0))
        {
            return bad(
                "widths",
                format!(
                    "must list widths in (0, 1] relative to [model] width, got {:?}",
                    opts.widths
                ),
            );
        }
        let mut widths = opts.widths.clone();
        widths.sort_by(|a, b| b.total_cmp(a));
        widths.dedup();
        if opts.max_clusters == 0 {
            return bad("max_clusters", "must be at least 1".into());
        }
        if !(opts.temperature.is_finite() && opts.temperature > 0.0) {
            return bad(
                "temperature",
                format!("must be a positive number, got {}", opts.temperature),
            );
        }
        if opts.server_epochs == 0 || opts.refresh == 0 {
            return bad(
                "server_epochs and refresh",
                "must be at least 1".to_string(),
            );
        }
        let distils = matches!(mode, Mode::FedTsa | Mode::FedDf);
        if distils && exp.server_data.is_none() {
            return Err(EngineError::Config(format!(
                "{} trains on the server's data in stage 2: add a [server_data] section (source = \"holdout\" or \"idx\"), or use fedtsa-stage1",
                opts.name
            )));
        }
        let recipe = exp.training.clone();
        let mut stage2_recipe = recipe.clone();
        stage2_recipe.epochs = 1;
        if let Some(lr) = opts.server_lr {
            if !(lr.is_finite() && lr > 0.0) {
                return bad("server_lr", format!("must be a positive number, got {lr}"));
            }
            stage2_recipe.lr = lr;
        }
        if let Some(b) = opts.server_batch {
            if b == 0 {
                return bad("server_batch", "must be at least 1".into());
            }
            stage2_recipe.batch_size = b;
        }
        let roles = rolling_roles(&spec);
        if mode == Mode::FedRolex && roles.is_none() {
            return Err(EngineError::Config(
                "fedrolex rolls the units of CNN and MLP layers: set [model] arch = \"cnn\" or \"mlp\" (or use heterofl)".into(),
            ));
        }
        let ladder = widths
            .iter()
            .map(|&w| Self::rung(&spec, w, exp.seed, &recipe))
            .collect::<Result<Vec<_>, _>>()?;
        for r in &ladder {
            tracing::debug!(
                width = r.width,
                mib = r.memory_bytes as f64 / 1048576.0,
                mflop_per_sample = r.train_flops / 1e6,
                "fedtsa ladder rung"
            );
        }
        Ok(Self {
            mode,
            name: opts.name,
            seed: exp.seed,
            recipe,
            stage2_recipe,
            deadline_s: exp.fleet.deadline_s,
            max_clusters: opts.max_clusters,
            temperature: opts.temperature,
            server_samples: opts.server_samples,
            server_epochs: opts.server_epochs,
            refresh: opts.refresh,
            devices: BTreeMap::new(),
            clustering: None,
            clusters: Vec::new(),
            device_cluster: HashMap::new(),
            restored: Vec::new(),
            stage2_loss: None,
            rounds_done: 0,
            global: matches!(mode, Mode::HeteroFl | Mode::FedRolex).then(|| ladder[0].init.clone()),
            roles,
            ladder,
        })
    }

    fn rung(spec: &ModelSpec, width: f64, seed: u64, recipe: &Recipe) -> Result<Rung, EngineError> {
        let mut s = spec.clone();
        s.width = spec.width * width;
        s.validate()?;
        let init = Net::init_params(&s, seed)?;
        let view = View::full();
        Ok(Rung {
            width,
            memory_bytes: estimate_memory(&s, &view, &init, recipe).total(),
            train_flops: flops::training(&s, &view, 1),
            forward_flops: flops::forward_per_sample(&s, &view),
            model_bytes: 4 * init.numel() as u64,
            init,
            spec: s,
        })
    }

    /// The model ladder, widest first.
    pub fn ladder(&self) -> &[Rung] {
        &self.ladder
    }

    /// The current clusters, weakest first.
    pub fn clusters(&self) -> &[Cluster] {
        &self.clusters
    }

    /// The cluster of an observed device.
    pub fn cluster_of(&self, client: u64) -> Option<usize> {
        self.device_cluster.get(&client).copied()
    }

    /// Simulated seconds of one round of `rung` on `c`'s device.
    fn round_time_s(&self, c: &ClientInfo, rung: &Rung) -> f64 {
        let samples = (c.num_examples * self.recipe.epochs) as f64;
        c.profile.download_time_s(rung.model_bytes)
            + c.profile.compute_time_s(rung.train_flops * samples)
            + c.profile.upload_time_s(rung.model_bytes)
    }

    /// Headroom of a device on one rung: min(memory / need, deadline / round time).
    fn headroom(&self, c: &ClientInfo, rung: &Rung) -> f64 {
        let memory = c.profile.memory_bytes as f64 / rung.memory_bytes.max(1) as f64;
        match self.deadline_s {
            Some(d) => memory.min(d / self.round_time_s(c, rung).max(f64::MIN_POSITIVE)),
            None => memory,
        }
    }

    fn capability(&self, c: &ClientInfo) -> Option<Capability> {
        let rung = self
            .ladder
            .iter()
            .position(|r| self.headroom(c, r) >= 1.0)?;
        Some(Capability {
            score: self.headroom(c, &self.ladder[0]).log2(),
            rung,
        })
    }

    /// Why a device gets no model.
    fn unaffordable(&self, c: &ClientInfo) -> String {
        let narrowest = self.ladder.last().expect("a ladder has a rung");
        let mut why = format!(
            "the narrowest model (width {}) needs about {:.1} MiB, the {} device has {:.1} MiB",
            narrowest.width,
            narrowest.memory_bytes as f64 / 1048576.0,
            c.profile.tier,
            c.profile.memory_bytes as f64 / 1048576.0
        );
        if let Some(d) = self.deadline_s {
            why += &format!(
                ", and its round would take {:.1} s of the {d} s deadline",
                self.round_time_s(c, narrowest)
            );
        }
        why
    }

    /// Clusters every observed device and gives each cluster a model: the earlier model of
    /// the same width where there is one, else the rung's initial weights.
    fn recluster(&mut self) {
        let ids: Vec<u64> = self.devices.keys().copied().collect();
        let scores: Vec<f64> = self.devices.values().map(|d| d.score).collect();
        let clustering = match self.mode {
            Mode::Smallest => kde_clusters(&scores, 1),
            _ => kde_clusters(&scores, self.max_clusters),
        };
        // Restored models first: after a restart they are the ones to continue.
        let mut pool: Vec<Cluster> = std::mem::take(&mut self.restored);
        pool.append(&mut self.clusters);
        let mut clusters = Vec::with_capacity(clustering.len());
        self.device_cluster.clear();
        for k in 0..clustering.len() {
            let members: Vec<usize> = (0..ids.len())
                .filter(|&i| clustering.labels[i] == k)
                .collect();
            if members.is_empty() {
                continue;
            }
            let idx = clusters.len();
            let rung = members
                .iter()
                .map(|&i| self.devices[&ids[i]].rung)
                .max()
                .expect("members");
            let lo = members
                .iter()
                .map(|&i| scores[i])
                .fold(f64::INFINITY, f64::min);
            let hi = members
                .iter()
                .map(|&i| scores[i])
                .fold(f64::NEG_INFINITY, f64::max);
            for &i in &members {
                self.device_cluster.insert(ids[i], idx);
            }
            let params = match pool.iter().position(|c| c.rung == rung) {
                Some(p) => pool.remove(p).params,
                None => self.ladder[rung].init.clone(),
            };
            clusters.push(Cluster {
                rung,
                devices: members.len() as u64,
                capability: (lo, hi),
                params,
            });
        }
        for (k, c) in clusters.iter().enumerate() {
            tracing::info!(
                cluster = k,
                devices = c.devices,
                width = self.ladder[c.rung].width,
                capability_lo = c.capability.0,
                capability_hi = c.capability.1,
                "fedtsa capability cluster"
            );
        }
        self.clusters = clusters;
        self.clustering = Some(clustering);
        self.slice_global();
    }

    /// Where a model of `rung` sits in the global model in `round`: FedRolex's windows rolled
    /// by `round`, else (HeteroFL, or no round) the leading slices.
    fn slice_map(&self, rung: usize, round: Option<u64>) -> aggregate::SliceMap {
        let layout = &self.ladder[rung].init;
        let (Some(round), Some(roles), Mode::FedRolex) = (round, &self.roles, self.mode) else {
            return aggregate::leading_map(layout);
        };
        let full = &self.ladder[0].init;
        // Units of each hidden layer, full and at this width, from the tensors that index them.
        let mut units: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
        for t in layout.iter() {
            for (d, role) in roles[&t.name].iter().enumerate() {
                if let Role::Units(l) = role {
                    units.insert(
                        *l,
                        (full.get(&t.name).expect("same names").shape[d], t.shape[d]),
                    );
                }
            }
        }
        let window = |l: usize| -> Vec<usize> {
            let (n, m) = units[&l];
            (0..m).map(|i| (round as usize + i) % n).collect()
        };
        layout
            .iter()
            .map(|t| {
                let g = full.get(&t.name).expect("same names");
                let index = roles[&t.name]
                    .iter()
                    .enumerate()
                    .map(|(d, role)| match role {
                        Role::All => (0..t.shape[d]).collect(),
                        Role::Units(l) => window(*l),
                        Role::Grouped(l) => {
                            let group = g.shape[d] / units[l].0;
                            window(*l)
                                .into_iter()
                                .flat_map(|c| c * group..(c + 1) * group)
                                .collect()
                        }
                    })
                    .collect();
                (t.name.clone(), index)
            })
            .collect()
    }

    /// HeteroFL, FedRolex: every cluster's model becomes its width's slice of the global
    /// model, what a device of the cluster would be sent next (and what is evaluated and
    /// saved): the leading slice, or FedRolex's window of the next round.
    fn slice_global(&mut self) {
        let Some(global) = &self.global else {
            return;
        };
        let maps: Vec<aggregate::SliceMap> = self
            .clusters
            .iter()
            .map(|c| self.slice_map(c.rung, Some(self.rounds_done + 1)))
            .collect();
        for (c, map) in self.clusters.iter_mut().zip(&maps) {
            c.params = aggregate::gather(global, map)
                .expect("every rung of the ladder is a slice of the widest");
        }
    }

    /// Stage 2: mutual learning between the cluster models (FedTSA), or distillation toward
    /// the fixed ensemble of `teachers` (FedDF), on `server_samples` server images.
    fn distil(
        &mut self,
        ctx: &PhaseCtx,
        server: &mut ServerCtx<'_>,
        teachers: &[(usize, &ParamSet)],
    ) -> Result<Option<f64>, EngineError> {
        let Some(data) = server.server_data else {
            return Err(EngineError::Method(format!(
                "{} has no server data in stage 2: the run configures no [server_data]",
                self.name
            )));
        };
        let n = data.train.len();
        if n == 0 {
            return Ok(None);
        }
        let take = if self.server_samples == 0 {
            n
        } else {
            self.server_samples.min(n)
        };
        let mut rng = seed::rng(self.seed, ctx.round, 0, Purpose::Server);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        order.truncate(take);
        let t = self.temperature;
        let classes = self.ladder[0].spec.classes;
        let view = View::full();
        // FedDF's teachers do not change during the stage: their softened ensemble of every
        // drawn image is computed once, row i for image i.
        let ensemble: Option<Vec<f32>> = if teachers.is_empty() {
            None
        } else {
            let drawn = data.train.subset(&order)?;
            let mut sum = vec![0f32; order.len() * classes];
            for (rung, params) in teachers {
                let z = logits(
                    &self.ladder[*rung].spec,
                    &view,
                    params,
                    &drawn,
                    &data.mean,
                    &data.std,
                )?;
                server.add_flops(self.ladder[*rung].forward_flops * order.len() as f64);
                for (s, v) in sum.iter_mut().zip(&z) {
                    *s += v / teachers.len() as f32;
                }
            }
            let p = softmax_rows(&sum, classes, t);
            let mut by_image = vec![0f32; n * classes];
            for (pos, &i) in order.iter().enumerate() {
                by_image[i * classes..(i + 1) * classes]
                    .copy_from_slice(&p[pos * classes..(pos + 1) * classes]);
            }
            Some(by_image)
        };
        let (mut loss_sum, mut loss_count) = (0.0, 0usize);
        for epoch in 0..self.server_epochs {
            if epoch > 0 {
                order.shuffle(&mut rng);
            }
            for (chunk_no, chunk) in order.chunks(self.refresh).enumerate() {
                let sub = ClientData {
                    train: data.train.subset(chunk)?,
                    holdout: data.train.take_first(0),
                    mean: data.mean.clone(),
                    std: data.std.clone(),
                };
                let softened = |spec: &ModelSpec, params: &ParamSet| {
                    logits(spec, &view, params, &sub.train, &sub.mean, &sub.std)
                        .map(|z| softmax_rows(&z, classes, t))
                };
                // Targets: the others' mean (mutual learning) or the teachers' (FedDF).
                let targets: Vec<Vec<f32>> = if let Some(ensemble) = &ensemble {
                    let rows: Vec<f32> = chunk
                        .iter()
                        .flat_map(|&i| &ensemble[i * classes..(i + 1) * classes])
                        .copied()
                        .collect();
                    vec![rows; self.clusters.len()]
                } else {
                    let probs = self
                        .clusters
                        .iter()
                        .map(|c| softened(&self.ladder[c.rung].spec, &c.params))
                        .collect::<Result<Vec<_>, _>>()?;
                    for c in &self.clusters {
                        server.add_flops(self.ladder[c.rung].forward_flops * chunk.len() as f64);
                    }
                    (0..probs.len())
                        .map(|m| mean_of_others(&probs, m))
                        .collect()
                };
                for (m, target) in targets.into_iter().enumerate() {
                    let rung = &self.ladder[self.clusters[m].rung];
                    let objective = TargetKl {
                        probs: target,
                        classes,
                        t,
                    };
                    // A shuffling stream of its own per (epoch, chunk, model).
                    let stream = (epoch * 1_000_000 + chunk_no) * 64 + m;
                    let shuffle =
                        seed::derive(self.seed, ctx.round, stream as u64, Purpose::Server);
                    let out = TrainJob::new(
                        &rung.spec,
                        &view,
                        &self.clusters[m].params,
                        &sub,
                        &self.stage2_recipe,
                        &objective,
                    )
                    .seed(shuffle)
                    .train()?;
                    server.add_flops(rung.train_flops * out.samples as f64);
                    loss_sum += out.mean_loss * out.steps as f64;
                    loss_count += out.steps;
                    self.clusters[m].params = out.params;
                }
            }
        }
        Ok((loss_count > 0).then(|| loss_sum / loss_count as f64))
    }
}

/// The mean of every row set but the `m`-th (the target of model m in mutual learning).
fn mean_of_others(probs: &[Vec<f32>], m: usize) -> Vec<f32> {
    let others = (probs.len() - 1) as f32;
    let mut out = vec![0f32; probs[m].len()];
    for (r, p) in probs.iter().enumerate() {
        if r != m {
            for (o, v) in out.iter_mut().zip(p) {
                *o += v / others;
            }
        }
    }
    out
}

/// t² · KL(target ‖ softmax(z/t)) toward fixed per-sample probability targets.
struct TargetKl {
    /// Row-major `[samples, classes]`, row i the target of sample i of the chunk.
    probs: Vec<f32>,
    classes: usize,
    t: f64,
}

impl Objective for TargetKl {
    type Step = ();

    fn begin_step(&self, _rng: &mut rand_chacha::ChaCha8Rng) {}

    fn loss(
        &self,
        model: &Net,
        batch: Batch<'_>,
        _step: &(),
    ) -> Result<burn::tensor::Tensor<1>, EngineError> {
        let c = self.classes;
        let mut rows = Vec::with_capacity(batch.indices.len() * c);
        for &i in batch.indices {
            let row = self
                .probs
                .get(i * c..(i + 1) * c)
                .ok_or_else(|| EngineError::Task(format!("server sample {i} has no target")))?;
            rows.extend_from_slice(row);
        }
        let targets = burn::tensor::Tensor::from_data(
            burn::tensor::TensorData::new(rows, [batch.indices.len(), c]),
            batch.device,
        );
        Ok(kl_to_probs(
            model.forward(batch.x, &View::full()),
            targets,
            self.t,
        ))
    }
}

impl ServerHalf for FedTsa {
    fn name(&self) -> &str {
        &self.name
    }

    fn observe(&mut self, clients: &[ClientInfo]) {
        let mut changed = false;
        for c in clients {
            match self.capability(c) {
                Some(cap) => changed |= self.devices.insert(c.id, cap) != Some(cap),
                None => changed |= self.devices.remove(&c.id).is_some(),
            }
        }
        if changed {
            self.recluster();
        }
    }

    fn plan(&self, ctx: &PhaseCtx, clients: &[ClientInfo]) -> Result<Vec<Assignment>, EngineError> {
        // What each cluster's devices are sent: its model, or FedRolex's window of this round
        // (cut once per cluster; the tasks share its tensors).
        let sent: Vec<ParamSet> = match (&self.global, self.mode) {
            (Some(global), Mode::FedRolex) => self
                .clusters
                .iter()
                .map(|c| aggregate::gather(global, &self.slice_map(c.rung, Some(ctx.round))))
                .collect::<Result<_, _>>()?,
            _ => self.clusters.iter().map(|c| c.params.clone()).collect(),
        };
        Ok(clients
            .iter()
            .map(|c| {
                let Some(k) = self.cluster_of(c.id) else {
                    return Assignment::Skip(match self.capability(c) {
                        None => self.unaffordable(c),
                        Some(_) => "the device has not been clustered yet".into(),
                    });
                };
                let cluster = &self.clusters[k];
                Assignment::Run(Box::new(Task {
                    round: ctx.round,
                    phase: ctx.phase,
                    client: c.id,
                    kind: TaskKind::TRAIN,
                    model: self.ladder[cluster.rung].spec.clone(),
                    view: View::full(),
                    recipe: self.recipe.clone(),
                    params: sent[k].clone(),
                    masks: Vec::new(),
                    hold: Vec::new(),
                    options: serde_json::Value::Null,
                }))
            })
            .collect())
    }

    /// A reply holds the whole model it was sent, at its width.
    fn check_reply(&self, task: &Task, reply: &Reply) -> Result<(), String> {
        task.params
            .check_same_layout(&reply.params)
            .map_err(|e| format!("update does not match the cluster's model: {e}"))
    }

    fn aggregate(
        &mut self,
        ctx: &PhaseCtx,
        replies: &[Reply],
        server: &mut ServerCtx<'_>,
    ) -> Result<PhaseEnd, EngineError> {
        self.stage2_loss = None;
        self.rounds_done = ctx.round;
        // Stage 1: FedAvg inside each cluster.
        let mut by_cluster: BTreeMap<usize, Vec<&Reply>> = BTreeMap::new();
        for r in replies {
            match self.cluster_of(r.client) {
                Some(k) if self.clusters[k].params.check_same_layout(&r.params).is_ok() => {
                    by_cluster.entry(k).or_default().push(r);
                }
                _ => tracing::warn!(
                    client = r.client,
                    round = ctx.round,
                    "reply left out: the device's cluster changed since its task was planned"
                ),
            }
        }
        if let Some(global) = &self.global {
            // HeteroFL, FedRolex: one average over every reply, each value over those holding
            // it, where this round's slices put it.
            let all: Vec<&Reply> = by_cluster.values().flatten().copied().collect();
            if !all.is_empty() {
                let maps: BTreeMap<usize, aggregate::SliceMap> = self
                    .clusters
                    .iter()
                    .map(|c| (c.rung, self.slice_map(c.rung, Some(ctx.round))))
                    .collect();
                let of_reply: Vec<&aggregate::SliceMap> = by_cluster
                    .iter()
                    .flat_map(|(&k, group)| {
                        let map = &maps[&self.clusters[k].rung];
                        group.iter().map(move |_| map)
                    })
                    .collect();
                let contribs = crate::common::contributions(&all);
                self.global = Some(aggregate::sliced_weighted_mean(
                    global, &contribs, &of_reply,
                )?);
                self.slice_global();
            }
            return Ok(PhaseEnd::RoundComplete);
        }
        for (&k, group) in &by_cluster {
            let contribs = crate::common::contributions(group);
            self.clusters[k].params = aggregate::weighted_mean(&contribs)?;
        }
        // Stage 2.
        if self.clusters.len() >= 2 {
            match self.mode {
                Mode::FedTsa => self.stage2_loss = self.distil(ctx, server, &[])?,
                Mode::FedDf if !by_cluster.is_empty() => {
                    // The ensemble is every client model of this round, at its width.
                    let teachers: Vec<(usize, &ParamSet)> = by_cluster
                        .iter()
                        .flat_map(|(&k, group)| {
                            let rung = self.clusters[k].rung;
                            group.iter().map(move |r| (rung, &r.params))
                        })
                        .collect();
                    self.stage2_loss = self.distil(ctx, server, &teachers)?;
                }
                _ => {}
            }
        }
        Ok(PhaseEnd::RoundComplete)
    }

    fn eval_models(&self) -> Vec<EvalModel> {
        if self.clusters.is_empty() {
            let widest = &self.ladder[0];
            return vec![EvalModel {
                label: "global".into(),
                spec: widest.spec.clone(),
                view: View::full(),
                params: widest.init.clone(),
                devices: None,
                readout: Readout::Classifier,
            }];
        }
        self.clusters
            .iter()
            .enumerate()
            .map(|(k, c)| EvalModel {
                label: if self.mode == Mode::Smallest {
                    "smallest".into()
                } else {
                    format!("cluster-{k}")
                },
                spec: self.ladder[c.rung].spec.clone(),
                view: View::full(),
                params: c.params.clone(),
                devices: Some(c.devices),
                readout: Readout::Classifier,
            })
            .collect()
    }

    fn round_metrics(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("clusters".into(), self.clusters.len().into());
        if let Some(l) = self.stage2_loss {
            m.insert("stage2_loss".into(), l.into());
        }
        m
    }

    fn summary(&self) -> serde_json::Value {
        let Some(clustering) = &self.clustering else {
            return serde_json::Value::Null;
        };
        serde_json::json!({
            "capability": "log2 headroom on the widest model: min(memory / need, deadline / round time)",
            "bandwidth": clustering.bandwidth,
            "cuts": clustering.cuts,
            "ladder": self.ladder.iter().map(|r| serde_json::json!({
                "width": r.width,
                "parameters": r.init.numel(),
                "memory_bytes": r.memory_bytes,
                "train_flops_per_sample": r.train_flops,
            })).collect::<Vec<_>>(),
            "clusters": self.clusters.iter().enumerate().map(|(k, c)| serde_json::json!({
                "cluster": k,
                "devices": c.devices,
                "width": self.ladder[c.rung].width,
                "capability_min": c.capability.0,
                "capability_max": c.capability.1,
            })).collect::<Vec<_>>(),
        })
    }

    fn snapshot(&self) -> MethodState {
        let mut params: BTreeMap<String, ParamSet> = self
            .clusters
            .iter()
            .enumerate()
            .map(|(k, c)| (format!("cluster-{k}"), c.params.clone()))
            .collect();
        if let Some(g) = &self.global {
            params.insert("global".into(), g.clone());
        }
        MethodState {
            params,
            json: serde_json::json!({
                "widths": self.clusters.iter().map(|c| self.ladder[c.rung].width).collect::<Vec<_>>(),
                "rounds_done": self.rounds_done,
            }),
        }
    }

    /// Models come back by width: each restored model goes to the cluster of its width
    /// (now, or when the fleet is observed after the restart).
    fn restore(&mut self, state: MethodState) -> Result<(), EngineError> {
        let widths: Vec<f64> = serde_json::from_value(state.json["widths"].clone())
            .map_err(|e| EngineError::Method(format!("fedtsa checkpoint: `widths`: {e}")))?;
        self.rounds_done = state.json["rounds_done"].as_u64().unwrap_or(0);
        let mut pool = Vec::new();
        for (name, params) in state.params {
            if name == "global" && self.global.is_some() {
                self.ladder[0].init.check_same_layout(&params)?;
                self.global = Some(params);
                continue;
            }
            let k = name
                .strip_prefix("cluster-")
                .and_then(|k| k.parse::<usize>().ok())
                .filter(|k| *k < widths.len())
                .ok_or_else(|| {
                    EngineError::Method(format!(
                        "fedtsa checkpoint holds an unknown model `{name}`"
                    ))
                })?;
            let rung = self
                .ladder
                .iter()
                .position(|r| r.width == widths[k])
                .ok_or_else(|| {
                    EngineError::Method(format!(
                        "fedtsa checkpoint: model `{name}` has width {}, which `method.widths` no longer lists",
                        widths[k]
                    ))
                })?;
            self.ladder[rung].init.check_same_layout(&params)?;
            pool.push(Cluster {
                rung,
                devices: 0,
                capability: (0.0, 0.0),
                params,
            });
        }
        self.restored = pool;
        if !self.devices.is_empty() {
            self.recluster();
        }
        self.slice_global();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
