//! Held tensors over the network: a frozen layer a method marks to hold travels once, then by
//! fingerprint while the client holds it; a client that lost it (an evicted entry, a
//! restarted process) says so in its pull and gets it in full. The client here speaks the raw
//! protocol, so the test controls exactly what it declares to hold.

use flotilla_core::ParamSet;
use flotilla_core::wire::PROTOCOL_VERSION;
use flotilla_data::Dataset;
use flotilla_engine::held::TensorCache;
use flotilla_engine::method::KnownMasks;
use flotilla_engine::sink::MetricsFiles;
use flotilla_engine::{
    Assignment, ClientInfo, Driver, EngineError, EvalModel, Experiment, MethodState, PhaseCtx,
    PhaseEnd, Reply, ServerCtx, ServerHalf, Task,
};
use flotilla_models::{ModelSpec, Net, View};
use flotilla_net::client::{Api, Interceptor};
use flotilla_net::proto::service::coordinator_client::CoordinatorClient;
use flotilla_net::proto::*;
use flotilla_net::server::{self, ServeOptions};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use tonic::Request;
use tonic::transport::Channel;

const EXPERIMENT: &str = r#"
seed = 1
rounds = 6

[data]
dataset = "fashion-mnist"
num_clients = 1
partition = { kind = "iid" }

[model]
arch = "mlp"

[training]
epochs = 1
batch_size = 10
optimizer = "sgd"
lr = 0.05

[server]
min_clients = 1
wait_s = 60.0
deadline_s = 60.0

[method]
name = "keeper"
"#;

/// The first layer is frozen and held; the client sends back the rest.
const HELD: [&str; 2] = ["layers.0.weight", "layers.0.bias"];

struct Keeper {
    params: ParamSet,
    recipe: flotilla_engine::Recipe,
}

impl ServerHalf for Keeper {
    fn name(&self) -> &str {
        "keeper"
    }

    fn plan(&self, ctx: &PhaseCtx, clients: &[ClientInfo]) -> Result<Vec<Assignment>, EngineError> {
        Ok(clients
            .iter()
            .map(|c| {
                Assignment::Run(Box::new(Task {
                    round: ctx.round,
                    phase: ctx.phase,
                    client: c.id,
                    kind: "train".into(),
                    model: ModelSpec::mlp_2nn(),
                    view: View {
                        active_blocks: None,
                        frozen: vec!["layers.0".into()],
                    },
                    recipe: self.recipe.clone(),
                    params: self.params.clone(),
                    masks: Vec::new(),
                    hold: HELD.map(String::from).to_vec(),
                    options: serde_json::Value::Null,
                }))
            })
            .collect())
    }

