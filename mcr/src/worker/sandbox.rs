//! What a worker may still do once it forwards: the system calls of its loop (a seccomp
//! filter) and the operations of its `io_uring` (ring restrictions).
//!
//! Both are needed. An operation submitted through `io_uring` runs in the kernel without ever
//! passing seccomp, so a filter alone would still let a hijacked worker open files or sockets
//! through its ring; and restrictions alone would leave every plain system call open.

use std::{collections::BTreeMap, io};

use io_uring::{Submitter, opcode, register::Restriction, squeue};
use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use super::CONTROL_FD;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("restricting the io_uring to the worker's operations: {0}")]
    Ring(#[source] io::Error),
    #[error("enabling the restricted io_uring: {0}")]
    EnableRing(#[source] io::Error),
    #[error("building the seccomp filter: {0}")]
    Filter(#[from] seccompiler::BackendError),
    #[error("installing the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
}

/// The operations the forwarding loop submits: multishot receive (`IORING_OP_RECV`), a send
/// per unicast output, a `sendmsg` per framed multicast output, the poll on the control socket
/// and the cancel of a removed input's receive.
const RING_OPERATIONS: [u8; 5] = [
    opcode::RecvMulti::CODE,
    opcode::Send::CODE,
    opcode::SendMsg::CODE,
    opcode::PollAdd::CODE,
    opcode::AsyncCancel::CODE,
];

/// Allows only the forwarding loop's operations and submission flags on `submitter`'s ring,
/// then enables it. The ring must have been created disabled, and its buffer ring registered:
/// no further registration is allowed once the ring is restricted.
pub fn restrict_ring(submitter: &Submitter<'_>) -> Result<(), SandboxError> {
    let mut restrictions: Vec<Restriction> = RING_OPERATIONS
        .iter()
        .map(|&operation| Restriction::sqe_op(operation))
        .collect();
    // The receive picks its buffer from the buffer ring; nothing else sets a flag.
    restrictions.push(Restriction::sqe_flags_allowed(
        squeue::Flags::BUFFER_SELECT.bits(),
    ));
    submitter
        .register_restrictions(&mut restrictions)
        .map_err(SandboxError::Ring)?;
    submitter
        .register_enable_rings()
        .map_err(SandboxError::EnableRing)
}

/// Allows a system call whatever its arguments.
fn always() -> Vec<SeccompRule> {
    Vec::new()
}

/// Allows a system call when its argument `index` equals `value`.
fn when_equal(index: u8, value: u64) -> Result<Vec<SeccompRule>, SandboxError> {
    Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?])?])
}

/// Allows a memory mapping call whose protection (argument 2) is not executable.
fn not_executable() -> Result<Vec<SeccompRule>, SandboxError> {
    let exec = u64::try_from(libc::PROT_EXEC).unwrap_or(u64::MAX);
    Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(exec),
        0,
    )?])?])
}

/// The worker's system calls from the moment it reports ready until it exits, found by tracing
/// workers under traffic, rule and input changes, restarts and shutdown:
/// - `io_uring_enter`: the loop; everything else it does goes through the restricted ring;
/// - `recvmsg` on the control socket: commands and the sockets they carry; `sendto` on the
///   control socket: the one `ready` message;
/// - `write`/`writev` on standard error: log lines;
/// - `close`: sockets of removed inputs and rules;
/// - `mmap`, `mprotect` (never executable), `munmap`, `mremap`, `brk`, `madvise`: the allocator,
///   when a command adds rules, and unmapping at exit;
/// - `fcntl(F_GETFD)`: debug builds of the standard library check a descriptor before closing;
/// - `sigaltstack`, `exit`, `exit_group`: leaving; `rt_sigreturn`: returning from the
///   standard library's stack-overflow handler, which then aborts;
/// - `clock_gettime`: only where the vDSO cannot answer it (some virtual machines).
fn allowed_calls() -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
    let control = u64::try_from(CONTROL_FD).unwrap_or(u64::MAX);
    let stderr = u64::try_from(libc::STDERR_FILENO).unwrap_or(u64::MAX);
    let get_fd_flags = u64::try_from(libc::F_GETFD).unwrap_or(u64::MAX);
    Ok(BTreeMap::from([
        (libc::SYS_io_uring_enter, always()),
        (libc::SYS_recvmsg, when_equal(0, control)?),
        (libc::SYS_sendto, when_equal(0, control)?),
        (libc::SYS_write, when_equal(0, stderr)?),
        (libc::SYS_writev, when_equal(0, stderr)?),
        (libc::SYS_close, always()),
        (libc::SYS_fcntl, when_equal(1, get_fd_flags)?),
        (libc::SYS_mmap, not_executable()?),
        (libc::SYS_mprotect, not_executable()?),
        (libc::SYS_munmap, always()),
        (libc::SYS_mremap, always()),
        (libc::SYS_brk, always()),
        (libc::SYS_madvise, always()),
        (libc::SYS_sigaltstack, always()),
        (libc::SYS_rt_sigreturn, always()),
        (libc::SYS_exit, always()),
        (libc::SYS_exit_group, always()),
        (libc::SYS_clock_gettime, always()),
    ]))
}

/// The worker's seccomp filter, compiled.
///
/// Any other system call kills the worker (`SECCOMP_RET_KILL_PROCESS`) rather than failing
/// with `EPERM`. A worker parses packets from the network; a call outside its loop means a bug
/// or a hijacked worker, and either way it should stop at once and be seen: the supervisor logs
/// the exit as SIGSYS, counts the restart and starts a clean worker with the same sockets. With
/// `EPERM` a hijacked worker could go on probing unnoticed, and a legitimate call we missed
/// would turn into an error somewhere far from its cause.
pub fn syscall_filter() -> Result<BpfProgram, SandboxError> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(SandboxError::Filter)?;
    let filter = SeccompFilter::new(
        allowed_calls()?,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )?;
    Ok(filter.try_into()?)
}

