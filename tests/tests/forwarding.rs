//! MCR relays: what arrives at the sinks is exactly what was sent, re-addressed as the rules
//! say, from the relay's own address, with the configured TTL, in order, once, and without a
//! stall.

use std::{fmt::Write as _, net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, ensure};
use mcr_tests::{
    Delays, Expected, GENERATOR, GENERATOR_2, Lab, Mcr, RELAY_OUT0, RELAY_OUT1, Receiver,
    RulesFile, SINK, SINK_2, SteadyStream, Stream, assert_delivered, send_concurrently,
    send_steady, send_udp,
};

/// What a stream relayed to `destination` from `source` with `ttl` looks like.
fn expected(destination: Ipv4Addr, source: Ipv4Addr, ttl: u8) -> Expected {
    Expected {
        destination: destination.into(),
        source: source.into(),
        ttl,
    }
}

fn rule(name: &str, group: &str, port: u16, outputs: &[&str]) -> String {
    let mut text = format!(
        "  - name: {name}\n    input: {{interface: in0, group: {group}, port: {port}}}\n    outputs:\n"
    );
    for output in outputs {
        let _ = writeln!(text, "      - {output}");
    }
    text
}

#[test]
fn one_to_one_with_translation() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(&format!(
        "rules:\n{}",
        rule(
            "cam",
            "239.1.1.1",
            5000,
            &["{interface: out0, destination: 239.2.2.1, port: 6000, ttl: 7}"]
        )
    ))?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    ensure!(
        lab.igmp_groups("in0")?
            .contains(&Ipv4Addr::new(239, 1, 1, 1)),
        "239.1.1.1 not joined on in0"
    );
    let receiver = Receiver::start(&lab.sink, Some(Ipv4Addr::new(239, 2, 2, 1)), SINK, 6000)?;
    let stream = Stream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 300, 500);
    send_udp(&lab.generator, &stream)?;
    let arrived = receiver.finish()?;
    assert_delivered(
        &arrived,
        &stream,
        expected(Ipv4Addr::new(239, 2, 2, 1), RELAY_OUT0, 7),
    )?;

    let stats = mcr.rule_stats("cam")?;
    assert_eq!(stats["rx_packets"], 500, "{stats}");
    assert_eq!(stats["outputs"][0]["tx_packets"], 500, "{stats}");
    assert_eq!(stats["outputs"][0]["tx_bytes"], 150_000, "{stats}");
    assert_eq!(stats["outputs"][0]["tx_errors"], 0, "{stats}");
    Ok(())
}

#[test]
fn fan_out_to_three_outputs_on_two_interfaces() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(&format!(
        "rules:\n{}",
        rule(
            "fan",
            "239.1.1.1",
            5000,
            &[
                "{interface: out0, destination: 239.2.2.1, port: 6000}",
                "{interface: out0, destination: 239.2.2.2, port: 6001, ttl: 3}",
                "{interface: out1, destination: 239.3.3.1, port: 6000, ttl: 9}",
            ]
        )
    ))?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let a = Receiver::start(&lab.sink, Some(Ipv4Addr::new(239, 2, 2, 1)), SINK, 6000)?;
    let b = Receiver::start(&lab.sink, Some(Ipv4Addr::new(239, 2, 2, 2)), SINK, 6001)?;
    let c = Receiver::start(&lab.sink_2, Some(Ipv4Addr::new(239, 3, 3, 1)), SINK_2, 6000)?;
    let stream = Stream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 1000, 400);
    send_udp(&lab.generator, &stream)?;
    assert_delivered(
        &a.finish()?,
        &stream,
        expected(Ipv4Addr::new(239, 2, 2, 1), RELAY_OUT0, 16),
    )?;
    assert_delivered(
        &b.finish()?,
        &stream,
        expected(Ipv4Addr::new(239, 2, 2, 2), RELAY_OUT0, 3),
    )?;
    assert_delivered(
        &c.finish()?,
        &stream,
        expected(Ipv4Addr::new(239, 3, 3, 1), RELAY_OUT1, 9),
    )?;
    let stats = mcr.rule_stats("fan")?;
    for output in 0..3 {
        assert_eq!(stats["outputs"][output]["tx_packets"], 400, "{stats}");
    }
    Ok(())
}

