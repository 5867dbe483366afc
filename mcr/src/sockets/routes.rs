//! Where a unicast output's packets go next, as the kernel would send them: the route (the
//! kernel's own FIB lookup, so policy rules and every table count), the egress interface, the
//! source address, and the next hop's MAC from the neighbour table. Looked up when a rule
//! starts, never per packet. [`solicit`] makes the kernel resolve a next hop it does not know.

use std::{io, net::IpAddr};

use rtnetlink::{
    packet_core::{NLM_F_ACK, NLM_F_CREATE},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage},
        route::{
            RouteAddress, RouteAttribute, RouteFlags, RouteLwEnCapType, RouteMessage, RouteMetric,
            RouteType,
        },
    },
    packet_utils::nla::Nla as _,
};

use super::{
    interfaces::{self, Link},
    netlink::{Reply, RequestError, Rtnetlink},
};

/// Where packets to one destination leave and to which MAC they go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NextHop {
    /// The interface the kernel would send on: its index, its MAC (the Ethernet source) and
    /// its MTU.
    pub egress: Link,
    /// The router the route goes through; `None` when the destination is on the link.
    pub gateway: Option<IpAddr>,
    /// The source address the kernel would pick: the route's preferred source, else the
    /// egress interface's address of the destination's family (see
    /// [`interfaces::source_address`]).
    pub source: IpAddr,
    /// The Ethernet destination: the next hop's MAC from the neighbour table, the group's MAC
    /// for a multicast destination, `ff:ff:ff:ff:ff:ff` for a broadcast one.
    pub destination_mac: [u8; 6],
    /// The route's own MTU, when it sets one (`ip route … mtu 1400`).
    pub route_mtu: Option<u32>,
}

impl NextHop {
    pub fn ifindex(&self) -> u32 {
        self.egress.ifindex
    }

    /// The largest IP packet that may leave: the interface's MTU, or the route's if lower.
    pub fn mtu(&self) -> u32 {
        self.route_mtu
            .map_or(self.egress.mtu, |route| route.min(self.egress.mtu))
    }
}

/// Why packets to a destination cannot be framed and sent without the kernel's IP stack.
#[derive(Debug, thiserror::Error)]
pub enum NextHopError {
    #[error("no route to {destination}{}", through(interface.as_deref()))]
    NoRoute {
        destination: IpAddr,
        /// The interface the lookup was restricted to.
        interface: Option<String>,
    },
    #[error("{destination} is an address of this host")]
    Local { destination: IpAddr },
    #[error("next hop {next_hop} not resolved on {interface}")]
    NotResolved {
        next_hop: IpAddr,
        interface: String,
        /// For [`solicit`].
        ifindex: u32,
    },
    #[error("{interface} is not an Ethernet interface")]
    NotEthernet { interface: String },
    #[error("{interface} has no {family} address to send from")]
    NoSourceAddress {
        interface: String,
        family: crate::flow::Family,
    },
    #[error("the route to {destination} {what}")]
    Unsupported {
        destination: IpAddr,
        what: &'static str,
    },
    #[error("looking up the next hop to {destination}: {source}")]
    Netlink {
        destination: IpAddr,
        #[source]
        source: io::Error,
    },
}

fn through(interface: Option<&str>) -> String {
    interface.map_or_else(String::new, |name| format!(" through {name}"))
}

