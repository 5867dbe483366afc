//! The kernel path: rules whose outputs the classifier writes itself. What only this path
//! has: 64 outputs in one rule, per-rule paths and the reasons a rule runs on its worker,
//! next hops followed as they resolve and change, switching paths while a stream runs,
//! packets too long for an output handed to the worker, and local delivery (on both paths). (The forwarding
//! and reload suites run on this path too, with `MCR_TEST_PATH=kernel`.)

use std::{collections::HashSet, fmt::Write as _, net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, ensure};
use mcr_tests::{
    Datagram, Expected, GENERATOR, Lab, Mcr, RELAY_OUT0, Receiver, RulesFile, SINK, Stream,
    assert_delivered, send_udp, wait_for,
};

const INPUT: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);
/// The relay's address on in0, where a local application joins the input group.
const RELAY_IN0: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);

fn rule(name: &str, extra: &str, outputs: &[String]) -> String {
    let mut text = format!(
        "  - name: {name}\n    input: {{interface: in0, group: 239.1.1.1, port: 5000}}\n{extra}    outputs:\n"
    );
    for output in outputs {
        let _ = writeln!(text, "      - {output}");
    }
    text
}

/// Waits until rule `name` is active on `path`; returns its stats.
fn wait_for_rule_path(mcr: &Mcr, name: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    wait_for(Duration::from_secs(5), || {
        let stats = mcr.rule_stats(name).ok()?;
        (stats["state"] == "active" && stats["path"] == path).then_some(stats)
    })
    .with_context(|| {
        format!(
            "{name} never ran on the {path} path: {:?}",
            mcr.rule_stats(name)
        )
    })
}

#[test]
fn a_rule_with_sixty_four_outputs_runs_in_the_kernel() -> anyhow::Result<()> {
    const OUTPUTS: u8 = 64;
    let lab = Lab::new()?;
    let group = |k: u8| Ipv4Addr::new(239, 9, 0, k);
    let outputs: Vec<String> = (1..=OUTPUTS)
        .map(|k| {
            format!(
                "{{interface: out0, destination: {}, port: 6000, ttl: {k}}}",
                group(k)
            )
        })
        .collect();
    let file = RulesFile::new(&format!(
        "settings:\n  path: kernel\nrules:\n{}",
        rule("wide", "", &outputs)
    ))?;
    let mcr = Mcr::start(&lab.relay, file.path())?;
    wait_for_rule_path(&mcr, "wide", "kernel")?;
    let receivers = (1..=OUTPUTS)
        .map(|k| Receiver::start(&lab.sink, Some(group(k)), SINK, 6000))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let stream = Stream::new(INPUT, 5000, 300, 200);
    send_udp(&lab.generator, &stream)?;
    for (k, receiver) in (1..=OUTPUTS).zip(receivers) {
        let expected = Expected {
            destination: group(k).into(),
            source: RELAY_OUT0.into(),
            ttl: k,
        };
        assert_delivered(&receiver.finish()?, &stream, expected)
            .with_context(|| format!("output {k}"))?;
    }
    let stats = mcr.rule_stats("wide")?;
    assert_eq!(stats["rx_packets"], 200, "{stats}");
    for (k, output) in stats["outputs"]
        .as_array()
        .context("outputs")?
        .iter()
        .enumerate()
    {
        assert_eq!(output["tx_packets"], 200, "output {k}: {output}");
        assert_eq!(output["tx_bytes"], 200 * 300, "output {k}: {output}");
        assert_eq!(output["tx_errors"], 0, "output {k}: {output}");
    }
    assert_eq!(
        mcr.workers_total("received")?,
        0,
        "no packet needed a worker"
    );
    Ok(())
}

