//! Tensors a client already holds: a task names them by (name, fingerprint) instead of
//! sending their values again (FLL's frozen blocks within a stage, FeDLRT's basis between
//! the two phases of a round).
//!
//! A method marks the tensors a client should keep ([`crate::Task::hold`]). Both ends keep
//! the same ledger of what the client holds, under the same byte cap
//! (`fleet.held_cache_mib`), least recently used evicted first:
//! - the driver keeps one [`HeldLedger`] per client, fingerprints and sizes only, so its
//!   memory is flat in the fleet size; it is checkpointed with the run;
//! - a network client keeps a [`TensorCache`]: the same ledger beside the tensors.
//!
//! Replaying the same sequence of "received or used (name, fingerprint)" on both sides keeps
//! them in step. Where they drift anyway (a restarted client process, a server restored from
//! a checkpoint older than what its clients hold), the client's [`Inventory`], sent with
//! every pull, wins: [`crate::driver::Prepared::reconcile`] sends in full what the client
//! does not hold. A task never depends on a tensor the client lacks.

use flotilla_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Default of `fleet.held_cache_mib`: room for the frozen part of every model in the zoo.
pub const DEFAULT_CACHE_MIB: f64 = 256.0;

/// What one receiver holds: per tensor name, the fingerprint and size of the version it
/// holds and when it last used it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeldLedger {
    entries: BTreeMap<String, Entry>,
    /// Logical time of the last use, for least-recently-used eviction.
    clock: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    fingerprint: u64,
    bytes: u64,
    used: u64,
}

impl HeldLedger {
    /// Whether the receiver holds `name` at this fingerprint.
    pub fn holds(&self, name: &str, fingerprint: u64) -> bool {
        self.entries
            .get(name)
            .is_some_and(|e| e.fingerprint == fingerprint)
    }

    /// Records that the receiver received or used `name` at `fingerprint` (replacing another
    /// version of it), then evicts the least recently used entries until the total is at
    /// most `cap` bytes. A tensor larger than the cap is not kept. Returns the evicted names.
    pub fn record(&mut self, name: &str, fingerprint: u64, bytes: u64, cap: u64) -> Vec<String> {
        self.clock += 1;
        if bytes > cap {
            return self
                .entries
                .remove(name)
                .map(|_| vec![name.to_string()])
                .unwrap_or_default();
        }
        self.entries.insert(
            name.to_string(),
            Entry {
                fingerprint,
                bytes,
                used: self.clock,
            },
        );
        let mut evicted = Vec::new();
        while self.bytes() > cap {
            // The entry just recorded is the most recent and fits alone, so it stays.
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(n, _)| n.clone())
                .expect("over the cap means not empty");
            self.entries.remove(&oldest);
            evicted.push(oldest);
        }
        evicted
    }

    /// Bytes of the tensors held.
    pub fn bytes(&self) -> u64 {
        self.entries.values().map(|e| e.bytes).sum()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// (name, fingerprint) of every tensor held.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.entries
            .iter()
            .map(|(n, e)| (n.as_str(), e.fingerprint))
    }
}

/// What a client says it holds when it asks for work: masks and tensors by fingerprint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inventory {
    /// Mask name → [`flotilla_core::wire::Mask::fingerprint`].
    pub masks: BTreeMap<String, u64>,
    /// Tensor name → [`flotilla_core::wire::fingerprint`].
    pub tensors: BTreeMap<String, u64>,
}

/// A client's kept tensors under a byte cap, in step with the server's [`HeldLedger`] of it.
#[derive(Debug, Clone)]
pub struct TensorCache {
    ledger: HeldLedger,
    tensors: HashMap<String, Tensor>,
    cap: u64,
}

impl TensorCache {
    /// An empty cache holding at most `cap_bytes` of tensor values (0 keeps nothing).
    pub fn new(cap_bytes: u64) -> Self {
        Self {
            ledger: HeldLedger::default(),
            tensors: HashMap::new(),
            cap: cap_bytes,
        }
    }

    /// The tensor held under `name` at `fingerprint`, marked as used now.
    pub fn take(&mut self, name: &str, fingerprint: u64) -> Option<Tensor> {
        if !self.ledger.holds(name, fingerprint) {
            return None;
        }
        let t = self.tensors.get(name)?.clone();
        self.ledger
            .record(name, fingerprint, 4 * t.numel() as u64, self.cap);
        Some(t)
    }

    /// Keeps a copy of `t` (received in full) under its fingerprint, evicting as the
    /// server's ledger does.
    pub fn keep(&mut self, t: &Tensor, fingerprint: u64) {
        let evicted = self
            .ledger
            .record(&t.name, fingerprint, 4 * t.numel() as u64, self.cap);
        for n in &evicted {
            self.tensors.remove(n);
        }
        if self.ledger.holds(&t.name, fingerprint) {
            self.tensors.insert(t.name.clone(), t.clone());
        }
    }

    /// Bytes of the tensors held.
    pub fn bytes(&self) -> u64 {
        self.ledger.bytes()
    }

    /// (name, fingerprint) of every tensor held.
    pub fn inventory(&self) -> BTreeMap<String, u64> {
        self.ledger
            .iter()
            .map(|(n, f)| (n.to_string(), f))
            .collect()
    }
}

/// `fleet.held_cache_mib` in bytes.
pub fn cache_bytes(mib: f64) -> u64 {
    (mib * 1024.0 * 1024.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, n: usize, v: f32) -> Tensor {
        Tensor::new(name, vec![n], vec![v; n]).unwrap()
    }

    #[test]
    fn least_recently_used_goes_first_and_both_sides_agree() {
        let cap = 4 * 250;
        let mut ledger = HeldLedger::default();
        let mut cache = TensorCache::new(cap);
        let (a, b, c) = (t("a", 100, 1.0), t("b", 100, 2.0), t("c", 100, 3.0));
        let fp = flotilla_core::wire::fingerprint;
        for x in [&a, &b] {
            ledger.record(&x.name, fp(x), 400, cap);
            cache.keep(x, fp(x));
        }
        // `a` is used again, so `b` is the oldest when `c` arrives.
        assert!(ledger.holds("a", fp(&a)));
        ledger.record("a", fp(&a), 400, cap);
        assert_eq!(cache.take("a", fp(&a)), Some(a.clone()));
        assert_eq!(ledger.record("c", fp(&c), 400, cap), vec!["b".to_string()]);
        cache.keep(&c, fp(&c));
        assert_eq!(
            cache.inventory(),
            ledger.iter().map(|(n, f)| (n.to_string(), f)).collect()
        );
        assert!(cache.take("b", fp(&b)).is_none());
        assert_eq!(cache.bytes(), 800);
        // another version of a name replaces it; a stale fingerprint is not served
        let a2 = t("a", 100, 9.0);
        cache.keep(&a2, fp(&a2));
        assert!(cache.take("a", fp(&a)).is_none());
        assert_eq!(cache.take("a", fp(&a2)), Some(a2));
    }

    #[test]
    fn a_zero_cap_keeps_nothing() {
        let mut cache = TensorCache::new(0);
        let a = t("a", 10, 1.0);
        let f = flotilla_core::wire::fingerprint(&a);
        cache.keep(&a, f);
        assert!(cache.take("a", f).is_none());
        assert_eq!(cache.bytes(), 0);
        let mut ledger = HeldLedger::default();
        ledger.record("a", f, 40, 0);
        assert!(ledger.is_empty());
    }
}
