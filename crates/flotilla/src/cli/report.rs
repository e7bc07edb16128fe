//! `flotilla report`: finished runs rendered and compared.

use anyhow::{Context, Result};
use flotilla_report::Run;
use std::path::PathBuf;

/// `flotilla report`: plots and a summary table of finished runs, side by side, and their
/// dashboards with `--serve`.
pub(super) fn report(
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
