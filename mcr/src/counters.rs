//! Egress and drop counters a worker keeps and the supervisor reads, in one shared memory
//! block per worker (a memfd the supervisor creates and hands over).
//!
//! The worker is the only writer of its block, so a counter is a plain load and store; the
//! supervisor reads with relaxed loads. The block outlives worker restarts: a restarted worker
//! maps the same memfd and its counters continue.

use std::{
    io,
    num::NonZeroUsize,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use nix::sys::{
    memfd::{MFdFlags, memfd_create},
    mman::{MapFlags, ProtFlags, mmap, munmap},
};

/// Most outputs (over all rules) one instance can hold.
pub const MAX_OUTPUTS: usize = mcr_common::MAX_OUTPUTS as usize;

/// Drops a worker counts before it knows the rule, by reason.
#[repr(C)]
#[derive(Default)]
pub struct WorkerTotals {
    /// Packets received from the `AF_PACKET` sockets.
    pub received: AtomicU64,
    /// Headers that contradict themselves (see `packet::ParseError::Malformed`).
    pub malformed: AtomicU64,
    /// Packets longer than a receive buffer (jumbo frames).
    pub too_big: AtomicU64,
    /// Packets whose rule the worker no longer has (removed while they were in flight).
    pub no_rule: AtomicU64,
    /// Times the receive stopped because every buffer was in use; what arrived meanwhile waits
    /// in the socket, and what overflowed it shows up as kernel drops.
    pub no_buffer: AtomicU64,
    /// Turns of the worker's loop: the supervisor compares readings to tell a stalled worker
    /// from a busy or an idle one.
    pub progress: AtomicU64,
    /// Sends the kernel accepted, to any output: each one packet, or a run of packets the
    /// kernel splits (decision 0014).
    pub sends: AtomicU64,
    /// Packets those sends carried; `sent / sends` is how many packets a send carries on
    /// average (1 when no runs form).
    pub sent: AtomicU64,
}

/// What one output sent.
#[repr(C)]
#[derive(Default)]
pub struct OutputCounters {
    pub packets: AtomicU64,
    /// UDP payload bytes.
    pub bytes: AtomicU64,
    /// Sends the kernel refused (unreachable destination, interface down, …).
    pub errors: AtomicU64,
    /// Packets not sent because the worker's send queue was full.
    pub queue_full: AtomicU64,
}

/// A plain-number copy of [`OutputCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutputTotals {
    pub packets: u64,
    pub bytes: u64,
    pub errors: u64,
    pub queue_full: u64,
}

impl OutputCounters {
    pub fn read(&self) -> OutputTotals {
        OutputTotals {
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            queue_full: self.queue_full.load(Ordering::Relaxed),
        }
    }
}

impl std::ops::Sub for OutputTotals {
    type Output = Self;

    fn sub(self, base: Self) -> Self {
        Self {
            packets: self.packets.saturating_sub(base.packets),
            bytes: self.bytes.saturating_sub(base.bytes),
            errors: self.errors.saturating_sub(base.errors),
            queue_full: self.queue_full.saturating_sub(base.queue_full),
        }
    }
}

impl std::ops::AddAssign for OutputTotals {
    fn add_assign(&mut self, other: Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.errors += other.errors;
        self.queue_full += other.queue_full;
    }
}

/// The layout of a worker's shared block.
#[repr(C)]
pub struct CounterBlock {
    pub totals: WorkerTotals,
    pub outputs: [OutputCounters; MAX_OUTPUTS],
}

/// Adds `by` to a counter only this process writes.
#[inline]
pub fn bump(counter: &AtomicU64, by: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

/// A mapped counter block.
pub struct SharedCounters {
    block: NonNull<CounterBlock>,
    fd: OwnedFd,
}

// SAFETY: the block is only accessed through atomics, which are safe to share between threads.
unsafe impl Send for SharedCounters {}
// SAFETY: as above.
unsafe impl Sync for SharedCounters {}

const BLOCK_SIZE: usize = size_of::<CounterBlock>();

impl SharedCounters {
    /// Creates a zeroed block backed by a new memfd.
    pub fn create(name: &str) -> io::Result<Self> {
        let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC)?;
        nix::unistd::ftruncate(&fd, i64::try_from(BLOCK_SIZE).map_err(io::Error::other)?)?;
        Self::map(fd)
    }

    /// Maps the block of `fd` (created by [`SharedCounters::create`]).
    pub fn map(fd: OwnedFd) -> io::Result<Self> {
        let size = nix::sys::stat::fstat(&fd)?.st_size;
        if usize::try_from(size).ok() != Some(BLOCK_SIZE) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("counter block has {size} bytes, expected {BLOCK_SIZE}"),
            ));
        }
        let length = NonZeroUsize::new(BLOCK_SIZE).expect("the block is not empty");
        // SAFETY: a fresh shared mapping of the whole memfd; nothing else in this process refers
        // to that memory, and it stays mapped until `drop` unmaps it.
        let address = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )?
        };
        Ok(Self {
            block: address.cast(),
            fd,
        })
    }

    pub fn block(&self) -> &CounterBlock {
        // SAFETY: the mapping is BLOCK_SIZE bytes, page-aligned, and zero bytes are a valid
        // `CounterBlock` (all atomics); it lives as long as `self`.
        unsafe { self.block.as_ref() }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for SharedCounters {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `map`; no reference outlives `self`.
        let _ = unsafe { munmap(self.block.cast(), BLOCK_SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_mappings_share_one_block() {
        let writer = SharedCounters::create("mcr-test").expect("memfd");
        let fd = writer.fd().try_clone_to_owned().expect("dup");
        let reader = SharedCounters::map(fd).expect("map");
        bump(&writer.block().outputs[7].packets, 3);
        bump(&writer.block().totals.malformed, 1);
        assert_eq!(reader.block().outputs[7].read().packets, 3);
        assert_eq!(reader.block().totals.malformed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn totals_subtract_a_baseline() {
        let now = OutputTotals {
            packets: 10,
            bytes: 100,
            errors: 1,
            queue_full: 0,
        };
        let base = OutputTotals {
            packets: 4,
            bytes: 40,
            errors: 1,
            queue_full: 0,
        };
        assert_eq!(
            now - base,
            OutputTotals {
                packets: 6,
                bytes: 60,
                errors: 0,
                queue_full: 0
            }
        );
    }
}
