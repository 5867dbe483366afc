//! `cargo xtask …`: everything around MCR that is not MCR itself.

mod bench;
mod demo;
mod package;
mod setup;
mod test;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "MCR developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing MCR needs (idempotent; seconds when all is present).
    Setup,
    /// Setup, unit tests, then the integration run: the README's test command.
    Test,
    /// Build MCR and run the end-to-end tests in network namespaces.
    Integration,
    /// Run MCR in network namespaces with a rules file from examples/ and show it working.
    Demo {
        /// Rules file of the demonstration (its interfaces are the demo topology's).
        #[arg(long, default_value = "examples/demo.yaml")]
        rules: PathBuf,
        /// How long the demonstration stream runs.
        #[arg(long, default_value_t = 6)]
        seconds: u64,
    },
    /// Benchmark MCR against the kernel's multicast forwarding and socat (release build).
    Bench(bench::BenchArgs),
    /// Build the Debian package (release build) into target/package/.
    Package {
        /// Then install it on this machine with dpkg, check it and purge it again.
        #[arg(long)]
        check: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root();
    std::env::set_current_dir(&root)
        .with_context(|| format!("entering the workspace {}", root.display()))?;
    match Cli::parse().task {
        Task::Setup => setup::ensure_all(),
        Task::Test => {
            setup::ensure_all()?;
            let mut tally = test::Tally::default();
            let result = test::unit(&mut tally).and_then(|()| test::integration(&mut tally));
            // One closing line for the whole run, whatever the outcome.
            println!("tests: {} passed, {} failed", tally.passed, tally.failed);
            result
        }
        Task::Integration => {
            setup::ensure_all()?;
            let mut tally = test::Tally::default();
            let result = test::integration(&mut tally);
            println!("tests: {} passed, {} failed", tally.passed, tally.failed);
            result
        }
        Task::Demo { rules, seconds } => {
            setup::ensure_all()?;
            demo::run(&rules, seconds)
        }
        Task::Bench(args) => {
            setup::ensure_all()?;
            bench::run(&args)
        }
        Task::Package { check } => {
            setup::ensure_all()?;
            package::run_package(check)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Runs `command`, echoing it, and fails when it fails.
fn run(command: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {command:?}");
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

/// Runs `command` quietly and returns its stdout, or `None` when it cannot run or fails.
fn output(command: &mut Command) -> Option<String> {
    let output = command.output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Builds the `mcr` binary (debug) and returns its path.
fn build_mcr() -> anyhow::Result<PathBuf> {
    run(Command::new("cargo").args(["build", "--package", "mcr"]))?;
    Ok(workspace_root().join("target/debug/mcr"))
}
