//! A broken client does not stop a run: its update is refused and the round goes on; a crash
//! in the middle of a checkpoint write leaves a checkpoint that resumes to the same model.

use flotilla_data::{Dataset, Split};
use flotilla_engine::driver::CheckpointStep;
use flotilla_engine::sink::ClientStatus;
use flotilla_engine::sink::{ClientRecord, Event, RoundRecord, Sink};
use flotilla_engine::{
    ClientCtx, ClientData, ClientHalf, EngineError, Experiment, Reply, Simulation, Task,
};
use flotilla_methods::fedavg::FedAvgClient;
use std::sync::Arc;

/// Sends NaN from client 1 and claims to be another client from client 2.
struct Broken;

impl ClientHalf for Broken {
    fn execute(
        &self,
        task: &Task,
        data: &ClientData,
        ctx: &ClientCtx,
    ) -> Result<Reply, EngineError> {
        let mut reply = FedAvgClient.execute(task, data, ctx)?;
        match task.client {
            1 => reply.params.iter_mut().next().unwrap().data[0] = f32::NAN,
            2 => reply.client = 3,
            _ => {}
        }
        Ok(reply)
    }
}

struct Rounds(Vec<(RoundRecord, Vec<ClientRecord>)>);

impl Sink for Rounds {
    fn on_event(&mut self, e: &Event<'_>) -> Result<(), EngineError> {
        if let Event::Round { round, clients } = e {
            self.0.push(((*round).clone(), clients.to_vec()));
        }
        Ok(())
    }
}

fn synthetic(n: usize) -> Dataset {
    flotilla_testkit::images::bands(n, 0)
}

#[test]
fn nan_and_misaddressed_updates_are_refused_and_the_run_goes_on() {
    let exp = Experiment::from_toml(
        r#"
rounds = 2
[data]
dataset = "fashion-mnist"
num_clients = 4
partition = { kind = "iid" }
[model]
arch = "mlp"
hidden = [16]
[training]
epochs = 1
batch_size = 8
optimizer = "sgd"
lr = 0.1
[sampling]
clients_per_round = 4
[simulation]
checkpoint_every = 0
[method]
name = "fedavg"
"#,
    )
    .unwrap();
    let (server, _) = flotilla_methods::build(&exp).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let split = Split {
        train: synthetic(200),
        test: synthetic(50),
    };
    let mut sim = Simulation::new(exp, split, server, Arc::new(Broken), dir.path()).unwrap();
    let mut rounds = Rounds(Vec::new());
    sim.run(&mut [&mut rounds]).unwrap();
    for (r, clients) in &rounds.0 {
        assert_eq!(r.clients, 2, "two good clients aggregated");
        let status = |id: u64| clients.iter().find(|c| c.client == id).unwrap();
        assert_eq!(status(1).status, ClientStatus::Failed);
        assert!(
            status(1).reason.as_deref().unwrap().contains("NaN"),
            "{:?}",
            status(1).reason
        );
        assert_eq!(status(2).status, ClientStatus::Failed);
        assert!(
            status(2)
                .reason
                .as_deref()
                .unwrap()
                .contains("answers a task for round"),
            "{:?}",
            status(2).reason
        );
        assert!(r.test_accuracy.unwrap().is_finite());
    }
}

/// Reports numbers no measurement can have: NaN FLOPs, infinite wall time, a NaN loss.
struct Liar;

impl ClientHalf for Liar {
    fn execute(
        &self,
        task: &Task,
        data: &ClientData,
        ctx: &ClientCtx,
    ) -> Result<Reply, EngineError> {
        let mut reply = FedAvgClient.execute(task, data, ctx)?;
        match task.client {
            1 => reply.resources.flops = f64::NAN,
            2 => reply.resources.wall_time_s = f64::INFINITY,
            3 => {
                reply.metrics.insert("train_loss".into(), f64::NAN);
            }
            4 => reply.resources.flops = -1.0,
            _ => {}
        }
        Ok(reply)
    }
}

const SMALL: &str = r#"
rounds = ROUNDS
[data]
dataset = "fashion-mnist"
num_clients = 6
partition = { kind = "iid" }
[model]
arch = "mlp"
hidden = [16]
[training]
epochs = 1
batch_size = 8
optimizer = "sgd"
lr = 0.1
[sampling]
clients_per_round = 6
[simulation]
checkpoint_every = 1
[method]
name = "fedavg"
"#;

fn simulation(rounds: u64, client: Arc<dyn ClientHalf>, dir: &std::path::Path) -> Simulation {
    let exp = Experiment::from_toml(&SMALL.replace("ROUNDS", &rounds.to_string())).unwrap();
    let (server, _) = flotilla_methods::build(&exp).unwrap();
    let split = Split {
        train: synthetic(240),
        test: synthetic(50),
    };
    Simulation::new(exp, split, server, client, dir).unwrap()
}

#[test]
fn replies_with_impossible_numbers_are_refused_and_the_checkpoint_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let mut sim = simulation(2, Arc::new(Liar), dir.path());
    let mut rounds = Rounds(Vec::new());
    sim.run(&mut [&mut rounds]).unwrap();
    for (r, clients) in &rounds.0 {
        assert_eq!(r.clients, 2, "clients 0 and 5 aggregated");
        for (id, what) in [
            (1, "resources.flops"),
            (2, "resources.wall_time_s"),
            (3, "train_loss"),
            (4, "resources.flops"),
        ] {
            let c = clients.iter().find(|c| c.client == id).unwrap();
            assert_eq!(c.status, ClientStatus::Failed);
            let reason = c.reason.as_deref().unwrap();
            assert!(reason.contains(what), "client {id}: {reason}");
        }
        assert!(r.flops.is_finite() && r.sim_time_s.is_finite());
    }
    let mut again = simulation(3, Arc::new(FedAvgClient), dir.path());
    assert_eq!(again.restore_checkpoint().unwrap(), 2);
    again.run(&mut []).unwrap();
}

#[test]
fn a_crash_at_any_step_of_a_checkpoint_write_resumes_to_the_same_model() {
    let straight = {
        let dir = tempfile::tempdir().unwrap();
        let mut sim = simulation(4, Arc::new(FedAvgClient), dir.path());
        sim.run(&mut []).unwrap();
        sim.server().eval_models().remove(0).params
    };
    for (step, committed) in [
        (CheckpointStep::ParamsWritten, false),
        (CheckpointStep::Committed, true),
        (CheckpointStep::Cleaned, true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        // Rounds 1 and 2 checkpoint normally; the process "dies" writing round 3's.
        let mut sim = simulation(2, Arc::new(FedAvgClient), dir.path());
        sim.run(&mut []).unwrap();
        let mut sim = simulation(4, Arc::new(FedAvgClient), dir.path());
        assert_eq!(sim.restore_checkpoint().unwrap(), 2);
        sim.inject_checkpoint_fault(step);
        let err = sim.run(&mut []).unwrap_err().to_string();
        assert!(err.contains("injected"), "{err}");
        let mut resumed = simulation(4, Arc::new(FedAvgClient), dir.path());
        let round = resumed.restore_checkpoint().unwrap();
        assert_eq!(round, if committed { 3 } else { 2 }, "{step:?}");
        resumed.run(&mut []).unwrap();
        let model = resumed.server().eval_models().remove(0).params;
        assert_eq!(model, straight, "crash after {step:?}");
        let files: Vec<String> = std::fs::read_dir(dir.path().join("checkpoint"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("params"))
            .collect();
        assert_eq!(files, ["params-000004.safetensors"], "older files cleaned");
    }
}
