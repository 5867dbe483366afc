//! The classifier's IPv6 side, with IPv6 rules from the rules file: hostile IPv6 frames aimed
//! at a real rule's group and port are counted by reason and left alone (no rule counts them,
//! no worker gets them, no receiver sees them), while valid traffic behind hop-by-hop and
//! destination options is relayed; IPv6 traffic no rule takes passes to the host untouched
//! beside IPv4 and IPv6 rules; a rule's counters, source-specific precedence, minimum hop
//! limit and local delivery behave as for IPv4; and the kernel path writes IPv6 outputs whose
//! headers and checksums are right on the wire.
//!
//! One case writes its rule straight into the pinned maps, because the rules file cannot
//! express it: an IPv4 output in an IPv6 rule's kernel-path output set. That rule uses a slot
//! and output counters far above those MCR hands out, so the two never meet.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV6},
    os::fd::{AsRawFd as _, OwnedFd},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use mcr_common::{
    ANY_SOURCE6, KEEP_DSCP, KernelOutput, KernelOutputs, MAP_KERNEL_OUTPUTS, MAP_OUTPUT_STATS,
    MAP_RULES6, OutputCounters, PATH_KERNEL, RuleKey6, RuleSlot,
};
use mcr_tests::{
    Datagram6, ETH_P_8021AD, ETH_P_8021Q, Expected, Frame6, GENERATOR6, GENERATOR6_2, Lab,
    Listener, Mcr, Netns, OTHER_HOST_MAC, RELAY_OUT0, RELAY6_OUT0, Receiver, Receiver6, RulesFile,
    SINK, Stream, assert_delivered, in_netns,
    ipv6::{
        DESTINATION_OPTIONS, HOP_BY_HOP, ICMPV6, multicast_mac, pseudo_header_sum, udp_checksum,
    },
    send_frames, send_udp, settles_at,
};
use nix::{
    libc,
    net::if_::if_nametoindex,
    sys::socket::{
        AddressFamily, ControlMessageOwned, LinkAddr, SockFlag, SockProtocol, SockType, bind,
        setsockopt, socket, sockopt,
    },
};
use serde_json::Value;

/// The group and port of the file's IPv6 rule, which the tests aim at.
const GROUP: Ipv6Addr = Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, 0, 0x1234);
const PORT: u16 = 5000;
/// Where the IPv6 rule relays to, and with what hop limit.
const OUTPUT: Ipv6Addr = Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, 0, 0x5678);
const OUTPUT_PORT: u16 = 6000;
const OUTPUT_HOP_LIMIT: u8 = 7;

/// An IPv4 rule and an IPv6 rule, both on in0.
const RULES: &str = "\
rules:
  - name: ipv4
    input: {interface: in0, group: 239.1.1.1, port: 5000}
    outputs:
      - {interface: out0, destination: 239.2.2.1, port: 6000}
  - name: ipv6
    input: {interface: in0, group: ff0e::1234, port: 5000}
    outputs:
      - {interface: out0, destination: ff0e::5678, port: 6000, hop_limit: 7}
";

// ---------------------------------------------------------------------------------------
// What is sent, and what arrives where.

/// The payload of datagram `sequence` of a test stream, as [`Stream::payload`] makes it.
fn payload(sequence: u64, len: usize) -> Vec<u8> {
    Stream::new(GROUP, PORT, len, 1).payload(sequence)
}

/// Datagrams `first..first + count` of `len` bytes from the generator to the rule's group and
/// port, each changed by `build`.
fn frames(first: u64, count: u64, len: usize, build: impl Fn(Frame6) -> Frame6) -> Vec<Vec<u8>> {
    frames_to((GROUP, PORT), first..first + count, len, build)
}

/// Datagrams `sequences` of `len` bytes from the generator to `group:port`, each changed by
/// `build`.
fn frames_to(
    (group, port): (Ipv6Addr, u16),
    sequences: std::ops::Range<u64>,
    len: usize,
    build: impl Fn(Frame6) -> Frame6,
) -> Vec<Vec<u8>> {
    sequences
        .map(|sequence| build(Frame6::udp(GENERATOR6, group, port, payload(sequence, len))).bytes())
        .collect()
}

fn sequences(datagrams: &[Datagram6]) -> Vec<u64> {
    datagrams.iter().filter_map(Datagram6::sequence).collect()
}

/// What a rule has counted: packets, UDP payload bytes, packets below its minimum hop limit,
/// packets handed to its worker by the kernel path, packets shed.
fn rule_counters(mcr: &Mcr, name: &str) -> anyhow::Result<[u64; 5]> {
    let stats = mcr.rule_stats(name)?;
    let field = |key: &str| {
        stats[key]
            .as_u64()
            .with_context(|| format!("{key}: {stats}"))
    };
    Ok([
        field("rx_packets")?,
        field("rx_bytes")?,
        field("below_min_ttl")?,
        field("to_worker")?,
        field("shed")?,
    ])
}

// ---------------------------------------------------------------------------------------
// Traffic no rule takes.

