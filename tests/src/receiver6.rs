//! The IPv6 receiver: like [`crate::Receiver`], a UDP socket in a sink namespace that records
//! every datagram with its source, header destination, hop limit and traffic class.

use std::{
    io::IoSliceMut,
    net::{Ipv6Addr, SocketAddrV6, UdpSocket},
    os::fd::AsRawFd,
};

use anyhow::Context as _;
use nix::{
    net::if_::if_nametoindex,
    sys::socket::{ControlMessageOwned, SockaddrIn6, setsockopt, sockopt},
};

use crate::{
    Netns,
    receiver::{Listener, sequence_of, udp_listener},
};

/// One IPv6 datagram as it arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram6 {
    pub source: SocketAddrV6,
    /// The destination address in the IPv6 header (the group for multicast).
    pub destination: Ipv6Addr,
    pub hop_limit: u8,
    /// The DSCP/ECN byte (traffic class) it arrived with.
    pub traffic_class: u8,
    pub payload: Vec<u8>,
}

impl Datagram6 {
    /// The sequence number the test sender put in the first eight bytes.
    pub fn sequence(&self) -> Option<u64> {
        sequence_of(&self.payload)
    }
}

pub struct Receiver6(Listener<Datagram6>);

impl Receiver6 {
    /// Listens on `port` inside `netns`; for a multicast `group`, joins it (MLD) on
    /// `interface`. Returns once the socket is ready.
    pub fn start(
        netns: &Netns,
        group: Option<Ipv6Addr>,
        interface: &str,
        port: u16,
    ) -> anyhow::Result<Self> {
        let interface = interface.to_owned();
        let open = move || -> anyhow::Result<UdpSocket> {
            let ifindex = if_nametoindex(interface.as_str())
                .with_context(|| format!("no interface {interface}"))?;
            // Bound to the group, the socket sees only that group's datagrams.
            let bind = SocketAddrV6::new(group.unwrap_or(Ipv6Addr::UNSPECIFIED), port, 0, 0);
            let socket = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
            if let Some(group) = group {
                socket
                    .join_multicast_v6(&group, ifindex)
                    .with_context(|| format!("joining {group} on {interface}"))?;
            }
            setsockopt(&socket, sockopt::Ipv6RecvHopLimit, &true)?;
            setsockopt(&socket, sockopt::Ipv6RecvTClass, &true)?;
            setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true)?;
            Ok(socket)
        };
        udp_listener(netns, open, receive_one).map(Self)
    }

    /// Stops listening once nothing has arrived for a moment and returns what arrived.
    pub fn finish(self) -> anyhow::Result<Vec<Datagram6>> {
        self.0.finish()
    }
}

fn receive_one(socket: &UdpSocket, buffer: &mut [u8]) -> anyhow::Result<Option<Datagram6>> {
    let mut space = nix::cmsg_space!(i32, i32, nix::libc::in6_pktinfo);
    let mut iov = [IoSliceMut::new(buffer)];
    let Some(message) =
        super::receiver::receive_message::<SockaddrIn6>(socket.as_raw_fd(), &mut iov, &mut space)?
    else {
        return Ok(None);
    };
    let mut hop_limit = 0;
    let mut traffic_class = 0;
    let mut destination = Ipv6Addr::UNSPECIFIED;
    for cmsg in message.cmsgs()? {
        match cmsg {
            ControlMessageOwned::Ipv6HopLimit(value) => {
                hop_limit = u8::try_from(value).unwrap_or(0);
            }
            ControlMessageOwned::Ipv6TClass(value) => {
                traffic_class = u8::try_from(value).unwrap_or(0);
            }
            ControlMessageOwned::Ipv6PacketInfo(info) => {
                destination = Ipv6Addr::from(info.ipi6_addr.s6_addr);
            }
            _ => {}
        }
    }
    let source = message
        .address
        .map(|a| SocketAddrV6::new(a.ip(), a.port(), 0, a.scope_id()))
        .context("datagram without a source")?;
    let len = message.bytes;
    Ok(Some(Datagram6 {
        source,
        destination,
        hop_limit,
        traffic_class,
        payload: iov[0][..len].to_vec(),
    }))
}
