use flotilla_report::ClientStatus;
use std::fs;
use std::path::{Path, PathBuf};

use flotilla_report::{
    ClientRecord, ReportError, RoundRecord, Run, read_jsonl, render_comparison, render_plots,
    summary_table,
};
use serde_json::{Value, json};

/// Test accuracy of round `r` for a synthetic run.
type AccuracyFn = dyn Fn(u64) -> Option<f64>;

fn metrics_line(round: u64, acc: Option<f64>) -> Value {
    json!({
        "round": round,
        "test_accuracy": acc,
        "test_loss": acc.map(|a| 2.0 * (1.0 - a)),
        "train_loss": 1.0 / round as f64,
        "clients": 3,
        "bytes_up": 1_500_000 * round,
        "bytes_down": 3_000_000,
        "sim_time_s": 12.5,
        "wall_time_s": 0.25,
        "peak_client_memory_bytes": 64 * 1024 * 1024 + round * 1024 * 1024,
        "flops": 2.0e11,
        "sparsity": 0.5,
    })
}

fn client_line(round: u64, client: u64) -> Value {
    let status = if client == 2 && round.is_multiple_of(2) {
        "dropped"
    } else {
        "ok"
    };
    json!({
        "round": round,
        "client": client,
        "tier": if client == 0 { "phone" } else { "laptop" },
        "status": status,
        "reason": if status == "ok" { Value::Null } else { json!("battery") },
        "num_examples": 100 + client,
        "train_loss": 0.9,
        "bytes_up": 500_000,
        "bytes_down": 1_000_000,
        "flops": 6.0e10,
        "peak_memory_bytes": (40 + 10 * client + round) * 1024 * 1024,
        "estimated_memory_bytes": (45 + 10 * client) * 1024 * 1024,
        "wall_time_s": 0.08,
        "sim_time_s": 2.0 + client as f64 + 0.1 * round as f64,
    })
}

fn write_lines(path: &Path, lines: &[Value]) {
    let mut text = String::new();
    for line in lines {
        text.push_str(&line.to_string());
        text.push('\n');
    }
    fs::write(path, text).unwrap();
}

/// Writes a run directory `<parent>/<name>` with `rounds` rounds and 3
/// clients per round; returns its path.
fn write_run(
    parent: &Path,
    name: &str,
    rounds: u64,
    acc: &AccuracyFn,
    summary: Option<Value>,
) -> PathBuf {
    let dir = parent.join(name);
    fs::create_dir_all(&dir).unwrap();
    let metrics: Vec<Value> = (1..=rounds).map(|r| metrics_line(r, acc(r))).collect();
    write_lines(&dir.join("metrics.jsonl"), &metrics);
    let clients: Vec<Value> = (1..=rounds)
        .flat_map(|r| (0..3).map(move |c| client_line(r, c)))
        .collect();
    write_lines(&dir.join("clients.jsonl"), &clients);
    if let Some(summary) = summary {
        fs::write(dir.join("summary.json"), summary.to_string()).unwrap();
    }
    dir
}

fn summary(method: &str, rounds: u64, final_acc: f64, best_acc: f64) -> Value {
    json!({
        "method": method,
        "rounds": rounds,
        "final_test_accuracy": final_acc,
        "best_test_accuracy": best_acc,
        "total_bytes_up": 7_500_000,
        "total_bytes_down": 15_000_000,
        "sim_time_s": 62.5,
        "wall_time_s": 1.25,
        "seed": 7,
    })
}

const PLOT_TITLES: [(&str, &str); 4] = [
    ("accuracy_vs_round.svg", "Test accuracy vs round"),
    ("accuracy_vs_bytes.svg", "Test accuracy vs communication"),
    ("client_memory.svg", "Client peak memory"),
    ("client_time.svg", "Client simulated time per round"),
];

