//! The `flotilla` command: argument parsing and the subcommands.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use flotilla_core::safetensors_io;
use flotilla_data::{DatasetKind, Split};
use flotilla_engine::sink::{ClientStatus, Event, MetricsFiles, Sink};
use flotilla_engine::{EngineError, Experiment, Simulation};
use flotilla_report::Run;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// Federated learning for fleets of weak and mixed devices.
#[derive(Parser, Debug)]
#[command(name = "flotilla", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a simulated federated training from a TOML config.
    Simulate {
        /// Experiment config (TOML).
        #[arg(long, required_unless_present = "resume")]
        config: Option<PathBuf>,
        /// Run directory (default: runs/<config name>, numbered if taken).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Dataset folder (overrides the config, FLOTILLA_DATA and the Debian path).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Override a config key, e.g. --set rounds=5 --set training.lr=0.05.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Continue a stopped run from its last checkpoint.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["config", "out", "overrides"])]
        resume: Option<PathBuf>,
        /// Serve a live dashboard of the run at this address, e.g. 127.0.0.1:8080 (port 0: any
        /// free port; the URL is printed and written to `dashboard` in the run directory).
        /// Beyond loopback it needs FLOTILLA_DASHBOARD_TOKEN.
        #[arg(long, value_name = "ADDR")]
        dashboard: Option<std::net::SocketAddr>,
        /// Keep the dashboard up this many seconds after the run ends, to look at the result.
        #[arg(
            long,
            value_name = "SECONDS",
            default_value_t = 0,
            requires = "dashboard"
        )]
        dashboard_linger: u64,
    },
    /// Dry-run the method's plan for round 1 on the config's fleet: what each device tier is
    /// asked to train (depth, tensors and parameters sent) or why it is left out.
    Plan {
        /// Experiment config (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Override a config key, e.g. --set method.depths=[3,6,9].
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// List the methods and their `[method]` options with defaults.
    Methods,
    /// Evaluate a saved model on the test set.
    Evaluate {
        /// Experiment config naming the dataset.
        #[arg(long)]
        config: PathBuf,
        /// Model file (model.safetensors of a run).
        #[arg(long)]
        model: PathBuf,
        /// Dataset folder.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Print how a config partitions the data among clients.
    Partition {
        /// Experiment config.
        #[arg(long)]
        config: PathBuf,
        /// Dataset folder.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Re-render plots and print a summary table; several runs side by side.
    Report {
        /// Run directories.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Where comparison plots of several runs go (default: `comparison/` inside the first
        /// run's directory, never the working directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also serve the runs' dashboards at this address (e.g. 127.0.0.1:8080), side by side,
        /// until interrupted. Beyond loopback it needs FLOTILLA_DASHBOARD_TOKEN.
        #[arg(long, value_name = "ADDR")]
        serve: Option<std::net::SocketAddr>,
    },
    /// Measure training throughput, round overhead and memory; prints a table.
    Bench {
        /// Shorter measurements (less precise).
        #[arg(long)]
        quick: bool,
        /// Dataset folder for the W2 simulations.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Internal: run the W1 process-RSS measurement at this batch size and exit.
        #[arg(long, hide = true)]
        w1_process: Option<usize>,
    },
    /// Load benchmark of the network deployment: a server and N echo clients on loopback.
    BenchNet {
        /// Client counts to measure, e.g. 50,100,200.
        #[arg(long, value_delimiter = ',', default_values_t = [10usize, 50, 200])]
        clients: Vec<usize>,
        /// Rounds per client count (the first is not reported).
        #[arg(long, default_value_t = 4)]
        rounds: u64,
        /// Dataset folder for the server's test set.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Run a federated training over the network: the server (see `join` for clients).
    Serve(crate::deploy::ServeArgs),
    /// Take part in a networked run as a client.
    Join(crate::deploy::JoinArgs),
    /// Make a local CA, server and client certificates and bearer tokens for `serve`/`join`.
    Certs {
        /// Folder to write into.
        #[arg(long)]
        out: PathBuf,
        /// Host names or IP addresses the server certificate is valid for.
        #[arg(long, default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        host: Vec<String>,
        /// Number of client tokens.
        #[arg(long, default_value_t = 10)]
        tokens: usize,
    },
}

/// Runs the command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Simulate {
            config,
            out,
            data_dir,
            overrides,
            resume,
            dashboard,
            dashboard_linger,
        } => {
            let live = dashboard.map(|addr| (addr, dashboard_linger));
            match resume {
                Some(dir) => resume_run(&dir, data_dir.as_deref(), live),
                None => {
                    let config = config.context("--config is required")?;
                    simulate(&config, out, data_dir.as_deref(), &overrides, live)
                }
            }
        }
        Command::Plan { config, overrides } => plan(&config, &overrides),
        Command::Methods => {
            print!("{}", flotilla_methods::catalog::table());
            Ok(())
        }
        Command::Evaluate {
            config,
            model,
            data_dir,
        } => evaluate(&config, &model, data_dir.as_deref()),
        Command::Partition {
            config,
            data_dir,
            json,
        } => partition(&config, data_dir.as_deref(), json),
        Command::Report { runs, out, serve } => report(&runs, out, serve),
        Command::Bench {
            w1_process: Some(batch),
            ..
        } => crate::bench::w1_process(batch),
        Command::Bench {
            quick, data_dir, ..
        } => crate::bench::run(quick, data_dir.as_deref()),
        Command::BenchNet {
            clients,
            rounds,
            data_dir,
        } => crate::bench_net::run(&clients, rounds, data_dir.as_deref()),
        Command::Serve(args) => crate::deploy::serve(args),
        Command::Join(args) => crate::deploy::join(args),
        Command::Certs { out, host, tokens } => crate::deploy::certs(&out, &host, tokens),
    }
}

