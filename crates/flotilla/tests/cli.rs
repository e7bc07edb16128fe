//! Integration tests of the `flotilla` command: the binary is run as a user would run it.
//!
//! * bad input ends in one `error:` line that names the problem, never a panic;
//! * a tiny end-to-end `simulate`, then `evaluate` and `report` on its run directory;
//! * `simulate --resume` continues a stopped run to exactly the result of an uninterrupted one;
//! * `partition` describes the split that `simulate` uses;
//! * results do not depend on the number of worker threads.
//!
//! Tests that train or load data need Fashion-MNIST in /usr/share/datasets/fashion-mnist
//! (`apt-get install dataset-fashion-mnist`); without it they print a note and pass.

mod common;

use common::*;
use serde_json::Value;
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// 1. Bad input: one clean error line, never a panic.
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_toml_names_the_file() {
    let tmp = TempDir::new().unwrap();
    let cfg = write_config(
        tmp.path(),
        "broken.toml",
        "rounds = 2\n[data\nnum_clients = 3\n",
    );
    let out = flotilla(
        tmp.path(),
        &["simulate", "--config", s(&cfg), "--out", "run"],
    );
    assert_clean_error(&out, "malformed TOML", &["broken.toml"]);
    assert!(
        !tmp.path().join("run").exists(),
        "a run directory was created"
    );
}

#[test]
fn unknown_key_names_the_key() {
    let tmp = TempDir::new().unwrap();
    let cfg = write_config(
        tmp.path(),
        "unknown.toml",
        &tiny_with("lr = 0.05", "lr = 0.05\nlearning_rate = 0.1"),
    );
    let out = flotilla(
        tmp.path(),
        &["simulate", "--config", s(&cfg), "--out", "run"],
    );
    assert_clean_error(&out, "unknown key", &["learning_rate", "unknown.toml"]);
}

#[test]
fn invalid_value_names_the_key() {
    let tmp = TempDir::new().unwrap();
    let cfg = write_config(tmp.path(), "neg.toml", &tiny_with("lr = 0.05", "lr = -1"));
    let out = flotilla(
        tmp.path(),
        &["simulate", "--config", s(&cfg), "--out", "run"],
    );
    assert_clean_error(&out, "lr = -1", &["training.lr", "neg.toml"]);
    // The same check applies to a value given with --set.
    let cfg = write_config(tmp.path(), "tiny.toml", TINY);
    let out = flotilla(
        tmp.path(),
        &[
            "simulate",
            "--config",
            s(&cfg),
            "--out",
            "run",
            "--set",
            "training.lr=-1",
        ],
    );
    assert_clean_error(&out, "--set training.lr=-1", &["training.lr"]);
}

#[test]
fn missing_dataset_dir_names_the_path_and_the_fix() {
    // Needs no data: the directory is missing on purpose.
    let tmp = TempDir::new().unwrap();
    let cfg = write_config(tmp.path(), "tiny.toml", TINY);
    let out = flotilla(
        tmp.path(),
        &[
            "simulate",
            "--config",
            s(&cfg),
            "--data-dir",
            "/nonexistent",
            "--out",
            "run",
        ],
    );
    assert_clean_error(
        &out,
        "--data-dir /nonexistent",
        &["/nonexistent", "apt-get install dataset-fashion-mnist"],
    );
    // FLOTILLA_DATA is honoured (and named) when there is no --data-dir.
    let out = flotilla_env(
        tmp.path(),
        &["partition", "--config", s(&cfg)],
        &[("FLOTILLA_DATA", "/nonexistent-env")],
    );
    assert_clean_error(
        &out,
        "FLOTILLA_DATA=/nonexistent-env",
        &["/nonexistent-env", "apt-get install dataset-fashion-mnist"],
    );
}

