//! Parsing what a worker's `AF_PACKET` socket delivers: an IPv4 or IPv6 packet (the socket is
//! `SOCK_DGRAM`, so the link header is already gone) carrying one UDP datagram; and the ones'
//! complement arithmetic of the UDP checksum, which an IPv6 output needs.
//!
//! The classifier has checked the same headers, but the worker trusts nothing it did not check
//! itself: every field that decides what is sent is bounds-checked here.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    ops::Range,
};

/// The parts of a received datagram that forwarding needs, whatever its family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    /// Sender and destination group, which also say the packet's family.
    pub addresses: Addresses,
    pub source_port: u16,
    pub destination_port: u16,
    /// The DSCP/ECN byte: the IPv4 TOS or the IPv6 traffic class.
    pub dscp_ecn: u8,
    /// The UDP checksum as received. 0 means the sender sent none, which only IPv4 allows.
    pub udp_checksum: u16,
    /// Where the UDP payload lies in the buffer.
    pub payload: Range<usize>,
}

/// A packet's source and destination; one variant, so both are of the same family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addresses {
    V4 {
        source: Ipv4Addr,
        destination: Ipv4Addr,
    },
    V6 {
        source: Ipv6Addr,
        destination: Ipv6Addr,
    },
}

/// Why a packet cannot be forwarded. Each is a named drop reason in the statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Headers that contradict themselves or the packet: unknown version, short header,
    /// lengths that do not fit, not UDP, a fragment, IPv6 extension headers the worker does
    /// not walk (or too many), an IPv6 jumbogram or an IPv6 datagram without UDP checksum.
    Malformed,
    /// The packet is longer than the receive buffer (a jumbo frame): only part of it arrived.
    TooBig,
}

const IPV4_MIN_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const UDP_HEADER: usize = 8;
const IPPROTO_UDP: u8 = 17;
const MORE_FRAGMENTS_AND_OFFSET: u16 = 0x3fff;

/// IPv6 extension headers the worker steps over; any other (a fragment header above all) makes
/// the packet malformed. Each is at least 8 bytes: next header, length in 8-byte units beyond
/// the first 8, then its body.
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const DESTINATION_OPTIONS: u8 = 60;
/// Most extension headers walked before UDP: enough for any chain a sender of multicast UDP
/// has a reason to build (hop-by-hop, destination options, routing, destination options),
/// and a bound on the work a crafted packet can cost.
const MAX_EXTENSION_HEADERS: usize = 4;

/// Parses `packet`, of which `received` bytes arrived into a buffer of `capacity` bytes.
pub fn parse(packet: &[u8], capacity: usize) -> Result<Datagram, ParseError> {
    match packet.first().map(|first| first >> 4) {
        Some(4) => parse_ipv4(packet, capacity),
        Some(6) => parse_ipv6(packet, capacity),
        _ => Err(ParseError::Malformed),
    }
}

/// What a packet shorter than its header says is: cut by the kernel when it filled the
/// buffer, malformed otherwise.
fn short(packet: &[u8], capacity: usize) -> ParseError {
    if packet.len() >= capacity {
        ParseError::TooBig
    } else {
        ParseError::Malformed
    }
}

