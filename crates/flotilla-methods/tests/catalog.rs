//! The method catalog says what the methods accept: every method builds with every listed
//! option set to its listed default, and refuses a key the catalog does not list, naming it.

use flotilla_engine::Experiment;
use flotilla_methods::catalog::CATALOG;

/// A model each method can train.
fn model(name: &str) -> &'static str {
    match name {
        "flextrain" | "fedsmall" | "fedclass" => "arch = \"resnet\"\nblocks_per_stage = 1",
        "fll" | "fedssl" => "arch = \"vit\"\npatch = 7\ndim = 16\ndepth = 2\nheads = 2",
        _ => "arch = \"mlp\"\nhidden = [128, 128]",
    }
}

/// The server data a method distils on, if it needs any.
fn server_data(name: &str) -> &'static str {
    match name {
        "fedtsa" | "feddf" => "[server_data]\nsource = \"holdout\"\nsize = 100",
        _ => "",
    }
}

fn experiment(name: &str, method: &str) -> Result<Experiment, String> {
    let toml = format!(
        r#"
seed = 1
rounds = 4
[data]
dataset = "fashion-mnist"
num_clients = 4
partition = {{ kind = "iid" }}
[model]
{}
[training]
epochs = 1
batch_size = 16
optimizer = "sgd"
lr = 0.1
{}
[method]
name = "{name}"
{method}
"#,
        model(name),
        server_data(name)
    );
    Experiment::from_toml(&toml).map_err(|e| e.to_string())
}

#[test]
fn every_method_builds_with_every_listed_default_and_refuses_an_unlisted_key() {
    for info in CATALOG {
        for name in info.names {
            let mut keys = String::new();
            for o in info.options {
                match (o.key, o.default) {
                    (key, Some(v)) => keys.push_str(&format!("{key} = {v}\n")),
                    ("mu", None) => keys.push_str("mu = 0.01\n"),
                    _ => {}
                }
            }
            let exp = experiment(name, &keys).unwrap_or_else(|e| panic!("{name}: {e}"));
            if let Err(e) = flotilla_methods::build(&exp) {
                panic!("{name} refuses its listed defaults:\n{keys}\n{e}");
            }
            let bad = format!("{keys}not_an_option = 1\n");
            let refused = experiment(name, &bad)
                .map_err(|e| e.to_string())
                .and_then(|exp| {
                    flotilla_methods::build(&exp)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                });
            match refused {
                Ok(()) => panic!("{name} accepted an unknown key"),
                Err(e) => assert!(e.contains("not_an_option"), "{name}: {e}"),
            }
        }
    }
}
