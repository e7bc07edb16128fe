//! Integration tests of the network deployment: a real `flotilla serve` and real
//! `flotilla join` processes on loopback (ephemeral ports).
//!
//! * a normal run gives the same metrics and the same model as `simulate` with the same config,
//!   also with training samples held out for the server (`[server_data]`);
//! * FedMap (masks on the wire) also matches `simulate` over the network;
//! * a client killed mid-round fails that round, the round completes with the others;
//! * the server killed (SIGKILL) after a checkpoint and restarted on the same state folder
//!   finishes the run with every round exactly once, still matching `simulate`;
//! * TLS with bearer tokens: a client without a valid token is refused, one with it trains.
//!
//! The hostile-client cases (malformed, misaddressed, replayed, oversized updates…) are in
//! `crates/flotilla-net/tests/hostile.rs`, against the server in-process.
//!
//! Tests that load data need Fashion-MNIST in /usr/share/datasets/fashion-mnist
//! (`apt-get install dataset-fashion-mnist`); without it they print a note and pass.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// A small FedAvg run for the network: 3 IID clients, all sampled every round, the MLP on
/// 1,500 training and 300 test images. Heartbeats and liveness are short so a dead client is
/// noticed quickly.
const NET: &str = r#"
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
const PROCESS_LIMIT: Duration = Duration::from_secs(180);

/// A child process whose stderr is collected line by line; killed when dropped, so a failing
/// test leaves no process behind.
struct Proc {
    child: Child,
    lines: Receiver<String>,
    log: Arc<Mutex<String>>,
    what: String,
}

