//! The README's test command: unit tests, then the end-to-end tests in network namespaces.

use std::{fs, path::Path, process::Command};

use anyhow::bail;
use mcr_tests::PREFIX;

use crate::{build_mcr, output, run};

pub fn unit() -> anyhow::Result<()> {
    run(Command::new("cargo").args(["test", "--package", "mcr", "--package", "mcr-common"]))
}

/// Builds `mcr`, runs the end-to-end tests, then proves they left nothing behind.
pub fn integration() -> anyhow::Result<()> {
    let mcr = build_mcr()?;
    let tests = run(Command::new("cargo")
        .args(["test", "--package", "mcr-tests"])
        .env("MCR_BIN", &mcr));
    let leftovers = sweep();
    tests?;
    if !leftovers.is_empty() {
        bail!(
            "the tests left these behind (now removed): {}",
            leftovers.join(", ")
        );
    }
    Ok(())
}

/// Removes and reports any namespace, pin directory or control socket a test left.
fn sweep() -> Vec<String> {
    let mut found = Vec::new();
    let namespaces = output(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
    for name in namespaces
        .lines()
        .filter_map(|line| line.split_whitespace().next())
    {
        if name.starts_with(PREFIX) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
            found.push(format!("namespace {name}"));
        }
    }
    for dir in ["/sys/fs/bpf", "/run/mcr"] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(PREFIX) {
                let path = entry.path();
                let _ = remove(&path);
                found.push(path.display().to_string());
            }
        }
    }
    found
}

fn remove(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}
