//! Who can reach a served run, with real `flotilla serve` and `flotilla join` processes on
//! loopback: TLS with bearer tokens (a client without a valid token is refused, one with it
//! trains; the dashboard speaks HTTPS with the server's certificate and never plaintext), and
//! the served run's live dashboard with its members.
//!
//! Tests that load data need Fashion-MNIST in /usr/share/datasets/fashion-mnist
//! (`apt-get install dataset-fashion-mnist`); without it they print a note and pass.

mod common;

use common::served::*;
use common::*;
use std::sync::mpsc::channel;
use std::time::Duration;
use tempfile::TempDir;

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
