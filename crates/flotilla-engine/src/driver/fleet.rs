//! Where clients live, behind one trait: the simulator's virtual clients and the network's
//! client processes receive the same prepared task bytes and answer with the same records.

use super::Driver;
use crate::EngineError;
use crate::held::{self, Inventory};
use crate::method::{ClientData, ClientInfo, HeldTensors, KnownMasks, Reply, Task};
use crate::sink::ClientRecord;
use flotilla_core::aggregate::MeanFold;
use std::collections::BTreeMap;

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
    ///
    /// With `fold` (only ever given to a fleet on a wall clock, see
    /// [`ServerHalf::mean_fold`](crate::ServerHalf::mean_fold)), each accepted reply is
    /// folded in as it arrives by [`fold_reply`](super::fold_reply), which drops its tensors,
    /// so the fleet never holds every reply at once.
    fn execute(
        &mut self,
        tasks: Vec<Prepared>,
        server_masks: &KnownMasks,
        check: &ReplyCheck<'_>,
        fold: Option<&mut MeanFold>,
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

impl Driver {
    /// Attaches to each task the server masks its client lacks (by fingerprint), finds the
    /// tensors it already holds, and records what the client holds after the task.
    pub(super) fn prepare(&mut self, tasks: Vec<Task>, server_masks: &KnownMasks) -> Vec<Prepared> {
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
}
