//! The `mcr` binary under test, run inside a namespace.

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use command_fds::{CommandFdExt as _, FdMapping};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{Netns, netns::unique_name, path::pinned_path, wait_for};

/// The `mcr` binary: `$MCR_BIN`, else `target/debug/mcr` of this workspace.
pub fn mcr_binary() -> PathBuf {
    std::env::var_os("MCR_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/mcr"),
        PathBuf::from,
    )
}

/// How to start `mcr run` where the defaults do not do.
#[derive(Default)]
pub struct Launch {
    /// Run this binary instead of [`mcr_binary`] (the CLI commands still use that one).
    pub binary: Option<PathBuf>,
    /// Descriptors `mcr run` inherits from its launcher: `(number in mcr, descriptor)`.
    pub inherit: Vec<(i32, OwnedFd)>,
    /// More arguments for `mcr run`.
    pub args: Vec<String>,
    /// Environment variables `mcr run` gets, as systemd would set them.
    pub env: Vec<(String, String)>,
    /// Sets `JOURNAL_STREAM` to the log file `mcr run` writes to, as systemd does for a
    /// service whose standard error is the journal.
    pub journal_stream: bool,
}

/// A running `mcr run` with its own pin directory and control socket. Dropping it stops the
/// process (SIGTERM, then SIGKILL) and removes whatever it left.
pub struct Mcr {
    child: Option<Child>,
    pub pin_dir: PathBuf,
    pub control_socket: PathBuf,
    log: PathBuf,
}

impl Mcr {
    /// Starts `mcr run --config <config>` inside `netns` and waits until it answers.
    pub fn start(netns: &Netns, config: &Path) -> anyhow::Result<Self> {
        Self::start_with(netns, config, Launch::default())
    }

