//! `flotilla simulate`: a run of virtual clients on this machine, new or resumed, with its
//! progress display and, if asked, its live dashboard.

use super::progress::Progress;
use super::setup::{load_config, load_data};
use crate::run_dir::RunDir;
use anyhow::{Result, bail};
use flotilla_engine::Simulation;
use flotilla_engine::sink::MetricsFiles;
use std::path::{Path, PathBuf};

/// `simulate --config F`: a new run.
pub(super) fn simulate(
    config: &Path,
    out: Option<PathBuf>,
    data_dir: Option<&Path>,
    overrides: &[String],
    dashboard: Option<(std::net::SocketAddr, u64)>,
) -> Result<()> {
    let exp = load_config(config, overrides)?;
    let data = load_data(&exp, data_dir)?;
    let dir = out.map_or_else(|| RunDir::fresh_for(config), RunDir::new);
    if dir.holds_run() {
        bail!(
            "{} already holds a run; choose another --out, or continue it with --resume {}",
            dir.path().display(),
            dir.path().display()
        );
    }
    let config_json = serde_json::to_value(&exp)?;
    let (server, client) = flotilla_methods::build(&exp)?;
    // Set up (and refuse an impossible fleet or dashboard) before anything is written.
    let resolved = exp.clone();
    let mut sim = Simulation::new(exp, data, server, client, dir.path())?;
    let dashboard = start_dashboard(dashboard, &dir, config_json)?;
    dir.create()?;
    dir.write_config(&resolved)?;
    let metrics = MetricsFiles::open(dir.path(), 0)?;
    announce_dashboard(dashboard.as_ref(), &dir)?;
    finish(&mut sim, metrics, &dir, dashboard)
}

/// `simulate --resume DIR`: continues the run in `dir` after its last checkpoint.
pub(super) fn resume_run(
    dir: &Path,
    data_dir: Option<&Path>,
    dashboard: Option<(std::net::SocketAddr, u64)>,
) -> Result<()> {
    let dir = RunDir::new(dir);
    let exp = load_config(&dir.config_file(), &[])?;
    let data = load_data(&exp, data_dir)?;
    let config_json = serde_json::to_value(&exp)?;
    let (server, client) = flotilla_methods::build(&exp)?;
    let mut sim = Simulation::new(exp, data, server, client, dir.path())?;
    let round = sim.restore_checkpoint()?;
    tracing::info!(round, "resuming after the last checkpoint");
    let dashboard = start_dashboard(dashboard, &dir, config_json)?;
    let metrics = MetricsFiles::open(dir.path(), round)?;
    announce_dashboard(dashboard.as_ref(), &dir)?;
    finish(&mut sim, metrics, &dir, dashboard)
}

/// Starts the dashboard of the run in `dir` when an address is given.
fn start_dashboard(
    live: Option<(std::net::SocketAddr, u64)>,
    dir: &RunDir,
    config: serde_json::Value,
) -> Result<Option<(crate::dashboard::Dashboard, u64)>> {
    let Some((addr, linger)) = live else {
        return Ok(None);
    };
    let name = flotilla_report::run_name(dir.path());
    let d = crate::dashboard::Dashboard::start(addr, &name, config, None)?;
    Ok(Some((d, linger)))
}

/// Says where the dashboard is: on stderr and in the run directory's `dashboard` file.
fn announce_dashboard(
    dashboard: Option<&(crate::dashboard::Dashboard, u64)>,
    dir: &RunDir,
) -> Result<()> {
    if let Some((d, _)) = dashboard {
        dir.write_dashboard_url(d.addr(), d.scheme())?;
        eprintln!("dashboard: {}", d.url());
    }
    Ok(())
}

/// Runs the simulation with the metrics files, a progress display and the dashboard if there
/// is one, then writes the model, the summary and the plots.
fn finish(
    sim: &mut Simulation,
    mut metrics: MetricsFiles,
    dir: &RunDir,
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
    dir.write_outputs(sim.server(), &summary)?;
    if let Some((d, linger)) = dashboard
        && linger > 0
    {
        eprintln!("dashboard: {} stays up for {linger} s", d.url());
        std::thread::sleep(std::time::Duration::from_secs(linger));
    }
    Ok(())
}