#[test]
fn ipv6_traffic_no_rule_takes_passes_untouched_beside_ipv4_and_ipv6_rules() -> anyhow::Result<()> {
    const OTHER_GROUP: Ipv6Addr = Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, 0, 0x4321);
    const ONE_SENDER: Ipv6Addr = Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, 0, 0x1235);
    let lab = Lab::new()?;
    let rules = RulesFile::new(&format!(
        "{RULES}  - name: one-sender
    input: {{interface: in0, group: 'ff0e::1235', port: 5000, source: 'fd01::9'}}
    outputs:
      - {{interface: out0, destination: 'ff0e::5679', port: 6001}}
"
    ))?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let other_group = Receiver6::start(&lab.relay, Some(OTHER_GROUP), "in0", PORT)?;
    let other_port = Receiver6::start(&lab.relay, Some(GROUP), "in0", PORT + 1)?;
    let other_sender = Receiver6::start(&lab.relay, Some(ONE_SENDER), "in0", PORT)?;
    let sink6 = Receiver6::start(&lab.sink, Some(OUTPUT), "sink0", OUTPUT_PORT)?;
    let sink4 = Receiver::start(&lab.sink, Some(Ipv4Addr::new(239, 2, 2, 1)), SINK, 6000)?;
    let skips_before = mcr.skipped()?;

    // Valid IPv6 multicast UDP on in0 that no rule takes: another group (with a DSCP, and
    // behind the extension headers the classifier follows), the rule's group on another port,
    // and the source-specific rule's group from another sender.
    let untaken = [
        frames_to((OTHER_GROUP, PORT), 0..10, 100, |f| f.traffic_class(0xb9)),
        frames_to((OTHER_GROUP, PORT), 10..20, 100, |f| {
            f.options(HOP_BY_HOP, 8)
                .options(DESTINATION_OPTIONS, 16)
                .hop_limit(3)
        }),
        frames_to((GROUP, PORT + 1), 20..30, 100, |f| f),
        frames_to((ONE_SENDER, PORT), 30..40, 100, |f| f),
    ]
    .concat();
    send_frames(&lab.generator, "gen0", &untaken)?;
    // What the rules do take: the IPv6 rule's stream, the source-specific rule's sender and
    // IPv4.
    send_frames(&lab.generator, "gen0", &frames(40, 10, 100, |f| f))?;
    send_frames(
        &lab.generator,
        "gen0",
        &frames_to((ONE_SENDER, PORT), 50..60, 100, |f| f.from(GENERATOR6_2)),
    )?;
    let stream = Stream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 200, 50);
    send_udp(&lab.generator, &stream)?;

    // The host got every datagram no rule took, as sent, and none a rule took.
    let received = other_group.finish()?;
    ensure!(
        sequences(&received) == (0..20).collect::<Vec<_>>(),
        "the host got {:?} of the datagrams to {OTHER_GROUP}, not 0..20",
        sequences(&received)
    );
    for (sequence, datagram) in (0..20).zip(&received) {
        let (hop_limit, traffic_class) = if sequence < 10 { (64, 0xb9) } else { (3, 0) };
        ensure!(
            datagram.payload == payload(sequence, 100)
                && datagram.hop_limit == hop_limit
                && datagram.traffic_class == traffic_class
                && *datagram.source.ip() == GENERATOR6
                && datagram.destination == OTHER_GROUP,
            "datagram {sequence} changed on its way: {datagram:?}"
        );
    }
    let received = sequences(&other_port.finish()?);
    ensure!(
        received == (20..30).collect::<Vec<_>>(),
        "the host got {received:?} on port {}, not 20..30",
        PORT + 1
    );
    let received = sequences(&other_sender.finish()?);
    ensure!(
        received == (30..40).collect::<Vec<_>>(),
        "the host got {received:?} of {ONE_SENDER}, not 30..40 (50..60 are the rule's)"
    );

    // Each rule counted its own traffic and nothing else.
    assert_eq!(rule_counters(&mcr, "ipv6")?[..2], [10, 1000]);
    assert_eq!(rule_counters(&mcr, "one-sender")?[..2], [10, 1000]);
    assert_eq!(mcr.rule_stats("ipv4")?["rx_packets"], 50);
    let relayed = sequences(&sink6.finish()?);
    ensure!(
        relayed == (40..50).collect::<Vec<_>>(),
        "the IPv6 rule relayed {relayed:?}, not 40..50"
    );
    assert_delivered(
        &sink4.finish()?,
        &stream,
        Expected {
            destination: Ipv4Addr::new(239, 2, 2, 1).into(),
            source: RELAY_OUT0.into(),
            ttl: 16,
        },
    )?;
    // Nothing was counted as skipped either (the generator's own MLD reports and neighbour
    // discovery, ICMPv6, neither).
    assert_eq!(mcr.skipped()?, skips_before);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Hostile frames against a real rule.

/// A kind of IPv6 frame aimed at the IPv6 rule that the relay must leave alone, and the skip
/// counter it must land in: `None` for frames that are not IPv6 multicast UDP at all, which
/// pass uncounted, as MLD and neighbour discovery do.
struct Refused {
    what: &'static str,
    reason: Option<&'static str>,
    breaks: fn(Frame6) -> Frame6,
}

