//! Ethernet frames built byte by byte, for traffic a UDP socket cannot send (VLAN tags,
//! another host's MAC, broken headers, impossible sources, fragments), and a raw packet
//! socket to send them from a namespace.
//!
//! What a test frame has whatever its IP version lives here: the Ethernet header with its
//! VLAN tags, the addresses, the hop limit, the UDP header and the one's-complement sum.
//! [`crate::Frame`] (IPv4) and [`crate::Frame6`] add the header only their version has.

use std::{
    fmt::Debug,
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

/// The UDP source port of every built frame.
const SOURCE_PORT: u16 = 4000;

/// The header fields only one IP version has, and the addresses that version uses.
pub trait IpFields: Clone + Debug {
    type Addr: Copy + Debug;
}

/// An Ethernet frame carrying an IP packet of the version `Ip` stands for and, unless a test
/// says otherwise, UDP. Starts out valid; each builder method breaks or changes one thing.
#[derive(Clone, Debug)]
pub struct UdpFrame<Ip: IpFields> {
    pub(crate) destination_mac: [u8; 6],
    /// VLAN tags, outermost first: (TPID, TCI).
    pub(crate) tags: Vec<(u16, u16)>,
    pub(crate) source: Ip::Addr,
    pub(crate) destination: Ip::Addr,
    /// The IPv4 TTL or the IPv6 hop limit.
    pub(crate) hop_limit: u8,
    /// The UDP header's ports.
    pub(crate) ports: (u16, u16),
    /// Whether the UDP header is written: a non-first fragment or another protocol than UDP
    /// has the payload straight after the IP header.
    pub(crate) udp_header: bool,
    pub(crate) payload: Vec<u8>,
    /// The rest of the IP header.
    pub(crate) ip: Ip,
}

impl<Ip: IpFields> UdpFrame<Ip> {
    /// UDP from `source:4000` to `group:port` with `payload`, hop limit 64, sent to
    /// `destination_mac`, with `ip` for the rest of the IP header.
    pub(crate) fn new(
        destination_mac: [u8; 6],
        source: Ip::Addr,
        group: Ip::Addr,
        port: u16,
        payload: Vec<u8>,
        ip: Ip,
    ) -> Self {
        Self {
            destination_mac,
            tags: Vec::new(),
            source,
            destination: group,
            hop_limit: 64,
            ports: (SOURCE_PORT, port),
            udp_header: true,
            payload,
            ip,
        }
    }

    /// Adds a VLAN tag inside those already there (the first call gives the outer tag).
    #[must_use]
    pub fn tagged(mut self, tpid: u16, vlan: u16) -> Self {
        self.tags.push((tpid, vlan));
        self
    }

    #[must_use]
    #[expect(
        clippy::wrong_self_convention,
        reason = "a builder method: it takes the frame and gives it back changed, like the others"
    )]
    pub fn to_mac(mut self, mac: [u8; 6]) -> Self {
        self.destination_mac = mac;
        self
    }

    #[must_use]
    pub fn from(mut self, source: Ip::Addr) -> Self {
        self.source = source;
        self
    }

    /// Sends to `destination`, keeping the MAC.
    #[must_use]
    pub fn to(mut self, destination: Ip::Addr) -> Self {
        self.destination = destination;
        self
    }

    /// The Ethernet header: the destination MAC, [`SENDER_MAC`], the VLAN tags and
    /// `ethertype`.
    pub(crate) fn ethernet_header(&self, ethertype: u16) -> Vec<u8> {
        let mut header = Vec::with_capacity(14 + 4 * self.tags.len());
        header.extend_from_slice(&self.destination_mac);
        header.extend_from_slice(&SENDER_MAC);
        for (tpid, vlan) in &self.tags {
            header.extend_from_slice(&tpid.to_be_bytes());
            header.extend_from_slice(&vlan.to_be_bytes());
        }
        header.extend_from_slice(&ethertype.to_be_bytes());
        header
    }

    /// What follows the IP header: the UDP datagram, its length field `length_excess` bytes
    /// more than its length and its checksum field zero, or the bare payload when there is no
    /// UDP header.
    pub(crate) fn upper_layer(&self, length_excess: u16) -> Vec<u8> {
        if !self.udp_header {
            return self.payload.clone();
        }
        let len = u16::try_from(8 + self.payload.len()).expect("test frames are small");
        let mut datagram = Vec::with_capacity(usize::from(len));
        datagram.extend_from_slice(&self.ports.0.to_be_bytes());
        datagram.extend_from_slice(&self.ports.1.to_be_bytes());
        datagram.extend_from_slice(&(len + length_excess).to_be_bytes());
        datagram.extend_from_slice(&[0, 0]);
        datagram.extend_from_slice(&self.payload);
        datagram
    }
}

/// `start` plus the 16-bit words of `bytes` (the last padded with a zero byte), folded to 16
/// bits: the sum the IPv4 header checksum and the UDP checksum are the complement of.
pub(crate) fn ones_complement_sum(start: u16, bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| {
            u32::from(u16::from_be_bytes([
                pair[0],
                pair.get(1).copied().unwrap_or(0),
            ]))
        })
        .sum::<u32>()
        + u32::from(start);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).expect("folded to 16 bits")
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
    fn an_odd_byte_counts_as_the_high_half_of_a_word() {
        assert_eq!(ones_complement_sum(0, &[0x12, 0x34, 0x56]), 0x6834);
    }

    #[test]
    fn carries_wrap_around() {
        assert_eq!(ones_complement_sum(0xffff, &[0, 2]), 2);
        assert_eq!(ones_complement_sum(0, &[0xff, 0xff, 0xff, 0xff]), 0xffff);
    }
}
