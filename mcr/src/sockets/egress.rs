//! The sockets outputs send on: one send-only link-layer socket per worker, on which the
//! worker sends the frames of every multicast output (decision 0004), and a UDP socket per
//! unicast output, bound to the output interface and its address so the kernel writes the
//! relay's own source address, connected to the destination, with the rule's TTL.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd as _, OwnedFd},
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    command::{FrameAddresses, FrameHeader},
    config::Output,
};

/// Send buffer of each output socket.
const SEND_BUFFER: usize = 4 * 1024 * 1024;

/// Where an output sends from: its interface and that interface's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub interface: String,
    pub ifindex: u32,
    pub address: Ipv4Addr,
}

/// Send buffer of a worker's link-layer socket, shared by all its multicast outputs.
const FRAME_SEND_BUFFER: usize = 16 * 1024 * 1024;

/// A worker's link-layer socket for multicast outputs: the worker writes the IPv4 and UDP
/// headers itself and hands whole IP packets to the output interface named in each send,
/// which skips the per-packet route lookup that the kernel does for every multicast UDP send
/// (decision 0004). Protocol 0: the socket sends only and never receives a copy of any
/// interface's traffic.
pub fn open_frame_socket() -> io::Result<OwnedFd> {
    let socket = Socket::new(Domain::PACKET, Type::DGRAM.nonblocking().cloexec(), None)?;
    enlarge_send_buffer(&socket, FRAME_SEND_BUFFER);
    Ok(socket.into())
}

/// Sets the send buffer to `bytes`, beyond `net.core.wmem_max` where the process may.
fn enlarge_send_buffer(socket: &Socket, bytes: usize) {
    let forced = i32::try_from(bytes).map_or(Err(io::ErrorKind::InvalidInput.into()), |bytes| {
        super::set_option(
            socket.as_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_SNDBUFFORCE,
            &bytes,
        )
    });
    if forced.is_err() && socket.set_send_buffer_size(bytes).is_err() {
        tracing::debug!("could not enlarge the send buffer of an output socket");
    }
}

/// The fixed header fields of a multicast output the worker frames itself.
pub fn frame_header(output: &Output, origin: &Origin) -> FrameHeader {
    FrameHeader {
        ifindex: origin.ifindex,
        mac: super::routes::multicast_mac(output.destination),
        addresses: FrameAddresses::V4 {
            source: origin.address.octets(),
            destination: output.destination.octets(),
        },
        port: output.port,
        ttl: output.ttl,
    }
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
    enlarge_send_buffer(&socket, SEND_BUFFER);
    socket.connect(&SocketAddrV4::new(output.destination, output.port).into())?;
    Ok(socket.into())
}
