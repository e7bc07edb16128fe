//! Checkpoints: one atomic commit per completed round (a versioned parameter file, then the
//! `state.json` that names it), retried when a write fails, and restored on resume.

use super::{Driver, Totals};
use crate::EngineError;
use crate::held::HeldLedger;
use crate::method::MethodState;
use flotilla_core::{ParamSet, Tensor, safetensors_io};
use std::collections::{BTreeMap, HashMap};

/// Name of the checkpoint folder inside a run directory.
pub const CHECKPOINT_DIR: &str = "checkpoint";

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
pub(super) fn check_resumable(text: &str) -> Result<(), String> {
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

impl Driver {
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
    pub(super) fn write_checkpoint_steps(
        &self,
        round: u64,
        last: CheckpointStep,
    ) -> Result<(), EngineError> {
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
        // Parameter files state.json does not name (earlier rounds', and the unversioned file
        // of runs written before names carried the round) are removed.
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
    pub(super) fn checkpoint(&mut self, round: u64) -> Result<(), EngineError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::record::ProbeFloor;
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
            floor in proptest::option::of(any_f64()),
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
                probe_floor: floor.map(|f| ProbeFloor { raw_pixels: f, initial_model: 0.5 }),
                server_flops: server,
                server_wall_s: wall,
            };
            let text = serde_json::json!({
                "round": 3, "totals": totals, "client_masks": masks, "client_tensors": {}
            })
            .to_string();
            let finite = [sim, wall, flops, server].iter().all(|v| v.is_finite())
                && acc.is_none_or(f64::is_finite)
                && floor.is_none_or(f64::is_finite);
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