#[test]
fn truncated_dataset_file_is_reported_as_corrupt() {
    if !have_data("truncated_dataset_file_is_reported_as_corrupt") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mut victim = None;
    for entry in std::fs::read_dir(DATA_DIR).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        let to = data.join(&name);
        if name.starts_with("train-images-idx3-ubyte") {
            // Only the first few KB, as after an interrupted download.
            let bytes = std::fs::read(entry.path()).unwrap();
            std::fs::write(&to, &bytes[..4096.min(bytes.len() / 2)]).unwrap();
            victim = Some(to);
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
    let victim = victim.expect("train-images-idx3-ubyte[.gz] in the dataset");
    let cfg = write_config(tmp.path(), "tiny.toml", TINY);
    let out = flotilla(
        tmp.path(),
        &[
            "simulate",
            "--config",
            s(&cfg),
            "--data-dir",
            s(&data),
            "--out",
            "run",
        ],
    );
    let msg = assert_clean_error(&out, "truncated train-images", &[s(&victim)]);
    assert!(
        msg.contains("truncated") || msg.contains("corrupt"),
        "the message does not say the file is truncated or corrupt: {msg}"
    );
}

#[test]
fn impossible_fleet_is_refused() {
    if !have_data("impossible_fleet_is_refused") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let body = format!(
        "{TINY}\n[fleet]\ntiers = [{{ name = \"tiny\", share = 1.0, memory_mib = 0.01, \
         gflops = 1.0, uplink_mbps = 1.0, downlink_mbps = 1.0 }}]\n"
    );
    let cfg = write_config(tmp.path(), "fleet.toml", &body);
    let out = flotilla(
        tmp.path(),
        &["simulate", "--config", s(&cfg), "--out", "run"],
    );
    assert_clean_error(&out, "impossible fleet", &["impossible fleet"]);
}

#[test]
fn missing_config_file_is_named() {
    let tmp = TempDir::new().unwrap();
    let missing = tmp.path().join("no-such-config.toml");
    for args in [
        vec!["simulate", "--config", s(&missing), "--out", "run"],
        vec!["partition", "--config", s(&missing)],
        vec![
            "evaluate",
            "--config",
            s(&missing),
            "--model",
            "model.safetensors",
        ],
    ] {
        let out = flotilla(tmp.path(), &args);
        assert_clean_error(&out, &args.join(" "), &[s(&missing)]);
    }
    // --resume of a directory that is not a run names the config file it looked for.
    let out = flotilla(tmp.path(), &["simulate", "--resume", s(tmp.path())]);
    assert_clean_error(&out, "--resume <empty dir>", &["config.toml"]);
}

#[test]
fn missing_model_and_run_dir_are_named() {
    let tmp = TempDir::new().unwrap();
    let missing_run = tmp.path().join("no-such-run");
    let out = flotilla(tmp.path(), &["report", s(&missing_run)]);
    assert_clean_error(&out, "report <missing dir>", &[s(&missing_run)]);
    if !have_data("missing_model_and_run_dir_are_named (evaluate part)") {
        return;
    }
    let cfg = write_config(tmp.path(), "tiny.toml", TINY);
    let model = tmp.path().join("no-such-model.safetensors");
    let out = flotilla(
        tmp.path(),
        &["evaluate", "--config", s(&cfg), "--model", s(&model)],
    );
    assert_clean_error(&out, "evaluate <missing model>", &[s(&model)]);
    let bad = write_config(tmp.path(), "garbage.safetensors", "not a model");
    let out = flotilla(
        tmp.path(),
        &["evaluate", "--config", s(&cfg), "--model", s(&bad)],
    );
    assert_clean_error(&out, "evaluate <garbage model>", &[s(&bad)]);
}

// ---------------------------------------------------------------------------------------------
// 2. End to end: simulate, evaluate, report.
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// 3. Resume.
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// 4. Partition.
// ---------------------------------------------------------------------------------------------

#[test]
fn partition_summarises_a_dirichlet_split() {
    if !have_data("partition_summarises_a_dirichlet_split") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let body = tiny_with("num_clients = 10", "num_clients = 20").replace(
        r#"partition = { kind = "iid" }"#,
        r#"partition = { kind = "dirichlet", alpha = 0.5 }"#,
    );
    let cfg = write_config(tmp.path(), "dirichlet.toml", &body);

    let table = success(
        &flotilla(tmp.path(), &["partition", "--config", s(&cfg)]),
        "partition",
    );
    assert!(table.contains("20 clients"), "table:\n{table}");
    assert!(table.contains("dirichlet"), "table:\n{table}");
    // Client rows follow the `client size classes histogram` header.
    let rows: Vec<usize> = table
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("client"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(rows, (0..20).collect::<Vec<_>>(), "client rows:\n{table}");

    let json = success(
        &flotilla(tmp.path(), &["partition", "--config", s(&cfg), "--json"]),
        "partition --json",
    );
    let v: Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("partition --json is not JSON ({e}):\n{json}"));
    assert_eq!(v["num_clients"], 20, "{v}");
    assert_eq!(v["num_classes"], 10, "{v}");
    assert_eq!(v["total_samples"], 2000, "train_limit = 2000: {v}");
    let clients = v["clients"].as_array().expect("clients array");
    assert_eq!(clients.len(), 20);
    let mut total = 0;
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(c["id"], i, "{c}");
        let size = c["size"].as_u64().expect("size");
        let hist: Vec<u64> = c["histogram"]
            .as_array()
            .expect("histogram")
            .iter()
            .map(|h| h.as_u64().unwrap())
            .collect();
        assert_eq!(hist.len(), 10, "{c}");
        assert_eq!(
            hist.iter().sum::<u64>(),
            size,
            "histogram sums to size: {c}"
        );
        assert!(size >= 10, "min_size defaults to 10: {c}");
        assert!(c.get("classes_present").is_some() && c.get("label_tv_distance").is_some());
        total += size;
    }
    assert_eq!(total, 2000);
    let tv = v["mean_label_tv_distance"].as_f64().expect("tv distance");
    assert!(tv > 0.1, "Dirichlet(0.5) should be label-skewed, TV = {tv}");

    // The split that partition prints is the one simulate trains on.
    let run = tmp.path().join("run");
    success(
        &flotilla(
            tmp.path(),
            &[
                "simulate",
                "--config",
                s(&cfg),
                "--out",
                s(&run),
                "--set",
                "rounds=1",
                "--set",
                "sampling.clients_per_round=20",
            ],
        ),
        "simulate with every client",
    );
    let mut sizes = vec![None; 20];
    for c in read_jsonl(&run.join("clients.jsonl")) {
        sizes[c["client"].as_u64().unwrap() as usize] = c["num_examples"].as_u64();
    }
    let expected: Vec<Option<u64>> = clients.iter().map(|c| c["size"].as_u64()).collect();
    assert_eq!(
        sizes, expected,
        "simulate's client sizes vs partition --json"
    );
}

