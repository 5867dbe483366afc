//! Multicast outputs on Ethernet interfaces: the worker writes the whole frame and puts a
//! `virtio_net_hdr` in front of it (`PACKET_VNET_HDR`), which asks the kernel for what a NIC
//! does for locally sent UDP: the UDP checksum (or its offload), and, for a run of same-size
//! datagrams of one flow, splitting one send into one packet per datagram (UDP segmentation
//! offload). A run of N datagrams costs one trip through `io_uring`, the packet socket and the
//! device's transmit path, and on a veth one wake-up of the receiving CPU, instead of N
//! (decision 0014). Each packet that leaves is an ordinary datagram: its own IPv4
//! identification (the kernel numbers them on from the run's), lengths and checksums.

use nix::libc;

use super::{
    buffers::Buffer,
    frames::{Family, Frame, HEADER_ROOM, IPV4_HEADER_LEN, IPV6_HEADER_LEN, ipv4_checksum},
    slots::Slots,
};
use crate::{command::FrameHeader, packet::OnesComplementSum};

/// Most datagrams one send carries: the kernel refuses a `virtio_net_hdr` send of more
/// segments than `UDP_MAX_SEGMENTS`, 64 in the kernels that first split these sends (later
/// ones take 128).
pub const MAX_RUN: usize = 64;
const ETHERNET_HEADER_LEN: usize = 14;
/// `struct virtio_net_hdr` (the legacy layout `PACKET_VNET_HDR` takes).
const VNET_HEADER_LEN: usize = 10;
/// Room for the `virtio_net_hdr`, the Ethernet header and the longer IP and UDP headers.
pub const RUN_HEADER_ROOM: usize = VNET_HEADER_LEN + ETHERNET_HEADER_LEN + HEADER_ROOM;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
/// Offset of the checksum in the UDP header.
const UDP_CHECKSUM_OFFSET: u16 = 6;
/// A run's datagrams together, with the UDP header, fit the 16-bit IPv4 total length and
/// IPv6 payload length of the packet the kernel splits.
const MAX_RUN_BYTES: usize = u16::MAX as usize - IPV6_HEADER_LEN;

const IPPROTO_UDP: u16 = 17;

/// An Ethernet output's link-layer header and the largest datagram payload its MTU lets one
/// packet carry.
pub struct EthernetFrame {
    header: [u8; ETHERNET_HEADER_LEN],
    max_payload: usize,
}

impl EthernetFrame {
    /// `None` for an output whose interface is not Ethernet (the header says so).
    pub fn new(header: &FrameHeader, ethertype: libc::c_int) -> Option<Self> {
        let origin = header.ethernet?;
        let ethertype = u16::try_from(ethertype).ok()?;
        let mut frame = [0_u8; ETHERNET_HEADER_LEN];
        frame[..6].copy_from_slice(&header.mac);
        frame[6..12].copy_from_slice(&origin.mac);
        frame[12..].copy_from_slice(&ethertype.to_be_bytes());
        let ip_udp = match header.addresses {
            crate::command::FrameAddresses::V4 { .. } => IPV4_HEADER_LEN,
            crate::command::FrameAddresses::V6 { .. } => IPV6_HEADER_LEN,
        };
        Some(Self {
            header: frame,
            max_payload: usize::try_from(origin.mtu)
                .unwrap_or(0)
                .saturating_sub(ip_udp),
        })
    }

    /// The largest payload of a datagram that may be part of a run: each packet the kernel
    /// splits off must fit the interface's MTU. A single send bigger than that fails with
    /// `EMSGSIZE`, as a framed packet always has.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }
}

/// Most datagrams of `payload_len` bytes one send may carry.
pub fn run_limit(payload_len: usize) -> usize {
    MAX_RUN_BYTES
        .checked_div(payload_len)
        .unwrap_or(1)
        .clamp(1, MAX_RUN)
}

