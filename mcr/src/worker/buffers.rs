//! The provided-buffer ring a worker receives into: `ENTRIES` buffers of `BUFFER_SIZE` bytes,
//! registered with `io_uring` so a multishot receive picks a free one for each packet. A buffer
//! returns to the ring when the last send that reads from it has completed.

use std::{
    io,
    num::NonZeroUsize,
    ptr::NonNull,
    sync::atomic::{AtomicU16, Ordering},
};

use io_uring::{Submitter, types::BufRingEntry};
use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous, munmap};

/// Buffers in the ring (a power of two, at most 32768).
pub const ENTRIES: u16 = 2048;
/// Bytes per buffer: a 1500-byte MTU packet with room to spare. Longer packets arrive cut and
/// are counted as `too_big`.
pub const BUFFER_SIZE: usize = 2048;
/// The buffer group id of the ring.
pub const GROUP: u16 = 0;

/// One anonymous mapping, unmapped on drop.
struct Mapping {
    address: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Self> {
        let length = NonZeroUsize::new(len).ok_or(io::ErrorKind::InvalidInput)?;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let address = unsafe {
            mmap_anonymous(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_POPULATE,
            )?
        };
        Ok(Self {
            address: address.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly this mapping; the ring that pointed into it is unregistered
        // (or the io_uring closed) before the `BufferRing` holding it drops.
        let _ = unsafe { munmap(self.address.cast(), self.len) };
    }
}

pub struct BufferRing {
    entries: Mapping,
    buffers: Mapping,
    /// Next tail value to publish; the kernel consumes from its own head.
    tail: u16,
    /// Buffers in the ring, not held by the worker.
    available: usize,
}

impl BufferRing {
    /// Allocates the ring and its buffers and registers them with `submitter`'s `io_uring`.
    /// The `io_uring` must be dropped before the returned ring.
    pub fn register(submitter: &Submitter<'_>) -> io::Result<Self> {
        let entries = Mapping::new(usize::from(ENTRIES) * size_of::<BufRingEntry>())?;
        let buffers = Mapping::new(usize::from(ENTRIES) * BUFFER_SIZE)?;
        let mut ring = Self {
            entries,
            buffers,
            tail: 0,
            available: 0,
        };
        // SAFETY: the entry array is page-aligned (mmap), ENTRIES entries long, and lives in
        // `ring` until the io_uring that owns the registration is gone.
        unsafe {
            submitter.register_buf_ring_with_flags(
                ring.entries.address.as_ptr() as u64,
                ENTRIES,
                GROUP,
                0,
            )?;
        }
        for id in 0..ENTRIES {
            ring.recycle(id);
        }
        ring.publish();
        Ok(ring)
    }

    /// The first `len` bytes of buffer `id`.
    pub fn buffer(&self, id: u16, len: usize) -> &[u8] {
        let len = len.min(BUFFER_SIZE);
        let offset = usize::from(id % ENTRIES) * BUFFER_SIZE;
        // SAFETY: `offset + len` lies inside the buffer mapping; the kernel wrote this buffer
        // before posting the completion that named it, and will not touch it again until it
        // is recycled.
        unsafe { std::slice::from_raw_parts(self.buffers.address.as_ptr().add(offset), len) }
    }

    /// Marks that the kernel handed out one buffer.
    pub fn taken(&mut self) {
        self.available = self.available.saturating_sub(1);
    }

    pub fn available(&self) -> usize {
        self.available
    }

    /// Queues buffer `id` for reuse; it becomes visible to the kernel at the next `publish`.
    pub fn recycle(&mut self, id: u16) {
        let index = usize::from(self.tail & (ENTRIES - 1));
        let address = self.buffers.address.as_ptr() as u64 + (u64::from(id) * BUFFER_SIZE as u64);
        // SAFETY: `index` < ENTRIES, inside the entry mapping; the kernel reads entries only
        // up to the published tail, and this one is past it.
        let entry = unsafe { &mut *self.entry_array().add(index) };
        entry.set_addr(address);
        entry.set_len(u32::try_from(BUFFER_SIZE).expect("buffer size fits u32"));
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
        self.available += 1;
    }

    #[expect(
        clippy::cast_ptr_alignment,
        reason = "the entry array starts a page-aligned mapping"
    )]
    fn entry_array(&self) -> *mut BufRingEntry {
        self.entries.address.as_ptr().cast::<BufRingEntry>()
    }

    /// Makes the recycled buffers visible to the kernel.
    pub fn publish(&self) {
        let base = self.entry_array();
        // SAFETY: the tail field of the first entry is the ring's shared tail, a naturally
        // aligned u16 the kernel reads with acquire semantics.
        let tail = unsafe { &*BufRingEntry::tail(base).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }
}