    /// [`Mcr::start`], from another binary or with inherited descriptors.
    pub fn start_with(netns: &Netns, config: &Path, launch: Launch) -> anyhow::Result<Self> {
        let name = unique_name("mcr");
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{name}"));
        let control_socket = PathBuf::from(format!("/run/mcr/{name}.sock"));
        let log = std::env::temp_dir().join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log).context("creating the mcr log")?;
        let journal_stream = if launch.journal_stream {
            use std::os::unix::fs::MetadataExt as _;
            let metadata = log_file.metadata()?;
            Some(format!("{}:{}", metadata.dev(), metadata.ino()))
        } else {
            None
        };
        // nsenter enters the namespace and execs mcr in the same process, descriptors and all.
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", netns.path()))
            .arg(launch.binary.unwrap_or_else(mcr_binary))
            .args(["run", "--log-level", "debug", "--config"])
            .arg(config)
            .arg("--pin-dir")
            .arg(&pin_dir)
            .args(&launch.args)
            .envs(launch.env.iter().map(|(key, value)| (key, value)))
            .envs(journal_stream.map(|value| ("JOURNAL_STREAM", value)))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        command
            .fd_mappings(
                launch
                    .inherit
                    .into_iter()
                    .map(|(child_fd, parent_fd)| FdMapping {
                        parent_fd,
                        child_fd,
                    })
                    .collect(),
            )
            .context("mapping the descriptors mcr inherits")?;
        let child = command.spawn().context("starting mcr")?;
        let mut mcr = Self {
            child: Some(child),
            pin_dir,
            control_socket,
            log,
        };
        let ready = wait_for(Duration::from_secs(10), || {
            if mcr.has_exited() {
                return Some(false);
            }
            mcr.control_socket.exists().then_some(true)
        });
        if ready != Some(true) {
            bail!("mcr did not start; its log:\n{}", mcr.log_text());
        }
        let text = std::fs::read_to_string(config).context("reading the rules file")?;
        if let Some(path) = pinned_path(&text) {
            mcr.wait_for_path(path)?;
        }
        Ok(mcr)
    }

    /// Waits until every active rule runs on `path` (a unicast next hop may take a moment
    /// to resolve), and fails with the rules' states if they do not within 5 s.
    pub fn wait_for_path(&self, path: &str) -> anyhow::Result<()> {
        let on_path = wait_for(Duration::from_secs(5), || {
            let rules = self.stats().ok()?;
            rules
                .iter()
                .filter(|rule| rule["state"] == "active")
                .all(|rule| rule["path"] == path)
                .then_some(())
        });
        if on_path.is_none() {
            let elsewhere: Vec<String> = self
                .stats()?
                .iter()
                .filter(|rule| rule["state"] == "active" && rule["path"] != path)
                .take(5)
                .map(|rule| format!("{} on {} ({})", rule["name"], rule["path"], rule["reason"]))
                .collect();
            bail!("active rules not on the {path} path, for example: {elsewhere:?}");
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|child| matches!(child.try_wait(), Ok(Some(_))))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs an `mcr` CLI command against this instance, whatever its exit status.
    pub fn cli_output(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Command::new(mcr_binary())
            .args(args)
            .arg("--control-socket")
            .arg(&self.control_socket)
            .output()
            .context("running the mcr CLI")
    }

    /// Runs an `mcr` CLI command against this instance and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.cli_output(args)?;
        if !output.status.success() {
            bail!(
                "mcr {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `mcr stats --json`, parsed.
    pub fn stats(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let text = self.cli(&["stats", "--json"])?;
        serde_json::from_str(&text).context("parsing mcr stats --json")
    }

    /// `mcr stats --json --workers`, parsed.
    pub fn workers(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let text = self.cli(&["stats", "--json", "--workers"])?;
        serde_json::from_str(&text).context("parsing mcr stats --json --workers")
    }

    /// The packets every worker counted in `field` of `mcr stats --json --workers`
    /// (`received`, `malformed`, …), summed over the workers.
    pub fn workers_total(&self, field: &str) -> anyhow::Result<u64> {
        Ok(self
            .workers()?
            .iter()
            .map(|worker| worker[field].as_u64().unwrap_or(0))
            .sum())
    }

    /// `mcr stats --json --skipped`: what the classifier did not relay, by reason.
    pub fn skipped(&self) -> anyhow::Result<serde_json::Value> {
        let text = self.cli(&["stats", "--json", "--skipped"])?;
        serde_json::from_str(&text).context("parsing mcr stats --json --skipped")
    }

    /// `bpftool -j map dump` of the pinned map `map`: each entry as BTF formats it, field by
    /// field.
    pub fn bpftool_dump(&self, map: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let path = self.pin_dir.join(map);
        let text = crate::run_tool(
            "bpftool",
            &["-j", "map", "dump", "pinned", &path.to_string_lossy()],
        )?;
        let entries: Vec<serde_json::Value> =
            serde_json::from_str(&text).context("parsing bpftool output")?;
        Ok(entries
            .into_iter()
            .map(|entry| entry.get("formatted").cloned().unwrap_or(entry))
            .collect())
    }

    /// The stats entry of rule `name`.
    pub fn rule_stats(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        self.stats()?
            .into_iter()
            .find(|rule| rule["name"] == name)
            .with_context(|| format!("no rule {name} in mcr stats"))
    }

    /// `mcr status --json`, parsed.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let text = self.cli(&["status", "--json"])?;
        serde_json::from_str(&text).context("parsing mcr status --json")
    }

    /// Polls `mcr status --json` until `check` holds (5 s at most) and returns that status;
    /// `what` names the awaited state in the error.
    pub fn wait_for_status(
        &self,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        crate::wait_for(Duration::from_secs(5), || {
            self.status().ok().filter(|status| check(status))
        })
        .with_context(|| format!("mcr status never showed {what}: {:?}", self.status().ok()))
    }

    /// Sends `signal` to the supervisor.
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.pid().context("mcr is not running")?;
        kill(Pid::from_raw(i32::try_from(pid)?), signal)?;
        Ok(())
    }

    /// Whether the supervisor process is still running.
    pub fn is_running(&mut self) -> bool {
        !self.has_exited()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("mcr was already stopped");
        };
        let pid = Pid::from_raw(i32::try_from(child.id())?);
        kill(pid, Signal::SIGTERM).context("sending SIGTERM to mcr")?;
        let status = wait_for(Duration::from_secs(10), || child.try_wait().ok().flatten());
        if let Some(status) = status {
            return Ok(status);
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("mcr did not exit within 10 s of SIGTERM")
    }
}

impl Drop for Mcr {
    fn drop(&mut self) {
        if self.child.is_some() && self.stop().is_err() {
            eprintln!(
                "cleanup: mcr had to be killed; its log:\n{}",
                self.log_text()
            );
        }
        // A killed instance cannot remove its own pins and socket.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_file(&self.control_socket);
        let _ = std::fs::remove_file(&self.log);
    }
}
