//! What a run records: each round's line of metrics.jsonl, the running totals that
//! checkpoints carry, and summary.json.

use super::Driver;
use crate::sim::peak_rss_bytes;
use crate::sink::{ClientRecord, ClientStatus, RoundRecord};
use std::time::Instant;

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Totals {
    pub(super) bytes_up: u64,
    pub(super) bytes_down: u64,
    pub(super) sim_time_s: f64,
    pub(super) wall_time_s: f64,
    pub(super) flops: f64,
    pub(super) peak_client_memory_bytes: u64,
    pub(super) best_accuracy: Option<f64>,
    pub(super) last_accuracy: Option<f64>,
    pub(super) last_loss: Option<f64>,
    /// Set when the evaluated models carry device counts.
    #[serde(default)]
    pub(super) last_mean_device_accuracy: Option<f64>,
    /// Linear-probe test accuracy of the raw pixels and of the untrained models, measured
    /// before round 1 when a model is scored by a probe: the floors a learned representation
    /// must beat.
    #[serde(default)]
    pub(super) probe_floor: Option<ProbeFloor>,
    /// Server-side FLOPs the method reported (absent in older checkpoints).
    #[serde(default)]
    pub(super) server_flops: f64,
    /// Wall time of the server half's planning and aggregation (absent in older checkpoints).
    #[serde(default)]
    pub(super) server_wall_s: f64,
}

/// What a linear probe reaches without training: on raw pixels, and on the models as
/// initialised (a random encoder).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) struct ProbeFloor {
    pub(super) raw_pixels: f64,
    pub(super) initial_model: f64,
}

impl Totals {
    /// The first figure that JSON cannot hold (NaN, infinity), by name.
    pub(super) fn non_finite(&self) -> Option<&'static str> {
        let figures = [
            ("sim_time_s", Some(self.sim_time_s)),
            ("wall_time_s", Some(self.wall_time_s)),
            ("flops", Some(self.flops)),
            ("server_flops", Some(self.server_flops)),
            ("server_wall_s", Some(self.server_wall_s)),
            ("best_accuracy", self.best_accuracy),
            ("last_accuracy", self.last_accuracy),
            ("last_loss", self.last_loss),
            ("last_mean_device_accuracy", self.last_mean_device_accuracy),
            (
                "probe_floor.raw_pixels",
                self.probe_floor.as_ref().map(|f| f.raw_pixels),
            ),
            (
                "probe_floor.initial_model",
                self.probe_floor.as_ref().map(|f| f.initial_model),
            ),
        ];
        figures
            .into_iter()
            .find(|(_, v)| v.is_some_and(|v| !v.is_finite()))
            .map(|(name, _)| name)
    }
}

/// What a round costs besides the clients' own figures.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct RoundCost {
    /// Simulated time: the slowest counted client (or the deadline), plus the server's FLOPs
    /// at `simulation.server_gflops`.
    pub(super) sim_s: f64,
    /// Wall time of local training: the critical path of each phase.
    pub(super) train_wall_s: f64,
    /// Wall time of the server half's plan and aggregate calls.
    pub(super) server_wall_s: f64,
    /// FLOPs the server half reported through `ServerCtx`.
    pub(super) server_flops: f64,
}

/// A round's evaluation: the accuracy and loss it reports (`None` when it did not evaluate),
/// the mean device accuracy when the models carry device counts, and the metrics for
/// metrics.jsonl (the method's own, per-model accuracies, the probe, per-client figures).
pub(super) struct RoundEval {
    pub(super) accuracy: Option<f64>,
    pub(super) loss: Option<f64>,
    pub(super) device_accuracy: Option<f64>,
    pub(super) extra: serde_json::Map<String, serde_json::Value>,
}