fn parse_ipv4(packet: &[u8], capacity: usize) -> Result<Datagram, ParseError> {
    let header = packet.get(..IPV4_MIN_HEADER).ok_or(ParseError::Malformed)?;
    let header_len = usize::from(header[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if total_len > packet.len() {
        return Err(short(packet, capacity));
    }
    if header_len < IPV4_MIN_HEADER
        || total_len < header_len + UDP_HEADER
        || header[9] != IPPROTO_UDP
        || u16::from_be_bytes([header[6], header[7]]) & MORE_FRAGMENTS_AND_OFFSET != 0
    {
        return Err(ParseError::Malformed);
    }
    let udp = &packet[header_len..header_len + UDP_HEADER];
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if udp_len < UDP_HEADER || header_len + udp_len > total_len {
        return Err(ParseError::Malformed);
    }
    Ok(Datagram {
        addresses: Addresses::V4 {
            source: Ipv4Addr::new(header[12], header[13], header[14], header[15]),
            destination: Ipv4Addr::new(header[16], header[17], header[18], header[19]),
        },
        source_port: u16::from_be_bytes([udp[0], udp[1]]),
        destination_port: u16::from_be_bytes([udp[2], udp[3]]),
        dscp_ecn: header[1],
        udp_checksum: u16::from_be_bytes([udp[6], udp[7]]),
        payload: header_len + UDP_HEADER..header_len + udp_len,
    })
}

fn parse_ipv6(packet: &[u8], capacity: usize) -> Result<Datagram, ParseError> {
    let header = packet.get(..IPV6_HEADER).ok_or(ParseError::Malformed)?;
    let end = IPV6_HEADER + usize::from(u16::from_be_bytes([header[4], header[5]]));
    // Everything after the payload (Ethernet padding) is ignored from here on. A payload
    // length of 0 announces a jumbogram (RFC 2675), whose true length hides in a hop-by-hop
    // option: with nothing after the fixed header, it fails as malformed below.
    let packet = packet.get(..end).ok_or_else(|| short(packet, capacity))?;
    let mut next = header[6];
    let mut offset = IPV6_HEADER;
    for position in 0..MAX_EXTENSION_HEADERS {
        match next {
            IPPROTO_UDP => break,
            // Only right after the fixed header (RFC 8200 4.1); Linux drops it anywhere else.
            HOP_BY_HOP if position == 0 => {}
            ROUTING | DESTINATION_OPTIONS => {}
            _ => return Err(ParseError::Malformed),
        }
        let extension = packet
            .get(offset..offset + 8)
            .ok_or(ParseError::Malformed)?;
        // Segments left: the destination is a waypoint, not the packet's group.
        if next == ROUTING && extension[3] != 0 {
            return Err(ParseError::Malformed);
        }
        next = extension[0];
        offset += (usize::from(extension[1]) + 1) * 8;
    }
    if next != IPPROTO_UDP {
        return Err(ParseError::Malformed);
    }
    // Also fails when the last extension header claimed more than the payload holds.
    let udp = packet
        .get(offset..offset + UDP_HEADER)
        .ok_or(ParseError::Malformed)?;
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    let udp_checksum = u16::from_be_bytes([udp[6], udp[7]]);
    // The UDP checksum is mandatory over IPv6 (RFC 8200 8.1); a receiver drops a datagram
    // without one, and IPv6 outputs derive their checksum from it.
    if udp_len < UDP_HEADER || offset + udp_len > end || udp_checksum == 0 {
        return Err(ParseError::Malformed);
    }
    let address = |at: usize| {
        let octets: [u8; 16] = header[at..at + 16]
            .try_into()
            .expect("a 16-byte range of the 40-byte fixed header");
        Ipv6Addr::from(octets)
    };
    Ok(Datagram {
        addresses: Addresses::V6 {
            source: address(8),
            destination: address(24),
        },
        source_port: u16::from_be_bytes([udp[0], udp[1]]),
        destination_port: u16::from_be_bytes([udp[2], udp[3]]),
        // Version (4 bits), traffic class (8), flow label (20): the class straddles bytes 0-1.
        dscp_ecn: (header[0] << 4) | (header[1] >> 4),
        udp_checksum,
        payload: offset + UDP_HEADER..offset + udp_len,
    })
}

impl Datagram {
    /// The ones' complement sum of the UDP payload, which an output's UDP checksum adds its
    /// own pseudo-header and UDP header to.
    ///
    /// When the packet carries a complete UDP checksum this takes no walk over the payload:
    /// the checksum is the complement of the sum of pseudo-header, UDP header and payload, so
    /// the payload's part is the checksum's complement less the other two. That also keeps the
    /// sender's protection end to end: a payload corrupted before it reached the relay gives an
    /// output checksum that fails at the receiver, as the input's would have, rather than one
    /// computed afresh over the corrupted bytes.
    ///
    /// The payload is summed instead when there is no checksum (IPv4 allows 0) and when the
    /// checksum is only the partial one a sender leaves for checksum offload: the sum of the
    /// pseudo-header, which a veth pair, a bridge or a local sender passes on as it is
    /// (`CHECKSUM_PARTIAL`), the NIC or the receiving stack being meant to finish it. A
    /// complete checksum that happens to equal that value (one packet in 65,536) is summed
    /// too, which is always right.
    pub fn payload_sum(&self, packet: &[u8]) -> OnesComplementSum {
        let udp_len = u16::try_from(self.payload.len() + UDP_HEADER)
            .expect("parse took the payload's length from a 16-bit UDP length");
        let pseudo_header = pseudo_header_sum(&self.addresses, udp_len);
        if self.udp_checksum == 0 || same_sum(self.udp_checksum, pseudo_header.fold()) {
            let payload = packet.get(self.payload.clone()).unwrap_or_default();
            return OnesComplementSum::new().bytes(payload);
        }
        let headers = pseudo_header
            .word(self.source_port)
            .word(self.destination_port)
            .word(udp_len);
        OnesComplementSum::new()
            .word(!self.udp_checksum)
            .subtract(headers)
    }
}

/// Whether two folded sums are the same number: zero has two forms, 0 and 0xffff.
fn same_sum(a: u16, b: u16) -> bool {
    a == b || matches!((a, b), (0, 0xffff) | (0xffff, 0))
}

/// The sum of the UDP pseudo-header for `addresses` and a UDP length of `udp_len` (RFC 768
/// for IPv4, RFC 8200 8.1 for IPv6: the same words in another order, which a sum ignores).
pub fn pseudo_header_sum(addresses: &Addresses, udp_len: u16) -> OnesComplementSum {
    let sum = match addresses {
        Addresses::V4 {
            source,
            destination,
        } => OnesComplementSum::new()
            .bytes(&source.octets())
            .bytes(&destination.octets()),
        Addresses::V6 {
            source,
            destination,
        } => OnesComplementSum::new()
            .bytes(&source.octets())
            .bytes(&destination.octets()),
    };
    sum.word(u16::from(IPPROTO_UDP)).word(udp_len)
}

/// A sum in ones' complement arithmetic of big-endian 16-bit words (RFC 1071), as the IPv4
/// header and UDP checksums use it. Carries gather in a wide accumulator and are folded back
/// once, in [`OnesComplementSum::fold`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OnesComplementSum(u64);

impl OnesComplementSum {
    pub const fn new() -> Self {
        Self(0)
    }

    /// Adds `bytes` as 16-bit words, an odd last byte padded with a zero: only the last slice
    /// added to a sum may have an odd length.
    #[must_use]
    pub fn bytes(self, bytes: &[u8]) -> Self {
        // Four bytes at a time: a 32-bit word adds the same as its two halves, because
        // 2^16 is 1 in ones' complement arithmetic; the accumulator cannot overflow for any
        // length a packet has.
        let mut sum = self.0;
        let mut words = bytes.chunks_exact(4);
        for word in &mut words {
            sum += u64::from(u32::from_be_bytes([word[0], word[1], word[2], word[3]]));
        }
        match *words.remainder() {
            [a, b, c] => sum += u64::from(u16::from_be_bytes([a, b])) + (u64::from(c) << 8),
            [a, b] => sum += u64::from(u16::from_be_bytes([a, b])),
            [a] => sum += u64::from(a) << 8,
            _ => {}
        }
        Self(sum)
    }

    #[must_use]
    pub fn word(self, word: u16) -> Self {
        Self(self.0 + u64::from(word))
    }

    #[must_use]
    pub fn plus(self, other: Self) -> Self {
        Self(self.0 + u64::from(other.fold()))
    }

    /// Takes `other` away: in ones' complement, adding its complement.
    #[must_use]
    pub fn subtract(self, other: Self) -> Self {
        self.word(!other.fold())
    }

    /// The sum in sixteen bits. Zero has two forms, 0 and 0xffff, which add alike to any other
    /// sum.
    pub fn fold(self) -> u16 {
        let mut sum = self.0;
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        u16::try_from(sum).expect("folded into sixteen bits above")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4/UDP packet 10.1.0.1:4000 -> 239.1.1.1:5000 with `payload`.
    fn packet(payload: &[u8]) -> Vec<u8> {
        let total = u16::try_from(20 + 8 + payload.len()).expect("test packets are small");
        let udp_len = u16::try_from(8 + payload.len()).expect("test packets are small");
        let mut p = vec![
            0x45, 0, 0, 0, 0, 0, 0x40, 0, 16, 17, 0, 0, 10, 1, 0, 1, 239, 1, 1, 1,
        ];
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&4000_u16.to_be_bytes());
        p.extend_from_slice(&5000_u16.to_be_bytes());
        p.extend_from_slice(&udp_len.to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn parses_a_datagram() {
        let p = packet(b"hello");
        let datagram = parse(&p, 2048).expect("valid");
        assert_eq!(
            datagram.addresses,
            Addresses::V4 {
                source: Ipv4Addr::new(10, 1, 0, 1),
                destination: Ipv4Addr::new(239, 1, 1, 1),
            }
        );
        assert_eq!(datagram.source_port, 4000);
        assert_eq!(datagram.destination_port, 5000);
        assert_eq!(datagram.udp_checksum, 0, "sent without checksum");
        assert_eq!(&p[datagram.payload], b"hello");
    }

    #[test]
    fn ethernet_padding_is_not_payload() {
        let mut p = packet(b"hi");
        p.extend_from_slice(&[0; 16]);
        let datagram = parse(&p, 2048).expect("valid");
        assert_eq!(&p[datagram.payload], b"hi");
    }

    #[test]
    fn ip_options_move_the_udp_header() {
        let mut p = packet(b"opt");
        p[0] = 0x46;
        p.splice(20..20, [1, 1, 1, 0]); // four bytes of NOP/EOL options
        let total = u16::from_be_bytes([p[2], p[3]]) + 4;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        let datagram = parse(&p, 2048).expect("valid");
        assert_eq!(&p[datagram.payload], b"opt");
    }

    type Mutation = Box<dyn Fn(&mut Vec<u8>)>;

    #[test]
    fn rejects_what_cannot_be_forwarded() {
        let good = packet(b"data");
        let cases: [(&str, Mutation); 8] = [
            ("empty", Box::new(|p: &mut Vec<u8>| p.clear())),
            ("short header", Box::new(|p: &mut Vec<u8>| p.truncate(19))),
            ("version 6", Box::new(|p: &mut Vec<u8>| p[0] = 0x65)),
            ("IHL 4", Box::new(|p: &mut Vec<u8>| p[0] = 0x44)),
            ("TCP", Box::new(|p: &mut Vec<u8>| p[9] = 6)),
            ("fragment", Box::new(|p: &mut Vec<u8>| p[6] = 0x20)),
            (
                "UDP length beyond IP",
                Box::new(|p: &mut Vec<u8>| p[25] = 200),
            ),
            (
                "UDP length below header",
                Box::new(|p: &mut Vec<u8>| p[25] = 7),
            ),
        ];
        for (name, mutate) in cases {
            let mut p = good.clone();
            mutate(&mut p);
            assert_eq!(parse(&p, 2048), Err(ParseError::Malformed), "{name}");
        }
    }

    #[test]
    fn a_cut_packet_is_too_big_when_the_buffer_was_full() {
        let p = packet(&[7; 100]);
        assert_eq!(parse(&p[..64], 64), Err(ParseError::TooBig));
        assert_eq!(parse(&p[..64], 2048), Err(ParseError::Malformed));
    }

    /// What must hold for any packet `parse` accepts: the payload lies inside the packet, right
    /// after the UDP header, exactly as long as the UDP length says, and the addresses and
    /// port are the header's.
    fn assert_consistent(p: &[u8], datagram: &Datagram) {
        let header_len = usize::from(p[0] & 0x0f) * 4;
        let total_len = usize::from(u16::from_be_bytes([p[2], p[3]]));
        let udp = &p[header_len..header_len + 8];
        let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
        assert_eq!(p[0] >> 4, 4, "version");
        assert_eq!(p[9], IPPROTO_UDP, "protocol");
        assert_eq!(u16::from_be_bytes([p[6], p[7]]) & 0x3fff, 0, "a fragment");
        assert!(header_len + udp_len <= total_len && total_len <= p.len());
        assert_eq!(datagram.payload.start, header_len + UDP_HEADER);
        assert_eq!(datagram.payload.len(), udp_len - UDP_HEADER);
        assert!(datagram.payload.end <= p.len());
        assert_eq!(
            datagram.addresses,
            Addresses::V4 {
                source: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
                destination: Ipv4Addr::new(p[16], p[17], p[18], p[19]),
            }
        );
        assert_eq!(
            datagram.destination_port,
            u16::from_be_bytes([udp[2], udp[3]])
        );
    }

    #[test]
    fn every_prefix_is_rejected_with_the_right_reason() {
        let good = packet(&[1, 2, 3, 4, 5, 6, 7, 8]);
        for len in 0..good.len() {
            let cut = &good[..len];
            // In a larger buffer the packet is shorter than its header says: malformed.
            assert_eq!(parse(cut, 2048), Err(ParseError::Malformed), "{len} bytes");
            // In a buffer it filled, it was cut to fit: too big, once the length is readable.
            let expected = if len < IPV4_MIN_HEADER {
                ParseError::Malformed
            } else {
                ParseError::TooBig
            };
            assert_eq!(parse(cut, len), Err(expected), "{len} bytes, full buffer");
        }
        let whole = parse(&good, 2048).expect("the whole packet");
        assert_eq!(&good[whole.payload], [1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn every_byte_flip_is_rejected_or_parsed_consistently() {
        let good = packet(&[1, 2, 3, 4, 5, 6, 7, 8]);
        // Bytes forwarding does not depend on: TOS, ID, TTL, header checksum, addresses,
        // ports, UDP checksum and payload. Changing them never makes a packet unparsable.
        let free = |i: usize| matches!(i, 1 | 4 | 5 | 8 | 10..=23 | 26..);
        let mut accepted = 0;
        for i in 0..good.len() {
            for value in [0, 1, 0x45, 0x7f, 0x80, 0xff] {
                let mut p = good.clone();
                p[i] = value;
                match parse(&p, 2048) {
                    Ok(datagram) => {
                        assert_consistent(&p, &datagram);
                        accepted += 1;
                    }
                    Err(error) => assert!(
                        !free(i),
                        "byte {i} = {value:#04x} should not matter, got {error:?}"
                    ),
                }
                if i == 0 {
                    assert_eq!(
                        parse(&p, 2048).is_ok(),
                        value == 0x45,
                        "version/IHL {value:#04x}"
                    );
                }
                if i == 9 {
                    assert_eq!(
                        parse(&p, 2048).is_ok(),
                        value == IPPROTO_UDP,
                        "protocol {value}"
                    );
                }
            }
        }
        // Most flips land on bytes that do not matter: the checks above did run.
        assert!(accepted > 100, "only {accepted} flips were accepted");
    }

    // IPv6.

    const SOURCE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
    const GROUP6: Ipv6Addr = Ipv6Addr::new(0xff3e, 0, 0, 0, 0, 0, 0x1, 0x2);

    /// RFC 1071 the slow way, sixteen bits at a time: the reference the worker's sums are
    /// checked against.
    fn reference_sum(bytes: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
            sum = (sum & 0xffff) + (sum >> 16);
        }
        u16::try_from(sum).expect("folded at every step")
    }

    /// The UDP checksum a sender puts in `udp` (header with checksum 0, then payload).
    fn reference_udp_checksum(pseudo_addresses: &[u8], udp: &[u8]) -> u16 {
        let mut all = pseudo_addresses.to_vec();
        all.extend_from_slice(&[0, 17]);
        all.extend_from_slice(&u16::try_from(udp.len()).expect("small").to_be_bytes());
        all.extend_from_slice(udp);
        match !reference_sum(&all) {
            0 => 0xffff,
            checksum => checksum,
        }
    }

    /// An IPv6/UDP packet `[fd00::1]:4000` -> `[ff3e::1:2]:5000`, traffic class 0xb9 and flow
    /// label 0xabcde, with a valid UDP checksum, and extension headers `(next header value,
    /// length in 8-byte units beyond the first 8)` in order, their bodies zero (padding
    /// options; for a routing header, type 0 with no segments left).
    fn packet6(payload: &[u8], extensions: &[(u8, u8)]) -> Vec<u8> {
        let mut p = vec![0x6b, 0x9a, 0xbc, 0xde, 0, 0, 0, 64];
        p.extend_from_slice(&SOURCE6.octets());
        p.extend_from_slice(&GROUP6.octets());
        p[6] = extensions.first().map_or(IPPROTO_UDP, |&(kind, _)| kind);
        for (i, &(_, units)) in extensions.iter().enumerate() {
            let next = extensions.get(i + 1).map_or(IPPROTO_UDP, |&(kind, _)| kind);
            let mut extension = vec![0; (usize::from(units) + 1) * 8];
            extension[0] = next;
            extension[1] = units;
            p.extend_from_slice(&extension);
        }
        let udp_at = p.len();
        let udp_len = u16::try_from(8 + payload.len()).expect("test packets are small");
        p.extend_from_slice(&4000_u16.to_be_bytes());
        p.extend_from_slice(&5000_u16.to_be_bytes());
        p.extend_from_slice(&udp_len.to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        let checksum = reference_udp_checksum(&p[8..40], &p[udp_at..]);
        p[udp_at + 6..udp_at + 8].copy_from_slice(&checksum.to_be_bytes());
        let payload_len = u16::try_from(p.len() - 40).expect("test packets are small");
        p[4..6].copy_from_slice(&payload_len.to_be_bytes());
        p
    }

    #[test]
    fn parses_an_ipv6_datagram() {
        let p = packet6(b"hello", &[]);
        let datagram = parse(&p, 2048).expect("valid");
        assert_eq!(
            datagram.addresses,
            Addresses::V6 {
                source: SOURCE6,
                destination: GROUP6,
            }
        );
        assert_eq!(datagram.source_port, 4000);
        assert_eq!(datagram.destination_port, 5000);
        assert_eq!(datagram.udp_checksum, u16::from_be_bytes([p[46], p[47]]));
        assert_eq!(&p[datagram.payload], b"hello");
    }

    #[test]
    fn the_traffic_class_straddles_the_first_two_bytes() {
        let p = packet6(b"x", &[]);
        // 0x6b 0x9a: version 6, class 0xb9, then the flow label, which must not leak in.
        assert_eq!(parse(&p, 2048).expect("valid").dscp_ecn, 0xb9);
        let mut q = p.clone();
        q[0] = 0x60;
        q[1] = 0x3f;
        assert_eq!(parse(&q, 2048).expect("valid").dscp_ecn, 0x03, "ECN only");
        q[0] = 0x6f;
        q[1] = 0xc0;
        assert_eq!(parse(&q, 2048).expect("valid").dscp_ecn, 0xfc);
    }

    #[test]
    fn ipv6_extension_headers_are_stepped_over() {
        let chain = [(HOP_BY_HOP, 0), (DESTINATION_OPTIONS, 1), (ROUTING, 2)];
        let p = packet6(b"beyond", &chain);
        let datagram = parse(&p, 2048).expect("valid");
        assert_eq!(datagram.payload.start, 40 + 8 + 16 + 24 + 8);
        assert_eq!(&p[datagram.payload], b"beyond");
        assert_eq!(datagram.destination_port, 5000);
        // Ethernet padding after the payload is not payload.
        let mut padded = p.clone();
        padded.extend_from_slice(&[0xee; 12]);
        assert_eq!(
            &padded[parse(&padded, 2048).expect("valid").payload],
            b"beyond"
        );
    }

    #[test]
    fn ipv6_extension_chains_are_bounded() {
        let four = [
            (HOP_BY_HOP, 0),
            (DESTINATION_OPTIONS, 0),
            (ROUTING, 0),
            (DESTINATION_OPTIONS, 0),
        ];
        let p = packet6(b"four", &four);
        assert_eq!(
            &p[parse(&p, 2048).expect("four is allowed").payload],
            b"four"
        );
        let five = [
            (HOP_BY_HOP, 0),
            (DESTINATION_OPTIONS, 0),
            (ROUTING, 0),
            (DESTINATION_OPTIONS, 0),
            (DESTINATION_OPTIONS, 0),
        ];
        assert_eq!(
            parse(&packet6(b"five", &five), 2048),
            Err(ParseError::Malformed)
        );
        let long = [(DESTINATION_OPTIONS, 0); 40];
        assert_eq!(
            parse(&packet6(b"", &long), 2048),
            Err(ParseError::Malformed)
        );
    }

    #[test]
    fn ipv6_headers_that_cannot_be_relayed_are_malformed() {
        const FRAGMENT: u8 = 44;
        let cases: [(&str, Vec<u8>); 7] = [
            ("fragment header", packet6(b"data", &[(FRAGMENT, 0)])),
            (
                "fragment after options",
                packet6(b"data", &[(HOP_BY_HOP, 0), (FRAGMENT, 0)]),
            ),
            ("TCP", packet6(b"data", &[(6, 0)])),
            ("no next header", packet6(b"data", &[(59, 0)])),
            ("authentication header", packet6(b"data", &[(51, 0)])),
            (
                "hop-by-hop not first",
                packet6(b"data", &[(DESTINATION_OPTIONS, 0), (HOP_BY_HOP, 0)]),
            ),
            ("ICMPv6", packet6(b"data", &[(58, 0)])),
        ];
        for (name, p) in cases {
            assert_eq!(parse(&p, 2048), Err(ParseError::Malformed), "{name}");
        }
    }

    #[test]
    fn a_routing_header_with_segments_left_is_malformed() {
        let mut p = packet6(b"data", &[(ROUTING, 0)]);
        assert!(parse(&p, 2048).is_ok(), "no segments left");
        p[40 + 3] = 1;
        assert_eq!(parse(&p, 2048), Err(ParseError::Malformed));
    }

    #[test]
    fn inconsistent_ipv6_lengths_are_malformed() {
        // One 16-byte destination options header, then UDP at 56 (length at 60..62).
        let good = packet6(b"payload!", &[(DESTINATION_OPTIONS, 1)]);
        assert!(parse(&good, 2048).is_ok());
        let cases: [(&str, Mutation); 10] = [
            ("empty", Box::new(|p: &mut Vec<u8>| p.clear())),
            (
                "truncated fixed header",
                Box::new(|p: &mut Vec<u8>| p.truncate(39)),
            ),
            (
                "payload length beyond the packet",
                Box::new(|p: &mut Vec<u8>| p[5] += 1),
            ),
            (
                "jumbogram (payload length 0)",
                Box::new(|p: &mut Vec<u8>| p[4..6].copy_from_slice(&[0, 0])),
            ),
            (
                "extension header cut by the payload length",
                Box::new(|p: &mut Vec<u8>| p[4..6].copy_from_slice(&[0, 12])),
            ),
            (
                "extension header longer than the payload",
                Box::new(|p: &mut Vec<u8>| p[41] = 3),
            ),
            (
                "payload ends inside the UDP header",
                Box::new(|p: &mut Vec<u8>| p[4..6].copy_from_slice(&[0, 20])),
            ),
            (
                "UDP length beyond the payload",
                Box::new(|p: &mut Vec<u8>| p[61] += 1),
            ),
            (
                "UDP length below its header",
                Box::new(|p: &mut Vec<u8>| p[60..62].copy_from_slice(&[0, 7])),
            ),
            (
                "no UDP checksum",
                Box::new(|p: &mut Vec<u8>| p[62..64].copy_from_slice(&[0, 0])),
            ),
        ];
        for (name, mutate) in cases {
            let mut p = good.clone();
            mutate(&mut p);
            assert_eq!(parse(&p, 2048), Err(ParseError::Malformed), "{name}");
        }
        // A UDP length short of the payload leaves trailing bytes out, as for IPv4.
        let mut short_udp = good.clone();
        short_udp[61] -= 2;
        assert_eq!(
            &short_udp[parse(&short_udp, 2048).expect("valid").payload],
            b"payloa"
        );
    }

    #[test]
    fn a_cut_ipv6_packet_is_too_big_when_the_buffer_was_full() {
        let p = packet6(&[7; 100], &[(HOP_BY_HOP, 0)]);
        assert_eq!(parse(&p[..64], 64), Err(ParseError::TooBig));
        assert_eq!(parse(&p[..64], 2048), Err(ParseError::Malformed));
        assert!(
            parse(&p, p.len()).is_ok(),
            "a packet that just fits is whole"
        );
    }

    /// What must hold for any packet `parse` accepts, whatever its family: the payload lies in
    /// the packet right after a UDP header whose length it matches.
    fn assert_payload_consistent(p: &[u8], datagram: &Datagram) {
        let udp = &p[datagram.payload.start - UDP_HEADER..datagram.payload.start];
        assert_eq!(
            usize::from(u16::from_be_bytes([udp[4], udp[5]])),
            datagram.payload.len() + UDP_HEADER
        );
        assert_eq!(
            datagram.destination_port,
            u16::from_be_bytes([udp[2], udp[3]])
        );
        assert!(datagram.payload.end <= p.len());
    }

    #[test]
    fn every_ipv6_prefix_is_rejected_with_the_right_reason() {
        let good = packet6(&[1, 2, 3, 4, 5, 6, 7, 8], &[(HOP_BY_HOP, 0), (ROUTING, 0)]);
        for len in 0..good.len() {
            let cut = &good[..len];
            assert_eq!(parse(cut, 2048), Err(ParseError::Malformed), "{len} bytes");
            let expected = if len < IPV6_HEADER {
                ParseError::Malformed
            } else {
                ParseError::TooBig
            };
            assert_eq!(parse(cut, len), Err(expected), "{len} bytes, full buffer");
        }
    }

    #[test]
    fn every_ipv6_byte_flip_is_rejected_or_parsed_consistently() {
        let good = packet6(&[1, 2, 3, 4, 5, 6, 7, 8], &[(HOP_BY_HOP, 0), (ROUTING, 1)]);
        let udp_at = 40 + 8 + 16;
        // Traffic class, flow label, hop limit, addresses, option bodies, ports, checksum
        // bytes (but not both zero) and payload never make a packet unparsable.
        let free = |i: usize| {
            matches!(i, 1..=3 | 7..=39 | 42..=47 | 50 | 52..=63)
                || (udp_at..udp_at + 4).contains(&i)
                || i >= udp_at + 6
        };
        let mut accepted = 0;
        for i in 0..good.len() {
            for value in [0, 1, 0x11, 0x2b, 0x3c, 0x60, 0x80, 0xff] {
                let mut p = good.clone();
                p[i] = value;
                match parse(&p, 2048) {
                    Ok(datagram) => {
                        assert_payload_consistent(&p, &datagram);
                        accepted += 1;
                    }
                    Err(error) => assert!(
                        !free(i) || u16::from_be_bytes([p[udp_at + 6], p[udp_at + 7]]) == 0,
                        "byte {i} = {value:#04x} should not matter, got {error:?}"
                    ),
                }
            }
        }
        assert!(accepted > 300, "only {accepted} flips were accepted");
    }

    // The payload's checksum sum.

    /// `len` bytes that are not all alike.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from((i * 151 + 7) % 256).expect("below 256"))
            .collect()
    }

    #[test]
    fn the_wide_sum_matches_sixteen_bits_at_a_time() {
        for len in 0..70 {
            let bytes = pattern(len);
            assert_eq!(
                OnesComplementSum::new().bytes(&bytes).fold(),
                reference_sum(&bytes),
                "{len} bytes"
            );
        }
        let ones = [0xff; 1500];
        assert_eq!(OnesComplementSum::new().bytes(&ones).fold(), 0xffff);
        let split = pattern(37);
        assert_eq!(
            OnesComplementSum::new()
                .bytes(&split[..12])
                .bytes(&split[12..])
                .fold(),
            reference_sum(&split),
            "even slices first, the odd one last"
        );
    }

    #[test]
    fn the_payload_sum_derived_from_the_checksum_equals_the_summed_payload() {
        for len in [0, 1, 2, 3, 7, 8, 63, 64, 511, 1400, 1401] {
            let payload = pattern(len);
            // IPv6, which always carries a checksum.
            let p6 = packet6(&payload, &[(DESTINATION_OPTIONS, 0)]);
            let datagram = parse(&p6, 2048).expect("valid");
            assert!(
                same_sum(datagram.payload_sum(&p6).fold(), reference_sum(&payload)),
                "IPv6, {len} bytes"
            );
            // IPv4 with a checksum, derived; and without, summed.
            let mut p4 = packet(&payload);
            let checksum = reference_udp_checksum(&p4[12..20], &p4[20..]);
            p4[26..28].copy_from_slice(&checksum.to_be_bytes());
            let datagram = parse(&p4, 2048).expect("valid");
            assert_ne!(datagram.udp_checksum, 0);
            assert!(
                same_sum(datagram.payload_sum(&p4).fold(), reference_sum(&payload)),
                "IPv4 with checksum, {len} bytes"
            );
            let without = packet(&payload);
            let datagram = parse(&without, 2048).expect("valid");
            assert_eq!(
                datagram.payload_sum(&without).fold(),
                reference_sum(&payload),
                "IPv4 without checksum, {len} bytes"
            );
        }
    }

    /// What a sender that leaves the checksum to offload puts in the field: the folded sum of
    /// the pseudo-header alone (Linux's `~csum_tcpudp_magic(…)`), which a veth pair passes on.
    fn partial_checksum(pseudo_addresses: &[u8], udp_len: usize) -> u16 {
        let mut pseudo = pseudo_addresses.to_vec();
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&u16::try_from(udp_len).expect("small").to_be_bytes());
        reference_sum(&pseudo)
    }

    #[test]
    fn a_partial_checksum_left_for_offload_has_its_payload_summed() {
        for len in [0, 1, 64, 1401] {
            let payload = pattern(len);
            let mut p6 = packet6(&payload, &[]);
            let partial = partial_checksum(&p6[8..40], 8 + len);
            p6[46..48].copy_from_slice(&partial.to_be_bytes());
            let datagram = parse(&p6, 2048).expect("valid");
            assert!(
                same_sum(datagram.payload_sum(&p6).fold(), reference_sum(&payload)),
                "IPv6, {len} bytes"
            );
            let mut p4 = packet(&payload);
            let partial = partial_checksum(&p4[12..20], 8 + len);
            p4[26..28].copy_from_slice(&partial.to_be_bytes());
            let datagram = parse(&p4, 2048).expect("valid");
            assert!(
                same_sum(datagram.payload_sum(&p4).fold(), reference_sum(&payload)),
                "IPv4, {len} bytes"
            );
        }
        assert!(same_sum(0, 0xffff) && same_sum(0xffff, 0) && same_sum(7, 7));
        assert!(
            !same_sum(0x00ff, 0xff00),
            "complements are different numbers"
        );
    }

    #[test]
    fn a_payload_corrupted_before_the_relay_keeps_its_wrong_sum() {
        let mut p = packet6(b"the original payload", &[]);
        let last = p.len() - 1;
        p[last] ^= 0x40;
        let datagram = parse(&p, 2048).expect("the checksum is not the parser's business");
        let corrupted = reference_sum(&p[datagram.payload.clone()]);
        // The derived sum is the sender's payload's, not the corrupted bytes': an output
        // checksum built on it fails at the receiver as the input's would have.
        assert!(!same_sum(datagram.payload_sum(&p).fold(), corrupted));
    }
}
