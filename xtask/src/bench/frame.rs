//! The frames the generator sends: Ethernet / IP / UDP to a multicast group, with every
//! checksum. An IPv4 frame is byte for byte what trafgen writes for
//! `{ eth(da=…), ipv4(sa=…, da=…, ttl=…), udp(sp=…, dp=…), fill(0xa5, payload) }`
//! (the benchmark's configuration before it sent frames itself); an IPv6 frame has the plain
//! 40-byte header (no extension headers, traffic class and flow label 0) and the UDP checksum
//! IPv6 requires.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, bail};
use serde::Serialize;

/// Ethernet + IPv4 + UDP headers.
pub const IPV4_HEADERS: usize = 14 + 20 + 8;
/// Ethernet + IPv6 + UDP headers.
pub const IPV6_HEADERS: usize = 14 + 40 + 8;
/// The byte every payload is filled with.
pub const FILL: u8 = 0xa5;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const UDP: u8 = 17;

/// The IP version of a scenario's packets, end to end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Ipv4,
    Ipv6,
}

impl Family {
    /// The family a frame built by [`FrameSpec::bytes`] carries, from its `EtherType`.
    pub fn of_frame(frame: &[u8]) -> Option<Self> {
        match u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?) {
            ETHERTYPE_IPV4 => Some(Self::Ipv4),
            ETHERTYPE_IPV6 => Some(Self::Ipv6),
            _ => None,
        }
    }

    pub fn ethertype(self) -> u16 {
        match self {
            Self::Ipv4 => ETHERTYPE_IPV4,
            Self::Ipv6 => ETHERTYPE_IPV6,
        }
    }

    /// Bytes before the UDP payload (and so the stamp): Ethernet, IP without options or
    /// extension headers, UDP.
    pub fn headers(self) -> usize {
        match self {
            Self::Ipv4 => IPV4_HEADERS,
            Self::Ipv6 => IPV6_HEADERS,
        }
    }

    /// Where the UDP header starts.
    pub fn udp_at(self) -> usize {
        self.headers() - 8
    }

    /// Where the source and destination addresses sit (together, as the UDP pseudo-header
    /// takes them).
    pub fn addresses(self) -> std::ops::Range<usize> {
        match self {
            Self::Ipv4 => 26..34,
            Self::Ipv6 => 22..54,
        }
    }
}

/// What goes into one generated frame.
#[derive(Clone, Copy, Debug)]
pub struct FrameSpec {
    /// The generator interface's MAC.
    pub source_mac: [u8; 6],
    pub source: IpAddr,
    pub group: IpAddr,
    pub source_port: u16,
    pub port: u16,
    /// TTL (IPv4) or hop limit (IPv6).
    pub ttl: u8,
    pub payload: usize,
}

impl FrameSpec {
    /// The frame on the wire: destination MAC from the group (RFC 1112 for IPv4, RFC 2464 for
    /// IPv6), no IP options, IPv4 identification 0 without DF (as trafgen), UDP checksum over
    /// the pseudo-header.
    pub fn bytes(&self) -> anyhow::Result<Vec<u8>> {
        let udp_len = u16::try_from(8 + self.payload).context("payload too long for UDP")?;
        let (family, mac, ip) = match (self.source, self.group) {
            (IpAddr::V4(source), IpAddr::V4(group)) => {
                let [_, b, c, d] = group.octets();
                let mac = [0x01, 0x00, 0x5e, b & 0x7f, c, d];
                (Family::Ipv4, mac, self.ipv4_header(source, group, udp_len)?)
            }
            (IpAddr::V6(source), IpAddr::V6(group)) => {
                let [.., a, b, c, d] = group.octets();
                let mac = [0x33, 0x33, a, b, c, d];
                (Family::Ipv6, mac, self.ipv6_header(source, group, udp_len))
            }
            (source, group) => bail!("source {source} and group {group} are of two families"),
        };
        let mut frame = Vec::with_capacity(family.headers() + self.payload);
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&self.source_mac);
        frame.extend_from_slice(&family.ethertype().to_be_bytes());
        frame.extend_from_slice(&ip);

