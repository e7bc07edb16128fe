//! `flotilla bench`: throughput, overhead and memory, measured in one run and printed as a
//! table. Ratios are against baselines measured in the same run (the machine's sgemm peak,
//! burn's own ops in place of flotilla's kernels, and PyTorch when
//! `FLOTILLA_TORCH_PYTHON` names a Python with torch installed).

pub mod net;

use crate::workloads::{client_data, synthetic_images, w1_recipe};
use anyhow::{Context, Result};
use flotilla_engine::alloc::ThreadPeak;
use flotilla_engine::local::{CrossEntropy, TrainJob, evaluate};
use flotilla_models::kernels::{GemmKernels, gemm_kernels, set_gemm_kernels, square_matmul};
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

/// Best-of-`reps` single-precision GEMM speed on all cores with the given micro-kernels, FLOP/s.
pub fn sgemm_peak(n: usize, reps: usize, kernels: GemmKernels) -> f64 {
    let a = vec![1.0f32; n * n];
    let b = vec![0.5f32; n * n];
    let mut c = vec![0.0f32; n * n];
    let threads = rayon::current_num_threads();
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        square_matmul(n, &a, &b, &mut c, kernels, threads);
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    2.0 * (n * n * n) as f64 / best
}

/// Timed runs per throughput figure; the best is reported, so that a moment of contention on
/// a shared machine does not count as the code's speed (the same rule for PyTorch's script).
const RUNS: usize = 3;

/// Best samples/s of W1 local training on `threads` threads over `runs` runs, and the
/// training heap peak (the heap counts every thread of the client).
fn w1_train(batch: usize, samples: usize, threads: usize) -> Result<(f64, u64)> {
    w1_train_runs(batch, samples, threads, RUNS)
}

fn w1_train_runs(batch: usize, samples: usize, threads: usize, runs: usize) -> Result<(f64, u64)> {
    let spec = ModelSpec::fedavg_cnn();
    let params = Net::init_params(&spec, 0)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    pool.install(|| -> Result<(f64, u64)> {
        let (view, recipe) = (View::full(), w1_recipe(batch));
        let ce = CrossEntropy::under(&view);
        // Warm-up: one batch, so first-call allocations do not count against throughput.
        let warm = client_data(batch, 1);
        TrainJob::new(&spec, &view, &params, &warm, &recipe, &ce).train()?;
        let data = client_data(samples, 2);
        let job = TrainJob::new(&spec, &view, &params, &data, &recipe, &ce);
        let (mut best, mut heap) = (0f64, 0);
        for _ in 0..runs {
            let peak = ThreadPeak::start();
            let t = Instant::now();
            job.train()?;
            best = best.max(samples as f64 / t.elapsed().as_secs_f64());
            heap = heap.max(peak.peak_above_start());
        }
        Ok((best, heap))
    })
}

/// Samples/s of W1 training with one client per core, all cores busy (the simulator's mode),
/// best of [`RUNS`].
fn w1_parallel(batch: usize, samples: usize) -> Result<f64> {
    (0..RUNS).try_fold(0f64, |best, _| {
        Ok(best.max(w1_parallel_once(batch, samples)?))
    })
}

fn w1_parallel_once(batch: usize, samples: usize) -> Result<f64> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let t = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let hs: Vec<_> = (0..workers)
            .map(|_| s.spawn(move || w1_train_runs(batch, samples, 1, 1).map(|_| ())))
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

