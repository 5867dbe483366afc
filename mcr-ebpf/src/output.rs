//! The kernel path: the classifier writes each output of a rule itself and sends the copy
//! straight to the output interface's egress, with no socket, no copy to user space and no
//! route lookup.
//!
//! Per output the packet is rewritten in place (Ethernet addresses; IP source, destination,
//! TTL or hop limit and, when the output sets one, DSCP; UDP destination port; with
//! incremental checksum updates: `ipv4` and `ipv6`) and cloned to the output interface; the
//! last output takes the packet itself (`bpf_redirect`), which spares a copy. With local
//! delivery the last output is cloned too and the original headers are put back, so the
//! host's own stack sees the packet as it arrived. Outputs are of the input's own family;
//! one that is not is counted as an error and skipped.

mod ipv4;
mod ipv6;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    btf_maps::{HashMap, PerCpuArray},
    helpers::bpf_redirect,
    macros::btf_map,
    programs::TcContext,
};
use mcr_common::{
    KernelOutput, KernelOutputs, MAX_OUTPUTS, MAX_RULE_OUTPUTS, MAX_RULES, OutputCounters,
};

use crate::classify::{ETH_HLEN, Family, Matched};

/// `BPF_F_NO_PREALLOC`: elements are freed after an RCU grace period, so a classifier that
/// holds a rule's output set while the supervisor replaces it keeps reading the old one whole.
const NO_PREALLOC: usize = 1;

#[btf_map]
static MCR_KERNEL_OUTPUTS: HashMap<u32, KernelOutputs, { MAX_RULES as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map]
static MCR_OUTPUT_STATS: PerCpuArray<OutputCounters, { MAX_OUTPUTS as usize }> = PerCpuArray::new();

/// Offset of the UDP checksum in the UDP header.
const UDP_CHECKSUM: usize = 6;
/// Offset of the destination port in the UDP header.
const UDP_PORT: usize = 2;

/// Where the headers of a matched packet lie.
#[derive(Clone, Copy)]
struct Offsets {
    l3: usize,
    l4: usize,
}

/// A matched packet on its way to a rule's outputs.
struct Outgoing {
    at: Offsets,
    /// UDP payload bytes, for the counters.
    payload: u64,
    local_delivery: bool,
}

/// The header fields one family's outputs rewrite, as the bytes on the wire.
trait Headers: Copy {
    /// The fields of the packet in `ctx` as they are, or `None` if they cannot be read.
    fn read(ctx: &TcContext, at: Offsets) -> Option<Self>;

    /// Sets the fields that `output` writes, keeping the others (the input's, for a copy of
    /// them). False for an output of the other family.
    fn apply(&mut self, output: &KernelOutput) -> bool;

    /// Rewrites the packet's headers from `self`, what they are now, to `wanted`, with the
    /// incremental checksum updates.
    fn rewrite(&self, ctx: &TcContext, at: Offsets, wanted: &Self) -> Result<(), i64>;
}

/// The headers of a packet could not be read again: the kernel path did nothing with it.
pub struct Unreadable;

/// `send`'s verdict for `Unreadable`: no `TC_ACT_*` value.
const UNREADABLE: i32 = i32::MIN;

/// The output set of rule `slot`, if it runs on the kernel path.
#[expect(
    clippy::inline_always,
    reason = "the verifier follows the map value's bounds only within one function"
)]
#[inline(always)]
pub fn outputs_of(slot: u32) -> Option<&'static KernelOutputs> {
    // SAFETY: hash map values are not preallocated (`NO_PREALLOC`): a value the supervisor
    // replaces is freed only after an RCU grace period, which outlasts this program run.
    MCR_KERNEL_OUTPUTS
        .get_ptr(slot)
        .map(|outputs| unsafe { &*outputs })
}

/// Sends the `matched` packet to every output of `outputs` and returns the program's verdict:
/// the packet is consumed (redirected to the last output), or, with `local_delivery`, passed
/// on as it arrived.
#[expect(
    clippy::inline_always,
    reason = "a dispatch on the family, part of the classifier's own function"
)]
#[inline(always)]
pub fn relay(
    ctx: &TcContext,
    matched: &Matched,
    outputs: &KernelOutputs,
    local_delivery: bool,
) -> Result<i32, Unreadable> {
    let packet = Outgoing {
        at: Offsets {
            l3: ETH_HLEN,
            l4: matched.l4,
        },
        payload: matched.payload_len,
        local_delivery,
    };
    let verdict = match matched.family {
        Family::Ipv4 => send::<ipv4::Fields>(ctx, &packet, outputs),
        Family::Ipv6 => send::<ipv6::Fields>(ctx, &packet, outputs),
    };
    if verdict == UNREADABLE {
        return Err(Unreadable);
    }
    Ok(verdict)
}

