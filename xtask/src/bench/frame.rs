//! The frames the generator sends: Ethernet / IPv4 / UDP to a multicast group, with both
//! checksums, byte for byte what trafgen writes for
//! `{ eth(da=…), ipv4(sa=…, da=…, ttl=…), udp(sp=…, dp=…), fill(0xa5, payload) }`
//! (the benchmark's configuration before it sent frames itself).

use std::net::Ipv4Addr;

use anyhow::Context as _;

/// Ethernet + IPv4 + UDP headers.
pub const HEADERS: usize = 14 + 20 + 8;
/// The byte every payload is filled with.
pub const FILL: u8 = 0xa5;

/// What goes into one generated frame.
#[derive(Clone, Copy, Debug)]
pub struct FrameSpec {
    /// The generator interface's MAC.
    pub source_mac: [u8; 6],
    pub source: Ipv4Addr,
    pub group: Ipv4Addr,
    pub source_port: u16,
    pub port: u16,
    pub ttl: u8,
    pub payload: usize,
}

impl FrameSpec {
    /// The frame on the wire: destination MAC from the group (RFC 1112), no IP options, IP
    /// identification 0 without DF (as trafgen), UDP checksum over the pseudo-header.
    pub fn bytes(&self) -> anyhow::Result<Vec<u8>> {
        let udp_len = u16::try_from(8 + self.payload).context("payload too long for UDP")?;
        let total_len = udp_len
            .checked_add(20)
            .context("payload too long for IPv4")?;
        let [_, b, c, d] = self.group.octets();
        let mut frame = Vec::with_capacity(HEADERS + self.payload);
        frame.extend_from_slice(&[0x01, 0x00, 0x5e, b & 0x7f, c, d]);
        frame.extend_from_slice(&self.source_mac);
        frame.extend_from_slice(&0x0800_u16.to_be_bytes());

        let mut ip = [0_u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&total_len.to_be_bytes());
        ip[8] = self.ttl;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&self.source.octets());
        ip[16..20].copy_from_slice(&self.group.octets());
        let checksum = !fold(sum_words(&ip));
        ip[10..12].copy_from_slice(&checksum.to_be_bytes());
        frame.extend_from_slice(&ip);

        let mut udp = Vec::with_capacity(usize::from(udp_len));
        udp.extend_from_slice(&self.source_port.to_be_bytes());
        udp.extend_from_slice(&self.port.to_be_bytes());
        udp.extend_from_slice(&udp_len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.resize(usize::from(udp_len), FILL);
        let pseudo = sum_words(&self.source.octets())
            + sum_words(&self.group.octets())
            + 17
            + u32::from(udp_len);
        let checksum = match !fold(pseudo + sum_words(&udp)) {
            // RFC 768: a computed zero is sent as all ones; zero means "no checksum".
            0 => 0xffff,
            sum => sum,
        };
        udp[6..8].copy_from_slice(&checksum.to_be_bytes());
        frame.extend_from_slice(&udp);
        Ok(frame)
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
            source: Ipv4Addr::new(10, 1, 0, 1),
            group: Ipv4Addr::new(239, 1, 1, 1),
            source_port: 4000,
            port: 5000,
            ttl: 32,
            payload: 512,
        }
    }

    /// The headers trafgen 0.6.8 wrote to a pcap file for
    /// `{ eth(da=01:00:5e:01:01:01), ipv4(sa=10.1.0.1, da=239.1.1.1, ttl=32),
    /// udp(sp=4000, dp=5000), fill(0xa5, 512) }` (no device, so a zero source MAC).
    const TRAFGEN_HEADERS: [u8; HEADERS] = [
        0x01, 0x00, 0x5e, 0x01, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08, 0x00, //
        0x45, 0x00, 0x02, 0x1c, 0x00, 0x00, 0x00, 0x00, 0x20, 0x11, 0x9e, 0xcd, //
        0x0a, 0x01, 0x00, 0x01, 0xef, 0x01, 0x01, 0x01, //
        0x0f, 0xa0, 0x13, 0x88, 0x02, 0x08, 0x39, 0x0c,
    ];

    #[test]
    fn frames_match_what_trafgen_sent() {
        let frame = spec().bytes().expect("a frame");
        assert_eq!(frame.len(), HEADERS + 512);
        assert_eq!(frame[..HEADERS], TRAFGEN_HEADERS);
        assert!(frame[HEADERS..].iter().all(|&byte| byte == FILL));
    }

    #[test]
    fn checksums_add_up_for_every_stream_and_payload() {
        for (group, payload) in [
            (Ipv4Addr::new(239, 1, 1, 50), 64),
            (Ipv4Addr::new(239, 200, 3, 7), 1400),
            (Ipv4Addr::new(224, 0, 1, 1), 1),
        ] {
            let spec = FrameSpec {
                group,
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

    #[test]
    fn a_payload_too_long_for_udp_is_refused() {
        let spec = FrameSpec {
            payload: 70_000,
            ..spec()
        };
        assert!(spec.bytes().is_err());
    }
}