/// Samples/s of W1 training through `flotilla simulate`'s own path: a `Simulation` of one
/// round with one client per core, `per_client` images each (Fashion-MNIST when installed,
/// else synthetic images), W1's model and recipe; training examples over the round's
/// `train_wall_s`, best of [`RUNS`]. What users run, so the bench cannot be fast while they
/// are slow.
fn w1_simulate(batch: usize, per_client: usize, data_dir: Option<&Path>) -> Result<f64> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let config = format!(
        r#"
seed = 0
rounds = 1
[data]
dataset = "fashion-mnist"
num_clients = {workers}
partition = {{ kind = "iid" }}
train_limit = {train}
test_limit = 100
[model]
arch = "cnn"
[training]
epochs = 1
batch_size = {batch}
optimizer = "sgd"
lr = 0.01
momentum = 0.9
[sampling]
clients_per_round = {workers}
[simulation]
workers = {workers}
checkpoint_every = 0
[method]
name = "fedavg"
"#,
        train = workers * per_client
    );
    let exp = flotilla_engine::Experiment::from_toml(&config)?;
    let data = match crate::cli::setup::load_data(&exp, data_dir) {
        Ok(d) => d,
        Err(_) => flotilla_data::Split {
            train: synthetic_images(workers * per_client, 5),
            test: synthetic_images(100, 6),
        },
    };
    (0..RUNS).try_fold(0f64, |best, _| {
        let dir = tempfile::tempdir()?;
        let (server, client) = flotilla_methods::build(&exp)?;
        let mut sim = flotilla_engine::Simulation::new(
            exp.clone(),
            data.clone(),
            server,
            client,
            dir.path(),
        )?;
        let mut metrics = flotilla_engine::sink::MetricsFiles::open(dir.path(), 0)?;
        sim.run(&mut [&mut metrics])?;
        let rounds: Vec<flotilla_report::RoundRecord> =
            flotilla_report::read_jsonl(&dir.path().join(flotilla_report::METRICS_FILE))?;
        let train_s = rounds
            .first()
            .and_then(|r| r.extra.get("train_wall_s"))
            .and_then(|v| v.as_f64())
            .context("no train_wall_s in the round's metrics")?;
        Ok(best.max((workers * per_client) as f64 / train_s))
    })
}