/// The frames carry 64 bytes of payload: the UDP datagram is 72 bytes.
const REFUSED: [Refused; 27] = [
    Refused {
        what: "802.1Q VLAN 42",
        reason: Some("vlan"),
        breaks: |f| f.tagged(ETH_P_8021Q, 42),
    },
    Refused {
        what: "QinQ, UDP behind hop-by-hop options",
        reason: Some("vlan"),
        breaks: |f| {
            f.tagged(ETH_P_8021AD, 100)
                .tagged(ETH_P_8021Q, 42)
                .options(HOP_BY_HOP, 8)
        },
    },
    Refused {
        what: "another host's MAC",
        reason: Some("other_host"),
        breaks: |f| f.to_mac(OTHER_HOST_MAC),
    },
    Refused {
        what: "the fixed header cut short",
        // Too short to show it is multicast UDP at all; the kernel's IPv6 input drops it.
        reason: None,
        breaks: |f| f.cut_at(30),
    },
    Refused {
        what: "the UDP header cut short, the payload length still that of the whole",
        reason: Some("malformed"),
        breaks: |f| f.cut_at(40 + 4),
    },
    Refused {
        what: "the UDP header cut short, the payload length saying so",
        reason: Some("malformed"),
        breaks: |f| f.cut_at(40 + 4).payload_len(4),
    },
    Refused {
        what: "payload length past the frame",
        reason: Some("malformed"),
        breaks: |f| f.payload_len(73),
    },
    Refused {
        what: "payload length shorter than the UDP length",
        reason: Some("malformed"),
        breaks: |f| f.payload_len(71),
    },
    Refused {
        what: "UDP length past the payload",
        reason: Some("malformed"),
        breaks: |f| f.udp_len_excess(1),
    },
    Refused {
        what: "interface-local group ff01::1234",
        reason: Some("malformed"),
        breaks: |f| f.to("ff01::1234".parse().expect("an address")),
    },
    Refused {
        what: "a routing header",
        reason: Some("malformed"),
        breaks: |f| f.options(HOP_BY_HOP, 8).routing(),
    },
    Refused {
        what: "hop-by-hop options after destination options",
        reason: Some("malformed"),
        breaks: |f| f.options(DESTINATION_OPTIONS, 8).options(HOP_BY_HOP, 8),
    },
    Refused {
        what: "UDP past the payload length, behind 64 bytes of destination options",
        reason: Some("malformed"),
        breaks: |f| f.options(DESTINATION_OPTIONS, 64).payload_len(40),
    },
    Refused {
        what: "an extension header past the payload length",
        reason: Some("malformed"),
        breaks: |f| f.options(HOP_BY_HOP, 8).payload_len(1),
    },
    Refused {
        what: "UDP checksum 0",
        reason: Some("bad_checksum"),
        breaks: Frame6::zero_checksum,
    },
    Refused {
        what: "hop limit 0",
        reason: Some("ttl_zero"),
        breaks: |f| f.hop_limit(0),
    },
    Refused {
        what: "source ::",
        reason: Some("bad_source"),
        breaks: |f| f.from(Ipv6Addr::UNSPECIFIED),
    },
    Refused {
        what: "source ::1",
        reason: Some("bad_source"),
        breaks: |f| f.from(Ipv6Addr::LOCALHOST),
    },
    Refused {
        what: "source ff02::1",
        reason: Some("bad_source"),
        breaks: |f| f.from("ff02::1".parse().expect("an address")),
    },
    Refused {
        what: "first fragment",
        reason: Some("fragments"),
        breaks: |f| f.fragment(0, true),
    },
    Refused {
        what: "fragment header behind hop-by-hop options",
        reason: Some("fragments"),
        breaks: |f| f.options(HOP_BY_HOP, 8).fragment(185, false),
    },
    Refused {
        what: "five extension headers",
        reason: Some("extension_headers"),
        breaks: |f| {
            f.options(HOP_BY_HOP, 8)
                .options(DESTINATION_OPTIONS, 8)
                .options(DESTINATION_OPTIONS, 8)
                .options(DESTINATION_OPTIONS, 8)
                .options(DESTINATION_OPTIONS, 8)
        },
    },
    Refused {
        what: "an authentication header",
        reason: Some("extension_headers"),
        breaks: Frame6::authentication,
    },
    Refused {
        what: "ICMPv6 instead of UDP",
        reason: None,
        breaks: |f| f.protocol(ICMPV6),
    },
    Refused {
        what: "ICMPv6 behind hop-by-hop options, as MLD sends it",
        reason: None,
        breaks: |f| f.options(HOP_BY_HOP, 8).protocol(ICMPV6),
    },
    Refused {
        what: "version 4 in the IPv6 header",
        reason: None,
        breaks: |f| f.version(4),
    },
    Refused {
        what: "the IPv6 packet behind IPv4's EtherType",
        reason: None,
        breaks: |f| f.ethertype(0x0800),
    },
];

/// Frames sent of each refused kind.
const REFUSED_SENT: u64 = 5;

