//! The method interface: a server half that plans and aggregates, a client half that trains.
//!
//! Shaped like Flower's message-API strategies. Each round has one or more phases. In every
//! phase the server half turns the round into one [`Task`] per selected client (each may
//! differ: a depth prefix or frozen set in the [`View`], a width in the [`ModelSpec`], masked
//! values, low-rank factors, any named tensors) and folds the [`Reply`]s into its new state.
//! The server half may keep several global models and may train on server-side data during
//! aggregation. The client half executes a task on local data; it is stateless between tasks,
//! so that the same code serves the simulator and a client process on another machine.
//!
//! Tasks and replies cross between the halves only as protobuf bytes ([`Task::encode`],
//! [`Task::decode`]), in the simulator as on the network, so bytes are measured, not guessed.

use crate::EngineError;
use crate::held::TensorCache;
use crate::recipe::Recipe;
use flotilla_core::device::DeviceProfile;
use flotilla_core::wire::{self, Mask, ReplyMsg, ResourceMsg, TaskMsg};
use flotilla_core::{ParamSet, Tensor};
use flotilla_data::Dataset;
use flotilla_models::{ModelSpec, View};
use prost::Message;
use std::collections::{BTreeMap, HashMap};

mod kind;
mod server_ctx;

pub use kind::TaskKind;
pub use server_ctx::ServerCtx;

/// What the server knows about a client when planning.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// Client id (0..N-1 in the simulator).
    pub id: u64,
    /// The device's declared profile.
    pub profile: DeviceProfile,
    /// Number of local training examples.
    pub num_examples: usize,
}

/// Round and phase being planned or aggregated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseCtx {
    /// Round, from 1.
    pub round: u64,
    /// Phase within the round, from 0.
    pub phase: u32,
    /// The run seed (method randomness derives from it with `flotilla_core::seed`).
    pub seed: u64,
}

/// One unit of client work.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Round, from 1.
    pub round: u64,
    /// Phase, from 0.
    pub phase: u32,
    /// Client id.
    pub client: u64,
    /// What to do; the client half interprets it (e.g. `train`).
    pub kind: TaskKind,
    /// Architecture to build.
    pub model: ModelSpec,
    /// What of it to run and train.
    pub view: View,
    /// Local training recipe.
    pub recipe: Recipe,
    /// Tensors sent. A tensor whose name has a mask in `masks` or in the client's known
    /// masks travels masked (active values only).
    pub params: ParamSet,
    /// Masks sent with this task (only those the client does not hold yet).
    pub masks: Vec<Mask>,
    /// Tensors of `params` the client keeps after this task (frozen blocks, a shared
    /// basis): while it holds one at the same values, later tasks send its name and
    /// fingerprint instead of its values ([`crate::held`]). Empty: nothing is kept.
    pub hold: Vec<String>,
    /// Method-specific options.
    pub options: serde_json::Value,
}

/// Tensors a receiver holds, by name → fingerprint: those a task sends by reference.
pub type HeldTensors = BTreeMap<String, u64>;

/// What a task decoded on the client side needs besides the bytes: masks sent earlier.
pub type KnownMasks = HashMap<String, Mask>;

