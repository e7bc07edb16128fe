//! Resources a peer can hold without a token, and how a run's end reaches the clients.
//!
//! - Idle TCP connections beyond `server.max_connections` wait; a silent connection is closed
//!   after `server.idle_timeout_s`, so a real client gets in.
//! - A run that ends in an error tells the clients so (`FAILED` with the reason), so that
//!   `flotilla join` can exit non-zero.

use flotilla_core::wire::PROTOCOL_VERSION;
use flotilla_data::Dataset;
use flotilla_engine::sink::MetricsFiles;
use flotilla_engine::{Driver, Experiment};
use flotilla_net::client::{Api, Interceptor};
use flotilla_net::proto::service::coordinator_client::CoordinatorClient;
use flotilla_net::proto::*;
use flotilla_net::server::{self, ServeOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::Request;
use tonic::transport::Channel;

/// min_clients = 2 keeps the first round from starting; a short wait then fails the run.
const EXPERIMENT: &str = r#"
rounds = 1
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
clients_per_round = 2
[server]
min_clients = 2
wait_s = WAIT
heartbeat_s = 0.5
liveness_s = 2.0
max_connections = 4
idle_timeout_s = 1.5
[method]
name = "fedavg"
"#;

fn test_set() -> Dataset {
    flotilla_testkit::images::pattern(20)
}

fn start(
    wait_s: f64,
    dir: &Path,
) -> (
    std::thread::JoinHandle<Result<serde_json::Value, String>>,
    String,
) {
    let exp = Experiment::from_toml(&EXPERIMENT.replace("WAIT", &format!("{wait_s:.1}"))).unwrap();
    let address_file: PathBuf = dir.join("address");
    let dir = dir.to_path_buf();
    let af = address_file.clone();
    let handle = std::thread::spawn(move || {
        let (half, _) = flotilla_methods::build(&exp).unwrap();
        let mut driver = Driver::new(exp, test_set(), half, &dir, 1).unwrap();
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
    for _ in 0..600 {
        if let Ok(s) = std::fs::read_to_string(&address_file)
            && !s.is_empty()
        {
            return (handle, s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the server never wrote its address");
}

async fn connect(addr: &str) -> Api {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let auth: Interceptor = Box::new(|req: Request<()>| Ok(req));
    CoordinatorClient::with_interceptor(channel, auth)
}

#[test]
fn silent_connections_are_capped_and_closed_so_real_clients_get_in() {
    let tmp = tempfile::TempDir::new().unwrap();
    let (server, addr) = start(60.0, tmp.path());
    // Twice the cap of silent peers: no TLS, no HTTP/2 preface, nothing.
    let mut silent: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let described = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), async {
            let mut api = connect(&addr).await;
            api.describe(DescribeRequest {
                protocol_version: PROTOCOL_VERSION,
            })
            .await
        })
        .await
    });
    let waited = started.elapsed();
    assert!(
        matches!(described, Ok(Ok(_))),
        "a real client was locked out: {described:?}"
    );
    // It had to wait for silent peers to be closed (two idle periods of 1.5 s at most).
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    // Every silent connection was closed by the server (end of stream or a reset), not left
    // open (which a read timeout would show).
    for s in &mut silent {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        if let Err(e) = s.read_to_end(&mut rest) {
            assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "a silent connection is still open: {e}"
            );
        }
    }
    drop(rt);
    drop(server);
}

#[test]
fn a_run_that_ends_in_an_error_tells_its_clients() {
    let tmp = tempfile::TempDir::new().unwrap();
    let (server, addr) = start(2.0, tmp.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let last = rt.block_on(async {
        let mut api = connect(&addr).await;
        let joined = api
            .join(JoinRequest {
                protocol_version: PROTOCOL_VERSION,
                client: Some(0),
                profile_json: serde_json::to_string(
                    &flotilla_core::device::DeviceProfile::unlimited(),
                )
                .unwrap(),
                num_examples: 10,
                name: "waiting".into(),
            })
            .await
            .unwrap()
            .into_inner();
        loop {
            let r = api
                .pull(PullRequest {
                    client: joined.client,
                    session: joined.session,
                    held: Vec::new(),
                })
                .await
                .unwrap()
                .into_inner();
            if r.status != PullStatus::Wait as i32 {
                break r;
            }
        }
    });
    assert_eq!(last.status, PullStatus::Failed as i32, "{last:?}");
    let result = server.join().unwrap();
    let err = result.expect_err("the server's run fails: one client of the two it needs");
    assert_eq!(last.reason, err);
}
