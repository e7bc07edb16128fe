//! `flotilla bench-net`: the network deployment under load. A real `flotilla serve` process
//! on loopback and N clients in this process, each the real client loop of
//! [`flotilla_net::client`] (own connection, session, heartbeats) with a client half that
//! returns the task's tensors untouched instead of training. Round time is therefore all
//! protocol and server work: sampling, encoding, transport, decoding, checks, aggregation.
//!
//! Reported per N: round wall time (evaluation excluded), that time per client, bytes on the
//! wire against the raw f32 tensor bytes, and the server's peak RSS (VmHWM, sampled while it
//! runs).

use crate::cli::setup::load_config;
use anyhow::{Context, Result, bail};
use flotilla_core::device::DeviceProfile;
use flotilla_data::Dataset;
use flotilla_engine::{ClientCtx, ClientData, ClientHalf, EngineError, Experiment, Reply, Task};
use flotilla_net::client::{self, JoinOptions};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Returns the task's tensors as the update: a valid reply that costs no training time.
struct Echo;

impl ClientHalf for Echo {
    fn execute(&self, task: &Task, _: &ClientData, _: &ClientCtx) -> Result<Reply, EngineError> {
        Ok(Reply {
            round: task.round,
            phase: task.phase,
            client: task.client,
            num_examples: 1,
            params: task.params.clone(),
            metrics: Default::default(),
            resources: Default::default(),
        })
    }
}

/// W2's model and data settings, every client sampled every round, evaluation only at the end.
fn experiment(n: usize, rounds: u64) -> String {
    format!(
        r#"
seed = 0
rounds = {rounds}

[data]
dataset = "fashion-mnist"
num_clients = {n}
partition = {{ kind = "iid" }}
test_limit = 1000

[model]
arch = "mlp"
hidden = [200, 200]

[training]
epochs = 1
batch_size = 10
optimizer = "sgd"
lr = 0.05

[sampling]
clients_per_round = {n}

[evaluation]
every = {rounds}

[server]
min_clients = {n}
wait_s = 120.0
deadline_s = 120.0
heartbeat_s = 2.0
liveness_s = 30.0
# Every load client holds one connection; the default cap (512) protects real servers.
max_connections = {max_connections}

[method]
name = "fedavg"
"#,
        max_connections = n + 16
    )
}

fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

struct Measured {
    clients: usize,
    round_s: f64,
    bytes_wire: f64,
    bytes_raw: f64,
    server_rss: u64,
}

fn run_one(n: usize, rounds: u64, data_dir: Option<&Path>, tmp: &Path) -> Result<Measured> {
    let dir = tmp.join(format!("n{n}"));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("load.toml");
    std::fs::write(&config, experiment(n, rounds))?;
    let exp: Experiment = load_config(&config, &[])?;
    let state = dir.join("run");
    let exe = std::env::current_exe().context("cannot find the flotilla executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(["serve", "--insecure", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--state")
        .arg(&state)
        .env("FLOTILLA_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if let Some(d) = data_dir {
        cmd.arg("--data-dir").arg(d);
    }
    let mut server = cmd.spawn().context("cannot start the server")?;
    let pid = server.id();
    let address_file = state.join("address");
    let started = Instant::now();
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&address_file)
            && !a.is_empty()
        {
            break a;
        }
        if let Some(status) = server.try_wait()? {
            bail!("the server exited early ({status})");
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = server.kill();
            bail!("the server did not start listening within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let url = format!("http://{addr}");
    let one = Dataset::new(vec![0; 784], vec![0], [1, 28, 28], 10)?;
    let clients: Vec<_> = (0..n as u64)
        .map(|k| {
            let url = url.clone();
            let one = one.clone();
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let setup = Box::new(move |exp: &Experiment| {
                        let (mean, std) = exp.data.dataset.normalization();
                        let data = ClientData {
                            train: one.clone(),
                            holdout: one.take_first(0),
                            mean,
                            std,
                        };
                        Ok((Arc::new(Echo) as Arc<dyn ClientHalf>, data))
                    });
                    client::run(
                        JoinOptions {
                            server: url,
                            token: None,
                            tls: None,
                            client_id: Some(k),
                            profile: DeviceProfile::unlimited(),
                            name: format!("load-{k}"),
                            give_up_s: 60.0,
                            threads: 1,
                        },
                        setup,
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    let mut server_rss = 0;
    let status = loop {
        if let Some(h) = vm_hwm(pid) {
            server_rss = server_rss.max(h);
        }
        if let Some(status) = server.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for c in clients {
        match c.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("a load client failed: {e}"),
            Err(_) => bail!("a load client panicked"),
        }
    }
    if !status.success() {
        bail!("the server failed ({status})");
    }
    let run = flotilla_report::Run::load(&state)?;
    // Round 1 includes connection set-up; report the mean of the later rounds.
    let steady: Vec<_> = run.rounds.iter().skip(1).collect();
    let rounds_n = steady.len().max(1) as f64;
    let round_s = steady
        .iter()
        .map(|r| {
            r.wall_time_s
                - r.extra
                    .get("eval_wall_s")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(0.0)
        })
        .sum::<f64>()
        / rounds_n;
    let bytes_wire = steady
        .iter()
        .map(|r| (r.bytes_up + r.bytes_down) as f64)
        .sum::<f64>()
        / rounds_n;
    let (half, _) = flotilla_methods::build(&exp)?;
    let params = half.eval_models()[0].params.numel() as f64;
    Ok(Measured {
        clients: n,
        round_s,
        bytes_wire,
        bytes_raw: 2.0 * 4.0 * params * n as f64,
        server_rss,
    })
}

/// Runs the load benchmark for each client count and prints a table.
pub fn run(clients: &[usize], rounds: u64, data_dir: Option<&Path>) -> Result<()> {
    if rounds < 2 {
        bail!(
            "--rounds must be at least 2 (the first round, with connection set-up, is not reported)"
        );
    }
    let tmp = tempfile::TempDir::new()?;
    println!(
        "W2 MLP (199,210 parameters) over loopback gRPC; clients return the task's tensors \
         without training, so a round is all protocol and server work. Mean of rounds 2..{rounds}."
    );
    println!(
        "| clients | round wall (s) | per client (ms) | bytes on wire / round | raw tensor bytes | wire / raw | server peak RSS (MiB) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &n in clients {
        let m = run_one(n, rounds, data_dir, tmp.path())?;
        println!(
            "| {} | {:.3} | {:.2} | {:.0} | {:.0} | {:.4} | {:.0} |",
            m.clients,
            m.round_s,
            1e3 * m.round_s / m.clients as f64,
            m.bytes_wire,
            m.bytes_raw,
            m.bytes_wire / m.bytes_raw,
            m.server_rss as f64 / (1024.0 * 1024.0)
        );
    }
    Ok(())
}
