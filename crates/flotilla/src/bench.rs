//! `flotilla bench`: throughput, overhead and memory, measured in one run and printed as a
//! table. Ratios are against baselines measured in the same run (the machine's sgemm peak,
//! burn's own conv and pool ops in place of flotilla's kernels, and PyTorch when
//! `FLOTILLA_TORCH_PYTHON` names a Python with torch installed).

use anyhow::{Context, Result};
use flotilla_data::Dataset;
use flotilla_engine::alloc::ThreadPeak;
use flotilla_engine::local::{OptimizerKind, Recipe, evaluate, train};
use flotilla_engine::method::ClientData;
use flotilla_models::{ModelSpec, Net, View, flops};
use std::path::Path;
use std::time::Instant;

struct Row {
    name: String,
    value: String,
    note: String,
}

fn row(name: impl Into<String>, value: impl Into<String>, note: impl Into<String>) -> Row {
    Row {
        name: name.into(),
        value: value.into(),
        note: note.into(),
    }
}

/// Best-of-`reps` single-precision GEMM speed on all cores, FLOP/s.
pub fn sgemm_peak(n: usize, reps: usize) -> f64 {
    let a = vec![1.0f32; n * n];
    let b = vec![0.5f32; n * n];
    let mut c = vec![0.0f32; n * n];
    let threads = rayon::current_num_threads();
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        // SAFETY: the three buffers are n×n row-major and live for the whole call.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            );
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    2.0 * (n * n * n) as f64 / best
}

fn synthetic(n: usize, seed: u64) -> Dataset {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let images: Vec<u8> = (0..n * 784).map(|_| rng.random()).collect();
    let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..10)).collect();
    Dataset {
        images,
        labels,
        shape: [1, 28, 28],
        num_classes: 10,
    }
}

fn client_data(n: usize, seed: u64) -> ClientData {
    ClientData {
        train: synthetic(n, seed),
        holdout: synthetic(0, seed),
        mean: vec![0.2860],
        std: vec![0.3530],
    }
}

fn w1_recipe(batch: usize) -> Recipe {
    Recipe {
        epochs: 1,
        batch_size: batch,
        optimizer: OptimizerKind::Sgd,
        lr: 0.01,
        momentum: 0.9,
        weight_decay: 0.0,
        prox_mu: 0.0,
    }
}

/// Samples/s of W1 local training on `threads` threads, and the training heap peak.
fn w1_train(batch: usize, samples: usize, threads: usize) -> Result<(f64, u64)> {
    let spec = ModelSpec::fedavg_cnn();
    let params = Net::init_params(&spec, 0)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    pool.install(|| -> Result<(f64, u64)> {
        // Warm-up: one batch, so first-call allocations do not count against throughput.
        train(
            &spec,
            &View::full(),
            &params,
            &client_data(batch, 1),
            &w1_recipe(batch),
            0,
        )?;
        let data = client_data(samples, 2);
        let peak = ThreadPeak::start();
        let t = Instant::now();
        train(&spec, &View::full(), &params, &data, &w1_recipe(batch), 0)?;
        Ok((
            samples as f64 / t.elapsed().as_secs_f64(),
            peak.peak_above_start(),
        ))
    })
}

/// Samples/s of W1 training with one client per core, all cores busy (the simulator's mode).
fn w1_parallel(batch: usize, samples: usize) -> Result<f64> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let t = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = (0..workers)
            .map(|_| s.spawn(move || w1_train(batch, samples, 1).map(|_| ())))
            .collect();
        for h in hs {
            h.join()
                .map_err(|_| anyhow::anyhow!("bench thread panicked"))??;
        }
        Ok(())
    })?;
    // Each worker also ran one warm-up batch.
    Ok((workers * (samples + batch)) as f64 / t.elapsed().as_secs_f64())
}

