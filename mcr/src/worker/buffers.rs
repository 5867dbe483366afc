//! The provided-buffer rings a worker receives into, registered with `io_uring` so a multishot
//! receive picks a free buffer for each packet. A buffer returns to its ring when the last send
//! that reads from it has completed.
//!
//! Two rings: 2048 buffers of 2 KiB for inputs with a usual MTU, and 512 of 9 KiB for inputs
//! whose MTU is 2 KiB or more (jumbo frames). Each input receives into the ring its MTU needs,
//! so the common case keeps its small, cache-friendly buffers; the jumbo buffers are mapped
//! without being touched, so they cost no memory until an input uses them. Both are registered
//! when the worker starts, before its ring is restricted.

use std::{
    io,
    num::NonZeroUsize,
    ptr::NonNull,
    sync::atomic::{AtomicU16, Ordering},
};

use io_uring::{Submitter, types::BufRingEntry};
use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous, munmap};

/// One ring's shape.
struct Shape {
    /// Buffer group id.
    group: u16,
    /// Buffers (a power of two, at most 32768).
    entries: u16,
    /// Bytes per buffer. A packet this long or longer arrives cut and is counted `too_big`.
    size: usize,
    /// Whether the buffers are touched at once (the ring every worker uses).
    populate: bool,
}

const STANDARD: Shape = Shape {
    group: 0,
    entries: 2048,
    size: 2048,
    populate: true,
};

/// 9 KiB: a 9000-byte MTU packet with room to spare.
const JUMBO: Shape = Shape {
    group: 1,
    entries: 512,
    size: 9216,
    populate: false,
};

/// Which ring a buffer comes from; encoded with its id in one `u16` ([`Buffer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    Standard,
    Jumbo,
}

impl Ring {
    /// The ring an input whose interface has `mtu` receives into: a packet must be shorter
    /// than a buffer to be known whole.
    pub fn for_mtu(mtu: u32) -> Self {
        if (mtu as usize) < STANDARD.size {
            Self::Standard
        } else {
            Self::Jumbo
        }
    }

    pub fn group(self) -> u16 {
        self.shape().group
    }

    /// Bytes per buffer of this ring.
    pub fn buffer_size(self) -> usize {
        self.shape().size
    }

    fn shape(self) -> &'static Shape {
        match self {
            Self::Standard => &STANDARD,
            Self::Jumbo => &JUMBO,
        }
    }
}

/// A buffer: its ring in the top bit, its id in the ring below.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer(u16);

const JUMBO_BIT: u16 = 0x8000;

impl Buffer {
    pub fn new(ring: Ring, id: u16) -> Self {
        match ring {
            Ring::Standard => Self(id),
            Ring::Jumbo => Self(id | JUMBO_BIT),
        }
    }

    /// The buffer a `u16` from [`Buffer::raw`] names.
    pub fn from_raw(raw: u16) -> Self {
        Self(raw)
    }

    pub fn raw(self) -> u16 {
        self.0
    }

    pub fn ring(self) -> Ring {
        if self.0 & JUMBO_BIT == 0 {
            Ring::Standard
        } else {
            Ring::Jumbo
        }
    }

    fn id(self) -> u16 {
        self.0 & !JUMBO_BIT
    }
}

