//! Multicast outputs the worker frames itself: it writes the IPv4 and UDP headers in front of
//! the payload and sends the packet on a link-layer socket of the output interface, so no
//! route is looked up and no UDP socket is walked per packet (decision 0004).
//!
//! Each send in flight owns a slot of a fixed slab holding its header, its two-part I/O vector
//! (header, then the payload in the receive buffer) and its message header, so the memory the
//! kernel reads stays put until the send completes.

use std::cell::Cell;

use nix::libc;

use crate::command::FrameHeader;

/// IPv4 header (20 bytes, no options) and UDP header (8 bytes).
pub const HEADER_LEN: usize = 28;

/// A multicast output's fixed header fields and link-layer destination.
pub struct Frame {
    template: [u8; HEADER_LEN],
    address: libc::sockaddr_ll,
    /// IPv4 identification of the next packet.
    next_id: Cell<u16>,
}

impl Frame {
    pub fn new(header: &FrameHeader) -> Self {
        let mut template = [0_u8; HEADER_LEN];
        template[0] = 0x45; // version 4, 5 words of header
        template[8] = header.ttl;
        template[9] = 17; // UDP
        if let crate::command::FrameAddresses::V4 {
            source,
            destination,
        } = header.addresses
        {
            template[12..16].copy_from_slice(&source);
            template[16..20].copy_from_slice(&destination);
        }
        // The source port is the destination port, as most multicast senders do.
        template[20..22].copy_from_slice(&header.port.to_be_bytes());
        template[22..24].copy_from_slice(&header.port.to_be_bytes());
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = u16::try_from(libc::AF_PACKET).expect("AF_PACKET fits sa_family_t");
        address.sll_protocol = u16::try_from(libc::ETH_P_IP)
            .expect("ETH_P_IP is 0x0800")
            .to_be();
        address.sll_ifindex = i32::try_from(header.ifindex).unwrap_or(0);
        address.sll_halen = 6;
        address.sll_addr[..6].copy_from_slice(&header.mac);
        Self {
            template,
            address,
            next_id: Cell::new(0),
        }
    }

