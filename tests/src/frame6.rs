//! IPv6 frames built byte by byte, for traffic a UDP socket cannot send: extension-header
//! chains, fragments, impossible sources, broken lengths, a zero UDP checksum. Sent with
//! [`crate::send_frames`].

use std::net::Ipv6Addr;

use crate::frame::{IpFields, UdpFrame, ones_complement_sum};

pub const HOP_BY_HOP: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const DESTINATION_OPTIONS: u8 = 60;
pub const AUTHENTICATION: u8 = 51;
pub const UDP: u8 = 17;
pub const ICMPV6: u8 = 58;
/// An option for experiments whose type says "skip if unknown".
const EXPERIMENTAL_OPTION: u8 = 0x1e;

/// An Ethernet frame carrying IPv6 and, behind any extension headers, UDP (or another
/// protocol). Starts out valid; each builder method breaks or changes one thing.
pub type Frame6 = UdpFrame<Ipv6Fields>;

/// What an IPv6 frame has beyond the addresses, the hop limit and the UDP header.
#[derive(Clone, Debug)]
pub struct Ipv6Fields {
    /// The Ethernet type after any tags: IPv6's, unless a test says otherwise.
    ethertype: u16,
    /// The version field of the IP header: 6, unless a test says otherwise.
    version: u8,
    traffic_class: u8,
    flow_label: u32,
    /// Extension headers in order: (their type, their bytes after the first two).
    extensions: Vec<(u8, Vec<u8>)>,
    /// The protocol after the extension headers; the UDP header is written only for UDP.
    protocol: u8,
    /// Added to the UDP length field.
    udp_len_excess: u16,
    zero_checksum: bool,
    /// The payload length field of the IPv6 header, if not the length of what follows it.
    payload_len: Option<u16>,
    /// Bytes of the IPv6 header (and what follows) the frame keeps, if it is cut short.
    cut_at: Option<usize>,
}

impl IpFields for Ipv6Fields {
    type Addr = Ipv6Addr;
}

impl Frame6 {
    /// UDP from `source:4000` to `group:port` with `payload`, hop limit 64, traffic class 0,
    /// a correct checksum, sent to the group's MAC.
    pub fn udp(source: Ipv6Addr, group: Ipv6Addr, port: u16, payload: Vec<u8>) -> Self {
        let ip = Ipv6Fields {
            ethertype: 0x86dd,
            version: 6,
            traffic_class: 0,
            flow_label: 0x1_2345,
            extensions: Vec::new(),
            protocol: UDP,
            udp_len_excess: 0,
            zero_checksum: false,
            payload_len: None,
            cut_at: None,
        };
        Self::new(multicast_mac(group), source, group, port, payload, ip)
    }

    /// Another Ethernet type than IPv6's in front of the same IPv6 packet.
    #[must_use]
    pub fn ethertype(mut self, ethertype: u16) -> Self {
        self.ip.ethertype = ethertype;
        self
    }

    /// Another version than 6 in the IPv6 header.
    #[must_use]
    pub fn version(mut self, version: u8) -> Self {
        self.ip.version = version;
        self
    }

    #[must_use]
    pub fn hop_limit(mut self, hop_limit: u8) -> Self {
        self.hop_limit = hop_limit;
        self
    }

    #[must_use]
    pub fn traffic_class(mut self, traffic_class: u8) -> Self {
        self.ip.traffic_class = traffic_class;
        self
    }

    /// Appends an options header (hop-by-hop or destination options) of `len` bytes, a
    /// multiple of 8, holding one option the kernel skips.
    #[must_use]
    pub fn options(mut self, kind: u8, len: usize) -> Self {
        assert!(
            len >= 8 && len.is_multiple_of(8) && len <= 256,
            "8 to 256 bytes"
        );
        // Option 0x1e (RFC 4727, experimental: "skip if unknown") over everything after the
        // two bytes of the header itself. Padding that long the kernel would refuse.
        let mut body = vec![
            EXPERIMENTAL_OPTION,
            u8::try_from(len - 4).expect("at most 252"),
        ];
        body.resize(len - 2, 0);
        self.ip.extensions.push((kind, body));
        self
    }

    /// Appends a routing header of type 0 with no segments left (8 bytes).
    #[must_use]
    pub fn routing(mut self) -> Self {
        self.ip.extensions.push((ROUTING, vec![0, 0, 0, 0, 0, 0]));
        self
    }

