//! Multicast outputs the worker frames itself: it writes the IP (v4 or v6) and UDP headers in
//! front of the payload and sends the packet on a link-layer socket of the output interface,
//! so no route is looked up and no UDP socket is walked per packet (decision 0004).
//!
//! An output's family is its own, whatever the input's: an IPv4 input relayed to an IPv6 group
//! (or the reverse) simply gets the output's header, with the input's payload and DSCP/ECN
//! byte.
//!
//! Each send in flight owns a slot of a fixed slab holding its header, its two-part I/O vector
//! (header, then the payload in the receive buffer) and its message header, so the memory the
//! kernel reads stays put until the send completes.

use std::cell::Cell;

use nix::libc;

use super::{segments::EthernetFrame, slots::Slots};
use crate::{
    command::{FrameAddresses, FrameHeader},
    packet::OnesComplementSum,
};

/// IPv4 header (20 bytes, no options) and UDP header (8 bytes).
pub const IPV4_HEADER_LEN: usize = 28;
/// IPv6 header (40 bytes, no extension headers) and UDP header (8 bytes).
pub const IPV6_HEADER_LEN: usize = 48;
/// Room for the longer of the two.
pub const HEADER_ROOM: usize = IPV6_HEADER_LEN;

const IPPROTO_UDP: u8 = 17;

/// What differs between the families beyond the template.
pub(super) enum Family {
    V4 {
        /// IPv4 identification of the next packet.
        next_id: Cell<u16>,
    },
    V6 {
        /// The part of the UDP checksum that is the same for every packet: addresses, next
        /// header and ports.
        fixed_sum: OnesComplementSum,
    },
}

/// A multicast output's fixed header fields and link-layer destination.
pub struct Frame {
    /// The headers with every per-packet field zero: 28 bytes for IPv4, 48 for IPv6.
    pub(super) template: [u8; HEADER_ROOM],
    pub(super) family: Family,
    pub(super) address: libc::sockaddr_ll,
    /// On an Ethernet interface: the Ethernet header, written by the worker too, and what
    /// keeps runs within the MTU (see `segments`). `None` sends IP packets and lets the kernel
    /// write the link-layer header.
    pub(super) ethernet: Option<EthernetFrame>,
}

impl Frame {
    pub fn new(header: &FrameHeader) -> Self {
        let mut template = [0_u8; HEADER_ROOM];
        let (len, family, ethertype) = match header.addresses {
            FrameAddresses::V4 {
                source,
                destination,
            } => {
                template[0] = 0x45; // version 4, 5 words of header
                template[8] = header.ttl;
                template[9] = IPPROTO_UDP;
                template[12..16].copy_from_slice(&source);
                template[16..20].copy_from_slice(&destination);
                let family = Family::V4 {
                    next_id: Cell::new(0),
                };
                (IPV4_HEADER_LEN, family, libc::ETH_P_IP)
            }
            FrameAddresses::V6 {
                source,
                destination,
            } => {
                template[0] = 0x60; // version 6; traffic class and flow label per packet / 0
                template[6] = IPPROTO_UDP;
                template[7] = header.ttl; // hop limit
                template[8..24].copy_from_slice(&source);
                template[24..40].copy_from_slice(&destination);
                let fixed_sum = OnesComplementSum::new()
                    .bytes(&source)
                    .bytes(&destination)
                    .word(u16::from(IPPROTO_UDP))
                    .word(header.port)
                    .word(header.port);
                (IPV6_HEADER_LEN, Family::V6 { fixed_sum }, libc::ETH_P_IPV6)
            }
        };
        // The source port is the destination port, as most multicast senders do.
        let udp = len - 8;
        template[udp..udp + 2].copy_from_slice(&header.port.to_be_bytes());
        template[udp + 2..udp + 4].copy_from_slice(&header.port.to_be_bytes());
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = u16::try_from(libc::AF_PACKET).expect("AF_PACKET fits sa_family_t");
        address.sll_protocol = u16::try_from(ethertype)
            .expect("ETH_P_IP and ETH_P_IPV6 are 16-bit ethertypes")
            .to_be();
        address.sll_ifindex = i32::try_from(header.ifindex).unwrap_or(0);
        address.sll_halen = 6;
        address.sll_addr[..6].copy_from_slice(&header.mac);
        Self {
            template,
            family,
            address,
            ethernet: EthernetFrame::new(header, ethertype),
        }
    }