/// Sends `REFUSED_SENT` frames of `refused` kind (sequences from `first`) and returns what
/// went wrong: the skip counter of its reason must move by exactly the frames sent and no
/// other; the rule's counters and the workers' received count must not move.
fn send_refused(
    lab: &Lab,
    mcr: &Mcr,
    refused: &Refused,
    first: u64,
) -> anyhow::Result<Vec<String>> {
    let Refused {
        what,
        reason,
        breaks,
    } = refused;
    let skips_before = mcr.skipped()?;
    let rule_before = rule_counters(mcr, "ipv6")?;
    let workers_before = mcr.workers_total("received")?;
    send_frames(
        &lab.generator,
        "gen0",
        &frames(first, REFUSED_SENT, 64, breaks),
    )?;
    let mut expected = skips_before.clone();
    if let Some(reason) = reason {
        ensure!(
            expected.get(reason).is_some(),
            "mcr stats --skipped has no {reason}: {expected}"
        );
        expected[reason] = Value::from(skips_before[reason].as_u64().unwrap_or(0) + REFUSED_SENT);
    }
    let mut failures = Vec::new();
    if let Err(now) = settles_at(|| mcr.skipped().ok(), &expected) {
        failures.push(format!(
            "{what}: skip counters {now:?}, expected {} +{REFUSED_SENT} from {skips_before}",
            reason.unwrap_or("none")
        ));
    }
    let rule = rule_counters(mcr, "ipv6")?;
    if rule != rule_before {
        failures.push(format!(
            "{what}: the rule counted it ({rule_before:?} -> {rule:?})"
        ));
    }
    let workers = mcr.workers_total("received")?;
    if workers != workers_before {
        failures.push(format!(
            "{what}: a worker received it ({workers_before} -> {workers})"
        ));
    }
    Ok(failures)
}

#[test]
fn hostile_ipv6_frames_for_a_rule_are_counted_by_reason_and_left_alone() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(RULES)?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let sink = Receiver6::start(&lab.sink, Some(OUTPUT), "sink0", OUTPUT_PORT)?;
    let mut failures = Vec::new();
    for (case, refused) in (1..).zip(&REFUSED) {
        failures.extend(send_refused(&lab, &mcr, refused, 1000 * case)?);
    }

    // The controls: valid frames, plain and behind hop-by-hop and destination options, are
    // the rule's, and skipped by no reason.
    let skips_before = mcr.skipped()?;
    let rule_before = rule_counters(&mcr, "ipv6")?;
    let controls = [
        frames(0, 10, 64, |f| f),
        frames(10, 10, 64, |f| {
            f.options(HOP_BY_HOP, 8).options(DESTINATION_OPTIONS, 16)
        }),
    ]
    .concat();
    send_frames(&lab.generator, "gen0", &controls)?;
    let expected = [rule_before[0] + 20, rule_before[1] + 20 * 64];
    if let Err(now) = settles_at(
        || rule_counters(&mcr, "ipv6").ok().map(|c| [c[0], c[1]]),
        &expected,
    ) {
        failures.push(format!(
            "control: the rule counted {now:?} (packets, bytes), not {expected:?}"
        ));
    }
    if mcr.skipped()? != skips_before {
        failures.push("control: valid frames were counted as skipped".into());
    }

    // The sink got the controls, each once, and none of the refused frames.
    let relayed = sink.finish()?;
    if sequences(&relayed) != (0..20).collect::<Vec<_>>() {
        failures.push(format!(
            "the sink got {:?}, not the controls 0..20 alone",
            sequences(&relayed)
        ));
    }
    for datagram in &relayed {
        if datagram.hop_limit != OUTPUT_HOP_LIMIT
            || *datagram.source.ip() != RELAY6_OUT0
            || datagram.payload.len() != 64
        {
            failures.push(format!("control relayed wrong: {datagram:?}"));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// A rule's own behaviour.

#[test]
fn ipv6_rules_count_prefer_their_sender_hold_back_low_hop_limits_and_share() -> anyhow::Result<()> {
    const SHARED: Ipv6Addr = Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, 0, 0x1236);
    const TO_ONE_SENDER: Ipv6Addr = Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, 0, 0x5679);
    const TO_SHARED: Ipv6Addr = Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, 0, 0x567a);
    let lab = Lab::new()?;
    let rules = RulesFile::new(
        "\
rules:
  - name: any
    input: {interface: in0, group: 'ff0e::1234', port: 5000, min_hop_limit: 2}
    outputs:
      - {interface: out0, destination: 'ff0e::5678', port: 6000, hop_limit: 7}
  - name: one-sender
    input: {interface: in0, group: 'ff0e::1234', port: 5000, source: 'fd01::9'}
    outputs:
      - {interface: out0, destination: 'ff0e::5679', port: 6001}
  - name: shared
    input: {interface: in0, group: 'ff0e::1236', port: 5000}
    local_delivery: true
    outputs:
      - {interface: out0, destination: 'ff0e::567a', port: 6002}
",
    )?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let host = Receiver6::start(&lab.relay, Some(GROUP), "in0", PORT)?;
    let host_shared = Receiver6::start(&lab.relay, Some(SHARED), "in0", PORT)?;
    let to_any = Receiver6::start(&lab.sink, Some(OUTPUT), "sink0", 6000)?;
    let to_one_sender = Receiver6::start(&lab.sink, Some(TO_ONE_SENDER), "sink0", 6001)?;
    let to_shared = Receiver6::start(&lab.sink, Some(TO_SHARED), "sink0", 6002)?;
    let skips_before = mcr.skipped()?;

    // The rule of the one sender takes its packets before the any-source rule does.
    send_frames(&lab.generator, "gen0", &frames(0, 10, 100, |f| f))?;
    send_frames(
        &lab.generator,
        "gen0",
        &frames(10, 5, 50, |f| f.from(GENERATOR6_2)),
    )?;
    // Below the minimum hop limit: counted apart, passed on to the host.
    send_frames(
        &lab.generator,
        "gen0",
        &frames(20, 4, 100, |f| f.hop_limit(1)),
    )?;
    // With local delivery the host gets them too, as they arrived.
    send_frames(
        &lab.generator,
        "gen0",
        &frames_to((SHARED, PORT), 30..33, 100, |f| f.hop_limit(5)),
    )?;

    let expected = [[10, 1000, 4], [5, 250, 0], [3, 300, 0]];
    settles_at(
        || {
            let mut now = [[0; 3]; 3];
            for (counters, name) in now.iter_mut().zip(["any", "one-sender", "shared"]) {
                let all = rule_counters(&mcr, name).ok()?;
                *counters = [all[0], all[1], all[2]];
            }
            Some(now)
        },
        &expected,
    )
    .map_err(|now| {
        anyhow::anyhow!("[packets, bytes, below_min_ttl] of the rules {now:?}, not {expected:?}")
    })?;
    assert_eq!(mcr.rule_stats("any")?["min_ttl"], 2);

    let relayed = sequences(&to_any.finish()?);
    ensure!(
        relayed == (0..10).collect::<Vec<_>>(),
        "any relayed {relayed:?}"
    );
    let relayed = sequences(&to_one_sender.finish()?);
    ensure!(
        relayed == (10..15).collect::<Vec<_>>(),
        "one-sender relayed {relayed:?}"
    );
    let relayed = sequences(&to_shared.finish()?);
    ensure!(
        relayed == (30..33).collect::<Vec<_>>(),
        "shared relayed {relayed:?}"
    );
    let received = host.finish()?;
    ensure!(
        sequences(&received) == (20..24).collect::<Vec<_>>()
            && received
                .iter()
                .all(|d| d.hop_limit == 1 && d.payload.len() == 100),
        "the host gets the held-back packets alone of the relayed group: {received:?}"
    );
    let received = host_shared.finish()?;
    ensure!(
        sequences(&received) == (30..33).collect::<Vec<_>>()
            && received
                .iter()
                .all(|d| d.hop_limit == 5 && *d.source.ip() == GENERATOR6),
        "the host gets what the shared rule relays, as it arrived: {received:?}"
    );
    assert_eq!(mcr.skipped()?, skips_before);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The kernel path's IPv6 outputs, on the wire.