/// Reads and checks a config file, applying overrides.
pub fn load_config(path: &Path, overrides: &[String]) -> Result<Experiment> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let exp = Experiment::with_overrides(&text, overrides)
        .with_context(|| format!("in {}", path.display()))?;
    Ok(exp)
}

/// Loads the dataset the config names, from the resolved folder.
pub fn load_data(exp: &Experiment, cli_dir: Option<&Path>) -> Result<Split> {
    let kind: DatasetKind = exp.data.dataset;
    let dir = flotilla_data::resolve_data_dir(cli_dir, exp.data.dir.as_deref(), kind);
    Ok(flotilla_data::load(kind, &dir)?)
}

pub(crate) fn fresh_run_dir(config: &Path) -> PathBuf {
    let stem = config.file_stem().and_then(|s| s.to_str()).unwrap_or("run");
    let base = PathBuf::from("runs").join(stem);
    if !base.exists() {
        return base;
    }
    (2..)
        .map(|i| PathBuf::from("runs").join(format!("{stem}-{i}")))
        .find(|p| !p.exists())
        .expect("unbounded")
}

fn simulate(
    config: &Path,
    out: Option<PathBuf>,
    data_dir: Option<&Path>,
    overrides: &[String],
    dashboard: Option<(std::net::SocketAddr, u64)>,
) -> Result<()> {
    let exp = load_config(config, overrides)?;
    let data = load_data(&exp, data_dir)?;
    let dir = out.unwrap_or_else(|| fresh_run_dir(config));
    if dir.join(flotilla_report::METRICS_FILE).exists() {
        bail!(
            "{} already holds a run; choose another --out, or continue it with --resume {}",
            dir.display(),
            dir.display()
        );
    }
    let resolved = toml::to_string(&exp).context("cannot serialise the config")?;
    let config_json = serde_json::to_value(&exp)?;
    let (server, client) = flotilla_methods::build(&exp)?;
    // Set up (and refuse an impossible fleet or dashboard) before anything is written.
    let mut sim = Simulation::new(exp, data, server, client, &dir)?;
    let dashboard = start_dashboard(dashboard, &dir, config_json)?;
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the run directory {}", dir.display()))?;
    safetensors_io::write_atomic(&dir.join("config.toml"), resolved.as_bytes())?;
    let metrics = MetricsFiles::open(&dir, 0)?;
    announce_dashboard(dashboard.as_ref(), &dir)?;
    finish(&mut sim, metrics, &dir, dashboard)
}

fn resume_run(
    dir: &Path,
    data_dir: Option<&Path>,
    dashboard: Option<(std::net::SocketAddr, u64)>,
) -> Result<()> {
    let config = dir.join("config.toml");
    let exp = load_config(&config, &[])?;
    let data = load_data(&exp, data_dir)?;
    let config_json = serde_json::to_value(&exp)?;
    let (server, client) = flotilla_methods::build(&exp)?;
    let mut sim = Simulation::new(exp, data, server, client, dir)?;
    let round = sim.restore_checkpoint()?;
    tracing::info!(round, "resuming after the last checkpoint");
    let dashboard = start_dashboard(dashboard, dir, config_json)?;
    let metrics = MetricsFiles::open(dir, round)?;
    announce_dashboard(dashboard.as_ref(), dir)?;
    finish(&mut sim, metrics, dir, dashboard)
}

