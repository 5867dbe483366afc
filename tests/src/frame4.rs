//! IPv4 frames built byte by byte, for traffic a UDP socket cannot send: VLAN tags, another
//! host's MAC, broken headers, impossible sources, fragments. Sent with
//! [`crate::send_frames`].

use std::net::Ipv4Addr;

use crate::frame::{IpFields, UdpFrame, ones_complement_sum};

/// An Ethernet frame carrying IPv4 and, unless it is a non-first fragment, UDP. Starts out
/// valid; each builder method breaks or changes one thing.
pub type Frame = UdpFrame<Ipv4Fields>;

/// What an IPv4 header has beyond the addresses and the TTL; the default is a header with
/// neither options nor fragmentation.
#[derive(Clone, Debug, Default)]
pub struct Ipv4Fields {
    /// The IPv4 flags-and-offset field.
    frag_off: u16,
    /// Flipped into the correct header checksum.
    checksum_flip: u16,
    /// IPv4 options, a multiple of four bytes.
    options: Vec<u8>,
}

impl IpFields for Ipv4Fields {
    type Addr = Ipv4Addr;
}

impl Frame {
    /// UDP from `source:4000` to `group:port` with `payload`, TTL 64, sent to the group's MAC.
    pub fn udp(source: Ipv4Addr, group: Ipv4Addr, port: u16, payload: Vec<u8>) -> Self {
        let ip = Ipv4Fields::default();
        Self::new(multicast_mac(group), source, group, port, payload, ip)
    }

    #[must_use]
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.hop_limit = ttl;
        self
    }

    /// IPv4 options after the fixed header (`options.len()` a multiple of 4, at most 40).
    #[must_use]
    pub fn options(mut self, options: &[u8]) -> Self {
        assert!(
            options.len().is_multiple_of(4) && options.len() <= 40,
            "options fill whole words, at most ten"
        );
        self.ip.options = options.to_vec();
        self
    }

    /// A header checksum that does not add up.
    #[must_use]
    pub fn bad_checksum(mut self) -> Self {
        // Changes the field by less than 0xffff, so it cannot land on the other
        // representation of the same one's-complement value.
        self.ip.checksum_flip = 0x00ff;
        self
    }

    /// The last fragment of a datagram: its final `len` bytes of payload at `offset` 8-byte
    /// units, with no UDP header.
    #[must_use]
    pub fn last_fragment(mut self, offset: u16, len: usize) -> Self {
        self.ip.frag_off = offset & 0x1fff;
        self.udp_header = false;
        self.payload.truncate(len);
        self
    }

    /// The frame on the wire.
    pub fn bytes(&self) -> Vec<u8> {
        // No UDP checksum: IPv4 allows it, and the relay does not check it.
        let datagram = self.upper_layer(0);
        let header_len = 20 + self.ip.options.len();
        let total_len = u16::try_from(header_len + datagram.len()).expect("test frames are small");
        let mut frame = self.ethernet_header(0x0800);
        frame.reserve(usize::from(total_len));

        let mut header = vec![0_u8; 20];
        header[0] = 0x40 | u8::try_from(header_len / 4).expect("IHL fits in four bits");
        header[2..4].copy_from_slice(&total_len.to_be_bytes());
        header[4..6].copy_from_slice(&0x1234_u16.to_be_bytes());
        header[6..8].copy_from_slice(&self.ip.frag_off.to_be_bytes());
        header[8] = self.hop_limit;
        header[9] = 17;
        header[12..16].copy_from_slice(&self.source.octets());
        header[16..20].copy_from_slice(&self.destination.octets());
        header.extend_from_slice(&self.ip.options);
        let checksum = header_checksum(&header) ^ self.ip.checksum_flip;
        header[10..12].copy_from_slice(&checksum.to_be_bytes());
        frame.extend_from_slice(&header);
        frame.extend_from_slice(&datagram);
        frame
    }
}

/// RFC 1112: 01:00:5e and the low 23 bits of the group.
fn multicast_mac(group: Ipv4Addr) -> [u8; 6] {
    let [_, b, c, d] = group.octets();
    [0x01, 0x00, 0x5e, b & 0x7f, c, d]
}

/// The IPv4 header checksum of `header`, whose checksum field is zero.
fn header_checksum(header: &[u8]) -> u16 {
    !ones_complement_sum(0, header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{ETH_P_8021AD, ETH_P_8021Q, OTHER_HOST_MAC};

    #[test]
    fn a_valid_frame_has_a_checksum_that_adds_up() {
        let frame = Frame::udp(
            Ipv4Addr::new(10, 1, 0, 1),
            Ipv4Addr::new(239, 129, 1, 2),
            5000,
            b"abc".to_vec(),
        )
        .bytes();
        assert_eq!(frame[..6], [0x01, 0x00, 0x5e, 0x01, 0x01, 0x02]);
        assert_eq!(frame[12..14], [0x08, 0x00]);
        assert_eq!(frame.len(), 14 + 20 + 8 + 3);
        assert_eq!(
            header_checksum(&frame[14..34]),
            0,
            "sum over a valid header"
        );
        assert_eq!(frame[38..40], [0, 11], "UDP length");
    }

    #[test]
    fn each_builder_changes_what_it_says() {
        let base = Frame::udp(
            Ipv4Addr::new(10, 1, 0, 1),
            Ipv4Addr::new(239, 1, 1, 1),
            5000,
            vec![7; 4],
        );
        let qinq = base
            .clone()
            .tagged(ETH_P_8021AD, 100)
            .tagged(ETH_P_8021Q, 42)
            .bytes();
        assert_eq!(
            qinq[12..22],
            [0x88, 0xa8, 0, 100, 0x81, 0x00, 0, 42, 0x08, 0x00]
        );
        assert_ne!(
            header_checksum(&base.clone().bad_checksum().bytes()[14..34]),
            0
        );
        let fragment = base.clone().last_fragment(185, 1).bytes();
        assert_eq!(fragment.len(), 14 + 20 + 1, "no UDP header");
        assert_eq!(fragment[20..22], 185_u16.to_be_bytes());
        assert_eq!(base.clone().ttl(0).bytes()[22], 0);
        let with_options = base.clone().options(&[1; 40]).bytes();
        assert_eq!(with_options[14], 0x4f, "IHL 15");
        assert_eq!(
            header_checksum(&with_options[14..74]),
            0,
            "options are summed"
        );
        let redirected = base
            .from(Ipv4Addr::LOCALHOST)
            .to_mac(OTHER_HOST_MAC)
            .bytes();
        assert_eq!(redirected[..6], OTHER_HOST_MAC);
        assert_eq!(redirected[26..30], [127, 0, 0, 1]);
    }
}
