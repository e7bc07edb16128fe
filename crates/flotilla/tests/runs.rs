//! Runs of the `flotilla` command as a user makes them: a tiny end-to-end `simulate`, then
//! `evaluate` and `report` on its run directory; `simulate --resume` continuing a stopped run to
//! exactly the result of an uninterrupted one; results that do not depend on the number of
//! worker threads.
//!
//! These tests need Fashion-MNIST in /usr/share/datasets/fashion-mnist
//! (`apt-get install dataset-fashion-mnist`); without it they print a note and pass.

mod common;

use common::*;
use serde_json::Value;
use tempfile::TempDir;

#[test]
fn simulate_evaluate_report_end_to_end() {
    if !have_data("simulate_evaluate_report_end_to_end") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let cfg = write_config(tmp.path(), "tiny.toml", TINY);
    let run = tmp.path().join("run-alpha");
    let stdout = success(
        &flotilla(
            tmp.path(),
            &["simulate", "--config", s(&cfg), "--out", s(&run)],
        ),
        "simulate",
    );
    assert!(stdout.contains("run-alpha"), "stdout:\n{stdout}");

    for f in [
        "config.toml",
        "metrics.jsonl",
        "clients.jsonl",
        "model.safetensors",
        "summary.json",
    ] {
        assert!(run.join(f).is_file(), "{f} missing from the run directory");
    }

    let metrics = read_jsonl(&run.join("metrics.jsonl"));
    assert_eq!(rounds_of(&metrics), [1, 2], "metrics.jsonl rounds");
    for m in &metrics {
        for k in METRIC_KEYS {
            assert!(m.get(k).is_some(), "metrics line lacks `{k}`: {m}");
        }
        assert_eq!(m["clients"], 5, "{m}");
        assert!(m["bytes_up"].as_u64().unwrap() > 0, "{m}");
        assert!(m["bytes_down"].as_u64().unwrap() > 0, "{m}");
        assert!(m["flops"].as_f64().unwrap() > 0.0, "{m}");
    }
    let last_acc = metrics[1]["test_accuracy"].as_f64().expect("accuracy");
    assert!(
        last_acc > 0.3,
        "round 2 test accuracy {last_acc} is not above 0.3 (chance is 0.1)"
    );

    let clients = read_jsonl(&run.join("clients.jsonl"));
    assert_eq!(clients.len(), 10, "clients.jsonl: 2 rounds x 5 clients");
    for r in [1, 2] {
        let mut ids: Vec<u64> = clients
            .iter()
            .filter(|c| c["round"] == r)
            .map(|c| c["client"].as_u64().unwrap())
            .collect();
        assert_eq!(ids.len(), 5, "round {r} has 5 client records");
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 5, "round {r}: clients are distinct");
        assert!(ids.iter().all(|&c| c < 10), "round {r}: client ids < 10");
    }

    let summary = read_json(&run.join("summary.json"));
    assert_eq!(summary["rounds"], 2, "{summary}");
    assert_eq!(summary["final_test_accuracy"], metrics[1]["test_accuracy"]);

    let mut svgs: Vec<String> = std::fs::read_dir(run.join("plots"))
        .expect("plots directory")
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".svg"))
        .collect();
    svgs.sort();
    assert_eq!(svgs.len(), 4, "plots: {svgs:?}");

    // The saved model, evaluated on the same 500 test samples, scores the last round's accuracy.
    let stdout = success(
        &flotilla(
            tmp.path(),
            &[
                "evaluate",
                "--config",
                s(&run.join("config.toml")),
                "--model",
                s(&run.join("model.safetensors")),
            ],
        ),
        "evaluate",
    );
    let field = |name: &str| -> f64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no `{name}` line in:\n{stdout}"))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("`{name}` is not a number ({e}):\n{stdout}"))
    };
    assert_eq!(
        format!("{:.4}", field("test_accuracy:")),
        format!("{last_acc:.4}"),
        "evaluate disagrees with metrics.jsonl:\n{stdout}"
    );
    let last_loss = metrics[1]["test_loss"].as_f64().unwrap();
    assert!(
        (field("test_loss:") - last_loss).abs() < 1e-3,
        "evaluate test_loss vs metrics {last_loss}:\n{stdout}"
    );
    assert_eq!(field("samples:"), 500.0, "{stdout}");

    // A second run; report puts both side by side.
    let run2 = tmp.path().join("run-beta");
    success(
        &flotilla(
            tmp.path(),
            &[
                "simulate",
                "--config",
                s(&cfg),
                "--out",
                s(&run2),
                "--set",
                "seed=1",
                "--set",
                "rounds=1",
            ],
        ),
        "simulate (second run)",
    );
    let comparison = tmp.path().join("cmp");
    let stdout = success(
        &flotilla(
            tmp.path(),
            &["report", s(&run), s(&run2), "--out", s(&comparison)],
        ),
        "report",
    );
    let header = stdout
        .lines()
        .find(|l| l.contains("run-alpha") && !l.starts_with("plot:"))
        .unwrap_or_else(|| panic!("no table line names run-alpha:\n{stdout}"));
    let (a, b) = (header.find("run-alpha"), header.find("run-beta"));
    assert!(
        matches!((a, b), (Some(a), Some(b)) if a < b),
        "the run names are not side by side on one line:\n{stdout}"
    );
    let method = stdout
        .lines()
        .find(|l| l.starts_with("method"))
        .unwrap_or_else(|| panic!("no method row:\n{stdout}"));
    assert_eq!(method.matches("fedavg").count(), 2, "{stdout}");
    let rounds = stdout
        .lines()
        .find(|l| l.starts_with("rounds"))
        .unwrap_or_else(|| panic!("no rounds row:\n{stdout}"));
    assert_eq!(
        rounds.split_whitespace().skip(1).collect::<Vec<_>>(),
        ["2", "1"],
        "{stdout}"
    );
    assert!(
        comparison.join("compare_accuracy_vs_round.svg").is_file(),
        "no comparison plot in {}",
        comparison.display()
    );
    // Without --out the comparison goes inside the first run, not the working directory.
    success(
        &flotilla(tmp.path(), &["report", s(&run), s(&run2)]),
        "report without --out",
    );
    assert!(
        run.join("comparison/compare_accuracy_vs_round.svg")
            .is_file()
    );
    assert!(!tmp.path().join("comparison").exists());
}

