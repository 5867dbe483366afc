//! Test traffic: UDP datagrams with known payloads, sent from inside a namespace.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use anyhow::Context as _;
use nix::sys::socket::{setsockopt, sockopt};

use crate::{Netns, in_netns};

/// A batch of identical datagrams: `count` times `payload_len` bytes to `group:port` (IPv4 or
/// IPv6), from `source` (the namespace's routing decides when `None`) and `source_port` (any
/// free port when 0).
#[derive(Clone, Debug)]
pub struct Stream {
    pub source: Option<IpAddr>,
    pub source_port: u16,
    pub destination: IpAddr,
    pub port: u16,
    pub payload_len: usize,
    pub count: u64,
    /// Pause after every 32 datagrams.
    pub gap: std::time::Duration,
    /// The DSCP/ECN byte (IPv4 TOS, IPv6 traffic class) the datagrams are sent with.
    pub tos: u8,
    /// TTL or hop limit of multicast datagrams.
    pub ttl: u8,
}

impl Stream {
    pub fn new(destination: impl Into<IpAddr>, port: u16, payload_len: usize, count: u64) -> Self {
        Self {
            source: None,
            source_port: 0,
            destination: destination.into(),
            port,
            payload_len,
            count,
            gap: std::time::Duration::from_millis(1),
            tos: 0,
            ttl: 8,
        }
    }

    /// Sends multicast with TTL (hop limit) `ttl`.
    #[must_use]
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    /// Spreads the stream out: a pause of `gap` after every 32 datagrams.
    #[must_use]
    pub fn paced(mut self, gap: std::time::Duration) -> Self {
        self.gap = gap;
        self
    }

    /// Sends with DSCP/ECN byte `tos`.
    #[must_use]
    pub fn tos(mut self, tos: u8) -> Self {
        self.tos = tos;
        self
    }

    #[must_use]
    pub fn from(mut self, source: impl Into<IpAddr>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Sends from UDP port `port`.
    #[must_use]
    pub fn from_port(mut self, port: u16) -> Self {
        self.source_port = port;
        self
    }

    /// The payload of datagram `sequence`: the number in the first eight bytes, then 0xa5.
    pub fn payload(&self, sequence: u64) -> Vec<u8> {
        let mut payload = vec![0xa5_u8; self.payload_len];
        let bytes = sequence.to_be_bytes();
        let n = payload.len().min(bytes.len());
        payload[..n].copy_from_slice(&bytes[..n]);
        payload
    }
}

/// Sends `stream` from inside `netns`. Each payload carries its sequence number in its first
/// eight bytes; a short pause every 32 datagrams keeps the rate moderate (tens of thousands
/// of packets per second at most) so no queue on the way overflows.
pub fn send_udp(netns: &Netns, stream: &Stream) -> anyhow::Result<()> {
    in_netns(netns, || -> anyhow::Result<()> {
        let unspecified = if stream.destination.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        };
        let bind = SocketAddr::new(stream.source.unwrap_or(unspecified), stream.source_port);
        let socket = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
        if stream.destination.is_ipv4() {
            socket.set_multicast_ttl_v4(u32::from(stream.ttl))?;
            if stream.tos != 0 {
                setsockopt(&socket, sockopt::Ipv4Tos, &i32::from(stream.tos))?;
            }
        } else {
            setsockopt(&socket, sockopt::Ipv6MulticastHops, &i32::from(stream.ttl))?;
            if stream.tos != 0 {
                setsockopt(&socket, sockopt::Ipv6TClass, &i32::from(stream.tos))?;
            }
        }
        let destination = SocketAddr::new(stream.destination, stream.port);
        for sequence in 0..stream.count {
            socket
                .send_to(&stream.payload(sequence), destination)
                .with_context(|| format!("sending to {destination}"))?;
            if sequence % 32 == 31 {
                std::thread::sleep(stream.gap);
            }
        }
        Ok(())
    })?
}