/// Samples/s of W1 evaluation.
fn w1_eval(samples: usize) -> Result<f64> {
    let spec = ModelSpec::fedavg_cnn();
    let params = Net::init_params(&spec, 0)?;
    let data = synthetic(samples, 3);
    evaluate(
        &spec,
        &View::full(),
        &params,
        &synthetic(100, 4),
        &[0.2860],
        &[0.3530],
    )?;
    let t = Instant::now();
    evaluate(&spec, &View::full(), &params, &data, &[0.2860], &[0.3530])?;
    Ok(samples as f64 / t.elapsed().as_secs_f64())
}

/// PyTorch's W1 samples/s from bench/pytorch_w1.py, when a torch Python is configured.
fn torch_samples_per_s(batch: usize, samples: usize) -> Option<f64> {
    let python = std::env::var("FLOTILLA_TORCH_PYTHON").ok()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/pytorch_w1.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .args([
            "--batch",
            &batch.to_string(),
            "--samples",
            &samples.to_string(),
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("train_samples_per_s: "))
        .and_then(|v| v.trim().parse().ok())
}

fn w2_config(clients: usize, partition: &str, rounds: u64) -> String {
    format!(
        r#"
seed = 0
rounds = {rounds}
[data]
dataset = "fashion-mnist"
num_clients = {clients}
partition = {partition}
[model]
arch = "mlp"
[training]
epochs = 1
batch_size = 10
optimizer = "sgd"
lr = 0.1
[sampling]
clients_per_round = 50
[evaluation]
every = 1000
[simulation]
checkpoint_every = 0
[method]
name = "fedavg"
"#
    )
}

/// Median per-round overhead (time outside training and evaluation) of a W2 run, seconds.
fn w2_overhead(data_dir: Option<&Path>, rounds: u64) -> Result<f64> {
    let exp = flotilla_engine::Experiment::from_toml(&w2_config(
        1000,
        "{ kind = \"dirichlet\", alpha = 0.5 }",
        rounds,
    ))?;
    let data = crate::cli::load_data(&exp, data_dir)?;
    let dir = tempfile::tempdir()?;
    let (server, client) = flotilla_methods::build(&exp)?;
    let mut sim = flotilla_engine::Simulation::new(exp, data, server, client, dir.path())?;
    let mut metrics = flotilla_engine::sink::MetricsFiles::open(dir.path(), 0)?;
    sim.run(&mut [&mut metrics])?;
    let rounds: Vec<flotilla_report::RoundRecord> =
        flotilla_report::read_jsonl(&dir.path().join(flotilla_report::METRICS_FILE))?;
    // The last round also evaluates; take the median of the overheads.
    let mut o: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r.extra.get("overhead_s").and_then(|v| v.as_f64()))
        .collect();
    o.sort_by(f64::total_cmp);
    o.get(o.len() / 2).copied().context("no round ran")
}

/// Peak RSS of a separate `flotilla simulate` process with 10,000 W2 clients.
fn w2_rss_10k(data_dir: Option<&Path>) -> Result<u64> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("w2-10k.toml");
    std::fs::write(&config, w2_config(10_000, "{ kind = \"iid\" }", 2))?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["simulate", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(dir.path().join("run"));
    if let Some(d) = data_dir {
        cmd.arg("--data-dir").arg(d);
    }
    let out = cmd.output()?;
    if !out.status.success() {
        anyhow::bail!(
            "the 10,000-client run failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        dir.path().join("run/summary.json"),
    )?)?;
    summary["peak_rss_bytes"]
        .as_u64()
        .context("no peak_rss_bytes in the summary")
}