#[test]
fn resume_matches_an_uninterrupted_run() {
    if !have_data("resume_matches_an_uninterrupted_run") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let cfg = write_config(
        tmp.path(),
        "three.toml",
        &tiny_with("rounds = 2", "rounds = 3"),
    );

    // A: three rounds straight.
    let a = tmp.path().join("a");
    success(
        &flotilla(
            tmp.path(),
            &["simulate", "--config", s(&cfg), "--out", s(&a)],
        ),
        "simulate A",
    );

    // B: the same experiment stopped after two rounds …
    let b = tmp.path().join("b");
    success(
        &flotilla(
            tmp.path(),
            &[
                "simulate",
                "--config",
                s(&cfg),
                "--out",
                s(&b),
                "--set",
                "rounds=2",
            ],
        ),
        "simulate B (2 rounds)",
    );
    let config_b = b.join("config.toml");
    let stored = std::fs::read_to_string(&config_b).unwrap();
    let hits = stored.lines().filter(|l| l.trim() == "rounds = 2").count();
    assert_eq!(hits, 1, "`rounds = 2` not found once in:\n{stored}");
    let extended: String = stored
        .lines()
        .map(|l| {
            if l.trim() == "rounds = 2" {
                "rounds = 3"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    std::fs::write(&config_b, &extended).unwrap();
    assert_eq!(
        extended,
        std::fs::read_to_string(a.join("config.toml")).unwrap(),
        "B's extended config differs from A's"
    );

    // … and killed after it had logged round 3 but before round 3's checkpoint: the resumed
    // run must drop these lines.
    let mut metrics_b = read_jsonl(&b.join("metrics.jsonl"));
    assert_eq!(rounds_of(&metrics_b), [1, 2]);
    let mut stale = metrics_b[1].clone();
    stale["round"] = 3.into();
    stale["test_accuracy"] = (-1.0).into();
    metrics_b.push(stale);
    let mut clients_b = read_jsonl(&b.join("clients.jsonl"));
    let stale_clients: Vec<Value> = clients_b
        .iter()
        .filter(|c| c["round"] == 2)
        .map(|c| {
            let mut c = c.clone();
            c["round"] = 3.into();
            c
        })
        .collect();
    clients_b.extend(stale_clients);
    let to_jsonl = |v: &[Value]| -> String { v.iter().map(|l| format!("{l}\n")).collect() };
    std::fs::write(b.join("metrics.jsonl"), to_jsonl(&metrics_b)).unwrap();
    std::fs::write(b.join("clients.jsonl"), to_jsonl(&clients_b)).unwrap();
    let state = read_json(&b.join("checkpoint/state.json"));
    assert_eq!(state["round"], 2, "B's checkpoint: {state}");

    success(
        &flotilla(tmp.path(), &["simulate", "--resume", s(&b)]),
        "simulate --resume B",
    );

    let (ma, mb) = (
        read_jsonl(&a.join("metrics.jsonl")),
        read_jsonl(&b.join("metrics.jsonl")),
    );
    assert_eq!(rounds_of(&ma), [1, 2, 3], "A's metrics rounds");
    assert_eq!(
        rounds_of(&mb),
        [1, 2, 3],
        "B's metrics rounds after resume (each exactly once)"
    );
    let mut diffs = Vec::new();
    let keys = [
        "round",
        "test_accuracy",
        "test_loss",
        "train_loss",
        "clients",
        "bytes_up",
        "bytes_down",
        "flops",
        "sim_time_s",
    ];
    for (x, y) in ma.iter().zip(&mb) {
        for k in keys {
            if x[k] != y[k] {
                diffs.push(format!(
                    "metrics round {} `{k}`: A {} vs B {}",
                    x["round"], x[k], y[k]
                ));
            }
        }
    }
    // Per-client records, each (round, client) once; measured quantities left out.
    let (ca, cb) = (
        read_jsonl(&a.join("clients.jsonl")),
        read_jsonl(&b.join("clients.jsonl")),
    );
    let key = |c: &Value| (c["round"].as_u64().unwrap(), c["client"].as_u64().unwrap());
    let mut keys_b: Vec<_> = cb.iter().map(key).collect();
    keys_b.sort_unstable();
    let before = keys_b.len();
    keys_b.dedup();
    assert_eq!(before, keys_b.len(), "B's clients.jsonl repeats records");
    diffs.extend(record_diffs(
        "clients.jsonl",
        &ca,
        &cb,
        &["wall_time_s", "peak_memory_bytes"],
    ));
    // The totals restored from the checkpoint continue exactly.
    let (sa, sb) = (
        read_json(&a.join("summary.json")),
        read_json(&b.join("summary.json")),
    );
    for k in [
        "rounds",
        "final_test_accuracy",
        "best_test_accuracy",
        "final_test_loss",
        "total_bytes_up",
        "total_bytes_down",
        "total_flops",
        "sim_time_s",
        "model_parameters",
    ] {
        if sa[k] != sb[k] {
            diffs.push(format!("summary.json `{k}`: A {} vs B {}", sa[k], sb[k]));
        }
    }
    diffs.extend(model_diffs(
        &a.join("model.safetensors"),
        &b.join("model.safetensors"),
    ));
    assert_no_diffs("resumed run B differs from uninterrupted run A", &diffs);
}

#[test]
fn results_do_not_depend_on_the_worker_count() {
    if !have_data("results_do_not_depend_on_the_worker_count") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    // Unequal (Dirichlet) clients, so the two workers get unequal loads.
    let cfg = write_config(
        tmp.path(),
        "workers.toml",
        &tiny_with(
            r#"partition = { kind = "iid" }"#,
            r#"partition = { kind = "dirichlet", alpha = 0.5 }"#,
        ),
    );
    let mut dirs = Vec::new();
    for w in [1, 2] {
        let dir = tmp.path().join(format!("workers-{w}"));
        let set = format!("simulation.workers={w}");
        success(
            &flotilla(
                tmp.path(),
                &[
                    "simulate",
                    "--config",
                    s(&cfg),
                    "--out",
                    s(&dir),
                    "--set",
                    &set,
                ],
            ),
            &format!("simulate with {w} workers"),
        );
        dirs.push(dir);
    }
    // Wall times are scheduling; heap peaks are measurements whose small noise (global caches
    // growing on whichever thread gets there first) is bounded below instead.
    let wall = [
        "wall_time_s",
        "train_wall_s",
        "eval_wall_s",
        "overhead_s",
        "server_wall_s",
        "peak_client_memory_bytes",
    ];
    let (m1, m2) = (
        read_jsonl(&dirs[0].join("metrics.jsonl")),
        read_jsonl(&dirs[1].join("metrics.jsonl")),
    );
    assert_eq!(rounds_of(&m1), [1, 2]);
    for (a, b) in m1.iter().zip(&m2) {
        let (a, b) = (
            a["peak_client_memory_bytes"].as_f64().unwrap(),
            b["peak_client_memory_bytes"].as_f64().unwrap(),
        );
        assert!(
            a > 0.0 && (a - b).abs() <= 0.01 * a,
            "peak memory {a} vs {b}"
        );
    }
    let mut diffs = record_diffs("metrics.jsonl", &m1, &m2, &wall);
    diffs.extend(model_diffs(
        &dirs[0].join("model.safetensors"),
        &dirs[1].join("model.safetensors"),
    ));
    assert_no_diffs("1 worker vs 2 workers", &diffs);
}
