//! Held tensors: a toy method ([`Keeper`], three rounds) freezes and holds its first layer, so
//! the layer travels once, then by fingerprint, also after a resume from a checkpoint; every
//! round when the cache is off; and only what fits when the cache is smaller than a tensor.

use flotilla_core::ParamSet;
use flotilla_data::Split;
use flotilla_engine::local::{self, CrossEntropy, Recipe};
use flotilla_engine::sink::{ClientRecord, ClientStatus, RoundRecord};
use flotilla_engine::{
    Assignment, ClientCtx, ClientData, ClientHalf, ClientInfo, EngineError, EvalModel, Experiment,
    MethodState, PhaseCtx, PhaseEnd, Reply, ServerCtx, ServerHalf, Simulation, Task,
};
use flotilla_models::{ModelSpec, Net, View};
use flotilla_testkit::images::patches as synthetic;
use flotilla_testkit::{Rounds, task};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Held tensors: the first layer is frozen and held, the rest trains; the server keeps the
/// first client's trained layers.
struct Keeper {
    params: ParamSet,
    recipe: Recipe,
}

const HELD: [&str; 2] = ["layers.0.weight", "layers.0.bias"];

fn frozen_first_layer() -> View {
    View {
        active_blocks: None,
        frozen: vec!["layers.0".into()],
    }
}

impl ServerHalf for Keeper {
    fn name(&self) -> &str {
        "keeper"
    }

    fn plan(&self, ctx: &PhaseCtx, clients: &[ClientInfo]) -> Result<Vec<Assignment>, EngineError> {
        Ok(clients
            .iter()
            .map(|c| {
                let mut t = task(
                    ctx,
                    c.id,
                    "train",
                    ModelSpec::mlp_2nn(),
                    frozen_first_layer(),
                    self.params.clone(),
                    &self.recipe,
                );
                t.hold = HELD.map(String::from).to_vec();
                Assignment::Run(Box::new(t))
            })
            .collect())
    }

    fn aggregate(
        &mut self,
        _ctx: &PhaseCtx,
        replies: &[Reply],
        _server: &mut ServerCtx<'_>,
    ) -> Result<PhaseEnd, EngineError> {
        for t in replies[0].params.iter() {
            *self.params.get_mut(&t.name).unwrap() = t.clone();
        }
        Ok(PhaseEnd::RoundComplete)
    }

    fn eval_models(&self) -> Vec<EvalModel> {
        vec![EvalModel {
            label: "mlp".into(),
            spec: ModelSpec::mlp_2nn(),
            view: View::full(),
            params: self.params.clone(),
            devices: None,
            readout: flotilla_engine::Readout::Classifier,
        }]
    }

    fn snapshot(&self) -> MethodState {
        MethodState {
            params: BTreeMap::from([("mlp".into(), self.params.clone())]),
            json: serde_json::Value::Null,
        }
    }

    fn restore(&mut self, state: MethodState) -> Result<(), EngineError> {
        self.params = state.params["mlp"].clone();
        Ok(())
    }
}

struct KeeperClient;

impl ClientHalf for KeeperClient {
    fn execute(
        &self,
        task: &Task,
        data: &ClientData,
        ctx: &ClientCtx,
    ) -> Result<Reply, EngineError> {
        // The held layer arrives intact whichever way it travelled.
        let init = Net::init_params(&ModelSpec::mlp_2nn(), 0)?;
        for name in HELD {
            if task.params.get(name) != init.get(name) {
                return Err(EngineError::Task(format!("`{name}` arrived changed")));
            }
        }
        if task.hold != HELD {
            return Err(EngineError::Task(format!(
                "hold arrived as {:?}",
                task.hold
            )));
        }
        local::train_task(task, data, ctx, || Ok(CrossEntropy::under(&task.view)))
    }
}

