//! `mcr status`: what a running instance is doing, apart from the packet counters.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::{config::Scheduling, state::RuleState};

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
    /// Active rules on the kernel path (the others run on the workers).
    #[serde(default)]
    pub kernel: usize,
}

/// One rule's state, path, and why, for `mcr status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleStatus {
    pub name: String,
    #[serde(flatten)]
    pub state: RuleState,
}

/// What a worker process is doing. `mcr stats` and `mcr status` both render this one enum; in
/// JSON it is a lowercase `state` and, where there is one, a `reason`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum WorkerState {
    /// Started, still setting up as root.
    Starting,
    /// Unprivileged and forwarding.
    Running,
    /// Gone, to be started again after a back-off; `reason` says how it ended.
    Restarting { reason: String },
    /// Alive but making no progress while packets wait for it; it is killed and restarted
    /// unless it moves on by itself within `settings.stall_timeout`.
    Stalled { reason: String },
    /// Starting it keeps failing; it is still retried at the longest back-off.
    Failed { reason: String },
    /// Told to stop (the relay is shutting down).
    Stopped,
}

impl WorkerState {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Restarting { .. } => "restarting",
            Self::Stalled { .. } => "stalled",
            Self::Failed { .. } => "failed",
            Self::Stopped => "stopped",
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Restarting { reason } | Self::Stalled { reason } | Self::Failed { reason } => {
                Some(reason)
            }
            Self::Starting | Self::Running | Self::Stopped => None,
        }
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

