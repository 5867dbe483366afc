//! `mcr worker`: one forwarding process. The supervisor starts it with its end of the control
//! socket as descriptor 3 and nothing else; everything a worker needs arrives as commands.
//! Before it reports ready it gives up its privileges and confines itself to its loop's
//! system calls and `io_uring` operations (see `sandbox`).

mod buffers;
mod forward;
mod frames;
mod load;
mod privileges;
mod sandbox;
mod segments;
mod slots;

use std::{
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    sync::atomic::Ordering,
    time::Duration,
};

use anyhow::{Context as _, bail};
use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sched::{CpuSet, sched_setaffinity},
    sys::signal::Signal,
    unistd::Pid,
};

use crate::{
    command::{self, Command, MAX_MESSAGE},
    counters::SharedCounters,
};

/// The descriptor of the control socket in a worker.
pub const CONTROL_FD: i32 = 3;

/// How long a new worker waits for its init command.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .without_time()
        .with_target(false)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    // Started through a descriptor of the executable, the process is named after its number.
    let _ = nix::sys::prctl::set_name(c"mcr-worker");

    // SAFETY: the supervisor maps its end of a socketpair to this descriptor when it starts the
    // worker; nothing else in this process owns it.
    let control = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
    let supervisor = nix::unistd::getppid();
    let (init, fds) = wait_for_init(&control)?;
    let Command::Init {
        worker,
        cpu,
        uid,
        gid,
        shed_window,
    } = init
    else {
        bail!("the first command was {}, not init", init.name());
    };
    let mut fds = fds.into_iter();
    let counters = SharedCounters::map(fds.next().context("init carries no counters")?)
        .context("mapping the counter block")?;
    let taken = counters.block().totals.received.load(Ordering::Relaxed);
    let load = load::LoadPage::map(
        fds.next().context("init carries no load map")?,
        worker,
        taken,
        shed_window,
    )
    .context("mapping this worker's page of the load map")?;
    if let Ok(name) = std::ffi::CString::new(format!("mcr-worker-{worker}")) {
        let _ = nix::sys::prctl::set_name(&name);
    }

    if let Some(cpu) = cpu {
        let mut set = CpuSet::new();
        set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
        sched_setaffinity(Pid::from_raw(0), &set)
            .with_context(|| format!("pinning to CPU {cpu}"))?;
    }
    // The ring and its buffers are set up while the process may still lock memory freely;
    // then the ring is restricted to what the loop submits, before it takes any submission.
    let mut ring = forward::new_ring().context("creating the io_uring")?;
    let buffers = buffers::Buffers::register(&ring.submitter())
        .context("registering the receive buffer ring")?;
    sandbox::restrict_ring(&ring.submitter())?;

    privileges::drop_to(uid, gid)?;
    // Die with the supervisor; set after the user switch, which clears it.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("setting the parent-death signal")?;
    if nix::unistd::getppid() != supervisor {
        bail!("the supervisor exited during start-up");
    }
    sandbox::confine(&sandbox::syscall_filter()?)?;
    tracing::info!(
        worker,
        ?cpu,
        uid,
        gid,
        shed_window,
        "worker ready: no capabilities, no_new_privs, seccomp filter, restricted io_uring"
    );
    nix::sys::socket::send(
        control.as_raw_fd(),
        command::READY,
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
    )
    .context("telling the supervisor this worker is ready")?;

    let mut forwarder = forward::Forwarder::new(control, counters, buffers, load);
    let result = forwarder.run(&mut ring);
    // The ring unregisters the buffers when it closes; it must go before they are unmapped.
    drop(ring);
    drop(forwarder);
    result
}

fn wait_for_init(control: &OwnedFd) -> anyhow::Result<(Command, Vec<OwnedFd>)> {
    let mut buffer = vec![0; MAX_MESSAGE];
    let mut fds = [PollFd::new(control.as_fd(), PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(INIT_TIMEOUT).unwrap_or(PollTimeout::MAX);
    if poll(&mut fds, timeout).context("waiting for init")? == 0 {
        bail!("no init command within {INIT_TIMEOUT:?}");
    }
    command::receive(control.as_fd(), &mut buffer)?.context("the control socket woke up empty")
}
