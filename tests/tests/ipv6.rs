//! IPv6: rules on IPv6 groups relay to IPv6 and IPv4 outputs, IPv4 rules relay to IPv6
//! outputs, source-specific rules take one sender, and MLD memberships follow the rules. What
//! arrives is checked as in the IPv4 suites: payload, destination, source, hop limit, count
//! and order. `mcr stats`, the metrics endpoint and bpftool show IPv6 rules.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use mcr_tests::{
    Expected, GENERATOR6, GENERATOR6_2, Lab, Mcr, Netns, RELAY_OUT1, RELAY6_OUT0, RELAY6_OUT1,
    Receiver, Receiver6, RulesFile, SINK_2, SINK6, Stream, assert_delivered, in_netns, send_udp,
    wait_for,
};
use serde_json::Value;

fn group(text: &str) -> Ipv6Addr {
    text.parse().expect("a test group")
}

fn expected(destination: impl Into<IpAddr>, source: impl Into<IpAddr>, ttl: u8) -> Expected {
    Expected {
        destination: destination.into(),
        source: source.into(),
        ttl,
    }
}

/// A rule on in0 with `input` (the inside of its `input:` mapping after the interface) and
/// `outputs`, each a flow mapping.
fn rule(name: &str, input: &str, outputs: &[&str]) -> String {
    let mut text =
        format!("  - name: {name}\n    input: {{interface: in0, {input}}}\n    outputs:\n");
    for output in outputs {
        let _ = writeln!(text, "      - {output}");
    }
    text
}

#[test]
fn an_ipv6_group_is_relayed_to_ipv6_and_ipv4_outputs() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    // Translation to IPv4 runs on the workers whatever the test run's path: the rule takes
    // MCR's default.
    let rules = RulesFile::new(&format!(
        "rules:\n{}    path: auto\n",
        rule(
            "studio",
            "group: ff3e::8000:1, port: 5000",
            &[
                "{interface: out0, destination: ff3e::8000:2, port: 6000, hop_limit: 7}",
                "{interface: out1, destination: 239.2.2.6, port: 6001, ttl: 5}",
            ]
        )
    ))?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    ensure!(
        lab.mld_groups("in0")?.contains(&group("ff3e::8000:1")),
        "ff3e::8000:1 not joined on in0: {:?}",
        lab.mld_groups("in0")?
    );
    let v6 = Receiver6::start(&lab.sink, Some(group("ff3e::8000:2")), "sink0", 6000)?;
    let v4 = Receiver::start(&lab.sink_2, Some(Ipv4Addr::new(239, 2, 2, 6)), SINK_2, 6001)?;
    let stream = Stream::new(group("ff3e::8000:1"), 5000, 300, 400).tos(0xb8);
    send_udp(&lab.generator, &stream)?;
    let arrived6 = v6.finish()?;
    let arrived4 = v4.finish()?;
    assert_delivered(
        &arrived6,
        &stream,
        expected(group("ff3e::8000:2"), RELAY6_OUT0, 7),
    )?;
    assert_delivered(
        &arrived4,
        &stream,
        expected(Ipv4Addr::new(239, 2, 2, 6), RELAY_OUT1, 5),
    )?;
    ensure!(
        arrived6.iter().all(|d| d.traffic_class == 0xb8) && arrived4.iter().all(|d| d.tos == 0xb8),
        "the DSCP/ECN byte is carried across families"
    );
    ensure!(
        arrived6.iter().all(|d| d.source.port() == 6000),
        "sent from the output's port"
    );

    let stats = mcr.rule_stats("studio")?;
    assert_eq!(stats["input"], "in0:[ff3e::8000:1]:5000", "{stats}");
    assert_eq!(stats["rx_packets"], 400, "{stats}");
    assert_eq!(stats["outputs"][0]["destination"], "[ff3e::8000:2]:6000");
    assert_eq!(stats["outputs"][0]["tx_packets"], 400, "{stats}");
    assert_eq!(stats["outputs"][0]["tx_bytes"], 120_000, "{stats}");
    assert_eq!(stats["outputs"][1]["tx_packets"], 400, "{stats}");
    assert_eq!(stats["path"], "worker", "{stats}");
    ensure!(
        stats["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("translating between the families")),
        "a rule that translates says why it runs on the workers: {stats}"
    );
    Ok(())
}