/// The next hop of packets to `destination`, leaving through `interface` (an index) when
/// given, else wherever the routing decides.
///
/// One `RTM_GETROUTE` asks the kernel's FIB (rules, every table, the interface constraint),
/// then the neighbour entry of the gateway, or of the destination on a direct route, is read
/// on the egress interface.
///
/// With an interface given and no route through it, the kernel itself would assume that a
/// unicast destination is on that link; this lookup says [`NextHopError::NoRoute`] instead.
pub fn next_hop(destination: IpAddr, interface: Option<u32>) -> Result<NextHop, NextHopError> {
    let netlink_error = |source: io::Error| NextHopError::Netlink {
        destination,
        source,
    };
    let mut netlink = Rtnetlink::open().map_err(netlink_error)?;
    let route = match route_to(&mut netlink, destination, interface) {
        Ok(route) => route,
        Err(error) if means_no_route(&error) => {
            return Err(no_route(&mut netlink, destination, interface));
        }
        Err(error) => return Err(netlink_error(error.into())),
    };
    match route.kind {
        RouteType::Local => return Err(NextHopError::Local { destination }),
        RouteType::Unicast | RouteType::Multicast | RouteType::Broadcast => {}
        _ => {
            return Err(NextHopError::Unsupported {
                destination,
                what: "is neither unicast, multicast nor broadcast",
            });
        }
    }
    if let Some(what) = route.unsupported {
        return Err(NextHopError::Unsupported { destination, what });
    }
    if route.kind == RouteType::Unicast && route.table == Some(0) {
        return Err(no_route(&mut netlink, destination, interface));
    }
    let ifindex = route.oif.ok_or_else(|| {
        netlink_error(io::Error::new(
            io::ErrorKind::InvalidData,
            "the kernel's route has no output interface",
        ))
    })?;
    let egress = interfaces::link_by_index_on(&mut netlink, ifindex)
        .map_err(|error| netlink_error(io::Error::other(error)))?;
    // The classifier writes the Ethernet header itself: the egress needs one, and a MAC.
    if !egress.is_ethernet() || egress.mac.is_none() {
        return Err(NextHopError::NotEthernet {
            interface: egress.name,
        });
    }
    let source = route
        .preferred_source
        .or_else(|| interfaces::source_address(&egress.name, destination))
        .ok_or_else(|| NextHopError::NoSourceAddress {
            interface: egress.name.clone(),
            family: crate::flow::Family::of(destination),
        })?;
    let destination_mac = match route.kind {
        RouteType::Multicast => multicast_mac(destination),
        RouteType::Broadcast => [0xff; 6],
        _ => {
            let next_hop = route.gateway.unwrap_or(destination);
            let entry = neighbour(&mut netlink, next_hop, ifindex)
                .map_err(|error| netlink_error(error.into()))?;
            entry
                .as_ref()
                .and_then(usable_mac)
                .ok_or_else(|| NextHopError::NotResolved {
                    next_hop,
                    interface: egress.name.clone(),
                    ifindex,
                })?
        }
    };
    Ok(NextHop {
        egress,
        gateway: route.gateway,
        source,
        destination_mac,
        route_mtu: route.mtu,
    })
}

/// Makes the kernel resolve `next_hop` on interface `ifindex` as a send to it would: an ARP
/// request (IPv4) or a neighbour solicitation (IPv6) leaves, the entry shows as `INCOMPLETE` and turns `REACHABLE` when the neighbour
/// answers (or `FAILED` when nobody does). No data is sent. A `STALE` entry is re-confirmed
/// the same way. Returns once the kernel has started; watch the entry or call [`next_hop`]
/// again for the outcome.
///
/// Entries that need no resolving are left alone: reachable ones, static ones (`PERMANENT`,
/// `NOARP`) and those another program keeps (externally learned or managed), because the
/// request (`RTM_NEWNEIGH` with `NTF_USE`) is an administrative update that would clear
/// `PERMANENT` and those flags.
pub fn solicit(next_hop: IpAddr, ifindex: u32) -> io::Result<()> {
    let mut netlink = Rtnetlink::open()?;
    if let Some(entry) = neighbour(&mut netlink, next_hop, ifindex)?
        && !wants_resolving(&entry)
    {
        return Ok(());
    }
    let mut request = NeighbourMessage::default();
    request.header.family = address_family(next_hop);
    request.header.ifindex = ifindex;
    request.header.flags = NeighbourFlags::Use;
    request
        .attributes
        .push(NeighbourAttribute::Destination(neighbour_address(next_hop)));
    match netlink.request(
        RouteNetlinkMessage::NewNeighbour(request),
        NLM_F_CREATE | NLM_F_ACK,
    )? {
        Reply::Ack => Ok(()),
        Reply::Message(other) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected an acknowledgement, got {other:?}"),
        )),
    }
}

