//! MCR's ingress classifier (TC ingress, attached to each input interface that has a rule).
//!
//! `classify` parses Ethernet, IPv4 or IPv6 (with its extension headers) and UDP, refuses what
//! the host's own IP input would refuse or what belongs to another interface (VLAN-tagged
//! frames), and looks the destination up in `MCR_RULES` or `MCR_RULES6` (source-specific rules
//! first, then any-source rules). A packet of a rule is counted in the rule's per-CPU counters
//! and relayed (`relay`), unless its TTL or hop limit is below the rule's minimum. Every other
//! packet continues on its way, its bytes unaltered; those not relayed are counted by reason in
//! `MCR_SKIPS`.
//!
//! Two socket programs complete the steering: `mcr_steer` is the fanout program of each input
//! interface's `AF_PACKET` sockets and picks the worker named in the mark; `mcr_admit` is the
//! filter on each of those sockets and admits only marked, incoming packets.
#![no_std]
#![no_main]
#![cfg_attr(
    target_arch = "bpf",
    expect(
        unstable_features,
        reason = "BPF's atomic add is written in assembly (load.rs)"
    ),
    feature(asm_experimental_arch)
)]

mod classify;
mod load;
mod output;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    btf_maps::{HashMap, PerCpuArray},
    macros::{btf_map, classifier, socket_filter},
    programs::{SkBuffContext, TcContext},
};
use mcr_common::{
    MAX_RULES, PATH_KERNEL, RULE_LOCAL_DELIVERY, RuleCounters, RuleKey, RuleKey6, RuleSlot,
    SkipCounters, is_steering_mark, mark_worker, steering_mark,
};

use crate::classify::{Matched, Skip, classify};

#[btf_map]
static MCR_RULES: HashMap<RuleKey, RuleSlot, { MAX_RULES as usize }> = HashMap::new();

#[btf_map]
static MCR_RULES6: HashMap<RuleKey6, RuleSlot, { MAX_RULES as usize }> = HashMap::new();

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
        Ok(matched) => relay(&ctx, &matched),
        Err(Skip::NotRelayable) => TC_ACT_UNSPEC,
        Err(skip) => {
            count_skip(&skip);
            TC_ACT_UNSPEC
        }
    }
}

/// Relays a packet of a rule and counts it: the classifier writes the outputs itself (the
/// kernel path) or marks the packet for the rule's worker. A packet below the rule's minimum
/// TTL or hop limit is only counted. Packets that are not relayed here continue on their way,
/// unaltered (`TC_ACT_UNSPEC`: the next program with TCX, the next filter with clsact).
fn relay(ctx: &TcContext, matched: &Matched) -> i32 {
    let rule = matched.rule;
    let Some(counters) = MCR_RULE_STATS.get_ptr_mut(rule.slot) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: a per-CPU array slot belongs to this CPU for the duration of the program.
    let counters = unsafe { &mut *counters };
    if matched.ttl < rule.min_ttl {
        counters.below_min_ttl += 1;
        return TC_ACT_UNSPEC;
    }
    let local_delivery = rule.flags & RULE_LOCAL_DELIVERY != 0;
    if rule.path == PATH_KERNEL
        && let Some(outputs) = output::outputs_of(rule.slot)
        && outputs.count > 0
    {
        // SAFETY: reading a field of the `__sk_buff` the kernel handed to this program.
        let aggregate = unsafe { (*ctx.skb.skb).gso_size } != 0;
        if matched.frame_len <= outputs.max_frame
            && !aggregate
            && let Ok(verdict) = output::relay(ctx, matched, outputs, local_delivery)
        {
            counters.packets += 1;
            counters.bytes += matched.payload_len;
            return verdict;
        }
        // Too long for an output's MTU: the worker's sockets can fragment or refuse it and
        // count why; the kernel path would drop it unseen. (Also where the kernel path could
        // not read the headers again, which it sent nothing of.)
        counters.to_worker += 1;
    }
    if !load::admit(rule.worker) {
        // The worker is a full window behind: drop now, the cheapest place, rather than after
        // a socket enqueue that would overflow anyway.
        counters.shed += 1;
        return if local_delivery {
            TC_ACT_UNSPEC
        } else {
            TC_ACT_SHOT
        };
    }
    counters.packets += 1;
    counters.bytes += matched.payload_len;
    ctx.set_mark(steering_mark(rule.worker, rule.slot));
    // The worker's packet socket takes the packet before the host's IP input does. Without
    // local delivery the host has nothing to do with it: marked as another host's, it is
    // dropped at the first check of IPv4 or IPv6 input instead of being routed, looked up and
    // dropped.
    if !local_delivery {
        let _ = ctx.change_type(PACKET_OTHERHOST);
    }
    TC_ACT_UNSPEC
}

/// `PACKET_OTHERHOST`: a frame for another host, which IPv4 and IPv6 input drop first thing.
const PACKET_OTHERHOST: u32 = 3;

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
        Skip::ExtensionHeaders => counters.extension_headers += 1,
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
