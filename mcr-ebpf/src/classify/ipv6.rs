//! IPv6: the fixed header, the extension headers before UDP (`mcr_common::ipv6::find_udp`),
//! the checks of the kernel's IPv6 input (`ip6_rcv_core`, and what its extension-header and
//! UDP handlers drop), then UDP and the lookup in `MCR_RULES6`.

use aya_ebpf::programs::TcContext;
use mcr_common::{
    ANY_SOURCE6, RuleKey6,
    ipv6::{
        HEADER_LEN, Transport, find_udp, impossible_source, may_arrive_on_a_link, multicast_scope,
    },
};

use super::{Arrival, ETH_HLEN, Family, Matched, Skip, UDP_HLEN, UdpHeader, header};
use crate::MCR_RULES6;

/// The fixed IPv6 header, in wire order.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Ipv6Header {
    /// Version, traffic class and the top four bits of the flow label: the 16-bit word that
    /// holds the DSCP.
    pub version_class: [u8; 2],
    pub flow_label: [u8; 2],
    pub payload_len: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub source: [u8; 16],
    pub destination: [u8; 16],
}

/// Classifies an IPv6 frame whose network header is at `arrival.l3`.
#[expect(
    clippy::inline_always,
    reason = "the verifier tracks the packet bounds checks only within one function"
)]
#[inline(always)]
pub(super) fn classify(ctx: &TcContext, arrival: &Arrival) -> Result<Matched, Skip> {
    let ip: Ipv6Header = header(ctx, arrival.l3)?;
    // ff00::/8 only; everything else leaves at the cheapest possible point.
    if ip.destination[0] != 0xff || ip.version_class[0] >> 4 != 6 {
        return Err(Skip::NotRelayable);
    }
    // Whether it is UDP at all takes the extension headers: MLD and neighbour discovery
    // (ICMPv6, some behind hop-by-hop options) leave here, uncounted. The walk stays within
    // the payload the header declares.
    let payload_len = usize::from(u16::from_be_bytes(ip.payload_len));
    let declared_end = arrival.l3 + HEADER_LEN + payload_len;
    let transport = find_udp(ip.next_header, arrival.l3 + HEADER_LEN, |offset| {
        if offset + 2 > declared_end {
            return None;
        }
        header::<[u8; 2]>(ctx, offset).ok()
    });
    if !transport.may_be_udp() {
        return Err(Skip::NotRelayable);
    }
    arrival.this_link_and_host()?;

    // `arrival.len` counts the Ethernet header too.
    let end = ETH_HLEN + HEADER_LEN + payload_len;
    if end > arrival.len as usize || !may_arrive_on_a_link(multicast_scope(&ip.destination)) {
        return Err(Skip::Malformed);
    }
    if ip.hop_limit == 0 {
        return Err(Skip::TtlZero);
    }
    if impossible_source(&ip.source) {
        return Err(Skip::BadSource);
    }
    let l4 = match transport {
        Transport::Udp {
            offset,
            routed: false,
        } => offset,
        Transport::Fragment => return Err(Skip::Fragment),
        Transport::TooDeep | Transport::Unfollowed => return Err(Skip::ExtensionHeaders),
        // The kernel drops a multicast packet with a routing header (`ipv6_rthdr_rcv`), and
        // one whose hop-by-hop options are not first.
        Transport::Udp { routed: true, .. }
        | Transport::MisplacedHopByHop
        | Transport::Truncated
        | Transport::NotUdp => return Err(Skip::Malformed),
    };
    if l4 + UDP_HLEN > end {
        return Err(Skip::Malformed);
    }
    let udp: UdpHeader = header(ctx, l4).map_err(|_| Skip::Malformed)?;
    let udp_len = usize::from(u16::from_be_bytes(udp.len));
    if udp_len < UDP_HLEN || udp_len > end - l4 {
        return Err(Skip::Malformed);
    }
    // No checksum is no UDP over IPv6 (RFC 8200 8.1): the kernel drops it, so does MCR. The
    // kernel path relies on this: a checksum it updates is never 0 to begin with.
    if udp.checksum == [0, 0] {
        return Err(Skip::BadChecksum);
    }

    let mut key = RuleKey6::new(
        arrival.ifindex,
        ip.destination,
        ip.source,
        u16::from_be_bytes(udp.destination_port),
    );
    let slot = if let Some(slot) = MCR_RULES6.get_ptr(key) {
        slot
    } else {
        key.source = ANY_SOURCE6;
        MCR_RULES6.get_ptr(key).ok_or(Skip::NotRelayable)?
    };
    // SAFETY: the verifier proved `slot` non-null; the value is read at once, before any other
    // map operation could recycle the entry.
    let rule = unsafe { *slot };
    Ok(Matched {
        rule,
        ttl: ip.hop_limit,
        payload_len: (udp_len - UDP_HLEN) as u64,
        frame_len: arrival.len,
        l4,
        family: Family::Ipv6,
    })
}
