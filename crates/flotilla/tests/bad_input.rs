//! The `flotilla` command on bad input, run as a user would run it: every mistake (a malformed
//! or unknown config key, a missing or damaged dataset, an impossible fleet, a missing file)
//! ends in one `error:` line that names the problem and the fix, never a panic.
//!
//! Tests that load data need Fashion-MNIST in /usr/share/datasets/fashion-mnist
//! (`apt-get install dataset-fashion-mnist`); without it they print a note and pass.

mod common;

use common::*;
use tempfile::TempDir;

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

#[test]
fn unknown_gemm_kernel_set_is_named() {
    let tmp = TempDir::new().unwrap();
    let out = flotilla_env(
        tmp.path(),
        &["plan", "--config", "no-such.toml"],
        &[("FLOTILLA_GEMM_KERNELS", "sse9")],
    );
    assert_clean_error(
        &out,
        "FLOTILLA_GEMM_KERNELS=sse9",
        &["FLOTILLA_GEMM_KERNELS", "`sse9`", "avx512", "unset"],
    );
}
