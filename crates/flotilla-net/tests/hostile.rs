//! A hostile or broken client against a real server (in-process, loopback, ephemeral port).
//!
//! Every bad input must be refused with a clear status and a log line, without crashing the
//! server or corrupting its state: unauthenticated callers, bad joins, unknown sessions,
//! malformed, truncated, misaddressed, misshapen, non-finite, oversized, replayed updates and
//! absurd example counts. The run must still finish, and the one good update must count.

use flotilla_core::ParamSet;
use flotilla_core::wire::PROTOCOL_VERSION;
use flotilla_data::Dataset;
use flotilla_engine::method::KnownMasks;
use flotilla_engine::sink::MetricsFiles;
use flotilla_engine::{Driver, Experiment, Reply, Task};
use flotilla_net::client::{Api, Interceptor};
use flotilla_net::proto::service::coordinator_client::CoordinatorClient;
use flotilla_net::proto::*;
use flotilla_net::server::{self, ServeOptions};
use std::path::Path;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const TOKEN: &str = "s3cret-token";
/// A token bound to client 1 only (TOKEN is bound to client 0).
const OTHER_TOKEN: &str = "other-s3cret";

/// One client allowed per round; `max_message_mib = 1` makes the size limit testable.
const EXPERIMENT: &str = r#"
seed = 1
rounds = ROUNDS

[data]
dataset = "fashion-mnist"
num_clients = 2
partition = { kind = "iid" }

[model]
arch = "mlp"
hidden = [8]

[training]
epochs = 1
batch_size = 10
optimizer = "sgd"
lr = 0.05

[sampling]
clients_per_round = 1

[server]
min_clients = 1
wait_s = 60.0
deadline_s = 60.0
max_message_mib = 1

[method]
name = "fedavg"
"#;

/// A tiny test set of the right shape: the server only evaluates on it.
fn test_set() -> Dataset {
    flotilla_testkit::images::pattern(20)
}

async fn connect(addr: &str, token: Option<&str>) -> Api {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
        token.map(|t| format!("Bearer {t}").parse().unwrap());
    let auth: Interceptor = Box::new(move |mut req: Request<()>| {
        if let Some(h) = &header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    });
    CoordinatorClient::with_interceptor(channel, auth)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX)
}

fn profile_json() -> String {
    serde_json::to_string(&flotilla_core::device::DeviceProfile::unlimited()).unwrap()
}

fn join_request(client: Option<u64>, examples: u64) -> JoinRequest {
    JoinRequest {
        protocol_version: PROTOCOL_VERSION,
        client,
        profile_json: profile_json(),
        num_examples: examples,
        name: "hostile".into(),
    }
}

/// Asserts that a call failed with `code` and a message holding `needle`.
fn assert_refused<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, needle: &str, what: &str) {
    match r {
        Ok(v) => panic!("{what}: accepted ({v:?}), expected {code:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {s:?}");
            assert!(
                s.message().contains(needle),
                "{what}: the message `{}` does not mention `{needle}`",
                s.message()
            );
        }
    }
}

/// Pulls until a task arrives and decodes it.
async fn next_task(api: &mut Api, client: u64, session: u64, known: &mut KnownMasks) -> Task {
    for _ in 0..30 {
        let r = api
            .pull(PullRequest {
                client,
                session,
                held: Vec::new(),
            })
            .await
            .expect("pull")
            .into_inner();
        if r.status == PullStatus::Task as i32 {
            return Task::decode(&r.task, known).expect("a well-formed task");
        }
        assert_eq!(r.status, PullStatus::Wait as i32, "the run ended early");
    }
    panic!("no task within 30 pulls");
}

/// The honest reply to `task`: its own parameters back (no training needed to be valid).
fn echo(task: &Task, examples: u64) -> Reply {
    Reply {
        round: task.round,
        phase: task.phase,
        client: task.client,
        num_examples: examples,
        params: task.params.clone(),
        metrics: [("train_loss".to_string(), 1.0)].into(),
        resources: Default::default(),
    }
}

/// A push as `flotilla join` sends it: with the headers the server admits it by.
fn push_req(client: u64, session: u64, reply: Vec<u8>) -> Request<PushRequest> {
    flotilla_net::client::push_request(PushRequest {
        client,
        session,
        reply,
    })
}

