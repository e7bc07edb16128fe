//! FedTSA as a user runs it: `flotilla generate` fits the generator on the config's held-out
//! slice and writes IDX files, a grid and generator.json; `flotilla simulate` then runs FedTSA
//! with stage 2 on those images, on the example's three-tier fleet, while the clients keep the
//! data of the holdout run (`withhold`).
//!
//! These tests need Fashion-MNIST in /usr/share/datasets/fashion-mnist
//! (`apt-get install dataset-fashion-mnist`); without it they print a note and pass.

mod common;

use common::*;
use tempfile::TempDir;

fn config() -> String {
    let fleet = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/fedtsa-fleet.csv")
        .canonicalize()
        .unwrap();
    format!(
        r#"
seed = 0
rounds = 1
[data]
dataset = "fashion-mnist"
num_clients = 30
partition = {{ kind = "iid" }}
train_limit = 3500
test_limit = 500
[model]
arch = "cnn"
width = 0.5
[training]
epochs = 1
batch_size = 32
optimizer = "sgd"
lr = 0.01
[sampling]
clients_per_round = 30
[simulation]
checkpoint_every = 0
[server_data]
source = "holdout"
size = 500
labelled = false
[fleet]
csv = "{}"
[method]
name = "fedtsa"
server_samples = 100
"#,
        fleet.display()
    )
}

#[test]
fn generate_then_fedtsa_on_the_generated_images() {
    if !have_data("generate_then_fedtsa_on_the_generated_images") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let cfg = write_config(tmp.path(), "fedtsa.toml", &config());
    let generated = tmp.path().join("generated");
    let stdout = success(
        &flotilla(
            tmp.path(),
            &[
                "generate",
                "--config",
                s(&cfg),
                "--out",
                s(&generated),
                "--steps",
                "200",
                "--samples",
                "120",
            ],
        ),
        "generate",
    );
    assert!(stdout.contains("classifier check"), "{stdout}");
    // IDX files of 120 images 28×28 and their pool labels (class i mod 10).
    let images = std::fs::read(generated.join("images-idx3-ubyte")).unwrap();
    assert_eq!(&images[..4], &[0, 0, 8, 3]);
    assert_eq!(&images[4..16], &[0, 0, 0, 120, 0, 0, 0, 28, 0, 0, 0, 28]);
    assert_eq!(images.len(), 16 + 120 * 784);
    let labels = std::fs::read(generated.join("labels-idx1-ubyte")).unwrap();
    let expected: Vec<u8> = (0..120).map(|i| (i % 10) as u8).collect();
    assert_eq!(&labels[8..], &expected[..]);
    for grid in ["samples.png", "held-out.png"] {
        let png = std::fs::read(generated.join(grid)).unwrap();
        assert_eq!(&png[1..4], b"PNG", "{grid}");
    }
    let report = read_json(&generated.join("generator.json"));
    assert_eq!(report["samples"], 120);
    assert!(report["report"]["fit_wall_s"].as_f64().unwrap() > 0.0);
    assert!(report["report"]["loss_last"].as_f64() < report["report"]["loss_first"].as_f64());
    let acc = report["classifier_check"]["sample_accuracy"]
        .as_f64()
        .unwrap();
    assert!((0.0..=1.0).contains(&acc), "{report}");

    // FedTSA with stage 2 on the generated images; the clients keep the holdout run's data.
    let run = tmp.path().join("run");
    let images_set = format!(
        "server_data.images=\"{}\"",
        s(&generated.join("images-idx3-ubyte"))
    );
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
                "server_data.source=\"idx\"",
                "--set",
                "server_data.withhold=500",
                "--set",
                "server_data.size=120",
                "--set",
                &images_set,
            ],
        ),
        "simulate fedtsa on generated images",
    );
    let summary = read_json(&run.join("summary.json"));
    let clusters = summary["method_details"]["clusters"].as_array().unwrap();
    assert_eq!(clusters.len(), 3, "{summary}");
    let widths: Vec<f64> = clusters
        .iter()
        .map(|c| c["width"].as_f64().unwrap())
        .collect();
    assert_eq!(widths, [0.25, 0.5, 1.0]);
    assert!(summary["total_server_flops"].as_f64().unwrap() > 0.0);
    // Every cluster's model is saved, with its width in the metadata.
    for (k, width) in [(0, 0.125), (2, 0.5)] {
        let (header, _) = safetensors_parts(&run.join(format!("model-cluster-{k}.safetensors")));
        let spec: serde_json::Value =
            serde_json::from_str(header["__metadata__"]["model"].as_str().unwrap()).unwrap();
        assert_eq!(spec["width"], width, "cluster {k}");
    }
    let metrics = read_jsonl(&run.join("metrics.jsonl"));
    let m = &metrics[0];
    assert!(m.get("stage2_loss").is_some(), "{m}");
    for k in 0..3 {
        assert!(
            m.get(format!("test_accuracy/cluster-{k}").as_str())
                .is_some(),
            "{m}"
        );
    }
    // Each tier's clients trained the model of their width: FedAvg's bytes at that width.
    let clients = read_jsonl(&run.join("clients.jsonl"));
    for tier in ["board", "old-pc", "new-pc"] {
        let up: Vec<u64> = clients
            .iter()
            .filter(|c| c["tier"] == tier)
            .map(|c| c["bytes_up"].as_u64().unwrap())
            .collect();
        assert_eq!(up.len(), 10, "{tier}");
        assert!(up.iter().all(|b| b.abs_diff(up[0]) < 64), "{tier}: {up:?}");
    }
}

#[test]
fn generate_needs_a_held_out_slice() {
    let tmp = TempDir::new().unwrap();
    let cfg = write_config(tmp.path(), "tiny.toml", TINY);
    let out = flotilla(
        tmp.path(),
        &["generate", "--config", s(&cfg), "--out", "gen"],
    );
    assert_clean_error(
        &out,
        "generate without [server_data]",
        &["[server_data]", "withhold"],
    );
}
