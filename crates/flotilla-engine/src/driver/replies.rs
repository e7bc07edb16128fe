//! What every reply passes before it counts, whatever the method, and the client records it
//! fills.

use super::{ClientRun, ReplyCheck};
use crate::method::{KnownMasks, Reply, Task};
use crate::sink::ClientRecord;
use crate::sink::ClientStatus;
use flotilla_core::aggregate::{Contribution, MeanFold};
use flotilla_core::device::DeviceProfile;

/// The checks every reply passes before it counts, whatever the method: addressed to the
/// task it answers, and an example count between 1 and what the client declared.
pub(super) fn check_reply(task: &Task, reply: &Reply, declared: Option<u64>) -> Result<(), String> {
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
            rec.status = ClientStatus::Failed;
            rec.reason = Some(format!("update refused: {reason}"));
            let run = ClientRun {
                record: rec,
                reply: None,
            };
            (run, Err(reason))
        }
    }
}

/// Folds an accepted reply into the phase's running mean (weight: its example count) and
/// drops its tensors, keeping the rest of the reply for the method. A reply the fold cannot
/// take (values too large to average) is refused: the client's round fails with the reason,
/// which is returned so a network client can be told.
pub fn fold_reply(run: &mut ClientRun, fold: &mut MeanFold) -> Result<(), String> {
    let Some(reply) = &mut run.reply else {
        return Ok(());
    };
    let added = fold.add(&Contribution {
        params: &reply.params,
        weight: reply.num_examples as f64,
    });
    match added {
        Ok(()) => {
            reply.params = flotilla_core::ParamSet::new();
            Ok(())
        }
        Err(e) => {
            let reason = e.to_string();
            let rec = &mut run.record;
            tracing::warn!(round = rec.round, client = rec.client, %reason, "update refused");
            rec.status = ClientStatus::Failed;
            rec.reason = Some(format!("update refused: {reason}"));
            run.reply = None;
            Err(reason)
        }
    }
}

/// A client's record before it runs: status `ok`, no figures.
pub fn blank_record(round: u64, c: u64, p: &DeviceProfile) -> ClientRecord {
    ClientRecord {
        round,
        client: c,
        tier: p.tier.clone(),
        status: ClientStatus::Ok,
        ..Default::default()
    }
}

/// Adds one phase's figures to the round's record of a client.
pub(super) fn merge_record(into: &mut ClientRecord, phase: &ClientRecord) {
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
    if phase.status != ClientStatus::Ok {
        into.status = phase.status;
        into.reason = phase.reason.clone();
    }
}