impl Frame {
    /// Writes into `out` the `virtio_net_hdr`, the Ethernet header and the IP and UDP headers of
    /// a send of `count` datagrams of `payload_len` bytes each (at most [`run_limit`]) with
    /// DSCP/ECN byte `dscp_ecn`; returns their length, or `None` for an output that is not
    /// Ethernet. One datagram is one packet; more are one packet the kernel splits. The UDP
    /// checksum field holds the pseudo-header's sum, which the kernel or the NIC completes
    /// over the header and payload of each packet.
    pub fn write_run_header(
        &self,
        out: &mut [u8; RUN_HEADER_ROOM],
        payload_len: usize,
        count: usize,
        dscp_ecn: u8,
    ) -> Option<usize> {
        let ethernet = self.ethernet.as_ref()?;
        let udp_len = u16::try_from(8 + payload_len * count).unwrap_or(u16::MAX);
        let (ip_len, header_len) = match self.family {
            Family::V4 { .. } => (20, IPV4_HEADER_LEN),
            Family::V6 { .. } => (40, IPV6_HEADER_LEN),
        };
        let (vnet, rest) = out.split_at_mut(VNET_HEADER_LEN);
        let segmented = count > 1;
        vnet[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        vnet[1] = if segmented {
            VIRTIO_NET_HDR_GSO_UDP_L4
        } else {
            VIRTIO_NET_HDR_GSO_NONE
        };
        let field = |value: usize| u16::try_from(value).unwrap_or(u16::MAX).to_ne_bytes();
        vnet[2..4].copy_from_slice(&field(ETHERNET_HEADER_LEN + header_len));
        vnet[4..6].copy_from_slice(&field(if segmented { payload_len } else { 0 }));
        vnet[6..8].copy_from_slice(&field(ETHERNET_HEADER_LEN + ip_len));
        vnet[8..10].copy_from_slice(&UDP_CHECKSUM_OFFSET.to_ne_bytes());
        rest[..ETHERNET_HEADER_LEN].copy_from_slice(&ethernet.header);
        let packet = &mut rest[ETHERNET_HEADER_LEN..ETHERNET_HEADER_LEN + header_len];
        packet.copy_from_slice(&self.template[..header_len]);
        let udp = ip_len;
        packet[udp + 4..udp + 6].copy_from_slice(&udp_len.to_be_bytes());
        let pseudo = match &self.family {
            Family::V4 { next_id } => {
                packet[1] = dscp_ecn;
                let total = u16::try_from(ip_len + usize::from(udp_len)).unwrap_or(u16::MAX);
                packet[2..4].copy_from_slice(&total.to_be_bytes());
                // The kernel numbers the packets it splits off on from this one.
                let id = next_id.get();
                next_id.set(id.wrapping_add(u16::try_from(count).unwrap_or(u16::MAX)));
                packet[4..6].copy_from_slice(&id.to_be_bytes());
                let checksum = ipv4_checksum(&packet[..20]);
                packet[10..12].copy_from_slice(&checksum.to_be_bytes());
                OnesComplementSum::new().bytes(&packet[12..20])
            }
            Family::V6 { .. } => {
                packet[0] = 0x60 | (dscp_ecn >> 4);
                packet[1] = dscp_ecn << 4;
                packet[4..6].copy_from_slice(&udp_len.to_be_bytes());
                OnesComplementSum::new().bytes(&packet[8..40])
            }
        };
        let partial = pseudo.word(IPPROTO_UDP).word(udp_len).fold();
        packet[udp + 6..udp + 8].copy_from_slice(&partial.to_be_bytes());
        Some(VNET_HEADER_LEN + ETHERNET_HEADER_LEN + header_len)
    }
}

/// One Ethernet send in flight: its headers, the I/O vector (headers, then each datagram's
/// payload in its receive buffer) and the buffers it reads from.
struct RunSend {
    header: [u8; RUN_HEADER_ROOM],
    iov: [libc::iovec; 1 + MAX_RUN],
    address: libc::sockaddr_ll,
    message: libc::msghdr,
    buffers: [Buffer; MAX_RUN],
    count: usize,
    payload_bytes: usize,
}

/// What a completed Ethernet send carried.
pub struct RunSent {
    pub buffers: [Buffer; MAX_RUN],
    pub count: usize,
    pub payload_bytes: usize,
}

impl RunSent {
    pub fn buffers(&self) -> &[Buffer] {
        &self.buffers[..self.count]
    }
}

/// Storage for the Ethernet sends in flight, allocated once.
pub struct RunSlab {
    sends: Slots<RunSend>,
}

impl RunSlab {
    pub fn new(capacity: usize) -> Self {
        let empty = || {
            // SAFETY: iovec, sockaddr_ll and msghdr are plain data; all-zero is valid.
            unsafe {
                RunSend {
                    header: [0; RUN_HEADER_ROOM],
                    iov: std::mem::zeroed(),
                    address: std::mem::zeroed(),
                    message: std::mem::zeroed(),
                    buffers: [Buffer::from_raw(0); MAX_RUN],
                    count: 0,
                    payload_bytes: 0,
                }
            }
        };
        Self {
            sends: Slots::new(capacity, empty),
        }
    }

