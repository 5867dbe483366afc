//! Starting, commanding, watching and restarting the worker processes.

use std::{
    ffi::OsString,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::process::ExitStatusExt as _,
    },
    process::{ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use command_fds::{CommandFdExt as _, FdMapping};
use nix::{
    fcntl::{OFlag, open},
    libc,
    sys::{
        signal::Signal,
        socket::{
            AddressFamily, MsgFlags, SockFlag, SockType, recv, setsockopt, socketpair, sockopt,
        },
        stat::Mode,
        time::TimeVal,
    },
};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader, unix::AsyncFd},
    sync::{mpsc, oneshot},
};

use crate::{
    command::{self, Command},
    config::Scheduling,
    counters::SharedCounters,
    status::WorkerState,
    worker::CONTROL_FD,
};

/// Something that happened to a worker, reported to the supervisor's event loop.
#[derive(Debug)]
pub enum WorkerEvent {
    Exited {
        index: usize,
        generation: u64,
        status: String,
    },
    RestartDue {
        index: usize,
    },
    /// The worker dropped its privileges and is forwarding.
    Ready {
        index: usize,
        generation: u64,
    },
}

/// Restart back-off: the first restart is immediate-ish, repeated crashes wait longer.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A worker that ran this long before crashing restarts with the first back-off again.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Starts in a row that end before the worker reports ready (or that cannot even create the
/// process) after which the worker shows as `failed`. It is still retried, at [`MAX_BACKOFF`].
const FAILED_AFTER: u32 = 3;

/// The executable this supervisor runs, held open from the start. Workers are started through
/// this descriptor, so they run the same binary as their supervisor even after a package
/// upgrade renamed a new file over its path or deleted it.
pub struct Executable {
    file: OwnedFd,
}

impl Executable {
    pub fn current() -> io::Result<Self> {
        let file = open(
            "/proc/self/exe",
            OFlag::O_PATH | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self { file })
    }

    /// A path that names this executable in a child that inherited the descriptor: the child
    /// execs it before the descriptor closes (it is close-on-exec).
    fn path(&self) -> String {
        format!("/proc/self/fd/{}", self.file.as_raw_fd())
    }
}

/// What a supervisor's sampling of a worker's progress concluded.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Moving, idle, or not running: nothing to do.
    Fine,
    /// It had stalled and has moved on by itself.
    Recovered,
    /// It makes no progress while packets wait for it (`newly`: first seen now).
    Stalled { newly: bool },
    /// Stalled for the whole stall timeout: kill it, with this reason.
    Kill(String),
}

/// A worker slot's state and the rules that move it: back-off, repeated failures, stalls.
/// Kept apart from the process handles so the rules can be tested without processes.
#[derive(Debug)]
pub struct Lifecycle {
    state: WorkerState,
    restarts: u32,
    started: Instant,
    backoff: Duration,
    /// Starts in a row that ended before the worker reported ready.
    failed_starts: u32,
    /// Why the current process was killed, reported when its exit arrives.
    kill_reason: Option<String>,
    /// The progress counter at the last sample.
    last_progress: Option<u64>,
    /// When the worker was first seen making no progress with packets waiting.
    stuck_since: Option<Instant>,
}

impl Lifecycle {
    pub fn new(now: Instant) -> Self {
        Self {
            state: WorkerState::Stopped,
            restarts: 0,
            started: now,
            backoff: FIRST_BACKOFF,
            failed_starts: 0,
            kill_reason: None,
            last_progress: None,
            stuck_since: None,
        }
    }

    pub fn state(&self) -> &WorkerState {
        &self.state
    }

    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// A new process was started.
    pub fn started(&mut self, now: Instant) {
        self.state = WorkerState::Starting;
        self.started = now;
        self.kill_reason = None;
        self.last_progress = None;
        self.stuck_since = None;
    }

    /// The process reported ready: it has given up its privileges and is forwarding.
    pub fn ready(&mut self) {
        if self.state == WorkerState::Starting {
            self.state = WorkerState::Running;
            self.failed_starts = 0;
        }
    }