/// One anonymous mapping, unmapped on drop.
struct Mapping {
    address: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize, populate: bool) -> io::Result<Self> {
        let length = NonZeroUsize::new(len).ok_or(io::ErrorKind::InvalidInput)?;
        let mut flags = MapFlags::MAP_PRIVATE;
        if populate {
            flags |= MapFlags::MAP_POPULATE;
        }
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let address = unsafe {
            mmap_anonymous(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                flags,
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

/// One registered ring of buffers.
struct BufferRing {
    shape: &'static Shape,
    entries: Mapping,
    buffers: Mapping,
    /// Next tail value to publish; the kernel consumes from its own head.
    tail: u16,
    /// Buffers in the ring, not held by the worker.
    available: usize,
    /// Sends outstanding per buffer; the buffer returns to the ring when it drops to zero.
    pending: Vec<u16>,
}

impl BufferRing {
    fn register(submitter: &Submitter<'_>, shape: &'static Shape) -> io::Result<Self> {
        let entries = Mapping::new(usize::from(shape.entries) * size_of::<BufRingEntry>(), true)?;
        let buffers = Mapping::new(usize::from(shape.entries) * shape.size, shape.populate)?;
        let mut ring = Self {
            shape,
            entries,
            buffers,
            tail: 0,
            available: 0,
            pending: vec![0; usize::from(shape.entries)],
        };
        // SAFETY: the entry array is page-aligned (mmap), `entries` entries long, and lives in
        // `ring` until the io_uring that owns the registration is gone.
        unsafe {
            submitter.register_buf_ring_with_flags(
                ring.entries.address.as_ptr() as u64,
                shape.entries,
                shape.group,
                0,
            )?;
        }
        for id in 0..shape.entries {
            ring.recycle(id);
        }
        ring.publish();
        Ok(ring)
    }

    fn buffer(&self, id: u16, len: usize) -> &[u8] {
        let len = len.min(self.shape.size);
        let offset = usize::from(id % self.shape.entries) * self.shape.size;
        // SAFETY: `offset + len` lies inside the buffer mapping; the kernel wrote this buffer
        // before posting the completion that named it, and will not touch it again until it
        // is recycled.
        unsafe { std::slice::from_raw_parts(self.buffers.address.as_ptr().add(offset), len) }
    }

    fn recycle(&mut self, id: u16) {
        let index = usize::from(self.tail & (self.shape.entries - 1));
        let address = self.buffers.address.as_ptr() as u64
            + u64::from(id % self.shape.entries) * self.shape.size as u64;
        // SAFETY: `index` < entries, inside the entry mapping; the kernel reads entries only
        // up to the published tail, and this one is past it.
        let entry = unsafe { &mut *self.entry_array().add(index) };
        entry.set_addr(address);
        entry.set_len(u32::try_from(self.shape.size).expect("buffer size fits u32"));
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

    fn publish(&self) {
        let base = self.entry_array();
        // SAFETY: the tail field of the first entry is the ring's shared tail, a naturally
        // aligned u16 the kernel reads with acquire semantics.
        let tail = unsafe { &*BufRingEntry::tail(base).cast::<AtomicU16>() };
        tail.store(self.tail, Ordering::Release);
    }
}

/// Both rings.
pub struct Buffers {
    standard: BufferRing,
    jumbo: BufferRing,
}

impl Buffers {
    /// Allocates both rings and registers them with `submitter`'s `io_uring`, which must be
    /// dropped before the returned rings.
    pub fn register(submitter: &Submitter<'_>) -> io::Result<Self> {
        Ok(Self {
            standard: BufferRing::register(submitter, &STANDARD)?,
            jumbo: BufferRing::register(submitter, &JUMBO)?,
        })
    }

    fn ring(&self, ring: Ring) -> &BufferRing {
        match ring {
            Ring::Standard => &self.standard,
            Ring::Jumbo => &self.jumbo,
        }
    }

    fn ring_mut(&mut self, ring: Ring) -> &mut BufferRing {
        match ring {
            Ring::Standard => &mut self.standard,
            Ring::Jumbo => &mut self.jumbo,
        }
    }

    /// The first `len` bytes of `buffer`.
    pub fn buffer(&self, buffer: Buffer, len: usize) -> &[u8] {
        self.ring(buffer.ring()).buffer(buffer.id(), len)
    }

    /// Marks that the kernel handed out one buffer of `ring`.
    pub fn taken(&mut self, ring: Ring) {
        let ring = self.ring_mut(ring);
        ring.available = ring.available.saturating_sub(1);
    }

    /// Buffers of `ring` the kernel can still hand out.
    pub fn available(&self, ring: Ring) -> usize {
        self.ring(ring).available
    }

    /// Queues `buffer` for reuse; it becomes visible to the kernel at the next `publish`.
    pub fn recycle(&mut self, buffer: Buffer) {
        self.ring_mut(buffer.ring()).recycle(buffer.id());
    }

    /// Notes that `sends` sends read from `buffer`; it is recycled when the last completes.
    pub fn hold(&mut self, buffer: Buffer, sends: u16) {
        let ring = self.ring_mut(buffer.ring());
        ring.pending[usize::from(buffer.id())] = sends;
    }

    /// Notes that one send from `buffer` completed, and recycles it after the last.
    pub fn sent(&mut self, buffer: Buffer) {
        let ring = self.ring_mut(buffer.ring());
        let pending = &mut ring.pending[usize::from(buffer.id())];
        *pending = pending.saturating_sub(1);
        if *pending == 0 {
            ring.recycle(buffer.id());
        }
    }

    /// Makes the recycled buffers visible to the kernel.
    pub fn publish(&self) {
        self.standard.publish();
        self.jumbo.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_names_its_ring_and_id() {
        let standard = Buffer::new(Ring::Standard, 2047);
        assert_eq!((standard.ring(), standard.id()), (Ring::Standard, 2047));
        let jumbo = Buffer::from_raw(Buffer::new(Ring::Jumbo, 511).raw());
        assert_eq!((jumbo.ring(), jumbo.id()), (Ring::Jumbo, 511));
    }

    #[test]
    fn the_smallest_shedding_window_lets_a_worker_fill_its_ring() {
        // The classifier counts what the worker holds in its ring until the turn ends; a
        // window smaller than the ring would shed packets the worker has buffers for.
        assert!(crate::config::MIN_SHED_WINDOW >= u64::from(STANDARD.entries));
    }

    #[test]
    fn inputs_with_jumbo_mtus_take_the_big_buffers() {
        assert_eq!(Ring::for_mtu(1500), Ring::Standard);
        assert_eq!(Ring::for_mtu(2047), Ring::Standard);
        assert_eq!(Ring::for_mtu(2048), Ring::Jumbo);
        assert_eq!(Ring::for_mtu(9000), Ring::Jumbo);
        assert!(Ring::Jumbo.buffer_size() > 9000);
    }
}