/// The Ethernet address of a group: `01:00:5e` and the low 23 bits of an IPv4 group (RFC
/// 1112), `33:33` and the low 32 bits of an IPv6 group (RFC 2464).
pub fn multicast_mac(group: IpAddr) -> [u8; 6] {
    match group {
        IpAddr::V4(group) => {
            let [_, b, c, d] = group.octets();
            [0x01, 0x00, 0x5e, b & 0x7f, c, d]
        }
        IpAddr::V6(group) => {
            let octets = group.octets();
            [0x33, 0x33, octets[12], octets[13], octets[14], octets[15]]
        }
    }
}

fn address_family(address: IpAddr) -> AddressFamily {
    match address {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn neighbour_address(address: IpAddr) -> NeighbourAddress {
    match address {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

fn route_address(address: IpAddr) -> RouteAddress {
    match address {
        IpAddr::V4(v4) => RouteAddress::Inet(v4),
        IpAddr::V6(v6) => RouteAddress::Inet6(v6),
    }
}

/// The MAC of a neighbour entry, if its state makes it usable for sending (the kernel's
/// `NUD_VALID`: reachable, stale, delay, probe, permanent, noarp); `None` for incomplete and
/// failed entries. Also for neighbour events from rtnetlink.
pub fn usable_mac(entry: &NeighbourMessage) -> Option<[u8; 6]> {
    if u16::from(entry.header.state) & NUD_VALID == 0 {
        return None;
    }
    entry
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            NeighbourAttribute::LinkLocalAddress(bytes) => {
                <[u8; 6]>::try_from(bytes.as_slice()).ok()
            }
            _ => None,
        })
}

const NUD_REACHABLE: u16 = 0x02;
const NUD_STALE: u16 = 0x04;
const NUD_DELAY: u16 = 0x08;
const NUD_PROBE: u16 = 0x10;
const NUD_NOARP: u16 = 0x40;
const NUD_PERMANENT: u16 = 0x80;
const NUD_VALID: u16 =
    NUD_PERMANENT | NUD_NOARP | NUD_REACHABLE | NUD_PROBE | NUD_STALE | NUD_DELAY;
/// `NDA_FLAGS_EXT`: neighbour flags beyond the header's 8 bits (`NTF_EXT_MANAGED`, …).
const NDA_FLAGS_EXT: u16 = 15;

/// Whether [`solicit`] should touch `entry`: a send would start resolving it (it has no
/// usable MAC, or a stale one), and an administrative update would not undo someone's
/// configuration.
fn wants_resolving(entry: &NeighbourMessage) -> bool {
    let state = u16::from(entry.header.state);
    let kept_by_someone = entry.header.flags.contains(NeighbourFlags::ExtLearned)
        || entry.attributes.iter().any(|attribute| match attribute {
            NeighbourAttribute::Other(nla) if nla.kind() == NDA_FLAGS_EXT => {
                let mut flags = vec![0; nla.value_len()];
                nla.emit_value(&mut flags);
                flags.iter().any(|byte| *byte != 0)
            }
            _ => false,
        });
    let resolved_or_resolving = NUD_PERMANENT | NUD_NOARP | NUD_REACHABLE | NUD_DELAY | NUD_PROBE;
    !kept_by_someone && state & resolved_or_resolving == 0
}

/// The parts of the kernel's answer to a route lookup that matter here.
#[derive(Debug, Default, PartialEq, Eq)]
struct Route {
    kind: RouteType,
    /// The table the route came from; `Some(0)` when no route matched and the kernel assumed
    /// the destination is on the requested interface.
    table: Option<u32>,
    oif: Option<u32>,
    gateway: Option<IpAddr>,
    preferred_source: Option<IpAddr>,
    mtu: Option<u32>,
    /// What this route does that a frame written by MCR would not.
    unsupported: Option<&'static str>,
}

fn route_to(
    netlink: &mut Rtnetlink,
    destination: IpAddr,
    interface: Option<u32>,
) -> Result<Route, RequestError> {
    let mut request = RouteMessage::default();
    request.header.address_family = address_family(destination);
    request.header.destination_prefix_length = if destination.is_ipv4() { 32 } else { 128 };
    // Without this flag the kernel reports the main table for every answer; with it, the
    // table the route came from, and 0 when no route matched at all. IPv6 refuses the flag
    // (it takes only RTM_F_FIB_MATCH), and needs none: without a route its lookup fails.
    if destination.is_ipv4() {
        request.header.flags = RouteFlags::LookupTable;
    }
    request
        .attributes
        .push(RouteAttribute::Destination(route_address(destination)));
    if let Some(ifindex) = interface {
        request.attributes.push(RouteAttribute::Oif(ifindex));
    }
    match netlink.request(RouteNetlinkMessage::GetRoute(request), 0)? {
        Reply::Message(RouteNetlinkMessage::NewRoute(message)) => Ok(route_from(&message)),
        other => Err(RequestError::Decode(format!(
            "expected a route, got {other:?}"
        ))),
    }
}

fn route_from(message: &RouteMessage) -> Route {
    let mut route = Route {
        kind: message.header.kind,
        table: Some(u32::from(message.header.table)),
        ..Route::default()
    };
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(table) => route.table = Some(*table),
            RouteAttribute::Oif(ifindex) => route.oif = Some(*ifindex),
            RouteAttribute::Gateway(RouteAddress::Inet(gateway)) => {
                route.gateway = Some(IpAddr::V4(*gateway));
            }
            RouteAttribute::Gateway(RouteAddress::Inet6(gateway)) => {
                route.gateway = Some(IpAddr::V6(*gateway));
            }
            RouteAttribute::PrefSource(RouteAddress::Inet(source)) => {
                route.preferred_source = Some(IpAddr::V4(*source));
            }
            RouteAttribute::PrefSource(RouteAddress::Inet6(source)) => {
                route.preferred_source = Some(IpAddr::V6(*source));
            }
            RouteAttribute::Metrics(metrics) => {
                route.mtu = metrics.iter().find_map(|metric| match metric {
                    RouteMetric::Mtu(mtu) if *mtu > 0 => Some(*mtu),
                    _ => None,
                });
            }
            RouteAttribute::Via(_) => route.unsupported = Some("goes through an IPv6 gateway"),
            RouteAttribute::EncapType(kind) if *kind != RouteLwEnCapType::None => {
                route.unsupported = Some("encapsulates its packets (lightweight tunnel)");
            }
            _ => {}
        }
    }
    route
}

