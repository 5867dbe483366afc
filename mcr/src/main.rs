use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    match mcr::cli::Cli::parse().run() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("mcr: {error:#}");
            ExitCode::FAILURE
        }
    }
}
