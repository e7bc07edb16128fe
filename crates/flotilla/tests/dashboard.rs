//! The live dashboard of `flotilla simulate --dashboard`, read while the run goes on: the JSON
//! API and the event stream (rounds in order, equal to metrics.jsonl at the end), the token
//! beyond loopback, and the page as headless Chromium renders it.
//!
//! Needs Fashion-MNIST (like the other command tests); the browser test also needs Debian's
//! `chromium` (`.ci/run` installs both). Without Chromium the browser test fails unless
//! FLOTILLA_SKIP_BROWSER=1 says to skip it.

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The tiny experiment with more rounds, so that the run lasts while the test watches.
fn config(dir: &Path, rounds: u64) -> PathBuf {
    let body = tiny_with("rounds = 2", &format!("rounds = {rounds}"));
    write_config(dir, "dash.toml", &body)
}

/// Starts `simulate --dashboard 127.0.0.1:0` (or `addr`) and returns the process and the
/// dashboard's base URL, read from the run directory's `dashboard` file.
fn start(tmp: &Path, rounds: u64, addr: &str, env: &[(&str, &str)]) -> (Child, String) {
    let cfg = config(tmp, rounds);
    let mut cmd = Command::new(BIN);
    cmd.args([
        "simulate",
        "--config",
        s(&cfg),
        "--out",
        "run",
        "--dashboard",
        addr,
        "--dashboard-linger",
        "120",
    ])
    .current_dir(tmp)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let file = tmp.join("run/dashboard");
    let started = Instant::now();
    while !file.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no dashboard file"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = std::fs::read_to_string(&file).unwrap().trim().to_string();
    (child, url)
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn events_arrive_in_order_while_the_run_goes_on_and_match_metrics() {
    if !have_data("events_arrive_in_order_while_the_run_goes_on_and_match_metrics") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    // Long enough (a few seconds) that the stream connects while rounds are still to come.
    let rounds = 40;
    let (child, url) = start(tmp.path(), rounds, "127.0.0.1:0", &[]);
    let (code, run) = get_json(&url, "/api/run");
    assert_eq!(code, 200);
    assert_eq!(run["method"], "fedavg");
    assert_eq!(run["config"]["rounds"], rounds);
    let events = read_events(&url, "/api/events");
    let (first, snapshot) = &events[0];
    assert_eq!(first, "snapshot");
    let mut seen: Vec<Value> = snapshot["rounds"].as_array().unwrap().clone();
    let live = events.iter().filter(|(k, _)| k == "round").count();
    assert!(
        live > 0,
        "no round arrived live (the snapshot already held {} rounds)",
        seen.len()
    );
    for (kind, data) in &events[1..] {
        if kind == "round" {
            seen.push(data["round"].clone());
            assert!(data["clients"].as_array().is_some_and(|c| !c.is_empty()));
        }
    }
    assert_eq!(events.last().unwrap().0, "finished");
    let numbers: Vec<u64> = seen.iter().map(|r| r["round"].as_u64().unwrap()).collect();
    assert_eq!(
        numbers,
        (1..=rounds).collect::<Vec<_>>(),
        "rounds out of order"
    );
    // At the end, /api/run and metrics.jsonl hold the same rounds as the stream.
    let (_, done) = get_json(&url, "/api/run");
    assert_eq!(done["status"], "finished");
    let metrics = read_jsonl(&tmp.path().join("run/metrics.jsonl"));
    assert_eq!(metrics.len(), rounds as usize);
    for (streamed, written) in seen.iter().zip(&metrics) {
        assert_eq!(streamed, written, "round {}", written["round"]);
    }
    assert_eq!(done["rounds"].as_array().unwrap(), &metrics);
    stop(child);
}

#[test]
fn beyond_loopback_the_dashboard_needs_its_token() {
    if !have_data("beyond_loopback_the_dashboard_needs_its_token") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let cfg = config(tmp.path(), 2);
    let out = flotilla_env(
        tmp.path(),
        &[
            "simulate",
            "--config",
            s(&cfg),
            "--out",
            "open",
            "--dashboard",
            "0.0.0.0:0",
        ],
        &[("FLOTILLA_DASHBOARD_TOKEN", "")],
    );
    assert_clean_error(
        &out,
        "a dashboard beyond loopback without a token",
        &["FLOTILLA_DASHBOARD_TOKEN", "127.0.0.1"],
    );
    let (child, url) = start(
        tmp.path(),
        3,
        "0.0.0.0:0",
        &[("FLOTILLA_DASHBOARD_TOKEN", "s3cret")],
    );
    let port = host(&url).rsplit(':').next().unwrap().to_string();
    let local = format!("http://127.0.0.1:{port}/");
    assert_eq!(get_json(&local, "/api/run").0, 401);
    assert_eq!(get_json(&local, "/").0, 401);
    assert_eq!(get_json(&local, "/api/events").0, 401);
    assert_eq!(get_json(&local, "/api/run?token=wrong").0, 401);
    let (code, run) = get_json(&local, "/api/run?token=s3cret");
    assert_eq!(code, 200);
    assert_eq!(run["method"], "fedavg");
    stop(child);
}

#[test]
fn chromium_renders_the_round_counter_and_the_client_table_without_console_errors() {
    if !have_data("chromium_renders_the_round_counter_and_the_client_table_without_console_errors")
    {
        return;
    }
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    let Some(chromium) = chromium else {
        if std::env::var("FLOTILLA_SKIP_BROWSER").as_deref() == Ok("1") {
            eprintln!("note: the browser test skipped (FLOTILLA_SKIP_BROWSER=1)");
            return;
        }
        panic!("no chromium: apt-get install chromium, or set FLOTILLA_SKIP_BROWSER=1");
    };
    let tmp = TempDir::new().unwrap();
    let rounds = 4;
    let (child, url) = start(tmp.path(), rounds, "127.0.0.1:0", &[]);
    // Let the run finish (the dashboard lingers), so the page has every round to show.
    let started = Instant::now();
    while !tmp.path().join("run/summary.json").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the run did not finish"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let shot = tmp.path().join("dashboard.png");
    let browse = |extra: &[&str]| {
        let profile = tmp.path().join(format!("profile-{}", extra.len()));
        Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=8000",
                "--window-size=1400,1100",
                &format!("--user-data-dir={}", profile.display()),
            ])
            .args(extra)
            .arg(&url)
            .output()
            .unwrap()
    };
    let dom = browse(&["--dump-dom"]);
    let html = text(&dom.stdout);
    let log = text(&dom.stderr);
    assert!(
        html.contains(&format!("<b id=\"round\">{rounds}</b>")),
        "round counter not rendered:\n{html}"
    );
    assert!(html.contains("<b id=\"status\">finished</b>"), "{html}");
    // The client table of the last round: 5 clients, each with its status cell.
    let tbody = html
        .split("<tbody id=\"clients\">")
        .nth(1)
        .and_then(|t| t.split("</tbody>").next())
        .unwrap_or("");
    assert_eq!(tbody.matches("<tr>").count(), 5, "{tbody}");
    assert_eq!(
        tbody.matches("<td class=\"ok\">ok</td>").count(),
        5,
        "{tbody}"
    );
    for bad in ["Uncaught", "SyntaxError", "TypeError", "ReferenceError"] {
        assert!(
            !log.lines()
                .any(|l| l.contains("CONSOLE") && l.contains(bad)),
            "console error in the page:\n{log}"
        );
    }
    let out = browse(&[&format!("--screenshot={}", shot.display())]);
    assert!(shot.exists(), "no screenshot: {}", text(&out.stderr));
    if let Ok(dir) = std::env::var("FLOTILLA_SCREENSHOT_DIR") {
        std::fs::copy(&shot, Path::new(&dir).join("dashboard.png")).unwrap();
    }
    stop(child);
}

