//! Served runs for the network tests: a real `flotilla serve` and `flotilla join` processes
//! on loopback, their logs, and comparisons with `flotilla simulate`.

use super::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A small FedAvg run for the network: 3 IID clients, all sampled every round, the MLP on
/// 1,500 training and 300 test images. Heartbeats and liveness are short so a dead client is
/// noticed quickly.
pub const NET: &str = r#"
seed = 7
rounds = 2

[data]
dataset = "fashion-mnist"
num_clients = 3
partition = { kind = "iid" }
train_limit = 1500
test_limit = 300

[model]
arch = "mlp"
hidden = [64]

[training]
epochs = 1
batch_size = 32
optimizer = "sgd"
lr = 0.05
momentum = 0.9

[sampling]
clients_per_round = 3

[server]
min_clients = 3
heartbeat_s = 0.5
liveness_s = 3.0
wait_s = 60.0
deadline_s = 120.0

[method]
name = "fedavg"
"#;

/// How long any one process of these tests may run before the test gives up on it.
pub const PROCESS_LIMIT: Duration = Duration::from_secs(180);

/// A child process whose stderr is collected line by line; killed when dropped, so a failing
/// test leaves no process behind.
pub struct Proc {
    pub child: Child,
    pub lines: Receiver<String>,
    pub log: Arc<Mutex<String>>,
    pub what: String,
}

impl Proc {
    pub fn spawn(cwd: &Path, args: &[&str], what: &str) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .current_dir(cwd)
            .env_remove("FLOTILLA_DATA")
            .env("FLOTILLA_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let (tx, rx) = channel();
        let log = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stderr.take().expect("piped")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().expect("piped")),
        ] {
            let (tx, log) = (tx.clone(), log.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    log.lock().unwrap().push_str(&format!("{line}\n"));
                    let _ = tx.send(line);
                }
            });
        }
        Proc {
            child,
            lines: rx,
            log,
            what: what.to_string(),
        }
    }

    /// Waits for an output line containing `needle`.
    pub fn wait_for_line(&self, needle: &str) -> String {
        let until = Instant::now() + PROCESS_LIMIT;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        panic!(
            "{} never printed `{needle}`; its output:\n{}",
            self.what,
            self.log()
        );
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for the process to exit (within the limit) and returns its exit code.
    pub fn wait(&mut self) -> i32 {
        let until = Instant::now() + PROCESS_LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(50));
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                panic!(
                    "{} did not finish in time; output:\n{}",
                    self.what,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a clean exit, with no panic in the output.
    pub fn expect_success(&mut self) {
        let code = self.wait();
        let log = self.log();
        assert!(
            code == 0 && !log.contains("panicked"),
            "{} exited with {code}; output:\n{log}",
            self.what
        );
    }

    /// SIGKILL, as a crash or `kill -9` would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `flotilla serve --insecure` on an ephemeral loopback port (or `listen`) and
/// returns it with its address.
pub fn start_server(
    cwd: &Path,
    config: &Path,
    state: &Path,
    listen: &str,
    extra: &[&str],
) -> (Proc, String) {
    let mut args = vec![
        "serve",
        "--config",
        s(config),
        "--state",
        s(state),
        "--listen",
        listen,
    ];
    args.extend_from_slice(extra);
    if !extra.contains(&"--cert") {
        args.push("--insecure");
    }
    let server = Proc::spawn(cwd, &args, "the server");
    let line = server.wait_for_line("listening");
    let addr = line
        .split("address=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in `{line}`"))
        .to_string();
    (server, addr)
}

/// Starts `flotilla join` for partition `k` of `n` against `url` with `extra` options.
pub fn start_client(cwd: &Path, url: &str, k: u64, n: u64, extra: &[&str]) -> Proc {
    let part = format!("{k}/{n}");
    let mut args = vec![
        "join",
        "--server",
        url,
        "--data-dir",
        DATA_DIR,
        "--partition",
        &part,
        "--give-up",
        "60",
    ];
    args.extend_from_slice(extra);
    Proc::spawn(cwd, &args, &format!("client {k}"))
}

/// A served run in progress: the server, its clients (partition k of n each) and the files.
pub struct Served {
    pub server: Proc,
    pub clients: Vec<Proc>,
    pub config: PathBuf,
    pub state: PathBuf,
    pub addr: String,
}

/// Writes `body` as the config, starts `serve --insecure` on an ephemeral port and `n` clients
/// with `join`'s defaults.
pub fn serve_with_clients(tmp: &Path, body: &str, n: u64) -> Served {
    serve_with_client_options(tmp, body, n, &[])
}

/// [`serve_with_clients`] with `extra` options for every client.
pub fn serve_with_client_options(tmp: &Path, body: &str, n: u64, extra: &[&str]) -> Served {
    let config = write_config(tmp, "net.toml", body);
    let state = tmp.join("served");
    let (server, addr) = start_server(tmp, &config, &state, "127.0.0.1:0", &[]);
    let url = format!("http://{addr}");
    let clients = (0..n)
        .map(|k| start_client(tmp, &url, k, n, extra))
        .collect();
    Served {
        server,
        clients,
        config,
        state,
        addr,
    }
}

/// Runs `simulate` on `config` into `out` and returns the run directory.
pub fn simulate(cwd: &Path, config: &Path, out: &Path) -> PathBuf {
    let o = flotilla(
        cwd,
        &[
            "simulate",
            "--config",
            s(config),
            "--out",
            s(out),
            "--data-dir",
            DATA_DIR,
        ],
    );
    success(&o, "simulate");
    out.to_path_buf()
}

/// Fields of metrics.jsonl that differ between the drivers by design: times, and bytes (the
/// network counts gRPC framing and the pull/push envelopes around the same task and reply).
pub const DRIVER_DEPENDENT: &[&str] = &[
    "wall_time_s",
    "train_wall_s",
    "eval_wall_s",
    "overhead_s",
    "server_wall_s",
    "sim_time_s",
    "bytes_up",
    "bytes_down",
    "peak_client_memory_bytes",
];

/// Asserts that a network run directory holds the same learning trajectory as a simulated one:
/// every metric that does not depend on the driver, and a byte-identical final model.
pub fn assert_same_as_simulate(net: &Path, sim: &Path) {
    let a = read_jsonl(&net.join("metrics.jsonl"));
    let b = read_jsonl(&sim.join("metrics.jsonl"));
    assert_no_diffs(
        "network vs simulate metrics",
        &record_diffs("metrics.jsonl", &a, &b, DRIVER_DEPENDENT),
    );
    assert_no_diffs(
        "network vs simulate model",
        &model_diffs(
            &net.join("model.safetensors"),
            &sim.join("model.safetensors"),
        ),
    );
}

/// Bytes on the wire: the network counts at least the encoded task and reply of the simulator.
pub fn assert_bytes_cover_the_simulators(net: &Path, sim: &Path) {
    let a = read_jsonl(&net.join("metrics.jsonl"));
    let b = read_jsonl(&sim.join("metrics.jsonl"));
    for (x, y) in a.iter().zip(&b) {
        for key in ["bytes_up", "bytes_down"] {
            let (n, s) = (x[key].as_u64().unwrap(), y[key].as_u64().unwrap());
            assert!(
                n > s && n < s + s / 100 + 1000,
                "round {}: {key} over the network {n} should be the simulator's {s} plus a few \
                 framing bytes per message",
                x["round"]
            );
        }
    }
}
