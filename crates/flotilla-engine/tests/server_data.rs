//! `[server_data]` and the server's cost: the held-out slice reaches the method and no client,
//! IDX files are checked against the model, unlabelled data withholds its labels, and the FLOPs
//! a method reports for server work land in metrics and on the simulated clock.

use flotilla_core::ParamSet;
use flotilla_data::{Dataset, Split, encode_idx};
use flotilla_engine::server_data::{ServerData, holdout_indices};
use flotilla_engine::sim::partition_clients;
use flotilla_engine::sink::{Event, RoundRecord, Sink};
use flotilla_engine::{
    Assignment, ClientCtx, ClientData, ClientHalf, ClientInfo, EngineError, EvalModel, Experiment,
    MethodState, PhaseCtx, PhaseEnd, Reply, ServerCtx, ServerHalf, Simulation, Task,
};
use flotilla_models::{ModelSpec, Net, View};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use flotilla_testkit::images::pattern as dataset;

fn config(server_data: &str, extra: &str) -> Experiment {
    Experiment::from_toml(&format!(
        r#"
seed = 3
rounds = 1
[data]
dataset = "fashion-mnist"
num_clients = 7
partition = {{ kind = "dirichlet", alpha = 0.5, min_size = 5 }}
[model]
arch = "mlp"
[training]
epochs = 1
batch_size = 10
optimizer = "sgd"
lr = 0.1
[sampling]
clients_per_round = 7
[simulation]
checkpoint_every = 0
workers = 2
{extra}
[method]
name = "probe"
{server_data}
"#
    ))
    .unwrap()
}

const HOLDOUT: &str = "[server_data]\nsource = \"holdout\"\nsize = 150";

#[test]
fn clients_never_get_the_held_out_slice_and_sizes_add_up() {
    let train = dataset(1000);
    let exp = config(HOLDOUT, "");
    let held = holdout_indices(&exp, train.len()).unwrap();
    assert_eq!(held.len(), 150);
    assert!(held.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
    let parts = partition_clients(&exp, &train).unwrap();
    assert_eq!(parts.len(), 7);
    let mut seen = vec![0u32; train.len()];
    for p in &parts {
        assert!(!p.is_empty());
        for &i in p {
            assert!(
                held.binary_search(&i).is_err(),
                "client got held-out sample {i}"
            );
            seen[i] += 1;
        }
    }
    for &i in &held {
        seen[i] += 1;
    }
    // Every sample exactly once: in one client's share or in the server's slice.
    assert!(seen.iter().all(|&k| k == 1));
    assert_eq!(parts.iter().map(Vec::len).sum::<usize>() + held.len(), 1000);

    // The slice is the run seed's: the same again, another for another seed.
    assert_eq!(holdout_indices(&exp, train.len()).unwrap(), held);
    let mut other = exp.clone();
    other.seed = 4;
    assert_ne!(holdout_indices(&other, train.len()).unwrap(), held);

    // IDX files with `withhold` keep the very same slice from the clients: the clients'
    // shares are the holdout run's.
    let withheld = config(
        "[server_data]\nsource = \"idx\"\nimages = \"gen/images\"\nlabelled = false\nwithhold = 150",
        "",
    );
    assert_eq!(holdout_indices(&withheld, train.len()).unwrap(), held);
    assert_eq!(partition_clients(&withheld, &train).unwrap(), parts);
    let mut too_many = withheld.clone();
    too_many.server_data.as_mut().unwrap().withhold = Some(60000);
    let err = too_many.check().unwrap_err().to_string();
    assert!(err.contains("server_data.withhold"), "{err}");

    // Without [server_data] the partition is the plain one over all samples.
    let plain = config("", "");
    assert!(holdout_indices(&plain, train.len()).unwrap().is_empty());
    let direct = flotilla_data::partition(
        &train.labels,
        10,
        7,
        &plain.data.partition,
        flotilla_core::seed::derive(3, 0, 0, flotilla_core::seed::Purpose::Partition),
    )
    .unwrap();
    assert_eq!(partition_clients(&plain, &train).unwrap(), direct);

    // A training set too small for the slice plus one sample per client is refused by name.
    let err = partition_clients(&exp, &dataset(156))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("server_data.size") && err.contains("at most 149"),
        "{err}"
    );
}

/// What the probe method saw in aggregation.
#[derive(Debug, Default)]
struct Seen {
    data: Option<Dataset>,
    labelled: Option<bool>,
}

/// A method whose clients only report a fixed FLOP count, and whose server reads its data and
/// reports `server_flops`.
struct Probe {
    exp: Experiment,
    spec: ModelSpec,
    params: ParamSet,
    server_flops: f64,
    seen: Arc<Mutex<Seen>>,
}

impl ServerHalf for Probe {
    fn name(&self) -> &str {
        "probe"
    }

