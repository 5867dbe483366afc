//! Ethernet frames built byte by byte, for traffic a UDP socket cannot send (VLAN tags,
//! another host's MAC, broken headers, impossible sources, fragments), and a raw packet
//! socket to send them from a namespace.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, OwnedFd},
};

use anyhow::Context as _;
use nix::{
    libc,
    net::if_::if_nametoindex,
    sys::socket::{
        AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType, SockaddrLike as _, sendto, socket,
    },
};

use crate::{Netns, in_netns};

/// Source MAC of every built frame: locally administered, so it clashes with no interface.
pub const SENDER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// A unicast MAC no interface of the tests has: frames to it are another host's.
pub const OTHER_HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

/// An Ethernet frame carrying IPv4 and, unless it is a non-first fragment, UDP. Starts out
/// valid; each builder method breaks or changes one thing.
#[derive(Clone, Debug)]
pub struct Frame {
    destination_mac: [u8; 6],
    /// VLAN tags, outermost first: (TPID, TCI).
    tags: Vec<(u16, u16)>,
    source: Ipv4Addr,
    destination: Ipv4Addr,
    ttl: u8,
    /// The IPv4 flags-and-offset field.
    frag_off: u16,
    /// Flipped into the correct header checksum.
    checksum_flip: u16,
    /// IPv4 options, a multiple of four bytes.
    options: Vec<u8>,
    /// The UDP header's ports; `None` puts the payload straight after the IPv4 header.
    ports: Option<(u16, u16)>,
    payload: Vec<u8>,
}

impl Frame {
    /// UDP from `source:4000` to `group:port` with `payload`, TTL 64, sent to the group's MAC.
    pub fn udp(source: Ipv4Addr, group: Ipv4Addr, port: u16, payload: Vec<u8>) -> Self {
        Self {
            destination_mac: multicast_mac(group),
            tags: Vec::new(),
            source,
            destination: group,
            ttl: 64,
            frag_off: 0,
            checksum_flip: 0,
            options: Vec::new(),
            ports: Some((4000, port)),
            payload,
        }
    }

    /// Adds a VLAN tag inside those already there (the first call gives the outer tag).
    #[must_use]
    pub fn tagged(mut self, tpid: u16, vlan: u16) -> Self {
        self.tags.push((tpid, vlan));
        self
    }

    #[must_use]
    pub fn to_mac(mut self, mac: [u8; 6]) -> Self {
        self.destination_mac = mac;
        self
    }

    #[must_use]
    pub fn from(mut self, source: Ipv4Addr) -> Self {
        self.source = source;
        self
    }

    #[must_use]
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    /// IPv4 options after the fixed header (`options.len()` a multiple of 4, at most 40).
    #[must_use]
    pub fn options(mut self, options: &[u8]) -> Self {
        assert!(
            options.len().is_multiple_of(4) && options.len() <= 40,
            "options fill whole words, at most ten"
        );
        self.options = options.to_vec();
        self
    }

    /// A header checksum that does not add up.
    #[must_use]
    pub fn bad_checksum(mut self) -> Self {
        // Changes the field by less than 0xffff, so it cannot land on the other
        // representation of the same one's-complement value.
        self.checksum_flip = 0x00ff;
        self
    }

    /// The last fragment of a datagram: its final `len` bytes of payload at `offset` 8-byte
    /// units, with no UDP header.
    #[must_use]
    pub fn last_fragment(mut self, offset: u16, len: usize) -> Self {
        self.frag_off = offset & 0x1fff;
        self.ports = None;
        self.payload.truncate(len);
        self
    }

    /// The frame on the wire.
    pub fn bytes(&self) -> Vec<u8> {
        let udp_len = self.ports.map_or(0, |_| 8) + self.payload.len();
        let header_len = 20 + self.options.len();
        let total_len = u16::try_from(header_len + udp_len).expect("test frames are small");
        let mut frame = ethernet_header(self.destination_mac, &self.tags, 0x0800);
        frame.reserve(usize::from(total_len));

        let mut ip = vec![0_u8; 20];
        ip[0] = 0x40 | u8::try_from(header_len / 4).expect("IHL fits in four bits");
        ip[2..4].copy_from_slice(&total_len.to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234_u16.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag_off.to_be_bytes());
        ip[8] = self.ttl;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&self.source.octets());
        ip[16..20].copy_from_slice(&self.destination.octets());
        ip.extend_from_slice(&self.options);
        let checksum = header_checksum(&ip) ^ self.checksum_flip;
        ip[10..12].copy_from_slice(&checksum.to_be_bytes());
        frame.extend_from_slice(&ip);

        if let Some((source_port, destination_port)) = self.ports {
            let udp_len = u16::try_from(udp_len).expect("test frames are small");
            frame.extend_from_slice(&source_port.to_be_bytes());
            frame.extend_from_slice(&destination_port.to_be_bytes());
            frame.extend_from_slice(&udp_len.to_be_bytes());
            // No checksum: IPv4 allows it, and the relay does not check it.
            frame.extend_from_slice(&[0, 0]);
        }
        frame.extend_from_slice(&self.payload);
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
    let mut sum: u32 = header
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], pair[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded to 16 bits")
}

/// The Ethernet header of a test frame: `destination_mac`, [`SENDER_MAC`], the VLAN `tags`
/// (TPID, tag; outer first) and `ethertype`.
pub(crate) fn ethernet_header(
    destination_mac: [u8; 6],
    tags: &[(u16, u16)],
    ethertype: u16,
) -> Vec<u8> {
    let mut header = Vec::with_capacity(14 + 4 * tags.len());
    header.extend_from_slice(&destination_mac);
    header.extend_from_slice(&SENDER_MAC);
    for (tpid, vlan) in tags {
        header.extend_from_slice(&tpid.to_be_bytes());
        header.extend_from_slice(&vlan.to_be_bytes());
    }
    header.extend_from_slice(&ethertype.to_be_bytes());
    header
}

/// Sends `frames` as they are on `interface` inside `netns`, from a packet socket that
/// receives nothing.
pub fn send_frames(netns: &Netns, interface: &str, frames: &[Vec<u8>]) -> anyhow::Result<()> {
    in_netns(netns, || -> anyhow::Result<()> {
        let ifindex = if_nametoindex(interface).with_context(|| format!("no {interface}"))?;
        // Protocol 0: a send-only socket, it never gets a copy of the interface's traffic.
        let socket: OwnedFd = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .context("opening a packet socket")?;
        let raw = libc::sockaddr_ll {
            sll_family: u16::try_from(libc::AF_PACKET)?,
            sll_protocol: 0,
            sll_ifindex: i32::try_from(ifindex)?,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 6,
            sll_addr: [0; 8],
        };
        // SAFETY: `raw` is a complete `sockaddr_ll` and the length given is its size.
        let address = unsafe {
            LinkAddr::from_raw(
                std::ptr::from_ref(&raw).cast(),
                Some(libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>())?),
            )
        }
        .context("building the link-layer address")?;
        for (i, frame) in frames.iter().enumerate() {
            sendto(socket.as_raw_fd(), frame, &address, MsgFlags::empty())
                .with_context(|| format!("sending frame {i} on {interface}"))?;
        }
        Ok(())
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

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
