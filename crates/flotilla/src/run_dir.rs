//! The run directory and the files in it: what `simulate` and `serve` write, `--resume` and
//! `serve --state` read back, and `report` renders.
//!
//! | file | written by |
//! |---|---|
//! | `config.toml` | the resolved config, before round 1 |
//! | `metrics.jsonl`, `clients.jsonl` | the engine's `MetricsFiles`, after every round |
//! | `checkpoint/` | the driver, every `checkpoint_every` rounds |
//! | `model.safetensors` (and `model-factors.safetensors`, or `model-<label>.safetensors` for each model of a method that keeps several) | at the end |
//! | `summary.json`, `plots/` | at the end |
//! | `dashboard`, `address` | the dashboard's and the server's URL, while they run |

use anyhow::{Context, Result};
use flotilla_core::safetensors_io;
use flotilla_engine::Experiment;
use flotilla_engine::ServerHalf;
use flotilla_report::Run;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The factors of a model with factored layers, written beside its dense model.
pub const FACTORED_MODEL_FILE: &str = "model-factors.safetensors";
/// The final model, loadable by the matching PyTorch module.
pub const MODEL_FILE: &str = "model.safetensors";
/// The resolved config.
pub const CONFIG_FILE: &str = "config.toml";
/// The live dashboard's URL while it runs.
pub const DASHBOARD_FILE: &str = "dashboard";

/// One run's directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// The run directory at `path` (nothing is created yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// A directory for a new run of `config`: `runs/<config stem>`, or the first free
    /// `runs/<stem>-<i>` if that one exists.
    pub fn fresh_for(config: &Path) -> Self {
        let stem = config.file_stem().and_then(|s| s.to_str()).unwrap_or("run");
        let base = PathBuf::from("runs").join(stem);
        if !base.exists() {
            return Self::new(base);
        }
        let free = (2..)
            .map(|i| PathBuf::from("runs").join(format!("{stem}-{i}")))
            .find(|p| !p.exists())
            .expect("unbounded");
        Self::new(free)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it already holds a run (its metrics file exists).
    pub fn holds_run(&self) -> bool {
        self.path.join(flotilla_report::METRICS_FILE).exists()
    }

    /// Whether it holds a checkpoint to resume from.
    pub fn has_checkpoint(&self) -> bool {
        self.path
            .join(flotilla_engine::sim::CHECKPOINT_DIR)
            .join("state.json")
            .exists()
    }

    /// Path of `config.toml`.
    pub fn config_file(&self) -> PathBuf {
        self.path.join(CONFIG_FILE)
    }

    /// Path of the final model.
    pub fn model_file(&self) -> PathBuf {
        self.path.join(MODEL_FILE)
    }

    /// Creates the directory.
    pub fn create(&self) -> Result<()> {
        std::fs::create_dir_all(&self.path)
            .with_context(|| format!("cannot create the run directory {}", self.path.display()))
    }

    /// Writes the resolved config (all defaults filled in) as `config.toml`.
    pub fn write_config(&self, exp: &Experiment) -> Result<()> {
        let resolved = toml::to_string(exp).context("cannot serialise the config")?;
        safetensors_io::write_atomic(&self.config_file(), resolved.as_bytes())?;
        Ok(())
    }

    /// Writes the dashboard's URL (without its token) for scripts to find.
    pub fn write_dashboard_url(&self, addr: std::net::SocketAddr, scheme: &str) -> Result<()> {
        let url = format!("{scheme}://{addr}/\n");
        safetensors_io::write_atomic(&self.path.join(DASHBOARD_FILE), url.as_bytes())?;
        Ok(())
    }

    /// Writes the final model, summary.json and the plots of a finished run, and prints a
    /// summary table and where everything is.
    pub fn write_outputs(
        &self,
        server: &dyn ServerHalf,
        summary: &serde_json::Value,
    ) -> Result<()> {
        let dir = &self.path;
        let models = server.eval_models();
        let mut extra = Vec::new();
        let save = |file: &str,
                    spec: &flotilla_models::ModelSpec,
                    params: &flotilla_core::ParamSet|
         -> Result<()> {
            let meta = HashMap::from([("model".to_string(), serde_json::to_string(spec)?)]);
            safetensors_io::save(&dir.join(file), params, Some(meta))?;
            Ok(())
        };
        if let Some(model) = models.first() {
            if model.spec.ranks.is_empty() {
                save(MODEL_FILE, &model.spec, &model.params)?;
            } else {
                // Factored layers (FeDLRT): model.safetensors holds the dense model, W = U S Vᵀ
                // multiplied out, so that the unfactored PyTorch module loads it with
                // strict=True; the factors as trained go beside it.
                let dense = flotilla_models::dense_export(&model.spec, &model.params)?;
                let plain = flotilla_models::ModelSpec {
                    ranks: Default::default(),
                    ..model.spec.clone()
                };
                save(MODEL_FILE, &plain, &dense)?;
                save(FACTORED_MODEL_FILE, &model.spec, &model.params)?;
            }
        }
        // A method that keeps several models (a width per cluster, a prefix per depth): every
        // one of them, named by its label; model.safetensors is the first.
        if models.len() > 1 {
            for m in models.iter().filter(|m| m.spec.ranks.is_empty()) {
                let label: String = m
                    .label
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                let file = format!("model-{label}.safetensors");
                save(&file, &m.spec, &m.params)?;
                extra.push(dir.join(file));
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
        println!("model:         {}", self.model_file().display());
        for p in extra {
            println!("model:         {}", p.display());
        }
        for p in plots {
            println!("plot:          {}", p.display());
        }
        Ok(())
    }
}