    /// The process exited with `status`; returns the delay before the next start, or `None`
    /// when the exit was asked for.
    pub fn exited(&mut self, now: Instant, status: &str) -> Option<Duration> {
        if self.state == WorkerState::Stopped {
            return None;
        }
        let was_ready = matches!(
            self.state,
            WorkerState::Running | WorkerState::Stalled { .. }
        );
        let reason = self.kill_reason.take().unwrap_or_else(|| {
            if was_ready {
                format!("exited: {status}")
            } else {
                format!("exited before it was ready: {status}")
            }
        });
        self.restarts += 1;
        if !was_ready {
            self.failed_starts += 1;
        } else if now.duration_since(self.started) >= STABLE_AFTER {
            self.backoff = FIRST_BACKOFF;
        }
        Some(self.retry(reason))
    }

    /// Starting a process failed outright (no process exists); returns the delay before the
    /// next try.
    pub fn start_failed(&mut self, reason: String) -> Duration {
        self.failed_starts += 1;
        self.retry(reason)
    }

    fn retry(&mut self, reason: String) -> Duration {
        if self.failed_starts >= FAILED_AFTER {
            self.state = WorkerState::Failed { reason };
            self.backoff = MAX_BACKOFF;
            return MAX_BACKOFF;
        }
        self.state = WorkerState::Restarting { reason };
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        delay
    }

    /// Whether a scheduled restart should start a process now.
    pub fn wants_restart(&self) -> bool {
        matches!(
            self.state,
            WorkerState::Restarting { .. } | WorkerState::Failed { .. }
        )
    }

    /// The process is about to be killed for `reason`.
    pub fn killing(&mut self, reason: String) {
        self.kill_reason.get_or_insert(reason);
    }

    pub fn stopping(&mut self) {
        self.state = WorkerState::Stopped;
    }

    /// Takes one sample: the worker's progress counter (bumped every turn of its loop) and
    /// whether packets wait in its sockets. A running worker whose counter does not move while
    /// packets wait is stalled; once it has been for `timeout`, it is to be killed.
    ///
    /// One sample is not enough to call a worker stalled: a packet may have arrived just now
    /// at a worker that was idle. It is stalled from the second sample that finds the counter
    /// unchanged and packets still waiting.
    pub fn observe(
        &mut self,
        now: Instant,
        progress: u64,
        waiting: bool,
        timeout: Duration,
    ) -> Progress {
        if !matches!(
            self.state,
            WorkerState::Running | WorkerState::Stalled { .. }
        ) {
            self.last_progress = None;
            self.stuck_since = None;
            return Progress::Fine;
        }
        let moved = self.last_progress != Some(progress);
        self.last_progress = Some(progress);
        if moved || !waiting {
            self.stuck_since = None;
            if matches!(self.state, WorkerState::Stalled { .. }) {
                self.state = WorkerState::Running;
                return Progress::Recovered;
            }
            return Progress::Fine;
        }
        let since = *self.stuck_since.get_or_insert(now);
        let stuck = now.duration_since(since);
        if stuck.is_zero() {
            return Progress::Fine;
        }
        if stuck >= timeout {
            return Progress::Kill(format!(
                "stalled: no progress for {} s while packets waited; killed",
                stuck.as_secs()
            ));
        }
        let newly = !matches!(self.state, WorkerState::Stalled { .. });
        self.state = WorkerState::Stalled {
            reason: format!(
                "no progress for {} s while packets wait; killed after {} s",
                stuck.as_secs().max(1),
                timeout.as_secs()
            ),
        };
        Progress::Stalled { newly }
    }
}

pub struct Worker {
    pub index: usize,
    pub cpu: Option<usize>,
    pub pid: Option<u32>,
    pub counters: SharedCounters,
    pub lifecycle: Lifecycle,
    /// What `settings.realtime` asks for, given to each process this worker starts.
    scheduling: Scheduling,
    /// What the current process runs under: `scheduling` once it was set.
    pub scheduled: Scheduling,
    control: Option<OwnedFd>,
    /// Tells the task that waits for the process to kill it.
    kill: Option<oneshot::Sender<()>>,
    generation: u64,
}

impl Worker {
    pub fn new(index: usize, cpu: Option<usize>, scheduling: Scheduling) -> anyhow::Result<Self> {
        let counters = SharedCounters::create(&format!("mcr-worker-{index}"))
            .context("creating a worker's counter block")?;
        Ok(Self {
            index,
            cpu,
            pid: None,
            counters,
            lifecycle: Lifecycle::new(Instant::now()),
            scheduling,
            scheduled: Scheduling::Normal,
            control: None,
            kill: None,
            generation: 0,
        })
    }