    /// Sends IPv6 (and needs the payload's part of the UDP checksum when sent alone).
    pub fn is_ipv6(&self) -> bool {
        matches!(self.family, Family::V6 { .. })
    }

    /// Sent as a whole Ethernet frame on the egress's Ethernet socket.
    pub fn is_ethernet(&self) -> bool {
        self.ethernet.is_some()
    }

    /// Writes into `out` the headers for a packet carrying `payload_len` bytes with DSCP/ECN
    /// byte `dscp_ecn`; returns their length. An IPv4 packet goes without UDP checksum (0,
    /// which IPv4 allows), so its header costs no look at the payload. An IPv6 packet must
    /// have one: `payload_sum` is asked for the payload's part, only then.
    pub fn write_header(
        &self,
        out: &mut [u8; HEADER_ROOM],
        payload_len: usize,
        dscp_ecn: u8,
        payload_sum: impl FnOnce() -> OnesComplementSum,
    ) -> usize {
        // Receive buffers are at most 9 KiB: a payload never overflows the length fields.
        let udp_len = u16::try_from(8 + payload_len).unwrap_or(u16::MAX);
        match &self.family {
            Family::V4 { next_id } => {
                let header = &mut out[..IPV4_HEADER_LEN];
                header.copy_from_slice(&self.template[..IPV4_HEADER_LEN]);
                header[1] = dscp_ecn;
                let total = u16::try_from(IPV4_HEADER_LEN + payload_len).unwrap_or(u16::MAX);
                header[2..4].copy_from_slice(&total.to_be_bytes());
                let id = next_id.get();
                next_id.set(id.wrapping_add(1));
                header[4..6].copy_from_slice(&id.to_be_bytes());
                let checksum = ipv4_checksum(&header[..20]);
                header[10..12].copy_from_slice(&checksum.to_be_bytes());
                header[24..26].copy_from_slice(&udp_len.to_be_bytes());
                IPV4_HEADER_LEN
            }
            Family::V6 { fixed_sum } => {
                *out = self.template;
                out[0] = 0x60 | (dscp_ecn >> 4);
                out[1] = dscp_ecn << 4;
                // No extension headers: the IPv6 payload is the UDP datagram.
                out[4..6].copy_from_slice(&udp_len.to_be_bytes());
                out[44..46].copy_from_slice(&udp_len.to_be_bytes());
                // The length counts twice: in the pseudo-header and in the UDP header.
                let sum = fixed_sum
                    .word(udp_len)
                    .word(udp_len)
                    .plus(payload_sum())
                    .fold();
                out[46..48].copy_from_slice(&udp_checksum(sum).to_be_bytes());
                IPV6_HEADER_LEN
            }
        }
    }
}

/// The UDP checksum field for a datagram whose pseudo-header, header and payload sum to `sum`.
/// A checksum computing to 0 is sent as 0xffff, the same number in ones' complement, because 0
/// in the field means "no checksum" (RFC 768), which IPv6 receivers drop.
pub fn udp_checksum(sum: u16) -> u16 {
    match !sum {
        0 => 0xffff,
        checksum => checksum,
    }
}

/// The ones' complement checksum of an IPv4 header whose checksum field is zero.
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded into sixteen bits above")
}

/// Room for one `IP_TOS` or `IPV6_TCLASS` control message (an `int` each).
const TOS_CONTROL_LEN: usize = 32;

/// One send in flight: a framed packet (header and payload to a link-layer address), or a
/// datagram on a connected UDP socket that carries its DSCP/ECN byte as a control message.
struct FrameSend {
    header: [u8; HEADER_ROOM],
    iov: [libc::iovec; 2],
    address: libc::sockaddr_ll,
    control: [u8; TOS_CONTROL_LEN],
    message: libc::msghdr,
    /// Bytes the send reports beyond the payload: the header of a framed send.
    overhead: usize,
}

/// Storage for the sends in flight, allocated once.
pub struct FrameSlab {
    sends: Slots<FrameSend>,
}

impl FrameSlab {
    pub fn new(capacity: usize) -> Self {
        let empty = || {
            // SAFETY: iovec, sockaddr_ll and msghdr are plain data; all-zero is valid.
            unsafe {
                FrameSend {
                    header: [0; HEADER_ROOM],
                    iov: std::mem::zeroed(),
                    address: std::mem::zeroed(),
                    control: [0; TOS_CONTROL_LEN],
                    message: std::mem::zeroed(),
                    overhead: 0,
                }
            }
        };
        Self {
            sends: Slots::new(capacity, empty),
        }
    }

