//! Local training and evaluation on burn's `flex` backend.
//!
//! - [`job`]: one [`TrainJob`] value per run of local training, which trains or only takes
//!   gradients (the loop);
//! - [`objective`]: the [`Objective`] trait a method implements for its loss, and the losses
//!   it builds from;
//! - `micro`: one step split into micro-batches, one per thread;
//! - `optim` and `sgd`: the optimizers, masks and the additive gradient correction;
//! - [`eval`]: evaluation of global models; [`probe`]: linear-probe evaluation of features;
//! - [`task`]: the standard client step (budget check, train, reply with measured resources).

pub mod eval;
mod input;
pub mod job;
mod micro;
pub mod objective;
mod optim;
pub mod probe;
pub(crate) mod sgd;
pub mod task;

pub use crate::recipe::{OptimizerKind, Recipe};
pub use eval::{EVAL_CHUNK, evaluate, evaluate_views, logits};
pub use job::{GradientOutcome, TrainJob, TrainOutcome};
pub use objective::{
    Batch, CrossEntropy, Objective, SoftTargets, cross_entropy, distillation_kl, kl_to_probs,
    one_hot, soft_cross_entropy, softmax_rows,
};
pub use optim::TrainMasks;
pub use probe::{ProbeConfig, fit_and_score, probe_accuracy};
pub use task::{
    estimate_memory, gradient_task, inputs_of, param_counts, train_task, train_task_with,
};
