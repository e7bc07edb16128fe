//! SVG plots of one run or of several runs side by side.

use std::fs;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

mod draw;
use draw::{HistSpec, HistogramChart, LineChart, LineSpec, draw_histogram, draw_line_chart};

use crate::error::ReportError;
use crate::run::{ClientRecord, ClientStatus, RoundRecord, Run, write_atomic};

/// Sub-directory of a run directory that [`render_plots`] writes into.
pub const PLOTS_DIR: &str = "plots";
/// Test accuracy (%) against the round number.
pub const ACCURACY_VS_ROUND_FILE: &str = "accuracy_vs_round.svg";
/// Test accuracy (%) against cumulative communication (MB, up + down).
pub const ACCURACY_VS_BYTES_FILE: &str = "accuracy_vs_bytes.svg";
/// Histogram of measured and estimated per-client peak memory (MiB).
pub const CLIENT_MEMORY_FILE: &str = "client_memory.svg";
/// Histogram of per-client simulated time (s).
pub const CLIENT_TIME_FILE: &str = "client_time.svg";
/// Comparison plot: test accuracy against round, one line per run.
pub const COMPARE_ACCURACY_VS_ROUND_FILE: &str = "compare_accuracy_vs_round.svg";
/// Comparison plot: test accuracy against cumulative MB, one line per run.
pub const COMPARE_ACCURACY_VS_BYTES_FILE: &str = "compare_accuracy_vs_bytes.svg";

const WIDTH: u32 = 960;
const HEIGHT: u32 = 600;
const BYTES_PER_MB: f64 = 1e6;
const BYTES_PER_MIB: f64 = 1024.0 * 1024.0;
const MAX_BINS: usize = 40;

const NOTE_COLOR: RGBColor = RGBColor(110, 110, 110);
const MEASURED_COLOR: RGBColor = RGBColor(31, 119, 180);
const ESTIMATED_COLOR: RGBColor = RGBColor(255, 127, 14);
const TIME_COLOR: RGBColor = RGBColor(44, 160, 44);

/// Line colours, cycled when there are more runs than colours.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Writes the plots of one run into `<run.dir>/plots/` (created if needed)
/// and returns their paths, always these four in this order:
///
/// 1. `accuracy_vs_round.svg` — test accuracy (%) against round;
/// 2. `accuracy_vs_bytes.svg` — test accuracy (%) against cumulative
///    communication, bytes up + bytes down, in MB (10⁶ bytes);
/// 3. `client_memory.svg` — histogram of the measured peak memory (MiB) of
///    the client records with status `ok`, next to a histogram of their
///    estimated memory over the same bins;
/// 4. `client_time.svg` — histogram of the simulated time `sim_time_s` of
///    the client records with status `ok`.
///
/// Rounds without a test accuracy and non-finite values are left out. When
/// a plot has no data at all (no evaluated round, no `ok` client record),
/// the file is still written: an empty chart with its title, axes and a
/// note saying why it is empty. Each file is written atomically.
pub fn render_plots(run: &Run) -> Result<Vec<PathBuf>, ReportError> {
    let out_dir = run.dir.join(PLOTS_DIR);
    create_dir(&out_dir)?;
    let name = &run.name;
    let mut paths = Vec::with_capacity(4);

    let by_round = accuracy_by_round(&run.rounds);
    let note = no_accuracy_note(&run.rounds, &by_round);
    let chart = LineChart {
        title: format!("Test accuracy vs round ({name})"),
        x_desc: "round".to_string(),
        y_desc: "test accuracy (%)".to_string(),
        x_range: round_range(std::iter::once(run.rounds.as_slice())),
        y_range: accuracy_range(by_round.iter().map(|p| p.1)),
        integer_x: true,
        legend: false,
        note,
        series: vec![LineSpec {
            label: name.clone(),
            points: by_round,
            color: PALETTE[0],
        }],
    };
    paths.push(write_chart(&out_dir.join(ACCURACY_VS_ROUND_FILE), || {
        draw_line_chart(&chart)
    })?);

    let (by_bytes, total_mb) = accuracy_by_bytes(&run.rounds);
    let note = no_accuracy_note(&run.rounds, &by_bytes);
    let chart = LineChart {
        title: format!("Test accuracy vs communication ({name})"),
        x_desc: "cumulative communication, up + down (MB)".to_string(),
        y_desc: "test accuracy (%)".to_string(),
        x_range: nonneg_range(total_mb),
        y_range: accuracy_range(by_bytes.iter().map(|p| p.1)),
        integer_x: false,
        legend: false,
        note,
        series: vec![LineSpec {
            label: name.clone(),
            points: by_bytes,
            color: PALETTE[0],
        }],
    };
    paths.push(write_chart(&out_dir.join(ACCURACY_VS_BYTES_FILE), || {
        draw_line_chart(&chart)
    })?);

    let ok: Vec<&ClientRecord> = run
        .clients
        .iter()
        .filter(|c| c.status == ClientStatus::Ok)
        .collect();
    let empty_note = if run.clients.is_empty() {
        "no client records (clients.jsonl absent or empty)"
    } else {
        "no client record with status \"ok\""
    };

    let measured: Vec<f64> = ok
        .iter()
        .map(|c| c.peak_memory_bytes as f64 / BYTES_PER_MIB)
        .collect();
    let estimated: Vec<f64> = ok
        .iter()
        .map(|c| c.estimated_memory_bytes as f64 / BYTES_PER_MIB)
        .collect();
    let chart = HistogramChart {
        title: format!("Client peak memory, status ok ({name})"),
        x_desc: "peak memory (MiB)".to_string(),
        y_desc: "client-rounds (count)".to_string(),
        empty_note: empty_note.to_string(),
        series: vec![
            HistSpec {
                label: "measured peak".to_string(),
                values: measured,
                color: MEASURED_COLOR,
            },
            HistSpec {
                label: "estimated".to_string(),
                values: estimated,
                color: ESTIMATED_COLOR,
            },
        ],
    };
    paths.push(write_chart(&out_dir.join(CLIENT_MEMORY_FILE), || {
        draw_histogram(&chart)
    })?);

    let times: Vec<f64> = ok.iter().map(|c| c.sim_time_s).collect();
    let chart = HistogramChart {
        title: format!("Client simulated time per round, status ok ({name})"),
        x_desc: "simulated time (s)".to_string(),
        y_desc: "client-rounds (count)".to_string(),
        empty_note: empty_note.to_string(),
        series: vec![HistSpec {
            label: "simulated time".to_string(),
            values: times,
            color: TIME_COLOR,
        }],
    };
    paths.push(write_chart(&out_dir.join(CLIENT_TIME_FILE), || {
        draw_histogram(&chart)
    })?);

    Ok(paths)
}