    /// Fills a free slot for `payload` sent through `frame` with DSCP/ECN byte `dscp_ecn`
    /// (`payload_sum` as for [`Frame::write_header`]); returns the slot and its message, or
    /// `None` when every slot is in use.
    pub fn prepare(
        &mut self,
        frame: &Frame,
        payload: &[u8],
        dscp_ecn: u8,
        payload_sum: impl FnOnce() -> OnesComplementSum,
    ) -> Option<(u32, *const libc::msghdr)> {
        let (slot, send) = self.sends.take()?;
        let header_len = frame.write_header(&mut send.header, payload.len(), dscp_ecn, payload_sum);
        send.address = frame.address;
        send.overhead = header_len;
        send.message = empty_message();
        send.iov = [
            libc::iovec {
                iov_base: send.header.as_mut_ptr().cast(),
                iov_len: header_len,
            },
            libc::iovec {
                iov_base: payload.as_ptr().cast_mut().cast(),
                iov_len: payload.len(),
            },
        ];
        send.message.msg_name = std::ptr::from_mut(&mut send.address).cast();
        send.message.msg_namelen =
            u32::try_from(size_of::<libc::sockaddr_ll>()).expect("sockaddr_ll is 20 bytes");
        send.message.msg_iov = send.iov.as_mut_ptr();
        send.message.msg_iovlen = 2;
        Some((slot, &raw const send.message))
    }

    /// Fills a free slot for `payload` sent on a connected UDP socket with DSCP/ECN byte
    /// `dscp_ecn`, as an `IPV6_TCLASS` control message on an IPv6 socket (`ipv6`) and an
    /// `IP_TOS` one otherwise; returns the slot and its message, or `None` when every slot is
    /// in use.
    pub fn prepare_datagram(
        &mut self,
        payload: &[u8],
        dscp_ecn: u8,
        ipv6: bool,
    ) -> Option<(u32, *const libc::msghdr)> {
        let (slot, send) = self.sends.take()?;
        send.overhead = 0;
        send.iov[0] = libc::iovec {
            iov_base: payload.as_ptr().cast_mut().cast(),
            iov_len: payload.len(),
        };
        send.message = empty_message();
        send.message.msg_iov = send.iov.as_mut_ptr();
        send.message.msg_iovlen = 1;
        send.message.msg_control = send.control.as_mut_ptr().cast();
        let (level, kind) = if ipv6 {
            (libc::IPPROTO_IPV6, libc::IPV6_TCLASS)
        } else {
            (libc::IPPROTO_IP, libc::IP_TOS)
        };
        let value = libc::c_int::from(dscp_ecn);
        let int_len = u32::try_from(size_of::<libc::c_int>()).expect("an int is 4 bytes");
        // SAFETY: CMSG_SPACE of an int is 24 bytes on this ABI, within `control` (checked by
        // the test `control_room_holds_one_int`); the header and data are written inside it.
        unsafe {
            send.message.msg_controllen = libc::CMSG_SPACE(int_len) as usize;
            let header = libc::CMSG_FIRSTHDR(&raw const send.message);
            (*header).cmsg_level = level;
            (*header).cmsg_type = kind;
            (*header).cmsg_len = libc::CMSG_LEN(int_len) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<libc::c_int>(), value);
        }
        Some((slot, &raw const send.message))
    }

    /// Frees `slot`; returns the bytes its send reported beyond the payload.
    pub fn release(&mut self, slot: u32) -> usize {
        self.sends.give_back(slot).map_or(0, |send| send.overhead)
    }
}