    /// Fills a free slot with the send of `payloads` (same length, read from `buffers`, one
    /// each, at most [`run_limit`]) through `frame` with DSCP/ECN byte `dscp_ecn`; returns the
    /// slot and its message, or `None` when every slot is in use or `frame` is not Ethernet.
    pub fn prepare(
        &mut self,
        frame: &Frame,
        buffers: &[Buffer],
        payloads: &[&[u8]],
        dscp_ecn: u8,
    ) -> Option<(u32, *const libc::msghdr)> {
        let count = payloads.len();
        let payload_len = payloads.first().map_or(0, |payload| payload.len());
        debug_assert!(count >= 1 && count <= run_limit(payload_len) && buffers.len() == count);
        if !frame.is_ethernet() {
            return None;
        }
        let (slot, send) = self.sends.take()?;
        let header_len = frame.write_run_header(&mut send.header, payload_len, count, dscp_ecn)?;
        send.address = frame.address;
        send.count = count;
        send.payload_bytes = payload_len * count;
        send.buffers[..count].copy_from_slice(buffers);
        send.iov[0] = libc::iovec {
            iov_base: send.header.as_mut_ptr().cast(),
            iov_len: header_len,
        };
        for (iov, payload) in send.iov[1..].iter_mut().zip(payloads) {
            *iov = libc::iovec {
                iov_base: payload.as_ptr().cast_mut().cast(),
                iov_len: payload.len(),
            };
        }
        // SAFETY: msghdr is plain data; all-zero is an empty message.
        send.message = unsafe { std::mem::zeroed() };
        send.message.msg_name = std::ptr::from_mut(&mut send.address).cast();
        send.message.msg_namelen =
            u32::try_from(size_of::<libc::sockaddr_ll>()).expect("sockaddr_ll is 20 bytes");
        send.message.msg_iov = send.iov.as_mut_ptr();
        send.message.msg_iovlen = 1 + count;
        Some((slot, &raw const send.message))
    }