#[test]
fn each_rule_says_which_path_it_takes_and_why() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let multicast = "{interface: out0, destination: 239.2.2.1, port: 6000}".to_owned();
    let nobody = "{interface: out0, destination: 10.2.0.99, port: 7000}".to_owned();
    let file = RulesFile::new(&format!(
        "rules:\n{}{}{}",
        rule("auto", "", std::slice::from_ref(&multicast)),
        rule(
            "pinned",
            "    path: worker\n",
            &[multicast.replace("6000", "6001")]
        )
        .replace("port: 5000", "port: 5001"),
        rule(
            "lonely",
            "    path: kernel\n",
            std::slice::from_ref(&nobody)
        )
        .replace("port: 5000", "port: 5002"),
    ))?;
    let mcr = Mcr::start(&lab.relay, file.path())?;
    let auto = wait_for_rule_path(&mcr, "auto", "kernel")?;
    ensure!(auto.get("reason").is_none(), "{auto}");
    let pinned = mcr.rule_stats("pinned")?;
    assert_eq!(pinned["path"], "worker", "{pinned}");
    ensure!(
        pinned.get("reason").is_none(),
        "asked for, no reason needed: {pinned}"
    );
    let lonely = mcr.rule_stats("lonely")?;
    assert_eq!(
        lonely["state"], "active",
        "a kernel rule that cannot is not rejected"
    );
    assert_eq!(lonely["path"], "worker", "{lonely}");
    assert_eq!(
        lonely["reason"], "next hop 10.2.0.99 not resolved on out0",
        "{lonely}"
    );
    let status = mcr.status()?;
    assert_eq!(status["rules"]["kernel"], 1, "{status}");
    let rule_states = status["rule_states"].as_array().context("rule_states")?;
    assert_eq!(rule_states.len(), 3, "{status}");
    assert_eq!(rule_states[2]["name"], "lonely");
    assert_eq!(rule_states[2]["path"], "worker");
    assert_eq!(
        rule_states[2]["reason"],
        "next hop 10.2.0.99 not resolved on out0"
    );
    let text = mcr.cli(&["status"])?;
    ensure!(
        text.contains("active, worker path: next hop 10.2.0.99 not resolved on out0"),
        "{text}"
    );
    let table = mcr.cli(&["stats"])?;
    ensure!(
        table.contains("lonely runs on the worker: next hop 10.2.0.99 not resolved on out0"),
        "{table}"
    );

    // The next hop appears. The rule's worker sends make the kernel resolve it, as any
    // sender's would, and the rule moves to the kernel path without a restart.
    lab.sink
        .ip(&["addr", "add", "10.2.0.99/24", "dev", "sink0"])?;
    let to_nobody = |count| -> anyhow::Result<()> {
        let receiver = Receiver::start(&lab.sink, None, Ipv4Addr::new(10, 2, 0, 99), 7000)?;
        let stream = Stream::new(INPUT, 5002, 100, count);
        send_udp(&lab.generator, &stream)?;
        let expected = Expected {
            destination: Ipv4Addr::new(10, 2, 0, 99).into(),
            source: RELAY_OUT0.into(),
            ttl: 16,
        };
        assert_delivered(&receiver.finish()?, &stream, expected)
    };
    to_nobody(50)?;
    let lonely = wait_for_rule_path(&mcr, "lonely", "kernel")?;
    ensure!(lonely.get("reason").is_none(), "{lonely}");
    let before = mcr.workers_total("received")?;
    to_nobody(200)?;
    assert_eq!(
        mcr.workers_total("received")?,
        before,
        "the resolved rule runs in the kernel"
    );
    assert_eq!(mcr.rule_stats("lonely")?["outputs"][0]["tx_packets"], 250);
    Ok(())
}

/// The MAC address of `interface` in `netns`.
fn mac_of(lab: &Lab, interface: &str) -> anyhow::Result<String> {
    let text = lab.sink.ip(&["-j", "link", "show", interface])?;
    let links: serde_json::Value = serde_json::from_str(&text)?;
    links[0]["address"]
        .as_str()
        .map(ToOwned::to_owned)
        .context("no address")
}

