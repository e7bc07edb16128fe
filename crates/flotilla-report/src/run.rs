//! Records of a run directory and how to read them.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::error::ReportError;

/// File name of the per-round metrics inside a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// File name of the per-client, per-round records inside a run directory.
pub const CLIENTS_FILE: &str = "clients.jsonl";
/// File name of the run summary inside a run directory.
pub const SUMMARY_FILE: &str = "summary.json";

/// Deserializes an `f64` that may be written as `null`.
///
/// JSON has no NaN or infinity, and serde_json writes those values as
/// `null`; reading `null` back as NaN keeps such files loadable. Plots and
/// tables skip non-finite values.
fn f64_or_nan<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

/// One line of `metrics.jsonl`: what happened in one round.
///
/// Fields not listed here (method-specific values such as `sparsity` or
/// `mean_device_accuracy`) are kept in [`extra`](Self::extra) and written
/// back at the top level when serialized.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// The round number, 1-based.
    pub round: u64,
    /// Test accuracy in `[0, 1]`; `None` when the round was not evaluated.
    pub test_accuracy: Option<f64>,
    /// Test loss; `None` when the round was not evaluated.
    pub test_loss: Option<f64>,
    /// Mean training loss over the clients of the round, if any trained.
    pub train_loss: Option<f64>,
    /// Number of clients that completed the round.
    pub clients: u64,
    /// Bytes sent from clients to the server in this round.
    pub bytes_up: u64,
    /// Bytes sent from the server to clients in this round.
    pub bytes_down: u64,
    /// Simulated duration of this round, in seconds (`null` reads as NaN).
    #[serde(deserialize_with = "f64_or_nan")]
    pub sim_time_s: f64,
    /// Wall-clock time this round took, in seconds (`null` reads as NaN).
    #[serde(deserialize_with = "f64_or_nan")]
    pub wall_time_s: f64,
    /// Largest measured peak memory of any client in this round, in bytes.
    pub peak_client_memory_bytes: u64,
    /// Training FLOPs of this round summed over clients (`null` reads as NaN).
    #[serde(deserialize_with = "f64_or_nan")]
    pub flops: f64,
    /// FLOPs the method reported for its server-side work in this round (0 when none, and in
    /// runs written before the field existed; `null` reads as NaN).
    #[serde(default, deserialize_with = "f64_or_nan")]
    pub server_flops: f64,
    /// Wall-clock time of the server half's planning and aggregation in this round, in
    /// seconds (0 in runs written before the field existed; `null` reads as NaN).
    #[serde(default, deserialize_with = "f64_or_nan")]
    pub server_wall_s: f64,
    /// Every other field of the line, kept as is.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One line of `clients.jsonl`: what one client did in one round.
///
/// Fields not listed here are kept in [`extra`](Self::extra).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// The round number, 1-based.
    pub round: u64,
    /// The client id.
    pub client: u64,
    /// The device tier the client belongs to.
    pub tier: String,
    /// How the client's round ended (`"ok"`, `"dropped"`, … in the file).
    pub status: ClientStatus,
    /// Why the client did not complete the round, if it did not.
    pub reason: Option<String>,
    /// Number of local training examples.
    pub num_examples: u64,
    /// Local training loss, if the client trained.
    pub train_loss: Option<f64>,
    /// Bytes the client sent to the server.
    pub bytes_up: u64,
    /// Bytes the client received from the server.
    pub bytes_down: u64,
    /// Training FLOPs of the client in this round (`null` reads as NaN).
    #[serde(deserialize_with = "f64_or_nan")]
    pub flops: f64,
    /// Measured peak memory of the client, in bytes.
    pub peak_memory_bytes: u64,
    /// Memory the planner estimated for the client, in bytes.
    pub estimated_memory_bytes: u64,
    /// Wall-clock time of the client's work, in seconds (`null` reads as NaN).
    #[serde(deserialize_with = "f64_or_nan")]
    pub wall_time_s: f64,
    /// Simulated time of the client's work, in seconds (`null` reads as NaN).
    #[serde(deserialize_with = "f64_or_nan")]
    pub sim_time_s: f64,
    /// Every other field of the line, kept as is.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// How a selected client's round ended, written in clients.jsonl as its lowercase name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientStatus {
    /// It trained and its update counted.
    #[default]
    Ok,
    /// It dropped out before its task (simulated dropout, lost connection).
    Dropped,
    /// It finished after the round's deadline; its update did not count.
    Straggler,
    /// The method gave it no task (e.g. nothing fits its memory budget).
    Skipped,
    /// Its task failed or its update was refused.
    Failed,
}

impl ClientStatus {
    /// The name as written in clients.jsonl.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientStatus::Ok => "ok",
            ClientStatus::Dropped => "dropped",
            ClientStatus::Straggler => "straggler",
            ClientStatus::Skipped => "skipped",
            ClientStatus::Failed => "failed",
        }
    }
}

impl std::fmt::Display for ClientStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A loaded run directory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Run {
    /// The directory the run was loaded from.
    pub dir: PathBuf,
    /// The run's name: the file name of [`dir`](Self::dir).
    pub name: String,
    /// The lines of `metrics.jsonl`, sorted by round (stable, so the file
    /// order is kept among equal round numbers).
    pub rounds: Vec<RoundRecord>,
    /// The lines of `clients.jsonl` in file order; empty when the file is
    /// absent.
    pub clients: Vec<ClientRecord>,
    /// The content of `summary.json`; empty when the file is absent.
    pub summary: Map<String, Value>,
}

