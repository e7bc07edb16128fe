//! The plain-text summary table.

use serde_json::Value;

use crate::run::Run;

const BYTES_PER_MB: f64 = 1e6;
const BYTES_PER_MIB: f64 = 1024.0 * 1024.0;
const MISSING: &str = "-";

/// Formats a plain-text table with one column per run, side by side (one
/// column for a single run), headed by the run names. Rows, in order:
///
/// | row | source |
/// |---|---|
/// | `method` | `summary.json` `method` |
/// | `rounds` | `summary.json` `rounds`, else the number of metrics lines |
/// | `final accuracy (%)` | `final_test_accuracy`, else the last evaluated round |
/// | `best accuracy (%)` | `best_test_accuracy`, else the best evaluated round |
/// | `final test loss` | `final_test_loss`, else the last round with a test loss |
/// | `total MB up` / `total MB down` | `total_bytes_up` / `total_bytes_down`, else the sum over rounds; MB = 10⁶ bytes |
/// | `sim time (s)` / `wall time (s)` | `sim_time_s` / `wall_time_s`, else the sum over rounds |
/// | `mean clients/round` | mean of the metrics' `clients` |
/// | `max client peak memory (MiB)` | largest `peak_client_memory_bytes` / client `peak_memory_bytes` |
/// | `total training TFLOPs` | `total_flops`, else the sum of the metrics' `flops` |
///
/// Values from `summary.json` are preferred; when the file is absent or a
/// key is missing (or not a finite number) the value is derived from the
/// metrics, and shown as `-` when it cannot be. Accuracies are percentages
/// with two decimals (`0.8123` → `81.23`). The FLOPs row switches to
/// `total training GFLOPs` when no run reaches one TFLOP. Values are
/// right-aligned; the text ends with a newline.
pub fn summary_table(runs: &[Run]) -> String {
    let stats: Vec<Stats> = runs.iter().map(Stats::of).collect();

    let max_flops = stats
        .iter()
        .filter_map(|s| s.total_flops)
        .fold(0.0_f64, f64::max);
    let (flops_label, flops_scale) = if max_flops >= 1e12 {
        ("total training TFLOPs", 1e12)
    } else {
        ("total training GFLOPs", 1e9)
    };

    let labels = [
        "method",
        "rounds",
        "final accuracy (%)",
        "best accuracy (%)",
        "final test loss",
        "total MB up",
        "total MB down",
        "sim time (s)",
        "wall time (s)",
        "mean clients/round",
        "max client peak memory (MiB)",
        flops_label,
    ];

    let columns: Vec<(String, Vec<String>)> = runs
        .iter()
        .zip(&stats)
        .map(|(run, s)| {
            let cells = vec![
                s.method.clone().unwrap_or_else(|| MISSING.to_string()),
                s.rounds
                    .map_or_else(|| MISSING.to_string(), |r| r.to_string()),
                fmt(s.final_accuracy.map(|a| a * 100.0), 2),
                fmt(s.best_accuracy.map(|a| a * 100.0), 2),
                fmt(s.final_test_loss, 4),
                fmt(s.bytes_up.map(|b| b / BYTES_PER_MB), 2),
                fmt(s.bytes_down.map(|b| b / BYTES_PER_MB), 2),
                fmt(s.sim_time_s, 2),
                fmt(s.wall_time_s, 2),
                fmt(s.mean_clients, 1),
                fmt(s.max_peak_memory.map(|b| b / BYTES_PER_MIB), 1),
                fmt(s.total_flops.map(|f| f / flops_scale), 3),
            ];
            (printable(&run.name), cells)
        })
        .collect();

    let label_width = labels
        .iter()
        .map(|l| l.chars().count())
        .chain(std::iter::once("run".len()))
        .max()
        .unwrap_or(0);
    let widths: Vec<usize> = columns
        .iter()
        .map(|(header, cells)| {
            cells
                .iter()
                .chain(std::iter::once(header))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();

    let mut out = String::new();
    let mut push_row = |label: &str, cells: &mut dyn Iterator<Item = &str>| {
        let mut line = pad_right(label, label_width);
        for (cell, &width) in cells.zip(&widths) {
            line.push_str("  ");
            line.push_str(&pad_left(cell, width));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };

    push_row("run", &mut columns.iter().map(|(h, _)| h.as_str()));
    let total_width = label_width + widths.iter().map(|w| w + 2).sum::<usize>();
    let rule = "-".repeat(total_width);
    push_row(&rule, &mut std::iter::empty());
    for (i, label) in labels.iter().enumerate() {
        push_row(
            label,
            &mut columns.iter().map(|(_, cells)| cells[i].as_str()),
        );
    }
    out
}

/// Figures of one run, from `summary.json` where present, else derived.
struct Stats {
    method: Option<String>,
    rounds: Option<u64>,
    final_accuracy: Option<f64>,
    best_accuracy: Option<f64>,
    final_test_loss: Option<f64>,
    bytes_up: Option<f64>,
    bytes_down: Option<f64>,
    sim_time_s: Option<f64>,
    wall_time_s: Option<f64>,
    mean_clients: Option<f64>,
    max_peak_memory: Option<f64>,
    total_flops: Option<f64>,
}

impl Stats {
    fn of(run: &Run) -> Stats {
        let summary_f64 = |key: &str| {
            run.summary
                .get(key)
                .and_then(Value::as_f64)
                .filter(|v| v.is_finite())
        };
        let mut rounds: Vec<_> = run.rounds.iter().collect();
        rounds.sort_by_key(|r| r.round);
        let has_rounds = !rounds.is_empty();

        let last_finite = |get: &dyn Fn(&crate::RoundRecord) -> Option<f64>| {
            rounds
                .iter()
                .rev()
                .find_map(|r| get(r).filter(|v| v.is_finite()))
        };
        let sum = |get: &dyn Fn(&crate::RoundRecord) -> f64| {
            has_rounds.then(|| {
                rounds
                    .iter()
                    .map(|r| get(r))
                    .filter(|v| v.is_finite())
                    .sum::<f64>()
            })
        };

        let best_derived = rounds
            .iter()
            .filter_map(|r| r.test_accuracy.filter(|a| a.is_finite()))
            .fold(None, |best: Option<f64>, a| {
                Some(best.map_or(a, |b| b.max(a)))
            });

        let max_peak_memory = run
            .rounds
            .iter()
            .map(|r| r.peak_client_memory_bytes)
            .chain(run.clients.iter().map(|c| c.peak_memory_bytes))
            .max()
            .map(|b| b as f64);

        Stats {
            method: run
                .summary
                .get("method")
                .and_then(Value::as_str)
                .map(printable),
            rounds: run
                .summary
                .get("rounds")
                .and_then(Value::as_u64)
                .or_else(|| has_rounds.then_some(rounds.len() as u64)),
            final_accuracy: summary_f64("final_test_accuracy")
                .or_else(|| last_finite(&|r| r.test_accuracy)),
            best_accuracy: summary_f64("best_test_accuracy").or(best_derived),
            final_test_loss: summary_f64("final_test_loss")
                .or_else(|| last_finite(&|r| r.test_loss)),
            bytes_up: summary_f64("total_bytes_up").or_else(|| sum(&|r| r.bytes_up as f64)),
            bytes_down: summary_f64("total_bytes_down").or_else(|| sum(&|r| r.bytes_down as f64)),
            sim_time_s: summary_f64("sim_time_s").or_else(|| sum(&|r| r.sim_time_s)),
            wall_time_s: summary_f64("wall_time_s").or_else(|| sum(&|r| r.wall_time_s)),
            mean_clients: has_rounds.then(|| {
                rounds.iter().map(|r| r.clients as f64).sum::<f64>() / rounds.len() as f64
            }),
            max_peak_memory,
            total_flops: summary_f64("total_flops").or_else(|| sum(&|r| r.flops)),
        }
    }
}

fn fmt(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => MISSING.to_string(),
    }
}

/// Control characters (newlines, tabs) would break the layout.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn pad_right(s: &str, width: usize) -> String {
    let n = s.chars().count();
    let mut out = s.to_string();
    out.extend(std::iter::repeat_n(' ', width.saturating_sub(n)));
    out
}

fn pad_left(s: &str, width: usize) -> String {
    let n = s.chars().count();
    let mut out: String = std::iter::repeat_n(' ', width.saturating_sub(n)).collect();
    out.push_str(s);
    out
}