impl Task {
    /// Protobuf message; masked tensors use masks from `self.masks` or `known`; a tensor the
    /// receiver holds at the same fingerprint (`held`) travels as a reference.
    pub fn to_msg(&self, known: &KnownMasks, held: &HeldTensors) -> Result<TaskMsg, EngineError> {
        let mut all: HashMap<&str, &Mask> = known.iter().map(|(k, v)| (k.as_str(), v)).collect();
        for m in &self.masks {
            all.insert(&m.name, m);
        }
        let tensors = self
            .params
            .iter()
            .map(|t| {
                let kept = self.hold.contains(&t.name);
                let fingerprint = if kept { wire::fingerprint(t) } else { 0 };
                if kept && held.get(&t.name) == Some(&fingerprint) {
                    return Ok(wire::encode_held(t, fingerprint));
                }
                let mut msg = match all.get(t.name.as_str()) {
                    Some(m) => wire::encode_masked(t, m)?,
                    None => wire::encode_dense(t),
                };
                msg.fingerprint = fingerprint;
                Ok(msg)
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok(TaskMsg {
            protocol_version: wire::PROTOCOL_VERSION,
            round: self.round,
            phase: self.phase,
            client: self.client,
            kind: self.kind.to_string(),
            model_json: serde_json::to_string(&(&self.model, &self.view)).expect("serialisable"),
            recipe_json: serde_json::to_string(&self.recipe).expect("serialisable"),
            tensors,
            masks: self.masks.iter().map(Mask::encode).collect(),
            options_json: self.options.to_string(),
        })
    }

    /// Encoded bytes, every tensor with its values.
    pub fn encode(&self, known: &KnownMasks) -> Result<Vec<u8>, EngineError> {
        self.encode_for(known, &HeldTensors::new())
    }

    /// Encoded bytes for a receiver that holds the masks `known` and the tensors `held`.
    pub fn encode_for(
        &self,
        known: &KnownMasks,
        held: &HeldTensors,
    ) -> Result<Vec<u8>, EngineError> {
        Ok(self.to_msg(known, held)?.encode_to_vec())
    }

    /// Decodes and validates a task that names no held tensor; masks it carries are added
    /// to `known`.
    pub fn decode(bytes: &[u8], known: &mut KnownMasks) -> Result<Task, EngineError> {
        Self::decode_with(bytes, known, &mut TensorCache::new(0))
    }

    /// Decodes and validates a task: masks it carries are added to `known`, tensors it
    /// names by fingerprint come from `cache`, and tensors it marks to keep go into it
    /// (their values checked against their fingerprint).
    pub fn decode_with(
        bytes: &[u8],
        known: &mut KnownMasks,
        cache: &mut TensorCache,
    ) -> Result<Task, EngineError> {
        let msg = TaskMsg::decode(bytes)
            .map_err(|e| EngineError::Protocol(format!("malformed task: {e}")))?;
        check_version(msg.protocol_version)?;
        for m in &msg.masks {
            let mask = Mask::decode(m)?;
            known.insert(mask.name.clone(), mask);
        }
        let mut tensors = Vec::with_capacity(msg.tensors.len());
        let mut hold = Vec::new();
        for t in &msg.tensors {
            if t.encoding == wire::Encoding::Held as i32 {
                let held = cache.take(&t.name, t.fingerprint).ok_or_else(|| {
                    EngineError::Protocol(format!(
                        "the task names tensor `{}` by fingerprint {:016x}, which this client does not hold; it must be sent again (the client's inventory says what it holds)",
                        t.name, t.fingerprint
                    ))
                })?;
                let shape: Vec<u64> = held.shape.iter().map(|d| *d as u64).collect();
                if shape != t.shape {
                    return Err(EngineError::Protocol(format!(
                        "held tensor `{}` has shape {:?}, the task says {:?}",
                        t.name, held.shape, t.shape
                    )));
                }
                tensors.push(held);
            } else {
                let decoded = wire::decode_tensor(t, known)?;
                if t.fingerprint != 0 {
                    cache.keep(&decoded, t.fingerprint);
                }
                tensors.push(decoded);
            }
            if t.fingerprint != 0 {
                hold.push(t.name.clone());
            }
        }
        let params = ParamSet::from_tensors(tensors)?;
        let (model, view): (ModelSpec, View) = serde_json::from_str(&msg.model_json)
            .map_err(|e| EngineError::Protocol(format!("task model description: {e}")))?;
        let recipe: Recipe = serde_json::from_str(&msg.recipe_json)
            .map_err(|e| EngineError::Protocol(format!("task recipe: {e}")))?;
        let options = if msg.options_json.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&msg.options_json)
                .map_err(|e| EngineError::Protocol(format!("task options: {e}")))?
        };
        let masks = msg
            .masks
            .iter()
            .map(Mask::decode)
            .collect::<Result<_, _>>()?;
        Ok(Task {
            round: msg.round,
            phase: msg.phase,
            client: msg.client,
            kind: msg.kind.into(),
            model,
            view,
            recipe,
            params,
            masks,
            hold,
            options,
        })
    }
}