/// A bad update of one kind, as bytes.
type Corruption = fn(&Task, u64) -> Vec<u8>;

fn encode(r: &Reply) -> Vec<u8> {
    r.encode(&KnownMasks::new()).unwrap()
}

fn rename_first(p: &ParamSet) -> ParamSet {
    let mut ts = p.clone().into_tensors();
    ts[0].name = "evil.weight".into();
    ParamSet::from_tensors(ts).unwrap()
}

fn reshape_first(p: &ParamSet) -> ParamSet {
    let mut ts = p.clone().into_tensors();
    let t = &mut ts[0];
    t.shape = vec![t.data.len()];
    ParamSet::from_tensors(ts).unwrap()
}

/// Each case: what it is, the corruption, and what the refusal must mention.
const CASES: &[(&str, Corruption, &str)] = &[
    ("garbage bytes", |_, _| vec![0xff; 64], "malformed"),
    (
        "NaN FLOPs",
        |t, n| {
            let mut r = echo(t, n);
            r.resources.flops = f64::NAN;
            encode(&r)
        },
        "resources.flops",
    ),
    (
        "infinite wall time",
        |t, n| {
            let mut r = echo(t, n);
            r.resources.wall_time_s = f64::INFINITY;
            encode(&r)
        },
        "resources.wall_time_s",
    ),
    (
        "NaN loss",
        |t, n| {
            let mut r = echo(t, n);
            r.metrics.insert("train_loss".into(), f64::NAN);
            encode(&r)
        },
        "train_loss",
    ),
    (
        "truncated update",
        |t, n| {
            let b = encode(&echo(t, n));
            b[..b.len() / 2].to_vec()
        },
        "malformed",
    ),
    (
        "wrong round",
        |t, n| {
            let mut r = echo(t, n);
            r.round += 1;
            encode(&r)
        },
        "answers a task for round",
    ),
    (
        "another client's id",
        |t, n| {
            let mut r = echo(t, n);
            r.client = 1 - r.client;
            encode(&r)
        },
        "answers a task for round",
    ),
    (
        "wrong phase",
        |t, n| {
            let mut r = echo(t, n);
            r.phase = 3;
            encode(&r)
        },
        "phase",
    ),
    (
        "wrong tensor name",
        |t, n| {
            let mut r = echo(t, n);
            r.params = rename_first(&r.params);
            encode(&r)
        },
        "does not match the task's tensors",
    ),
    (
        "wrong tensor shape",
        |t, n| {
            let mut r = echo(t, n);
            r.params = reshape_first(&r.params);
            encode(&r)
        },
        "does not match the task's tensors",
    ),
    (
        "NaN values",
        |t, n| {
            let mut r = echo(t, n);
            r.params.iter_mut().next().unwrap().data[3] = f32::NAN;
            encode(&r)
        },
        "finite",
    ),
    (
        "infinite values",
        |t, n| {
            let mut r = echo(t, n);
            r.params.iter_mut().last().unwrap().data[0] = f32::INFINITY;
            encode(&r)
        },
        "finite",
    ),
    (
        "zero examples",
        |t, _| encode(&echo(t, 0)),
        "0 training examples",
    ),
    (
        "absurd example count",
        |t, _| encode(&echo(t, 1_000_000_000_000)),
        "the client declared",
    ),
    (
        "another protocol version",
        |t, n| {
            use prost::Message;
            let b = encode(&echo(t, n));
            let mut msg = flotilla_core::wire::ReplyMsg::decode(b.as_slice()).unwrap();
            msg.protocol_version = PROTOCOL_VERSION + 1;
            msg.encode_to_vec()
        },
        "protocol",
    ),
];

