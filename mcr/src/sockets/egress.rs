//! The sockets outputs send on: one send-only link-layer socket per worker, on which the
//! worker sends the frames of every multicast output (decision 0004), and a UDP socket per
//! unicast output, bound to the output interface and its address so the kernel writes the
//! relay's own source address, connected to the destination, with the rule's TTL.

use std::{
    io,
    net::{IpAddr, SocketAddr, SocketAddrV6},
    os::fd::{AsFd as _, OwnedFd},
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    command::{EthernetOrigin, FrameAddresses, FrameHeader},
    config::Output,
};

/// Send buffer of each output socket.
const SEND_BUFFER: usize = 4 * 1024 * 1024;

/// Where an output sends from: its interface and that interface's address of the output's
/// family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub interface: String,
    pub ifindex: u32,
    pub address: IpAddr,
    /// The interface's MAC and MTU when it is an Ethernet interface. Part of the origin so
    /// that a changed MAC or MTU re-plumbs the rule like a changed address does.
    pub ethernet: Option<EthernetOrigin>,
}

/// Send buffer of a worker's link-layer socket, shared by all its multicast outputs.
const FRAME_SEND_BUFFER: usize = 16 * 1024 * 1024;

/// A worker's link-layer sockets for multicast outputs. The worker writes the IP and UDP
/// headers itself and hands whole packets to the output interface named in each send, which
/// skips the per-packet route lookup that the kernel does for every multicast UDP send
/// (decision 0004). Protocol 0: they send only and never receive a copy of any interface's
/// traffic.
pub struct EgressSockets {
    /// `SOCK_DGRAM`: IP packets, the kernel writes the link-layer header. For interfaces that
    /// are not Ethernet (tunnels).
    pub packets: OwnedFd,
    /// `SOCK_RAW` with a `virtio_net_hdr` in front of each frame (`PACKET_VNET_HDR`): whole
    /// Ethernet frames, and runs of same-size datagrams of one flow as one send that the kernel
    /// (or the NIC) splits into packets (UDP segmentation offload, decision 0014). `None` where
    /// the kernel refuses the option; Ethernet outputs then go on `packets`, one by one.
    pub ethernet: Option<OwnedFd>,
}

/// Opens a worker's [`EgressSockets`].
pub fn open_egress_sockets() -> io::Result<EgressSockets> {
    let packets = Socket::new(Domain::PACKET, Type::DGRAM.nonblocking().cloexec(), None)?;
    enlarge_send_buffer(&packets, FRAME_SEND_BUFFER);
    let ethernet = Socket::new(Domain::PACKET, Type::RAW.nonblocking().cloexec(), None)
        .and_then(|socket| {
            let on: nix::libc::c_int = 1;
            super::set_option(
                socket.as_fd(),
                nix::libc::SOL_PACKET,
                nix::libc::PACKET_VNET_HDR,
                &on,
            )?;
            enlarge_send_buffer(&socket, FRAME_SEND_BUFFER);
            Ok(OwnedFd::from(socket))
        })
        .inspect_err(|error| {
            tracing::warn!(%error, "no segmentation offload socket; Ethernet outputs send one packet at a time");
        })
        .ok();
    Ok(EgressSockets {
        packets: packets.into(),
        ethernet,
    })
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

/// The fixed header fields of a multicast output the worker frames itself; `None` when the
/// origin's address is not of the destination's family (`resolve_origins` picks one that is).
pub fn frame_header(output: &Output, origin: &Origin) -> Option<FrameHeader> {
    let addresses = match (origin.address, output.destination) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => FrameAddresses::V4 {
            source: source.octets(),
            destination: destination.octets(),
        },
        (IpAddr::V6(source), IpAddr::V6(destination)) => FrameAddresses::V6 {
            source: source.octets(),
            destination: destination.octets(),
        },
        _ => return None,
    };
    Some(FrameHeader {
        ifindex: origin.ifindex,
        mac: super::routes::multicast_mac(output.destination),
        addresses,
        port: output.port,
        ttl: output.ttl,
        ethernet: origin.ethernet,
    })
}

/// A connected UDP socket of the destination's family for `output`, sending from `origin`
/// when given (else from the address the kernel's routing picks).
pub fn open(output: &Output, origin: Option<&Origin>) -> io::Result<OwnedFd> {
    let domain = if output.destination.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(
        domain,
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    if let Some(origin) = origin {
        if origin.address.is_ipv4() != output.destination.is_ipv4() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the output interface's address is of the other family",
            ));
        }
        socket.bind_device(Some(origin.interface.as_bytes()))?;
        socket.bind(&scoped(origin.address, 0, origin.ifindex).into())?;
    }
    let ttl = u32::from(output.ttl);
    match output.destination {
        IpAddr::V4(_) if output.destination.is_multicast() => {
            if let IpAddr::V4(address) = required(origin)?.address {
                socket.set_multicast_if_v4(&address)?;
            }
            socket.set_multicast_ttl_v4(ttl)?;
            socket.set_multicast_loop_v4(false)?;
        }
        IpAddr::V4(_) => socket.set_ttl_v4(ttl)?,
        IpAddr::V6(_) if output.destination.is_multicast() => {
            socket.set_multicast_if_v6(required(origin)?.ifindex)?;
            socket.set_multicast_hops_v6(ttl)?;
            socket.set_multicast_loop_v6(false)?;
        }
        IpAddr::V6(_) => socket.set_unicast_hops_v6(ttl)?,
    }
    enlarge_send_buffer(&socket, SEND_BUFFER);
    let zone = origin.map_or(0, |origin| origin.ifindex);
    socket.connect(&scoped(output.destination, output.port, zone).into())?;
    Ok(socket.into())
}

fn required(origin: Option<&Origin>) -> io::Result<&Origin> {
    origin.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "multicast output without an interface",
        )
    })
}

/// `address:port`, with the interface `ifindex` as its zone when it is an IPv6 address that
/// needs one (link-local addresses exist on every link).
fn scoped(address: IpAddr, port: u16, ifindex: u32) -> SocketAddr {
    match address {
        IpAddr::V6(v6) if super::interfaces::is_link_scoped(v6) => {
            SocketAddr::V6(SocketAddrV6::new(v6, port, 0, ifindex))
        }
        other => SocketAddr::new(other, port),
    }
}
