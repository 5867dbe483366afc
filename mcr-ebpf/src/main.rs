//! MCR's ingress classifier (TC ingress, attached to each input interface that has a rule).
//!
//! `classify` parses Ethernet, IPv4 and UDP, refuses what the host's own IPv4 input would
//! refuse or what belongs to another interface (VLAN-tagged frames), and looks the destination
//! up in `MCR_RULES` (source-specific rules first, then any-source rules). A packet of a rule
//! is counted in the rule's per-CPU counters and marked for steering (`skb->mark`, see
//! `mcr_common::steering_mark`), unless its TTL is below the rule's minimum. Every packet
//! continues on its way, its bytes unaltered; those not relayed are counted by reason in
//! `MCR_SKIPS`.
//!
//! Two socket programs complete the steering: `mcr_steer` is the fanout program of each input
//! interface's `AF_PACKET` sockets and picks the worker named in the mark; `mcr_admit` is the
//! filter on each of those sockets and admits only marked, incoming packets.
#![no_std]
#![no_main]

mod classify;

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    btf_maps::{HashMap, PerCpuArray},
    macros::{btf_map, classifier, socket_filter},
    programs::{SkBuffContext, TcContext},
};
use mcr_common::{
    MAX_RULES, RuleCounters, RuleKey, RuleSlot, SkipCounters, is_steering_mark, mark_worker,
    steering_mark,
};

use crate::classify::{Matched, Skip, classify};

#[btf_map]
static MCR_RULES: HashMap<RuleKey, RuleSlot, { MAX_RULES as usize }> = HashMap::new();

#[btf_map]
static MCR_RULE_STATS: PerCpuArray<RuleCounters, { MAX_RULES as usize }> = PerCpuArray::new();

#[btf_map]
static MCR_SKIPS: PerCpuArray<SkipCounters, 1> = PerCpuArray::new();

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the entry point signature is fixed by aya"
)]
pub fn mcr_classify(ctx: TcContext) -> i32 {
    match classify(&ctx) {
        Ok(matched) => steer(&ctx, &matched),
        Err(Skip::NotRelayable) => {}
        Err(skip) => count_skip(&skip),
    }
    // Continue to the next program (TCX) or filter (clsact): the packet is never altered.
    TC_ACT_UNSPEC
}

/// Marks a packet of a rule for the rule's worker and counts it, or only counts it when its
/// TTL is below the rule's minimum.
fn steer(ctx: &TcContext, matched: &Matched) {
    let RuleSlot {
        slot,
        worker,
        min_ttl,
        ..
    } = matched.rule;
    let relay = matched.ttl >= min_ttl;
    if relay {
        ctx.set_mark(steering_mark(worker, slot));
    }
    if let Some(counters) = MCR_RULE_STATS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU array slot belongs to this CPU for the duration of the program.
        let counters = unsafe { &mut *counters };
        if relay {
            counters.packets += 1;
            counters.bytes += matched.payload_len;
        } else {
            counters.below_min_ttl += 1;
        }
    }
}

/// `PACKET_OUTGOING`: a frame this host sends, seen by a packet socket on its way out.
const PACKET_OUTGOING: u32 = 4;

/// Socket filter of the workers' `AF_PACKET` sockets: the whole packet if the classifier marked
/// it and it is arriving, nothing otherwise.
#[socket_filter]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the entry point signature is fixed by aya"
)]
pub fn mcr_admit(ctx: SkBuffContext) -> i64 {
    // SAFETY: reading fields of the `__sk_buff` the kernel handed to this program.
    let (mark, pkt_type) = unsafe { ((*ctx.skb.skb).mark, (*ctx.skb.skb).pkt_type) };
    if is_steering_mark(mark) && pkt_type != PACKET_OUTGOING {
        i64::from(ctx.len())
    } else {
        0
    }
}

/// Fanout program of each input interface's socket group: the index of the socket, which is
/// the index of the worker, that receives the packet. The kernel takes it modulo the group
/// size. Unmarked packets go to socket 0, whose filter drops them.
#[socket_filter]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the entry point signature is fixed by aya"
)]
pub fn mcr_steer(ctx: SkBuffContext) -> i64 {
    // SAFETY: reading a field of the `__sk_buff` the kernel handed to this program.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if is_steering_mark(mark) {
        i64::from(mark_worker(mark))
    } else {
        0
    }
}

fn count_skip(skip: &Skip) {
    let Some(counters) = MCR_SKIPS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU array slot belongs to this CPU for the duration of the program.
    let counters = unsafe { &mut *counters };
    match skip {
        Skip::NotRelayable => {}
        Skip::Malformed => counters.malformed += 1,
        Skip::Fragment => counters.fragments += 1,
        Skip::Vlan => counters.vlan += 1,
        Skip::OtherHost => counters.other_host += 1,
        Skip::BadChecksum => counters.bad_checksum += 1,
        Skip::TtlZero => counters.ttl_zero += 1,
        Skip::BadSource => counters.bad_source += 1,
    }
}

// Host builds (clippy, tests) link std, which brings its own handler.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