/// Checks the four plot files exist in `plots/`, are SVG, and carry their
/// titles; returns their contents in order.
fn check_plots(run: &Run, paths: &[PathBuf]) -> Vec<String> {
    assert_eq!(paths.len(), 4, "{paths:?}");
    let mut contents = Vec::new();
    for (path, (file, title)) in paths.iter().zip(PLOT_TITLES) {
        assert_eq!(path, &run.dir.join("plots").join(file));
        let svg = fs::read_to_string(path).unwrap();
        assert!(svg.len() > 500, "{} is too small", path.display());
        assert!(svg.contains("<svg"), "{} is not SVG", path.display());
        assert!(
            svg.trim_end().ends_with("</svg>"),
            "{} is cut",
            path.display()
        );
        assert!(
            svg.contains(title),
            "{} lacks its title {title:?}",
            path.display()
        );
        assert!(
            svg.contains(&run.name),
            "{} lacks the run name",
            path.display()
        );
        contents.push(svg);
    }
    // Nothing but the plots is left behind (no temporary files).
    let mut names: Vec<String> = fs::read_dir(run.dir.join("plots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected: Vec<String> = PLOT_TITLES.iter().map(|(f, _)| f.to_string()).collect();
    expected.sort();
    assert_eq!(names, expected);
    contents
}

#[test]
fn round_record_round_trips_with_extra_fields() {
    let line = r#"{"round":3,"test_accuracy":0.75,"test_loss":0.8,"train_loss":null,"clients":4,"bytes_up":100,"bytes_down":200,"sim_time_s":1.5,"wall_time_s":0.5,"peak_client_memory_bytes":1024,"flops":3e9,"sparsity":0.9,"per_tier":{"phone":0.7}}"#;
    let record: RoundRecord = serde_json::from_str(line).unwrap();
    assert_eq!(record.round, 3);
    assert_eq!(record.test_accuracy, Some(0.75));
    assert_eq!(record.train_loss, None);
    assert_eq!(record.flops, 3e9);
    assert_eq!(record.extra.len(), 2);
    assert_eq!(record.extra["sparsity"], json!(0.9));
    assert_eq!(record.extra["per_tier"], json!({"phone": 0.7}));

    let written = serde_json::to_value(&record).unwrap();
    // Extra fields are written back at the top level, not nested.
    assert_eq!(written["sparsity"], json!(0.9));
    assert!(written.get("extra").is_none());
    let back: RoundRecord = serde_json::from_value(written).unwrap();
    assert_eq!(back, record);
}

#[test]
fn server_cost_fields_default_to_zero_in_older_runs() {
    // A line written before `server_flops` and `server_wall_s` existed.
    let old = r#"{"round":1,"test_accuracy":0.5,"test_loss":1.0,"train_loss":null,"clients":2,"bytes_up":1,"bytes_down":1,"sim_time_s":1.0,"wall_time_s":0.5,"peak_client_memory_bytes":0,"flops":1e6}"#;
    let record: RoundRecord = serde_json::from_str(old).unwrap();
    assert_eq!((record.server_flops, record.server_wall_s), (0.0, 0.0));
    assert!(record.extra.is_empty());

    let mut new: Value = serde_json::from_str(old).unwrap();
    new["server_flops"] = json!(2.5e9);
    new["server_wall_s"] = json!(0.25);
    let record: RoundRecord = serde_json::from_value(new).unwrap();
    assert_eq!((record.server_flops, record.server_wall_s), (2.5e9, 0.25));
    assert!(record.extra.is_empty(), "{:?}", record.extra);
    let written = serde_json::to_value(&record).unwrap();
    assert_eq!(written["server_flops"], json!(2.5e9));
}

#[test]
fn client_record_round_trips_and_null_float_reads_as_nan() {
    let value = client_line(2, 1);
    let mut with_extra = value.clone();
    with_extra["battery"] = json!(0.4);
    with_extra["sim_time_s"] = Value::Null;
    let record: ClientRecord = serde_json::from_value(with_extra).unwrap();
    assert_eq!(record.tier, "laptop");
    assert_eq!(record.reason, None);
    assert!(record.sim_time_s.is_nan());
    assert_eq!(record.extra["battery"], json!(0.4));

    let plain: ClientRecord = serde_json::from_value(value).unwrap();
    let back: ClientRecord = serde_json::from_str(&serde_json::to_string(&plain).unwrap()).unwrap();
    assert_eq!(back, plain);
}

#[test]
fn read_jsonl_error_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("metrics.jsonl");
    let good = metrics_line(1, Some(0.5)).to_string();
    // Line 3 is blank, line 4 is corrupt, line 5 is fine.
    fs::write(
        &path,
        format!("{good}\n{good}\n\n{{\"round\": 2,, }}\n{good}\n"),
    )
    .unwrap();
    let err = read_jsonl::<RoundRecord>(&path).unwrap_err();
    match &err {
        ReportError::Parse { path: p, line, .. } => {
            assert_eq!(p, &path);
            assert_eq!(*line, 4);
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("metrics.jsonl"), "{text}");
    assert!(text.contains("line 4"), "{text}");
}

#[test]
fn read_jsonl_reports_missing_fields_by_line() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("metrics.jsonl");
    let good = metrics_line(1, Some(0.5)).to_string();
    let mut missing = metrics_line(2, Some(0.5));
    missing.as_object_mut().unwrap().remove("bytes_up");
    fs::write(&path, format!("{good}\n{missing}\n{good}\n")).unwrap();
    let text = read_jsonl::<RoundRecord>(&path).unwrap_err().to_string();
    assert!(text.contains("line 2"), "{text}");
    assert!(text.contains("bytes_up"), "{text}");
}

#[test]
fn read_jsonl_tolerates_truncated_last_line_only() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("metrics.jsonl");
    let lines: Vec<String> = (1..=4)
        .map(|r| metrics_line(r, Some(0.1 * r as f64)).to_string())
        .collect();
    let cut = &lines[3][..lines[3].len() / 2];

    fs::write(
        &path,
        format!("{}\n{}\n{}\n{cut}", lines[0], lines[1], lines[2]),
    )
    .unwrap();
    let records: Vec<RoundRecord> = read_jsonl(&path).unwrap();
    assert_eq!(
        records.iter().map(|r| r.round).collect::<Vec<_>>(),
        [1, 2, 3]
    );

    // The same cut line in the middle of the file is an error.
    fs::write(&path, format!("{}\n{cut}\n{}\n", lines[0], lines[2])).unwrap();
    let err = read_jsonl::<RoundRecord>(&path).unwrap_err();
    assert!(matches!(err, ReportError::Parse { line: 2, .. }), "{err:?}");

    // A complete but wrong last line is an error, not a truncation.
    fs::write(&path, format!("{}\n{{\"round\": \"x\"}}\n", lines[0])).unwrap();
    let err = read_jsonl::<RoundRecord>(&path).unwrap_err();
    assert!(matches!(err, ReportError::Parse { line: 2, .. }), "{err:?}");
}