#[test]
fn multicast_to_unicast() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(&format!(
        "rules:\n{}",
        rule(
            "uni",
            "239.1.1.1",
            5000,
            &["{destination: 10.2.0.2, port: 7000, ttl: 5}"]
        )
    ))?;
    let _mcr = Mcr::start(&lab.relay, rules.path())?;
    let receiver = Receiver::start(&lab.sink, None, SINK, 7000)?;
    let stream = Stream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 200, 300);
    send_udp(&lab.generator, &stream)?;
    assert_delivered(&receiver.finish()?, &stream, expected(SINK, RELAY_OUT0, 5))
}

#[test]
fn source_specific_rule_relays_only_its_sender() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(
        "rules:\n  - name: ssm\n    input: {interface: in0, group: 239.1.1.5, port: 5000, source: 10.1.0.1}\n    outputs:\n      - {interface: out0, destination: 239.2.2.5, port: 6000}\n",
    )?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let receiver = Receiver::start(&lab.sink, Some(Ipv4Addr::new(239, 2, 2, 5)), SINK, 6000)?;
    let wanted = Stream::new(Ipv4Addr::new(239, 1, 1, 5), 5000, 100, 200).from(GENERATOR);
    let other = Stream::new(Ipv4Addr::new(239, 1, 1, 5), 5000, 120, 200).from(GENERATOR_2);
    send_udp(&lab.generator, &other)?;
    send_udp(&lab.generator, &wanted)?;
    assert_delivered(
        &receiver.finish()?,
        &wanted,
        expected(Ipv4Addr::new(239, 2, 2, 5), RELAY_OUT0, 16),
    )?;
    assert_eq!(mcr.rule_stats("ssm")?["rx_packets"], 200);
    Ok(())
}

/// `flows` rules named `{name}{k}`, each relaying `239.{input}.k:5000` on in0 to
/// `239.{output}.k:6000` on out0.
fn many_rules(name: &str, flows: u8, input: [u8; 2], output: [u8; 2]) -> String {
    (1..=flows)
        .map(|k| {
            rule(
                &format!("{name}{k}"),
                &format!("239.{}.{}.{k}", input[0], input[1]),
                5000,
                &[&format!(
                    "{{interface: out0, destination: 239.{}.{}.{k}, port: 6000}}",
                    output[0], output[1]
                )],
            )
        })
        .collect()
}

/// Sends `count` datagrams on each of the flows of [`many_rules`] from `senders` threads at
/// once and checks that every flow arrives whole, in order and once.
fn relay_many_flows(
    lab: &Lab,
    flows: u8,
    input: [u8; 2],
    output: [u8; 2],
    count: u64,
    senders: usize,
) -> anyhow::Result<()> {
    let group = |prefix: [u8; 2], k: u8| Ipv4Addr::new(239, prefix[0], prefix[1], k);
    let receivers = (1..=flows)
        .map(|k| Receiver::start(&lab.sink, Some(group(output, k)), SINK, 6000))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let streams: Vec<Stream> = (1..=flows)
        .map(|k| Stream::new(group(input, k), 5000, 400, count))
        .collect();
    send_concurrently(&lab.generator, &streams, senders)?;
    for (k, (receiver, stream)) in (1..=flows).zip(receivers.into_iter().zip(&streams)) {
        let expected = expected(group(output, k), RELAY_OUT0, 16);
        assert_delivered(&receiver.finish()?, stream, expected)
            .with_context(|| format!("flow {k}"))?;
    }
    Ok(())
}

#[test]
fn fifty_rules_with_concurrent_streams() -> anyhow::Result<()> {
    const RULES: u8 = 50;
    let lab = Lab::new()?;
    let rules = RulesFile::new(&format!(
        "rules:\n{}",
        many_rules("r", RULES, [1, 2], [5, 2])
    ))?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let joined = lab.igmp_groups("in0")?;
    for k in 1..=RULES {
        ensure!(
            joined.contains(&Ipv4Addr::new(239, 1, 2, k)),
            "239.1.2.{k} not joined"
        );
    }
    relay_many_flows(&lab, RULES, [1, 2], [5, 2], 200, 5)?;
    let stats = mcr.stats()?;
    ensure!(stats.len() == usize::from(RULES));
    for rule in &stats {
        assert_eq!(rule["outputs"][0]["tx_packets"], 200, "{rule}");
    }
    Ok(())
}