/// Installs `filter` on the calling thread, for good. The worker has one thread, and the
/// filter forbids creating another.
pub fn confine(filter: &BpfProgram) -> Result<(), SandboxError> {
    seccompiler::apply_filter(filter)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        ffi::CStr,
        os::{fd::AsRawFd, unix::net::UnixDatagram},
    };

    use io_uring::{IoUring, types::Fd};
    use nix::{
        sys::{
            signal::Signal,
            wait::{WaitStatus, waitpid},
        },
        unistd::{ForkResult, fork},
    };

    use super::*;
    use crate::worker::{buffers::BufferRing, forward::new_ring};

    /// Runs `call` in a forked child that has installed the worker's filter; returns how the
    /// child ended. The child exits with status 0 if `call` returns.
    fn in_confined_child(filter: &BpfProgram, call: fn()) -> WaitStatus {
        // SAFETY: the child only installs the (already compiled) filter and makes raw system
        // calls before it exits: no allocation, no lock.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                if confine(filter).is_err() {
                    // SAFETY: leaving the child at once is always sound.
                    unsafe { libc::_exit(99) };
                }
                call();
                // SAFETY: as above.
                unsafe { libc::_exit(0) }
            }
            ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
        }
    }

    fn killed_by_sigsys(status: WaitStatus) -> bool {
        matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _))
    }

    #[test]
    fn the_filter_kills_a_worker_that_opens_a_socket_or_a_file_or_execs() {
        let filter = syscall_filter().expect("filter");
        let socket = in_confined_child(&filter, || {
            // SAFETY: a plain socket(2) call; the result is not used.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        });
        assert!(killed_by_sigsys(socket), "socket(): {socket:?}");
        let open = in_confined_child(&filter, || {
            const PATH: &CStr = c"/etc/hostname";
            // SAFETY: PATH is a valid C string; the result is not used.
            unsafe { libc::openat(libc::AT_FDCWD, PATH.as_ptr(), libc::O_RDONLY) };
        });
        assert!(killed_by_sigsys(open), "openat(): {open:?}");
        let exec = in_confined_child(&filter, || {
            const PATH: &CStr = c"/bin/true";
            let argv = [PATH.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: PATH, argv and envp are valid and null-terminated.
            unsafe { libc::execve(PATH.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        });
        assert!(killed_by_sigsys(exec), "execve(): {exec:?}");
        let mapping = in_confined_child(&filter, || {
            // SAFETY: an anonymous executable mapping; the result is not used.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
        });
        assert!(killed_by_sigsys(mapping), "executable mmap(): {mapping:?}");
        // The control: what the loop does is allowed, and the child exits by itself.
        let allowed = in_confined_child(&filter, || {
            // SAFETY: plain memory and descriptor calls on nothing the test owns.
            unsafe {
                let page = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                libc::munmap(page, 4096);
                libc::close(-1);
            }
        });
        assert!(
            matches!(allowed, WaitStatus::Exited(_, 0)),
            "allowed calls: {allowed:?}"
        );
    }

    /// Submits `entry` and returns its result.
    fn result_of(ring: &mut IoUring, entry: &squeue::Entry) -> i32 {
        // SAFETY: the entries of these tests point only at memory that outlives the wait.
        unsafe { ring.submission().push(entry) }.expect("queue has room");
        ring.submit_and_wait(1).expect("submit");
        ring.completion().next().expect("a completion").result()
    }

    #[test]
    fn the_restricted_ring_refuses_operations_the_loop_does_not_submit() {
        const PATH: &CStr = c"/etc/hostname";
        // As the worker builds it: disabled, buffers registered, restricted.
        let mut ring = new_ring().expect("ring");
        let _buffers = BufferRing::register(&ring.submitter()).expect("buffer ring");
        restrict_ring(&ring.submitter()).expect("restrictions");

        let open = opcode::OpenAt::new(Fd(libc::AT_FDCWD), PATH.as_ptr()).build();
        assert_eq!(result_of(&mut ring, &open), -libc::EACCES, "openat");
        let socket = opcode::Socket::new(libc::AF_INET, libc::SOCK_DGRAM, 0).build();
        assert_eq!(result_of(&mut ring, &socket), -libc::EACCES, "socket");

        let (ours, theirs) = UnixDatagram::pair().expect("socketpair");
        let payload = b"relayed";
        let send = opcode::Send::new(
            Fd(ours.as_raw_fd()),
            payload.as_ptr(),
            u32::try_from(payload.len()).expect("short"),
        )
        .build();
        // An allowed operation with a flag the loop never sets is refused too.
        let linked = send.clone().flags(squeue::Flags::IO_LINK);
        assert_eq!(result_of(&mut ring, &linked), -libc::EACCES, "linked send");
        let written = result_of(&mut ring, &send);
        assert_eq!(usize::try_from(written).ok(), Some(payload.len()), "send");
        let mut arrived = [0_u8; 16];
        let len = theirs.recv(&mut arrived).expect("recv");
        assert_eq!(&arrived[..len], payload);

        // And no new registration: no files, buffers or new restrictions on a restricted ring.
        let error = ring
            .submitter()
            .register_files(&[theirs.as_raw_fd()])
            .expect_err("registering a file");
        assert_eq!(error.raw_os_error(), Some(libc::EACCES));
    }
}
