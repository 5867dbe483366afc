//! Parsing and rule lookup: decides whether a frame is multicast UDP meant for this host and
//! link that a rule takes, and if not, why not.
//!
//! A frame is relayed only when the kernel's own IPv4 input would accept it on this interface:
//! untagged, addressed to this host's MAC or to a group, with a header that adds up and a
//! source a sender can have. Anything else is refused here, before any rule counts it.

use aya_ebpf::programs::TcContext;
use mcr_common::{ANY_SOURCE, RuleKey, RuleSlot};

use crate::MCR_RULES;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HLEN: usize = 4;
const IPPROTO_UDP: u8 = 17;
const IPV4_MIN_HLEN: usize = 20;
/// 4-byte words of IPv4 options at most (IHL 15 less the 5 words of the fixed header).
const IPV4_MAX_OPTION_WORDS: usize = 10;
const UDP_HLEN: usize = 8;
/// More-fragments flag and fragment offset in the IPv4 `frag_off` field.
const IP_MF_AND_OFFSET: u16 = 0x3fff;
/// `PACKET_OTHERHOST`: the frame's destination MAC is another host's unicast address.
const PACKET_OTHERHOST: u32 = 3;

/// The IPv4 header fields the classifier reads, in wire order (no options).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Header {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub checksum: [u8; 2],
    pub source: [u8; 4],
    pub destination: [u8; 4],
}

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
    /// Not multicast UDP over IPv4 at all, or no rule for it: not counted.
    NotRelayable,
    Malformed,
    Fragment,
    Vlan,
    OtherHost,
    BadChecksum,
    TtlZero,
    BadSource,
}

/// A packet of a rule: what the rule says about it, what its counters need, and where its
/// headers are for the kernel path.
pub struct Matched {
    pub rule: RuleSlot,
    pub ttl: u8,
    pub payload_len: u64,
    /// Length of the frame, Ethernet header included.
    pub frame_len: u32,
    /// Offset of the UDP header (the IPv4 header is at `ETH_HLEN`).
    pub l4: usize,
    pub ip: Ipv4Header,
    pub udp: UdpHeader,
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

fn is_vlan_tag(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

/// Classifies the frame in `ctx`: the rule that takes it, or why none does.
pub fn classify(ctx: &TcContext) -> Result<Matched, Skip> {
    // SAFETY: `ctx.skb.skb` is the `__sk_buff` the kernel handed to this program; reading its
    // fields is what the verifier allows for a classifier.
    let (vlan_present, pkt_type, ifindex, skb_len) = unsafe {
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
    if ethertype != ETH_P_IP {
        return Err(Skip::NotRelayable);
    }
    let ip: Ipv4Header = header(ctx, l3)?;
    // 224.0.0.0/4 only; everything else leaves at the cheapest possible point.
    if ip.destination[0] & 0xf0 != 0xe0 || ip.version_ihl >> 4 != 4 || ip.protocol != IPPROTO_UDP {
        return Err(Skip::NotRelayable);
    }
    // A tagged frame is the VLAN interface's traffic, whatever else is wrong with it. From
    // here on the IPv4 header is known to follow the untagged Ethernet header.
    if tagged {
        return Err(Skip::Vlan);
    }
    if pkt_type == PACKET_OTHERHOST {
        return Err(Skip::OtherHost);
    }

    // The kernel's IPv4 input checks (`ip_rcv_core`, `ip_route_input_mc`), in its order.
    let ihl = usize::from(ip.version_ihl & 0x0f) * 4;
    if ihl < IPV4_MIN_HLEN {
        return Err(Skip::Malformed);
    }
    if !checksum_adds_up(ctx, &ip, ihl)? {
        return Err(Skip::BadChecksum);
    }
    let total_len = usize::from(u16::from_be_bytes(ip.total_len));
    // `skb_len` counts the Ethernet header too.
    if total_len < ihl || total_len + ETH_HLEN > skb_len as usize {
        return Err(Skip::Malformed);
    }
    if ip.ttl == 0 {
        return Err(Skip::TtlZero);
    }
    if impossible_source(ip.source) {
        return Err(Skip::BadSource);
    }
    // Before the UDP checks: a non-first fragment carries no UDP header, and a short one
    // would look malformed.
    if u16::from_be_bytes(ip.frag_off) & IP_MF_AND_OFFSET != 0 {
        return Err(Skip::Fragment);
    }
    if total_len < ihl + UDP_HLEN {
        return Err(Skip::Malformed);
    }
    // IHL is at most 60: keeping the offset bounded lets the verifier follow it.
    let udp: UdpHeader = header(ctx, ETH_HLEN + (ihl & 0x3c)).map_err(|_| Skip::Malformed)?;
    let udp_len = usize::from(u16::from_be_bytes(udp.len));
    if udp_len < UDP_HLEN || udp_len > total_len - ihl {
        return Err(Skip::Malformed);
    }

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
    let rule = unsafe { *slot };
    Ok(Matched {
        rule,
        ttl: ip.ttl,
        payload_len: (udp_len - UDP_HLEN) as u64,
        frame_len: skb_len,
        l4: ETH_HLEN + (ihl & 0x3c),
        ip,
        udp,
    })
}

/// Sources the kernel refuses on input (martians): "this network" 0.0.0.0/8, loopback
/// 127.0.0.0/8, any multicast group and the limited broadcast. 240.0.0.0/4 is not among them:
/// Linux accepts it as a source, and some networks number hosts from it.
fn impossible_source(source: [u8; 4]) -> bool {
    source[0] == 0 || source[0] == 127 || source[0] & 0xf0 == 0xe0 || source == [255; 4]
}

/// Whether the one's-complement sum of the `ihl` header bytes, options included, is all ones.
#[expect(
    clippy::inline_always,
    reason = "the verifier tracks the packet bounds check only within one function"
)]
#[inline(always)]
fn checksum_adds_up(ctx: &TcContext, ip: &Ipv4Header, ihl: usize) -> Result<bool, Skip> {
    let word = |bytes: [u8; 2]| u32::from(u16::from_be_bytes(bytes));
    let mut sum = word([ip.version_ihl, ip.tos])
        + word(ip.total_len)
        + word(ip.id)
        + word(ip.frag_off)
        + word([ip.ttl, ip.protocol])
        + word(ip.checksum)
        + word([ip.source[0], ip.source[1]])
        + word([ip.source[2], ip.source[3]])
        + word([ip.destination[0], ip.destination[1]])
        + word([ip.destination[2], ip.destination[3]]);
    // A constant bound the verifier can count: IHL 15 has ten words of options.
    let option_words = (ihl - IPV4_MIN_HLEN) / 4;
    for i in 0..IPV4_MAX_OPTION_WORDS {
        if i >= option_words {
            break;
        }
        let option: [u8; 4] =
            header(ctx, ETH_HLEN + IPV4_MIN_HLEN + i * 4).map_err(|_| Skip::Malformed)?;
        sum += word([option[0], option[1]]) + word([option[2], option[3]]);
    }
    // At most 30 words of 16 bits: two folds carry everything back in.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    Ok(sum == 0xffff)
}