#[test]
fn load_reads_all_three_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_run(
        tmp.path(),
        "fedavg-a",
        5,
        &|r| Some(0.1 * r as f64),
        Some(summary("fedavg", 5, 0.5, 0.5)),
    );
    let run = Run::load(&dir).unwrap();
    assert_eq!(run.name, "fedavg-a");
    assert_eq!(run.dir, dir);
    assert_eq!(run.rounds.len(), 5);
    assert_eq!(run.clients.len(), 15);
    assert_eq!(run.summary["method"], json!("fedavg"));
    assert_eq!(run.summary["seed"], json!(7));
    assert_eq!(run.rounds[0].extra["sparsity"], json!(0.5));
}

#[test]
fn load_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let err = Run::load(&tmp.path().join("nope")).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");

    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let err = Run::load(&empty).unwrap_err();
    assert!(err.to_string().contains("metrics.jsonl"), "{err}");

    let dir = write_run(tmp.path(), "bad-summary", 2, &|_| Some(0.5), None);
    fs::write(dir.join("summary.json"), "[1, 2]").unwrap();
    let err = Run::load(&dir).unwrap_err();
    assert!(matches!(err, ReportError::Invalid { .. }), "{err:?}");
    assert!(err.to_string().contains("summary.json"), "{err}");

    fs::write(
        dir.join("summary.json"),
        "{\n  \"method\": \"fedavg\",\n  oops\n}",
    )
    .unwrap();
    let err = Run::load(&dir).unwrap_err();
    assert!(matches!(err, ReportError::Parse { line: 3, .. }), "{err:?}");
}

