//! Integration tests of the network deployment: a real `flotilla serve` and real
//! `flotilla join` processes on loopback (ephemeral ports).
//!
//! * a normal run gives the same metrics and the same model as `simulate` with the same config,
//!   also with training samples held out for the server (`[server_data]`);
//! * FedMap (masks on the wire) also matches `simulate` over the network;
//! * a client killed mid-round fails that round, the round completes with the others;
//! * the server killed (SIGKILL) after a checkpoint and restarted on the same state folder
//!   finishes the run with every round exactly once, still matching `simulate`;
//!
//! Who can reach a served run (tokens, TLS, the dashboard) is in `network_access.rs`.
//! The hostile-client cases (malformed, misaddressed, replayed, oversized updates…) are in
//! `crates/flotilla-net/tests/hostile.rs`, against the server in-process.
//!
//! Tests that load data need Fashion-MNIST in /usr/share/datasets/fashion-mnist
//! (`apt-get install dataset-fashion-mnist`); without it they print a note and pass.

mod common;

use common::served::*;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};
use tempfile::TempDir;

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
