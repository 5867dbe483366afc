//! `mcr status`: what a running instance is doing, apart from the packet counters.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// What started a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// `mcr run` starting.
    Start,
    /// The rules file changed on disk.
    FileChange,
    Sighup,
    /// `mcr reload`.
    Command,
}

/// Whether a reload changed anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadResult {
    /// The file was valid and is what runs now.
    Applied,
    /// The file was invalid; the rules that ran before still run.
    Rejected,
}

impl std::fmt::Display for ReloadResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Applied => "applied",
            Self::Rejected => "rejected",
        })
    }
}

/// The outcome of the last reload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadRecord {
    /// RFC 3339, UTC.
    pub time: String,
    pub trigger: Trigger,
    pub result: ReloadResult,
    /// Why the file was rejected (file, line, field), if it was.
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCounts {
    pub total: usize,
    pub active: usize,
    pub waiting: usize,
    pub failed: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub worker: usize,
    pub pid: Option<u32>,
    pub cpu: Option<usize>,
    pub state: String,
    pub restarts: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    /// How the classifier is attached.
    pub attach: String,
    /// Active rules with this input interface.
    pub rules: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub config: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    pub pin_dir: String,
    pub rules: RuleCounts,
    /// Reloads since start, successful or not (not counting the start itself).
    pub reloads: u64,
    pub last_reload: Option<ReloadRecord>,
    pub workers: Vec<WorkerStatus>,
    pub interfaces: Vec<InterfaceStatus>,
}

/// The human-readable view of `mcr status`.
pub fn render(status: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "config      {}", status.config);
    let _ = writeln!(out, "pid         {}", status.pid);
    let _ = writeln!(
        out,
        "uptime      {}",
        humantime::format_duration(std::time::Duration::from_secs(status.uptime_seconds))
    );
    let _ = writeln!(out, "pins        {}", status.pin_dir);
    let rules = &status.rules;
    let _ = writeln!(
        out,
        "rules       {} ({} active, {} waiting, {} failed)",
        rules.total, rules.active, rules.waiting, rules.failed
    );
    match &status.last_reload {
        None => {
            let _ = writeln!(out, "last reload none ({} reloads)", status.reloads);
        }
        Some(reload) => {
            let _ = writeln!(
                out,
                "last reload {} at {} ({:?}; {} reloads)",
                reload.result, reload.time, reload.trigger, status.reloads
            );
            if let Some(error) = &reload.error {
                for line in error.lines() {
                    let _ = writeln!(out, "            {line}");
                }
            }
        }
    }
    let _ = writeln!(out, "\nWORKER  PID      CPU  STATE       RESTARTS");
    for worker in &status.workers {
        let _ = writeln!(
            out,
            "{:<6}  {:<7}  {:<3}  {:<10}  {:>8}",
            worker.worker,
            worker.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
            worker.cpu.map_or_else(|| "-".to_owned(), |c| c.to_string()),
            worker.state,
            worker.restarts
        );
    }
    let _ = writeln!(out, "\nINTERFACE        IFINDEX  RULES  CLASSIFIER");
    for interface in &status.interfaces {
        let _ = writeln!(
            out,
            "{:<15}  {:>7}  {:>5}  {}",
            interface.name, interface.ifindex, interface.rules, interface.attach
        );
    }
    out
}