/// Starts the dashboard of the run in `dir` when an address is given.
fn start_dashboard(
    live: Option<(std::net::SocketAddr, u64)>,
    dir: &Path,
    config: serde_json::Value,
) -> Result<Option<(crate::dashboard::Dashboard, u64)>> {
    let Some((addr, linger)) = live else {
        return Ok(None);
    };
    let name = flotilla_report::run_name(dir);
    let d = crate::dashboard::Dashboard::start(addr, &name, config, None)?;
    Ok(Some((d, linger)))
}

/// Says where the dashboard is: on stderr and in the run directory's `dashboard` file.
fn announce_dashboard(
    dashboard: Option<&(crate::dashboard::Dashboard, u64)>,
    dir: &Path,
) -> Result<()> {
    if let Some((d, _)) = dashboard {
        let url = format!("http://{}/\n", d.addr());
        safetensors_io::write_atomic(&dir.join("dashboard"), url.as_bytes())?;
        eprintln!("dashboard: {}", d.url());
    }
    Ok(())
}

/// Runs the simulation with the metrics files, a progress display and the dashboard if there
/// is one, then writes the model, the summary and the plots.
fn finish(
    sim: &mut Simulation,
    mut metrics: MetricsFiles,
    dir: &Path,
    dashboard: Option<(crate::dashboard::Dashboard, u64)>,
) -> Result<()> {
    let mut progress = Progress::new();
    let mut live = dashboard.as_ref().map(|(d, _)| d.sink());
    let run = match live.as_mut() {
        Some(live) => sim.run(&mut [&mut metrics, &mut progress, live]),
        None => sim.run(&mut [&mut metrics, &mut progress]),
    };
    progress.done();
    let summary = match run {
        Ok(s) => s,
        Err(e) => {
            if let Some(live) = &live {
                live.failed(&e.to_string());
            }
            return Err(e.into());
        }
    };
    write_outputs(sim.server(), &summary, dir)?;
    if let Some((d, linger)) = dashboard
        && linger > 0
    {
        eprintln!("dashboard: {} stays up for {linger} s", d.url());
        std::thread::sleep(std::time::Duration::from_secs(linger));
    }
    Ok(())
}

/// The factors of a model with factored layers, written beside its dense model.
pub const FACTORED_MODEL_FILE: &str = "model-factors.safetensors";

/// Writes the final model, summary.json and the plots of a finished run, and prints where.
pub(crate) fn write_outputs(
    server: &dyn flotilla_engine::ServerHalf,
    summary: &serde_json::Value,
    dir: &Path,
) -> Result<()> {
    if let Some(model) = server.eval_models().into_iter().next() {
        let save = |file: &str, spec: &flotilla_models::ModelSpec, params| -> Result<()> {
            let meta = HashMap::from([("model".to_string(), serde_json::to_string(spec)?)]);
            safetensors_io::save(&dir.join(file), params, Some(meta))?;
            Ok(())
        };
        if model.spec.ranks.is_empty() {
            save("model.safetensors", &model.spec, &model.params)?;
        } else {
            // Factored layers (FeDLRT): model.safetensors holds the dense model, W = U S Vᵀ
            // multiplied out, so that the unfactored PyTorch module loads it with strict=True;
            // the factors as trained go beside it.
            let dense = flotilla_models::dense_export(&model.spec, &model.params)?;
            let plain = flotilla_models::ModelSpec {
                ranks: Default::default(),
                ..model.spec.clone()
            };
            save("model.safetensors", &plain, &dense)?;
            save(FACTORED_MODEL_FILE, &model.spec, &model.params)?;
        }
    }
    safetensors_io::write_atomic(
        &dir.join(flotilla_report::SUMMARY_FILE),
        serde_json::to_string_pretty(summary)?.as_bytes(),
    )?;
    let run = Run::load(dir)?;
    let plots = flotilla_report::render_plots(&run)?;
    println!(
        "{}",
        flotilla_report::summary_table(std::slice::from_ref(&run))
    );
    println!("run directory: {}", dir.display());
    println!("model:         {}", dir.join("model.safetensors").display());
    for p in plots {
        println!("plot:          {}", p.display());
    }
    Ok(())
}