#[test]
fn an_ipv4_group_is_relayed_to_an_ipv6_group_and_an_ipv6_host() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(&format!(
        "rules:\n{}    path: auto\n",
        rule(
            "migrate",
            "group: 239.1.1.1, port: 5000",
            &[
                "{interface: out0, destination: ff3e::8000:3, port: 6000, hop_limit: 9}",
                "{destination: 'fd04::2', port: 7000, hop_limit: 4}",
            ]
        )
    ))?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let group_receiver = Receiver6::start(&lab.sink, Some(group("ff3e::8000:3")), "sink0", 6000)?;
    let host_receiver = Receiver6::start(&lab.sink_2, None, "sink1", 7000)?;
    let stream = Stream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 200, 300);
    send_udp(&lab.generator, &stream)?;
    assert_delivered(
        &group_receiver.finish()?,
        &stream,
        expected(group("ff3e::8000:3"), RELAY6_OUT0, 9),
    )?;
    // The kernel routes the unicast output: out1, from its address.
    assert_delivered(
        &host_receiver.finish()?,
        &stream,
        expected("fd04::2".parse::<Ipv6Addr>()?, RELAY6_OUT1, 4),
    )?;
    let stats = mcr.rule_stats("migrate")?;
    assert_eq!(stats["outputs"][1]["destination"], "[fd04::2]:7000");
    assert_eq!(stats["outputs"][1]["tx_packets"], 300, "{stats}");
    Ok(())
}

#[test]
fn an_ipv6_rule_relays_to_a_unicast_host_with_a_correct_checksum() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(&format!(
        "rules:\n{}",
        rule(
            "to-host",
            "group: ff3e::8000:6, port: 5000",
            &["{destination: 'fd02::2', port: 7000}"]
        )
    ))?;
    let _mcr = Mcr::start(&lab.relay, rules.path())?;
    // The receiving stack drops datagrams whose UDP checksum is wrong: every one arriving
    // says the checksum was right.
    let receiver = Receiver6::start(&lab.sink, None, "sink0", 7000)?;
    let stream = Stream::new(group("ff3e::8000:6"), 5000, 333, 300);
    send_udp(&lab.generator, &stream)?;
    assert_delivered(
        &receiver.finish()?,
        &stream,
        expected(SINK6, RELAY6_OUT0, 16),
    )
}

#[test]
fn a_source_specific_ipv6_rule_takes_one_sender() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(&format!(
        "rules:\n{}",
        rule(
            "one-sender",
            "group: ff3e::8000:5, port: 5000, source: 'fd01::1'",
            &["{interface: out0, destination: ff3e::8000:7, port: 6000}"]
        )
    ))?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    // An MLDv2 include-mode membership with the one source: the kernel's source filter.
    let filters = lab.relay.exec("cat", &["/proc/net/mcfilter6"])?;
    let wanted = [
        "in0".to_owned(),
        format!("{:032x}", u128::from(group("ff3e::8000:5"))),
        format!("{:032x}", u128::from(GENERATOR6)),
        "1".to_owned(),
        "0".to_owned(),
    ];
    ensure!(
        filters.lines().any(|line| line
            .split_whitespace()
            .skip(1)
            .eq(wanted.iter().map(String::as_str))),
        "no include filter for fd01::1 on in0:\n{filters}"
    );
    let receiver = Receiver6::start(&lab.sink, Some(group("ff3e::8000:7")), "sink0", 6000)?;
    let wanted = Stream::new(group("ff3e::8000:5"), 5000, 100, 200).from(GENERATOR6);
    let other = Stream::new(group("ff3e::8000:5"), 5000, 120, 200).from(GENERATOR6_2);
    send_udp(&lab.generator, &other)?;
    send_udp(&lab.generator, &wanted)?;
    assert_delivered(
        &receiver.finish()?,
        &wanted,
        expected(group("ff3e::8000:7"), RELAY6_OUT0, 16),
    )?;
    let stats = mcr.rule_stats("one-sender")?;
    assert_eq!(stats["rx_packets"], 200, "{stats}");
    Ok(())
}

#[test]
fn mld_memberships_follow_the_rules() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let two_ports = format!(
        "rules:\n{}{}{}",
        rule(
            "a",
            "group: ff3e::8000:11, port: 5000",
            &["{interface: out0, destination: ff3e::8000:21, port: 6000}"]
        ),
        rule(
            "b",
            "group: ff3e::8000:11, port: 5001",
            &["{interface: out0, destination: ff3e::8000:22, port: 6000}"]
        ),
        rule(
            "c",
            "group: ff3e::8000:12, port: 5000",
            &["{interface: out0, destination: ff3e::8000:23, port: 6000}"]
        ),
    );
    let rules = RulesFile::new(&two_ports)?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let joined = lab.mld_groups("in0")?;
    ensure!(
        joined.contains(&group("ff3e::8000:11")) && joined.contains(&group("ff3e::8000:12")),
        "{joined:?}"
    );
    // Rule b goes: a still needs ff3e::8000:11. Rule c goes: its group is left.
    let only_a = format!(
        "rules:\n{}",
        rule(
            "a",
            "group: ff3e::8000:11, port: 5000",
            &["{interface: out0, destination: ff3e::8000:21, port: 6000}"]
        )
    );
    rules.write(&only_a)?;
    mcr.cli(&["reload"])?;
    let joined = lab.mld_groups("in0")?;
    ensure!(
        joined.contains(&group("ff3e::8000:11")),
        "left a group another rule needs: {joined:?}"
    );
    ensure!(
        !joined.contains(&group("ff3e::8000:12")),
        "kept a group no rule needs: {joined:?}"
    );
    Ok(())
}