/// Renders comparison plots for several runs into `out_dir` (created if
/// needed) and returns their paths, always these two in this order:
///
/// 1. `compare_accuracy_vs_round.svg` — test accuracy (%) against round;
/// 2. `compare_accuracy_vs_bytes.svg` — test accuracy (%) against cumulative
///    communication (MB, up + down).
///
/// Each run is one line; the legend shows the run names (a run without any
/// evaluated round is listed as `<name> (not evaluated)`). Colours repeat
/// after ten runs. Each file is written atomically. An empty `runs` is
/// [`ReportError::NoRuns`].
pub fn render_comparison(runs: &[Run], out_dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    if runs.is_empty() {
        return Err(ReportError::NoRuns {
            out_dir: out_dir.to_path_buf(),
        });
    }
    create_dir(out_dir)?;
    let mut paths = Vec::with_capacity(2);
    let legend_label = |run: &Run, points: &[(f64, f64)]| {
        if points.is_empty() {
            format!("{} (not evaluated)", run.name)
        } else {
            run.name.clone()
        }
    };

    let series: Vec<LineSpec> = runs
        .iter()
        .enumerate()
        .map(|(i, run)| {
            let points = accuracy_by_round(&run.rounds);
            LineSpec {
                label: legend_label(run, &points),
                points,
                color: PALETTE[i % PALETTE.len()],
            }
        })
        .collect();
    let chart = LineChart {
        title: "Test accuracy vs round (comparison)".to_string(),
        x_desc: "round".to_string(),
        y_desc: "test accuracy (%)".to_string(),
        x_range: round_range(runs.iter().map(|r| r.rounds.as_slice())),
        y_range: accuracy_range(series.iter().flat_map(|s| s.points.iter().map(|p| p.1))),
        integer_x: true,
        legend: true,
        note: comparison_note(&series),
        series,
    };
    paths.push(write_chart(
        &out_dir.join(COMPARE_ACCURACY_VS_ROUND_FILE),
        || draw_line_chart(&chart),
    )?);

    let mut max_mb = 0.0_f64;
    let series: Vec<LineSpec> = runs
        .iter()
        .enumerate()
        .map(|(i, run)| {
            let (points, total_mb) = accuracy_by_bytes(&run.rounds);
            max_mb = max_mb.max(total_mb);
            LineSpec {
                label: legend_label(run, &points),
                points,
                color: PALETTE[i % PALETTE.len()],
            }
        })
        .collect();
    let chart = LineChart {
        title: "Test accuracy vs communication (comparison)".to_string(),
        x_desc: "cumulative communication, up + down (MB)".to_string(),
        y_desc: "test accuracy (%)".to_string(),
        x_range: nonneg_range(max_mb),
        y_range: accuracy_range(series.iter().flat_map(|s| s.points.iter().map(|p| p.1))),
        integer_x: false,
        legend: true,
        note: comparison_note(&series),
        series,
    };
    paths.push(write_chart(
        &out_dir.join(COMPARE_ACCURACY_VS_BYTES_FILE),
        || draw_line_chart(&chart),
    )?);

    Ok(paths)
}