    /// The headers for a packet carrying `payload_len` bytes with DSCP/ECN byte `tos`. The
    /// UDP checksum is left at zero ("none"), which IPv4 allows.
    pub fn header(&self, payload_len: usize, tos: u8) -> [u8; HEADER_LEN] {
        let mut header = self.template;
        header[1] = tos;
        let total = u16::try_from(HEADER_LEN + payload_len).unwrap_or(u16::MAX);
        header[2..4].copy_from_slice(&total.to_be_bytes());
        let id = self.next_id.get();
        self.next_id.set(id.wrapping_add(1));
        header[4..6].copy_from_slice(&id.to_be_bytes());
        let checksum = ipv4_checksum(&header[..20]);
        header[10..12].copy_from_slice(&checksum.to_be_bytes());
        let udp_len = u16::try_from(8 + payload_len).unwrap_or(u16::MAX);
        header[24..26].copy_from_slice(&udp_len.to_be_bytes());
        header
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

/// Room for one `IP_TOS` control message (an `int`).
const TOS_CONTROL_LEN: usize = 32;

/// One send in flight: a framed packet (header and payload to a link-layer address), or a
/// datagram on a connected UDP socket that carries its DSCP/ECN byte as a control message.
struct FrameSend {
    header: [u8; HEADER_LEN],
    iov: [libc::iovec; 2],
    address: libc::sockaddr_ll,
    control: [u8; TOS_CONTROL_LEN],
    message: libc::msghdr,
    /// Bytes the send reports beyond the payload: the header of a framed send.
    overhead: usize,
}

/// Storage for the sends in flight, allocated once.
pub struct FrameSlab {
    sends: Box<[FrameSend]>,
    free: Vec<u32>,
}

impl FrameSlab {
    pub fn new(capacity: usize) -> Self {
        let empty = || {
            // SAFETY: iovec, sockaddr_ll and msghdr are plain data; all-zero is valid.
            unsafe {
                FrameSend {
                    header: [0; HEADER_LEN],
                    iov: std::mem::zeroed(),
                    address: std::mem::zeroed(),
                    control: [0; TOS_CONTROL_LEN],
                    message: std::mem::zeroed(),
                    overhead: 0,
                }
            }
        };
        let sends: Box<[FrameSend]> = (0..capacity).map(|_| empty()).collect();
        let free = (0..u32::try_from(capacity).unwrap_or(u32::MAX))
            .rev()
            .collect();
        Self { sends, free }
    }

    /// Fills a free slot for `payload` sent through `frame` with DSCP/ECN byte `tos`; returns
    /// the slot and its message, or `None` when every slot is in use.
    pub fn prepare(
        &mut self,
        frame: &Frame,
        payload: &[u8],
        tos: u8,
    ) -> Option<(u32, *const libc::msghdr)> {
        let slot = self.free.pop()?;
        let send = &mut self.sends[slot as usize];
        send.header = frame.header(payload.len(), tos);
        send.address = frame.address;
        send.overhead = HEADER_LEN;
        send.message = empty_message();
        send.iov = [
            libc::iovec {
                iov_base: send.header.as_mut_ptr().cast(),
                iov_len: HEADER_LEN,
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
    /// `tos` (an `IP_TOS` control message); returns the slot and its message, or `None` when
    /// every slot is in use.
    pub fn prepare_datagram(
        &mut self,
        payload: &[u8],
        tos: u8,
    ) -> Option<(u32, *const libc::msghdr)> {
        let slot = self.free.pop()?;
        let send = &mut self.sends[slot as usize];
        send.overhead = 0;
        send.iov[0] = libc::iovec {
            iov_base: payload.as_ptr().cast_mut().cast(),
            iov_len: payload.len(),
        };
        send.message = empty_message();
        send.message.msg_iov = send.iov.as_mut_ptr();
        send.message.msg_iovlen = 1;
        send.message.msg_control = send.control.as_mut_ptr().cast();
        let value = libc::c_int::from(tos);
        let int_len = u32::try_from(size_of::<libc::c_int>()).expect("an int is 4 bytes");
        // SAFETY: CMSG_SPACE of an int is 24 bytes on this ABI, within `control` (checked by
        // the test `control_room_holds_one_int`); the header and data are written inside it.
        unsafe {
            send.message.msg_controllen = libc::CMSG_SPACE(int_len) as usize;
            let header = libc::CMSG_FIRSTHDR(&raw const send.message);
            (*header).cmsg_level = libc::IPPROTO_IP;
            (*header).cmsg_type = libc::IP_TOS;
            (*header).cmsg_len = libc::CMSG_LEN(int_len) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<libc::c_int>(), value);
        }
        Some((slot, &raw const send.message))
    }

    /// Frees `slot`; returns the bytes its send reported beyond the payload.
    pub fn release(&mut self, slot: u32) -> usize {
        self.free.push(slot);
        self.sends
            .get(slot as usize)
            .map_or(0, |send| send.overhead)
    }
}

fn empty_message() -> libc::msghdr {
    // SAFETY: msghdr is plain data; all-zero is an empty message.
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10.2.0.1 → 239.2.2.1:6000 with TTL 7.
    fn camera_frame() -> Frame {
        Frame::new(&FrameHeader {
            ifindex: 3,
            mac: [1, 0, 0x5e, 2, 2, 1],
            addresses: crate::command::FrameAddresses::V4 {
                source: [10, 2, 0, 1],
                destination: [239, 2, 2, 1],
            },
            port: 6000,
            ttl: 7,
        })
    }

    #[test]
    fn header_checksum_verifies_and_fields_are_set() {
        let frame = camera_frame();
        let first = frame.header(100, 0xb8);
        let second = frame.header(100, 0);
        // A header including its checksum sums to 0xffff, so its checksum is 0.
        assert_eq!(ipv4_checksum(&first[..20]), 0);
        assert_eq!(u16::from_be_bytes([first[2], first[3]]), 128);
        assert_eq!(first[8], 7);
        assert_eq!(first[1], 0xb8, "the DSCP/ECN byte");
        assert_eq!(ipv4_checksum(&second[..20]), 0);
        assert_eq!(&first[12..20], &[10, 2, 0, 1, 239, 2, 2, 1]);
        assert_eq!(u16::from_be_bytes([first[22], first[23]]), 6000);
        assert_eq!(u16::from_be_bytes([first[24], first[25]]), 108);
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
    fn slots_run_out_and_come_back() {
        let frame = camera_frame();
        let mut slab = FrameSlab::new(2);
        let payload = [0_u8; 4];
        let (a, _) = slab.prepare(&frame, &payload, 0).expect("slot");
        let (b, _) = slab.prepare_datagram(&payload, 0xb8).expect("slot");
        assert_ne!(a, b);
        assert!(slab.prepare(&frame, &payload, 0).is_none());
        assert_eq!(
            slab.release(a),
            HEADER_LEN,
            "a framed send reports its header"
        );
        assert_eq!(slab.release(b), 0, "a datagram reports its payload only");
        assert!(slab.prepare(&frame, &payload, 0).is_some());
    }

    #[test]
    fn a_datagram_carries_its_tos_as_a_control_message() {
        let mut slab = FrameSlab::new(1);
        let payload = [1_u8, 2, 3];
        let (_, message) = slab.prepare_datagram(&payload, 0xb8).expect("slot");
        // SAFETY: the message and its control buffer live in the slab, borrowed above.
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
            assert_eq!((*header).cmsg_level, libc::IPPROTO_IP);
            assert_eq!((*header).cmsg_type, libc::IP_TOS);
            let value = std::ptr::read_unaligned(libc::CMSG_DATA(header).cast::<libc::c_int>());
            assert_eq!(value, 0xb8);
        }
    }
}
