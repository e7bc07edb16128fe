//! Helpers shared by the command-line test files: running the binary, reading run
//! directories, comparing runs.
#![allow(dead_code)]

pub mod served;

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_flotilla");
pub const DATA_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// A tiny FedAvg experiment: the MLP on 2000 training and 500 test samples, 10 IID clients,
/// 5 per round, a checkpoint after every round.
pub const TINY: &str = r#"
seed = 0
rounds = 2

[data]
dataset = "fashion-mnist"
num_clients = 10
partition = { kind = "iid" }
train_limit = 2000
test_limit = 500

[model]
arch = "mlp"
hidden = [200, 200]

[training]
epochs = 1
batch_size = 32
optimizer = "sgd"
lr = 0.05
momentum = 0.9

[sampling]
clients_per_round = 5

[simulation]
checkpoint_every = 1

[method]
name = "fedavg"
"#;

/// Keys every line of metrics.jsonl must hold.
pub const METRIC_KEYS: [&str; 13] = [
    "round",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "clients",
    "bytes_up",
    "bytes_down",
    "sim_time_s",
    "wall_time_s",
    "peak_client_memory_bytes",
    "flops",
    "server_flops",
    "server_wall_s",
];

/// Whether the packaged dataset is installed; prints a note when it is not.
pub fn have_data(test: &str) -> bool {
    let ok = Path::new(DATA_DIR).is_dir();
    if !ok {
        eprintln!(
            "note: {test} skipped: {DATA_DIR} is missing (apt-get install dataset-fashion-mnist)"
        );
    }
    ok
}

/// Path as &str (temporary directories are UTF-8 here).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Runs the binary in `cwd` with a clean, fixed environment.
pub fn flotilla_env(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("FLOTILLA_DATA")
        .env("FLOTILLA_LOG", "info")
        .env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"))
}

pub fn flotilla(cwd: &Path, args: &[&str]) -> Output {
    flotilla_env(cwd, args, &[])
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts success and returns stdout.
pub fn success(out: &Output, what: &str) -> String {
    let stderr = text(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{stderr}",
        out.status,
        text(&out.stdout)
    );
    assert!(!stderr.contains("panicked"), "{what} panicked:\n{stderr}");
    text(&out.stdout)
}

/// Asserts a clean failure: no panic, a non-zero exit code, exactly one line starting with
/// `error:`, which is the last line of stderr (the error and its causes on one line), and a
/// message holding every needle. Returns the error message.
pub fn assert_clean_error(out: &Output, what: &str, needles: &[&str]) -> String {
    let stderr = text(&out.stderr);
    let mut problems = Vec::new();
    if stderr.contains("panicked") {
        problems.push("stderr reports a panic".to_string());
    }
    match out.status.code() {
        Some(0) => problems.push("exit code is 0".to_string()),
        None => problems.push(format!("killed by a signal ({})", out.status)),
        Some(101) => problems.push("exit code 101 is Rust's panic exit code".to_string()),
        Some(_) => {}
    }
    let lines: Vec<&str> = stderr.lines().collect();
    let error_lines: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("error:"))
        .collect();
    if error_lines.len() != 1 {
        problems.push(format!(
            "expected exactly one line starting with `error:`, found {}",
            error_lines.len()
        ));
    }
    // The message: from the (first) error line to the end of stderr.
    let message = error_lines
        .first()
        .map(|&i| lines[i..].join("\n"))
        .unwrap_or_default();
    for n in needles {
        if !message.contains(n) {
            problems.push(format!("the error message does not mention `{n}`"));
        }
    }
    let last = lines.iter().rev().find(|l| !l.trim().is_empty());
    if !last.is_some_and(|l| l.starts_with("error:")) {
        problems.push(
            "the error is not a single line ending stderr: the last line of stderr does not \
             start with `error:`"
                .to_string(),
        );
    }
    assert!(
        problems.is_empty(),
        "{what}:\n  - {}\nexit status: {}\nstderr:\n{stderr}",
        problems.join("\n  - "),
        out.status
    );
    message
}

