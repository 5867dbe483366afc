//! The README's test command: unit tests, then the end-to-end tests in network namespaces.

use std::{
    ffi::OsStr,
    fs,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use mcr_tests::PREFIX;

use crate::{build_mcr, output};

/// Tests passed and failed over every `cargo test` run of this command.
#[derive(Default)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
}

impl Tally {
    /// Runs `cargo test args…`, echoing its output and adding up its `test result:` lines.
    fn cargo_test(&mut self, args: &[&str], env: &[(&str, &OsStr)]) -> anyhow::Result<()> {
        let mut command = Command::new("cargo");
        command.arg("test").args(args).stdout(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        eprintln!("xtask: running {command:?}");
        let mut child = command.spawn().context("starting cargo test")?;
        let stdout = child.stdout.take().context("cargo test has no stdout")?;
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            if let Some(result) = line.strip_prefix("test result: ") {
                self.passed += count(result, " passed");
                self.failed += count(result, " failed");
            }
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("cargo test {} failed with {status}", args.join(" "));
        }
        Ok(())
    }
}

/// The number before `label` in a `test result:` line (`ok. 38 passed; 0 failed; …`).
fn count(result: &str, label: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| part.trim().strip_suffix(label.trim()))
        .and_then(|number| number.trim().rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

pub fn unit(tally: &mut Tally) -> anyhow::Result<()> {
    tally.cargo_test(
        &[
            "--package",
            "mcr",
            "--package",
            "mcr-common",
            "--package",
            "xtask",
        ],
        &[],
    )
}

/// Builds `mcr`, runs the end-to-end tests, then proves they left nothing behind. Every suite
/// runs with its rules on the worker path; the forwarding, reload and both IPv6 suites run once
/// more on the kernel path, with the same assertions.
pub fn integration(tally: &mut Tally) -> anyhow::Result<()> {
    let mcr = build_mcr()?;
    let binary = ("MCR_BIN", mcr.as_os_str());
    let tests = tally
        .cargo_test(
            &["--package", "mcr-tests"],
            &[binary, ("MCR_TEST_PATH", OsStr::new("worker"))],
        )
        .and_then(|()| {
            tally.cargo_test(
                &[
                    "--package",
                    "mcr-tests",
                    "--test",
                    "forwarding",
                    "--test",
                    "reload",
                    "--test",
                    "ipv6",
                    "--test",
                    "ipv6_classifier",
                ],
                &[binary, ("MCR_TEST_PATH", OsStr::new("kernel"))],
            )
        });
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

/// Whether `name` (`mcrt-<pid>-…`) belongs to a test process that has exited. Names of test
/// processes still running (another checkout's suite, say) are not this run's to remove.
fn left_behind(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes and reports any namespace, pin directory or control socket a finished test left.
fn sweep() -> Vec<String> {
    let mut found = Vec::new();
    let namespaces = output(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
    for name in namespaces
        .lines()
        .filter_map(|line| line.split_whitespace().next())
    {
        if left_behind(name) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
            found.push(format!("namespace {name}"));
        }
    }
    for dir in ["/sys/fs/bpf", "/run/mcr"] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if left_behind(&entry.file_name().to_string_lossy()) {
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

#[cfg(test)]
mod tests {
    use super::{count, left_behind};

    #[test]
    fn only_names_of_exited_test_processes_are_swept() {
        let own = format!("mcrt-{}-0-gen", std::process::id());
        assert!(!left_behind(&own), "a live process's namespace");
        // Linux pids stay below 2^22.
        assert!(left_behind("mcrt-4999999-3-relay"));
        assert!(
            !left_behind("mcrb-4999999-3-relay"),
            "the benchmark's names"
        );
        assert!(!left_behind("mcrt-notapid"));
    }

    #[test]
    fn reads_cargo_test_summaries() {
        let line =
            "ok. 38 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s";
        assert_eq!(count(line, " passed"), 38);
        assert_eq!(count(line, " failed"), 2);
        assert_eq!(count("FAILED. 5 passed; 1 failed; 0 ignored", " failed"), 1);
    }
}