#[test]
fn server_holdout_is_left_out_of_the_partition_and_shown_in_the_run() {
    if !have_data("server_holdout_is_left_out_of_the_partition_and_shown_in_the_run") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let body = format!("{TINY}\n[server_data]\nsource = \"holdout\"\nsize = 400\n");
    let cfg = write_config(tmp.path(), "held.toml", &body);
    let table = success(
        &flotilla(tmp.path(), &["partition", "--config", s(&cfg)]),
        "partition",
    );
    assert!(
        table.contains("400 training samples held out for the server"),
        "{table}"
    );
    let json = success(
        &flotilla(tmp.path(), &["partition", "--config", s(&cfg), "--json"]),
        "partition --json",
    );
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        v["total_samples"], 1600,
        "2,000 minus the server's 400: {v}"
    );

    let run = tmp.path().join("run");
    success(
        &flotilla(
            tmp.path(),
            &[
                "simulate",
                "--config",
                s(&cfg),
                "--out",
                s(&run),
                "--set",
                "rounds=1",
                "--set",
                "sampling.clients_per_round=10",
            ],
        ),
        "simulate with a server holdout",
    );
    let resolved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        resolved.contains("[server_data]") && resolved.contains("size = 400"),
        "{resolved}"
    );
    let examples: u64 = read_jsonl(&run.join("clients.jsonl"))
        .iter()
        .map(|c| c["num_examples"].as_u64().unwrap())
        .sum();
    assert_eq!(examples, 1600);
    // FedAvg does no server-side training: no server FLOPs, nothing added to the clock.
    let m = &read_jsonl(&run.join("metrics.jsonl"))[0];
    assert_eq!(m["server_flops"], 0.0, "{m}");
    assert!(m["server_wall_s"].as_f64().unwrap() >= 0.0, "{m}");

    // A slice the training set cannot spare, and a file that is not there, are named.
    let out = flotilla(
        tmp.path(),
        &[
            "simulate",
            "--config",
            s(&cfg),
            "--out",
            "big",
            "--set",
            "server_data.size=1995",
        ],
    );
    assert_clean_error(
        &out,
        "server_data.size=1995",
        &["server_data.size", "data.train_limit", "at most 1990"],
    );
    let out = flotilla(
        tmp.path(),
        &[
            "simulate",
            "--config",
            s(&cfg),
            "--out",
            "idx",
            "--set",
            "server_data.source=idx",
            "--set",
            "server_data.images=generated/images.idx",
            "--set",
            "server_data.labelled=false",
        ],
    );
    assert_clean_error(
        &out,
        "missing server_data.images",
        &[
            "server_data.images",
            "generated/images.idx",
            "does not exist",
        ],
    );
    let out = flotilla(
        tmp.path(),
        &[
            "simulate",
            "--config",
            s(&cfg),
            "--out",
            "gen",
            "--set",
            "server_data.source=generator",
        ],
    );
    assert_clean_error(
        &out,
        "unknown source",
        &["server_data.source", "generator", "holdout", "idx"],
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Determinism across worker counts.
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// FlexTrain's planner: each tier gets the deepest prefix its memory fits.
// ---------------------------------------------------------------------------------------------

#[test]
fn plan_gives_each_tier_its_depth_and_names_a_device_that_fits_none() {
    let tmp = TempDir::new().unwrap();
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/flextrain.toml"),
    )
    .unwrap();
    let tiny = "\n[[fleet.tiers]]\nname = \"tiny\"\nshare = 1\nmemory_mib = 8\ngflops = 1\nuplink_mbps = 1\ndownlink_mbps = 1\n";
    let cfg = write_config(tmp.path(), "flex.toml", &format!("{example}{tiny}"));
    let out = flotilla(tmp.path(), &["plan", "--config", s(&cfg)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |tier: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(tier))
            .unwrap_or_else(|| panic!("no line for {tier} in\n{text}"))
            .to_string()
    };
    // The capability table of the example: depths 3, 4, 5, 6, 7, 8, 8, 9 of 9.
    for (tier, depth) in [
        ("r05", 3),
        ("r12", 4),
        ("r20", 5),
        ("r25", 6),
        ("r48", 7),
        ("r66", 8),
        ("r83", 8),
        ("r100", 9),
    ] {
        assert!(
            line(tier).contains(&format!("train depth {depth}/9")),
            "{tier}: {}",
            line(tier)
        );
    }
    // Each tier's estimate beside its budget: the planned depth fits, and deeper costs more.
    let figures = |tier: &str| -> (f64, f64, f64) {
        let l = line(tier);
        let f: Vec<f64> = l
            .split_whitespace()
            .skip(2)
            .take(3)
            .map(|x| {
                x.parse()
                    .unwrap_or_else(|_| panic!("not a number in `{l}`"))
            })
            .collect();
        (f[0], f[1], f[2])
    };
    let mut last = (0.0, 0.0);
    for tier in ["r05", "r12", "r20", "r25", "r48", "r66", "r100"] {
        let (budget, estimate, flops) = figures(tier);
        assert!(estimate <= budget, "{tier}: {estimate} MiB over {budget}");
        assert!(
            estimate >= last.0 && flops >= last.1,
            "{tier}: {}",
            line(tier)
        );
        last = (estimate, flops);
    }
    assert!(
        line("r05").contains("\"student\":null"),
        "the weakest class distils nothing"
    );
    assert!(line("r100").contains("\"student\":8"));
    assert!(line("tiny").contains("skipped") && line("tiny").contains("fits no prefix"));
    // FedSmall: every tier trains the weakest tier's depth.
    let out = flotilla(
        tmp.path(),
        &[
            "plan",
            "--config",
            s(&cfg),
            "--set",
            "method.name=\"fedsmall\"",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("train depth 3/9").count(), 8, "{text}");
}

#[test]
fn every_example_config_is_valid_and_plans() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut checked = 0;
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = flotilla(&root, &["plan", "--config", s(&path)]);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 9, "only {checked} example configs found");
}

