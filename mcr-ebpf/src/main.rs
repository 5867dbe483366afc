//! MCR's ingress classifier (TC ingress, attached to each input interface that has a rule).
//!
//! It parses Ethernet (with at most one 802.1Q tag), IPv4 and UDP, looks the destination up in
//! `MCR_RULES` (source-specific rules first, then any-source rules), counts a match in the
//! rule's per-CPU counters and marks it for steering (`skb->mark`, see
//! `mcr_common::steering_mark`). Every packet continues on its way, its bytes unaltered.
//!
//! Two socket programs complete the steering: `mcr_steer` is the fanout program of each input
//! interface's `AF_PACKET` sockets and picks the worker named in the mark; `mcr_admit` is the
//! filter on each of those sockets and admits only marked, incoming packets.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    btf_maps::{HashMap, PerCpuArray},
    macros::{btf_map, classifier, socket_filter},
    programs::{SkBuffContext, TcContext},
};
use mcr_common::{
    ANY_SOURCE, MAX_RULES, RuleCounters, RuleKey, RuleSlot, SkipCounters, is_steering_mark,
    mark_worker, steering_mark,
};

#[btf_map]
static MCR_RULES: HashMap<RuleKey, RuleSlot, { MAX_RULES as usize }> = HashMap::new();

#[btf_map]
static MCR_RULE_STATS: PerCpuArray<RuleCounters, { MAX_RULES as usize }> = PerCpuArray::new();

#[btf_map]
static MCR_SKIPS: PerCpuArray<SkipCounters, 1> = PerCpuArray::new();

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const VLAN_HLEN: usize = 4;
const IPPROTO_UDP: u8 = 17;
const UDP_HLEN: usize = 8;
/// More-fragments flag and fragment offset in the IPv4 `frag_off` field.
const IP_MF_AND_OFFSET: u16 = 0x3fff;

/// The IPv4 header fields the classifier reads, in wire order (no options).
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    total_len: [u8; 2],
    id: [u8; 2],
    frag_off: [u8; 2],
    ttl: u8,
    protocol: u8,
    checksum: [u8; 2],
    source: [u8; 4],
    destination: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UdpHeader {
    source_port: [u8; 2],
    destination_port: [u8; 2],
    len: [u8; 2],
    checksum: [u8; 2],
}

/// Why a multicast packet could not be classified.
enum Skip {
    /// Not for us at all (not IPv4, not multicast, not UDP, too short to tell): not counted.
    NotRelayable,
    Malformed,
    Fragment,
}

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the entry point signature is fixed by aya"
)]
pub fn mcr_classify(ctx: TcContext) -> i32 {
    match classify(&ctx) {
        Ok(()) | Err(Skip::NotRelayable) => {}
        Err(Skip::Malformed) => count_skip(|c| c.malformed += 1),
        Err(Skip::Fragment) => count_skip(|c| c.fragments += 1),
    }
    // Continue to the next program (TCX) or filter (clsact): the packet is never altered.
    TC_ACT_UNSPEC
}

/// The `T` at `offset` in the packet, read in place when the headers are in the linear part
/// of the skb (the usual case), copied out with `bpf_skb_load_bytes` otherwise.
#[expect(
    clippy::inline_always,
    reason = "the verifier tracks the packet bounds check only within one function"
)]
#[inline(always)]
fn header<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, Skip> {
    let start = ctx.data();
    if start + offset + size_of::<T>() <= ctx.data_end() {
        // SAFETY: the bounds check above is the one the verifier requires for direct packet
        // access; `T` is a plain byte layout (`#[repr(C)]` arrays and bytes), any value valid.
        return Ok(unsafe { core::ptr::read_unaligned((start + offset) as *const T) });
    }
    ctx.load(offset).map_err(|_| Skip::NotRelayable)
}

fn classify(ctx: &TcContext) -> Result<(), Skip> {
    let mut l3 = ETH_HLEN;
    let mut ethertype = u16::from_be_bytes(header::<[u8; 2]>(ctx, 12)?);
    if ethertype == ETH_P_8021Q {
        ethertype = u16::from_be_bytes(header::<[u8; 2]>(ctx, ETH_HLEN + 2)?);
        l3 += VLAN_HLEN;
    }
    if ethertype != ETH_P_IP {
        return Err(Skip::NotRelayable);
    }
    let ip: Ipv4Header = header(ctx, l3)?;
    // 224.0.0.0/4 only; everything else leaves at the cheapest possible point.
    if ip.destination[0] & 0xf0 != 0xe0 || ip.version_ihl >> 4 != 4 || ip.protocol != IPPROTO_UDP {
        return Err(Skip::NotRelayable);
    }
    let ihl = usize::from(ip.version_ihl & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes(ip.total_len));
    if ihl < 20 || total_len < ihl + UDP_HLEN {
        return Err(Skip::Malformed);
    }
    if u16::from_be_bytes(ip.frag_off) & IP_MF_AND_OFFSET != 0 {
        return Err(Skip::Fragment);
    }
    // IHL is at most 60: keeping the offset bounded lets the verifier follow it.
    let udp: UdpHeader = header(ctx, l3 + (ihl & 0x3c)).map_err(|_| Skip::Malformed)?;
    let udp_len = usize::from(u16::from_be_bytes(udp.len));
    if udp_len < UDP_HLEN || udp_len > total_len - ihl {
        return Err(Skip::Malformed);
    }

    // SAFETY: `ctx.skb.skb` is the `__sk_buff` the kernel handed to this program; reading a
    // field of it is what the verifier allows for a classifier.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let mut key = RuleKey {
        ifindex,
        group: ip.destination,
        source: ip.source,
        port: u16::from_be_bytes(udp.destination_port),
        pad: 0,
    };
    let slot = if let Some(slot) = MCR_RULES.get_ptr(key) {
        slot
    } else {
        key.source = ANY_SOURCE;
        MCR_RULES.get_ptr(key).ok_or(Skip::NotRelayable)?
    };
    // SAFETY: the verifier proved `slot` non-null; the value is read at once, before any other
    // map operation could recycle the entry.
    let RuleSlot {
        slot: index,
        worker,
    } = unsafe { *slot };
    ctx.set_mark(steering_mark(worker, index));
    if let Some(counters) = MCR_RULE_STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU array slot belongs to this CPU for the duration of the program.
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += (udp_len - UDP_HLEN) as u64;
        }
    }
    Ok(())
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

fn count_skip(bump: impl FnOnce(&mut SkipCounters)) {
    if let Some(counters) = MCR_SKIPS.get_ptr_mut(0) {
        // SAFETY: a per-CPU array slot belongs to this CPU for the duration of the program.
        bump(unsafe { &mut *counters });
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