fn check_version(v: u32) -> Result<(), EngineError> {
    if v != wire::PROTOCOL_VERSION {
        return Err(EngineError::Protocol(format!(
            "peer speaks protocol version {v}, this build speaks {}; use matching flotilla versions",
            wire::PROTOCOL_VERSION
        )));
    }
    Ok(())
}

fn decode_tensors(msgs: &[wire::TensorMsg], known: &KnownMasks) -> Result<ParamSet, EngineError> {
    let tensors: Vec<Tensor> = msgs
        .iter()
        .map(|t| wire::decode_tensor(t, known))
        .collect::<Result<_, _>>()?;
    Ok(ParamSet::from_tensors(tensors)?)
}

/// Largest FLOP count a reply may report for one task (an exaFLOP: far beyond any client).
pub const MAX_REPLY_FLOPS: f64 = 1e18;
/// Longest wall time a reply may report for one task, seconds (about four months).
pub const MAX_REPLY_SECONDS: f64 = 1e7;

/// Resources measured while executing a task.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Resources {
    /// Heap high-water mark above the start of the task, bytes.
    pub peak_memory_bytes: u64,
    /// Analytic estimate of the same, bytes.
    pub estimated_memory_bytes: u64,
    /// Training FLOPs from the per-layer formulas.
    pub flops: f64,
    /// Wall time, seconds.
    pub wall_time_s: f64,
}

/// A client's answer to a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// Round of the task.
    pub round: u64,
    /// Phase of the task.
    pub phase: u32,
    /// Replying client.
    pub client: u64,
    /// Examples used; the weight of example-weighted rules.
    pub num_examples: u64,
    /// Tensors sent back (dense; masked tensors are sent with the task's masks, see
    /// [`Reply::encode`]).
    pub params: ParamSet,
    /// Scalar metrics such as `train_loss`.
    pub metrics: BTreeMap<String, f64>,
    /// Measured resources.
    pub resources: Resources,
}

