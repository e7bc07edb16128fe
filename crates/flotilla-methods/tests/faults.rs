//! A broken client does not stop a run: its update is refused and the round goes on.

use flotilla_data::{Dataset, Split};
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
    Dataset {
        images: (0..n * 784)
            .map(|p| {
                if (p % 784) / 78 == (p / 784) % 10 {
                    220
                } else {
                    10
                }
            })
            .collect(),
        labels: (0..n).map(|i| (i % 10) as u8).collect(),
        shape: [1, 28, 28],
        num_classes: 10,
    }
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
        assert_eq!(status(1).status, "failed");
        assert!(
            status(1).reason.as_deref().unwrap().contains("NaN"),
            "{:?}",
            status(1).reason
        );
        assert_eq!(status(2).status, "failed");
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