#[test]
fn an_ipv6_rule_whose_outputs_are_ipv6_takes_the_kernel_path() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(&format!(
        "rules:\n{}    path: kernel\n",
        rule(
            "fast",
            "group: ff3e::8000:31, port: 5000",
            &["{interface: out0, destination: ff3e::8000:32, port: 6000, hop_limit: 3}"]
        )
    ))?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    mcr.wait_for_path("kernel")?;
    let receiver = Receiver6::start(&lab.sink, Some(group("ff3e::8000:32")), "sink0", 6000)?;
    let stream = Stream::new(group("ff3e::8000:31"), 5000, 500, 300);
    send_udp(&lab.generator, &stream)?;
    assert_delivered(
        &receiver.finish()?,
        &stream,
        expected(group("ff3e::8000:32"), RELAY6_OUT0, 3),
    )?;
    let stats = mcr.rule_stats("fast")?;
    assert_eq!(stats["outputs"][0]["tx_packets"], 300, "{stats}");
    Ok(())
}

const METRICS: &str = "127.0.0.1:9436";

/// The exposition `GET /metrics` returns from inside `netns`.
fn scrape(netns: &Netns) -> anyhow::Result<String> {
    let address: SocketAddr = METRICS.parse()?;
    let raw = in_netns(netns, || -> anyhow::Result<String> {
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: mcr\r\n\r\n")?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw)?;
        Ok(raw)
    })??;
    Ok(raw)
}

/// The value of the sample whose line starts with `series` (name and labels, as written).
fn sample(exposition: &str, series: &str) -> Option<u64> {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn ipv6_rules_read_as_addresses_in_stats_metrics_and_bpftool() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(&format!(
        "settings:\n  metrics:\n    listen: {METRICS}\nrules:\n{}    path: auto\n",
        rule(
            "shown",
            &format!("group: ff3e::8000:41, source: {GENERATOR6}, port: 5000"),
            &[
                "{interface: out0, destination: ff3e::8000:42, port: 6000}",
                "{interface: out1, destination: 239.2.2.41, port: 6000}",
            ]
        )
    ))?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let receiver = Receiver6::start(&lab.sink, Some(group("ff3e::8000:42")), "sink0", 6000)?;
    let stream = Stream::new(group("ff3e::8000:41"), 5000, 100, 50).from(GENERATOR6);
    send_udp(&lab.generator, &stream)?;
    assert_delivered(
        &receiver.finish()?,
        &stream,
        expected(group("ff3e::8000:42"), RELAY6_OUT0, 16),
    )?;

    let input = format!("in0:[ff3e::8000:41]:5000 from {GENERATOR6}");
    let json = mcr.rule_stats("shown")?;
    assert_eq!(json["input"], input.as_str(), "{json}");
    let text = mcr.cli(&["stats"])?;
    for shown in [
        input.as_str(),
        "out0:[ff3e::8000:42]:6000",
        "out1:239.2.2.41:6000",
    ] {
        ensure!(
            text.contains(shown),
            "mcr stats does not show {shown}:\n{text}"
        );
    }
    // `mcr status` names rules, not their flows; the rule translates, so it takes the workers
    // whatever the test run's path, and the reason names the IPv4 output.
    let status = mcr.cli(&["status"])?;
    ensure!(
        status.contains("shown  active, worker path: output out1:239.2.2.41:6000 is IPv4"),
        "mcr status does not say why the rule runs on the workers:\n{status}"
    );

    let series = format!("mcr_rule_received_packets_total{{rule=\"shown\",input=\"{input}\"}}");
    let exposition = wait_for(Duration::from_secs(3), || {
        let exposition = scrape(&lab.relay).ok()?;
        (sample(&exposition, &series) == Some(50)).then_some(exposition)
    });
    ensure!(
        exposition.is_some(),
        "no {series} 50 in the metrics:\n{}",
        scrape(&lab.relay).unwrap_or_default()
    );

    // bpftool reads the rule from the pinned IPv6 map: the group and source as bytes, the
    // port in host order.
    let dump = mcr.bpftool_dump("MCR_RULES6")?;
    let octets = |address: Ipv6Addr| -> Vec<Value> {
        address.octets().iter().map(|&b| Value::from(b)).collect()
    };
    let key = dump
        .iter()
        .map(|entry| &entry["key"])
        .find(|key| key["group"] == Value::from(octets(group("ff3e::8000:41"))))
        .with_context(|| format!("the rule is not in MCR_RULES6: {dump:?}"))?;
    assert_eq!(key["source"], Value::from(octets(GENERATOR6)), "{key}");
    assert_eq!(key["port"], 5000, "{key}");
    Ok(())
}