impl Proc {
    fn spawn(cwd: &Path, args: &[&str], what: &str) -> Proc {
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
    fn wait_for_line(&self, needle: &str) -> String {
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

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for the process to exit (within the limit) and returns its exit code.
    fn wait(&mut self) -> i32 {
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
    fn expect_success(&mut self) {
        let code = self.wait();
        let log = self.log();
        assert!(
            code == 0 && !log.contains("panicked"),
            "{} exited with {code}; output:\n{log}",
            self.what
        );
    }

    /// SIGKILL, as a crash or `kill -9` would.
    fn kill(&mut self) {
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
fn start_server(
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
fn start_client(cwd: &Path, url: &str, k: u64, n: u64, extra: &[&str]) -> Proc {
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
struct Served {
    server: Proc,
    clients: Vec<Proc>,
    config: PathBuf,
    state: PathBuf,
    addr: String,
}

/// Writes `body` as the config, starts `serve --insecure` on an ephemeral port and `n` clients
/// with `join`'s defaults.
fn serve_with_clients(tmp: &Path, body: &str, n: u64) -> Served {
    serve_with_client_options(tmp, body, n, &[])
}

/// [`serve_with_clients`] with `extra` options for every client.
fn serve_with_client_options(tmp: &Path, body: &str, n: u64, extra: &[&str]) -> Served {
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
fn simulate(cwd: &Path, config: &Path, out: &Path) -> PathBuf {
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
const DRIVER_DEPENDENT: &[&str] = &[
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
fn assert_same_as_simulate(net: &Path, sim: &Path) {
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
fn assert_bytes_cover_the_simulators(net: &Path, sim: &Path) {
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

#[test]
fn network_run_matches_simulate() {
    if !have_data("network_run_matches_simulate") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    // 300 of the 1,500 training images are the server's: `join --partition` must leave out
    // the same slice as the simulator, or the trajectories part.
    let body = format!("{NET}\n[server_data]\nsource = \"holdout\"\nsize = 300\n");
    let Served {
        mut server,
        mut clients,
        config,
        state,
        ..
    } = serve_with_clients(tmp.path(), &body, 3);
    server.expect_success();
    for c in &mut clients {
        c.expect_success();
        assert!(
            c.log().contains("2 updates accepted, 0 refused"),
            "{}",
            c.log()
        );
    }
    let sim = simulate(tmp.path(), &config, &tmp.path().join("simulated"));
    assert_same_as_simulate(&state, &sim);
    assert_bytes_cover_the_simulators(&state, &sim);
    let examples: u64 = read_jsonl(&state.join("clients.jsonl"))
        .iter()
        .filter(|c| c["round"] == 1)
        .map(|c| c["num_examples"].as_u64().unwrap())
        .sum();
    assert_eq!(
        examples, 1200,
        "the clients hold the 1,500 minus the server's 300"
    );
    let resolved = std::fs::read_to_string(state.join("config.toml")).unwrap();
    assert!(resolved.contains("[server_data]"), "{resolved}");
    for f in [
        "config.toml",
        "clients.jsonl",
        "summary.json",
        "plots/accuracy_vs_round.svg",
    ] {
        assert!(state.join(f).exists(), "the served run lacks {f}");
    }
    let acc = read_json(&state.join("summary.json"))["final_test_accuracy"]
        .as_f64()
        .unwrap();
    assert!(acc > 0.5, "final accuracy {acc} is not well above chance");
}

#[test]
fn clients_on_several_threads_match_simulate_up_to_float_rounding() {
    if !have_data("clients_on_several_threads_match_simulate_up_to_float_rounding") {
        return;
    }
    // `join --threads 2` splits each batch into two micro-batches whose gradient sums round
    // differently from one thread's: the trajectory is the simulator's up to float rounding,
    // not bit for bit (README, "Over the network").
    let tmp = TempDir::new().unwrap();
    let Served {
        mut server,
        mut clients,
        config,
        state,
        ..
    } = serve_with_client_options(tmp.path(), NET, 3, &["--threads", "2"]);
    server.expect_success();
    for c in &mut clients {
        c.expect_success();
    }
    let sim = simulate(tmp.path(), &config, &tmp.path().join("simulated"));
    let acc = |d: &Path| {
        read_json(&d.join("summary.json"))["final_test_accuracy"]
            .as_f64()
            .unwrap()
    };
    let (net, simulated) = (acc(&state), acc(&sim));
    assert!(
        (net - simulated).abs() <= 0.02,
        "two threads {net}, simulate {simulated}"
    );
}

#[test]
fn fedmap_over_the_network_matches_simulate() {
    if !have_data("fedmap_over_the_network_matches_simulate") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let body = NET
        .replace("rounds = 2", "rounds = 4")
        .replace("num_clients = 3", "num_clients = 2")
        .replace("clients_per_round = 3", "clients_per_round = 2")
        .replace("min_clients = 3", "min_clients = 2")
        .replace(
            "name = \"fedavg\"",
            "name = \"fedmap\"\nwarmup = 1\nperiod = 1\nrate = 0.5\ntarget_sparsity = 0.8",
        );
    let Served {
        mut server,
        mut clients,
        config,
        state,
        ..
    } = serve_with_clients(tmp.path(), &body, 2);
    server.expect_success();
    for c in &mut clients {
        c.expect_success();
    }
    let sim = simulate(tmp.path(), &config, &tmp.path().join("simulated"));
    assert_same_as_simulate(&state, &sim);
    let m = read_jsonl(&state.join("metrics.jsonl"));
    let sparsity = m.last().unwrap()["sparsity"].as_f64().unwrap();
    assert!(sparsity > 0.7, "FedMap pruned to only {sparsity}");
    // Masked messages shrink with the model over the network too.
    let first = m[0]["bytes_up"].as_f64().unwrap();
    let last = m.last().unwrap()["bytes_up"].as_f64().unwrap();
    assert!(
        last < 0.4 * first,
        "uplink did not shrink with the mask: {first} B in round 1, {last} B at the end"
    );
}

#[test]
fn killed_client_fails_its_round_and_the_run_goes_on() {
    if !have_data("killed_client_fails_its_round_and_the_run_goes_on") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    // Long local training so the client is surely killed while it trains; two live clients
    // are enough to go on.
    let body = NET
        .replace("epochs = 1", "epochs = 30")
        .replace("min_clients = 3", "min_clients = 2");
    let Served {
        mut server,
        mut clients,
        state,
        ..
    } = serve_with_clients(tmp.path(), &body, 3);
    // The server starts once two have joined, so the killed client may first train in round
    // 1 or 2; the checks below read which clients each round sampled.
    clients[2].wait_for_line("training");
    clients[2].kill();
    server.expect_success();
    for c in &mut clients[..2] {
        let code = c.wait();
        assert_eq!(
            code,
            0,
            "{}:\n{}\nthe server:\n{}",
            c.what,
            c.log(),
            server.log()
        );
    }
    let metrics = read_jsonl(&state.join("metrics.jsonl"));
    assert_eq!(rounds_of(&metrics), vec![1, 2], "each round exactly once");
    let records = read_jsonl(&state.join("clients.jsonl"));
    let killed: Vec<_> = records.iter().filter(|r| r["client"] == 2).collect();
    let round_killed = killed
        .iter()
        .find(|r| r["status"] == "failed")
        .unwrap_or_else(|| panic!("the killed client has no failed round: {killed:?}"));
    assert!(
        round_killed["reason"]
            .as_str()
            .unwrap()
            .contains("liveness"),
        "{round_killed}"
    );
    let r = round_killed["round"].as_u64().unwrap();
    let line = &metrics[(r - 1) as usize];
    let sampled = records.iter().filter(|x| x["round"] == r).count();
    assert!(sampled >= 2, "round {r} sampled only the killed client");
    assert_eq!(
        line["clients"].as_u64().unwrap() as usize,
        sampled - 1,
        "round {r} aggregates the others: {line}"
    );
    assert!(line["test_accuracy"].as_f64().unwrap() > 0.5, "{line}");
}

#[test]
fn deadline_drops_stragglers_without_waiting_for_them() {
    if !have_data("deadline_drops_stragglers_without_waiting_for_them") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    // Local training takes several seconds; the deadline is half a second.
    let body = NET
        .replace("epochs = 1", "epochs = 400")
        .replace("num_clients = 3", "num_clients = 2")
        .replace("clients_per_round = 3", "clients_per_round = 2")
        .replace("min_clients = 3", "min_clients = 2")
        .replace("deadline_s = 120.0", "deadline_s = 0.5");
    // The clients are bound so they live (and are killed) with the test.
    let Served {
        mut server,
        clients: _clients,
        state,
        ..
    } = serve_with_clients(tmp.path(), &body, 2);
    let started = Instant::now();
    server.expect_success();
    // Two rounds of 0.5 s plus evaluation: the server did not wait for the training.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the server took {:?}",
        started.elapsed()
    );
    let metrics = read_jsonl(&state.join("metrics.jsonl"));
    assert_eq!(rounds_of(&metrics), vec![1, 2]);
    for m in &metrics {
        assert_eq!(m["clients"], 0, "no update arrived in time: {m}");
    }
    let records = read_jsonl(&state.join("clients.jsonl"));
    assert_eq!(records.len(), 4);
    for r in &records {
        assert_eq!(r["status"], "straggler", "{r}");
        assert!(r["reason"].as_str().unwrap().contains("deadline"), "{r}");
    }
}

#[test]
fn restarted_server_resumes_without_losing_or_repeating_a_round() {
    if !have_data("restarted_server_resumes_without_losing_or_repeating_a_round") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let body = NET
        .replace("rounds = 2", "rounds = 4")
        .replace("epochs = 1", "epochs = 3");
    let Served {
        mut server,
        mut clients,
        config,
        state,
        addr,
    } = serve_with_clients(tmp.path(), &body, 3);
    // Kill the server once round 1 is checkpointed.
    let state_json = state.join("checkpoint/state.json");
    let until = Instant::now() + PROCESS_LIMIT;
    while !state_json.exists() {
        assert!(
            Instant::now() < until,
            "no checkpoint; server:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill();
    let done_before = read_json(&state_json)["round"].as_u64().unwrap();
    assert!(
        done_before < 4,
        "the run finished before the server was killed"
    );
    // Restart on the same address and state folder: no --config, it resumes.
    let args = [
        "serve",
        "--state",
        s(&state),
        "--listen",
        &addr,
        "--insecure",
    ];
    let mut restarted = Proc::spawn(tmp.path(), &args, "the restarted server");
    restarted.wait_for_line("resuming");
    restarted.expect_success();
    for c in &mut clients {
        c.expect_success();
    }
    let metrics = read_jsonl(&state.join("metrics.jsonl"));
    assert_eq!(
        rounds_of(&metrics),
        vec![1, 2, 3, 4],
        "each round exactly once"
    );
    // No fault changed what was learnt: the same as an uninterrupted simulation.
    let sim = simulate(tmp.path(), &config, &tmp.path().join("simulated"));
    assert_same_as_simulate(&state, &sim);
}

#[test]
fn tls_with_tokens_refuses_a_client_without_a_valid_token() {
    if !have_data("tls_with_tokens_refuses_a_client_without_a_valid_token") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let certs = tmp.path().join("certs");
    success(
        &flotilla(tmp.path(), &["certs", "--out", s(&certs), "--tokens", "2"]),
        "certs",
    );
    let body = NET
        .replace("rounds = 2", "rounds = 1")
        .replace("num_clients = 3", "num_clients = 2")
        .replace("clients_per_round = 3", "clients_per_round = 1")
        .replace("min_clients = 3", "min_clients = 1");
    let config = write_config(tmp.path(), "net.toml", &body);
    let state = tmp.path().join("served");
    let (cert, key, tokens, ca) = (
        certs.join("server.pem"),
        certs.join("server.key"),
        certs.join("tokens.txt"),
        certs.join("ca.pem"),
    );
    let (mut server, addr) = start_server(
        tmp.path(),
        &config,
        &state,
        "127.0.0.1:0",
        &[
            "--cert",
            s(&cert),
            "--key",
            s(&key),
            "--tokens",
            s(&tokens),
            "--dashboard",
            "127.0.0.1:0",
        ],
    );
    let port = addr.rsplit(':').next().unwrap();
    let url = format!("https://127.0.0.1:{port}");

    // The dashboard shares the server's certificate: HTTPS, verified against the run's CA...
    let dashboard = server
        .log()
        .split("dashboard: ")
        .nth(1)
        .and_then(|u| u.split_whitespace().next())
        .unwrap()
        .to_string();
    assert!(dashboard.starts_with("https://"), "{dashboard}");
    let (code, run) = get_json_with_ca(&dashboard, "/api/run", Some(&ca));
    assert_eq!(code, 200);
    assert_eq!(run["method"], "fedavg", "{run}");
    // ...and nothing in plaintext.
    let mut plain = std::net::TcpStream::connect(host(&dashboard)).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    std::io::Write::write_all(&mut plain, b"GET /api/run HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain, &mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("fedavg"),
        "the dashboard answered in plaintext"
    );

    // A wrong token: refused at once with a clear error, nothing trained.
    let mut intruder = start_client(
        tmp.path(),
        &url,
        1,
        2,
        &["--ca", s(&ca), "--token", "not-a-token"],
    );
    let code = intruder.wait();
    let log = intruder.log();
    assert!(
        code != 0 && !log.contains("panicked"),
        "exit {code}:\n{log}"
    );
    assert!(
        log.contains("error:") && log.contains("unknown bearer token"),
        "{log}"
    );
    // No token at all.
    let mut anonymous = start_client(tmp.path(), &url, 1, 2, &["--ca", s(&ca)]);
    assert_ne!(anonymous.wait(), 0);
    assert!(
        anonymous.log().contains("no bearer token"),
        "{}",
        anonymous.log()
    );
    // Plaintext against the TLS server does not get through either.
    let mut plain = start_client(
        tmp.path(),
        &format!("http://127.0.0.1:{port}"),
        1,
        2,
        &["--token-file", s(&tokens), "--give-up", "2"],
    );
    assert_ne!(plain.wait(), 0, "{}", plain.log());

    // The right token over TLS trains the run.
    let mut member = start_client(
        tmp.path(),
        &url,
        0,
        2,
        &["--ca", s(&ca), "--token-file", s(&tokens)],
    );
    member.expect_success();
    server.expect_success();
    assert!(
        member.log().contains("1 updates accepted"),
        "{}",
        member.log()
    );
    assert!(
        server.log().contains("unknown bearer token"),
        "the refusal is logged"
    );
    assert_eq!(
        rounds_of(&read_jsonl(&state.join("metrics.jsonl"))),
        vec![1]
    );
}

#[test]
fn the_served_run_has_a_live_dashboard() {
    if !have_data("the_served_run_has_a_live_dashboard") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let config = write_config(tmp.path(), "net.toml", NET);
    let state = tmp.path().join("served");
    let (mut server, addr) = start_server(
        tmp.path(),
        &config,
        &state,
        "127.0.0.1:0",
        &["--dashboard", "127.0.0.1:0"],
    );
    // Printed before the server listens: it is in the output already.
    let log = server.log();
    let url = log
        .split("dashboard: ")
        .nth(1)
        .and_then(|u| u.split_whitespace().next())
        .unwrap()
        .to_string();
    // Before any client joins, the page and the run's JSON are there.
    let (code, mut body) = get(&url, "/");
    let mut page = String::new();
    std::io::Read::read_to_string(&mut body, &mut page).unwrap();
    assert_eq!(code, 200);
    assert!(page.contains("id=\"round\""), "{page}");
    let (code, run) = get_json(&url, "/api/run");
    assert_eq!(code, 200);
    assert_eq!(run["method"], "fedavg", "{run}");
    // The event stream, read from before any client joins until the run finishes.
    let stream_url = url.clone();
    let (subscribed, connected) = channel();
    let reader = std::thread::spawn(move || {
        read_events_with(&stream_url, "/api/events", |kind, _| {
            if kind == "snapshot" {
                let _ = subscribed.send(());
            }
        })
    });
    // The clients start only once the stream is subscribed, so it sees every round.
    connected
        .recv_timeout(Duration::from_secs(60))
        .expect("the event stream never sent its snapshot");
    let server_url = format!("http://{addr}");
    let mut clients: Vec<Proc> = (0..3)
        .map(|k| start_client(tmp.path(), &server_url, k, 3, &[]))
        .collect();
    server.expect_success();
    for c in &mut clients {
        c.expect_success();
    }
    let events = reader.join().unwrap();
    assert_eq!(events.last().map(|e| e.0.as_str()), Some("finished"));
    // After each round the connected clients, with their sessions and tiers.
    let members: Vec<serde_json::Value> = events
        .iter()
        .filter(|(k, _)| k == "members")
        .map(|(_, d)| d["members"].clone())
        .collect();
    let last = members.last().expect("no members event");
    let ids: Vec<u64> = last
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["client"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [0, 1, 2], "{last}");
    for m in last.as_array().unwrap() {
        assert!(m["session"].as_u64().unwrap() > 0, "{m}");
        assert!(m["last_seen_s"].as_f64().unwrap() < 60.0, "{m}");
    }
}