    fn plan(&self, ctx: &PhaseCtx, clients: &[ClientInfo]) -> Result<Vec<Assignment>, EngineError> {
        Ok(clients
            .iter()
            .map(|c| {
                Assignment::Run(Box::new(Task {
                    round: ctx.round,
                    phase: ctx.phase,
                    client: c.id,
                    kind: "count".into(),
                    model: self.spec.clone(),
                    view: View::full(),
                    recipe: self.exp.training.clone(),
                    params: ParamSet::new(),
                    masks: Vec::new(),
                    hold: Vec::new(),
                    options: serde_json::Value::Null,
                }))
            })
            .collect())
    }

    fn aggregate(
        &mut self,
        _ctx: &PhaseCtx,
        _replies: &[Reply],
        server: &mut ServerCtx<'_>,
    ) -> Result<PhaseEnd, EngineError> {
        let mut seen = self.seen.lock().unwrap();
        if let Some(d) = server.server_data {
            // Some real work on the server's data, so that its wall time is measurable.
            let mut sum = 0u64;
            for _ in 0..20 {
                sum = sum.wrapping_add(d.train.images.iter().map(|&p| u64::from(p)).sum());
            }
            assert!(sum > 0);
            seen.data = Some(d.train.clone());
            seen.labelled = Some(server.server_data_labelled);
        }
        server.add_flops(self.server_flops);
        Ok(PhaseEnd::RoundComplete)
    }

    fn eval_models(&self) -> Vec<EvalModel> {
        vec![EvalModel {
            label: "global".into(),
            spec: self.spec.clone(),
            view: View::full(),
            params: self.params.clone(),
            devices: None,
            readout: flotilla_engine::Readout::Classifier,
        }]
    }

    fn snapshot(&self) -> MethodState {
        MethodState {
            params: BTreeMap::from([("global".into(), self.params.clone())]),
            json: serde_json::Value::Null,
        }
    }

    fn restore(&mut self, _state: MethodState) -> Result<(), EngineError> {
        Ok(())
    }
}

struct Counter;

impl ClientHalf for Counter {
    fn execute(&self, task: &Task, data: &ClientData, _: &ClientCtx) -> Result<Reply, EngineError> {
        Ok(Reply {
            round: task.round,
            phase: task.phase,
            client: task.client,
            num_examples: data.train.len() as u64,
            params: ParamSet::new(),
            metrics: BTreeMap::new(),
            resources: flotilla_engine::method::Resources {
                flops: 1e9,
                ..Default::default()
            },
        })
    }
}

struct Collect(Vec<RoundRecord>);

impl Sink for Collect {
    fn on_event(&mut self, e: &Event<'_>) -> Result<(), EngineError> {
        if let Event::Round { round, .. } = e {
            self.0.push((*round).clone());
        }
        Ok(())
    }
}

/// Runs one round of the probe; returns its record, what the server saw, and the summary.
fn run_probe(
    exp: Experiment,
    server_flops: f64,
) -> Result<(RoundRecord, Seen, serde_json::Value), EngineError> {
    let split = Split {
        train: dataset(1000),
        test: dataset(50),
    };
    let spec = ModelSpec::mlp_2nn();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let server = Probe {
        exp: exp.clone(),
        params: Net::init_params(&spec, 0).unwrap(),
        spec,
        server_flops,
        seen: seen.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    let mut sim = Simulation::new(exp, split, Box::new(server), Arc::new(Counter), dir.path())?;
    let mut rounds = Collect(Vec::new());
    let summary = sim.run(&mut [&mut rounds])?;
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    Ok((rounds.0.remove(0), seen, summary))
}

#[test]
fn the_method_gets_the_held_out_slice_from_the_config() {
    let exp = config(HOLDOUT, "");
    let train = dataset(1000);
    let expected = train
        .subset(&holdout_indices(&exp, train.len()).unwrap())
        .unwrap();
    let (record, seen, _) = run_probe(exp, 0.0).unwrap();
    assert_eq!(seen.data.as_ref(), Some(&expected));
    assert_eq!(seen.labelled, Some(true));
    assert_eq!(record.server_flops, 0.0);
    assert!(record.server_wall_s > 0.0, "{}", record.server_wall_s);

    // Unlabelled: the same images, the flag down, every label withheld.
    let (_, seen, _) = run_probe(config(&format!("{HOLDOUT}\nlabelled = false"), ""), 0.0).unwrap();
    let data = seen.data.unwrap();
    assert_eq!(data.images, expected.images);
    assert!(data.labels.iter().all(|&l| l == 0));
    assert_eq!(seen.labelled, Some(false));

    // Without [server_data] the method sees none.
    let (_, seen, _) = run_probe(config("", ""), 0.0).unwrap();
    assert!(seen.data.is_none());
}

#[test]
fn server_flops_add_exactly_flops_over_speed_to_the_clock() {
    let speed = "server_gflops = 1500";
    let (base, _, _) = run_probe(config(HOLDOUT, speed), 0.0).unwrap();
    let flops = 3e12;
    let (paid, _, summary) = run_probe(config(HOLDOUT, speed), flops).unwrap();
    assert!(base.sim_time_s > 0.0);
    assert_eq!(paid.server_flops, flops);
    assert_eq!(paid.sim_time_s, base.sim_time_s + flops / 1.5e12);
    assert_eq!(paid.sim_time_s - base.sim_time_s, 2.0);
    // Client figures are untouched: the server's work is its own.
    assert_eq!(paid.flops, base.flops);
    assert!(paid.server_wall_s > 0.0);
    assert_eq!(summary["total_server_flops"], serde_json::json!(flops));
    assert_eq!(summary["sim_time_s"], serde_json::json!(paid.sim_time_s));

    // The default speed is 1 TFLOP/s.
    let (default, _, _) = run_probe(config(HOLDOUT, ""), flops).unwrap();
    assert_eq!(default.sim_time_s, base.sim_time_s + 3.0);

    // A count that is not a count is the method's bug, named as such.
    let err = run_probe(config(HOLDOUT, ""), f64::NAN)
        .unwrap_err()
        .to_string();
    assert!(err.contains("add_flops") && err.contains("probe"), "{err}");
}

fn write(dir: &Path, name: &str, dims: &[usize], data: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, encode_idx(dims, data)).unwrap();
    path.to_str().unwrap().to_string()
}