/// Writes `body` as `<dir>/<name>` and returns the path.
pub fn write_config(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write config");
    p
}

/// TINY with `from` replaced by `to`; the replaced text must occur once.
pub fn tiny_with(from: &str, to: &str) -> String {
    assert_eq!(
        TINY.matches(from).count(),
        1,
        "`{from}` must occur once in TINY"
    );
    TINY.replace(from, to)
}

/// Parses a JSON-lines file.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    let body = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    body.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!("{} line {}: not JSON ({e}): {l}", path.display(), i + 1)
            })
        })
        .collect()
}

pub fn read_json(path: &Path) -> Value {
    let body = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{}: not JSON ({e})", path.display()))
}

pub fn rounds_of(records: &[Value]) -> Vec<u64> {
    records
        .iter()
        .map(|r| r["round"].as_u64().expect("integer round"))
        .collect()
}

/// Field-by-field differences between two lists of records, ignoring `ignore`; at most a few
/// per file are listed.
pub fn record_diffs(label: &str, a: &[Value], b: &[Value], ignore: &[&str]) -> Vec<String> {
    let mut diffs = Vec::new();
    if a.len() != b.len() {
        diffs.push(format!("{label}: {} lines vs {} lines", a.len(), b.len()));
    }
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let (Some(x), Some(y)) = (x.as_object(), y.as_object()) else {
            diffs.push(format!("{label} line {}: not a JSON object", i + 1));
            continue;
        };
        let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            if ignore.contains(&k.as_str()) {
                continue;
            }
            if x.get(k) != y.get(k) {
                diffs.push(format!(
                    "{label} line {} `{k}`: {:?} vs {:?}",
                    i + 1,
                    x.get(k),
                    y.get(k)
                ));
            }
        }
    }
    if diffs.len() > 12 {
        let n = diffs.len() - 10;
        diffs.truncate(10);
        diffs.push(format!("{label}: … and {n} more differences"));
    }
    diffs
}

/// A safetensors file split into its header (as JSON) and its data section.
pub fn safetensors_parts(path: &Path) -> (Value, Vec<u8>) {
    let bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert!(bytes.len() >= 8, "{}: too short", path.display());
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert!(bytes.len() >= 8 + n, "{}: header overruns", path.display());
    let header: Value = serde_json::from_slice(&bytes[8..8 + n])
        .unwrap_or_else(|e| panic!("{}: header is not JSON ({e})", path.display()));
    (header, bytes[8 + n..].to_vec())
}

/// Differences between two model files: tensors, header contents, then the raw bytes.
pub fn model_diffs(a: &Path, b: &Path) -> Vec<String> {
    let (ha, da) = safetensors_parts(a);
    let (hb, db) = safetensors_parts(b);
    let mut diffs = Vec::new();
    if da != db {
        diffs.push(format!(
            "the tensor data of {} and {} differ",
            a.display(),
            b.display()
        ));
    }
    if ha != hb {
        diffs.push(format!(
            "the safetensors headers differ in content:\n{ha}\nvs\n{hb}"
        ));
    }
    if diffs.is_empty() && std::fs::read(a).unwrap() != std::fs::read(b).unwrap() {
        let (ra, rb) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        let n = u64::from_le_bytes(ra[..8].try_into().unwrap()) as usize;
        let m = u64::from_le_bytes(rb[..8].try_into().unwrap()) as usize;
        diffs.push(format!(
            "{} and {} hold the same tensors and the same header entries but are not \
             byte-identical: the header's key order differs (the file is not deterministic):\n{}\nvs\n{}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&ra[8..8 + n]),
            String::from_utf8_lossy(&rb[8..8 + m]),
        ));
    }
    diffs
}

pub fn assert_no_diffs(what: &str, diffs: &[String]) {
    assert!(diffs.is_empty(), "{what}:\n  - {}", diffs.join("\n  - "));
}

// ---------------------------------------------------------------------------------------------
// Plain HTTP/1.1 for the dashboard tests.
// ---------------------------------------------------------------------------------------------