/// The loop over a rule's outputs, for `packet`.
///
/// This, `write` and `rewrite` are functions of their own, one of each per family (BPF
/// subprograms): each has its own stack frame, where inlined into the classifier the headers
/// of both families, their copies and what the helper calls spill would not fit in one.
#[inline(never)]
fn send<H: Headers>(ctx: &TcContext, packet: &Outgoing, outputs: &KernelOutputs) -> i32 {
    let Some(input) = H::read(ctx, packet.at) else {
        return UNREADABLE;
    };
    let count = outputs.count as usize;
    // What the packet's headers hold now.
    let mut current = input;
    for index in 0..MAX_RULE_OUTPUTS {
        if index >= count {
            break;
        }
        let output = &outputs.outputs[index];
        if write(ctx, &packet.at, &input, &mut current, output) != 0 {
            count_output(output.counter, |c| c.errors += 1);
            continue;
        }
        if index + 1 == count && !packet.local_delivery {
            count_output(output.counter, |c| {
                c.packets += 1;
                c.bytes += packet.payload;
            });
            // SAFETY: a plain helper call; it only records where the packet goes next.
            let verdict = unsafe { bpf_redirect(output.ifindex, 0) };
            // `TC_ACT_REDIRECT`, or `TC_ACT_SHOT` when the flags are bad.
            return i32::try_from(verdict).unwrap_or(TC_ACT_SHOT);
        }
        match ctx.clone_redirect(output.ifindex, 0) {
            Ok(()) => count_output(output.counter, |c| {
                c.packets += 1;
                c.bytes += packet.payload;
            }),
            Err(_) => count_output(output.counter, |c| c.errors += 1),
        }
    }
    if packet.local_delivery {
        if rewrite(ctx, packet.at, &current, &input) != 0 {
            // Half-restored headers must not reach the host's stack.
            return TC_ACT_SHOT;
        }
        return TC_ACT_UNSPEC;
    }
    TC_ACT_SHOT
}

/// Rewrites the packet's headers from `current` to those of `output` (for a packet that
/// arrived with `input`), and records them there. Returns 0, or a negative error as the
/// helpers do: for an output of the other family (translating is the workers' job), and when
/// a helper fails. (A `Result` would take a sixth argument, more than BPF calls pass.)
#[inline(never)]
fn write<H: Headers>(
    ctx: &TcContext,
    at: &Offsets,
    input: &H,
    current: &mut H,
    output: &KernelOutput,
) -> i64 {
    let mut wanted = *input;
    if !wanted.apply(output) {
        return OTHER_FAMILY;
    }
    let status = rewrite(ctx, *at, current, &wanted);
    if status == 0 {
        *current = wanted;
    }
    status
}

/// Rewrites the packet's headers from `from` to `to`, both read where they are. Returns 0 or
/// the helpers' negative error.
#[inline(never)]
fn rewrite<H: Headers>(ctx: &TcContext, at: Offsets, from: &H, to: &H) -> i64 {
    match from.rewrite(ctx, at, to) {
        Ok(()) => 0,
        Err(error) => error,
    }
}

/// `write`'s error for an output of the other family: `EAFNOSUPPORT`, as a helper would say it.
const OTHER_FAMILY: i64 = -97;

/// Whether `output` holds IPv4 addresses: in the first four of its sixteen bytes, the other
/// twelve zero, for the source and the destination alike. An IPv6 output passes for one only
/// when both its addresses end in twelve zero bytes, and its source is an address of the
/// output interface: one that ends so (such as `2001:db8::`) is its prefix's subnet-router
/// anycast address, not one a host sends from.
#[expect(
    clippy::inline_always,
    reason = "read from the map value, whose bounds the verifier follows within one function"
)]
#[inline(always)]
fn holds_ipv4(output: &KernelOutput) -> bool {
    let mut tails = 0;
    for i in 4..16 {
        tails |= output.source[i] | output.destination[i];
    }
    tails == 0
}

/// A 16-bit field as the checksum helpers take it: its bytes in memory order.
fn word(bytes: [u8; 2]) -> u64 {
    u64::from(u16::from_ne_bytes(bytes))
}

fn count_output(counter: u32, bump: impl FnOnce(&mut OutputCounters)) {
    if let Some(counters) = MCR_OUTPUT_STATS.get_ptr_mut(counter) {
        // SAFETY: a per-CPU array slot belongs to this CPU for the duration of the program.
        bump(unsafe { &mut *counters });
    }
}