/// The traffic class of the kernel path's input: DSCP 10, ECN 1.
const INPUT_CLASS: u8 = (10 << 2) | 1;
/// Output A is the file's usual output group; B is another.
const OUTPUT_A: Ipv6Addr = OUTPUT;
const OUTPUT_B: Ipv6Addr = Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, 0x1, 0x5679);

/// Two IPv6 outputs on out0: A sets DSCP 46, B keeps the input's; the host keeps its copy.
const KERNEL_RULES: &str = "\
rules:
  - name: fast
    input: {interface: in0, group: 'ff0e::1234', port: 5000}
    path: kernel
    local_delivery: true
    outputs:
      - {interface: out0, destination: 'ff0e::5678', port: 6000, hop_limit: 7, dscp: 46}
      - {interface: out0, destination: 'ff0e::1:5679', port: 6001, hop_limit: 9}
";

/// The MAC address of `interface` in `netns`.
fn mac_of(netns: &Netns, interface: &str) -> anyhow::Result<[u8; 6]> {
    let text = netns.ip(&["-j", "link", "show", interface])?;
    let links: Value = serde_json::from_str(&text)?;
    let text = links[0]["address"].as_str().context("no address")?;
    let bytes: Vec<u8> = text
        .split(':')
        .map(|byte| u8::from_str_radix(byte, 16))
        .collect::<Result<_, _>>()?;
    bytes.try_into().ok().context("not a MAC address")
}

/// What one output of the kernel-path test should put on the wire.
#[derive(Clone, Copy)]
struct Wanted {
    group: Ipv6Addr,
    port: u16,
    hop_limit: u8,
    traffic_class: u8,
}

const WANTED_A: Wanted = Wanted {
    group: OUTPUT_A,
    port: 6000,
    hop_limit: 7,
    traffic_class: (46 << 2) | 1,
};
const WANTED_B: Wanted = Wanted {
    group: OUTPUT_B,
    port: 6001,
    hop_limit: 9,
    traffic_class: INPUT_CLASS,
};

/// Datagrams 0..10 of the test stream, from a UDP socket in the generator with the input's
/// traffic class: its checksum is left to the hardware (`CHECKSUM_PARTIAL` across the veth),
/// which the kernel path must keep right too. Flow label 0, which the outputs must keep.
fn send_from_a_socket(lab: &Lab) -> anyhow::Result<()> {
    lab.generator
        .exec("sysctl", &["-qw", "net.ipv6.auto_flowlabels=0"])?;
    let stream = Stream::new(GROUP, PORT, 300, 10)
        .from(GENERATOR6)
        .from_port(4000)
        .tos(INPUT_CLASS)
        .ttl(64);
    send_udp(&lab.generator, &stream)
}

