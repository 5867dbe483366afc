//! Test traffic: UDP datagrams with known payloads, sent from inside a namespace.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};

use anyhow::Context as _;
use nix::sys::socket::{setsockopt, sockopt};

use crate::{Netns, in_netns};

/// A batch of identical datagrams: `count` times `payload_len` bytes to `group:port`, from
/// `source` (the namespace's routing decides when `None`).
#[derive(Clone, Debug)]
pub struct Stream {
    pub source: Option<Ipv4Addr>,
    pub destination: Ipv4Addr,
    pub port: u16,
    pub payload_len: usize,
    pub count: u64,
    /// Pause after every 32 datagrams.
    pub gap: std::time::Duration,
    /// The DSCP/ECN byte (IPv4 TOS) the datagrams are sent with.
    pub tos: u8,
}

impl Stream {
    pub fn new(destination: Ipv4Addr, port: u16, payload_len: usize, count: u64) -> Self {
        Self {
            source: None,
            destination,
            port,
            payload_len,
            count,
            gap: std::time::Duration::from_millis(1),
            tos: 0,
        }
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
    pub fn from(mut self, source: Ipv4Addr) -> Self {
        self.source = Some(source);
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
        let bind = SocketAddrV4::new(stream.source.unwrap_or(Ipv4Addr::UNSPECIFIED), 0);
        let socket = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
        socket.set_multicast_ttl_v4(8)?;
        if stream.tos != 0 {
            setsockopt(&socket, sockopt::Ipv4Tos, &i32::from(stream.tos))?;
        }
        let destination = SocketAddrV4::new(stream.destination, stream.port);
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