    /// Starts the process and sends it `init`, with its counter block, `load_map` (the
    /// classifier's map of worker loads, of which it maps its own page) and `shed_window`, the
    /// backlog it lets the classifier shed at. The caller then replays inputs and rules.
    ///
    /// An error means that no process was started. Once one is, a failure to hand it `init`
    /// kills it, and its exit goes the usual way.
    pub fn spawn(
        &mut self,
        executable: &Executable,
        user: (u32, u32),
        load_map: BorrowedFd<'_>,
        shed_window: u64,
        events: &mpsc::Sender<WorkerEvent>,
    ) -> anyhow::Result<()> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .context("creating a worker control socket")?;
        // A worker that stops reading must not stall the supervisor: a command that cannot be
        // queued within a second fails, is logged, and the worker is left to be restarted.
        setsockopt(&ours, sockopt::SendTimeout, &TimeVal::new(1, 0))
            .context("setting the control socket's send timeout")?;
        let mut command = tokio::process::Command::new(executable.path());
        command
            .arg0(OsString::from("mcr"))
            .arg("worker")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
            .fd_mappings(vec![FdMapping {
                parent_fd: theirs,
                child_fd: CONTROL_FD,
            }])
            .context("handing the control socket to the worker")?;
        // SAFETY: the closure runs in the child between fork and exec, after the control socket
        // was mapped to its descriptor, and makes one async-signal-safe system call.
        unsafe {
            command.pre_exec(close_inherited_descriptors);
        }
        let mut child = command.spawn().context("starting a worker")?;
        self.generation += 1;
        self.pid = child.id();
        self.scheduled = Scheduling::Normal;
        self.lifecycle.started(Instant::now());
        // Before the process gets to its loop, so that no packet waits behind time-shared
        // tasks; the policy survives the worker's switch to an unprivileged user, which could
        // not raise it itself.
        self.schedule(self.scheduling);
        let index = self.index;
        let generation = self.generation;
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(relay_log(index, stderr));
        }
        let readiness = ours.try_clone().context("duplicating the control socket")?;
        tokio::spawn(wait_until_ready(
            readiness,
            index,
            generation,
            events.clone(),
        ));
        let (kill, killed) = oneshot::channel();
        self.kill = Some(kill);
        let events = events.clone();
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                Ok(()) = killed => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let status = match status {
                Ok(status) => describe_exit(status),
                Err(error) => error.to_string(),
            };
            let _ = events
                .send(WorkerEvent::Exited {
                    index,
                    generation,
                    status,
                })
                .await;
        });

        self.control = Some(ours);
        let init = Command::Init {
            worker: u32::try_from(self.index)?,
            cpu: self.cpu,
            uid: user.0,
            gid: user.1,
            shed_window,
        };
        if let Err(error) = self.send(&init, &[self.counters.fd(), load_map]) {
            tracing::error!(worker = index, "{error:#}");
            self.kill(format!("{error:#}"));
        }
        Ok(())
    }

    /// Puts the current process, and every later one, under `scheduling`. A process that
    /// cannot be given it keeps running as it was, and says so in the log and in `mcr status`.
    pub fn schedule(&mut self, scheduling: Scheduling) {
        self.scheduling = scheduling;
        let Some(pid) = self.pid else { return };
        match set_scheduling(pid, scheduling) {
            Ok(()) => {
                self.scheduled = scheduling;
                tracing::debug!(worker = self.index, pid, %scheduling, "scheduling set");
            }
            Err(error) => tracing::error!(
                worker = self.index,
                pid,
                "cannot schedule the worker as {scheduling} (settings.realtime): {error}; it \
                 runs as {} (real-time scheduling needs CAP_SYS_NICE, and under systemd \
                 RestrictRealtime=no)",
                self.scheduled
            ),
        }
    }

    /// Sends a command; a worker that cannot take it is left to crash and be restarted.
    pub fn send(&self, command: &Command, fds: &[BorrowedFd<'_>]) -> anyhow::Result<()> {
        let control = self
            .control
            .as_ref()
            .with_context(|| format!("worker {} is not running", self.index))?;
        command::send(control.as_fd(), command, fds)
            .with_context(|| format!("sending {} to worker {}", command.name(), self.index))
    }

    /// Kills the current process; its exit is reported with `reason` and restarts it.
    pub fn kill(&mut self, reason: String) {
        self.lifecycle.killing(reason);
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
    }

    /// Handles the exit of generation `generation`; returns the delay before a restart, or
    /// `None` when the exit is stale or expected.
    pub fn exited(&mut self, generation: u64, status: &str) -> Option<Duration> {
        if generation != self.generation {
            return None;
        }
        self.control = None;
        self.kill = None;
        self.pid = None;
        self.lifecycle.exited(Instant::now(), status)
    }

    /// Marks generation `generation` ready, if it is still the current one.
    pub fn ready(&mut self, generation: u64) {
        if generation == self.generation {
            self.lifecycle.ready();
        }
    }

    /// Asks the worker to stop; it exits on its own, and is killed if it has not after a
    /// grace period (by `kill_on_drop` of the wait task's child when the runtime ends).
    pub fn stop(&mut self) {
        if self.pid.is_some() {
            let _ = self.send(&Command::Shutdown, &[]);
        }
        self.lifecycle.stopping();
        self.control = None;
    }
}

