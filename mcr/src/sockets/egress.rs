//! The UDP socket of one output: bound to the output interface and its address, so the kernel
//! writes the relay's own source address, connected to the destination, with the rule's TTL
//! and multicast loopback off.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::OwnedFd,
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{command::FrameHeader, config::Output};

/// Send buffer of each output socket.
const SEND_BUFFER: usize = 4 * 1024 * 1024;

/// Where an output sends from: its interface and that interface's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub interface: String,
    pub ifindex: u32,
    pub address: Ipv4Addr,
}

/// A link-layer socket for a multicast output: the worker writes the IPv4 and UDP headers
/// itself and hands whole IP packets to the interface, which skips the per-packet route lookup
/// that the kernel does for every multicast UDP send (decision 0004).
pub fn open_frames(output: &Output, origin: &Origin) -> io::Result<(OwnedFd, FrameHeader)> {
    // Protocol 0: the socket sends only and never receives a copy of the interface's traffic.
    let socket = Socket::new(Domain::PACKET, Type::DGRAM.nonblocking().cloexec(), None)?;
    if socket.set_send_buffer_size(SEND_BUFFER).is_err() {
        tracing::debug!("could not enlarge the send buffer of an output socket");
    }
    let [_, b, c, d] = output.destination.octets();
    let header = FrameHeader {
        ifindex: origin.ifindex,
        // RFC 1112: 01:00:5e and the group's low 23 bits.
        mac: [0x01, 0x00, 0x5e, b & 0x7f, c, d],
        source: origin.address.octets(),
        destination: output.destination.octets(),
        port: output.port,
        ttl: output.ttl,
    };
    Ok((socket.into(), header))
}

pub fn open(output: &Output, origin: Option<&Origin>) -> io::Result<OwnedFd> {
    let socket = Socket::new(
        Domain::IPV4,
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    if let Some(origin) = origin {
        socket.bind_device(Some(origin.interface.as_bytes()))?;
        socket.bind(&SocketAddrV4::new(origin.address, 0).into())?;
    }
    if output.destination.is_multicast() {
        let origin = origin.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "multicast output without an interface",
            )
        })?;
        socket.set_multicast_if_v4(&origin.address)?;
        socket.set_multicast_ttl_v4(u32::from(output.ttl))?;
        socket.set_multicast_loop_v4(false)?;
    } else {
        socket.set_ttl_v4(u32::from(output.ttl))?;
    }
    if socket.set_send_buffer_size(SEND_BUFFER).is_err() {
        tracing::debug!("could not enlarge the send buffer of an output socket");
    }
    socket.connect(&SocketAddrV4::new(output.destination, output.port).into())?;
    Ok(socket.into())
}