#[test]
fn an_ipv6_rule_on_the_kernel_path_writes_ipv6_outputs() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(KERNEL_RULES)?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    mcr.wait_for_path("kernel")?;
    let out0_mac = mac_of(&lab.relay, "out0")?;
    let host = Receiver6::start(&lab.relay, Some(GROUP), "in0", PORT)?;
    let at_a = Receiver6::start(&lab.sink, Some(OUTPUT_A), "sink0", 6000)?;
    let at_b = Receiver6::start(&lab.sink, Some(OUTPUT_B), "sink0", 6001)?;
    let wire = capture(&lab.sink, "sink0")?;

    // From a socket (checksum left to the hardware), then as frames built by hand (flow label
    // 0x12345, checksum complete).
    send_from_a_socket(&lab)?;
    send_frames(
        &lab.generator,
        "gen0",
        &frames(10, 20, 300, |f| f.traffic_class(INPUT_CLASS)),
    )?;
    let sent = |output: usize| {
        let stats = mcr.rule_stats("fast").ok()?;
        let output = &stats["outputs"][output];
        Some([
            output["tx_packets"].as_u64()?,
            output["tx_bytes"].as_u64()?,
            output["tx_errors"].as_u64()?,
        ])
    };
    settles_at(|| Some([sent(0)?, sent(1)?]), &[[30, 9000, 0]; 2])
        .map_err(|now| anyhow::anyhow!("[packets, bytes, errors] of the outputs: {now:?}"))?;
    let rule = rule_counters(&mcr, "fast")?;
    assert_eq!(rule[..2], [30, 9000], "packets and bytes");
    assert_eq!(rule[3], 0, "no packet for a worker");
    assert_eq!(mcr.workers_total("received")?, 0, "no packet for a worker");

    check_datagrams(&at_a.finish()?, WANTED_A).context("output A")?;
    check_datagrams(&at_b.finish()?, WANTED_B).context("output B")?;
    // The host's copy is the packet as it arrived; it arrives at all only if its checksum,
    // left to the hardware for the first ten, is still right.
    let received = host.finish()?;
    ensure!(
        sequences(&received) == (0..30).collect::<Vec<_>>()
            && received.iter().all(|d| {
                d.hop_limit == 64
                    && d.traffic_class == INPUT_CLASS
                    && d.source == SocketAddrV6::new(GENERATOR6, 4000, 0, 0)
            }),
        "the host got, with local delivery: {received:?}"
    );
    check_wire(&wire.finish()?, out0_mac)
}

/// Checks every frame of the outputs on the sink's wire, and that each output's frames are
/// all there: datagrams 0 to 9 came from a socket, with flow label 0.
fn check_wire(captured: &[Captured], source_mac: [u8; 6]) -> anyhow::Result<()> {
    let mut to_a = Vec::new();
    let mut to_b = Vec::new();
    for frame in captured {
        let destination = Ipv6Addr::from(<[u8; 16]>::try_from(&frame.frame[38..54])?);
        let (wanted, seen) = match destination {
            OUTPUT_A => (WANTED_A, &mut to_a),
            OUTPUT_B => (WANTED_B, &mut to_b),
            // The relay's own MLD and neighbour discovery.
            _ => continue,
        };
        let sequence = u64::from_be_bytes(frame.frame[62..70].try_into()?);
        let flow_label = if sequence < 10 { 0 } else { 0x1_2345 };
        let checked = check_output_frame(frame, source_mac, wanted, flow_label)
            .with_context(|| format!("datagram {sequence} to {destination}"))?;
        seen.push(checked);
    }
    ensure!(to_a == (0..30).collect::<Vec<_>>(), "to A: {to_a:?}");
    ensure!(to_b == (0..30).collect::<Vec<_>>(), "to B: {to_b:?}");
    ensure!(
        captured.iter().any(|frame| frame.checksum_pending),
        "no frame with its checksum left to the hardware: the socket's path was not tried"
    );
    Ok(())
}

