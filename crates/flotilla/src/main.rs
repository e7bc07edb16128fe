//! The `flotilla` command.

use clap::Parser;
use std::process::ExitCode;

#[global_allocator]
static ALLOC: flotilla_engine::alloc::CountingAlloc = flotilla_engine::alloc::CountingAlloc;

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let cli = flotilla::cli::Cli::parse();
    match flotilla::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, outermost first.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
