//! Events of the round loop and the sinks that consume them (metrics files, progress…).
//! The loop knows no sink; sinks know no loop.

use crate::EngineError;
pub use flotilla_report::{ClientRecord, ClientStatus, RoundRecord};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// Something the round loop reports.
#[derive(Debug)]
pub enum Event<'a> {
    /// The run starts (or resumes) at `first_round` of `rounds`.
    Started {
        /// First round to run.
        first_round: u64,
        /// Last round.
        rounds: u64,
    },
    /// A round finished.
    Round {
        /// Per-round record.
        round: &'a RoundRecord,
        /// Per-client records of the round.
        clients: &'a [ClientRecord],
    },
    /// A checkpoint was written after `round`.
    Checkpoint {
        /// Round covered.
        round: u64,
    },
    /// The run finished.
    Finished {
        /// The summary written to summary.json.
        summary: &'a serde_json::Value,
    },
}

/// A consumer of events.
pub trait Sink {
    /// Handles one event.
    fn on_event(&mut self, event: &Event<'_>) -> Result<(), EngineError>;
}

/// Appends metrics.jsonl and clients.jsonl in a run directory, one flushed line per record.
pub struct MetricsFiles {
    metrics: File,
    clients: File,
}

fn io(path: &Path, e: std::io::Error) -> EngineError {
    EngineError::Io(format!("{}: {e}", path.display()))
}

impl MetricsFiles {
    /// Opens (appending) the files in `dir`, keeping only records of rounds ≤ `keep_through`
    /// (a resumed run drops what came after its checkpoint).
    pub fn open(dir: &Path, keep_through: u64) -> Result<Self, EngineError> {
        let open = |name: &str| -> Result<File, EngineError> {
            let path = dir.join(name);
            truncate_after_round(&path, keep_through)?;
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| io(&path, e))
        };
        Ok(Self {
            metrics: open(flotilla_report::METRICS_FILE)?,
            clients: open(flotilla_report::CLIENTS_FILE)?,
        })
    }
}

/// Rewrites a JSONL file keeping the lines whose `round` is ≤ `keep_through`.
fn truncate_after_round(path: &PathBuf, keep_through: u64) -> Result<(), EngineError> {
    let Ok(f) = File::open(path) else {
        return Ok(());
    };
    let kept: Vec<String> = BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("round").and_then(|r| r.as_u64()))
                .is_some_and(|r| r <= keep_through)
        })
        .collect();
    let mut text = kept.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    flotilla_core::safetensors_io::write_atomic(path, text.as_bytes())?;
    Ok(())
}

impl Sink for MetricsFiles {
    fn on_event(&mut self, event: &Event<'_>) -> Result<(), EngineError> {
        if let Event::Round { round, clients } = event {
            let line = serde_json::to_string(round).expect("serialisable");
            writeln!(self.metrics, "{line}")
                .map_err(|e| EngineError::Io(format!("metrics.jsonl: {e}")))?;
            let mut text = String::new();
            for c in *clients {
                text.push_str(&serde_json::to_string(c).expect("serialisable"));
                text.push('\n');
            }
            self.clients
                .write_all(text.as_bytes())
                .map_err(|e| EngineError::Io(format!("clients.jsonl: {e}")))?;
            self.metrics
                .flush()
                .and(self.clients.flush())
                .map_err(|e| EngineError::Io(e.to_string()))?;
        }
        Ok(())
    }
}
