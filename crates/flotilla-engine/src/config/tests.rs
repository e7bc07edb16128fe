use super::*;

const BASE: &str = r#"
rounds = 2
[data]
dataset = "fashion-mnist"
num_clients = 10
partition = { kind = "iid" }
[model]
arch = "mlp"
[training]
epochs = 1
batch_size = 10
optimizer = "sgd"
lr = 0.1
[sampling]
clients_per_round = 5
[method]
name = "fedavg"
"#;

#[test]
fn parses_and_checks() {
    let e = Experiment::from_toml(BASE).unwrap();
    assert_eq!(e.model_spec().input, [1, 28, 28]);
    assert_eq!(e.clients_per_round(10), 5);
}

#[test]
fn unknown_key_is_named() {
    let err = Experiment::from_toml(&BASE.replace("lr = 0.1", "lr = 0.1\nlearning_rate = 3"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("learning_rate"), "{err}");
}

#[test]
fn invalid_values_are_named() {
    for (from, to, key) in [
        ("lr = 0.1", "lr = -1.0", "training.lr"),
        (
            "clients_per_round = 5",
            "clients_per_round = 50",
            "sampling.clients_per_round",
        ),
        ("rounds = 2", "rounds = 0", "rounds"),
        ("name = \"fedavg\"", "nom = \"x\"", "method.name"),
    ] {
        let err = Experiment::from_toml(&BASE.replace(from, to))
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
    let err = Experiment::from_toml(&BASE.replace("\"fashion-mnist\"", "\"imagenet\""))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("imagenet") && err.contains("fashion-mnist"),
        "{err}"
    );
}

#[test]
fn model_section_is_flat_and_strict() {
    let e = Experiment::from_toml(&BASE.replace(
        "arch = \"mlp\"",
        "arch = \"resnet\"\nblocks_per_stage = 3\nwidth = 0.5",
    ))
    .unwrap();
    assert_eq!(
        e.model.arch,
        Architecture::Resnet {
            blocks_per_stage: 3
        }
    );
    assert_eq!(e.model.width, 0.5);
    let err = Experiment::from_toml(&BASE.replace("arch = \"mlp\"", "arch = \"mlp\"\ndepth = 3"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("depth"), "{err}");
    let back = Experiment::from_toml(&toml::to_string(&e).unwrap()).unwrap();
    assert_eq!(back, e);
}

#[test]
fn server_data_parses_and_is_written_back() {
    let text =
        format!("{BASE}\n[server_data]\nsource = \"holdout\"\nsize = 6000\nlabelled = false\n");
    let e = Experiment::from_toml(&text).unwrap();
    let sd = e.server_data.as_ref().unwrap();
    assert_eq!(sd.source, ServerDataSource::Holdout);
    assert_eq!((sd.size, sd.labelled), (Some(6000), false));
    assert_eq!(e.simulation.server_gflops, 1000.0);
    // The resolved config (config.toml in the run directory) shows the section.
    let resolved = toml::to_string(&e).unwrap();
    assert!(resolved.contains("[server_data]"), "{resolved}");
    assert!(resolved.contains("server_gflops"), "{resolved}");
    assert_eq!(Experiment::from_toml(&resolved).unwrap(), e);
    // Without the section nothing is written.
    let plain = toml::to_string(&Experiment::from_toml(BASE).unwrap()).unwrap();
    assert!(!plain.contains("server_data"), "{plain}");

    let idx = format!(
        "{BASE}\n[server_data]\nsource = \"idx\"\nimages = \"gen/images.idx\"\nlabels = \"gen/labels.idx\"\n"
    );
    let e = Experiment::from_toml(&idx).unwrap();
    let sd = e.server_data.unwrap();
    assert_eq!(sd.source, ServerDataSource::Idx);
    assert!(sd.labelled);
    assert_eq!(sd.images.unwrap(), PathBuf::from("gen/images.idx"));
}

#[test]
fn server_data_errors_name_the_key() {
    let sd = |body: &str| format!("{BASE}\n[server_data]\n{body}\n");
    for (text, key, hint) in [
        (
            sd("source = \"holdout\""),
            "server_data.size",
            "size = 6000",
        ),
        (
            sd("source = \"holdout\"\nsize = 59995"),
            "server_data.size",
            "at most 59990",
        ),
        (
            BASE.replace("num_clients = 10", "num_clients = 10\ntrain_limit = 500")
                + "\n[server_data]\nsource = \"holdout\"\nsize = 500\n",
            "server_data.size",
            "data.train_limit",
        ),
        (
            sd("source = \"holdout\"\nsize = 0"),
            "server_data.size",
            "at least 1",
        ),
        (
            sd("source = \"holdout\"\nsize = 10\nimages = \"a.idx\""),
            "server_data.images",
            "source = \"idx\"",
        ),
        (
            sd("source = \"idx\""),
            "server_data.images",
            "IDX image file",
        ),
        (
            sd("source = \"idx\"\nimages = \"a.idx\""),
            "server_data.labels",
            "labelled = false",
        ),
        (
            sd("source = \"holdout\"\nsize = 10\nlabeled = true"),
            "labeled",
            "",
        ),
        (
            BASE.replace("[method]", "[simulation]\nserver_gflops = 0\n[method]"),
            "simulation.server_gflops",
            "positive",
        ),
    ] {
        let err = Experiment::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains(key) && err.contains(hint), "{key}: {err}");
    }
    // An unknown source is named with the ones that exist.
    let err = Experiment::from_toml(&sd("source = \"generator\"\nsize = 10"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("server_data.source")
            && err.contains("generator")
            && err.contains("holdout")
            && err.contains("idx"),
        "{err}"
    );
    // Unlabelled IDX images need no label file.
    Experiment::from_toml(&sd(
        "source = \"idx\"\nimages = \"a.idx\"\nlabelled = false",
    ))
    .unwrap();
}

#[test]
fn overrides_apply() {
    let e = Experiment::with_overrides(
        BASE,
        &[
            "rounds=7".into(),
            "training.lr=0.5".into(),
            "method.name=fedprox".into(),
        ],
    )
    .unwrap();
    assert_eq!(e.rounds, 7);
    assert_eq!(e.training.lr, 0.5);
    assert_eq!(e.method_name(), "fedprox");
    assert!(Experiment::with_overrides(BASE, &["rounds".into()]).is_err());
}