#[test]
fn report_serves_finished_runs_side_by_side() {
    if !have_data("report_serves_finished_runs_side_by_side") {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let cfg = config(tmp.path(), 2);
    for (out, seed) in [("a", "0"), ("b", "1")] {
        success(
            &flotilla(
                tmp.path(),
                &[
                    "simulate",
                    "--config",
                    s(&cfg),
                    "--out",
                    out,
                    "--set",
                    &format!("seed={seed}"),
                ],
            ),
            "simulate",
        );
    }
    let mut child = Command::new(BIN)
        .args(["report", "a", "b", "--serve", "127.0.0.1:0"])
        .current_dir(tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut url = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("dashboard: ") {
            url = rest.split_whitespace().next().map(str::to_string);
            break;
        }
    }
    let url = url.expect("report printed no dashboard URL");
    let (code, mut index) = get(&url, "/");
    assert_eq!(code, 200);
    let mut html = String::new();
    index.read_to_string(&mut html).unwrap();
    assert_eq!(html.matches("<iframe").count(), 2, "{html}");
    for (i, dir) in ["a", "b"].iter().enumerate() {
        let (code, run) = get_json(&url, &format!("/runs/{i}/api/run"));
        assert_eq!(code, 200);
        assert_eq!(run["name"], *dir);
        assert_eq!(run["status"], "finished");
        let metrics = read_jsonl(&tmp.path().join(dir).join("metrics.jsonl"));
        assert_eq!(run["rounds"].as_array().unwrap(), &metrics);
        assert_eq!(run["clients"].as_array().unwrap().len(), 5);
        let (code, _) = get(&url, &format!("/runs/{i}/"));
        assert_eq!(code, 200);
    }
    stop(child);
}