/// Runs the benchmarks and prints the table.
pub fn run(quick: bool, data_dir: Option<&Path>) -> Result<()> {
    let mut rows = Vec::new();
    let peak = sgemm_peak(if quick { 768 } else { 2048 }, if quick { 4 } else { 10 });
    rows.push(row(
        "sgemm peak, all cores",
        format!("{:.1} GFLOP/s", peak / 1e9),
        "gemm crate, best of runs: the machine ceiling",
    ));
    let per_sample = flops::training(&ModelSpec::fedavg_cnn(), &View::full(), 1);
    let ceiling = peak / per_sample;
    rows.push(row(
        "W1 ceiling",
        format!("{ceiling:.0} samples/s"),
        format!(
            "sgemm peak / {:.1} MFLOP per training sample",
            per_sample / 1e6
        ),
    ));
    let samples = if quick { 640 } else { 3200 };
    for batch in [32, 128] {
        let (one, heap) = w1_train(batch, samples, 1)?;
        rows.push(row(
            format!("W1 train, batch {batch}, 1 client on 1 core"),
            format!("{one:.0} samples/s"),
            format!(
                "{:.2} of ceiling/cores",
                one / (ceiling / rayon::current_num_threads() as f64)
            ),
        ));
        let (all, _) = w1_train(batch, samples, rayon::current_num_threads())?;
        rows.push(row(
            format!("W1 train, batch {batch}, 1 client on all cores"),
            format!("{all:.0} samples/s"),
            format!("{:.2} of ceiling", all / ceiling),
        ));
        let par = w1_parallel(batch, samples)?;
        rows.push(row(
            format!("W1 train, batch {batch}, simulator (1 client per core)"),
            format!("{par:.0} samples/s"),
            format!("{:.2} of ceiling", par / ceiling),
        ));
        rows.push(row(
            format!("W1 train heap peak, batch {batch}"),
            format!("{:.1} MiB", heap as f64 / 1048576.0),
            "counting allocator, one client",
        ));
        // The same runs on burn's own conv and pool ops (the flex reference path).
        flotilla_models::kernels::set_fast(false);
        let reference = w1_train(batch, samples, 1).and_then(|(one_ref, heap_ref)| {
            let (all_ref, _) = w1_train(batch, samples, rayon::current_num_threads())?;
            Ok((one_ref, all_ref, heap_ref))
        });
        flotilla_models::kernels::set_fast(true);
        let (one_ref, all_ref, heap_ref) = reference?;
        rows.push(row(
            format!("W1 train, batch {batch}, reference ops, 1 core"),
            format!("{one_ref:.0} samples/s"),
            format!("fast kernels/reference = {:.2}", one / one_ref),
        ));
        rows.push(row(
            format!("W1 train, batch {batch}, reference ops, all cores"),
            format!("{all_ref:.0} samples/s"),
            format!("fast kernels/reference = {:.2}", all / all_ref),
        ));
        rows.push(row(
            format!("W1 train heap peak, batch {batch}, reference ops"),
            format!("{:.1} MiB", heap_ref as f64 / 1048576.0),
            format!(
                "fast kernels/reference = {:.2}",
                heap as f64 / heap_ref.max(1) as f64
            ),
        ));
        if let Some(torch) = torch_samples_per_s(batch, samples) {
            rows.push(row(
                format!("PyTorch W1 train, batch {batch}"),
                format!("{torch:.0} samples/s"),
                format!("flotilla/PyTorch = {:.2} (all cores)", all / torch),
            ));
        }
    }
    let eval = w1_eval(if quick { 2000 } else { 10_000 })?;
    rows.push(row(
        "W1 evaluation",
        format!("{eval:.0} samples/s"),
        "chunks of 100, one thread",
    ));
    match w2_overhead(data_dir, if quick { 3 } else { 6 }) {
        Ok(o) => rows.push(row(
            "W2 round overhead (1000 clients, 50/round)",
            format!("{:.1} ms", o * 1e3),
            "median; outside training and evaluation",
        )),
        Err(e) => rows.push(row("W2 round overhead", "n/a", format!("{e:#}"))),
    }
    match w2_rss_10k(data_dir) {
        Ok(rss) => rows.push(row(
            "W2 peak RSS, 10,000 clients",
            format!("{:.0} MiB", rss as f64 / 1048576.0),
            "separate process, VmHWM",
        )),
        Err(e) => rows.push(row("W2 peak RSS, 10,000 clients", "n/a", format!("{e:#}"))),
    }
    let w0 = rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.value.len()).max().unwrap_or(0);
    println!("{:w0$}  {:>w1$}  note", "benchmark", "value");
    println!("{}", "-".repeat(w0 + w1 + 30));
    for r in rows {
        println!("{:w0$}  {:>w1$}  {}", r.name, r.value, r.note);
    }
    Ok(())
}