/// host:port of a base URL `http://host:port/` or `https://host:port/`.
pub fn host(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

/// A byte stream to a dashboard: plain TCP or TLS.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Connects to the server of `url`: over TLS for `https://`, trusting only the CA in `ca`.
fn connect(url: &str, ca: Option<&Path>) -> Box<dyn Stream> {
    let tcp = TcpStream::connect(host(url)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    if !url.starts_with("https://") {
        return Box::new(tcp);
    }
    use rustls::pki_types::pem::PemObject;
    let ca = ca.expect("an https URL needs the CA that signed the server's certificate");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = host(url).rsplit_once(':').unwrap().0.to_string();
    let conn = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        rustls::pki_types::ServerName::try_from(name).unwrap(),
    )
    .unwrap();
    Box::new(rustls::StreamOwned::new(conn, tcp))
}

/// A GET over plain HTTP/1.1; returns the status and a reader positioned at the body
/// (de-chunked by [`Chunked`]).
pub fn get(url: &str, path: &str) -> (u16, Chunked) {
    get_with_ca(url, path, None)
}

/// [`get`], over TLS for an `https://` URL, trusting the CA in `ca`.
pub fn get_with_ca(url: &str, path: &str, ca: Option<&Path>) -> (u16, Chunked) {
    let mut stream = connect(url, ca);
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: */*\r\n\r\n",
        host(url)
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    let code: u16 = status.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut chunked = false;
    let mut length = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let l = line.trim().to_ascii_lowercase();
        if l.is_empty() {
            break;
        }
        chunked |= l == "transfer-encoding: chunked";
        if let Some(n) = l.strip_prefix("content-length: ") {
            length = n.parse::<usize>().ok();
        }
    }
    (
        code,
        Chunked {
            reader,
            chunked,
            left: length.unwrap_or(usize::MAX),
        },
    )
}

/// The body of an HTTP/1.1 response, chunked or not.
pub struct Chunked {
    reader: BufReader<Box<dyn Stream>>,
    chunked: bool,
    left: usize,
}

impl Read for Chunked {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.chunked && self.left == 0 {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            if line.trim().is_empty() {
                line.clear();
                self.reader.read_line(&mut line)?; // the CRLF after the previous chunk
            }
            let size = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
            if size == 0 {
                return Ok(0);
            }
            self.left = size;
        }
        if self.left == 0 {
            return Ok(0);
        }
        let n = buf.len().min(self.left);
        let got = self.reader.read(&mut buf[..n])?;
        if self.chunked || self.left != usize::MAX {
            self.left -= got;
        }
        Ok(got)
    }
}

pub fn get_json(url: &str, path: &str) -> (u16, Value) {
    get_json_with_ca(url, path, None)
}

/// [`get_json`], over TLS for an `https://` URL, trusting the CA in `ca`.
pub fn get_json_with_ca(url: &str, path: &str, ca: Option<&Path>) -> (u16, Value) {
    let (code, mut body) = get_with_ca(url, path, ca);
    let mut text = String::new();
    body.read_to_string(&mut text).unwrap();
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Reads server-sent events until `finished` (or the stream ends): (event, data) pairs.
pub fn read_events(url: &str, path: &str) -> Vec<(String, Value)> {
    read_events_with(url, path, |_, _| {})
}

/// [`read_events`], calling `seen` on each event as it arrives.
pub fn read_events_with(
    url: &str,
    path: &str,
    mut seen: impl FnMut(&str, &Value),
) -> Vec<(String, Value)> {
    let (code, body) = get(url, path);
    assert_eq!(code, 200);
    let mut events = Vec::new();
    let mut kind = String::from("message");
    for line in BufReader::new(body).lines() {
        let Ok(line) = line else { break };
        if let Some(k) = line.strip_prefix("event:") {
            kind = k.trim().to_string();
        } else if let Some(d) = line.strip_prefix("data:") {
            let data: Value = serde_json::from_str(d.trim()).unwrap();
            let done = kind == "finished";
            seen(&kind, &data);
            events.push((kind.clone(), data));
            if done {
                break;
            }
        }
    }
    events
}
