//! The `flotilla` command.

use clap::Parser;
use std::io::IsTerminal;
use std::process::ExitCode;

#[global_allocator]
static ALLOC: flotilla_engine::alloc::CountingAlloc = flotilla_engine::alloc::CountingAlloc;

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    // Colour only for a person at a terminal: piped or redirected logs stay plain text.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    match std::env::var("FLOTILLA_LOG_FORMAT").as_deref() {
        Ok("json") => logs.json().init(),
        Ok("text") | Err(_) => logs.with_ansi(colour).init(),
        Ok(other) => {
            eprintln!("error: FLOTILLA_LOG_FORMAT must be `text` or `json`, got `{other}`");
            return ExitCode::FAILURE;
        }
    }
    // The GEMM micro-kernels are chosen per CPU; the variable overrides the choice (to compare
    // kernel sets, or to reproduce bits from another machine), and is refused when invalid.
    if let Err(e) = flotilla_models::kernels::gemm_kernels_from_env() {
        eprintln!("error: {e}; unset FLOTILLA_GEMM_KERNELS to let flotilla choose");
        return ExitCode::FAILURE;
    }
    let cli = flotilla::cli::Cli::parse();
    match flotilla::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, outermost first, skipping a cause whose
            // text the message before it already shows.
            let mut line = String::new();
            for cause in e.chain().map(|c| c.to_string()) {
                if !line.contains(&cause) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&cause);
                }
            }
            eprintln!("error: {}", line.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