fn empty_message() -> libc::msghdr {
    // SAFETY: msghdr is plain data; all-zero is an empty message.
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{self, Addresses};

    /// 10.2.0.1 → 239.2.2.1:6000 with TTL 7.
    fn camera_frame() -> Frame {
        Frame::new(&FrameHeader {
            ifindex: 3,
            mac: [1, 0, 0x5e, 2, 2, 1],
            addresses: FrameAddresses::V4 {
                source: [10, 2, 0, 1],
                destination: [239, 2, 2, 1],
            },
            port: 6000,
            ttl: 7,
            ethernet: None,
        })
    }

    const SOURCE6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0x01];
    const GROUP6: [u8; 16] = [
        0xff, 0x3e, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x02, 0x01,
    ];

    /// `[fd00::2001]` → `[ff3e::202:201]:6000` with hop limit 9.
    fn camera_frame6() -> Frame {
        Frame::new(&FrameHeader {
            ifindex: 4,
            mac: [0x33, 0x33, 0, 0x02, 0x02, 0x01],
            addresses: FrameAddresses::V6 {
                source: SOURCE6,
                destination: GROUP6,
            },
            port: 6000,
            ttl: 9,
            ethernet: None,
        })
    }

    /// A payload sum an IPv4 header must never ask for.
    fn no_payload_walk() -> OnesComplementSum {
        panic!("an IPv4 output looked at the payload")
    }

    /// The payload's sum, by walking it.
    fn summed(payload: &[u8]) -> impl FnOnce() -> OnesComplementSum + '_ {
        || OnesComplementSum::new().bytes(payload)
    }

    /// The packet `frame` sends for `payload`: header, then payload.
    fn framed(
        frame: &Frame,
        payload: &[u8],
        dscp_ecn: u8,
        payload_sum: impl FnOnce() -> OnesComplementSum,
    ) -> Vec<u8> {
        let mut header = [0; HEADER_ROOM];
        let len = frame.write_header(&mut header, payload.len(), dscp_ecn, payload_sum);
        let mut packet = header[..len].to_vec();
        packet.extend_from_slice(payload);
        packet
    }

    /// RFC 1071 sixteen bits at a time, independent of `OnesComplementSum`.
    fn reference_sum(bytes: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
            sum = (sum & 0xffff) + (sum >> 16);
        }
        u16::try_from(sum).expect("folded at every step")
    }

    /// Whether the UDP checksum of an IPv6 packet (no extension headers) verifies the way a
    /// receiver checks it: pseudo-header, UDP header with its checksum, and payload sum to
    /// 0xffff.
    fn ipv6_udp_verifies(packet: &[u8]) -> bool {
        let udp = &packet[40..];
        let mut all = packet[8..40].to_vec();
        all.extend_from_slice(&u32::try_from(udp.len()).expect("small").to_be_bytes());
        all.extend_from_slice(&[0, 0, 0, 17]);
        all.extend_from_slice(udp);
        reference_sum(&all) == 0xffff
    }

    /// `len` bytes that are not all alike.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from((i * 73 + 11) % 256).expect("below 256"))
            .collect()
    }

    #[test]
    fn header_checksum_verifies_and_fields_are_set() {
        let frame = camera_frame();
        let first = framed(&frame, &[0; 100], 0xb8, no_payload_walk);
        let second = framed(&frame, &[0; 100], 0, no_payload_walk);
        // A header including its checksum sums to 0xffff, so its checksum is 0.
        assert_eq!(ipv4_checksum(&first[..20]), 0);
        assert_eq!(u16::from_be_bytes([first[2], first[3]]), 128);
        assert_eq!(first[8], 7);
        assert_eq!(first[1], 0xb8, "the DSCP/ECN byte");
        assert_eq!(ipv4_checksum(&second[..20]), 0);
        assert_eq!(&first[12..20], &[10, 2, 0, 1, 239, 2, 2, 1]);
        assert_eq!(u16::from_be_bytes([first[22], first[23]]), 6000);
        assert_eq!(u16::from_be_bytes([first[24], first[25]]), 108);
        assert_eq!(&first[26..28], &[0, 0], "no UDP checksum over IPv4");
        assert_ne!(
            first[4..6],
            second[4..6],
            "each packet gets its own identification"
        );
    }

    #[test]
    fn known_checksum() {
        // A widely used worked example: 192.168.0.1 -> 192.168.0.199, UDP, checksum b861.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_checksum(&header), 0xb861);
    }

    #[test]
    fn ipv6_header_fields_are_set() {
        let payload = pattern(100);
        let p = framed(&camera_frame6(), &payload, 0xb9, summed(&payload));
        assert_eq!(p.len(), 48 + 100);
        assert_eq!(p[0] >> 4, 6, "version");
        assert_eq!((p[0] << 4) | (p[1] >> 4), 0xb9, "traffic class");
        assert_eq!(
            [p[1] & 0x0f, p[2], p[3]],
            [0, 0, 0],
            "flow label 0 (unlabelled)"
        );
        assert_eq!(u16::from_be_bytes([p[4], p[5]]), 108, "payload length");
        assert_eq!(p[6], 17, "next header: UDP");
        assert_eq!(p[7], 9, "hop limit");
        assert_eq!(p[8..24], SOURCE6);
        assert_eq!(p[24..40], GROUP6);
        assert_eq!(u16::from_be_bytes([p[40], p[41]]), 6000, "source port");
        assert_eq!(u16::from_be_bytes([p[42], p[43]]), 6000, "destination port");
        assert_eq!(u16::from_be_bytes([p[44], p[45]]), 108, "UDP length");
        assert!(ipv6_udp_verifies(&p));
        // What the worker sends, it can parse back.
        let datagram = packet::parse(&p, 2048).expect("a valid IPv6 packet");
        assert_eq!(&p[datagram.payload], payload.as_slice());
        assert_eq!(datagram.dscp_ecn, 0xb9);
    }

    #[test]
    fn ipv6_udp_checksums_verify_for_every_length() {
        let frame = camera_frame6();
        for len in [0, 1, 2, 3, 4, 5, 17, 64, 511, 1400, 1401, 8999] {
            let payload = pattern(len);
            let p = framed(&frame, &payload, 0, summed(&payload));
            assert_ne!(&p[46..48], &[0, 0], "{len} bytes: a checksum is mandatory");
            assert!(ipv6_udp_verifies(&p), "{len} bytes");
            let mut corrupted = p.clone();
            if let Some(last) = corrupted.last_mut() {
                *last ^= 1;
                assert!(!ipv6_udp_verifies(&corrupted), "{len} bytes, corrupted");
            }
        }
    }

    #[test]
    fn a_checksum_computing_to_zero_is_sent_as_all_ones() {
        let frame = camera_frame6();
        // With a two-byte payload of zeros the rest sums to `rest`; a payload word of its
        // complement makes the whole sum 0xffff, whose complement, the checksum, is 0.
        let zeros = framed(&frame, &[0, 0], 0, summed(&[0, 0]));
        let mut all = zeros[8..40].to_vec();
        all.extend_from_slice(&[0, 0, 0, 10, 0, 0, 0, 17]);
        all.extend_from_slice(&zeros[40..46]);
        let word = !reference_sum(&all);
        let payload = word.to_be_bytes();
        let p = framed(&frame, &payload, 0, summed(&payload));
        assert_eq!(&p[46..48], &[0xff, 0xff]);
        assert!(ipv6_udp_verifies(&p));
        assert_eq!(udp_checksum(0xffff), 0xffff);
        assert_eq!(udp_checksum(0x1234), 0xedcb);
    }

    #[test]
    fn the_sum_derived_from_the_input_checksum_gives_the_same_output() {
        let input_frame = camera_frame6();
        let output = Frame::new(&FrameHeader {
            ifindex: 5,
            mac: [0x33, 0x33, 0, 0, 0, 9],
            addresses: FrameAddresses::V6 {
                source: [0xfd, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
                destination: [0xff, 0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
            },
            port: 7000,
            ttl: 3,
            ethernet: None,
        });
        for len in [0, 1, 2, 3, 7, 100, 1401] {
            let payload = pattern(len);
            // An IPv6 input, as a sender with a valid checksum sends it.
            let input = framed(&input_frame, &payload, 0x2e, summed(&payload));
            let datagram = packet::parse(&input, 2048).expect("valid");
            let derived = framed(&output, &payload, 0, || datagram.payload_sum(&input));
            let walked = framed(&output, &payload, 0, summed(&payload));
            assert_eq!(derived, walked, "{len} bytes");
            assert!(ipv6_udp_verifies(&derived), "{len} bytes");
        }
    }

    #[test]
    fn a_corrupted_input_gives_an_output_that_fails_its_checksum() {
        let payload = pattern(200);
        let mut input = framed(&camera_frame6(), &payload, 0, summed(&payload));
        input[100] ^= 0x10; // corrupted on the way to the relay
        let datagram = packet::parse(&input, 2048).expect("the parser does not verify");
        let received = &input[datagram.payload.clone()];
        let output = framed(&camera_frame6(), received, 0, || {
            datagram.payload_sum(&input)
        });
        assert!(
            !ipv6_udp_verifies(&output),
            "the corruption stays detectable"
        );
    }

    #[test]
    fn ipv4_input_translates_to_an_ipv6_output() {
        let payload = pattern(33);
        let mut input = framed(&camera_frame(), &payload, 0xb9, no_payload_walk);
        // With and without the sender's UDP checksum (the framed IPv4 output sends none).
        let datagram = packet::parse(&input, 2048).expect("valid");
        assert_eq!(datagram.udp_checksum, 0);
        let without = framed(&camera_frame6(), &payload, datagram.dscp_ecn, || {
            datagram.payload_sum(&input)
        });
        let mut all = input[12..20].to_vec();
        all.extend_from_slice(&[0, 17, 0, 41]);
        all.extend_from_slice(&input[20..]);
        input[26..28].copy_from_slice(&udp_checksum(reference_sum(&all)).to_be_bytes());
        let datagram = packet::parse(&input, 2048).expect("valid");
        assert_ne!(datagram.udp_checksum, 0);
        assert!(matches!(datagram.addresses, Addresses::V4 { .. }));
        let with = framed(&camera_frame6(), &payload, datagram.dscp_ecn, || {
            datagram.payload_sum(&input)
        });
        assert_eq!(with, without);
        let parsed = packet::parse(&with, 2048).expect("an IPv6 packet");
        assert!(matches!(parsed.addresses, Addresses::V6 { .. }));
        assert_eq!(parsed.dscp_ecn, 0xb9, "the DSCP/ECN byte carries over");
        assert_eq!(&with[parsed.payload], payload.as_slice());
        assert!(ipv6_udp_verifies(&with));
    }

    #[test]
    fn ipv6_input_translates_to_an_ipv4_output() {
        let payload = pattern(33);
        let input = framed(&camera_frame6(), &payload, 0x2d, summed(&payload));
        let datagram = packet::parse(&input, 2048).expect("valid");
        assert!(matches!(datagram.addresses, Addresses::V6 { .. }));
        let output = framed(
            &camera_frame(),
            &input[datagram.payload.clone()],
            0x2d,
            no_payload_walk,
        );
        assert_eq!(output.len(), 28 + 33);
        assert_eq!(output[0], 0x45);
        assert_eq!(output[1], 0x2d, "the DSCP/ECN byte carries over");
        assert_eq!(ipv4_checksum(&output[..20]), 0);
        let parsed = packet::parse(&output, 2048).expect("an IPv4 packet");
        assert_eq!(
            parsed.addresses,
            Addresses::V4 {
                source: [10, 2, 0, 1].into(),
                destination: [239, 2, 2, 1].into(),
            }
        );
        assert_eq!(&output[parsed.payload], payload.as_slice());
    }

    /// The link-layer address and header length a prepared framed send carries.
    fn sent_to(message: *const libc::msghdr) -> (u16, usize) {
        // SAFETY: the message, its address and I/O vector live in the slab, borrowed by the
        // caller for as long as this reads them.
        unsafe {
            let message = &*message;
            let address = &*message.msg_name.cast::<libc::sockaddr_ll>();
            (
                u16::from_be(address.sll_protocol),
                (*message.msg_iov).iov_len,
            )
        }
    }

    #[test]
    fn frames_go_out_with_their_family_and_report_their_header() {
        let mut slab = FrameSlab::new(2);
        let payload = [1_u8; 10];
        let (v4, message) = slab
            .prepare(&camera_frame(), &payload, 0, no_payload_walk)
            .expect("slot");
        assert_eq!(sent_to(message), (0x0800, 28));
        let (v6, message) = slab
            .prepare(&camera_frame6(), &payload, 0, summed(&payload))
            .expect("slot");
        assert_eq!(sent_to(message), (0x86dd, 48));
        assert_eq!(slab.release(v4), IPV4_HEADER_LEN);
        assert_eq!(slab.release(v6), IPV6_HEADER_LEN);
    }

    #[test]
    fn slots_run_out_and_come_back() {
        let frame = camera_frame();
        let mut slab = FrameSlab::new(2);
        let payload = [0_u8; 4];
        let (a, _) = slab
            .prepare(&frame, &payload, 0, no_payload_walk)
            .expect("slot");
        let (b, _) = slab.prepare_datagram(&payload, 0xb8, false).expect("slot");
        assert_ne!(a, b);
        assert!(slab.prepare(&frame, &payload, 0, no_payload_walk).is_none());
        assert_eq!(
            slab.release(a),
            IPV4_HEADER_LEN,
            "a framed send reports its header"
        );
        assert_eq!(slab.release(b), 0, "a datagram reports its payload only");
        assert!(slab.prepare(&frame, &payload, 0, no_payload_walk).is_some());
    }

    /// The one control message of a prepared datagram: level, type, value.
    fn control_message(message: *const libc::msghdr) -> (i32, i32, libc::c_int) {
        // SAFETY: the message and its control buffer live in the slab, borrowed by the
        // caller for as long as this reads them.
        unsafe {
            let message = &*message;
            assert!(message.msg_name.is_null(), "the socket is connected");
            assert_eq!(message.msg_iovlen, 1);
            assert_eq!((*message.msg_iov).iov_len, 3);
            assert!(
                message.msg_controllen <= TOS_CONTROL_LEN,
                "control_room_holds_one_int"
            );
            let header = libc::CMSG_FIRSTHDR(message);
            assert!(libc::CMSG_NXTHDR(message, header).is_null(), "one message");
            let value = std::ptr::read_unaligned(libc::CMSG_DATA(header).cast::<libc::c_int>());
            ((*header).cmsg_level, (*header).cmsg_type, value)
        }
    }

    #[test]
    fn a_datagram_carries_its_tos_as_a_control_message() {
        let mut slab = FrameSlab::new(1);
        let payload = [1_u8, 2, 3];
        let (_, message) = slab.prepare_datagram(&payload, 0xb8, false).expect("slot");
        assert_eq!(
            control_message(message),
            (libc::IPPROTO_IP, libc::IP_TOS, 0xb8)
        );
    }

    #[test]
    fn an_ipv6_datagram_carries_its_traffic_class_as_a_control_message() {
        let mut slab = FrameSlab::new(1);
        let payload = [1_u8, 2, 3];
        let (_, message) = slab.prepare_datagram(&payload, 0xb9, true).expect("slot");
        assert_eq!(
            control_message(message),
            (libc::IPPROTO_IPV6, libc::IPV6_TCLASS, 0xb9)
        );
    }

    /// The kernel takes the control message: an `IPV6_TCLASS` send on a connected IPv6 UDP
    /// socket arrives with that traffic class.
    #[test]
    fn the_kernel_applies_the_traffic_class() {
        use std::{net::UdpSocket, os::fd::AsRawFd};

        let Ok(sink) = UdpSocket::bind("[::1]:0") else {
            eprintln!("no IPv6 loopback here; skipped");
            return;
        };
        let sender = UdpSocket::bind("[::1]:0").expect("bind");
        sender
            .connect(sink.local_addr().expect("address"))
            .expect("connect");
        let on: libc::c_int = 1;
        // SAFETY: a valid socket and an int option of the right length.
        let status = unsafe {
            libc::setsockopt(
                sink.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVTCLASS,
                (&raw const on).cast(),
                u32::try_from(size_of::<libc::c_int>()).expect("4 bytes"),
            )
        };
        assert_eq!(status, 0, "IPV6_RECVTCLASS");
        let mut slab = FrameSlab::new(1);
        let payload = [1_u8, 2, 3];
        let (_, message) = slab.prepare_datagram(&payload, 0xb9, true).expect("slot");
        // SAFETY: the message lives in the slab; the payload outlives the call.
        let sent = unsafe { libc::sendmsg(sender.as_raw_fd(), message, 0) };
        assert_eq!(sent, 3, "{}", std::io::Error::last_os_error());

        let mut data = [0_u8; 16];
        let mut control = [0_u8; 64];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        let mut received = empty_message();
        received.msg_iov = &raw mut iov;
        received.msg_iovlen = 1;
        received.msg_control = control.as_mut_ptr().cast();
        received.msg_controllen = control.len();
        // SAFETY: the message points at the buffers above, which outlive the call.
        let len = unsafe { libc::recvmsg(sink.as_raw_fd(), &raw mut received, 0) };
        assert_eq!(len, 3);
        // SAFETY: the kernel filled `control` and set its length.
        let class = unsafe {
            let header = libc::CMSG_FIRSTHDR(&raw const received);
            assert!(!header.is_null(), "no control message received");
            assert_eq!(
                ((*header).cmsg_level, (*header).cmsg_type),
                (libc::IPPROTO_IPV6, libc::IPV6_TCLASS)
            );
            std::ptr::read_unaligned(libc::CMSG_DATA(header).cast::<libc::c_int>())
        };
        assert_eq!(class, 0xb9);
    }
}
