//! The `flotilla` command: argument parsing, and each subcommand in a module of its own.
//! Subcommand modules use `setup` (config and data), `progress` and [`crate::run_dir`], never
//! each other.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

pub mod deploy;
mod generate;
mod inspect;
mod progress;
mod report;
pub mod setup;
mod simulate;

pub use setup::{load_config, load_data};

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
    /// Fit FedTSA's server-side generator on the config's held-out slice and write samples as
    /// IDX files for `[server_data] source = "idx"`, with PNG grids and generator.json.
    Generate(generate::GenerateArgs),
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
    Serve(deploy::ServeArgs),
    /// Take part in a networked run as a client.
    Join(deploy::JoinArgs),
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
                Some(dir) => simulate::resume_run(&dir, data_dir.as_deref(), live),
                None => {
                    let config = config.context("--config is required")?;
                    simulate::simulate(&config, out, data_dir.as_deref(), &overrides, live)
                }
            }
        }
        Command::Plan { config, overrides } => inspect::plan(&config, &overrides),
        Command::Generate(args) => generate::generate(args),
        Command::Methods => {
            print!("{}", flotilla_methods::catalog::table());
            Ok(())
        }
        Command::Evaluate {
            config,
            model,
            data_dir,
        } => inspect::evaluate(&config, &model, data_dir.as_deref()),
        Command::Partition {
            config,
            data_dir,
            json,
        } => inspect::partition(&config, data_dir.as_deref(), json),
        Command::Report { runs, out, serve } => report::report(&runs, out, serve),
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
        } => crate::bench::net::run(&clients, rounds, data_dir.as_deref()),
        Command::Serve(args) => deploy::serve(args),
        Command::Join(args) => deploy::join(args),
        Command::Certs { out, host, tokens } => deploy::certs(&out, &host, tokens),
    }
}