/// Checks that an output's receiver got datagrams 0..30 of the test stream, in order, from
/// the relay's source and the input's UDP source port, as `wanted` says.
fn check_datagrams(datagrams: &[Datagram6], wanted: Wanted) -> anyhow::Result<()> {
    ensure!(
        sequences(datagrams) == (0..30).collect::<Vec<_>>(),
        "got {:?}",
        sequences(datagrams)
    );
    for datagram in datagrams {
        ensure!(
            datagram.source == SocketAddrV6::new(RELAY6_OUT0, 4000, 0, 0)
                && datagram.destination == wanted.group
                && datagram.hop_limit == wanted.hop_limit
                && datagram.traffic_class == wanted.traffic_class
                && datagram.payload.len() == 300,
            "{datagram:?}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// What only a hand-written map entry can reach.

fn pinned(mcr: &Mcr, name: &str) -> anyhow::Result<Map> {
    let path = mcr.pin_dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("{name} is no map aya knows"))
}

/// The slot and the first output counter of the hand-written rule: far above those MCR hands
/// out for the file's few rules.
const SLOT: u32 = 4000;
const COUNTER: u32 = 16_000;

/// The packets, bytes and errors output counter `counter` shows, summed over CPUs.
fn output_counters(
    stats: &PerCpuArray<MapData, OutputCounters>,
    counter: u32,
) -> Option<(u64, u64, u64)> {
    let per_cpu = stats.get(&counter, 0).ok()?;
    Some(per_cpu.iter().fold((0, 0, 0), |(p, b, e), c| {
        (p + c.packets, b + c.bytes, e + c.errors)
    }))
}

/// An output of the kernel path to `group:port` on `ifindex`, from the relay's address there.
fn output6(ifindex: u32, counter: u32, source_mac: [u8; 6], group: Ipv6Addr) -> KernelOutput {
    KernelOutput {
        ifindex,
        counter,
        destination_mac: multicast_mac(group),
        source_mac,
        source: RELAY6_OUT0.octets(),
        destination: group.octets(),
        port: 6000,
        ttl: 7,
        dscp: KEEP_DSCP,
    }
}

/// The supervisor never puts an IPv4 output in an IPv6 rule's kernel-path output set (a rule
/// that translates runs on the workers), so the rules file cannot make one: the entries are
/// written by hand, to prove the output writer refuses and counts it rather than writing an
/// IPv4 header into an IPv6 packet, and still sends the rule's other output.
#[test]
fn an_ipv4_output_in_an_ipv6_output_set_is_refused_and_counted() -> anyhow::Result<()> {
    const GROUP_2: Ipv6Addr = Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, 0, 0x1237);
    let lab = Lab::new()?;
    let rules = RulesFile::new(RULES)?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let mut rules6: HashMap<MapData, RuleKey6, RuleSlot> = pinned(&mcr, MAP_RULES6)?.try_into()?;
    let mut outputs: HashMap<MapData, u32, KernelOutputs> =
        pinned(&mcr, MAP_KERNEL_OUTPUTS)?.try_into()?;
    let stats: PerCpuArray<MapData, OutputCounters> = pinned(&mcr, MAP_OUTPUT_STATS)?.try_into()?;
    let in0 = in_netns(&lab.relay, || if_nametoindex("in0"))??;
    let out0 = in_netns(&lab.relay, || if_nametoindex("out0"))??;
    let out0_mac = mac_of(&lab.relay, "out0")?;
    let ipv6 = output6(out0, COUNTER, out0_mac, OUTPUT_A);
    let mut ipv4 = output6(out0, COUNTER + 1, out0_mac, OUTPUT_A);
    ipv4.source = [10, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    ipv4.destination = [239, 2, 2, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut set = KernelOutputs {
        count: 2,
        max_frame: 1514,
        ..KernelOutputs::default()
    };
    set.outputs[..2].copy_from_slice(&[ipv6, ipv4]);
    outputs.insert(SLOT, set, 0)?;
    let rule = RuleSlot {
        slot: SLOT,
        worker: 200,
        min_ttl: 0,
        path: PATH_KERNEL,
        flags: 0,
        pad: 0,
    };
    rules6.insert(
        RuleKey6::new(in0, GROUP_2.octets(), ANY_SOURCE6, PORT),
        rule,
        0,
    )?;
    let sink = Receiver6::start(&lab.sink, Some(OUTPUT_A), "sink0", 6000)?;

    send_frames(
        &lab.generator,
        "gen0",
        &frames_to((GROUP_2, PORT), 0..10, 300, |f| f),
    )?;
    settles_at(
        || {
            Some((
                output_counters(&stats, COUNTER)?,
                output_counters(&stats, COUNTER + 1)?,
            ))
        },
        &((10, 3000, 0), (0, 0, 10)),
    )
    .map_err(|now| anyhow::anyhow!("(IPv6 output, IPv4 output) counters {now:?}"))?;
    let relayed = sequences(&sink.finish()?);
    ensure!(
        relayed == (0..10).collect::<Vec<_>>(),
        "the IPv6 output sent {relayed:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Capturing frames on the wire.

/// How long a capture listens on once the wire has gone quiet.
const DRAIN_IDLE: Duration = Duration::from_millis(800);

/// A frame as a packet socket got it.
struct Captured {
    frame: Vec<u8>,
    /// The UDP checksum is still to be completed (`TP_STATUS_CSUMNOTREADY`): the sender left
    /// it to the hardware (`CHECKSUM_PARTIAL`), and the field holds the pseudo-header's sum.
    checksum_pending: bool,
}

/// `TP_STATUS_CSUMNOTREADY` in `tpacket_auxdata::tp_status`.
const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;

/// Every IPv6 frame that arrives on `interface` in `netns`, whole.
fn capture(netns: &Netns, interface: &'static str) -> anyhow::Result<Listener<Captured>> {
    let open = move || -> anyhow::Result<OwnedFd> {
        let ifindex = if_nametoindex(interface).with_context(|| format!("no {interface}"))?;
        let socket = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::EthIpv6,
        )
        .context("opening a packet socket")?;
        let raw = libc::sockaddr_ll {
            sll_family: u16::try_from(libc::AF_PACKET)?,
            sll_protocol: u16::try_from(libc::ETH_P_IPV6)?.to_be(),
            sll_ifindex: i32::try_from(ifindex)?,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 0,
            sll_addr: [0; 8],
        };
        // SAFETY: `raw` is a complete `sockaddr_ll` and the length given is its size.
        let address = unsafe {
            <LinkAddr as nix::sys::socket::SockaddrLike>::from_raw(
                std::ptr::from_ref(&raw).cast(),
                Some(libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>())?),
            )
        }
        .context("building the link-layer address")?;
        bind(socket.as_raw_fd(), &address).context("binding the packet socket")?;
        let on: libc::c_int = 1;
        // SAFETY: `on` is a c_int that outlives the call, and the length given is its size.
        let result = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_AUXDATA,
                std::ptr::from_ref(&on).cast(),
                libc::socklen_t::try_from(size_of::<libc::c_int>())?,
            )
        };
        ensure!(
            result == 0,
            "PACKET_AUXDATA: {}",
            std::io::Error::last_os_error()
        );
        setsockopt(
            &socket,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 100_000),
        )?;
        Ok(socket)
    };
    let mut buffer = vec![0_u8; 65_536];
    let receive = move |socket: &OwnedFd| -> anyhow::Result<Option<Captured>> {
        let mut space = nix::cmsg_space!(libc::tpacket_auxdata);
        let mut iov = [std::io::IoSliceMut::new(&mut buffer)];
        let Some(message) =
            mcr_tests::receive_message::<LinkAddr>(socket.as_raw_fd(), &mut iov, &mut space)?
        else {
            return Ok(None);
        };
        // Not what the sink itself sends (MLD reports).
        if message
            .address
            .is_none_or(|from| from.pkttype() == libc::PACKET_OUTGOING)
        {
            return Ok(None);
        }
        let mut checksum_pending = false;
        for cmsg in message.cmsgs()? {
            if let ControlMessageOwned::Unknown(aux) = cmsg
                && aux.cmsg_header.cmsg_type == libc::PACKET_AUXDATA
                && let Some(status) = aux.data_bytes.get(..4)
            {
                let status = u32::from_ne_bytes(status.try_into()?);
                checksum_pending = status & TP_STATUS_CSUMNOTREADY != 0;
            }
        }
        let len = message.bytes;
        Ok(Some(Captured {
            frame: buffer[..len].to_vec(),
            checksum_pending,
        }))
    };
    Listener::start(netns, DRAIN_IDLE, open, receive)
}

