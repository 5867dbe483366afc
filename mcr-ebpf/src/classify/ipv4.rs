//! IPv4: the checks of the kernel's IPv4 input (`ip_rcv_core`, `ip_route_input_mc`), in its
//! order, then UDP and the lookup in `MCR_RULES`.

use aya_ebpf::programs::TcContext;
use mcr_common::{ANY_SOURCE, RuleKey};

use super::{Arrival, ETH_HLEN, Family, Matched, Skip, UDP_HLEN, UdpHeader, header};
use crate::MCR_RULES;

const IPPROTO_UDP: u8 = 17;
const IPV4_MIN_HLEN: usize = 20;
/// 4-byte words of IPv4 options at most (IHL 15 less the 5 words of the fixed header).
const IPV4_MAX_OPTION_WORDS: usize = 10;
/// More-fragments flag and fragment offset in the IPv4 `frag_off` field.
const IP_MF_AND_OFFSET: u16 = 0x3fff;

/// The IPv4 header fields the classifier reads, in wire order (no options).
#[repr(C)]
#[derive(Clone, Copy, Default)]
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

/// Classifies an IPv4 frame whose network header is at `arrival.l3`.
#[expect(
    clippy::inline_always,
    reason = "the verifier tracks the packet bounds checks only within one function"
)]
#[inline(always)]
pub(super) fn classify(ctx: &TcContext, arrival: &Arrival) -> Result<Matched, Skip> {
    let ip: Ipv4Header = header(ctx, arrival.l3)?;
    // 224.0.0.0/4 only; everything else leaves at the cheapest possible point.
    if ip.destination[0] & 0xf0 != 0xe0 || ip.version_ihl >> 4 != 4 || ip.protocol != IPPROTO_UDP {
        return Err(Skip::NotRelayable);
    }
    arrival.this_link_and_host()?;

    let ihl = usize::from(ip.version_ihl & 0x0f) * 4;
    if ihl < IPV4_MIN_HLEN {
        return Err(Skip::Malformed);
    }
    if !checksum_adds_up(ctx, &ip, ihl)? {
        return Err(Skip::BadChecksum);
    }
    let total_len = usize::from(u16::from_be_bytes(ip.total_len));
    // `arrival.len` counts the Ethernet header too.
    if total_len < ihl || total_len + ETH_HLEN > arrival.len as usize {
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
        ifindex: arrival.ifindex,
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
        frame_len: arrival.len,
        l4: ETH_HLEN + (ihl & 0x3c),
        family: Family::Ipv4,
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