#[test]
fn render_plots_writes_four_svgs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_run(
        tmp.path(),
        "fedavg-five",
        5,
        &|r| Some(0.2 + 0.1 * r as f64),
        Some(summary("fedavg", 5, 0.7, 0.7)),
    );
    let run = Run::load(&dir).unwrap();
    let paths = render_plots(&run).unwrap();
    let svgs = check_plots(&run, &paths);
    // Axis labels with units.
    assert!(svgs[0].contains("test accuracy (%)"));
    assert!(svgs[1].contains("(MB)"));
    assert!(svgs[2].contains("(MiB)"));
    assert!(svgs[3].contains("simulated time (s)"));
    // Memory histogram shows the estimate as a second series.
    assert!(svgs[2].contains("measured peak"));
    assert!(svgs[2].contains("estimated"));
    // Data was drawn: one marker per evaluated round, bars in histograms.
    assert_eq!(svgs[0].matches("<circle").count(), 5);
    assert!(svgs[2].matches("<rect").count() > 3);
    assert!(svgs[3].matches("<rect").count() > 2);
    // Rendering again overwrites in place.
    let again = render_plots(&run).unwrap();
    assert_eq!(again, paths);
}

#[test]
fn render_plots_skips_unevaluated_rounds() {
    let tmp = tempfile::tempdir().unwrap();
    // Evaluated every other round only; no summary.json.
    let dir = write_run(
        tmp.path(),
        "sparse-eval",
        6,
        &|r| r.is_multiple_of(2).then_some(0.1 * r as f64),
        None,
    );
    let run = Run::load(&dir).unwrap();
    let paths = render_plots(&run).unwrap();
    let svgs = check_plots(&run, &paths);
    assert_eq!(svgs[0].matches("<circle").count(), 3);
    assert_eq!(svgs[1].matches("<circle").count(), 3);
}

#[test]
fn render_plots_with_one_round() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_run(tmp.path(), "single", 1, &|_| Some(0.42), None);
    let run = Run::load(&dir).unwrap();
    let paths = render_plots(&run).unwrap();
    let svgs = check_plots(&run, &paths);
    assert_eq!(svgs[0].matches("<circle").count(), 1);
}

#[test]
fn render_plots_with_nothing_to_show_draws_notes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_run(tmp.path(), "never-evaluated", 3, &|_| None, None);
    fs::remove_file(dir.join("clients.jsonl")).unwrap();
    let run = Run::load(&dir).unwrap();
    assert!(run.clients.is_empty());
    let paths = render_plots(&run).unwrap();
    let svgs = check_plots(&run, &paths);
    assert!(svgs[0].contains("no evaluated round"));
    assert!(svgs[1].contains("no evaluated round"));
    assert!(svgs[2].contains("no client records"));
    assert!(svgs[3].contains("no client records"));

    // Zero rounds at all.
    fs::write(dir.join("metrics.jsonl"), "").unwrap();
    let run = Run::load(&dir).unwrap();
    let svgs = check_plots(&run, &render_plots(&run).unwrap());
    assert!(svgs[0].contains("no rounds recorded"));
}

#[test]
fn render_plots_survives_nan_and_equal_values() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("odd-values");
    fs::create_dir(&dir).unwrap();
    let rounds: Vec<RoundRecord> = (1..=4)
        .map(|r| RoundRecord {
            round: r,
            test_accuracy: Some(if r == 2 { f64::NAN } else { 0.5 }),
            sim_time_s: f64::NAN,
            flops: f64::INFINITY,
            ..RoundRecord::default()
        })
        .collect();
    let clients: Vec<ClientRecord> = (0..5)
        .map(|c| ClientRecord {
            round: 1,
            client: c,
            status: ClientStatus::Ok,
            peak_memory_bytes: 7 * 1024 * 1024,
            estimated_memory_bytes: 7 * 1024 * 1024,
            sim_time_s: if c == 0 { f64::NAN } else { 0.0 },
            ..ClientRecord::default()
        })
        .collect();
    let run = Run {
        dir,
        name: "odd-values".into(),
        rounds,
        clients,
        ..Run::default()
    };
    let svgs = check_plots(&run, &render_plots(&run).unwrap());
    assert_eq!(svgs[0].matches("<circle").count(), 3);
    assert!(!svgs.iter().any(|s| s.contains("NaN")));
    let table = summary_table(std::slice::from_ref(&run));
    assert!(table.contains("50.00"), "{table}");
}

