//! flotilla: federated learning for fleets of weak and mixed devices.
//!
//! This crate is the facade over the workspace's library crates and the home of the
//! `flotilla` command. Start with [`engine::Simulation`] and [`methods::build`]:
//!
//! ```no_run
//! use flotilla::{data, engine, methods};
//! let text = std::fs::read_to_string("examples/quickstart.toml")?;
//! let exp = engine::Experiment::from_toml(&text)?;
//! let split = data::load(exp.data.dataset, &exp.data.dataset.default_dir())?;
//! let (server, client) = methods::build(&exp)?;
//! let run_dir = std::path::Path::new("runs/example");
//! std::fs::create_dir_all(run_dir)?;
//! let mut sim = engine::Simulation::new(exp, split, server, client, run_dir)?;
//! let mut metrics = engine::sink::MetricsFiles::open(run_dir, 0)?;
//! let summary = sim.run(&mut [&mut metrics])?;
//! println!("{summary}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

pub use flotilla_core as core;
pub use flotilla_data as data;
pub use flotilla_engine as engine;
pub use flotilla_methods as methods;
pub use flotilla_models as models;
pub use flotilla_net as net;
pub use flotilla_report as report;

mod bench;
pub mod cli;
pub mod dashboard;
pub mod run_dir;
pub mod workloads;