impl Reply {
    /// Encoded bytes; tensors with a mask in `masks` travel masked.
    pub fn encode(&self, masks: &KnownMasks) -> Result<Vec<u8>, EngineError> {
        let tensors = self
            .params
            .iter()
            .map(|t| match masks.get(&t.name) {
                Some(m) => wire::encode_masked(t, m).map_err(EngineError::from),
                None => Ok(wire::encode_dense(t)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let msg = ReplyMsg {
            protocol_version: wire::PROTOCOL_VERSION,
            round: self.round,
            phase: self.phase,
            client: self.client,
            num_examples: self.num_examples,
            tensors,
            metrics: self.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            resources: Some(ResourceMsg {
                peak_memory_bytes: self.resources.peak_memory_bytes,
                estimated_memory_bytes: self.resources.estimated_memory_bytes,
                flops: self.resources.flops,
                wall_time_s: self.resources.wall_time_s,
            }),
        };
        Ok(msg.encode_to_vec())
    }

    /// Decodes and validates a reply: version, finite values, plausible example count.
    pub fn decode(bytes: &[u8], masks: &KnownMasks) -> Result<Reply, EngineError> {
        let msg = ReplyMsg::decode(bytes)
            .map_err(|e| EngineError::Protocol(format!("malformed reply: {e}")))?;
        check_version(msg.protocol_version)?;
        let params = decode_tensors(&msg.tensors, masks)?;
        params.check_finite()?;
        let r = msg.resources.unwrap_or_default();
        // Every number of a reply reaches records, metrics and checkpoints: refuse what
        // cannot be a measurement (NaN, infinities, negative or absurd figures).
        let refuse = |what: String| Err(EngineError::Protocol(format!("reply {what}")));
        for (key, v) in &msg.metrics {
            wire::check_label("metric name", key)?;
            if !v.is_finite() {
                return refuse(format!("metric `{key}` is {v}; metrics must be finite"));
            }
        }
        for (key, v, max) in [
            ("resources.flops", r.flops, MAX_REPLY_FLOPS),
            ("resources.wall_time_s", r.wall_time_s, MAX_REPLY_SECONDS),
        ] {
            if !(v.is_finite() && (0.0..=max).contains(&v)) {
                return refuse(format!(
                    "`{key}` is {v}; it must be a number in [0, {max:e}]"
                ));
            }
        }
        Ok(Reply {
            round: msg.round,
            phase: msg.phase,
            client: msg.client,
            num_examples: msg.num_examples,
            params,
            metrics: msg.metrics.into_iter().collect(),
            resources: Resources {
                peak_memory_bytes: r.peak_memory_bytes,
                estimated_memory_bytes: r.estimated_memory_bytes,
                flops: r.flops,
                wall_time_s: r.wall_time_s,
            },
        })
    }
}

/// The server half's decision for one client in one phase.
#[derive(Debug, Clone)]
pub enum Assignment {
    /// Send this task.
    Run(Box<Task>),
    /// Leave the client out of this phase, with the reason (logged and written to
    /// clients.jsonl), e.g. its memory budget fits no plan.
    Skip(String),
}

/// What happens after a phase has been aggregated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseEnd {
    /// Run the next phase of the same round with the same clients.
    NextPhase,
    /// The round is complete.
    RoundComplete,
}

/// A model the server evaluates.
#[derive(Debug, Clone)]
pub struct EvalModel {
    /// Label in metrics (e.g. `global`, `cluster-1`, `depth-8`).
    pub label: String,
    /// Architecture.
    pub spec: ModelSpec,
    /// View to evaluate it under.
    pub view: View,
    /// Parameters.
    pub params: ParamSet,
    /// How many devices deploy this model (e.g. the devices of one capability class). When
    /// the models set it, the reported test accuracy is the mean over devices
    /// (`mean_device_accuracy`); otherwise the plain mean over models.
    pub devices: Option<u64>,
    /// How the model is scored on the test set.
    pub readout: Readout,
}

/// How an evaluated model is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Readout {
    /// Its own classifier: test accuracy and loss of its logits.
    #[default]
    Classifier,
    /// A linear probe on its features ([`flotilla_models::Net::features`]): a logistic
    /// regression fitted on `[evaluation] probe_examples` labelled training images, scored on
    /// the test set. For encoders trained without labels, whose output is a projection rather
    /// than class logits. The probe's test accuracy is the model's test accuracy (also written
    /// as `probe_accuracy`); a probe has no test loss.
    LinearProbe,
}

/// Everything a method needs to resume: named parameter collections and JSON state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MethodState {
    /// Parameter collections by name (e.g. `global`, `cluster-0`).
    pub params: BTreeMap<String, ParamSet>,
    /// Other state (masks, ranks, stage counters…).
    pub json: serde_json::Value,
}

/// What a task is expected to cost its client ([`ServerHalf::task_cost`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskCost {
    /// Training memory estimate, bytes.
    pub memory_bytes: u64,
    /// Training FLOPs per local sample.
    pub flops_per_sample: f64,
}

/// The server half of a method.
pub trait ServerHalf: Send + Sync {
    /// Method name as in configs.
    fn name(&self) -> &str;

    /// Clients the server has not seen before, told before they are first planned (all
    /// clients of a simulation before round 1; network clients as they become available).
    /// For methods whose plan or evaluation depends on the whole fleet, e.g. FlexTrain's
    /// capability classes. Not part of the checkpoint: clients are told again after a restart.
    fn observe(&mut self, _clients: &[ClientInfo]) {}

    /// Plans one phase: one assignment per client, in the order given. Must not change
    /// state, so the engine can also dry-run it (to refuse an impossible fleet at start).
    fn plan(&self, ctx: &PhaseCtx, clients: &[ClientInfo]) -> Result<Vec<Assignment>, EngineError>;