fn idx_config(images: &str, labels: Option<&str>, more: &str) -> Experiment {
    let labels = labels.map_or(String::new(), |l| format!("labels = \"{l}\"\n"));
    config(
        &format!("[server_data]\nsource = \"idx\"\nimages = \"{images}\"\n{labels}{more}"),
        "",
    )
}

#[test]
fn idx_files_are_read_and_checked_against_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let made = dataset(30);
    let images = write(tmp.path(), "images.idx", &[30, 28, 28], &made.images);
    let labels = write(tmp.path(), "labels.idx", &[30], &made.labels);
    let train = dataset(1000);

    let sd = ServerData::from_config(&idx_config(&images, Some(&labels), ""), &train)
        .unwrap()
        .unwrap();
    assert!(sd.labelled);
    assert_eq!(sd.data.train, made);
    assert_eq!(sd.data.mean, vec![0.2860]);
    // An IDX source leaves the clients' partition whole.
    let exp = idx_config(&images, Some(&labels), "");
    assert!(holdout_indices(&exp, train.len()).unwrap().is_empty());

    // `size` takes the first N; unlabelled images need no label file.
    let sd = ServerData::from_config(
        &idx_config(&images, None, "size = 12\nlabelled = false"),
        &train,
    )
    .unwrap()
    .unwrap();
    assert!(!sd.labelled);
    assert_eq!(sd.data.train.images, made.take_first(12).images);
    assert!(sd.data.train.labels.iter().all(|&l| l == 0));

    let err = |exp: Experiment| {
        ServerData::from_config(&exp, &train)
            .unwrap_err()
            .to_string()
    };
    // A missing file: the key and the path.
    let missing = tmp.path().join("nope.idx");
    let e = err(idx_config(missing.to_str().unwrap(), Some(&labels), ""));
    assert!(
        e.contains("server_data.images") && e.contains(missing.to_str().unwrap()),
        "{e}"
    );
    let e = err(idx_config(&images, Some(missing.to_str().unwrap()), ""));
    assert!(
        e.contains("server_data.labels") && e.contains("nope.idx"),
        "{e}"
    );
    // Images of another dataset's shape: the key, both shapes and the dataset.
    let rgb = write(
        tmp.path(),
        "rgb.idx",
        &[2, 3, 32, 32],
        &vec![0; 2 * 3 * 1024],
    );
    let e = err(idx_config(&rgb, None, "labelled = false"));
    assert!(
        e.contains("server_data.images") && e.contains("[3, 32, 32]") && e.contains("[1, 28, 28]"),
        "{e}"
    );
    // A label the model has no class for.
    let mut bad = made.labels.clone();
    bad[4] = 10;
    let bad = write(tmp.path(), "bad-labels.idx", &[30], &bad);
    let e = err(idx_config(&images, Some(&bad), ""));
    assert!(
        e.contains("server_data.labels") && e.contains("label 10 at index 4"),
        "{e}"
    );
    // Counts that disagree.
    let short = write(tmp.path(), "short-labels.idx", &[29], &made.labels[..29]);
    let e = err(idx_config(&images, Some(&short), ""));
    assert!(
        e.contains("server_data.labels") && e.contains("30 images"),
        "{e}"
    );
    // More than the file holds.
    let e = err(idx_config(&images, Some(&labels), "size = 31"));
    assert!(
        e.contains("server_data.size") && e.contains("only 30"),
        "{e}"
    );
    // Not an IDX file at all.
    let junk = tmp.path().join("junk.idx");
    std::fs::write(&junk, b"hello").unwrap();
    let e = err(idx_config(junk.to_str().unwrap(), None, "labelled = false"));
    assert!(
        e.contains("server_data.images") && e.contains("junk.idx") && e.contains("encode_idx"),
        "{e}"
    );
}