#[test]
fn logs_are_plain_when_piped_and_json_on_request() {
    if !have_data("logs_are_plain_when_piped_and_json_on_request") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let cfg = write_config(tmp.path(), "tiny.toml", TINY);
    let run = |out: &str, format: Option<&str>| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["simulate", "--config", s(&cfg), "--out", out])
            .current_dir(tmp.path())
            .env("FLOTILLA_LOG", "info")
            .env_remove("NO_COLOR")
            .env_remove("FLOTILLA_LOG_FORMAT");
        if let Some(f) = format {
            cmd.env("FLOTILLA_LOG_FORMAT", f);
        }
        cmd.output().unwrap()
    };
    // stderr is a pipe here, as under a service manager or `2> log`.
    let plain = run("plain", None);
    let stderr = text(&plain.stderr);
    assert!(plain.status.success(), "{stderr}");
    assert!(stderr.contains("round finished"), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "escape codes in piped logs:\n{stderr}"
    );
    let json = run("json", Some("json"));
    let stderr = text(&json.stderr);
    assert!(json.status.success(), "{stderr}");
    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "round finished" && l["level"] == "INFO"),
        "{stderr}"
    );
    let bad = run("bad", Some("yaml"));
    assert_clean_error(&bad, "unknown log format", &["FLOTILLA_LOG_FORMAT", "json"]);
}
