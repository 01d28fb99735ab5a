//! The `dynplug` command: serve, watch, list, call, verify and demo plugins.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // A child started by a host to run a plugin with isolation "process".
    if let Some(code) = dynplug::run_if_runner() {
        return code;
    }
    let args = cli::Args::parse();
    cli::init_logging(&args);
    match cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            // One line, with the causes: scripts grep it, people read it.
            eprintln!("dynplug: {err:#}");
            ExitCode::FAILURE
        }
    }
}