/// Sets the scheduling policy of process `pid`. `SCHED_RESET_ON_FORK`: a worker starts no
/// process, and none it might start could inherit a real-time policy.
fn set_scheduling(pid: u32, scheduling: Scheduling) -> io::Result<()> {
    let (policy, priority) = match scheduling {
        Scheduling::Normal => (libc::SCHED_OTHER, 0),
        Scheduling::Fifo { priority } => (libc::SCHED_FIFO, i32::from(priority)),
    };
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param that outlives the call, which only reads it.
    let result = unsafe {
        libc::sched_setscheduler(pid, policy | libc::SCHED_RESET_ON_FORK, &raw const param)
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Runs in a new worker between fork and exec: marks every descriptor above the control
/// socket close-on-exec, so that the worker starts with stdio and its control socket only,
/// whatever the supervisor inherited from whoever started it. Marked rather than closed: the
/// process-spawning code may still hold a descriptor it needs until the exec (the one that
/// reports a failed exec, and the one of the executable).
fn close_inherited_descriptors() -> io::Result<()> {
    let first = libc::c_uint::try_from(CONTROL_FD + 1).map_err(io::Error::other)?;
    let flags = libc::c_int::try_from(libc::CLOSE_RANGE_CLOEXEC).map_err(io::Error::other)?;
    // SAFETY: close_range only sets the close-on-exec flag of this process's descriptors.
    if unsafe { libc::close_range(first, libc::c_uint::MAX, flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An exit status as the log and `mcr status` show it; SIGSYS gets its meaning spelt out.
fn describe_exit(status: ExitStatus) -> String {
    if status.signal() == Some(Signal::SIGSYS as i32) {
        format!("{status}: a system call its seccomp filter does not allow")
    } else {
        status.to_string()
    }
}

/// Waits for the worker's one message back, [`command::READY`], and reports it.
async fn wait_until_ready(
    socket: OwnedFd,
    index: usize,
    generation: u64,
    events: mpsc::Sender<WorkerEvent>,
) {
    // SAFETY: the `OwnedFd` moves into the `AsyncFd` and stays open, the same descriptor,
    // for as long as the `AsyncFd` lives.
    let Ok(socket) = (unsafe { AsyncFd::register(socket) }) else {
        return;
    };
    let mut buffer = [0_u8; 16];
    loop {
        let Ok(mut guard) = socket.readable().await else {
            return;
        };
        match recv(socket.as_raw_fd(), &mut buffer, MsgFlags::MSG_DONTWAIT) {
            Ok(len) if &buffer[..len] == command::READY => {
                let _ = events.send(WorkerEvent::Ready { index, generation }).await;
                return;
            }
            Err(nix::Error::EAGAIN) => guard.clear_ready(),
            // End of file (the worker is gone; its exit is reported separately), an error, or
            // a message that is not the ready message: stop listening.
            Ok(_) | Err(_) => return,
        }
    }
}

/// Relays a worker's log lines into the supervisor's log, tagged with the worker.
async fn relay_log(index: usize, stderr: tokio::process::ChildStderr) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim();
        if let Some(message) = line.strip_prefix("ERROR ") {
            tracing::error!(worker = index, "{}", message.trim());
        } else if let Some(message) = line.strip_prefix("WARN ") {
            tracing::warn!(worker = index, "{}", message.trim());
        } else if let Some(message) = line.strip_prefix("INFO ") {
            tracing::info!(worker = index, "{}", message.trim());
        } else if let Some(message) = line.strip_prefix("DEBUG ") {
            tracing::debug!(worker = index, "{}", message.trim());
        } else if let Some(message) = line.strip_prefix("TRACE ") {
            tracing::trace!(worker = index, "{}", message.trim());
        } else {
            tracing::info!(worker = index, "{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(3);
    const SECOND: Duration = Duration::from_secs(1);

    fn running(now: Instant) -> Lifecycle {
        let mut lifecycle = Lifecycle::new(now);
        lifecycle.started(now);
        lifecycle.ready();
        lifecycle
    }

    #[test]
    fn a_crash_restarts_with_a_growing_back_off() {
        let now = Instant::now();
        let mut lifecycle = running(now);
        assert_eq!(
            lifecycle.exited(now, "signal: 9 (SIGKILL)"),
            Some(FIRST_BACKOFF)
        );
        assert_eq!(
            lifecycle.state(),
            &WorkerState::Restarting {
                reason: "exited: signal: 9 (SIGKILL)".into()
            }
        );
        assert!(lifecycle.wants_restart());
        lifecycle.started(now);
        lifecycle.ready();
        assert_eq!(lifecycle.exited(now, "x"), Some(FIRST_BACKOFF * 2));
        assert_eq!(lifecycle.restarts(), 2);
        // A worker that ran for a while before it crashed starts over with the first back-off.
        lifecycle.started(now);
        lifecycle.ready();
        assert_eq!(
            lifecycle.exited(now + STABLE_AFTER, "x"),
            Some(FIRST_BACKOFF)
        );
        assert_eq!(lifecycle.state().name(), "restarting");
    }

    #[test]
    fn a_start_that_keeps_failing_shows_as_failed_and_is_retried_at_the_longest_back_off() {
        let now = Instant::now();
        let mut lifecycle = running(now);
        lifecycle.exited(now, "signal: 9 (SIGKILL)");
        // The executable is gone: no process can be created.
        let error = "starting a worker: No such file or directory (os error 2)";
        lifecycle.start_failed(error.into());
        assert_eq!(lifecycle.state().name(), "restarting");
        lifecycle.start_failed(error.into());
        assert_eq!(lifecycle.state().name(), "restarting");
        assert_eq!(lifecycle.start_failed(error.into()), MAX_BACKOFF);
        assert_eq!(
            lifecycle.state(),
            &WorkerState::Failed {
                reason: error.into()
            }
        );
        assert!(
            lifecycle.wants_restart(),
            "a failed worker is still retried"
        );
        assert_eq!(lifecycle.start_failed(error.into()), MAX_BACKOFF);

        // Processes that die before they report ready count the same way, with their status.
        lifecycle.started(now);
        assert_eq!(lifecycle.exited(now, "exit status: 1"), Some(MAX_BACKOFF));
        assert_eq!(
            lifecycle.state(),
            &WorkerState::Failed {
                reason: "exited before it was ready: exit status: 1".into()
            }
        );

        // One start that gets as far as ready clears the record.
        lifecycle.started(now);
        lifecycle.ready();
        assert_eq!(lifecycle.state(), &WorkerState::Running);
        lifecycle.exited(now, "signal: 9 (SIGKILL)");
        assert_eq!(lifecycle.state().name(), "restarting");
    }

    #[test]
    fn workers_that_die_before_ready_fail_after_a_few_tries() {
        let now = Instant::now();
        let mut lifecycle = Lifecycle::new(now);
        let mut delays = Vec::new();
        for _ in 0..=FAILED_AFTER {
            lifecycle.started(now);
            delays.push(lifecycle.exited(now, "exit status: 1").expect("a restart"));
        }
        assert_eq!(
            delays,
            [FIRST_BACKOFF, FIRST_BACKOFF * 2, MAX_BACKOFF, MAX_BACKOFF]
        );
        assert_eq!(lifecycle.state().name(), "failed");
    }

    #[test]
    fn an_expected_exit_is_not_restarted() {
        let now = Instant::now();
        let mut lifecycle = running(now);
        lifecycle.stopping();
        assert_eq!(lifecycle.exited(now, "exit status: 0"), None);
        assert!(!lifecycle.wants_restart());
        assert_eq!(lifecycle.state(), &WorkerState::Stopped);
    }

    #[test]
    fn a_killed_worker_reports_why_it_was_killed() {
        let now = Instant::now();
        let mut lifecycle = running(now);
        lifecycle.killing("stalled".into());
        lifecycle.exited(now, "signal: 9 (SIGKILL)");
        assert_eq!(
            lifecycle.state(),
            &WorkerState::Restarting {
                reason: "stalled".into()
            }
        );
    }

    #[test]
    fn an_idle_worker_is_never_stalled() {
        let now = Instant::now();
        let mut lifecycle = running(now);
        for second in 0..10 {
            let at = now + SECOND * second;
            assert_eq!(lifecycle.observe(at, 5, false, TIMEOUT), Progress::Fine);
        }
        assert_eq!(lifecycle.state(), &WorkerState::Running);
    }

    #[test]
    fn a_busy_worker_is_never_stalled() {
        let now = Instant::now();
        let mut lifecycle = running(now);
        for second in 0..10 {
            let at = now + SECOND * second;
            assert_eq!(
                lifecycle.observe(at, 100 * u64::from(second), true, TIMEOUT),
                Progress::Fine
            );
        }
    }

    #[test]
    fn a_worker_that_stops_moving_with_packets_waiting_is_stalled_then_killed() {
        let now = Instant::now();
        let mut lifecycle = running(now);
        assert_eq!(lifecycle.observe(now, 7, false, TIMEOUT), Progress::Fine);
        // Packets wait and the counter has not moved: maybe they just arrived.
        assert_eq!(
            lifecycle.observe(now + SECOND, 7, true, TIMEOUT),
            Progress::Fine
        );
        assert_eq!(lifecycle.state(), &WorkerState::Running);
        // A second later, still not: stalled.
        assert_eq!(
            lifecycle.observe(now + SECOND * 2, 7, true, TIMEOUT),
            Progress::Stalled { newly: true }
        );
        assert_eq!(lifecycle.state().name(), "stalled");
        assert_eq!(
            lifecycle.observe(now + SECOND * 3, 7, true, TIMEOUT),
            Progress::Stalled { newly: false }
        );
        let Progress::Kill(reason) = lifecycle.observe(now + SECOND * 4, 7, true, TIMEOUT) else {
            panic!("not killed after the stall timeout");
        };
        assert!(
            reason.starts_with("stalled: no progress for 3 s"),
            "{reason}"
        );
        lifecycle.killing(reason.clone());
        lifecycle.exited(now + SECOND * 4, "signal: 9 (SIGKILL)");
        assert_eq!(lifecycle.state(), &WorkerState::Restarting { reason });
    }

    #[test]
    fn a_stalled_worker_that_moves_on_is_running_again() {
        let now = Instant::now();
        let mut lifecycle = running(now);
        lifecycle.observe(now, 7, true, TIMEOUT);
        lifecycle.observe(now + SECOND, 7, true, TIMEOUT);
        assert_eq!(
            lifecycle.observe(now + SECOND * 2, 7, true, TIMEOUT),
            Progress::Stalled { newly: true }
        );
        assert_eq!(
            lifecycle.observe(now + SECOND * 3, 8, true, TIMEOUT),
            Progress::Recovered
        );
        assert_eq!(lifecycle.state(), &WorkerState::Running);
        // The stall clock starts over.
        assert_eq!(
            lifecycle.observe(now + SECOND * 4, 8, true, TIMEOUT),
            Progress::Fine
        );
    }

    #[test]
    fn a_starting_worker_is_not_watched() {
        let now = Instant::now();
        let mut lifecycle = Lifecycle::new(now);
        lifecycle.started(now);
        for second in 0..10 {
            assert_eq!(
                lifecycle.observe(now + SECOND * second, 0, true, TIMEOUT),
                Progress::Fine
            );
        }
        assert_eq!(lifecycle.state(), &WorkerState::Starting);
    }
}