/// Progress: a bar on a terminal, plain log lines otherwise.
pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    pub(crate) fn new() -> Self {
        Self { bar: None }
    }

    pub(crate) fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

impl Sink for Progress {
    fn on_event(&mut self, event: &Event<'_>) -> Result<(), EngineError> {
        match event {
            Event::Started {
                first_round,
                rounds,
            } => {
                if std::io::stderr().is_terminal() {
                    let bar = indicatif::ProgressBar::new(*rounds);
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{spinner} round {pos}/{len} [{bar:30}] {msg} ETA {eta}",
                        )
                        .expect("valid template")
                        .progress_chars("=> "),
                    );
                    bar.set_position(first_round - 1);
                    self.bar = Some(bar);
                } else {
                    tracing::info!(first_round, rounds, "run started");
                }
            }
            Event::Round { round, clients } => {
                let acc = round
                    .test_accuracy
                    .map_or("-".to_string(), |a| format!("{:.2}%", 100.0 * a));
                match &self.bar {
                    Some(b) => {
                        b.set_message(format!("acc {acc}"));
                        b.set_position(round.round);
                    }
                    None => tracing::info!(
                        round = round.round,
                        accuracy = %acc,
                        clients = round.clients,
                        skipped = clients.iter().filter(|c| c.status != ClientStatus::Ok).count(),
                        wall_s = format!("{:.1}", round.wall_time_s),
                        "round finished"
                    ),
                }
            }
            Event::Checkpoint { round } => tracing::debug!(round, "checkpoint written"),
            Event::Finished { .. } => {}
        }
        Ok(())
    }
}

fn plan(config: &Path, overrides: &[String]) -> Result<()> {
    use flotilla_engine::{Assignment, ClientInfo, PhaseCtx};
    let exp = load_config(config, overrides)?;
    let (mut server, _) = flotilla_methods::build(&exp)?;
    let profiles = flotilla_engine::sim::build_fleet(&exp)?;
    let infos: Vec<ClientInfo> = profiles
        .into_iter()
        .enumerate()
        .map(|(i, profile)| ClientInfo {
            id: i as u64,
            profile,
            num_examples: 1,
        })
        .collect();
    server.observe(&infos);
    let ctx = PhaseCtx {
        round: 1,
        phase: 0,
        seed: exp.seed,
    };
    let blocks = exp.model_spec().num_blocks();
    println!(
        "{:<14} {:>7} {:>10} {:>10} {:>12} {:>10}  plan of `{}` for round 1",
        "tier",
        "devices",
        "memory MiB",
        "est. MiB",
        "MFLOP/sample",
        "MB sent",
        server.name()
    );
    let mut tiers: Vec<(String, Vec<&ClientInfo>)> = Vec::new();
    for info in &infos {
        match tiers.iter_mut().find(|(t, _)| *t == info.profile.tier) {
            Some((_, v)) => v.push(info),
            None => tiers.push((info.profile.tier.clone(), vec![info])),
        }
    }
    tiers.sort_by_key(|(_, m)| m[0].profile.memory_bytes);
    for (tier, members) in &tiers {
        let first = members[0];
        // The estimate the method planned by, training FLOPs per sample and the task's bytes.
        let mut figures = ("-".to_string(), "-".to_string(), "-".to_string());
        let decision = match server.plan(&ctx, std::slice::from_ref(first))?.pop() {
            Some(Assignment::Run(task)) => {
                let cost = server.task_cost(&task);
                let bytes = task.encode(&Default::default())?.len();
                figures = (
                    format!("{:.1}", cost.memory_bytes as f64 / 1048576.0),
                    format!("{:.1}", cost.flops_per_sample / 1e6),
                    format!("{:.2}", bytes as f64 / 1e6),
                );
                let depth = match task.view.prefix_depth(blocks) {
                    Some(d) if blocks > 0 => format!("depth {d}/{blocks}, "),
                    _ => String::new(),
                };
                let options = if task.options.is_null() {
                    String::new()
                } else {
                    format!(", options {}", task.options)
                };
                format!(
                    "train {depth}{} tensors, {} parameters sent{options}",
                    task.params.len(),
                    task.params.numel()
                )
            }
            Some(Assignment::Skip(reason)) => format!("skipped: {reason}"),
            None => "no assignment".into(),
        };
        let budget = if first.profile.memory_bytes
            == flotilla_core::device::DeviceProfile::unlimited().memory_bytes
        {
            "unlimited".to_string()
        } else {
            format!("{:.1}", first.profile.memory_bytes as f64 / 1048576.0)
        };
        println!(
            "{tier:<14} {:>7} {budget:>10} {:>10} {:>12} {:>10}  {decision}",
            members.len(),
            figures.0,
            figures.1,
            figures.2
        );
    }
    Ok(())
}

