//! Interface facts the supervisor looks up when a rule starts (never per packet).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use rtnetlink::packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkExtentMask, LinkFlags, LinkLayerType, LinkMessage},
};

use super::netlink::{Reply, RequestError, Rtnetlink};

/// The index of `name`, if it exists.
pub fn index(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

/// The first IPv4 address of `name`.
pub fn ipv4_address(name: &str) -> Option<Ipv4Addr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifaddr| {
        if ifaddr.interface_name != name {
            return None;
        }
        ifaddr
            .address?
            .as_sockaddr_in()
            .map(nix::sys::socket::SockaddrIn::ip)
    })
}

/// The first IPv6 address of `name` that is not link-local, if `routable`; else its
/// link-local one, or any.
fn ipv6_address(name: &str, routable: bool) -> Option<Ipv6Addr> {
    let addresses: Vec<Ipv6Addr> = nix::ifaddrs::getifaddrs()
        .ok()?
        .filter(|ifaddr| ifaddr.interface_name == name)
        .filter_map(|ifaddr| {
            ifaddr
                .address?
                .as_sockaddr_in6()
                .map(nix::sys::socket::SockaddrIn6::ip)
        })
        .collect();
    let wider = addresses
        .iter()
        .find(|address| !address.is_unicast_link_local() && !address.is_loopback());
    if routable {
        wider.copied()
    } else {
        addresses
            .iter()
            .find(|address| address.is_unicast_link_local())
            .or(wider)
            .copied()
    }
}

/// The address of `name` that packets to `destination` are sent from: of the destination's
/// family; for IPv6, a global or unique-local one unless the destination is on the link only
/// (a link-local address, or a group of link-local scope), for which the link-local address is
/// the one receivers expect. A link-local source would not be routed beyond the link.
pub fn source_address(name: &str, destination: IpAddr) -> Option<IpAddr> {
    match destination {
        IpAddr::V4(_) => ipv4_address(name).map(IpAddr::V4),
        IpAddr::V6(destination) => ipv6_address(name, !is_link_scoped(destination)).map(IpAddr::V6),
    }
}

/// Whether packets to `destination` stay on one link: a link-local unicast address, or a
/// group of interface- or link-local scope (RFC 4291 §2.7).
pub fn is_link_scoped(destination: Ipv6Addr) -> bool {
    if destination.is_multicast() {
        destination.segments()[0] & 0x000f <= 2
    } else {
        destination.is_unicast_link_local()
    }
}

/// What an interface is and whether it can send now, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    /// The interface's own hardware address, when it has a 6-byte one: the Ethernet source of
    /// frames sent on it.
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub kind: LinkKind,
    /// Administratively up and operational (carrier present): frames handed to it can leave.
    pub up: bool,
}

impl Link {
    /// Frames on this interface start with an Ethernet header MCR can write.
    pub fn is_ethernet(&self) -> bool {
        self.kind == LinkKind::Ethernet
    }
}

/// The link-layer type of an interface (its `ARPHRD_*` type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// `ARPHRD_ETHER`: physical NICs, veth, VLAN sub-interfaces, bridges, bonds, macvlan, tap.
    Ethernet,
    /// `ARPHRD_LOOPBACK`: `lo`, where traffic to the host's own addresses goes.
    Loopback,
    /// Anything else, for example tun and `WireGuard` (`ARPHRD_NONE`) or ipip (`ARPHRD_TUNNEL`):
    /// frames without an Ethernet header.
    Other { arphrd: u16 },
}

impl From<LinkLayerType> for LinkKind {
    fn from(kind: LinkLayerType) -> Self {
        match kind {
            LinkLayerType::Ether => Self::Ethernet,
            LinkLayerType::Loopback => Self::Loopback,
            other => Self::Other {
                arphrd: u16::from(other),
            },
        }
    }
}

/// Why a link could not be looked up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("interface {0} does not exist")]
    NoSuchName(String),
    #[error("no interface has index {0}")]
    NoSuchIndex(u32),
    #[error("reading interface {interface} from the kernel: {source}")]
    Netlink {
        interface: String,
        #[source]
        source: io::Error,
    },
}

/// The link named `name`.
pub fn link_by_name(name: &str) -> Result<Link, LinkError> {
    let netlink_error = |source: io::Error| LinkError::Netlink {
        interface: name.to_owned(),
        source,
    };
    let mut netlink = Rtnetlink::open().map_err(netlink_error)?;
    let mut request = LinkMessage::default();
    request
        .attributes
        .push(LinkAttribute::IfName(name.to_owned()));
    match get_link(&mut netlink, request) {
        Err(error) if error.errno() == Some(nix::libc::ENODEV) => {
            Err(LinkError::NoSuchName(name.to_owned()))
        }
        result => result.map_err(|error| netlink_error(error.into())),
    }
}

