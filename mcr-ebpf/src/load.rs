//! Shedding: how far behind each worker is, and whether it can take one more packet.
//!
//! Each worker has a page of `MCR_WORKER_LOAD` mapped into its memory (`mcr_common::WorkerLoad`):
//! the classifier counts what it steers there, the worker what it has taken from its sockets.
//! A worker a full window behind gets nothing more until it catches up; its packets are
//! dropped in the classifier, which costs a map lookup instead of a socket enqueue, a queue
//! overflow and a pass through the host's IPv4 input.

use core::ptr::read_volatile;

use aya_ebpf::{btf_maps::Array, macros::btf_map};
use mcr_common::{MAX_WORKERS, WorkerLoad, window_full};

/// `BPF_F_MMAPABLE`: workers map their own page of the array into their memory.
const MMAPABLE: usize = 1 << 10;

#[btf_map]
static MCR_WORKER_LOAD: Array<WorkerLoad, { MAX_WORKERS as usize }, MMAPABLE> = Array::new();

/// Whether `worker` can take one more packet; if so, it is counted as steered to it, and if
/// not, as shed.
#[expect(
    clippy::inline_always,
    reason = "one map lookup per packet, kept in the caller's frame"
)]
#[inline(always)]
pub fn admit(worker: u32) -> bool {
    let Some(load) = MCR_WORKER_LOAD.get_ptr_mut(worker) else {
        return true;
    };
    // SAFETY: the pointer is the map value's, valid for the program run; the fields are u64,
    // naturally aligned in a page-sized value and shared with the worker through the mapping:
    // each is read once, whole (an aligned 64-bit load), and the counters are added to with
    // BPF's atomic add. The figures are an estimate, not a lock.
    unsafe {
        let steered = read_volatile(&raw const (*load).steered);
        let taken = read_volatile(&raw const (*load).taken);
        let forgiven = read_volatile(&raw const (*load).forgiven);
        let window = read_volatile(&raw const (*load).window);
        if window_full(steered, taken, forgiven, window) {
            atomic_add(&raw mut (*load).shed, 1);
            return false;
        }
        atomic_add(&raw mut (*load).steered, 1);
    }
    true
}

/// Adds `value` to `*counter` atomically: several CPUs may steer to one worker at once.
/// (Rust has no atomic read-modify-write on this target, which lacks compare-and-swap; the
/// instruction is BPF's atomic add, which the verifier accepts on map values.)
///
/// # Safety
///
/// `counter` points to a naturally aligned `u64` in a map value.
#[expect(
    clippy::inline_always,
    reason = "one instruction; the verifier needs the map value pointer in the same frame"
)]
#[inline(always)]
unsafe fn atomic_add(counter: *mut u64, value: u64) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: the caller gives a map value's aligned u64; `lock +=` is BPF_ATOMIC | BPF_ADD.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({counter} + 0) += {value}",
            counter = in(reg) counter,
            value = in(reg) value,
        );
    }
    // Host builds (clippy, unit tests) never run the program.
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: as above.
    unsafe {
        *counter = (*counter).wrapping_add(value);
    }
}