#[test]
fn summary_table_two_runs_side_by_side() {
    let tmp = tempfile::tempdir().unwrap();
    let a = write_run(
        tmp.path(),
        "fedavg-run",
        5,
        &|r| Some(0.1 * r as f64),
        Some(summary("fedavg", 5, 0.8123, 0.8251)),
    );
    // No summary.json: everything is derived from the metrics.
    let b = write_run(
        tmp.path(),
        "fedprox-run",
        4,
        &|r| Some([0.31, 0.52, 0.6449, 0.645][r as usize - 1]),
        None,
    );
    let runs = [Run::load(&a).unwrap(), Run::load(&b).unwrap()];
    let table = summary_table(&runs);

    let row = |label: &str| -> Vec<String> {
        let line = table
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no row {label:?} in\n{table}"));
        line[label.len()..]
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(row("run"), ["fedavg-run", "fedprox-run"]);
    assert_eq!(row("method"), ["fedavg", "-"]);
    assert_eq!(row("rounds"), ["5", "4"]);
    assert_eq!(row("final accuracy (%)"), ["81.23", "64.50"]);
    assert_eq!(row("best accuracy (%)"), ["82.51", "64.50"]);
    assert_eq!(row("final test loss"), ["1.0000", "0.7100"]);
    // fedprox: 1.5 MB * (1+2+3+4) up, 3 MB * 4 down.
    assert_eq!(row("total MB up"), ["7.50", "15.00"]);
    assert_eq!(row("total MB down"), ["15.00", "12.00"]);
    assert_eq!(row("sim time (s)"), ["62.50", "50.00"]);
    assert_eq!(row("mean clients/round"), ["3.0", "3.0"]);
    // 64 MiB + 5 MiB in the metrics; clients reach 40 + 20 + 5 = 65 MiB.
    assert_eq!(row("max client peak memory (MiB)"), ["69.0", "68.0"]);
    assert_eq!(row("total training TFLOPs"), ["1.000", "0.800"]);

    // Every line of a column lines up: the table is rectangular-ish and the
    // value columns end at the same position.
    let ends: Vec<usize> = table
        .lines()
        .filter(|l| !l.starts_with('-'))
        .map(|l| l.chars().count())
        .collect();
    assert!(ends.iter().all(|&e| e == ends[0]), "{table}");

    // One run: the same table with one column.
    let single = summary_table(&runs[..1]);
    assert!(single.contains("fedavg-run") && !single.contains("fedprox-run"));
    assert!(
        single
            .lines()
            .any(|l| l.starts_with("final accuracy (%)") && l.ends_with("81.23"))
    );
}

#[test]
fn summary_table_switches_to_gflops_for_small_runs() {
    let run = Run {
        name: "tiny".into(),
        rounds: vec![RoundRecord {
            round: 1,
            flops: 2.5e9,
            ..RoundRecord::default()
        }],
        ..Run::default()
    };
    let table = summary_table(&[run]);
    let line = table
        .lines()
        .find(|l| l.starts_with("total training GFLOPs"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(line.ends_with("2.500"), "{table}");
    // Not evaluated: accuracy shown as missing.
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("final accuracy (%)") && l.ends_with('-'))
    );
}

#[test]
fn render_comparison_writes_both_plots() {
    let tmp = tempfile::tempdir().unwrap();
    let a = write_run(tmp.path(), "run-alpha", 5, &|r| Some(0.1 * r as f64), None);
    let b = write_run(tmp.path(), "run-beta", 3, &|r| Some(0.2 * r as f64), None);
    let c = write_run(tmp.path(), "run-gamma", 2, &|_| None, None);
    let runs = [
        Run::load(&a).unwrap(),
        Run::load(&b).unwrap(),
        Run::load(&c).unwrap(),
    ];
    let out = tmp.path().join("compare").join("nested");
    let paths = render_comparison(&runs, &out).unwrap();
    assert_eq!(
        paths,
        [
            out.join("compare_accuracy_vs_round.svg"),
            out.join("compare_accuracy_vs_bytes.svg")
        ]
    );
    for (path, title) in paths.iter().zip([
        "Test accuracy vs round (comparison)",
        "Test accuracy vs communication (comparison)",
    ]) {
        let svg = fs::read_to_string(path).unwrap();
        assert!(svg.contains(title), "{}", path.display());
        assert!(svg.contains("run-alpha") && svg.contains("run-beta"));
        assert!(svg.contains("run-gamma (not evaluated)"));
        assert_eq!(svg.matches("<circle").count(), 8);
    }
    assert_eq!(fs::read_dir(&out).unwrap().count(), 2);

    let err = render_comparison(&[], &out).unwrap_err();
    assert!(matches!(err, ReportError::NoRuns { .. }), "{err:?}");
}