/// One worker process: the part of a worker's report that `mcr status` shows and `mcr stats`
/// extends with its counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub worker: usize,
    pub pid: Option<u32>,
    pub cpu: Option<usize>,
    #[serde(flatten)]
    pub state: WorkerState,
    pub restarts: u32,
    /// The scheduling policy the process runs under (`settings.realtime`).
    #[serde(default)]
    pub scheduling: Scheduling,
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
    /// The shedding window in force (`settings.shed_window` as mcr started with it): how many
    /// packets may wait for a worker before the classifier sheds its packets.
    #[serde(default)]
    pub shed_window: Option<u64>,
    pub rules: RuleCounts,
    /// Reloads since start, successful or not (not counting the start itself).
    pub reloads: u64,
    pub last_reload: Option<ReloadRecord>,
    pub workers: Vec<WorkerStatus>,
    pub interfaces: Vec<InterfaceStatus>,
    /// Every rule of the rules file, in its order.
    #[serde(default)]
    pub rule_states: Vec<RuleStatus>,
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
    if let Some(window) = status.shed_window {
        let _ = writeln!(
            out,
            "shedding    past {window} packets waiting for a worker (settings.shed_window)"
        );
    }
    let rules = &status.rules;
    let _ = writeln!(
        out,
        "rules       {} ({} active: {} kernel path, {} worker path; {} waiting, {} failed)",
        rules.total,
        rules.active,
        rules.kernel,
        rules.active - rules.kernel.min(rules.active),
        rules.waiting,
        rules.failed
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
    if !status.rule_states.is_empty() {
        let width = status
            .rule_states
            .iter()
            .map(|rule| rule.name.len())
            .max()
            .unwrap_or(0)
            .max(4);
        let _ = writeln!(out, "\n{:<width$}  STATE", "RULE");
        for rule in &status.rule_states {
            let state = match &rule.state {
                RuleState::Active { path, reason: None } => format!("active, {path} path"),
                RuleState::Active {
                    path,
                    reason: Some(reason),
                } => format!("active, {path} path: {reason}"),
                state => state.to_string(),
            };
            let _ = writeln!(out, "{:<width$}  {state}", rule.name);
        }
    }
    let _ = writeln!(
        out,
        "\nWORKER  PID      CPU  SCHED    STATE       RESTARTS  REASON"
    );
    for worker in &status.workers {
        let line = format!(
            "{:<6}  {:<7}  {:<3}  {:<7}  {:<10}  {:>8}  {}",
            worker.worker,
            worker.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
            worker.cpu.map_or_else(|| "-".to_owned(), |c| c.to_string()),
            worker.scheduling,
            worker.state,
            worker.restarts,
            worker.state.reason().unwrap_or_default()
        );
        let _ = writeln!(out, "{}", line.trim_end());
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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::state::ForwardingPath;

    #[test]
    #[allow(
        clippy::too_many_lines,
        reason = "one report and everything it renders, read side by side"
    )]
    fn rules_and_workers_show_their_state_and_why() {
        let status = StatusReport {
            config: "rules.yaml".into(),
            pid: 1,
            uptime_seconds: 5,
            pin_dir: "/sys/fs/bpf/mcr".into(),
            shed_window: Some(4096),
            rules: RuleCounts {
                total: 3,
                active: 2,
                waiting: 1,
                failed: 0,
                kernel: 1,
            },
            reloads: 0,
            last_reload: None,
            workers: vec![
                WorkerStatus {
                    worker: 0,
                    pid: Some(42),
                    cpu: Some(1),
                    state: WorkerState::Running,
                    restarts: 0,
                    scheduling: Scheduling::Fifo { priority: 10 },
                },
                WorkerStatus {
                    worker: 1,
                    pid: None,
                    cpu: Some(0),
                    state: WorkerState::Failed {
                        reason: "exited before it was ready: exit status: 1".into(),
                    },
                    restarts: 7,
                    scheduling: Scheduling::Normal,
                },
            ],
            interfaces: Vec::new(),
            rule_states: vec![
                RuleStatus {
                    name: "camera-1".into(),
                    state: RuleState::Active {
                        path: ForwardingPath::Kernel,
                        reason: None,
                    },
                },
                RuleStatus {
                    name: "to-studio".into(),
                    state: RuleState::Active {
                        path: ForwardingPath::Worker,
                        reason: Some("next hop 10.2.0.9 not resolved on out0".into()),
                    },
                },
                RuleStatus {
                    name: "late".into(),
                    state: RuleState::Waiting {
                        reason: "interface in7 does not exist".into(),
                    },
                },
            ],
        };
        let text = render(&status);
        assert!(
            text.contains(
                "rules       3 (2 active: 1 kernel path, 1 worker path; 1 waiting, 0 failed)"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "shedding    past 4096 packets waiting for a worker (settings.shed_window)"
            ),
            "{text}"
        );
        let rules: Vec<&str> = text
            .lines()
            .skip_while(|line| !line.starts_with("RULE"))
            .skip(1)
            .take(3)
            .collect();
        assert_eq!(
            rules,
            [
                "camera-1   active, kernel path",
                "to-studio  active, worker path: next hop 10.2.0.9 not resolved on out0",
                "late       waiting: interface in7 does not exist",
            ]
        );
        let rows: Vec<Vec<&str>> = text
            .lines()
            .skip_while(|line| !line.starts_with("WORKER"))
            .skip(1)
            .take(2)
            .map(|line| line.split_whitespace().collect())
            .collect();
        assert_eq!(rows[0], ["0", "42", "1", "fifo", "10", "running", "0"]);
        assert_eq!(
            rows[1],
            [
                "1", "-", "0", "normal", "failed", "7", "exited", "before", "it", "was", "ready:",
                "exit", "status:", "1"
            ]
        );
        let json = serde_json::to_value(&status).expect("json");
        assert_eq!(json["shed_window"], 4096);
        assert_eq!(json["workers"][0]["state"], "running");
        assert_eq!(json["workers"][1]["state"], "failed");
        assert_eq!(
            json["workers"][1]["reason"],
            "exited before it was ready: exit status: 1"
        );
    }

    #[test]
    fn a_worker_s_scheduling_is_in_the_json_as_policy_and_priority() {
        let worker = |scheduling| WorkerStatus {
            worker: 0,
            pid: Some(42),
            cpu: Some(1),
            state: WorkerState::Running,
            restarts: 0,
            scheduling,
        };
        let fifo = serde_json::to_value(worker(Scheduling::Fifo { priority: 10 })).expect("json");
        assert_eq!(fifo["scheduling"]["policy"], "fifo");
        assert_eq!(fifo["scheduling"]["priority"], 10);
        let normal = serde_json::to_value(worker(Scheduling::Normal)).expect("json");
        assert_eq!(normal["scheduling"]["policy"], "normal");
        assert_eq!(normal["scheduling"].get("priority"), None);
    }
}