fn evaluate(config: &Path, model: &Path, data_dir: Option<&Path>) -> Result<()> {
    let exp = load_config(config, &[])?;
    let data = load_data(&exp, data_dir)?;
    let (params, meta) = safetensors_io::load(model)?;
    let spec = match meta.get("model") {
        Some(json) => serde_json::from_str(json).with_context(|| {
            format!(
                "{}: the `model` metadata is not a model spec",
                model.display()
            )
        })?,
        None => exp.model_spec(),
    };
    let (mean, std) = exp.data.dataset.normalization();
    let test = match exp.data.test_limit {
        Some(n) => data.test.take_first(n),
        None => data.test,
    };
    let (acc, loss) = flotilla_engine::local::evaluate(
        &spec,
        &flotilla_models::View::full(),
        &params,
        &test,
        &mean,
        &std,
    )?;
    println!("test_accuracy: {acc:.4}");
    println!("test_loss:     {loss:.4}");
    println!("samples:       {}", test.len());
    Ok(())
}

fn partition(config: &Path, data_dir: Option<&Path>, json: bool) -> Result<()> {
    let exp = load_config(config, &[])?;
    let data = load_data(&exp, data_dir)?;
    let train = match exp.data.train_limit {
        Some(n) => data.train.take_first(n),
        None => data.train,
    };
    // The simulator's partition, which leaves out a server holdout slice.
    let parts = flotilla_engine::sim::partition_clients(&exp, &train)?;
    let summary = flotilla_data::summarize(&parts, &train.labels, train.num_classes);
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "{} over {} clients ({})",
            exp.data.dataset, exp.data.num_clients, exp.data.partition
        );
        let held = flotilla_engine::server_data::holdout_indices(&exp, train.len())?.len();
        if held > 0 {
            println!("{held} training samples held out for the server ([server_data])");
        }
        println!("{summary}");
    }
    Ok(())
}

fn report(
    dirs: &[PathBuf],
    out: Option<PathBuf>,
    serve: Option<std::net::SocketAddr>,
) -> Result<()> {
    let runs = dirs
        .iter()
        .map(|d| Run::load(d))
        .collect::<Result<Vec<_>, _>>()?;
    for run in &runs {
        for p in flotilla_report::render_plots(run)? {
            println!("plot: {}", p.display());
        }
    }
    if runs.len() > 1 {
        let out = out.unwrap_or_else(|| dirs[0].join("comparison"));
        std::fs::create_dir_all(&out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        for p in flotilla_report::render_comparison(&runs, &out)? {
            println!("plot: {}", p.display());
        }
    }
    println!("{}", flotilla_report::summary_table(&runs));
    if let Some(addr) = serve {
        let states = runs
            .iter()
            .map(finished_run_state)
            .collect::<Result<Vec<_>>>()?;
        let (_, url) = crate::dashboard::Dashboard::serve_finished(addr, states)?;
        println!("dashboard: {url} (Ctrl-C to stop)");
        loop {
            std::thread::park();
        }
    }
    Ok(())
}

/// A finished run as the dashboard's `/api/run` shows it: its config (from config.toml when
/// the run has one), every round, the last round's clients and the summary.
fn finished_run_state(run: &Run) -> Result<serde_json::Value> {
    let config_path = run.dir.join("config.toml");
    let config = if config_path.exists() {
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?;
        let value: toml::Value = toml::from_str(&text)
            .with_context(|| format!("{} is not valid TOML", config_path.display()))?;
        serde_json::to_value(value)?
    } else {
        serde_json::Value::Null
    };
    let last = run.rounds.last().map(|r| r.round);
    let clients: Vec<&flotilla_report::ClientRecord> = run
        .clients
        .iter()
        .filter(|c| Some(c.round) == last)
        .collect();
    let method = run
        .summary
        .get("method")
        .cloned()
        .unwrap_or_else(|| config["method"]["name"].clone());
    Ok(serde_json::json!({
        "name": run.name,
        "method": method,
        "rounds_total": config.get("rounds").cloned().unwrap_or_else(|| last.into()),
        "config": config,
        "status": if run.summary.is_empty() { "stopped" } else { "finished" },
        "rounds": run.rounds,
        "clients": clients,
        "summary": run.summary,
    }))
}