fn create_dir(dir: &Path) -> Result<(), ReportError> {
    fs::create_dir_all(dir).map_err(|source| ReportError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Renders with `draw` into a string and writes it atomically to `path`.
fn write_chart(
    path: &Path,
    draw: impl FnOnce() -> Result<String, String>,
) -> Result<PathBuf, ReportError> {
    let svg = draw().map_err(|message| ReportError::Plot {
        path: path.to_path_buf(),
        message,
    })?;
    write_atomic(path, svg.as_bytes())?;
    Ok(path.to_path_buf())
}

// ---------------------------------------------------------------------------
// Data preparation
// ---------------------------------------------------------------------------

/// The rounds in round order (stable), whatever order they were given in.
fn sorted_rounds(rounds: &[RoundRecord]) -> Vec<&RoundRecord> {
    let mut sorted: Vec<&RoundRecord> = rounds.iter().collect();
    sorted.sort_by_key(|r| r.round);
    sorted
}

fn finite_accuracy(r: &RoundRecord) -> Option<f64> {
    r.test_accuracy.filter(|a| a.is_finite()).map(|a| a * 100.0)
}

/// `(round, accuracy %)` for every evaluated round.
fn accuracy_by_round(rounds: &[RoundRecord]) -> Vec<(f64, f64)> {
    sorted_rounds(rounds)
        .into_iter()
        .filter_map(|r| finite_accuracy(r).map(|a| (r.round as f64, a)))
        .collect()
}

/// `(cumulative MB, accuracy %)` for every evaluated round, and the
/// cumulative MB after the last round.
fn accuracy_by_bytes(rounds: &[RoundRecord]) -> (Vec<(f64, f64)>, f64) {
    let mut cumulative = 0.0_f64;
    let mut points = Vec::new();
    for r in sorted_rounds(rounds) {
        cumulative += (r.bytes_up as f64 + r.bytes_down as f64) / BYTES_PER_MB;
        if let Some(a) = finite_accuracy(r) {
            points.push((cumulative, a));
        }
    }
    (points, cumulative)
}

fn no_accuracy_note(rounds: &[RoundRecord], points: &[(f64, f64)]) -> Option<String> {
    if rounds.is_empty() {
        Some("no rounds recorded".to_string())
    } else if points.is_empty() {
        Some("no evaluated round (test_accuracy is null in every round)".to_string())
    } else {
        None
    }
}

fn comparison_note(series: &[LineSpec]) -> Option<String> {
    series
        .iter()
        .all(|s| s.points.is_empty())
        .then(|| "no run has an evaluated round".to_string())
}

// ---------------------------------------------------------------------------
// Axis ranges: never empty, never NaN
// ---------------------------------------------------------------------------

fn valid_range(lo: f64, hi: f64) -> bool {
    lo.is_finite() && hi.is_finite() && hi > lo
}

/// Round axis covering every round of every given run, half a round of
/// margin on each side.
fn round_range<'a>(runs: impl Iterator<Item = &'a [RoundRecord]>) -> (f64, f64) {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for r in runs.flatten() {
        lo = lo.min(r.round as f64);
        hi = hi.max(r.round as f64);
    }
    if !(lo.is_finite() && hi.is_finite()) {
        return (0.5, 1.5);
    }
    let range = (lo - 0.5, hi + 0.5);
    if valid_range(range.0, range.1) {
        range
    } else {
        (0.5, 1.5)
    }
}

/// Accuracy axis (percent): the data with a margin, within `[0, 100]` when
/// the data is, with at least two percentage points of margin.
fn accuracy_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = match min_max(values) {
        Some(mm) => mm,
        None => return (0.0, 100.0),
    };
    let pad = (0.08 * (hi - lo)).max(2.0);
    let mut range = (lo - pad, hi + pad);
    if lo >= 0.0 {
        range.0 = range.0.max(0.0);
    }
    if hi <= 100.0 {
        range.1 = range.1.min(100.0);
    }
    if valid_range(range.0, range.1) {
        range
    } else {
        (0.0, 100.0)
    }
}

/// `[0, max]` with a small margin; `[0, 1]` when `max` is not positive.
fn nonneg_range(max: f64) -> (f64, f64) {
    let hi = max * 1.04;
    if valid_range(0.0, hi) {
        (0.0, hi)
    } else {
        (0.0, 1.0)
    }
}

fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

/// Tick label for axes whose values are whole numbers (rounds, counts):
/// fractional ticks are left unlabelled.
fn integer_label(v: &f64) -> String {
    let r = v.round();
    if (v - r).abs() <= 1e-6 * r.abs().max(1.0) {
        format!("{r:.0}")
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_never_empty() {
        assert!(valid_range(0.0, 100.0));
        let (lo, hi) = accuracy_range([50.0, 50.0].into_iter());
        assert!(lo < 50.0 && hi > 50.0, "{lo} {hi}");
        let (lo, hi) = accuracy_range([100.0].into_iter());
        assert!(lo < 100.0 && hi == 100.0, "{lo} {hi}");
        let (lo, hi) = accuracy_range([f64::NAN].into_iter());
        assert_eq!((lo, hi), (0.0, 100.0));
        assert_eq!(nonneg_range(0.0), (0.0, 1.0));
        assert_eq!(nonneg_range(f64::NAN), (0.0, 1.0));
    }

    #[test]
    fn integer_labels_only_on_whole_numbers() {
        assert_eq!(integer_label(&3.0), "3");
        assert_eq!(integer_label(&2.5), "");
    }
}
