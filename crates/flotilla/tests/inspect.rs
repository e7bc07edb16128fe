//! The `flotilla` commands that describe rather than train: `partition` shows the split that
//! `simulate` uses (with the server's held-out slice), `plan` what each device tier is asked to
//! do, every example config is valid and plans; and the logs fit where they go (plain when
//! piped, JSON on request).
//!
//! Tests that load data need Fashion-MNIST in /usr/share/datasets/fashion-mnist
//! (`apt-get install dataset-fashion-mnist`); without it they print a note and pass.

mod common;

use common::*;
use serde_json::Value;
use tempfile::TempDir;

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