/// The kernel's answers for a destination no route leads to: no matching route
/// (`ENETUNREACH`), or an `unreachable` (`EHOSTUNREACH`), `prohibit` (`EACCES`) or `blackhole`
/// (`EINVAL`, and then without a reason, unlike a request the kernel finds malformed) route.
fn means_no_route(error: &RequestError) -> bool {
    match error {
        RequestError::Refused { errno, reason } => match *errno {
            nix::libc::ENETUNREACH | nix::libc::EHOSTUNREACH | nix::libc::EACCES => true,
            nix::libc::EINVAL => reason.is_none(),
            _ => false,
        },
        RequestError::Io(_) | RequestError::Decode(_) => false,
    }
}

fn no_route(netlink: &mut Rtnetlink, destination: IpAddr, interface: Option<u32>) -> NextHopError {
    let interface = interface.map(|ifindex| {
        interfaces::link_by_index_on(netlink, ifindex)
            .map_or_else(|_| format!("interface index {ifindex}"), |link| link.name)
    });
    NextHopError::NoRoute {
        destination,
        interface,
    }
}

/// The neighbour entry of `address` on `ifindex`, if there is one.
fn neighbour(
    netlink: &mut Rtnetlink,
    address: IpAddr,
    ifindex: u32,
) -> Result<Option<NeighbourMessage>, RequestError> {
    let mut request = NeighbourMessage::default();
    request.header.family = address_family(address);
    request.header.ifindex = ifindex;
    request
        .attributes
        .push(NeighbourAttribute::Destination(neighbour_address(address)));
    match netlink.request(RouteNetlinkMessage::GetNeighbour(request), 0) {
        Ok(Reply::Message(RouteNetlinkMessage::NewNeighbour(entry))) => Ok(Some(entry)),
        Err(error) if error.errno() == Some(nix::libc::ENOENT) => Ok(None),
        Err(error) => Err(error),
        Ok(other) => Err(RequestError::Decode(format!(
            "expected a neighbour, got {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::{
        neighbour::NeighbourState,
        route::{RouteMessage, RouteVia},
    };

    use std::net::Ipv4Addr;

    use super::*;

    fn entry(state: NeighbourState, flags: NeighbourFlags, lladdr: &[u8]) -> NeighbourMessage {
        let mut entry = NeighbourMessage::default();
        entry.header.state = state;
        entry.header.flags = flags;
        entry
            .attributes
            .push(NeighbourAttribute::LinkLocalAddress(lladdr.to_vec()));
        entry
    }

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x54];

    #[test]
    fn only_valid_neighbour_states_give_a_mac() {
        for state in [
            NeighbourState::Reachable,
            NeighbourState::Stale,
            NeighbourState::Delay,
            NeighbourState::Probe,
            NeighbourState::Permanent,
            NeighbourState::Noarp,
        ] {
            let entry = entry(state, NeighbourFlags::empty(), &MAC);
            assert_eq!(usable_mac(&entry), Some(MAC), "{state}");
        }
        for state in [
            NeighbourState::Incomplete,
            NeighbourState::Failed,
            NeighbourState::None,
        ] {
            let entry = entry(state, NeighbourFlags::empty(), &MAC);
            assert_eq!(usable_mac(&entry), None, "{state}");
        }
    }

    #[test]
    fn a_link_layer_address_that_is_not_ethernet_gives_no_mac() {
        let entry = entry(
            NeighbourState::Noarp,
            NeighbourFlags::empty(),
            &[10, 0, 0, 1],
        );
        assert_eq!(usable_mac(&entry), None);
    }

    #[test]
    fn solicit_leaves_static_resolving_and_foreign_entries_alone() {
        for state in [
            NeighbourState::Permanent,
            NeighbourState::Noarp,
            NeighbourState::Reachable,
            NeighbourState::Delay,
            NeighbourState::Probe,
        ] {
            let entry = entry(state, NeighbourFlags::empty(), &MAC);
            assert!(!wants_resolving(&entry), "{state}");
        }
        let learned = entry(NeighbourState::Stale, NeighbourFlags::ExtLearned, &MAC);
        assert!(!wants_resolving(&learned));
        let mut managed = entry(NeighbourState::Failed, NeighbourFlags::empty(), &[]);
        let mut flags_ext = rtnetlink::packet_utils::nla::DefaultNla::new(
            NDA_FLAGS_EXT,
            1u32.to_ne_bytes().to_vec(),
        );
        managed
            .attributes
            .push(NeighbourAttribute::Other(flags_ext.clone()));
        assert!(!wants_resolving(&managed));
        flags_ext = rtnetlink::packet_utils::nla::DefaultNla::new(NDA_FLAGS_EXT, vec![0; 4]);
        managed.attributes = vec![NeighbourAttribute::Other(flags_ext)];
        assert!(wants_resolving(&managed), "no extended flags set");
    }

    #[test]
    fn solicit_resolves_missing_failed_and_stale_entries() {
        for state in [
            NeighbourState::None,
            NeighbourState::Incomplete,
            NeighbourState::Failed,
            NeighbourState::Stale,
        ] {
            let entry = entry(state, NeighbourFlags::empty(), &MAC);
            assert!(wants_resolving(&entry), "{state}");
        }
    }

    fn route(kind: RouteType, attributes: Vec<RouteAttribute>) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header.kind = kind;
        message.header.table = 254;
        message.attributes = attributes;
        message
    }

    #[test]
    fn a_gateway_route_gives_its_gateway_source_table_and_mtu() {
        let message = route(
            RouteType::Unicast,
            vec![
                RouteAttribute::Table(100),
                RouteAttribute::Oif(4),
                RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(10, 2, 0, 254))),
                RouteAttribute::PrefSource(RouteAddress::Inet(Ipv4Addr::new(10, 7, 7, 7))),
                RouteAttribute::Metrics(vec![RouteMetric::Mtu(1400)]),
            ],
        );
        assert_eq!(
            route_from(&message),
            Route {
                kind: RouteType::Unicast,
                table: Some(100),
                oif: Some(4),
                gateway: Some(Ipv4Addr::new(10, 2, 0, 254).into()),
                preferred_source: Some(Ipv4Addr::new(10, 7, 7, 7).into()),
                mtu: Some(1400),
                unsupported: None,
            }
        );
    }

    #[test]
    fn an_ipv6_gateway_is_not_supported() {
        let message = route(
            RouteType::Unicast,
            vec![RouteAttribute::Via(RouteVia::Inet6(
                "fe80::1".parse().expect("address"),
            ))],
        );
        assert_eq!(
            route_from(&message).unsupported,
            Some("goes through an IPv6 gateway")
        );
    }

    #[test]
    fn blackhole_unreachable_and_prohibit_mean_no_route_but_a_bad_request_does_not() {
        let refused = |errno, reason: Option<&str>| RequestError::Refused {
            errno,
            reason: reason.map(ToOwned::to_owned),
        };
        for errno in [
            nix::libc::ENETUNREACH,
            nix::libc::EHOSTUNREACH,
            nix::libc::EACCES,
            nix::libc::EINVAL,
        ] {
            assert!(means_no_route(&refused(errno, None)), "{errno}");
        }
        assert!(!means_no_route(&refused(
            nix::libc::EINVAL,
            Some("Invalid values in header for route get request")
        )));
        assert!(!means_no_route(&refused(nix::libc::ENODEV, None)));
    }

    #[test]
    fn the_group_mac_keeps_the_low_23_bits() {
        assert_eq!(
            multicast_mac(Ipv4Addr::new(239, 129, 2, 3).into()),
            [0x01, 0x00, 0x5e, 0x01, 0x02, 0x03]
        );
        assert_eq!(
            multicast_mac("ff3e::8000:1:2".parse().expect("group")),
            [0x33, 0x33, 0x00, 0x01, 0x00, 0x02],
            "the low 32 bits behind 33:33"
        );
    }

    #[test]
    fn the_lower_of_route_and_interface_mtu_applies() {
        let mut next_hop = NextHop {
            egress: Link {
                ifindex: 4,
                name: "out1".to_owned(),
                mac: Some(MAC),
                mtu: 9000,
                kind: interfaces::LinkKind::Ethernet,
                up: true,
            },
            gateway: None,
            source: Ipv4Addr::new(10, 2, 0, 1).into(),
            destination_mac: MAC,
            route_mtu: Some(1400),
        };
        assert_eq!(next_hop.mtu(), 1400);
        next_hop.route_mtu = None;
        assert_eq!(next_hop.mtu(), 9000);
        next_hop.egress.mtu = 1280;
        next_hop.route_mtu = Some(1500);
        assert_eq!(next_hop.mtu(), 1280);
    }

    #[test]
    fn errors_name_the_next_hop_and_the_interface() {
        let not_resolved = NextHopError::NotResolved {
            next_hop: Ipv4Addr::new(10, 2, 0, 9).into(),
            interface: "out1".to_owned(),
            ifindex: 4,
        };
        assert_eq!(
            not_resolved.to_string(),
            "next hop 10.2.0.9 not resolved on out1"
        );
        let no_route = NextHopError::NoRoute {
            destination: Ipv4Addr::new(10, 9, 9, 9).into(),
            interface: Some("out1".to_owned()),
        };
        assert_eq!(no_route.to_string(), "no route to 10.9.9.9 through out1");
        let anywhere = NextHopError::NoRoute {
            destination: Ipv4Addr::new(10, 9, 9, 9).into(),
            interface: None,
        };
        assert_eq!(anywhere.to_string(), "no route to 10.9.9.9");
        let tunnel = NextHopError::NotEthernet {
            interface: "tun0".to_owned(),
        };
        assert_eq!(tunnel.to_string(), "tun0 is not an Ethernet interface");
    }
}