    fn aggregate(
        &mut self,
        _ctx: &PhaseCtx,
        _replies: &[Reply],
        _server: &mut ServerCtx<'_>,
    ) -> Result<PhaseEnd, EngineError> {
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

fn test_set() -> Dataset {
    flotilla_testkit::images::pattern(20)
}

async fn connect(addr: &str) -> Api {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let auth: Interceptor = Box::new(|req: Request<()>| Ok(req));
    CoordinatorClient::with_interceptor(channel, auth)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX)
}

async fn join(api: &mut Api) -> u64 {
    api.join(JoinRequest {
        protocol_version: PROTOCOL_VERSION,
        client: Some(0),
        profile_json: serde_json::to_string(&flotilla_core::device::DeviceProfile::unlimited())
            .unwrap(),
        num_examples: 50,
        name: "held".into(),
    })
    .await
    .expect("join")
    .into_inner()
    .session
}

/// What a client with `cache` declares it holds.
fn inventory(cache: &TensorCache) -> Vec<HeldRef> {
    cache
        .inventory()
        .into_iter()
        .map(|(name, fingerprint)| HeldRef {
            name,
            fingerprint,
            mask: false,
        })
        .collect()
}

/// Pulls the next task declaring what `cache` holds, decodes it with the cache, answers it
/// with its trainable tensors; returns the task's size in bytes, or `None` when the run is over.
async fn serve_one(api: &mut Api, session: u64, cache: &mut TensorCache) -> Option<(u64, usize)> {
    loop {
        let r = api
            .pull(PullRequest {
                client: 0,
                session,
                held: inventory(cache),
            })
            .await
            .expect("pull")
            .into_inner();
        if r.status == PullStatus::Done as i32 {
            return None;
        }
        if r.status != PullStatus::Task as i32 {
            continue;
        }
        let task = Task::decode_with(&r.task, &mut KnownMasks::new(), cache)
            .expect("a task names only what the client holds");
        let init = Net::init_params(&ModelSpec::mlp_2nn(), 0).unwrap();
        for name in HELD {
            assert_eq!(
                task.params.get(name),
                init.get(name),
                "{name} arrived changed"
            );
        }
        let reply = Reply {
            round: task.round,
            phase: task.phase,
            client: 0,
            num_examples: 50,
            params: task.params.filter(|n| !n.starts_with("layers.0.")),
            metrics: [("train_loss".to_string(), 1.0)].into(),
            resources: Default::default(),
        };
        let bytes = reply.encode(&KnownMasks::new()).unwrap();
        let ok = api
            .push(flotilla_net::client::push_request(PushRequest {
                client: 0,
                session,
                reply: bytes,
            }))
            .await
            .expect("push")
            .into_inner();
        assert!(ok.accepted);
        return Some((task.round, r.task.len()));
    }
}

#[test]
fn held_tensors_travel_once_and_again_to_a_client_that_lost_them() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info")
        .try_init();
    let exp = Experiment::from_toml(EXPERIMENT).unwrap();
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = tmp.path().to_path_buf();
    let address_file = dir.join("address");
    let server_thread = {
        let (exp, dir, address_file) = (exp.clone(), dir.clone(), address_file.clone());
        std::thread::spawn(move || {
            let half = Keeper {
                params: Net::init_params(&ModelSpec::mlp_2nn(), 0).unwrap(),
                recipe: exp.training.clone(),
            };
            let mut driver = Driver::new(exp, test_set(), Box::new(half), &dir, 1).unwrap();
            let mut metrics = MetricsFiles::open(&dir, 0).unwrap();
            let opts = ServeOptions {
                listen: "127.0.0.1:0".parse().unwrap(),
                tls: None,
                tokens: None,
                max_examples: None,
                address_file: Some(address_file),
            };
            server::serve(&mut driver, opts, &mut [&mut metrics])
        })
    };
    let addr = wait_for_file(&address_file);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let held_bytes = 4 * (784 * 200 + 200);
    let sizes = rt.block_on(async {
        let mut api = connect(&addr).await;
        let session = join(&mut api).await;
        let mut cache = TensorCache::new(64 << 20);
        let mut sizes = Vec::new();
        // Round 1: everything travels; round 2: the held layer by fingerprint.
        sizes.push(serve_one(&mut api, session, &mut cache).await.unwrap());
        sizes.push(serve_one(&mut api, session, &mut cache).await.unwrap());
        // The cache is lost within the session (as an eviction would): the pull says so, and
        // the layer travels again.
        let mut cache = TensorCache::new(64 << 20);
        sizes.push(serve_one(&mut api, session, &mut cache).await.unwrap());
        sizes.push(serve_one(&mut api, session, &mut cache).await.unwrap());
        // A restarted process: a new session, nothing held.
        let session = join(&mut api).await;
        let mut cache = TensorCache::new(64 << 20);
        while let Some(s) = serve_one(&mut api, session, &mut cache).await {
            sizes.push(s);
        }
        sizes
    });
    drop(rt);
    server_thread
        .join()
        .expect("the server thread did not panic")
        .expect("the server finished the run");
    let full = sizes[0].1;
    assert!(full > held_bytes, "{sizes:?}");
    let by_reference = |s: usize| s + held_bytes - 32 < full && s + held_bytes + 32 > full;
    assert!(
        by_reference(sizes[1].1),
        "round 2 did not send the layer by reference: {sizes:?}"
    );
    assert_eq!(
        sizes[2].1, full,
        "a client without the layer gets it in full: {sizes:?}"
    );
    assert!(by_reference(sizes[3].1), "{sizes:?}");
    // After the restart the first task sent carries the layer, the next ones refer to it.
    let after: Vec<usize> = sizes[4..].iter().map(|s| s.1).collect();
    assert!(after.len() >= 2, "{sizes:?}");
    assert_eq!(after[0], full, "{sizes:?}");
    assert!(after[1..].iter().all(|s| by_reference(*s)), "{sizes:?}");
    // The server's records count the bytes that travelled.
    let records = read_lines(&dir.join("clients.jsonl"));
    for (round, size) in &sizes {
        let r = records
            .iter()
            .find(|r| r["round"] == *round && r["status"] == "ok")
            .unwrap_or_else(|| panic!("no record of round {round}: {records:?}"));
        let down = r["bytes_down"].as_u64().unwrap() as usize;
        assert!(
            down > *size && down < size + 16,
            "round {round}: recorded {down}, sent {size}"
        );
    }
}

fn wait_for_file(path: &Path) -> String {
    for _ in 0..600 {
        if let Ok(s) = std::fs::read_to_string(path)
            && !s.is_empty()
        {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the server never wrote {}", path.display());
}

fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
