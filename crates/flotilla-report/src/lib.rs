//! Run-directory reports for flotilla.
//!
//! `flotilla simulate` writes a run directory containing
//!
//! * `metrics.jsonl` — one JSON object per round ([`RoundRecord`]),
//! * `clients.jsonl` — one JSON object per client per round ([`ClientRecord`]),
//! * `summary.json` — one JSON object describing the whole run.
//!
//! This crate loads such a directory ([`Run::load`]), renders SVG plots for
//! one run ([`render_plots`]) or several runs side by side
//! ([`render_comparison`]), and formats a plain-text summary table
//! ([`summary_table`]).
//!
//! Every failure is reported as a [`ReportError`] naming the file involved
//! and, for parse failures, the line number and what is wrong with it.
//!
//! ```no_run
//! use std::path::Path;
//!
//! let run = flotilla_report::Run::load(Path::new("runs/fedavg-cifar"))?;
//! for path in flotilla_report::render_plots(&run)? {
//!     println!("wrote {}", path.display());
//! }
//! print!("{}", flotilla_report::summary_table(std::slice::from_ref(&run)));
//! # Ok::<(), flotilla_report::ReportError>(())
//! ```

#![warn(missing_docs)]

mod error;
mod plot;
mod run;
mod table;

pub use error::ReportError;
pub use plot::{
    ACCURACY_VS_BYTES_FILE, ACCURACY_VS_ROUND_FILE, CLIENT_MEMORY_FILE, CLIENT_TIME_FILE,
    COMPARE_ACCURACY_VS_BYTES_FILE, COMPARE_ACCURACY_VS_ROUND_FILE, PLOTS_DIR, render_comparison,
    render_plots,
};
pub use run::{
    CLIENTS_FILE, ClientRecord, ClientStatus, METRICS_FILE, RoundRecord, Run, SUMMARY_FILE,
    read_jsonl, run_name, write_atomic,
};
pub use table::summary_table;