        let mut udp = Vec::with_capacity(usize::from(udp_len));
        udp.extend_from_slice(&self.source_port.to_be_bytes());
        udp.extend_from_slice(&self.port.to_be_bytes());
        udp.extend_from_slice(&udp_len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.resize(usize::from(udp_len), FILL);
        let pseudo = sum_words(&frame[family.addresses()]) + u32::from(UDP) + u32::from(udp_len);
        let checksum = match !fold(pseudo + sum_words(&udp)) {
            // RFC 768: a computed zero is sent as all ones; zero means "no checksum" (which
            // IPv6 does not allow at all).
            0 => 0xffff,
            sum => sum,
        };
        udp[6..8].copy_from_slice(&checksum.to_be_bytes());
        frame.extend_from_slice(&udp);
        Ok(frame)
    }

    fn ipv4_header(
        &self,
        source: Ipv4Addr,
        group: Ipv4Addr,
        udp_len: u16,
    ) -> anyhow::Result<Vec<u8>> {
        let total_len = udp_len
            .checked_add(20)
            .context("payload too long for IPv4")?;
        let mut ip = vec![0_u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&total_len.to_be_bytes());
        ip[8] = self.ttl;
        ip[9] = UDP;
        ip[12..16].copy_from_slice(&source.octets());
        ip[16..20].copy_from_slice(&group.octets());
        let checksum = !fold(sum_words(&ip));
        ip[10..12].copy_from_slice(&checksum.to_be_bytes());
        Ok(ip)
    }

    /// Version 6, traffic class and flow label 0, the UDP length as payload length, UDP next.
    fn ipv6_header(&self, source: Ipv6Addr, group: Ipv6Addr, udp_len: u16) -> Vec<u8> {
        let mut ip = vec![0_u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&udp_len.to_be_bytes());
        ip[6] = UDP;
        ip[7] = self.ttl;
        ip[8..24].copy_from_slice(&source.octets());
        ip[24..40].copy_from_slice(&group.octets());
        ip
    }
}

/// The one's-complement sum of `bytes` as big-endian 16-bit words (an odd last byte is padded
/// with zero), not yet folded.
pub(super) fn sum_words(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum()
}