#[test]
fn hostile_updates_are_refused_and_the_run_finishes() {
    // The server's log lines appear with the test's output when it fails.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info")
        .try_init();
    let rounds = CASES.len() + 1;
    let exp = Experiment::from_toml(&EXPERIMENT.replace("ROUNDS", &rounds.to_string())).unwrap();
    let tmp = tempfile::TempDir::new().unwrap();
    let dir = tmp.path().to_path_buf();
    let address_file = dir.join("address");
    let server_thread = {
        let (exp, dir, address_file) = (exp.clone(), dir.clone(), address_file.clone());
        std::thread::spawn(move || {
            let (half, _) = flotilla_methods::build(&exp).unwrap();
            let mut driver = Driver::new(exp, test_set(), half, &dir, 1).unwrap();
            let mut metrics = MetricsFiles::open(&dir, 0).unwrap();
            let opts = ServeOptions {
                listen: "127.0.0.1:0".parse().unwrap(),
                tls: None,
                tokens: Some(vec![
                    flotilla_net::Grant {
                        label: "tester".into(),
                        token: TOKEN.into(),
                        clients: Some(vec![(0, 0)]),
                    },
                    flotilla_net::Grant {
                        label: "other".into(),
                        token: OTHER_TOKEN.into(),
                        clients: Some(vec![(1, 1)]),
                    },
                ]),
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
    rt.block_on(async {
        // Unauthenticated callers.
        let describe = DescribeRequest {
            protocol_version: PROTOCOL_VERSION,
        };
        let mut anonymous = connect(&addr, None).await;
        assert_refused(
            anonymous.describe(describe.clone()).await,
            Code::Unauthenticated,
            "no bearer token",
            "no token",
        );
        let mut impostor = connect(&addr, Some("guess")).await;
        assert_refused(
            impostor.join(join_request(Some(0), 10)).await,
            Code::Unauthenticated,
            "unknown bearer token",
            "wrong token",
        );

        let mut api = connect(&addr, Some(TOKEN)).await;
        // Another protocol version is refused with a clear message.
        assert_refused(
            api.describe(DescribeRequest {
                protocol_version: PROTOCOL_VERSION + 1,
            })
            .await,
            Code::FailedPrecondition,
            "protocol version",
            "old client",
        );
        api.describe(describe).await.expect("describe");
        // Bad joins.
        assert_refused(
            api.join(join_request(Some(99), 10)).await,
            Code::InvalidArgument,
            "outside this run",
            "id out of range",
        );
        assert_refused(
            api.join(join_request(Some(0), 0)).await,
            Code::InvalidArgument,
            "at least one training example",
            "no data",
        );
        let mut bad_profile = join_request(Some(0), 10);
        bad_profile.profile_json = "{\"memory_bytes\": -5}".into();
        assert_refused(
            api.join(bad_profile).await,
            Code::InvalidArgument,
            "device profile",
            "bad profile",
        );

        // Client-supplied strings that would forge log lines.
        let mut forged = join_request(Some(0), 10);
        forged.name = "laptop\n2026-12-01T00:00:00Z  INFO client joined client=7".into();
        assert_refused(
            api.join(forged).await,
            Code::InvalidArgument,
            "control characters",
            "newline in the client name",
        );
        let mut forged_tier = join_request(Some(0), 10);
        forged_tier.profile_json = profile_json().replace("\"tier\":\"", "\"tier\":\"x\\n");
        assert!(
            forged_tier.profile_json.contains("\\n"),
            "{}",
            forged_tier.profile_json
        );
        assert_refused(
            api.join(forged_tier).await,
            Code::InvalidArgument,
            "control characters",
            "newline in the device tier",
        );
        // Weight inflation: a count no client holds.
        assert_refused(
            api.join(join_request(Some(0), u64::MAX)).await,
            Code::InvalidArgument,
            "at most",
            "2^64 - 1 examples",
        );
        // Tokens are bound to ids: TOKEN may act as client 0 only, OTHER_TOKEN as 1 only.
        assert_refused(
            api.join(join_request(Some(1), 10)).await,
            Code::PermissionDenied,
            "does not authorise client id 1",
            "join under another client's id",
        );
        let mut other = connect(&addr, Some(OTHER_TOKEN)).await;
        assert_refused(
            other.join(join_request(Some(0), 10)).await,
            Code::PermissionDenied,
            "does not authorise client id 0",
            "the other token under client 0",
        );

        let examples = 50;
        let joined = api
            .join(join_request(Some(0), examples))
            .await
            .expect("join")
            .into_inner();
        let (client, session) = (joined.client, joined.session);
        assert_refused(
            api.pull(PullRequest {
                client,
                session: session ^ 1,
                held: Vec::new(),
            })
            .await,
            Code::FailedPrecondition,
            "unknown session",
            "forged session",
        );
        assert_refused(
            api.push(push_req(
                client,
                session,
                encode(&echo(&dummy_task(client), examples)),
            ))
            .await,
            Code::FailedPrecondition,
            "no task outstanding",
            "update without a task",
        );

        let mut known = KnownMasks::new();
        for (i, (what, corrupt, needle)) in CASES.iter().enumerate() {
            let task = next_task(&mut api, client, session, &mut known).await;
            assert_eq!(task.round, i as u64 + 1);
            if i == 0 {
                // Without the admission headers the body is not read.
                let bare = PushRequest {
                    client,
                    session,
                    reply: encode(&echo(&task, examples)),
                };
                assert_refused(
                    api.push(bare).await,
                    Code::FailedPrecondition,
                    "must carry",
                    "update without its headers",
                );
                // A body larger than declared is refused.
                let mut small = push_req(client, session, encode(&echo(&task, examples)));
                small
                    .metadata_mut()
                    .insert(flotilla_net::push_gate::PUSH_BYTES, "16".parse().unwrap());
                assert_refused(
                    api.push(small).await,
                    Code::InvalidArgument,
                    "declared",
                    "update larger than declared",
                );
                // Over the size limit: refused by the transport before the handler; the task
                // stays outstanding.
                let huge = vec![0u8; 2 * 1024 * 1024];
                let r = api.push(push_req(client, session, huge)).await;
                let s = r.expect_err("an oversized update must be refused");
                assert!(
                    matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted),
                    "oversized update: {s:?}"
                );
            }
            let bytes = corrupt(&task, examples);
            assert_refused(
                api.push(push_req(client, session, bytes)).await,
                Code::InvalidArgument,
                needle,
                what,
            );
        }
        // The last round: an honest update counts; replaying it does not.
        let task = next_task(&mut api, client, session, &mut known).await;
        let good = encode(&echo(&task, examples));
        let ok = api
            .push(push_req(client, session, good.clone()))
            .await
            .expect("the honest update")
            .into_inner();
        assert!(ok.accepted);
        assert_refused(
            api.push(push_req(client, session, good)).await,
            Code::FailedPrecondition,
            "no task outstanding",
            "replayed update",
        );
        // The run is over.
        loop {
            let r = api
                .pull(PullRequest {
                    client,
                    session,
                    held: Vec::new(),
                })
                .await
                .expect("pull")
                .into_inner();
            if r.status == PullStatus::Done as i32 {
                break;
            }
        }
    });
    // Closes the test client's connections.
    drop(rt);
    let summary = server_thread
        .join()
        .expect("the server thread did not panic")
        .expect("the server finished the run");
    assert_eq!(summary["rounds"], rounds as u64);

    let metrics = read_lines(&dir.join("metrics.jsonl"));
    assert_eq!(metrics.len(), rounds, "every round is recorded once");
    for (i, m) in metrics.iter().enumerate() {
        let expected = if i + 1 == rounds { 1 } else { 0 };
        assert_eq!(m["clients"], expected, "round {}: {m}", i + 1);
    }
    let clients = read_lines(&dir.join("clients.jsonl"));
    for (i, (what, _, needle)) in CASES.iter().enumerate() {
        let rec = &clients[i];
        assert_eq!(rec["status"], "failed", "{what}: {rec}");
        let reason = rec["reason"].as_str().unwrap();
        assert!(
            reason.contains(needle),
            "{what}: recorded reason `{reason}`"
        );
    }
    assert_eq!(clients[CASES.len()]["status"], "ok");
}

/// A task for round 0, which is never outstanding.
fn dummy_task(client: u64) -> Task {
    let exp = Experiment::from_toml(&EXPERIMENT.replace("ROUNDS", "1")).unwrap();
    let (half, _) = flotilla_methods::build(&exp).unwrap();
    let params = half.eval_models().remove(0).params;
    let info = flotilla_engine::ClientInfo {
        id: client,
        profile: flotilla_core::device::DeviceProfile::unlimited(),
        num_examples: 10,
    };
    let ctx = flotilla_engine::PhaseCtx {
        round: 0,
        phase: 0,
        seed: 1,
    };
    match half.plan(&ctx, &[info]).unwrap().remove(0) {
        flotilla_engine::Assignment::Run(mut t) => {
            t.params = params;
            *t
        }
        flotilla_engine::Assignment::Skip(r) => panic!("skipped: {r}"),
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
