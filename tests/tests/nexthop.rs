//! The facts the kernel path frames packets with, looked up inside network namespaces against
//! what `ip` set up and reports: links (type, MAC, MTU, state), next hops (route, gateway,
//! source, neighbour MAC) and resolving an unknown next hop on demand.
//!
//! ```text
//!  relay                              sink
//!  out0 10.2.0.1/24 ---------------- sink0 10.2.0.2/24
//!  out1 10.3.0.1/24 ---------------- sink1 10.3.0.2/24   (second sink)
//! ```

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use mcr::sockets::{
    interfaces::{self, LinkError, LinkKind},
    routes::{self, NextHopError},
};
use mcr_tests::{Netns, in_netns, veth, wait_for};
use serde_json::Value;

const RELAY_OUT0: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);
const SINK: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 2);
/// A gateway on out0's link that no host answers for; tests give it a static entry.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 254);
const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x54];

/// The namespaces live as long as this value: dropping one deletes its end of the veth pair.
struct Topology {
    relay: Netns,
    sink: Netns,
    _sink_2: Netns,
}

fn topology() -> anyhow::Result<Topology> {
    let relay = Netns::new("nh-relay")?;
    let sink = Netns::new("nh-sink")?;
    let sink_2 = Netns::new("nh-sink2")?;
    veth(&relay, "out0", &sink, "sink0")?;
    veth(&relay, "out1", &sink_2, "sink1")?;
    relay.address("out0", "10.2.0.1/24")?;
    relay.address("out1", "10.3.0.1/24")?;
    sink.address("sink0", "10.2.0.2/24")?;
    sink_2.address("sink1", "10.3.0.2/24")?;
    Ok(Topology {
        relay,
        sink,
        _sink_2: sink_2,
    })
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The MAC `ip` reports for `interface`.
fn mac_of(netns: &Netns, interface: &str) -> anyhow::Result<String> {
    let links: Vec<Value> = serde_json::from_str(&netns.ip(&["-j", "link", "show", interface])?)?;
    links
        .first()
        .and_then(|link| link["address"].as_str())
        .map(ToOwned::to_owned)
        .with_context(|| format!("no address for {interface}"))
}

/// The state and link-layer address of `address`'s neighbour entry on `interface`, as `ip`
/// reports them.
fn neighbour(
    netns: &Netns,
    address: impl Into<IpAddr>,
    interface: &str,
) -> anyhow::Result<Option<(String, Option<String>)>> {
    let text = netns.ip(&[
        "-j",
        "neigh",
        "show",
        "to",
        &address.into().to_string(),
        "dev",
        interface,
    ])?;
    let entries: Vec<Value> = serde_json::from_str(&text)?;
    Ok(entries.first().map(|entry| {
        let state = entry["state"]
            .as_array()
            .and_then(|states| states.first())
            .and_then(Value::as_str)
            .unwrap_or("NONE")
            .to_owned();
        let lladdr = entry["lladdr"].as_str().map(ToOwned::to_owned);
        (state, lladdr)
    }))
}

fn ifindex(netns: &Netns, name: &str) -> anyhow::Result<u32> {
    let name = name.to_owned();
    in_netns(netns, move || interfaces::index(&name))?.with_context(|| "no such interface")
}

fn next_hop(
    netns: &Netns,
    destination: impl Into<IpAddr>,
    interface: Option<u32>,
) -> anyhow::Result<Result<routes::NextHop, NextHopError>> {
    let destination = destination.into();
    in_netns(netns, move || routes::next_hop(destination, interface))
}

fn static_gateway(relay: &Netns, mac: [u8; 6]) -> anyhow::Result<()> {
    relay.ip(&[
        "neigh",
        "replace",
        &GATEWAY.to_string(),
        "lladdr",
        &mac_text(mac),
        "dev",
        "out0",
    ])?;
    Ok(())
}

#[test]
fn a_direct_next_hop_resolves_with_the_peers_mac_after_solicit() -> anyhow::Result<()> {
    let lab = topology()?;
    let (relay, sink) = (&lab.relay, &lab.sink);
    let out0 = ifindex(relay, "out0")?;

    match next_hop(relay, SINK, None)? {
        Err(error @ NextHopError::NotResolved { .. }) => {
            assert_eq!(error.to_string(), "next hop 10.2.0.2 not resolved on out0");
        }
        other => panic!("expected the sink to be unresolved before anything was sent: {other:?}"),
    }

    in_netns(relay, move || routes::solicit(SINK.into(), out0))??;

    // The sink saw the relay's ARP request: it learned the relay's address from it.
    let relay_mac = mac_of(relay, "out0")?;
    let learned = wait_for(Duration::from_secs(3), || {
        neighbour(sink, RELAY_OUT0, "sink0").ok().flatten()
    });
    assert_eq!(
        learned.and_then(|(_, lladdr)| lladdr),
        Some(relay_mac.clone()),
        "the sink never saw an ARP request from the relay"
    );

    let resolved = wait_for(Duration::from_secs(3), || {
        next_hop(relay, SINK, None).ok()?.ok()
    })
    .context("the sink never resolved")?;
    assert_eq!(mac_text(resolved.destination_mac), mac_of(sink, "sink0")?);
    assert_eq!(resolved.gateway, None);
    assert_eq!(resolved.source, IpAddr::V4(RELAY_OUT0));
    assert_eq!(resolved.egress.name, "out0");
    assert_eq!(resolved.egress.ifindex, out0);
    assert_eq!(resolved.egress.mac.map(mac_text), Some(relay_mac));
    let (state, _) = neighbour(relay, SINK, "out0")?.context("no entry for the sink")?;
    assert_eq!(state, "REACHABLE");
    Ok(())
}

#[test]
fn an_ipv6_next_hop_comes_from_neighbour_discovery() -> anyhow::Result<()> {
    let lab = topology()?;
    let (relay, sink) = (&lab.relay, &lab.sink);
    relay.ip(&["-6", "addr", "add", "fd02::1/64", "dev", "out0", "nodad"])?;
    sink.ip(&["-6", "addr", "add", "fd02::2/64", "dev", "sink0", "nodad"])?;
    let out0 = ifindex(relay, "out0")?;
    let sink6: Ipv6Addr = "fd02::2".parse()?;

    match next_hop(relay, sink6, None)? {
        Err(error @ NextHopError::NotResolved { .. }) => {
            assert_eq!(error.to_string(), "next hop fd02::2 not resolved on out0");
        }
        other => panic!("expected fd02::2 unresolved before anything was sent: {other:?}"),
    }
    // A neighbour solicitation leaves; the sink answers and learns the relay from it.
    in_netns(relay, move || routes::solicit(sink6.into(), out0))??;
    let resolved = wait_for(Duration::from_secs(3), || {
        next_hop(relay, sink6, None).ok()?.ok()
    })
    .context("fd02::2 never resolved")?;
    assert_eq!(mac_text(resolved.destination_mac), mac_of(sink, "sink0")?);
    assert_eq!(resolved.gateway, None);
    assert_eq!(resolved.source, "fd02::1".parse::<IpAddr>()?);
    assert_eq!(resolved.egress.name, "out0");

    // Through a router known by its link-local address, as IPv6 routes usually are: the
    // router's MAC, and still the global source address.
    let router: Ipv6Addr = "fe80::254".parse()?;
    relay.ip(&[
        "-6",
        "neigh",
        "replace",
        "fe80::254",
        "lladdr",
        &mac_text(GATEWAY_MAC),
        "dev",
        "out0",
        "nud",
        "permanent",
    ])?;
    relay.ip(&[
        "-6",
        "route",
        "add",
        "fd09::/64",
        "via",
        "fe80::254",
        "dev",
        "out0",
    ])?;
    let through_router = next_hop(relay, "fd09::7".parse::<Ipv6Addr>()?, None)??;
    assert_eq!(through_router.gateway, Some(IpAddr::V6(router)));
    assert_eq!(through_router.destination_mac, GATEWAY_MAC);
    assert_eq!(through_router.source, "fd02::1".parse::<IpAddr>()?);

    match next_hop(relay, "fd0a::1".parse::<Ipv6Addr>()?, None)? {
        Err(error @ NextHopError::NoRoute { .. }) => {
            assert_eq!(error.to_string(), "no route to fd0a::1");
        }
        other => panic!("expected no route to fd0a::1: {other:?}"),
    }
    Ok(())
}

#[test]
fn an_unanswered_next_hop_is_solicited_and_stays_unresolved() -> anyhow::Result<()> {
    let lab = topology()?;
    let relay = &lab.relay;
    let out0 = ifindex(relay, "out0")?;
    let nobody = Ipv4Addr::new(10, 2, 0, 9);

    in_netns(relay, move || routes::solicit(nobody.into(), out0))??;
    let (state, _) = neighbour(relay, nobody, "out0")?.context("solicit created no entry")?;
    assert_eq!(state, "INCOMPLETE", "ARP resolution did not start");

    match next_hop(relay, nobody, None)? {
        Err(NextHopError::NotResolved {
            next_hop,
            interface,
            ifindex,
        }) => {
            assert_eq!(next_hop, nobody);
            assert_eq!(interface, "out0");
            assert_eq!(ifindex, out0);
        }
        other => panic!("expected 10.2.0.9 unresolved: {other:?}"),
    }
    // The kernel gives up after its probes; the next hop is still unresolved, not an error.
    let failed = wait_for(Duration::from_secs(6), || {
        let (state, _) = neighbour(relay, nobody, "out0").ok()??;
        (state == "FAILED").then_some(())
    });
    ensure!(
        failed.is_some(),
        "the kernel never gave up probing 10.2.0.9"
    );
    ensure!(
        matches!(
            next_hop(relay, nobody, None)?,
            Err(NextHopError::NotResolved { .. })
        ),
        "a failed entry must not count as resolved"
    );
    Ok(())
}

#[test]
fn a_gateway_route_gives_the_gateways_mac_and_follows_its_changes() -> anyhow::Result<()> {
    let lab = topology()?;
    let relay = &lab.relay;
    relay.ip(&["route", "add", "10.9.0.0/16", "via", &GATEWAY.to_string()])?;
    static_gateway(relay, GATEWAY_MAC)?;
    let destination = Ipv4Addr::new(10, 9, 1, 1);

    let first = next_hop(relay, destination, None)??;
    assert_eq!(first.gateway, Some(IpAddr::V4(GATEWAY)));
    assert_eq!(first.destination_mac, GATEWAY_MAC);
    assert_eq!(first.source, IpAddr::V4(RELAY_OUT0));
    assert_eq!(first.egress.name, "out0");
    assert_eq!(first.route_mtu, None);
    assert_eq!(first.mtu(), 1500);

    let moved = [0x02, 0, 0, 0, 0x02, 0x99];
    static_gateway(relay, moved)?;
    let second = next_hop(relay, destination, None)??;
    assert_eq!(second.destination_mac, moved);
    Ok(())
}

#[test]
fn solicit_leaves_a_static_entry_as_it_was() -> anyhow::Result<()> {
    let lab = topology()?;
    let relay = &lab.relay;
    static_gateway(relay, GATEWAY_MAC)?;
    let out0 = ifindex(relay, "out0")?;

    in_netns(relay, move || routes::solicit(GATEWAY.into(), out0))??;

    assert_eq!(
        neighbour(relay, GATEWAY, "out0")?,
        Some(("PERMANENT".to_owned(), Some(mac_text(GATEWAY_MAC))))
    );
    Ok(())
}

#[test]
fn solicit_reconfirms_a_stale_entry() -> anyhow::Result<()> {
    let lab = topology()?;
    let (relay, sink) = (&lab.relay, &lab.sink);
    let out0 = ifindex(relay, "out0")?;
    // The first unicast probe of a stale entry leaves after this delay (default 5 s).
    relay.exec(
        "sysctl",
        &["-qw", "net.ipv4.neigh.out0.delay_first_probe_time=1"],
    )?;
    let sink_mac = mac_of(sink, "sink0")?;
    relay.ip(&[
        "neigh",
        "replace",
        &SINK.to_string(),
        "lladdr",
        &sink_mac,
        "dev",
        "out0",
        "nud",
        "stale",
    ])?;
    assert_eq!(
        neighbour(relay, SINK, "out0")?.map(|(state, _)| state),
        Some("STALE".to_owned())
    );

    in_netns(relay, move || routes::solicit(SINK.into(), out0))??;

    let reachable = wait_for(Duration::from_secs(4), || {
        let (state, _) = neighbour(relay, SINK, "out0").ok()??;
        (state == "REACHABLE").then_some(())
    });
    ensure!(
        reachable.is_some(),
        "the stale entry was never re-confirmed: {:?}",
        neighbour(relay, SINK, "out0")?
    );
    Ok(())
}

#[test]
fn the_routes_preferred_source_is_the_source() -> anyhow::Result<()> {
    let lab = topology()?;
    let relay = &lab.relay;
    relay.ip(&["addr", "add", "10.7.7.7/32", "dev", "lo"])?;
    relay.ip(&[
        "route",
        "add",
        "10.8.0.0/16",
        "via",
        &GATEWAY.to_string(),
        "src",
        "10.7.7.7",
    ])?;
    static_gateway(relay, GATEWAY_MAC)?;

    let hop = next_hop(relay, Ipv4Addr::new(10, 8, 0, 1), None)??;
    assert_eq!(hop.source, IpAddr::V4(Ipv4Addr::new(10, 7, 7, 7)));
    assert_eq!(hop.egress.name, "out0");
    Ok(())
}

#[test]
fn policy_rules_and_other_tables_are_followed() -> anyhow::Result<()> {
    let lab = topology()?;
    let relay = &lab.relay;
    let other_gateway = Ipv4Addr::new(10, 3, 0, 253);
    let other_mac = [0x02, 0, 0, 0, 0x03, 0x53];
    relay.ip(&["rule", "add", "to", "10.6.0.0/16", "table", "100"])?;
    relay.ip(&[
        "route",
        "add",
        "10.6.0.0/16",
        "via",
        &other_gateway.to_string(),
        "table",
        "100",
    ])?;
    relay.ip(&[
        "neigh",
        "add",
        &other_gateway.to_string(),
        "lladdr",
        &mac_text(other_mac),
        "dev",
        "out1",
    ])?;

    let hop = next_hop(relay, Ipv4Addr::new(10, 6, 0, 1), None)??;
    assert_eq!(hop.gateway, Some(IpAddr::V4(other_gateway)));
    assert_eq!(hop.destination_mac, other_mac);
    assert_eq!(hop.egress.name, "out1");
    assert_eq!(hop.source, Ipv4Addr::new(10, 3, 0, 1));
    Ok(())
}

#[test]
fn destinations_without_a_route_say_so() -> anyhow::Result<()> {
    let lab = topology()?;
    let relay = &lab.relay;
    relay.ip(&["route", "add", "10.9.0.0/16", "via", &GATEWAY.to_string()])?;
    relay.ip(&["route", "add", "blackhole", "10.10.0.0/16"])?;
    relay.ip(&["route", "add", "unreachable", "10.11.0.0/16"])?;
    static_gateway(relay, GATEWAY_MAC)?;
    let out0 = ifindex(relay, "out0")?;
    let out1 = ifindex(relay, "out1")?;
    let destination = Ipv4Addr::new(10, 9, 1, 1);

    // Through out0 the route applies; through out1 there is none.
    let through_out0 = next_hop(relay, destination, Some(out0))??;
    assert_eq!(through_out0.gateway, Some(IpAddr::V4(GATEWAY)));
    match next_hop(relay, destination, Some(out1))? {
        Err(error @ NextHopError::NoRoute { .. }) => {
            assert_eq!(error.to_string(), "no route to 10.9.1.1 through out1");
        }
        other => panic!("expected no route through out1: {other:?}"),
    }
    for nowhere in [
        Ipv4Addr::new(192, 0, 2, 1),
        Ipv4Addr::new(10, 10, 0, 1),
        Ipv4Addr::new(10, 11, 0, 1),
    ] {
        match next_hop(relay, nowhere, None)? {
            Err(NextHopError::NoRoute {
                destination,
                interface: None,
            }) => assert_eq!(destination, nowhere),
            other => panic!("expected no route to {nowhere}: {other:?}"),
        }
    }
    match next_hop(relay, RELAY_OUT0, None)? {
        Err(error @ NextHopError::Local { .. }) => {
            assert_eq!(error.to_string(), "10.2.0.1 is an address of this host");
        }
        other => panic!("expected a local destination: {other:?}"),
    }
    Ok(())
}

#[test]
fn a_multicast_destination_goes_to_the_groups_mac() -> anyhow::Result<()> {
    let lab = topology()?;
    let relay = &lab.relay;
    let out1 = ifindex(relay, "out1")?;
    let group = Ipv4Addr::new(239, 129, 2, 3);

    let hop = next_hop(relay, group, Some(out1))??;
    assert_eq!(hop.destination_mac, [0x01, 0x00, 0x5e, 0x01, 0x02, 0x03]);
    assert_eq!(hop.egress.name, "out1");
    assert_eq!(hop.source, Ipv4Addr::new(10, 3, 0, 1));
    assert_eq!(hop.gateway, None);
    Ok(())
}

#[test]
fn a_route_mtu_below_the_interfaces_limits_the_next_hop() -> anyhow::Result<()> {
    let lab = topology()?;
    let relay = &lab.relay;
    relay.ip(&[
        "route",
        "add",
        "10.5.0.0/16",
        "via",
        &GATEWAY.to_string(),
        "mtu",
        "1400",
    ])?;
    static_gateway(relay, GATEWAY_MAC)?;

    let hop = next_hop(relay, Ipv4Addr::new(10, 5, 0, 1), None)??;
    assert_eq!(hop.route_mtu, Some(1400));
    assert_eq!(hop.egress.mtu, 1500);
    assert_eq!(hop.mtu(), 1400);
    Ok(())
}

#[test]
fn a_route_through_a_tunnel_is_not_ethernet() -> anyhow::Result<()> {
    let lab = topology()?;
    let relay = &lab.relay;
    relay.ip(&["tuntap", "add", "tun0", "mode", "tun"])?;
    relay.address("tun0", "10.4.0.1/24")?;

    let tun = in_netns(relay, || interfaces::link_by_name("tun0"))??;
    assert_eq!(tun.kind, LinkKind::Other { arphrd: 65534 });
    assert!(!tun.is_ethernet());
    assert_eq!(tun.mac, None);

    match next_hop(relay, Ipv4Addr::new(10, 4, 0, 9), None)? {
        Err(error @ NextHopError::NotEthernet { .. }) => {
            assert_eq!(error.to_string(), "tun0 is not an Ethernet interface");
        }
        other => panic!("expected tun0 to be refused: {other:?}"),
    }
    Ok(())
}

#[test]
fn link_facts_of_a_veth_follow_its_mtu_and_carrier() -> anyhow::Result<()> {
    let lab = topology()?;
    let (relay, sink) = (&lab.relay, &lab.sink);
    relay.ip(&["link", "set", "out0", "mtu", "9000"])?;
    let out0 = ifindex(relay, "out0")?;

    let link = in_netns(relay, || interfaces::link_by_name("out0"))??;
    assert_eq!(link.name, "out0");
    assert_eq!(link.ifindex, out0);
    assert_eq!(link.kind, LinkKind::Ethernet);
    assert_eq!(link.mac.map(mac_text), Some(mac_of(relay, "out0")?));
    assert_eq!(link.mtu, 9000);
    assert!(link.up);
    assert_eq!(
        in_netns(relay, move || interfaces::link_by_index(out0))??,
        link
    );

    // The peer going down takes the carrier away: nothing sent on out0 would arrive.
    sink.ip(&["link", "set", "sink0", "down"])?;
    let without_carrier = in_netns(relay, || interfaces::link_by_name("out0"))??;
    assert!(!without_carrier.up);
    relay.ip(&["link", "set", "out1", "down"])?;
    assert!(!in_netns(relay, || interfaces::link_by_name("out1"))??.up);
    Ok(())
}

#[test]
fn loopback_is_not_ethernet_and_missing_links_are_named() -> anyhow::Result<()> {
    let lab = topology()?;
    let relay = &lab.relay;
    let lo = in_netns(relay, || interfaces::link_by_name("lo"))??;
    assert_eq!(lo.kind, LinkKind::Loopback);
    assert!(!lo.is_ethernet());
    assert_eq!(lo.ifindex, 1);
    assert_eq!(lo.mtu, 65536);

    match in_netns(relay, || interfaces::link_by_name("nothere0"))? {
        Err(error @ LinkError::NoSuchName(_)) => {
            assert_eq!(error.to_string(), "interface nothere0 does not exist");
        }
        other => panic!("expected a missing interface: {other:?}"),
    }
    assert!(matches!(
        in_netns(relay, || interfaces::link_by_index(4242))?,
        Err(LinkError::NoSuchIndex(4242))
    ));
    Ok(())
}

#[test]
fn stacked_ethernet_devices_are_ethernet() -> anyhow::Result<()> {
    let lab = topology()?;
    let relay = &lab.relay;
    relay.ip(&["link", "add", "br0", "type", "bridge"])?;
    relay.ip(&[
        "link", "add", "link", "out1", "name", "mv0", "type", "macvlan", "mode", "bridge",
    ])?;
    relay.ip(&["link", "set", "mv0", "mtu", "1400"])?;
    for name in ["br0", "mv0"] {
        let link = in_netns(relay, || interfaces::link_by_name(name))??;
        assert_eq!(link.kind, LinkKind::Ethernet, "{name}");
        assert_eq!(link.mac.map(mac_text), Some(mac_of(relay, name)?), "{name}");
    }
    assert_eq!(
        in_netns(relay, || interfaces::link_by_name("mv0"))??.mtu,
        1400
    );
    Ok(())
}

#[test]
fn a_vlan_sub_interface_is_ethernet() -> anyhow::Result<()> {
    let lab = topology()?;
    let relay = &lab.relay;
    if let Err(error) = relay.ip(&[
        "link", "add", "link", "out0", "name", "out0.42", "type", "vlan", "id", "42",
    ]) {
        // CONFIG_VLAN_8021Q is off on some test kernels; say so instead of passing quietly.
        ensure!(
            error.to_string().contains("Unknown device type"),
            "creating out0.42: {error}"
        );
        eprintln!("SKIPPED: this kernel cannot create VLAN sub-interfaces (no 802.1Q support)");
        return Ok(());
    }
    relay.address("out0.42", "10.42.0.1/24")?;
    let link = in_netns(relay, || interfaces::link_by_name("out0.42"))??;
    assert_eq!(link.kind, LinkKind::Ethernet);
    assert_eq!(link.mac.map(mac_text), Some(mac_of(relay, "out0")?));
    assert_eq!(link.mtu, 1500);
    // A next hop behind the VLAN leaves through the sub-interface.
    relay.ip(&[
        "neigh",
        "add",
        "10.42.0.2",
        "lladdr",
        &mac_text(GATEWAY_MAC),
        "dev",
        "out0.42",
    ])?;
    let hop = next_hop(relay, Ipv4Addr::new(10, 42, 0, 2), None)??;
    assert_eq!(hop.egress.name, "out0.42");
    assert_eq!(hop.destination_mac, GATEWAY_MAC);
    Ok(())
}