#[test]
fn a_next_hop_that_changes_its_mac_is_followed() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let sink_mac = mac_of(&lab, "sink0")?;
    let file = RulesFile::new(&format!(
        "settings:\n  path: kernel\nrules:\n{}",
        rule(
            "uni",
            "",
            &["{destination: 10.2.0.2, port: 7000, ttl: 5}".to_owned()]
        )
    ))?;
    let mcr = Mcr::start(&lab.relay, file.path())?;
    wait_for_rule_path(&mcr, "uni", "kernel")?;
    let relay = |count| -> anyhow::Result<Vec<Datagram>> {
        let receiver = Receiver::start(&lab.sink, None, SINK, 7000)?;
        send_udp(&lab.generator, &Stream::new(INPUT, 5000, 100, count))?;
        receiver.finish()
    };
    ensure!(relay(100)?.len() == 100, "not relayed to begin with");

    // Another host takes the sink's address over: frames go to its MAC, which the sink
    // ignores.
    lab.relay.ip(&[
        "neigh",
        "replace",
        "10.2.0.2",
        "lladdr",
        "02:00:00:00:00:42",
        "dev",
        "out0",
        "nud",
        "permanent",
    ])?;
    let moved = wait_for(Duration::from_secs(5), || {
        let received = relay(20).ok()?;
        received.is_empty().then_some(())
    });
    ensure!(moved.is_some(), "the new MAC was never used");
    wait_for_rule_path(&mcr, "uni", "kernel")?;

    // And back: the sink gets the stream again, whole, without a restart.
    lab.relay.ip(&[
        "neigh",
        "replace",
        "10.2.0.2",
        "lladdr",
        &sink_mac,
        "dev",
        "out0",
        "nud",
        "permanent",
    ])?;
    let back = wait_for(Duration::from_secs(5), || {
        (relay(20).ok()?.len() == 20).then_some(())
    });
    ensure!(back.is_some(), "the sink's MAC was never used again");
    let receiver = Receiver::start(&lab.sink, None, SINK, 7000)?;
    let stream = Stream::new(INPUT, 5000, 100, 300);
    send_udp(&lab.generator, &stream)?;
    let expected = Expected {
        destination: SINK.into(),
        source: RELAY_OUT0.into(),
        ttl: 5,
    };
    assert_delivered(&receiver.finish()?, &stream, expected)
}

#[test]
fn switching_paths_under_a_stream_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let output = ["{interface: out0, destination: 239.2.2.1, port: 6000}".to_owned()];
    let on = |path: &str| rule("cam", &format!("    path: {path}\n"), &output);
    let file = RulesFile::new(&format!("rules:\n{}", on("kernel")))?;
    let mcr = Mcr::start(&lab.relay, file.path())?;
    wait_for_rule_path(&mcr, "cam", "kernel")?;
    let receiver = Receiver::start(&lab.sink, Some(Ipv4Addr::new(239, 2, 2, 1)), SINK, 6000)?;
    // About 2.5 s of traffic while the rule changes path ten times.
    let stream = Stream::new(INPUT, 5000, 200, 4000).paced(Duration::from_millis(20));
    let mut paths = Vec::new();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let sender = scope.spawn(|| send_udp(&lab.generator, &stream));
        for round in 0..10 {
            let path = if round % 2 == 0 { "worker" } else { "kernel" };
            file.write(&format!("rules:\n{}", on(path)))?;
            let reloaded = mcr.cli_output(&["reload"])?;
            ensure!(reloaded.status.success(), "reload {round}: {reloaded:?}");
            paths.push(mcr.rule_stats("cam")?["path"].clone());
            std::thread::sleep(Duration::from_millis(200));
        }
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("the sender panicked"))?
    })?;
    assert_eq!(
        paths,
        ["worker", "kernel"].repeat(5),
        "each reload moves the rule"
    );
    let arrived = receiver.finish()?;
    let mut seen = HashSet::new();
    for datagram in &arrived {
        let sequence = datagram.sequence().context("no sequence")?;
        ensure!(seen.insert(sequence), "datagram {sequence} arrived twice");
        ensure!(datagram.ttl == 16 && *datagram.source.ip() == RELAY_OUT0);
    }
    assert_eq!(
        seen.len() as u64,
        stream.count,
        "every datagram arrives once"
    );
    let reordered = arrived
        .windows(2)
        .filter(|pair| pair[1].sequence() < pair[0].sequence())
        .count();
    eprintln!("{reordered} datagrams overtook an earlier one across the switches");
    let stats = mcr.rule_stats("cam")?;
    assert_eq!(stats["outputs"][0]["tx_packets"], 4000, "{stats}");
    Ok(())
}

