//! Starting, commanding and restarting the worker processes.

use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use command_fds::{CommandFdExt as _, FdMapping};
use nix::sys::{
    socket::{AddressFamily, MsgFlags, SockFlag, SockType, recv, setsockopt, socketpair, sockopt},
    time::TimeVal,
};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader, unix::AsyncFd},
    sync::mpsc,
};

use crate::{
    command::{self, Command},
    counters::SharedCounters,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerState {
    /// Started, still setting up as root.
    Starting,
    Running,
    Restarting,
    Stopped,
}

pub struct Worker {
    pub index: usize,
    pub cpu: Option<usize>,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub state: WorkerState,
    pub counters: SharedCounters,
    control: Option<OwnedFd>,
    generation: u64,
    started: Instant,
    backoff: Duration,
}

impl Worker {
    pub fn new(index: usize, cpu: Option<usize>) -> anyhow::Result<Self> {
        let counters = SharedCounters::create(&format!("mcr-worker-{index}"))
            .context("creating a worker's counter block")?;
        Ok(Self {
            index,
            cpu,
            pid: None,
            restarts: 0,
            state: WorkerState::Stopped,
            counters,
            control: None,
            generation: 0,
            started: Instant::now(),
            backoff: FIRST_BACKOFF,
        })
    }

    /// Starts the process and sends it `init`. The caller then replays inputs and rules.
    pub fn spawn(
        &mut self,
        user: (u32, u32),
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
        let exe = std::env::current_exe().context("locating the mcr binary")?;
        let mut command = tokio::process::Command::new(exe);
        command
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
        let mut child = command.spawn().context("starting a worker")?;
        self.generation += 1;
        self.pid = child.id();
        self.state = WorkerState::Starting;
        self.started = Instant::now();
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
        let events = events.clone();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => status.to_string(),
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
        };
        self.send(&init, &[self.counters.fd()])
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

    /// Handles the exit of generation `generation`; returns the delay before a restart, or
    /// `None` when the exit is stale or expected.
    pub fn exited(&mut self, generation: u64) -> Option<Duration> {
        if generation != self.generation {
            return None;
        }
        if self.state == WorkerState::Stopped {
            self.pid = None;
            return None;
        }
        self.control = None;
        self.pid = None;
        self.state = WorkerState::Restarting;
        self.restarts += 1;
        if self.started.elapsed() >= STABLE_AFTER {
            self.backoff = FIRST_BACKOFF;
        }
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Some(delay)
    }

    /// Marks generation `generation` ready, if it is still the current one.
    pub fn ready(&mut self, generation: u64) {
        if generation == self.generation && self.state == WorkerState::Starting {
            self.state = WorkerState::Running;
        }
    }

    /// Asks the worker to stop; it exits on its own, and is killed if it has not after a
    /// grace period (by `kill_on_drop` of the wait task's child when the runtime ends).
    pub fn stop(&mut self) {
        if matches!(self.state, WorkerState::Starting | WorkerState::Running) {
            let _ = self.send(&Command::Shutdown, &[]);
        }
        self.state = WorkerState::Stopped;
        self.control = None;
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
