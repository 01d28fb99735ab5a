//! The `dynplug` command: serve, watch, list, call, verify and demo plugins.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
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