    /// Appends a fragment header at `offset` (8-byte units), with the more-fragments flag.
    #[must_use]
    pub fn fragment(mut self, offset: u16, more: bool) -> Self {
        let offset_and_flag = (offset << 3) | u16::from(more);
        let mut body = offset_and_flag.to_be_bytes().to_vec();
        body.extend_from_slice(&0x1234_5678_u32.to_be_bytes());
        self.ip.extensions.push((FRAGMENT, body));
        self
    }

    /// Appends an extension header of a type MCR does not follow (an authentication header,
    /// 16 bytes).
    #[must_use]
    pub fn authentication(mut self) -> Self {
        self.ip.extensions.push((AUTHENTICATION, vec![0; 14]));
        self
    }

    /// Another protocol than UDP after the extension headers: the payload follows them as it
    /// is.
    #[must_use]
    pub fn protocol(mut self, protocol: u8) -> Self {
        self.ip.protocol = protocol;
        self.udp_header = protocol == UDP;
        self
    }

    /// A UDP checksum of 0, which IPv6 does not allow.
    #[must_use]
    pub fn zero_checksum(mut self) -> Self {
        self.ip.zero_checksum = true;
        self
    }

    /// A payload length field of `len`, whatever follows the header.
    #[must_use]
    pub fn payload_len(mut self, len: u16) -> Self {
        self.ip.payload_len = Some(len);
        self
    }

    /// Ends the frame `len` bytes after the start of the IPv6 header: less than 40 cuts the
    /// fixed header itself short.
    #[must_use]
    pub fn cut_at(mut self, len: usize) -> Self {
        self.ip.cut_at = Some(len);
        self
    }

    /// A UDP length field `excess` bytes longer than the datagram.
    #[must_use]
    pub fn udp_len_excess(mut self, excess: u16) -> Self {
        self.ip.udp_len_excess = excess;
        self
    }

    /// The UDP datagram (header and payload) as sent, or the bare payload for another
    /// protocol.
    fn datagram(&self) -> Vec<u8> {
        let mut datagram = self.upper_layer(self.ip.udp_len_excess);
        if self.udp_header && !self.ip.zero_checksum {
            let checksum = udp_checksum(self.source, self.destination, &datagram);
            datagram[6..8].copy_from_slice(&checksum.to_be_bytes());
        }
        datagram
    }

    /// The frame on the wire.
    pub fn bytes(&self) -> Vec<u8> {
        let mut frame = self.ethernet_header(self.ip.ethertype);
        let link_len = frame.len();

        let mut payload = Vec::new();
        let extensions = &self.ip.extensions;
        for (i, (kind, body)) in extensions.iter().enumerate() {
            let next = extensions
                .get(i + 1)
                .map_or(self.ip.protocol, |(kind, _)| *kind);
            payload.push(next);
            // Options and routing headers count 8-byte units after the first; a fragment
            // header has a reserved byte; AH counts 4-byte units less two.
            let len = match *kind {
                FRAGMENT => 0,
                AUTHENTICATION => u8::try_from((body.len() + 2) / 4 - 2).expect("short"),
                _ => u8::try_from((body.len() + 2) / 8 - 1).expect("short"),
            };
            payload.push(len);
            payload.extend_from_slice(body);
        }
        payload.extend_from_slice(&self.datagram());

        let first = extensions
            .first()
            .map_or(self.ip.protocol, |(kind, _)| *kind);
        let version_class_flow = (u32::from(self.ip.version) << 28)
            | (u32::from(self.ip.traffic_class) << 20)
            | (self.ip.flow_label & 0xf_ffff);
        let payload_len = self
            .ip
            .payload_len
            .unwrap_or_else(|| u16::try_from(payload.len()).expect("test frames are small"));
        frame.extend_from_slice(&version_class_flow.to_be_bytes());
        frame.extend_from_slice(&payload_len.to_be_bytes());
        frame.push(first);
        frame.push(self.hop_limit);
        frame.extend_from_slice(&self.source.octets());
        frame.extend_from_slice(&self.destination.octets());
        frame.extend_from_slice(&payload);
        if let Some(len) = self.ip.cut_at {
            frame.truncate(link_len + len);
        }
        frame
    }
}

/// RFC 2464: 33:33 and the low 32 bits of the group.
pub fn multicast_mac(group: Ipv6Addr) -> [u8; 6] {
    let [.., a, b, c, d] = group.octets();
    [0x33, 0x33, a, b, c, d]
}

/// The UDP checksum of `datagram` (its checksum field zero) from `source` to `destination`:
/// the one's-complement sum over the IPv6 pseudo-header and the datagram, 0 sent as 0xffff.
pub fn udp_checksum(source: Ipv6Addr, destination: Ipv6Addr, datagram: &[u8]) -> u16 {
    let len = u32::try_from(datagram.len()).expect("test frames are small");
    let sum = ones_complement_sum(pseudo_header_sum(source, destination, len), datagram);
    match !sum {
        0 => 0xffff,
        checksum => checksum,
    }
}

