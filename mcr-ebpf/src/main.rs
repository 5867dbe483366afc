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
mod output;

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    btf_maps::{HashMap, PerCpuArray},
    macros::{btf_map, classifier, socket_filter},
    programs::{SkBuffContext, TcContext},
};
use mcr_common::{
    MAX_RULES, PATH_KERNEL, RULE_LOCAL_DELIVERY, RuleCounters, RuleKey, RuleSlot, SkipCounters,
    is_steering_mark, mark_worker, steering_mark,
};

use crate::{
    classify::{ETH_HLEN, Matched, Skip, classify, header},
    output::{Fields, Packet},
};

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
/// TTL is only counted. Packets that are not relayed here continue on their way, unaltered
/// (`TC_ACT_UNSPEC`: the next program with TCX, the next filter with clsact).
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
    counters.packets += 1;
    counters.bytes += matched.payload_len;
    if rule.path == PATH_KERNEL
        && let Some(outputs) = output::outputs_of(rule.slot)
        && outputs.count > 0
    {
        // SAFETY: reading a field of the `__sk_buff` the kernel handed to this program.
        let aggregate = unsafe { (*ctx.skb.skb).gso_size } != 0;
        if matched.frame_len <= outputs.max_frame
            && !aggregate
            && let Ok(macs) = header::<[u8; 12]>(ctx, 0)
        {
            let packet = Packet {
                l3: ETH_HLEN,
                l4: matched.l4,
                payload: matched.payload_len,
                fields: Fields {
                    macs,
                    ttl_protocol: [matched.ip.ttl, matched.ip.protocol],
                    source: matched.ip.source,
                    destination: matched.ip.destination,
                    port: matched.udp.destination_port,
                },
            };
            let local_delivery = rule.flags & RULE_LOCAL_DELIVERY != 0;
            return output::relay(ctx, &packet, outputs, local_delivery);
        }
        // Too long for an output's MTU: the worker's sockets can fragment or refuse it and
        // count why; the kernel path would drop it unseen.
        counters.to_worker += 1;
    }
    ctx.set_mark(steering_mark(rule.worker, rule.slot));
    TC_ACT_UNSPEC
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