/// Checks a frame the kernel path sent: Ethernet addresses, the IPv6 header (flow label
/// `flow_label` and the ECN bits kept, the output's traffic class, hop limit and addresses),
/// the UDP ports and checksum. For a frame whose checksum the sender left to the hardware,
/// the field must hold the sum of the new pseudo-header. Returns the datagram's sequence.
fn check_output_frame(
    captured: &Captured,
    source_mac: [u8; 6],
    wanted: Wanted,
    flow_label: u32,
) -> anyhow::Result<u64> {
    let frame = &captured.frame;
    ensure!(frame.len() >= 14 + 40 + 8 + 8, "short frame: {frame:?}");
    ensure!(
        frame[..6] == multicast_mac(wanted.group) && frame[6..12] == source_mac,
        "MAC addresses {:x?}",
        &frame[..12]
    );
    let header = u32::from_be_bytes(frame[14..18].try_into()?);
    ensure!(
        header == (6 << 28) | (u32::from(wanted.traffic_class) << 20) | flow_label,
        "version, traffic class, flow label: {header:#x}"
    );
    ensure!(
        frame[20] == 17 && frame[21] == wanted.hop_limit,
        "next header and hop limit {:?}",
        &frame[20..22]
    );
    let source = Ipv6Addr::from(<[u8; 16]>::try_from(&frame[22..38])?);
    let destination = Ipv6Addr::from(<[u8; 16]>::try_from(&frame[38..54])?);
    ensure!(
        source == RELAY6_OUT0 && destination == wanted.group,
        "{source} -> {destination}"
    );
    let payload_len = usize::from(u16::from_be_bytes([frame[18], frame[19]]));
    let mut datagram = frame[54..54 + payload_len].to_vec();
    ensure!(
        datagram[..4] == [4000_u16.to_be_bytes(), wanted.port.to_be_bytes()].concat(),
        "ports {:?}",
        &datagram[..4]
    );
    let checksum = u16::from_be_bytes([datagram[6], datagram[7]]);
    datagram[6..8].copy_from_slice(&[0, 0]);
    let expected = if captured.checksum_pending {
        let len = u32::try_from(datagram.len())?;
        pseudo_header_sum(source, destination, len)
    } else {
        udp_checksum(source, destination, &datagram)
    };
    ensure!(
        checksum == expected,
        "UDP checksum {checksum:#06x}, expected {expected:#06x} (left to the hardware: {})",
        captured.checksum_pending
    );
    Ok(u64::from_be_bytes(datagram[8..16].try_into()?))
}
