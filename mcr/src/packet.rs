//! Parsing what a worker's `AF_PACKET` socket delivers: an IPv4 packet (the socket is
//! `SOCK_DGRAM`, so the link header is already gone) carrying one UDP datagram.
//!
//! The classifier has checked the same headers, but the worker trusts nothing it did not check
//! itself: every field that decides what is sent is bounds-checked here.

use std::{net::Ipv4Addr, ops::Range};

/// The parts of a received datagram that forwarding needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    pub source: Ipv4Addr,
    pub destination: Ipv4Addr,
    pub destination_port: u16,
    /// The DSCP/ECN byte (IPv4 TOS).
    pub tos: u8,
    /// Where the UDP payload lies in the buffer.
    pub payload: Range<usize>,
}

/// Why a packet cannot be forwarded. Each is a named drop reason in the statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Headers that contradict themselves or the packet: wrong version, short header,
    /// lengths that do not fit, not UDP, a fragment.
    Malformed,
    /// The packet is longer than the receive buffer (a jumbo frame): only part of it arrived.
    TooBig,
}

const IPV4_MIN_HEADER: usize = 20;
const UDP_HEADER: usize = 8;
const IPPROTO_UDP: u8 = 17;
const MORE_FRAGMENTS_AND_OFFSET: u16 = 0x3fff;

/// Parses `packet`, of which `received` bytes arrived into a buffer of `capacity` bytes.
pub fn parse(packet: &[u8], capacity: usize) -> Result<Datagram, ParseError> {
    let header = packet.get(..IPV4_MIN_HEADER).ok_or(ParseError::Malformed)?;
    if header[0] >> 4 != 4 {
        return Err(ParseError::Malformed);
    }
    let header_len = usize::from(header[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if total_len > packet.len() {
        // A full buffer means the kernel cut the packet to fit.
        return Err(if packet.len() >= capacity {
            ParseError::TooBig
        } else {
            ParseError::Malformed
        });
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
        source: Ipv4Addr::new(header[12], header[13], header[14], header[15]),
        destination: Ipv4Addr::new(header[16], header[17], header[18], header[19]),
        destination_port: u16::from_be_bytes([udp[2], udp[3]]),
        tos: header[1],
        payload: header_len + UDP_HEADER..header_len + udp_len,
    })
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
        assert_eq!(datagram.source, Ipv4Addr::new(10, 1, 0, 1));
        assert_eq!(datagram.destination, Ipv4Addr::new(239, 1, 1, 1));
        assert_eq!(datagram.destination_port, 5000);
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
        assert_eq!(datagram.source.octets(), p[12..16]);
        assert_eq!(datagram.destination.octets(), p[16..20]);
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
}
