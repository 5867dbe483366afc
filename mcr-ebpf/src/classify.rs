//! Parsing and rule lookup: decides whether a frame is multicast UDP meant for this host and
//! link that a rule takes, and if not, why not.
//!
//! A frame is relayed only when the kernel's own IPv4 or IPv6 input would accept it on this
//! interface: untagged, addressed to this host's MAC or to a group, with headers that add up
//! and a source a sender can have. Anything else is refused here, before any rule counts it.
//! This module reads the Ethernet header and the skb; `ipv4` and `ipv6` do the rest.

mod ipv4;
mod ipv6;

use aya_ebpf::{helpers::bpf_skb_load_bytes, programs::TcContext};
use mcr_common::RuleSlot;

pub use self::{ipv4::Ipv4Header, ipv6::Ipv6Header};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HLEN: usize = 4;
const UDP_HLEN: usize = 8;
/// `PACKET_OTHERHOST`: the frame's destination MAC is another host's unicast address.
const PACKET_OTHERHOST: u32 = 3;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHeader {
    pub source_port: [u8; 2],
    pub destination_port: [u8; 2],
    pub len: [u8; 2],
    pub checksum: [u8; 2],
}

/// Why a packet is not relayed. Every reason but the first has a counter in `MCR_SKIPS`.
pub enum Skip {
    /// Not multicast UDP at all, or no rule for it: not counted.
    NotRelayable,
    Malformed,
    Fragment,
    Vlan,
    OtherHost,
    BadChecksum,
    TtlZero,
    BadSource,
    ExtensionHeaders,
}

/// The network protocol of a matched packet.
#[derive(Clone, Copy)]
pub enum Family {
    Ipv4,
    Ipv6,
}

/// A packet of a rule: what the rule says about it, what its counters need, and where its
/// headers are for the kernel path (which reads them there again: carried along here, their
/// bytes would take more stack than the program has).
pub struct Matched {
    pub rule: RuleSlot,
    /// The IPv4 TTL or the IPv6 hop limit.
    pub ttl: u8,
    pub payload_len: u64,
    /// Length of the frame, Ethernet header included.
    pub frame_len: u32,
    /// Offset of the UDP header (the IP header is at `ETH_HLEN`).
    pub l4: usize,
    pub family: Family,
}

impl Matched {
    /// A `Matched` for a classification to fill in.
    const UNFILLED: Self = Self {
        rule: RuleSlot {
            slot: 0,
            worker: 0,
            min_ttl: 0,
            path: 0,
            flags: 0,
            pad: 0,
        },
        ttl: 0,
        payload_len: 0,
        frame_len: 0,
        l4: 0,
        family: Family::Ipv4,
    };
}

/// How a frame arrived: where its network header starts and what the skb says about it.
struct Arrival {
    /// Offset of the network header, after any VLAN tags left in the data.
    l3: usize,
    /// A VLAN tag was in the data or taken into the skb by the receive path.
    tagged: bool,
    pkt_type: u32,
    ifindex: u32,
    /// Length of the frame, Ethernet header included.
    len: u32,
}

impl Arrival {
    /// Refuses a frame that belongs to another link or host. A tagged frame is the VLAN
    /// interface's traffic, whatever else is wrong with it. After this the network header is
    /// known to follow the untagged Ethernet header.
    fn this_link_and_host(&self) -> Result<(), Skip> {
        if self.tagged {
            return Err(Skip::Vlan);
        }
        if self.pkt_type == PACKET_OTHERHOST {
            return Err(Skip::OtherHost);
        }
        Ok(())
    }
}

/// The `T` at `offset` in the packet, read in place when the headers are in the linear part
/// of the skb (the usual case), copied out with `bpf_skb_load_bytes` otherwise.
#[expect(
    clippy::inline_always,
    reason = "the verifier tracks the packet bounds check only within one function"
)]
#[inline(always)]
pub fn header<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, Skip> {
    let start = ctx.data();
    if start + offset + size_of::<T>() <= ctx.data_end() {
        // SAFETY: the bounds check above is the one the verifier requires for direct packet
        // access; `T` is a plain byte layout (`#[repr(C)]` arrays and bytes), any value valid.
        return Ok(unsafe { core::ptr::read_unaligned((start + offset) as *const T) });
    }
    ctx.load(offset).map_err(|_| Skip::NotRelayable)
}