impl Driver {
    /// The round's line of metrics.jsonl, added to the run's totals.
    pub(super) fn record_round(
        &mut self,
        round: u64,
        clients: &[ClientRecord],
        eval: RoundEval,
        cost: RoundCost,
        started: Instant,
        eval_wall: f64,
    ) -> RoundRecord {
        let ok = || clients.iter().filter(|c| c.status == ClientStatus::Ok);
        let train_losses: Vec<f64> = ok().filter_map(|c| c.train_loss).collect();
        let mut extra = eval.extra;
        let wall = started.elapsed().as_secs_f64();
        // Time outside local training and evaluation: planning, encoding, decoding,
        // aggregation, bookkeeping (the figure the W2 overhead benchmark reports).
        extra.insert("train_wall_s".into(), cost.train_wall_s.into());
        extra.insert("eval_wall_s".into(), eval_wall.into());
        extra.insert(
            "overhead_s".into(),
            (wall - cost.train_wall_s - eval_wall).max(0.0).into(),
        );
        let record = RoundRecord {
            round,
            test_accuracy: eval.accuracy,
            test_loss: eval.loss,
            train_loss: (!train_losses.is_empty())
                .then(|| train_losses.iter().sum::<f64>() / train_losses.len() as f64),
            clients: ok().count() as u64,
            bytes_up: clients.iter().map(|c| c.bytes_up).sum(),
            bytes_down: clients.iter().map(|c| c.bytes_down).sum(),
            sim_time_s: cost.sim_s,
            wall_time_s: wall,
            peak_client_memory_bytes: clients
                .iter()
                .map(|c| c.peak_memory_bytes)
                .max()
                .unwrap_or(0),
            flops: clients.iter().map(|c| c.flops).sum(),
            server_flops: cost.server_flops,
            server_wall_s: cost.server_wall_s,
            extra,
        };
        let t = &mut self.totals;
        t.bytes_up += record.bytes_up;
        t.bytes_down += record.bytes_down;
        t.sim_time_s += record.sim_time_s;
        t.wall_time_s += record.wall_time_s;
        t.flops += record.flops;
        t.server_flops += record.server_flops;
        t.server_wall_s += record.server_wall_s;
        t.peak_client_memory_bytes = t
            .peak_client_memory_bytes
            .max(record.peak_client_memory_bytes);
        if let Some(a) = eval.accuracy {
            t.best_accuracy = Some(t.best_accuracy.map_or(a, |b| b.max(a)));
            t.last_accuracy = Some(a);
            t.last_loss = eval.loss;
            t.last_mean_device_accuracy = eval.device_accuracy;
        }
        record
    }

    /// The figures of summary.json.
    pub fn summary(&self) -> serde_json::Value {
        let t = &self.totals;
        let params = self
            .server
            .eval_models()
            .first()
            .map(|m| m.params.numel())
            .unwrap_or(0);
        let mut summary = serde_json::json!({
            "method": self.server.name(),
            "rounds": self.exp.rounds,
            "seed": self.exp.seed,
            "num_clients": self.exp.data.num_clients,
            "model_parameters": params,
            "final_test_accuracy": t.last_accuracy,
            "best_test_accuracy": t.best_accuracy,
            "final_mean_device_accuracy": t.last_mean_device_accuracy,
            "final_test_loss": t.last_loss,
            "probe_floor": t.probe_floor,
            "total_bytes_up": t.bytes_up,
            "total_bytes_down": t.bytes_down,
            "total_flops": t.flops,
            "total_server_flops": t.server_flops,
            "server_wall_s": t.server_wall_s,
            "peak_client_memory_bytes": t.peak_client_memory_bytes,
            "sim_time_s": t.sim_time_s,
            "wall_time_s": t.wall_time_s,
            "peak_rss_bytes": peak_rss_bytes(),
            // Wall times depend on the micro-kernels this CPU was given (and results differ
            // between sets in the last bits).
            "gemm_kernels": flotilla_models::kernels::gemm_kernels().name(),
        });
        let details = self.server.summary();
        if !details.is_null() {
            summary["method_details"] = details;
        }
        summary
    }
}