/// Runs the keeper for `rounds` rounds in `dir` (continuing its checkpoint when `resume`),
/// with `extra` TOML appended; returns the records and the final parameters.
fn keeper(
    dir: &Path,
    rounds: u64,
    resume: bool,
    extra: &str,
) -> (Vec<(RoundRecord, Vec<ClientRecord>)>, ParamSet) {
    let toml = format!(
        "rounds = {rounds}\n[data]\ndataset = \"fashion-mnist\"\nnum_clients = 2\npartition = {{ kind = \"iid\" }}\n[model]\narch = \"mlp\"\n[training]\nepochs = 1\nbatch_size = 16\noptimizer = \"sgd\"\nlr = 0.05\n[sampling]\nclients_per_round = 2\n[simulation]\ncheckpoint_every = 1\n[method]\nname = \"keeper\"\n{extra}"
    );
    let exp = Experiment::from_toml(&toml).unwrap();
    let server = Keeper {
        params: Net::init_params(&ModelSpec::mlp_2nn(), 0).unwrap(),
        recipe: exp.training.clone(),
    };
    let split = Split {
        train: synthetic(100, 3),
        test: synthetic(50, 4),
    };
    let mut sim =
        Simulation::new(exp, split, Box::new(server), Arc::new(KeeperClient), dir).unwrap();
    if resume {
        sim.restore_checkpoint().unwrap();
    }
    let mut rounds = Rounds::default();
    sim.run(&mut [&mut rounds]).unwrap();
    let params = sim.server().eval_models().remove(0).params;
    (rounds.0, params)
}

fn bytes_down(records: &[(RoundRecord, Vec<ClientRecord>)]) -> Vec<Vec<u64>> {
    records
        .iter()
        .map(|(_, clients)| {
            assert!(
                clients.iter().all(|c| c.status == ClientStatus::Ok),
                "{clients:?}"
            );
            clients.iter().map(|c| c.bytes_down).collect()
        })
        .collect()
}

/// Bytes of the values of the held layer: 200 × 784 weights and 200 biases.
const HELD_BYTES: u64 = 4 * (200 * 784 + 200);

#[test]
fn held_tensors_travel_once_then_by_fingerprint_also_after_a_resume() {
    let whole = tempfile::tempdir().unwrap();
    let (records, params) = keeper(whole.path(), 3, false, "");
    let down = bytes_down(&records);
    assert!(down.iter().all(|round| round.len() == 2), "{down:?}");
    for (c, ((first, second), third)) in down[0].iter().zip(&down[1]).zip(&down[2]).enumerate() {
        let saved = first - second;
        // The values stay home; a reference costs about what their length prefix did.
        assert!(
            saved.abs_diff(HELD_BYTES) < 32,
            "client {c} saved {saved} B"
        );
        assert_eq!(second, third);
    }
    // Stopped after round 2 and resumed: round 3 still sends the held layer by reference,
    // and the run ends where the uninterrupted one does.
    let split = tempfile::tempdir().unwrap();
    keeper(split.path(), 2, false, "");
    let (resumed, resumed_params) = keeper(split.path(), 3, true, "");
    assert_eq!(resumed.len(), 1);
    assert_eq!(bytes_down(&resumed)[0], down[2]);
    assert_eq!(resumed_params, params);
}

#[test]
fn with_the_cache_off_held_tensors_travel_every_round() {
    let dir = tempfile::tempdir().unwrap();
    let (records, _) = keeper(dir.path(), 2, false, "[fleet]\nheld_cache_mib = 0\n");
    let down = bytes_down(&records);
    assert_eq!(down[0], down[1]);
    assert!(down[0][0] > 4 * 199_210);
}

#[test]
fn a_cache_smaller_than_a_tensor_keeps_only_what_fits() {
    // 0.5 MiB holds the bias (800 B) but not the weight (627,200 B).
    let dir = tempfile::tempdir().unwrap();
    let (records, _) = keeper(dir.path(), 2, false, "[fleet]\nheld_cache_mib = 0.5\n");
    let down = bytes_down(&records);
    let saved = down[0][0] - down[1][0];
    assert!(saved.abs_diff(800) < 32, "saved {saved} B");
}