#[test]
fn a_packet_too_long_for_an_output_is_relayed_by_the_worker() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    lab.relay.ip(&["link", "set", "out0", "mtu", "1000"])?;
    let file = RulesFile::new(&format!(
        "settings:\n  path: kernel\nrules:\n{}",
        rule(
            "uni",
            "",
            &["{destination: 10.2.0.2, port: 7000}".to_owned()]
        )
    ))?;
    let mcr = Mcr::start(&lab.relay, file.path())?;
    wait_for_rule_path(&mcr, "uni", "kernel")?;
    let expected = Expected {
        destination: SINK.into(),
        source: RELAY_OUT0.into(),
        ttl: 16,
    };
    for (payload, count) in [(1200, 100), (500, 200)] {
        let receiver = Receiver::start(&lab.sink, None, SINK, 7000)?;
        let stream = Stream::new(INPUT, 5000, payload, count);
        send_udp(&lab.generator, &stream)?;
        assert_delivered(&receiver.finish()?, &stream, expected)
            .with_context(|| format!("{payload}-byte payloads"))?;
    }
    let stats = mcr.rule_stats("uni")?;
    assert_eq!(stats["path"], "kernel", "{stats}");
    assert_eq!(stats["rx_packets"], 300, "{stats}");
    assert_eq!(stats["to_worker"], 100, "only the long ones: {stats}");
    assert_eq!(stats["outputs"][0]["tx_packets"], 300, "{stats}");
    assert_eq!(mcr.workers_total("received")?, 100);
    Ok(())
}

/// Sends 200 datagrams to rule `cam`'s input (239.1.1.1:5000) and checks that the sink got
/// each, relayed to 239.2.2.1:6000 from the relay's out0 with TTL 16; returns what was sent.
fn assert_camera_relayed(lab: &Lab) -> anyhow::Result<Stream> {
    let sink = Receiver::start(&lab.sink, Some(Ipv4Addr::new(239, 2, 2, 1)), SINK, 6000)?;
    let stream = Stream::new(INPUT, 5000, 100, 200).from(GENERATOR);
    send_udp(&lab.generator, &stream)?;
    let relayed = Expected {
        destination: Ipv4Addr::new(239, 2, 2, 1).into(),
        source: RELAY_OUT0.into(),
        ttl: 16,
    };
    assert_delivered(&sink.finish()?, &stream, relayed)?;
    Ok(stream)
}

#[test]
fn a_reload_of_settings_path_moves_the_rules_at_once_and_says_no_restart() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let output = ["{interface: out0, destination: 239.2.2.1, port: 6000}".to_owned()];
    let file_on = |path: &str| {
        format!(
            "settings:\n  path: {path}\nrules:\n{}",
            rule("cam", "", &output)
        )
    };
    let file = RulesFile::new(&file_on("kernel"))?;
    let mcr = Mcr::start(&lab.relay, file.path())?;
    wait_for_rule_path(&mcr, "cam", "kernel")?;
    file.write(&file_on("worker"))?;
    mcr.cli(&["reload"])?;
    wait_for_rule_path(&mcr, "cam", "worker")?;
    assert_camera_relayed(&lab)?;
    let log = mcr.log_text();
    ensure!(
        !log.contains("until mcr restarts"),
        "the reload applied settings.path but said it waits for a restart:\n{log}"
    );
    Ok(())
}

#[test]
fn local_delivery_gives_the_host_the_input_as_it_arrived() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let output = ["{interface: out0, destination: 239.2.2.1, port: 6000}".to_owned()];
    for (path, local) in [
        ("kernel", false),
        ("kernel", true),
        ("worker", false),
        ("worker", true),
    ] {
        let file = RulesFile::new(&format!(
            "settings:\n  path: {path}\nrules:\n{}",
            rule("cam", &format!("    local_delivery: {local}\n"), &output)
        ))?;
        let mcr = Mcr::start(&lab.relay, file.path())?;
        wait_for_rule_path(&mcr, "cam", path)?;
        // An application on the relay host that listens to the input group.
        let local_app = Receiver::start(&lab.relay, Some(INPUT), RELAY_IN0, 5000)?;
        let stream = assert_camera_relayed(&lab)
            .with_context(|| format!("sink, {path} path, local_delivery {local}"))?;
        let at_host = local_app.finish()?;
        if local {
            // The sender's headers, as they arrived: group, source and TTL 8 (the test
            // sender's multicast TTL).
            let original = Expected {
                destination: INPUT.into(),
                source: GENERATOR.into(),
                ttl: 8,
            };
            assert_delivered(&at_host, &stream, original)
                .with_context(|| format!("the local application, {path} path"))?;
        } else {
            ensure!(
                at_host.is_empty(),
                "without local delivery the relay consumes the input, but {} arrived ({path} path)",
                at_host.len()
            );
        }
    }
    Ok(())
}