impl Run {
    /// Loads the run directory `dir`.
    ///
    /// `metrics.jsonl` is required. `clients.jsonl` and `summary.json` are
    /// optional: when absent, [`clients`](Self::clients) and
    /// [`summary`](Self::summary) are empty, and the report derives what it
    /// can from the metrics. A file that exists but cannot be read or parsed
    /// is an error naming the file and line. A truncated last line of a
    /// `.jsonl` file is skipped (see [`read_jsonl`]).
    pub fn load(dir: &Path) -> Result<Run, ReportError> {
        let meta = fs::metadata(dir).map_err(|source| ReportError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(ReportError::Invalid {
                path: dir.to_path_buf(),
                message: "not a directory; expected a run directory".to_string(),
            });
        }

        let metrics_path = dir.join(METRICS_FILE);
        let mut rounds: Vec<RoundRecord> = read_jsonl(&metrics_path)?;
        rounds.sort_by_key(|r| r.round);

        let clients_path = dir.join(CLIENTS_FILE);
        let clients = if exists(&clients_path)? {
            read_jsonl(&clients_path)?
        } else {
            Vec::new()
        };

        let summary_path = dir.join(SUMMARY_FILE);
        let summary = if exists(&summary_path)? {
            read_summary(&summary_path)?
        } else {
            Map::new()
        };

        Ok(Run {
            dir: dir.to_path_buf(),
            name: run_name(dir),
            rounds,
            clients,
            summary,
        })
    }
}

/// Whether `path` exists; errors other than "not found" are reported.
fn exists(path: &Path) -> Result<bool, ReportError> {
    match fs::metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(ReportError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A run's name: the last component of its directory (of its canonical path for `.` or
/// `..`), as reports and dashboards show it.
pub fn run_name(dir: &Path) -> String {
    if let Some(name) = dir.file_name() {
        return name.to_string_lossy().into_owned();
    }
    fs::canonicalize(dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "run".to_string())
}

fn read_summary(path: &Path) -> Result<Map<String, Value>, ReportError> {
    let bytes = fs::read(path).map_err(|source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let value: Value =
        serde_json::from_slice(strip_bom(&bytes)).map_err(|e| ReportError::Parse {
            path: path.to_path_buf(),
            line: e.line(),
            message: describe_json_error(&e),
        })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(ReportError::Invalid {
            path: path.to_path_buf(),
            message: format!("expected a JSON object, found {}", json_kind(&other)),
        }),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

/// serde_json's message without its "at line L column C" suffix, followed by
/// the column, since the line is reported separately.
fn describe_json_error(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let message = match full.rfind(" at line ") {
        Some(idx) if e.line() > 0 => &full[..idx],
        _ => full.as_str(),
    };
    if e.column() > 0 {
        format!("{message} (column {})", e.column())
    } else {
        message.to_string()
    }
}

/// Reads a JSON-lines file: one JSON value of type `T` per line.
///
/// * Blank lines (only whitespace) are skipped; line numbers in errors still
///   count them, so they match what an editor shows.
/// * If the last non-blank line ends before its JSON value is complete (a
///   writer killed mid-line), it is skipped without an error.
/// * Any other line that is not valid JSON, or not a valid `T`, is a
///   [`ReportError::Parse`] naming `path`, the 1-based line number and the
///   problem.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, ReportError> {
    let bytes = fs::read(path).map_err(|source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bytes = strip_bom(&bytes);

    let lines: Vec<(usize, &[u8])> = bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, line)| (i + 1, line.strip_suffix(b"\r").unwrap_or(line)))
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
        .collect();

    let mut out = Vec::with_capacity(lines.len());
    for (k, &(line_no, line)) in lines.iter().enumerate() {
        match serde_json::from_slice::<T>(line) {
            Ok(value) => out.push(value),
            Err(e) => {
                let is_last = k + 1 == lines.len();
                if is_last && e.classify() == serde_json::error::Category::Eof {
                    // Truncated final line: the run stopped while writing it.
                    break;
                }
                return Err(ReportError::Parse {
                    path: path.to_path_buf(),
                    line: line_no,
                    message: describe_json_error(&e),
                });
            }
        }
    }
    Ok(out)
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `contents` to `path` atomically: the bytes go to a temporary file
/// in the same directory, which is then renamed over `path`. Readers never
/// see a partially written file. The directory must exist.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), ReportError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| ReportError::Invalid {
            path: path.to_path_buf(),
            message: "not a file path".to_string(),
        })?;
    let tmp = dir.join(format!(
        ".{file_name}.tmp-{}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));

    let result = (|| -> io::Result<()> {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(source) = result {
        // Best effort: the temporary file may not even exist.
        let _ = fs::remove_file(&tmp);
        return Err(ReportError::Io {
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_statuses_read_and_write_the_names_run_directories_hold() {
        for (status, name) in [
            (ClientStatus::Ok, "ok"),
            (ClientStatus::Dropped, "dropped"),
            (ClientStatus::Straggler, "straggler"),
            (ClientStatus::Skipped, "skipped"),
            (ClientStatus::Failed, "failed"),
        ] {
            assert_eq!(serde_json::to_value(status).unwrap(), name);
            assert_eq!(status.to_string(), name);
            let back: ClientStatus = serde_json::from_value(name.into()).unwrap();
            assert_eq!(back, status);
        }
        assert!(serde_json::from_value::<ClientStatus>("lost".into()).is_err());
    }
}