/// Copies the `T` at `offset` in the packet into `out`, as `header` reads it. For headers that
/// are kept in memory: a value returned from either of two ways of reading it would be spread
/// over registers and spilled byte by byte, more stack than the program has.
#[expect(
    clippy::inline_always,
    reason = "the verifier tracks the packet bounds check only within one function"
)]
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "packet offsets and header sizes are far below 4 GiB"
)]
pub fn read_into<T: Copy>(ctx: &TcContext, offset: usize, out: &mut T) -> Result<(), i64> {
    let start = ctx.data();
    let destination = core::ptr::from_mut(out).cast::<u8>();
    if start + offset + size_of::<T>() <= ctx.data_end() {
        // SAFETY: the bounds check above is the one the verifier requires for direct packet
        // access; `T` is a plain byte layout, any bytes a valid value; `out` is exclusive.
        unsafe {
            core::ptr::copy_nonoverlapping(
                (start + offset) as *const u8,
                destination,
                size_of::<T>(),
            );
        }
        return Ok(());
    }
    // SAFETY: the helper writes exactly `size_of::<T>()` bytes to `out`, or fails.
    let result = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            offset as u32,
            destination.cast(),
            size_of::<T>() as u32,
        )
    };
    if result == 0 { Ok(()) } else { Err(result) }
}

fn is_vlan_tag(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

/// Classifies the frame in `ctx`: the rule that takes it, or why none does.
pub fn classify(ctx: &TcContext) -> Result<Matched, Skip> {
    // SAFETY: `ctx.skb.skb` is the `__sk_buff` the kernel handed to this program; reading its
    // fields is what the verifier allows for a classifier.
    let (vlan_present, pkt_type, ifindex, len) = unsafe {
        let skb = &*ctx.skb.skb;
        (skb.vlan_present, skb.pkt_type, skb.ifindex, skb.len)
    };

    // The receive path moves the outer tag into the skb before TC ingress runs; an inner tag
    // (QinQ) stays in the data. Look past at most two to learn whether the frame would be
    // multicast UDP at all, so that only those are counted as `vlan`.
    let mut l3 = ETH_HLEN;
    let mut ethertype = u16::from_be_bytes(header::<[u8; 2]>(ctx, 12)?);
    let mut tagged = vlan_present != 0;
    if is_vlan_tag(ethertype) {
        tagged = true;
        ethertype = u16::from_be_bytes(header::<[u8; 2]>(ctx, l3 + 2)?);
        l3 += VLAN_HLEN;
        if is_vlan_tag(ethertype) {
            ethertype = u16::from_be_bytes(header::<[u8; 2]>(ctx, l3 + 2)?);
            l3 += VLAN_HLEN;
        }
    }
    let arrival = Arrival {
        l3,
        tagged,
        pkt_type,
        ifindex,
        len,
    };
    let mut matched = Matched::UNFILLED;
    let skip = match ethertype {
        ETH_P_IP => classify_ipv4(ctx, &arrival, &mut matched),
        ETH_P_IPV6 => classify_ipv6(ctx, &arrival, &mut matched),
        _ => Some(Skip::NotRelayable),
    };
    match skip {
        None => Ok(matched),
        Some(skip) => Err(skip),
    }
}

// Each family is classified in a function of its own (a BPF subprogram), so that its stack
// frame is not added to the kernel path's. The result crosses the call as `matched` and the
// reason, if any, not as a `Result`: the kernel refuses the BTF of a Rust enum with fields.

/// Classifies an IPv4 frame into `matched`, or says why it is not relayed.
#[inline(never)]
fn classify_ipv4(ctx: &TcContext, arrival: &Arrival, matched: &mut Matched) -> Option<Skip> {
    match ipv4::classify(ctx, arrival) {
        Ok(found) => {
            *matched = found;
            None
        }
        Err(skip) => Some(skip),
    }
}

/// Classifies an IPv6 frame into `matched`, or says why it is not relayed.
#[inline(never)]
fn classify_ipv6(ctx: &TcContext, arrival: &Arrival, matched: &mut Matched) -> Option<Skip> {
    match ipv6::classify(ctx, arrival) {
        Ok(found) => {
            *matched = found;
            None
        }
        Err(skip) => Some(skip),
    }
}
