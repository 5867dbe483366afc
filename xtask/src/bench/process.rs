//! Processes the benchmark starts: one-shot commands, and long-running daemons (relays) behind
//! a guard that stops them by pid and removes what they leave behind.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use mcr_tests::wait_for;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Runs `program args…` and returns its stdout; fails with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    mcr_tests::run_tool(program, args)
}

/// `nsenter --net=/run/netns/<netns> program args…`: network namespace only, so bpffs and the
/// rest of the file system stay the host's.
pub fn nsenter(netns: &str, program: &str, args: &[&str]) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{netns}"))
        .arg("--")
        .arg(program)
        .args(args);
    command
}

/// A long-running child process (`nsenter` execs the program, so the pid is the program's).
/// Dropping it sends SIGTERM, waits, then SIGKILL, and removes the files it was told about.
pub struct Daemon {
    label: String,
    child: Option<Child>,
    log: PathBuf,
    leftovers: Vec<PathBuf>,
}

impl Daemon {
    /// Starts `command` with stdout and stderr going to `log`.
    pub fn spawn(label: &str, mut command: Command, log: &Path) -> anyhow::Result<Self> {
        let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().context("duplicating the log file")?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {label}: {command:?}"))?;
        Ok(Self {
            label: label.to_owned(),
            child: Some(child),
            log: log.to_owned(),
            leftovers: Vec::new(),
        })
    }

    /// Removes `path` (file or directory) after the process has stopped.
    pub fn remove_on_stop(&mut self, path: PathBuf) {
        self.leftovers.push(path);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|child| !matches!(child.try_wait(), Ok(None)))
    }

    /// The last lines of the process's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Fails with the log when the process is no longer running.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if self.has_exited() {
            bail!(
                "{} exited unexpectedly; its log ({}):\n{}",
                self.label,
                self.log.display(),
                self.log_tail()
            );
        }
        Ok(())
    }

    /// SIGTERM, up to 5 s for the exit, then SIGKILL.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let result = (|| {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return Ok(());
            }
            let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
            kill(pid, Signal::SIGTERM)
                .with_context(|| format!("sending SIGTERM to {}", self.label))?;
            if wait_for(Duration::from_secs(5), || child.try_wait().ok().flatten()).is_some() {
                return Ok(());
            }
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} did not exit within 5 s of SIGTERM; killed", self.label)
        })();
        for path in self.leftovers.drain(..) {
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
        result
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            eprintln!("bench: cleanup: {error:#}");
        }
    }
}

/// `pid` and all its descendants that are alive now (through `/proc/<pid>/task/*/children`).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut next = 0;
    while next < all.len() {
        let parent = all[next];
        next += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            all.extend(
                children
                    .split_whitespace()
                    .filter_map(|child| child.parse::<u32>().ok()),
            );
        }
    }
    all.sort_unstable();
    all.dedup();
    all
}
