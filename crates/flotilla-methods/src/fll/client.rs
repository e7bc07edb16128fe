//! FLL's and FedSSL's client half.

use super::SslTask;
use super::contrastive::SelfSupervised;
use flotilla_engine::local::train_task;
use flotilla_engine::{ClientCtx, ClientData, ClientHalf, EngineError, Reply, Task};
use flotilla_models::ModelSpec;
use std::collections::BTreeSet;

/// The client half: fills the blocks it was not sent (deeper or dropped: they do not run, so
/// their values never reach the output) with zeros, trains what the view leaves trainable
/// with the self-supervised objective and replies with it.
pub struct FllClient;

impl ClientHalf for FllClient {
    fn execute(
        &self,
        task: &Task,
        data: &ClientData,
        ctx: &ClientCtx,
    ) -> Result<Reply, EngineError> {
        crate::common::require_train(task, "fll")?;
        let opts: SslTask = serde_json::from_value(task.options.clone())
            .map_err(|e| EngineError::Task(format!("fll task options: {e}")))?;
        let filled = crate::common::with_unsent_zeroed(task)?;
        // A block the task sends must run: a sent block that is skipped would be traffic
        // for nothing, and an unsent block that runs would run on zeros.
        let sent_blocks: BTreeSet<usize> = task
            .params
            .names()
            .filter_map(ModelSpec::block_of)
            .collect();
        for b in 0..task.model.num_blocks() {
            if sent_blocks.contains(&b) != task.view.block_active(b) {
                return Err(EngineError::Task(format!(
                    "block {b} is {} but {}",
                    if sent_blocks.contains(&b) {
                        "sent"
                    } else {
                        "not sent"
                    },
                    if task.view.block_active(b) {
                        "runs"
                    } else {
                        "does not run"
                    }
                )));
            }
        }
        if let Some(stage) = opts.stage
            && opts
                .dropped
                .iter()
                .any(|&d| d >= stage || sent_blocks.contains(&d))
        {
            return Err(EngineError::Task(format!(
                "dropped blocks {:?} must be frozen blocks below {stage} that are not sent",
                opts.dropped
            )));
        }
        let objective = SelfSupervised {
            loss: opts.objective,
            temperature: opts.temperature,
            augment: opts.augment,
            view: task.view.clone(),
        };
        train_task(&filled, data, ctx, || Ok(objective))
    }
}