    /// A fold for this phase's replies when the phase's aggregation is exactly the
    /// example-weighted mean of the replies' tensors over `template`'s layout: the network
    /// server then folds each accepted reply in as it arrives and keeps none, so its memory
    /// does not grow with the clients. [`ServerHalf::aggregate`] then gets the replies without
    /// their tensors and the mean from [`ServerCtx::take_mean`]. `None` (the default): the
    /// replies arrive whole. Rules that need every reply at once (median, trimmed mean,
    /// Krum) and partial-support means return `None`.
    fn mean_fold(&self, _ctx: &PhaseCtx) -> Option<flotilla_core::aggregate::MeanFold> {
        None
    }

    /// Folds the replies of one phase (sorted by client id) into new state.
    fn aggregate(
        &mut self,
        ctx: &PhaseCtx,
        replies: &[Reply],
        server: &mut ServerCtx<'_>,
    ) -> Result<PhaseEnd, EngineError>;

    /// Checks a decoded reply against the task it answers before it is accepted (the driver
    /// has already checked addressing, finite values and the example count). The default
    /// accepts any subset of the task's tensors with their shapes (a client may leave out
    /// frozen or untrained tensors); a method that needs every tensor back, or whose clients
    /// send new ones (gradients, other factors), overrides it. `Err` is the refusal reason,
    /// logged and reported to the client.
    fn check_reply(&self, task: &Task, reply: &Reply) -> Result<(), String> {
        for t in reply.params.iter() {
            match task.params.get(&t.name) {
                Some(sent) if sent.shape == t.shape => {}
                Some(sent) => {
                    return Err(format!(
                        "update does not match the task's tensors: `{}` has shape {:?}, the task sent {:?}",
                        t.name, t.shape, sent.shape
                    ));
                }
                None => {
                    return Err(format!(
                        "update does not match the task's tensors: the task sent no `{}`",
                        t.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// What the planner expects `task` to cost a client: the training memory estimate and
    /// FLOPs per training sample (what `flotilla plan` prints). The default is the engine's
    /// estimate for the task's model, view and recipe with one model input per sample; a
    /// method whose objective runs several inputs per sample overrides it.
    fn task_cost(&self, task: &Task) -> TaskCost {
        TaskCost {
            memory_bytes: crate::local::estimate_memory(
                &task.model,
                &task.view,
                &task.params,
                &task.recipe,
            )
            .total(),
            flops_per_sample: flotilla_models::flops::training(&task.model, &task.view, 1),
        }
    }

    /// The models to evaluate (one, or several: per cluster, per depth…).
    fn eval_models(&self) -> Vec<EvalModel>;

    /// Extra per-round metrics (e.g. `sparsity`), merged into metrics.jsonl.
    fn round_metrics(&self) -> serde_json::Map<String, serde_json::Value> {
        serde_json::Map::new()
    }

    /// What the method reports once for the whole run (e.g. the clustering it found),
    /// written to summary.json as `method_details`. `Null` (the default): nothing.
    fn summary(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Masks the server knows (tensors with a mask travel masked in both directions).
    fn masks(&self) -> KnownMasks {
        KnownMasks::new()
    }

    /// State for checkpoints.
    fn snapshot(&self) -> MethodState;

    /// Restores a snapshot.
    fn restore(&mut self, state: MethodState) -> Result<(), EngineError>;
}

/// A client's local data.
#[derive(Debug, Clone)]
pub struct ClientData {
    /// Training examples.
    pub train: Dataset,
    /// Held-out local examples for per-client evaluation (may be empty).
    pub holdout: Dataset,
    /// Per-channel normalisation mean.
    pub mean: Vec<f32>,
    /// Per-channel normalisation std.
    pub std: Vec<f32>,
}

/// Client-side context of one task.
#[derive(Debug, Clone)]
pub struct ClientCtx {
    /// Run seed; shuffling derives from (seed, round, client).
    pub seed: u64,
    /// This device's profile: the client refuses work over its memory budget.
    pub profile: DeviceProfile,
    /// Masks the client holds (sent with this task or earlier); training keeps masked
    /// positions at zero.
    pub masks: KnownMasks,
}

/// The client half of a method.
pub trait ClientHalf: Send + Sync {
    /// Executes a task on local data.
    fn execute(
        &self,
        task: &Task,
        data: &ClientData,
        ctx: &ClientCtx,
    ) -> Result<Reply, EngineError>;
}