    /// Frees `slot`; returns what its send carried.
    pub fn release(&mut self, slot: u32) -> Option<RunSent> {
        let send = self.sends.give_back(slot)?;
        Some(RunSent {
            buffers: send.buffers,
            count: send.count,
            payload_bytes: send.payload_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{EthernetOrigin, FrameAddresses};

    const INTERFACE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x01];

    fn frame(addresses: FrameAddresses, mtu: u32) -> Frame {
        let mac = match addresses {
            FrameAddresses::V4 { .. } => [1, 0, 0x5e, 2, 2, 1],
            FrameAddresses::V6 { .. } => [0x33, 0x33, 0, 2, 2, 1],
        };
        Frame::new(&FrameHeader {
            ifindex: 3,
            mac,
            addresses,
            port: 6000,
            ttl: 7,
            ethernet: Some(EthernetOrigin {
                mac: INTERFACE_MAC,
                mtu,
            }),
        })
    }

    fn v4() -> FrameAddresses {
        FrameAddresses::V4 {
            source: [10, 2, 0, 1],
            destination: [239, 2, 2, 1],
        }
    }

    fn v6() -> FrameAddresses {
        let mut source = [0; 16];
        source[0] = 0xfd;
        source[15] = 1;
        let mut destination = [0; 16];
        destination[..2].copy_from_slice(&[0xff, 0x3e]);
        destination[15] = 9;
        FrameAddresses::V6 {
            source,
            destination,
        }
    }

    fn ne16(bytes: &[u8]) -> u16 {
        u16::from_ne_bytes([bytes[0], bytes[1]])
    }

    fn be16(bytes: &[u8]) -> u16 {
        u16::from_be_bytes([bytes[0], bytes[1]])
    }

    /// The ones' complement sum of `bytes`, folded, by the textbook definition.
    fn sum(bytes: &[u8]) -> u16 {
        let mut total: u32 = bytes
            .chunks(2)
            .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
            .sum();
        while total > 0xffff {
            total = (total & 0xffff) + (total >> 16);
        }
        u16::try_from(total).expect("folded")
    }

    fn add(a: u16, b: u16) -> u16 {
        let total = u32::from(a) + u32::from(b);
        u16::try_from((total & 0xffff) + (total >> 16)).expect("folded")
    }

    /// What the kernel does with a send: splits it into packets of `gso_size` payload bytes
    /// (each with its own lengths, IPv4 identification and header checksum, and the partial
    /// UDP checksum moved to its length), then completes each UDP checksum from `csum_start`
    /// to the end into `csum_offset`, as a NIC or `skb_checksum_help` does. Returns the
    /// Ethernet frames.
    fn as_the_kernel_sends(send: &[u8]) -> Vec<Vec<u8>> {
        let (vnet, frame) = send.split_at(VNET_HEADER_LEN);
        assert_eq!(vnet[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
        let header_len = usize::from(ne16(&vnet[2..4]));
        let csum_start = usize::from(ne16(&vnet[6..8]));
        let csum_offset = usize::from(ne16(&vnet[8..10]));
        let (headers, payload) = frame.split_at(header_len);
        let segment = match vnet[1] {
            VIRTIO_NET_HDR_GSO_NONE => payload.len(),
            VIRTIO_NET_HDR_GSO_UDP_L4 => usize::from(ne16(&vnet[4..6])),
            other => panic!("gso type {other}"),
        };
        let ipv4 = be16(&headers[12..14]) == 0x0800;
        let udp = csum_start;
        let run_len = be16(&headers[udp + 4..udp + 6]);
        let parts: Vec<&[u8]> = if payload.is_empty() {
            vec![payload]
        } else {
            payload.chunks(segment).collect()
        };
        parts
            .into_iter()
            .enumerate()
            .map(|(index, part)| {
                let mut packet = headers.to_vec();
                let udp_len = u16::try_from(8 + part.len()).expect("small");
                packet[udp + 4..udp + 6].copy_from_slice(&udp_len.to_be_bytes());
                // The partial checksum follows the length: minus the old, plus the new.
                let partial = add(add(be16(&headers[udp + 6..udp + 8]), !run_len), udp_len);
                packet[udp + 6..udp + 8].copy_from_slice(&partial.to_be_bytes());
                if ipv4 {
                    let total = u16::try_from(20 + usize::from(udp_len)).expect("small");
                    packet[16..18].copy_from_slice(&total.to_be_bytes());
                    let id =
                        be16(&headers[18..20]).wrapping_add(u16::try_from(index).expect("small"));
                    packet[18..20].copy_from_slice(&id.to_be_bytes());
                    packet[24..26].fill(0);
                    let checksum = !sum(&packet[14..34]);
                    packet[24..26].copy_from_slice(&checksum.to_be_bytes());
                } else {
                    packet[18..20].copy_from_slice(&udp_len.to_be_bytes());
                }
                packet.extend_from_slice(part);
                let checksum = !sum(&packet[csum_start..]);
                packet[csum_start + csum_offset..csum_start + csum_offset + 2]
                    .copy_from_slice(&checksum.to_be_bytes());
                packet
            })
            .collect()
    }

    /// The UDP checksum of an Ethernet frame verifies: pseudo-header, header and payload sum
    /// to all ones.
    fn udp_verifies(frame: &[u8]) -> bool {
        let ipv4 = be16(&frame[12..14]) == 0x0800;
        let (addresses, udp) = if ipv4 {
            (&frame[26..34], &frame[34..])
        } else {
            (&frame[22..54], &frame[54..])
        };
        let length = u16::try_from(udp.len()).expect("small");
        let total = add(add(add(sum(addresses), 17), length), sum(udp));
        total == 0xffff && be16(&udp[4..6]) == length
    }

    fn send(frame: &Frame, payloads: &[Vec<u8>], dscp_ecn: u8) -> Vec<u8> {
        let mut header = [0; RUN_HEADER_ROOM];
        let len = frame
            .write_run_header(&mut header, payloads[0].len(), payloads.len(), dscp_ecn)
            .expect("an Ethernet output");
        let mut bytes = header[..len].to_vec();
        for payload in payloads {
            bytes.extend_from_slice(payload);
        }
        bytes
    }

    fn payloads(count: usize, len: usize) -> Vec<Vec<u8>> {
        (0..count)
            .map(|index| {
                (0..len)
                    .map(|byte| u8::try_from((index * 31 + byte * 7) % 251).expect("small"))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_run_leaves_as_the_packets_it_carries_each_with_valid_headers() {
        let output = frame(v4(), 1500);
        // Odd lengths too: the checksum's last byte is padded.
        for (count, len) in [(1, 512), (2, 512), (16, 1000), (5, 1), (3, 1471), (4, 333)] {
            let run = payloads(count, len);
            let packets = as_the_kernel_sends(&send(&output, &run, 0xb8));
            assert_eq!(packets.len(), count, "{count}×{len}");
            for (packet, payload) in packets.iter().zip(&run) {
                assert_eq!(&packet[..6], &[1, 0, 0x5e, 2, 2, 1], "group MAC");
                assert_eq!(&packet[6..12], &INTERFACE_MAC, "the interface's MAC");
                assert_eq!(packet[15], 0xb8, "DSCP/ECN");
                assert_eq!(packet[22], 7, "TTL");
                assert_eq!(sum(&packet[14..34]), 0xffff, "IPv4 header checksum");
                assert_eq!(usize::from(be16(&packet[16..18])), 28 + len);
                assert_eq!(&packet[26..34], &[10, 2, 0, 1, 239, 2, 2, 1]);
                assert_eq!(be16(&packet[34..36]), 6000, "source port");
                assert_eq!(be16(&packet[36..38]), 6000, "destination port");
                assert!(udp_verifies(packet), "{count}×{len}: UDP checksum");
                assert_eq!(&packet[42..], payload.as_slice());
            }
        }
    }

    #[test]
    fn ipv4_identifications_run_on_across_sends() {
        let output = frame(v4(), 1500);
        let first = as_the_kernel_sends(&send(&output, &payloads(3, 100), 0));
        let second = as_the_kernel_sends(&send(&output, &payloads(1, 100), 0));
        let third = as_the_kernel_sends(&send(&output, &payloads(2, 100), 0));
        let ids: Vec<u16> = first
            .iter()
            .chain(&second)
            .chain(&third)
            .map(|packet| be16(&packet[18..20]))
            .collect();
        assert_eq!(ids, [0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn an_ipv6_run_carries_its_traffic_class_and_verifying_checksums() {
        let output = frame(v6(), 9000);
        for (count, len) in [(1, 0), (1, 77), (16, 1400), (7, 8952)] {
            let run = payloads(count, len);
            let sent = send(&output, &run, 0x2e);
            assert_eq!(
                sent[VNET_HEADER_LEN + 12..VNET_HEADER_LEN + 14],
                [0x86, 0xdd]
            );
            let packets = as_the_kernel_sends(&sent);
            assert_eq!(packets.len(), count.max(1), "{count}×{len}");
            for (packet, payload) in packets.iter().zip(&run) {
                assert_eq!(&packet[..6], &[0x33, 0x33, 0, 2, 2, 1]);
                assert_eq!(packet[14] & 0x0f, 0x02, "traffic class, high nibble");
                assert_eq!(packet[15] >> 4, 0x0e, "traffic class, low nibble");
                assert_eq!(
                    usize::from(be16(&packet[18..20])),
                    8 + len,
                    "payload length"
                );
                assert_eq!(packet[21], 7, "hop limit");
                assert!(udp_verifies(packet), "{count}×{len}: UDP checksum");
                assert_eq!(&packet[62..], payload.as_slice());
            }
        }
    }

    #[test]
    fn runs_stay_within_sixty_four_packets_and_one_ip_packet() {
        assert_eq!(run_limit(0), 1);
        assert_eq!(run_limit(1), MAX_RUN);
        assert_eq!(run_limit(512), MAX_RUN);
        // 46 datagrams of 1400 bytes fill the 64 KiB IP packet the kernel splits.
        assert_eq!(run_limit(1400), 46);
        assert_eq!(run_limit(8952), 7);
        for len in [1, 512, 1400, 4000, 8952] {
            assert!(
                u16::try_from(8 + 40 + run_limit(len) * len).is_ok(),
                "{len}"
            );
        }
    }

    #[test]
    fn a_run_packet_fits_the_interface_mtu() {
        assert_eq!(
            frame(v4(), 1500)
                .ethernet
                .as_ref()
                .map(EthernetFrame::max_payload),
            Some(1472)
        );
        assert_eq!(
            frame(v6(), 1500)
                .ethernet
                .as_ref()
                .map(EthernetFrame::max_payload),
            Some(1452)
        );
    }

    #[test]
    fn an_output_that_is_not_ethernet_has_no_run_header() {
        let tunnel = Frame::new(&FrameHeader {
            ifindex: 3,
            mac: [0; 6],
            addresses: v4(),
            port: 6000,
            ttl: 7,
            ethernet: None,
        });
        let mut header = [0; RUN_HEADER_ROOM];
        assert_eq!(tunnel.write_run_header(&mut header, 100, 1, 0), None);
    }

    #[test]
    fn slots_hold_their_buffers_until_released() {
        let output = frame(v4(), 1500);
        let mut slab = RunSlab::new(1);
        let run = payloads(2, 10);
        let slices: Vec<&[u8]> = run.iter().map(Vec::as_slice).collect();
        let buffers = [Buffer::from_raw(4), Buffer::from_raw(9)];
        let (slot, message) = slab
            .prepare(&output, &buffers, &slices, 0)
            .expect("a free slot");
        // SAFETY: the message lives in the slab until released.
        let message = unsafe { &*message };
        assert_eq!(message.msg_iovlen, 3);
        assert!(
            slab.prepare(&output, &buffers, &slices, 0).is_none(),
            "full"
        );
        let sent = slab.release(slot).expect("a slot in use");
        assert_eq!(sent.buffers(), &buffers);
        assert_eq!(sent.payload_bytes, 20);
        assert!(
            slab.prepare(&output, &buffers[..1], &slices[..1], 0)
                .is_some()
        );
    }
}