#[test]
fn two_workers_keep_each_flow_whole_and_in_order() -> anyhow::Result<()> {
    const FLOWS: u8 = 8;
    let lab = Lab::new()?;
    // Steering to workers is what this tests: the worker path, whatever MCR_TEST_PATH says.
    let rules = RulesFile::new(&format!(
        "settings:\n  workers: 2\n  path: worker\nrules:\n{}",
        many_rules("f", FLOWS, [1, 3], [6, 3])
    ))?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    relay_many_flows(&lab, FLOWS, [1, 3], [6, 3], 500, 4)?;
    let workers = mcr.workers()?;
    assert_eq!(workers.len(), 2);
    let total: u64 = workers
        .iter()
        .map(|w| w["received"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(total, u64::from(FLOWS) * 500, "{workers:?}");
    for worker in &workers {
        ensure!(
            worker["received"].as_u64() > Some(0),
            "a worker got no flow: {workers:?}"
        );
    }
    Ok(())
}

#[test]
fn non_matching_traffic_never_reaches_a_worker() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(&format!(
        "rules:\n{}",
        rule(
            "only",
            "239.1.1.1",
            5000,
            &["{interface: out0, destination: 239.2.2.1, port: 6000}"]
        )
    ))?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let receiver = Receiver::start(&lab.sink, Some(Ipv4Addr::new(239, 2, 2, 1)), SINK, 6000)?;
    send_udp(
        &lab.generator,
        &Stream::new(Ipv4Addr::new(239, 1, 1, 1), 5001, 100, 300),
    )?;
    send_udp(
        &lab.generator,
        &Stream::new(Ipv4Addr::new(239, 1, 1, 2), 5000, 100, 300),
    )?;
    send_udp(
        &lab.generator,
        &Stream::new(Ipv4Addr::new(239, 9, 9, 9), 6000, 100, 300),
    )?;
    // The positive control: the rule's own stream (default output TTL 16), sent last,
    // arrives complete. Without it a relay that forwards nothing at all would pass.
    let matching = Stream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 100, 300);
    send_udp(&lab.generator, &matching)?;
    let arrived = receiver.finish()?;
    assert_delivered(
        &arrived,
        &matching,
        expected(Ipv4Addr::new(239, 2, 2, 1), RELAY_OUT0, 16),
    )
    .context("only the matching stream must arrive, all of it")?;
    let stats = mcr.rule_stats("only")?;
    assert_eq!(stats["rx_packets"], matching.count, "{stats}");
    assert_eq!(stats["outputs"][0]["tx_packets"], matching.count, "{stats}");
    // On the kernel path no packet needs a worker at all.
    let at_workers = if stats["path"] == "kernel" {
        0
    } else {
        matching.count
    };
    let workers = mcr.workers()?;
    let worker_packets: u64 = workers
        .iter()
        .map(|worker| worker["received"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        worker_packets, at_workers,
        "workers must receive the matching stream on the worker path and nothing else: {workers:?}"
    );
    for worker in &workers {
        assert_eq!(worker["kernel_drops"], 0, "{worker}");
    }
    Ok(())
}

#[test]
fn the_dscp_and_ecn_byte_is_carried_or_set_per_output() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(&format!(
        "rules:\n{}",
        rule(
            "qos",
            "239.1.1.1",
            5000,
            &[
                "{interface: out0, destination: 239.2.2.1, port: 6000}",
                "{interface: out0, destination: 239.2.2.2, port: 6000, dscp: 34}",
                "{destination: 10.2.0.2, port: 7000}",
                "{destination: 10.2.0.2, port: 7001, dscp: 10}",
            ]
        )
    ))?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let receivers = [
        Receiver::start(&lab.sink, Some(Ipv4Addr::new(239, 2, 2, 1)), SINK, 6000)?,
        Receiver::start(&lab.sink, Some(Ipv4Addr::new(239, 2, 2, 2)), SINK, 6000)?,
        Receiver::start(&lab.sink, None, SINK, 7000)?,
        Receiver::start(&lab.sink, None, SINK, 7001)?,
    ];
    // EF (DSCP 46) with ECT(1): 0xb9.
    let stream = Stream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 100, 200).tos(0xb9);
    send_udp(&lab.generator, &stream)?;
    // Carried whole; or the output's DSCP with the input's ECN bits.
    let wanted = [0xb9, (34 << 2) | 1, 0xb9, (10 << 2) | 1];
    for (output, (receiver, tos)) in receivers.into_iter().zip(wanted).enumerate() {
        let arrived = receiver.finish()?;
        ensure!(
            arrived.len() as u64 == stream.count,
            "output {output}: {} of {} arrived",
            arrived.len(),
            stream.count
        );
        for datagram in &arrived {
            ensure!(
                datagram.tos == tos,
                "output {output}: TOS {:#04x} instead of {tos:#04x}",
                datagram.tos
            );
        }
    }
    let stats = mcr.rule_stats("qos")?;
    assert_eq!(stats["outputs"][1]["dscp"], 34, "{stats}");
    assert_eq!(
        stats["outputs"][0]["dscp"],
        serde_json::Value::Null,
        "{stats}"
    );
    Ok(())
}