/// The link with index `ifindex`.
pub fn link_by_index(ifindex: u32) -> Result<Link, LinkError> {
    let mut netlink = Rtnetlink::open().map_err(|source| LinkError::Netlink {
        interface: format!("index {ifindex}"),
        source,
    })?;
    link_by_index_on(&mut netlink, ifindex)
}

/// [`link_by_index`] on an open socket, for lookups that need several answers.
pub(super) fn link_by_index_on(netlink: &mut Rtnetlink, ifindex: u32) -> Result<Link, LinkError> {
    let mut request = LinkMessage::default();
    request.header.index = ifindex;
    match get_link(netlink, request) {
        Err(error) if error.errno() == Some(nix::libc::ENODEV) => {
            Err(LinkError::NoSuchIndex(ifindex))
        }
        result => result.map_err(|error| LinkError::Netlink {
            interface: format!("index {ifindex}"),
            source: error.into(),
        }),
    }
}

fn get_link(netlink: &mut Rtnetlink, mut request: LinkMessage) -> Result<Link, RequestError> {
    // Counters are not needed and make up most of a link's reply.
    request
        .attributes
        .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
    match netlink.request(RouteNetlinkMessage::GetLink(request), 0)? {
        Reply::Message(RouteNetlinkMessage::NewLink(message)) => link_from(&message),
        other => Err(RequestError::Decode(format!(
            "expected a link, got {other:?}"
        ))),
    }
}

/// The facts of a link message from the kernel.
fn link_from(message: &LinkMessage) -> Result<Link, RequestError> {
    let mut name = None;
    let mut mac = None;
    let mut mtu = None;
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(value) => name = Some(value.clone()),
            LinkAttribute::Address(bytes) => mac = <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            LinkAttribute::Mtu(value) => mtu = Some(*value),
            _ => {}
        }
    }
    let index = message.header.index;
    let missing = |what: &str| RequestError::Decode(format!("link {index} without {what}"));
    let flags = message.header.flags;
    Ok(Link {
        ifindex: index,
        name: name.ok_or_else(|| missing("a name"))?,
        mac,
        mtu: mtu.ok_or_else(|| missing("an MTU"))?,
        kind: LinkKind::from(message.header.link_layer_type),
        up: flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::Running),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: LinkLayerType, flags: LinkFlags, address: &[u8]) -> LinkMessage {
        let mut message = LinkMessage::default();
        message.header.index = 7;
        message.header.link_layer_type = kind;
        message.header.flags = flags;
        message.attributes = vec![
            LinkAttribute::IfName("out1".to_owned()),
            LinkAttribute::Address(address.to_vec()),
            LinkAttribute::Mtu(1500),
        ];
        message
    }

    #[test]
    fn an_ethernet_link_has_its_mac_and_is_up_only_when_running() {
        let mac = [0x02, 0, 0, 0, 0, 0x07];
        let running = link_from(&message(
            LinkLayerType::Ether,
            LinkFlags::Up | LinkFlags::Running,
            &mac,
        ))
        .expect("a complete link");
        assert_eq!(
            running,
            Link {
                ifindex: 7,
                name: "out1".to_owned(),
                mac: Some(mac),
                mtu: 1500,
                kind: LinkKind::Ethernet,
                up: true,
            }
        );
        assert!(running.is_ethernet());
        let no_carrier = link_from(&message(LinkLayerType::Ether, LinkFlags::Up, &mac))
            .expect("a complete link");
        assert!(!no_carrier.up);
    }

    #[test]
    fn tunnels_are_not_ethernet_and_have_no_mac() {
        let ipip = link_from(&message(
            LinkLayerType::Tunnel,
            LinkFlags::Up | LinkFlags::Running,
            &[10, 0, 0, 1],
        ))
        .expect("a complete link");
        assert_eq!(ipip.kind, LinkKind::Other { arphrd: 768 });
        assert!(!ipip.is_ethernet());
        assert_eq!(ipip.mac, None);
    }

    #[test]
    fn a_link_without_a_name_is_an_error_not_a_guess() {
        let mut nameless = message(LinkLayerType::Ether, LinkFlags::Up, &[0; 6]);
        nameless
            .attributes
            .retain(|attribute| !matches!(attribute, LinkAttribute::IfName(_)));
        assert!(link_from(&nameless).is_err());
    }
}