/// The one's-complement sum of the IPv6 pseudo-header of a UDP datagram of `len` bytes: what
/// a sender that leaves the checksum to the hardware puts in the checksum field.
pub fn pseudo_header_sum(source: Ipv6Addr, destination: Ipv6Addr, len: u32) -> u16 {
    let mut bytes = Vec::with_capacity(40);
    bytes.extend_from_slice(&source.octets());
    bytes.extend_from_slice(&destination.octets());
    bytes.extend_from_slice(&len.to_be_bytes());
    bytes.extend_from_slice(&[0, 0, 0, UDP]);
    ones_complement_sum(0, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    const GROUP: Ipv6Addr = Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, 0, 0x1234);

    #[test]
    fn a_valid_frame_has_a_checksum_that_adds_up() {
        let frame = Frame6::udp(SOURCE, GROUP, 5000, b"abc".to_vec()).bytes();
        assert_eq!(frame[..6], [0x33, 0x33, 0, 0, 0x12, 0x34]);
        assert_eq!(frame[12..14], [0x86, 0xdd]);
        assert_eq!(frame.len(), 14 + 40 + 8 + 3);
        assert_eq!(frame[14] >> 4, 6);
        assert_eq!(frame[18..20], [0, 11], "payload length");
        assert_eq!(frame[20], UDP);
        let mut datagram = frame[54..].to_vec();
        let checksum = u16::from_be_bytes([datagram[6], datagram[7]]);
        datagram[6..8].copy_from_slice(&[0, 0]);
        assert_eq!(udp_checksum(SOURCE, GROUP, &datagram), checksum);
        assert_ne!(checksum, 0);
    }

    #[test]
    fn extension_headers_chain_to_udp() {
        let frame = Frame6::udp(SOURCE, GROUP, 5000, vec![7; 4])
            .options(HOP_BY_HOP, 8)
            .options(DESTINATION_OPTIONS, 16)
            .routing()
            .fragment(0, true)
            .bytes();
        assert_eq!(frame[20], HOP_BY_HOP, "first next header");
        assert_eq!(frame[54..56], [DESTINATION_OPTIONS, 0]);
        assert_eq!(frame[56..58], [0x1e, 4], "one option over the rest");
        assert_eq!(frame[62..64], [ROUTING, 1]);
        assert_eq!(frame[78..80], [FRAGMENT, 0]);
        assert_eq!(frame[86..88], [UDP, 0]);
        assert_eq!(frame[88..90], [0, 1], "offset 0, more fragments");
        assert_eq!(frame[94..96], 4000_u16.to_be_bytes(), "UDP after 40 bytes");
        assert_eq!(frame[18..20], (40_u16 + 12).to_be_bytes());
        let ah = Frame6::udp(SOURCE, GROUP, 5000, vec![])
            .authentication()
            .bytes();
        assert_eq!(ah[54..56], [UDP, 2], "AH: 16 bytes");
    }

    #[test]
    fn each_builder_changes_what_it_says() {
        let base = Frame6::udp(SOURCE, GROUP, 5000, vec![7; 4]);
        assert_eq!(base.clone().zero_checksum().bytes()[60..62], [0, 0]);
        assert_eq!(base.clone().hop_limit(0).bytes()[21], 0);
        let class = base.clone().traffic_class(0xb9).bytes();
        assert_eq!(
            class[14..16],
            [0x6b, 0x91],
            "class 0xb9, flow label 0x12345"
        );
        assert_eq!(base.clone().payload_len(13).bytes()[18..20], [0, 13]);
        assert_eq!(base.clone().udp_len_excess(1).bytes()[58..60], [0, 13]);
        let icmp = base.clone().options(HOP_BY_HOP, 8).protocol(ICMPV6).bytes();
        assert_eq!(icmp[54], ICMPV6);
        assert_eq!(icmp.len(), 14 + 40 + 8 + 4, "no UDP header");
        assert_eq!(base.clone().cut_at(39).bytes().len(), 14 + 39);
        assert_eq!(base.clone().version(4).bytes()[14] >> 4, 4);
        assert_eq!(base.clone().ethertype(0x0800).bytes()[12..14], [8, 0]);
        let tagged = base.tagged(0x8100, 42).bytes();
        assert_eq!(tagged[12..18], [0x81, 0x00, 0, 42, 0x86, 0xdd]);
    }
}