#[test]
fn jumbo_datagrams_are_relayed_whole() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    for (netns, interface) in [
        (&lab.generator, "gen0"),
        (&lab.relay, "in0"),
        (&lab.relay, "out0"),
        (&lab.sink, "sink0"),
    ] {
        netns.ip(&["link", "set", interface, "mtu", "9000"])?;
    }
    let rules = RulesFile::new(&format!(
        "rules:\n{}",
        rule(
            "jumbo",
            "239.1.1.1",
            5000,
            &[
                "{interface: out0, destination: 239.2.2.1, port: 6000}",
                "{destination: 10.2.0.2, port: 7000}",
            ]
        )
    ))?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let multicast = Receiver::start(&lab.sink, Some(Ipv4Addr::new(239, 2, 2, 1)), SINK, 6000)?;
    let unicast = Receiver::start(&lab.sink, None, SINK, 7000)?;
    // 8,000 bytes of payload: one 8,028-byte IPv4 packet, far past a 2 KiB buffer.
    let stream = Stream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 8000, 300);
    send_udp(&lab.generator, &stream)?;
    assert_delivered(
        &multicast.finish()?,
        &stream,
        expected(Ipv4Addr::new(239, 2, 2, 1), RELAY_OUT0, 16),
    )?;
    assert_delivered(&unicast.finish()?, &stream, expected(SINK, RELAY_OUT0, 16))?;
    let workers = mcr.workers()?;
    for worker in &workers {
        assert_eq!(worker["too_big"], 0, "{worker}");
    }
    let stats = mcr.rule_stats("jumbo")?;
    assert_eq!(
        stats["to_worker"], 0,
        "an MTU of 9000 carries them: {stats}"
    );
    Ok(())
}

/// The most one datagram of a steady stream may take from its sender's stamp to the sink's
/// kernel: far above what relaying costs (microseconds) and what a shared CI machine adds, far
/// below what a worker that stalls for real holds every packet behind it for.
const STALL_BOUND: Duration = Duration::from_millis(50);

#[test]
fn a_steady_stream_crosses_the_relay_without_a_stall() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(&format!(
        "rules:\n{}",
        rule(
            "steady",
            "239.1.1.1",
            5000,
            &["{interface: out0, destination: 239.2.2.1, port: 6000}"]
        )
    ))?;
    let _mcr = Mcr::start(&lab.relay, rules.path())?;
    let receiver = Receiver::start(&lab.sink, Some(Ipv4Addr::new(239, 2, 2, 1)), SINK, 6000)?;
    // 10,000 datagrams at 5,000 a second: two seconds of a moderate stream.
    let stream = SteadyStream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 200, 10_000, 5_000.0);
    send_steady(&lab.generator, &stream)?;
    let arrived = receiver.finish()?;
    ensure!(
        arrived.len() == 10_000,
        "{} of 10,000 datagrams arrived",
        arrived.len()
    );
    ensure!(
        arrived
            .iter()
            .zip(0..)
            .all(|(datagram, sequence)| datagram.sequence() == Some(sequence)),
        "datagrams arrived out of order"
    );
    // Sender's stamp to the sink: the relay's time plus two veth hops and the sender's stack,
    // so this bounds what the relay adds from above.
    let delays = Delays::of(&arrived)?;
    eprintln!("{delays}");
    ensure!(delays.max < STALL_BOUND, "a stall: {delays}");
    Ok(())
}
