//! A served round's memory does not grow with its clients under the mean: the round's tasks
//! share one copy of the model, and each reply is folded into the mean as it arrives, so the
//! method sees the replies without their tensors. The result is the batch mean's, which the
//! command-line network tests compare with `flotilla simulate` bit for bit.

use flotilla_core::ParamSet;
use flotilla_core::device::DeviceProfile;
use flotilla_data::Dataset;
use flotilla_engine::sink::MetricsFiles;
use flotilla_engine::{
    Assignment, ClientInfo, Driver, EngineError, EvalModel, Experiment, MethodState, PhaseCtx,
    PhaseEnd, Reply, ServerCtx, ServerHalf,
};
use flotilla_net::client::{self, JoinOptions};
use flotilla_net::server::{self, ServeOptions};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const EXPERIMENT: &str = r#"
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
batch_size = 10
optimizer = "sgd"
lr = 0.05
[sampling]
clients_per_round = 4
[server]
min_clients = 4
heartbeat_s = 0.5
[method]
name = "fedavg"
"#;

/// What the wrapped method saw.
#[derive(Default)]
struct Seen {
    /// Per planned round: whether every task shared the first task's tensor values.
    tasks_share_one_model: Vec<bool>,
    /// Per aggregated phase: (replies, replies that still carried tensors).
    replies: Vec<(usize, usize)>,
}

/// FedAvg, watched.
struct Watched {
    inner: Box<dyn ServerHalf>,
    seen: Arc<Mutex<Seen>>,
}

impl ServerHalf for Watched {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn observe(&mut self, clients: &[ClientInfo]) {
        self.inner.observe(clients)
    }
    fn plan(&self, ctx: &PhaseCtx, clients: &[ClientInfo]) -> Result<Vec<Assignment>, EngineError> {
        let plan = self.inner.plan(ctx, clients)?;
        let first_values = |p: &ParamSet| p.iter().next().map(|t| t.data.as_ptr());
        let ptrs: Vec<_> = plan
            .iter()
            .filter_map(|a| match a {
                Assignment::Run(t) => Some(first_values(&t.params)),
                Assignment::Skip(_) => None,
            })
            .collect();
        if clients.len() > 1 {
            self.seen
                .lock()
                .unwrap()
                .tasks_share_one_model
                .push(ptrs.len() == clients.len() && ptrs.windows(2).all(|w| w[0] == w[1]));
        }
        Ok(plan)
    }
    fn mean_fold(&self, ctx: &PhaseCtx) -> Option<flotilla_core::aggregate::MeanFold> {
        self.inner.mean_fold(ctx)
    }
    fn aggregate(
        &mut self,
        ctx: &PhaseCtx,
        replies: &[Reply],
        server: &mut ServerCtx<'_>,
    ) -> Result<PhaseEnd, EngineError> {
        let whole = replies.iter().filter(|r| !r.params.is_empty()).count();
        self.seen
            .lock()
            .unwrap()
            .replies
            .push((replies.len(), whole));
        self.inner.aggregate(ctx, replies, server)
    }
    fn eval_models(&self) -> Vec<EvalModel> {
        self.inner.eval_models()
    }
    fn snapshot(&self) -> MethodState {
        self.inner.snapshot()
    }
    fn restore(&mut self, state: MethodState) -> Result<(), EngineError> {
        self.inner.restore(state)
    }
}

/// Ten distinct images per client, so that the updates differ.
fn data(k: u64) -> Dataset {
    flotilla_testkit::images::noise(10, k)
}

#[test]
fn the_mean_is_folded_as_replies_arrive_and_the_tasks_share_one_model() {
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = tmp.path().to_path_buf();
    let address_file: PathBuf = dir.join("address");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watched = seen.clone();
    let af = address_file.clone();
    let server = std::thread::spawn(move || {
        let exp = Experiment::from_toml(EXPERIMENT).unwrap();
        let (inner, _) = flotilla_methods::build(&exp).unwrap();
        let half = Box::new(Watched {
            inner,
            seen: watched,
        });
        let mut driver = Driver::new(exp, data(99), half, &dir, 1).unwrap();
        let mut metrics = MetricsFiles::open(&dir, 0).unwrap();
        let opts = ServeOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: None,
            tokens: None,
            max_examples: None,
            address_file: Some(af),
        };
        server::serve(&mut driver, opts, &mut [&mut metrics]).map_err(|e| e.to_string())
    });
    let mut addr = String::new();
    for _ in 0..600 {
        addr = std::fs::read_to_string(&address_file).unwrap_or_default();
        if !addr.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!addr.is_empty(), "the server never wrote its address");
    let clients: Vec<_> = (0..4u64)
        .map(|k| {
            let url = format!("http://{addr}");
            std::thread::spawn(move || {
                let setup = Box::new(move |exp: &Experiment| {
                    let (_, half) = flotilla_methods::build(exp)?;
                    Ok((half, flotilla_testkit::client_data(data(k))))
                });
                client::run(
                    JoinOptions {
                        server: url,
                        token: None,
                        tls: None,
                        client_id: Some(k),
                        profile: DeviceProfile::unlimited(),
                        name: format!("client-{k}"),
                        give_up_s: 60.0,
                        threads: 1,
                    },
                    setup,
                )
                .map_err(|e| e.to_string())
            })
        })
        .collect();
    for c in clients {
        let report = c.join().unwrap().unwrap();
        assert_eq!(report.accepted, 2, "{report:?}");
    }
    server.join().unwrap().unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.tasks_share_one_model, [true, true]);
    // Both rounds aggregated all four replies, none of which still held its tensors: they
    // were folded into the mean as they arrived.
    assert_eq!(seen.replies, [(4, 0), (4, 0)]);
}