pub(super) fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FrameSpec {
        FrameSpec {
            source_mac: [0; 6],
            source: Ipv4Addr::new(10, 1, 0, 1).into(),
            group: Ipv4Addr::new(239, 1, 1, 1).into(),
            source_port: 4000,
            port: 5000,
            ttl: 32,
            payload: 512,
        }
    }

    /// The headers trafgen 0.6.8 wrote to a pcap file for
    /// `{ eth(da=01:00:5e:01:01:01), ipv4(sa=10.1.0.1, da=239.1.1.1, ttl=32),
    /// udp(sp=4000, dp=5000), fill(0xa5, 512) }` (no device, so a zero source MAC).
    const TRAFGEN_HEADERS: [u8; IPV4_HEADERS] = [
        0x01, 0x00, 0x5e, 0x01, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08, 0x00, //
        0x45, 0x00, 0x02, 0x1c, 0x00, 0x00, 0x00, 0x00, 0x20, 0x11, 0x9e, 0xcd, //
        0x0a, 0x01, 0x00, 0x01, 0xef, 0x01, 0x01, 0x01, //
        0x0f, 0xa0, 0x13, 0x88, 0x02, 0x08, 0x39, 0x0c,
    ];

    #[test]
    fn frames_match_what_trafgen_sent() {
        let frame = spec().bytes().expect("a frame");
        assert_eq!(frame.len(), IPV4_HEADERS + 512);
        assert_eq!(frame[..IPV4_HEADERS], TRAFGEN_HEADERS);
        assert!(frame[IPV4_HEADERS..].iter().all(|&byte| byte == FILL));
    }

    #[test]
    fn checksums_add_up_for_every_stream_and_payload() {
        for (group, payload) in [
            (Ipv4Addr::new(239, 1, 1, 50), 64),
            (Ipv4Addr::new(239, 200, 3, 7), 1400),
            (Ipv4Addr::new(224, 0, 1, 1), 1),
        ] {
            let spec = FrameSpec {
                group: group.into(),
                payload,
                source_mac: [0x1a, 0x55, 0x79, 0xa5, 0x53, 0x28],
                ..spec()
            };
            let frame = spec.bytes().expect("a frame");
            assert_eq!(fold(sum_words(&frame[14..34])), 0xffff, "IPv4 header");
            let udp = &frame[34..];
            let pseudo = sum_words(&frame[26..34]) + 17 + u32::try_from(udp.len()).expect("small");
            assert_eq!(fold(pseudo + sum_words(udp)), 0xffff, "UDP");
            assert_eq!(frame[6..12], spec.source_mac);
            let [_, b, c, d] = group.octets();
            assert_eq!(frame[..6], [0x01, 0x00, 0x5e, b & 0x7f, c, d]);
        }
    }

    fn spec6(group: Ipv6Addr, payload: usize) -> FrameSpec {
        FrameSpec {
            source_mac: [0x1a, 0x55, 0x79, 0xa5, 0x53, 0x28],
            source: "fd00:1::1".parse().expect("an address"),
            group: group.into(),
            payload,
            ..spec()
        }
    }

    #[test]
    fn ipv6_frames_carry_the_header_mac_and_checksum_ipv6_requires() {
        for (group, payload) in [
            ("ff0e::1:1", 512),
            ("ff3e::8000:1", 64),
            ("ff0e::ab:cdef:1234", 1400),
            ("ff02::1:3", 1),
        ] {
            let group: Ipv6Addr = group.parse().expect("a group");
            let spec = spec6(group, payload);
            let frame = spec.bytes().expect("a frame");
            assert_eq!(frame.len(), IPV6_HEADERS + payload);
            assert_eq!(Family::of_frame(&frame), Some(Family::Ipv6));
            let [.., a, b, c, d] = group.octets();
            assert_eq!(frame[..6], [0x33, 0x33, a, b, c, d], "RFC 2464 MAC");
            assert_eq!(frame[6..12], spec.source_mac);
            assert_eq!(frame[12..14], [0x86, 0xdd]);
            assert_eq!(
                frame[14..18],
                [0x60, 0, 0, 0],
                "version 6, no class or label"
            );
            let udp_len = u16::try_from(8 + payload).expect("small");
            assert_eq!(frame[18..20], udp_len.to_be_bytes(), "payload length");
            assert_eq!(frame[20], 17, "next header UDP");
            assert_eq!(frame[21], 32, "hop limit");
            assert_eq!(
                frame[22..38],
                "fd00:1::1"
                    .parse::<Ipv6Addr>()
                    .expect("an address")
                    .octets()
            );
            assert_eq!(frame[38..54], group.octets());
            assert_eq!(frame[54..56], 4000_u16.to_be_bytes());
            assert_eq!(frame[56..58], 5000_u16.to_be_bytes());
            assert_eq!(frame[58..60], udp_len.to_be_bytes());
            assert_ne!(
                frame[60..62],
                [0, 0],
                "IPv6 has no UDP packet without a checksum"
            );
            let udp = &frame[54..];
            let pseudo = sum_words(&frame[22..54]) + 17 + u32::from(udp_len);
            assert_eq!(fold(pseudo + sum_words(udp)), 0xffff, "UDP checksum");
            assert!(frame[IPV6_HEADERS..].iter().all(|&byte| byte == FILL));
        }
    }

    #[test]
    fn a_source_and_group_of_two_families_are_refused() {
        let spec = FrameSpec {
            group: "ff0e::1:1".parse::<Ipv6Addr>().expect("a group").into(),
            ..spec()
        };
        assert!(spec.bytes().is_err());
    }

    #[test]
    fn a_payload_too_long_for_udp_is_refused() {
        let spec = FrameSpec {
            payload: 70_000,
            ..spec()
        };
        assert!(spec.bytes().is_err());
    }
}
