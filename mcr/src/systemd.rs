//! Running under systemd: what `mcr run` tells the service manager (`sd_notify(3)`: ready,
//! reloading, stopping, a status line, watchdog pings) and how its log lines carry journal
//! priorities. Outside systemd (no `NOTIFY_SOCKET`, no `JOURNAL_STREAM`) nothing here does
//! anything.

use std::{fmt::Write as _, os::fd::AsFd as _, time::Duration};

use sd_notify::NotifyState;
use tracing::{Level, Subscriber};
use tracing_subscriber::{
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

use crate::status::{ReloadResult, StatusReport};

/// Tells the service manager that the relay runs: at start once the rules are applied and the
/// workers are up, and at the end of each reload. `status` says what runs.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells the service manager that a reload began. `MONOTONIC_USEC` lets it match the
/// `READY=1` that ends the reload to this reload (`systemd.service(5)`, `Type=notify-reload`).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(error) => {
            tracing::warn!(%error, "cannot read the monotonic clock for systemd");
            send(&[NotifyState::Reloading]);
        }
    }
}

/// Tells the service manager that the relay is shutting down.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Updates the status line `systemctl status` shows.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Tells the service manager's watchdog that the event loop still turns.
pub fn watchdog_ping() {
    send(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog: half its timeout, as `sd_watchdog_enabled(3)` advises, so
/// that one late turn of the loop is not yet a missed ping. `None` when `WatchdogSec=` is not
/// set for this process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|timeout| !timeout.is_zero())
        .map(|timeout| timeout / 2)
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// The `STATUS=` line: rules by state, workers running, and a rejected last reload, for
/// example `12 rules active, 1 waiting; 2 of 2 workers running`.
pub fn status_line(report: &StatusReport) -> String {
    let rules = &report.rules;
    let mut line = format!(
        "{} {} active, {} waiting",
        rules.active,
        if rules.active == 1 { "rule" } else { "rules" },
        rules.waiting
    );
    if rules.failed > 0 {
        let _ = write!(line, ", {} failed", rules.failed);
    }
    let running = report
        .workers
        .iter()
        .filter(|worker| worker.state == crate::status::WorkerState::Running)
        .count();
    let _ = write!(
        line,
        "; {running} of {} workers running",
        report.workers.len()
    );
    if let Some(reload) = &report.last_reload
        && reload.result == ReloadResult::Rejected
    {
        let _ = write!(
            line,
            "; rules file rejected at {}, the rules before it run (mcr status)",
            reload.time
        );
    }
    line
}

/// Whether standard error is the journal's stream: systemd sets `JOURNAL_STREAM` to the device
/// and inode of the stream it connects, and a process whose standard error was redirected
/// elsewhere (or a child that inherited the variable with a pipe) must not prefix its lines.
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = value.to_str().and_then(|value| value.split_once(':')) else {
        return false;
    };
    let (Ok(device), Ok(inode)) = (device.parse::<u64>(), inode.parse::<u64>()) else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stderr().as_fd())
        .is_ok_and(|stat| stat.st_dev == device && stat.st_ino == inode)
}

/// The syslog priority journald files a line under (`sd-daemon(3)`): `journalctl -p warning`
/// shows 0 to 4.
fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Formats events with `F` and puts the event's journal priority, `<N>`, before each line:
/// journald reads a prefix per line, and a multi-line message (a rejected rules file lists
/// every problem on a line of its own) would otherwise file all but its first line as info.
pub struct JournalPriority<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for JournalPriority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut text = String::new();
        self.0.format_event(ctx, Writer::new(&mut text), event)?;
        let priority = priority(*event.metadata().level());
        for line in text.lines() {
            writeln!(writer, "<{priority}>{line}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::status::{ReloadRecord, RuleCounts, Trigger, WorkerState, WorkerStatus};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .expect("not poisoned")
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_of_an_event_carries_its_priority() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::DEBUG)
            .with_ansi(false)
            .event_format(JournalPriority(
                tracing_subscriber::fmt::format().without_time(),
            ))
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!("rules file rejected:\nrules.yaml:3: settings.workers: 0 workers");
            tracing::warn!(worker = 1, "stalled");
            tracing::info!("running");
            tracing::debug!("details");
        });
        let text =
            String::from_utf8(captured.0.lock().expect("not poisoned").clone()).expect("UTF-8");
        let prefixes: Vec<&str> = text.lines().map(|line| &line[..3]).collect();
        assert_eq!(prefixes, ["<3>", "<3>", "<4>", "<6>", "<7>"], "{text}");
        assert!(
            text.contains("<3>rules.yaml:3: settings.workers"),
            "the second line keeps the error's priority: {text}"
        );
        assert!(text.contains("<4> WARN"), "{text}");
    }

    fn report(active: usize, waiting: usize, failed: usize, rejected: bool) -> StatusReport {
        let worker = |worker, state| WorkerStatus {
            worker,
            pid: None,
            cpu: None,
            state,
            restarts: 0,
            scheduling: crate::config::Scheduling::Normal,
        };
        StatusReport {
            config: "/etc/mcr/rules.yaml".into(),
            pid: 1,
            uptime_seconds: 0,
            pin_dir: "/sys/fs/bpf/mcr".into(),
            shed_window: Some(8192),
            rules: RuleCounts {
                total: active + waiting + failed,
                active,
                waiting,
                failed,
                kernel: 0,
            },
            reloads: 1,
            last_reload: Some(ReloadRecord {
                time: "2026-11-24T10:00:00Z".into(),
                trigger: Trigger::Command,
                result: if rejected {
                    ReloadResult::Rejected
                } else {
                    ReloadResult::Applied
                },
                error: None,
            }),
            workers: vec![
                worker(0, WorkerState::Running),
                worker(
                    1,
                    WorkerState::Restarting {
                        reason: "killed by SIGKILL".into(),
                    },
                ),
            ],
            interfaces: Vec::new(),
            rule_states: Vec::new(),
        }
    }

    #[test]
    fn the_status_line_counts_rules_and_workers() {
        assert_eq!(
            status_line(&report(12, 1, 0, false)),
            "12 rules active, 1 waiting; 1 of 2 workers running"
        );
        assert_eq!(
            status_line(&report(1, 0, 2, true)),
            "1 rule active, 0 waiting, 2 failed; 1 of 2 workers running; rules file rejected \
             at 2026-11-24T10:00:00Z, the rules before it run (mcr status)"
        );
    }
}
