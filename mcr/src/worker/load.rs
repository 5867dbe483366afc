//! The worker's page of the classifier's load map (`mcr_common::WorkerLoad`): it tells the
//! classifier how many packets it has taken, so that the classifier sheds packets the worker
//! could only have lost, before they cost a socket enqueue (the classifier's side is
//! `mcr-ebpf/src/load.rs`).

use std::{
    io,
    num::NonZeroUsize,
    os::fd::OwnedFd,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use mcr_common::{WORKER_LOAD_SIZE, WorkerLoad};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

/// This worker's page of the load map, mapped shared with the classifier.
pub struct LoadPage {
    page: NonNull<WorkerLoad>,
}

impl LoadPage {
    /// Maps page `worker` of the load map `map` (then closes the descriptor: the worker can
    /// reach no other page), sets what this worker has taken so far and the shedding `window`
    /// (`settings.shed_window`, which its sockets were sized for).
    pub fn map(map: OwnedFd, worker: u32, taken: u64, window: u64) -> io::Result<Self> {
        let length = NonZeroUsize::new(WORKER_LOAD_SIZE).expect("a page is not empty");
        let offset =
            i64::from(worker) * i64::try_from(WORKER_LOAD_SIZE).map_err(io::Error::other)?;
        // SAFETY: a shared mapping of one page of a BPF array map created mmapable, at the
        // page of this worker; nothing else in this process refers to that memory, and it
        // stays mapped until `drop` unmaps it.
        let address = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &map,
                offset,
            )?
        };
        drop(map);
        let page = Self {
            page: address.cast(),
        };
        // What the classifier counts as steered and forgiven stays as it was: packets that
        // wait in the sockets for this worker (its predecessor's, if it was restarted) are its
        // backlog. Forgiving them here would let the backlog go below zero as it takes them,
        // which the classifier reads as a full window and sheds everything until it idles.
        page.field(|load| &raw mut load.taken)
            .store(taken, Ordering::Relaxed);
        page.field(|load| &raw mut load.window)
            .store(window, Ordering::Relaxed);
        Ok(page)
    }

    /// One u64 field of the page, as an atomic shared with the classifier.
    fn field(&self, pick: impl FnOnce(&mut WorkerLoad) -> *mut u64) -> &AtomicU64 {
        // SAFETY: the page is mapped for as long as `self` lives, the field is an aligned u64
        // in it, and the classifier and this worker only ever access it whole.
        unsafe { AtomicU64::from_ptr(pick(&mut *self.page.as_ptr())) }
    }

    /// Tells the classifier how many packets this worker has taken from its sockets.
    pub fn taken(&self, taken: u64) {
        self.field(|load| &raw mut load.taken)
            .store(taken, Ordering::Relaxed);
    }

    /// The worker is idle, so nothing is queued for it: whatever the classifier still counts
    /// as its backlog was lost on the way (a socket that overflowed or closed) and is
    /// forgiven, so shedding counts from zero again.
    pub fn forgive_backlog(&self) {
        let steered = self
            .field(|load| &raw mut load.steered)
            .load(Ordering::Relaxed);
        let taken = self
            .field(|load| &raw mut load.taken)
            .load(Ordering::Relaxed);
        self.field(|load| &raw mut load.forgiven)
            .store(steered.wrapping_sub(taken), Ordering::Relaxed);
    }
}

impl Drop for LoadPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the page mapped in `map`; no reference outlives `self`.
        let _ = unsafe { munmap(self.page.cast(), WORKER_LOAD_SIZE) };
    }
}