/// Samples/s of W1 inference on batches of 1,000 (the forward pass alone, all cores).
fn w1_inference(samples: usize) -> Result<f64> {
    let spec = ModelSpec::fedavg_cnn();
    let params = Net::init_params(&spec, 0)?;
    let device = flotilla_models::compute_device();
    let net = Net::from_params(&spec, &params, &device)?;
    let data = synthetic_images(samples, 3);
    let batch = 1000.min(samples);
    let input = |i: usize| -> Result<_> {
        let mut pixels = Vec::new();
        let idx: Vec<usize> = (i..i + batch).collect();
        data.try_normalized_batch(&idx, &[0.2860], &[0.3530], &mut pixels)?;
        Ok(Net::input(pixels, batch, spec.input, &device))
    };
    // Warm-up: first-call allocations do not count.
    std::hint::black_box(net.forward(input(0)?, &View::full()).into_data());
    let mut best = 0f64;
    for _ in 0..RUNS {
        let t = Instant::now();
        for i in (0..samples - samples % batch).step_by(batch) {
            std::hint::black_box(net.forward(input(i)?, &View::full()).into_data());
        }
        best = best.max((samples - samples % batch) as f64 / t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Samples/s of W1 evaluation through the engine (accuracy and loss, chunks of 100).
fn w1_eval(samples: usize) -> Result<f64> {
    let spec = ModelSpec::fedavg_cnn();
    let params = Net::init_params(&spec, 0)?;
    let data = synthetic_images(samples, 3);
    evaluate(
        &spec,
        &View::full(),
        &params,
        &synthetic_images(100, 4),
        &[0.2860],
        &[0.3530],
    )?;
    let mut best = 0f64;
    for _ in 0..RUNS {
        let t = Instant::now();
        evaluate(&spec, &View::full(), &params, &data, &[0.2860], &[0.3530])?;
        best = best.max(samples as f64 / t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// What bench/pytorch_w1.py measured.
struct Torch {
    train: f64,
    eval: f64,
    rss: u64,
    /// torch.matmul of two 2048×2048 matrices on the same threads (MKL or OpenBLAS): a second
    /// measure of the machine's peak, independent of the gemm crate.
    matmul: f64,
}

impl Torch {
    /// The best of two measurements: fastest speeds, largest RSS.
    fn best(self, other: Torch) -> Torch {
        Torch {
            train: self.train.max(other.train),
            eval: self.eval.max(other.eval),
            rss: self.rss.max(other.rss),
            matmul: self.matmul.max(other.matmul),
        }
    }
}

/// PyTorch's W1 figures from bench/pytorch_w1.py (best of `runs` timed runs), when a torch
/// Python is configured. With `avx2_only`, torch's own kernels, oneDNN and MKL are held to
/// AVX2 through their environment switches: the comparison an AVX2 machine would make,
/// measured on this one.
fn torch_w1(batch: usize, samples: usize, runs: usize, avx2_only: bool) -> Option<Torch> {
    let python = std::env::var("FLOTILLA_TORCH_PYTHON").ok()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/pytorch_w1.py");
    let mut command = std::process::Command::new(python);
    if avx2_only {
        command.envs([
            ("ATEN_CPU_CAPABILITY", "avx2"),
            ("ONEDNN_MAX_CPU_ISA", "AVX2"),
            ("DNNL_MAX_CPU_ISA", "AVX2"),
            ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
        ]);
    }
    let out = command
        .arg(script)
        .args([
            "--batch",
            &batch.to_string(),
            "--samples",
            &samples.to_string(),
            "--runs",
            &runs.to_string(),
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Some(Torch {
        train: field("train_samples_per_s: ")?,
        eval: field("eval_samples_per_s: ")?,
        rss: field("peak_rss_bytes: ")? as u64,
        matmul: field("matmul_flops_per_s: ")?,
    })
}

/// The work of bench/pytorch_w1.py in a process of its own: W1 training on all cores, then
/// inference over 10,000 images in batches of 1,000. Prints the process's peak RSS.
pub fn w1_process(batch: usize) -> Result<()> {
    w1_train_runs(batch, 3200, rayon::current_num_threads(), 1)?;
    w1_inference(10_000)?;
    let rss = flotilla_engine::driver::peak_rss_bytes().context("VmHWM is not available")?;
    println!("peak_rss_bytes: {rss}");
    Ok(())
}

/// Peak RSS of [`w1_process`] run as a separate `flotilla bench` process.
fn w1_process_rss(batch: usize) -> Result<u64> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", "--w1-process", &batch.to_string()])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("peak_rss_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| {
            format!(
                "the W1 process printed no peak RSS: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            )
        })
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
    let data = crate::cli::setup::load_data(&exp, data_dir)?;
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
    // The GEMM peak with every kernel set this CPU runs; the ceiling is the best of them.
    let chosen = gemm_kernels();
    let (n, reps) = if quick { (768, 4) } else { (2048, 10) };
    let mut peak = 0f64;
    for kernels in GemmKernels::all_available() {
        let p = sgemm_peak(n, reps, kernels);
        peak = peak.max(p);
        rows.push(row(
            format!("sgemm peak, all cores, {} kernels", kernels.name()),
            format!("{:.1} GFLOP/s", p / 1e9),
            match (kernels == chosen, kernels) {
                (true, _) => "gemm crate micro-kernels; the set flotilla uses on this CPU",
                (false, GemmKernels::Library) => "the gemm crate's own dispatch",
                (false, _) => "gemm crate micro-kernels",
            },
        ));
    }
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
    let mut torch_eval = None;
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
        // One client on all cores, taking turns with PyTorch's script (when configured) so
        // that both meet the same moments of a shared machine; the best run of each.
        let (mut all, mut heap_all, mut torch) = (0f64, 0u64, None::<Torch>);
        for _ in 0..RUNS {
            let (a, h) = w1_train_runs(batch, samples, rayon::current_num_threads(), 1)?;
            (all, heap_all) = (all.max(a), heap_all.max(h));
            if let Some(t) = torch_w1(batch, samples, 1, false) {
                torch = Some(match torch {
                    Some(best) => best.best(t),
                    None => t,
                });
            }
        }
        rows.push(row(
            format!("W1 train, batch {batch}, 1 client on all cores"),
            format!("{all:.0} samples/s"),
            format!("{:.2} of ceiling, {} kernels", all / ceiling, chosen.name()),
        ));
        // The same with each other kernel set: the evidence for the per-CPU choice. The AVX2
        // set takes turns with PyTorch held to AVX2, as an AVX2 machine would compare them.
        for other in GemmKernels::all_available() {
            if other == chosen || other == GemmKernels::Library {
                continue;
            }
            let (mut o, mut torch_other) = (0f64, None::<Torch>);
            for _ in 0..RUNS {
                set_gemm_kernels(other).map_err(anyhow::Error::msg)?;
                let measured = w1_train_runs(batch, samples, rayon::current_num_threads(), 1);
                set_gemm_kernels(chosen).map_err(anyhow::Error::msg)?;
                o = o.max(measured?.0);
                if other == GemmKernels::Avx2
                    && let Some(t) = torch_w1(batch, samples, 1, true)
                {
                    torch_other = Some(match torch_other {
                        Some(best) => best.best(t),
                        None => t,
                    });
                }
            }
            rows.push(row(
                format!(
                    "W1 train, batch {batch}, 1 client on all cores, {} kernels",
                    other.name()
                ),
                format!("{o:.0} samples/s"),
                format!(
                    "{} kernels/{} = {:.2}",
                    chosen.name(),
                    other.name(),
                    all / o
                ),
            ));
            if let Some(t) = torch_other {
                rows.push(row(
                    format!("PyTorch W1 train, batch {batch}, held to AVX2"),
                    format!("{:.0} samples/s", t.train),
                    format!(
                        "flotilla {} kernels/PyTorch AVX2 = {:.2} (all cores)",
                        other.name(),
                        o / t.train
                    ),
                ));
            }
        }
        let par = w1_parallel(batch, samples)?;
        rows.push(row(
            format!("W1 train, batch {batch}, simulator (1 client per core)"),
            format!("{par:.0} samples/s"),
            format!("{:.2} of ceiling", par / ceiling),
        ));
        let real = w1_simulate(batch, if quick { 640 } else { 5000 }, data_dir)?;
        rows.push(row(
            format!("W1 train, batch {batch}, `simulate` path (1 client per core)"),
            format!("{real:.0} samples/s"),
            format!("simulate path/simulator row = {:.2}", real / par),
        ));
        rows.push(row(
            format!("W1 train heap peak, batch {batch}"),
            format!("{:.1} MiB", heap as f64 / 1048576.0),
            "counting allocator, one client on 1 core",
        ));
        rows.push(row(
            format!("W1 train heap peak, batch {batch}, all cores"),
            format!("{:.1} MiB", heap_all as f64 / 1048576.0),
            "one client, a micro-batch (and a gradient buffer) per core",
        ));
        // The same runs on burn's own conv, ReLU, pool and linear ops (the flex reference path).
        flotilla_models::kernels::use_flotilla_kernels(false);
        let reference = w1_train(batch, samples, 1).and_then(|(one_ref, heap_ref)| {
            let (all_ref, _) = w1_train(batch, samples, rayon::current_num_threads())?;
            Ok((one_ref, all_ref, heap_ref))
        });
        flotilla_models::kernels::use_flotilla_kernels(true);
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
        let rss = w1_process_rss(batch);
        match &rss {
            Ok(rss) => rows.push(row(
                format!("W1 process peak RSS, batch {batch}"),
                format!("{:.0} MiB", *rss as f64 / 1048576.0),
                "separate process: training on all cores, then inference as PyTorch's script",
            )),
            Err(e) => rows.push(row("W1 process peak RSS", "n/a", format!("{e:#}"))),
        }
        if let Some(torch) = torch {
            if batch == 32 {
                rows.push(row(
                    "PyTorch matmul peak, 2048×2048",
                    format!("{:.1} GFLOP/s", torch.matmul / 1e9),
                    format!(
                        "the machine's peak by torch's BLAS; gemm crate best/this = {:.2}",
                        peak / torch.matmul
                    ),
                ));
            }
            rows.push(row(
                format!("PyTorch W1 train, batch {batch}"),
                format!("{:.0} samples/s", torch.train),
                format!("flotilla/PyTorch = {:.2} (all cores)", all / torch.train),
            ));
            rows.push(row(
                format!("PyTorch process peak RSS, batch {batch}"),
                format!("{:.0} MiB", torch.rss as f64 / 1048576.0),
                match &rss {
                    Ok(rss) => format!("flotilla/PyTorch = {:.2}", *rss as f64 / torch.rss as f64),
                    Err(_) => String::new(),
                },
            ));
            torch_eval.get_or_insert(torch.eval);
        }
    }
    let inference = w1_inference(if quick { 2000 } else { 10_000 })?;
    rows.push(row(
        "W1 inference, batch 1000",
        format!("{inference:.0} samples/s"),
        "forward pass, all cores",
    ));
    let eval = w1_eval(if quick { 2000 } else { 10_000 })?;
    rows.push(row(
        "W1 evaluation, test set of 10,000",
        format!("{eval:.0} samples/s"),
        "engine's evaluate: chunks of 100, all cores, with loss and accuracy",
    ));
    if let Some(torch) = torch_eval {
        rows.push(row(
            "PyTorch W1 inference, batch 1000",
            format!("{torch:.0} samples/s"),
            format!(
                "flotilla/PyTorch = {:.2} (batch 1000), {:.2} (evaluation)",
                inference / torch,
                eval / torch
            ),
        ));
    }
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
