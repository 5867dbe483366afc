//! The classifier counts exactly the packets of each rule, nothing else, agrees with bpftool,
//! leaves alone what is not this host's and link's to relay (counting it by reason), and
//! leaves nothing behind when MCR stops.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use anyhow::{Context as _, ensure};
use aya::programs::{SchedClassifier, TcAttachType};
use mcr_tests::{
    ETH_P_8021AD, ETH_P_8021Q, Expected, Frame, GENERATOR, Lab, Mcr, Netns, OTHER_HOST_MAC,
    RELAY_OUT0, Receiver, RulesFile, SINK, Stream, assert_delivered, in_netns, send_frames,
    send_udp, settles_at, veth, wait_for,
};
use serde_json::Value;

const RULES: &str = "\
rules:
  - name: any-source
    input: {interface: in0, group: 239.1.1.1, port: 5000}
    outputs:
      - {interface: out0, destination: 239.2.2.1, port: 6000}
  - name: source-specific
    input: {interface: in0, group: 239.1.1.2, port: 5002, source: 10.1.0.1}
    outputs:
      - {destination: 10.2.0.2, port: 7000}
";

/// The standard lab plus a second generator on in1, an interface with no rule.
struct ClassifierLab {
    lab: Lab,
    other_generator: Netns,
}

fn lab() -> anyhow::Result<ClassifierLab> {
    let lab = Lab::new()?;
    let other_generator = Netns::new("gen-b")?;
    veth(&other_generator, "gen1", &lab.relay, "in1")?;
    other_generator.address("gen1", "10.3.0.1/24")?;
    other_generator.ip(&["route", "add", "224.0.0.0/4", "dev", "gen1"])?;
    lab.relay.address("in1", "10.3.0.2/24")?;
    Ok(ClassifierLab {
        lab,
        other_generator,
    })
}

/// Names of the programs on `interface`'s TC ingress inside `netns`.
fn ingress_programs(netns: &Netns, interface: &str) -> anyhow::Result<Vec<String>> {
    in_netns(netns, || -> anyhow::Result<Vec<String>> {
        let (_, programs) = SchedClassifier::query_tcx(interface, TcAttachType::Ingress)?;
        Ok(programs
            .iter()
            .map(|program| program.name_as_str().unwrap_or("?").to_owned())
            .collect())
    })?
}

/// Per rule (group, port) the packets and bytes bpftool shows, summed over CPUs.
fn bpftool_counters(mcr: &Mcr, group: [u8; 4], port: u16) -> anyhow::Result<(u64, u64)> {
    let group: Vec<Value> = group.iter().map(|b| Value::from(*b)).collect();
    let rules = mcr.bpftool_dump("MCR_RULES")?;
    let slot = rules
        .iter()
        .find(|entry| {
            entry["key"]["group"] == Value::Array(group.clone()) && entry["key"]["port"] == port
        })
        .and_then(|entry| entry["value"]["slot"].as_u64())
        .context("rule key not in MCR_RULES")?;
    let stats = mcr.bpftool_dump("MCR_RULE_STATS")?;
    let entry = stats
        .iter()
        .find(|entry| entry["key"] == slot)
        .context("slot not in MCR_RULE_STATS")?;
    let values = entry["values"].as_array().context("per-CPU values")?;
    let sum = |field: &str| {
        values
            .iter()
            .map(|v| v["value"][field].as_u64().unwrap_or(0))
            .sum()
    };
    Ok((sum("packets"), sum("bytes")))
}

#[test]
fn counts_each_rule_exactly_and_cleans_up() -> anyhow::Result<()> {
    let ClassifierLab {
        lab,
        other_generator,
    } = lab()?;
    let rules = RulesFile::new(RULES)?;
    let mut mcr = Mcr::start(&lab.relay, rules.path())?;
    let pin_dir = mcr.pin_dir.clone();

    let on_in0 = ingress_programs(&lab.relay, "in0")?;
    ensure!(
        on_in0 == ["mcr_classify"],
        "classifier not on in0: {on_in0:?}"
    );
    ensure!(
        ingress_programs(&lab.relay, "in1")?.is_empty(),
        "in1 has no rule but a classifier"
    );
    ensure!(
        ingress_programs(&lab.relay, "out0")?.is_empty(),
        "out0 is no input"
    );

    let group_a = Ipv4Addr::new(239, 1, 1, 1);
    ensure!(
        lab.igmp_groups("in0")?.contains(&group_a),
        "{group_a} not joined"
    );
    let group_b = Ipv4Addr::new(239, 1, 1, 2);
    // Matching traffic.
    send_udp(&lab.generator, &Stream::new(group_a, 5000, 200, 1000))?;
    send_udp(
        &lab.generator,
        &Stream::new(group_b, 5002, 50, 500).from(Ipv4Addr::new(10, 1, 0, 1)),
    )?;
    // Not matching: other port, other group, other sender, other interface.
    send_udp(&lab.generator, &Stream::new(group_a, 5001, 200, 300))?;
    send_udp(
        &lab.generator,
        &Stream::new(Ipv4Addr::new(239, 1, 1, 3), 5000, 200, 300),
    )?;
    send_udp(
        &lab.generator,
        &Stream::new(group_b, 5002, 50, 300).from(Ipv4Addr::new(10, 1, 0, 9)),
    )?;
    send_udp(&other_generator, &Stream::new(group_a, 5000, 200, 300))?;

    // Counters settle as soon as the last packet has crossed the veth.
    let settled = wait_for(Duration::from_secs(5), || {
        let a = mcr.rule_stats("any-source").ok()?;
        (a["rx_packets"] == 1000).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let a = mcr.rule_stats("any-source")?;
    let b = mcr.rule_stats("source-specific")?;
    ensure!(
        settled.is_some(),
        "any-source never reached 1000 packets: {a}"
    );
    assert_eq!(a["rx_packets"], 1000, "{a}");
    assert_eq!(a["rx_bytes"], 200_000, "{a}");
    assert_eq!(a["state"], "active");
    assert_eq!(b["rx_packets"], 500, "{b}");
    assert_eq!(b["rx_bytes"], 25_000, "{b}");
    assert_eq!(mcr.stats()?.len(), 2);

    // bpftool reads the same numbers from the pinned maps.
    assert_eq!(
        bpftool_counters(&mcr, [239, 1, 1, 1], 5000)?,
        (1000, 200_000)
    );
    assert_eq!(bpftool_counters(&mcr, [239, 1, 1, 2], 5002)?, (500, 25_000));

    // The table shows the same figures.
    let table = mcr.cli(&["stats"])?;
    let row = table
        .lines()
        .find(|line| line.starts_with("any-source"))
        .context("no row")?;
    ensure!(
        row.contains(" 1000 ") && row.contains(" 200000 "),
        "table row: {row}"
    );

    let pid = mcr.pid().context("pid")?;
    let status = mcr.stop()?;
    ensure!(
        status.success(),
        "mcr exited with {status}:\n{}",
        mcr.log_text()
    );
    ensure!(!pin_dir.exists(), "pins left in {}", pin_dir.display());
    ensure!(!mcr.control_socket.exists(), "control socket left");
    ensure!(
        !lab.igmp_groups("in0")?.contains(&group_a),
        "{group_a} still joined on in0 after shutdown"
    );
    ensure!(
        ingress_programs(&lab.relay, "in0")?.is_empty(),
        "classifier still attached to in0"
    );
    ensure!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "mcr process {pid} still exists"
    );
    Ok(())
}

#[test]
fn a_rule_whose_interface_is_missing_waits() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let text = format!(
        "{RULES}  - name: later\n    input: {{interface: in7, group: 239.1.1.7, port: 5000}}\n    outputs:\n      - {{destination: 10.2.0.2, port: 7000}}\n"
    );
    let rules = RulesFile::new(&text)?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let later = mcr.rule_stats("later")?;
    assert_eq!(later["state"], "waiting", "{later}");
    assert_eq!(later["reason"], "interface in7 does not exist", "{later}");
    assert_eq!(mcr.rule_stats("any-source")?["state"], "active");
    Ok(())
}

#[test]
fn a_bad_rules_file_is_rejected_with_its_line_and_nothing_is_attached() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let bad = RulesFile::new(&RULES.replace("239.1.1.2", "10.1.1.2"))?;
    let rules = bad.path();
    let output = std::process::Command::new(mcr_tests::mcr_binary())
        .args(["check", "--config"])
        .arg(rules)
        .output()?;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!(
        "{}:7: rules[1].input.group: 10.1.1.2 is not a multicast group (224.0.0.0/4 or ff00::/8)",
        rules.display()
    );
    assert_eq!(stderr.trim(), expected);

    let error = Mcr::start(&lab.relay, rules)
        .err()
        .context("mcr run accepted a bad file")?;
    ensure!(error.to_string().contains(&expected), "{error}");
    ensure!(
        ingress_programs(&lab.relay, "in0")?.is_empty(),
        "something was attached"
    );

    let good = RulesFile::new(RULES)?;
    let good = good.path();
    let output = std::process::Command::new(mcr_tests::mcr_binary())
        .args(["check", "--config"])
        .arg(good)
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "OK: 2 rules"
    );
    assert!(output.status.success());
    Ok(())
}

/// IHL 15: forty bytes of IPv4 no-operation options.
const NOP_OPTIONS: [u8; 40] = [1; 40];
/// IHL 6: the Router Alert option (RFC 2113).
const ROUTER_ALERT: [u8; 4] = [0x94, 0x04, 0, 0];

const GROUP: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);
/// Where the `any-source` rule relays to, on out0.
const OUTPUT_GROUP: Ipv4Addr = Ipv4Addr::new(239, 2, 2, 1);

/// A kind of frame the relay must leave alone, and the skip counter it must land in.
struct Refused {
    what: &'static str,
    reason: &'static str,
    /// Turns a valid frame into one of this kind.
    breaks: fn(Frame) -> Frame,
}

const REFUSED: [Refused; 11] = [
    Refused {
        what: "802.1Q VLAN 42",
        reason: "vlan",
        breaks: |f| f.tagged(ETH_P_8021Q, 42),
    },
    Refused {
        what: "QinQ (802.1AD 100, 802.1Q 42)",
        reason: "vlan",
        breaks: |f| f.tagged(ETH_P_8021AD, 100).tagged(ETH_P_8021Q, 42),
    },
    Refused {
        what: "another host's MAC",
        reason: "other_host",
        breaks: |f| f.to_mac(OTHER_HOST_MAC),
    },
    Refused {
        what: "bad header checksum",
        reason: "bad_checksum",
        breaks: Frame::bad_checksum,
    },
    Refused {
        what: "bad checksum, 40 bytes of options",
        reason: "bad_checksum",
        breaks: |f| f.options(&NOP_OPTIONS).bad_checksum(),
    },
    Refused {
        what: "TTL 0",
        reason: "ttl_zero",
        breaks: |f| f.ttl(0),
    },
    Refused {
        what: "source 0.0.0.0",
        reason: "bad_source",
        breaks: |f| f.from(Ipv4Addr::UNSPECIFIED),
    },
    Refused {
        what: "source 127.0.0.1",
        reason: "bad_source",
        breaks: |f| f.from(Ipv4Addr::LOCALHOST),
    },
    Refused {
        what: "source 224.1.1.1",
        reason: "bad_source",
        breaks: |f| f.from(Ipv4Addr::new(224, 1, 1, 1)),
    },
    Refused {
        what: "source 255.255.255.255",
        reason: "bad_source",
        breaks: |f| f.from(Ipv4Addr::BROADCAST),
    },
    Refused {
        // One byte at offset 1480: shorter than a UDP header.
        what: "tiny last fragment",
        reason: "fragments",
        breaks: |f| f.last_fragment(185, 1),
    },
];

/// Frames of each refused kind sent in the test.
const REFUSED_SENT: u64 = 5;

/// The payloads of refused kind `case` are numbered from this, far past the control's, so a
/// leaked one is told apart at the sink.
fn first_sequence(case: usize) -> u64 {
    1000 * (case as u64 + 1)
}

/// Sends the frames of `REFUSED[case]` for the `any-source` rule and says what went wrong:
/// they must move their skip counter by exactly the number sent, and nothing else.
fn send_refused(
    lab: &Lab,
    mcr: &Mcr,
    control: &Stream,
    case: usize,
) -> anyhow::Result<Vec<String>> {
    let Refused {
        what,
        reason,
        breaks,
    } = &REFUSED[case];
    let before = mcr.skipped()?;
    let rx_before = mcr.rule_stats("any-source")?["rx_packets"].clone();
    let worker_packets_before = mcr.workers_total("received")?;
    let frames: Vec<Vec<u8>> = (0..REFUSED_SENT)
        .map(|i| {
            let payload = control.payload(first_sequence(case) + i);
            breaks(Frame::udp(GENERATOR, GROUP, 5000, payload)).bytes()
        })
        .collect();
    send_frames(&lab.generator, "gen0", &frames)?;

    let mut failures = Vec::new();
    let mut expected = before.clone();
    expected[reason] = Value::from(before[reason].as_u64().unwrap_or(0) + REFUSED_SENT);
    if let Err(now) = settles_at(|| mcr.skipped().ok(), &expected) {
        failures.push(format!(
            "{what}: skip counters {now:?}, expected {reason} +{REFUSED_SENT}"
        ));
    }
    let rx = mcr.rule_stats("any-source")?["rx_packets"].clone();
    if rx != rx_before {
        failures.push(format!("{what}: the rule counted it ({rx_before} -> {rx})"));
    }
    let worker_packets = mcr.workers_total("received")?;
    if worker_packets != worker_packets_before {
        failures.push(format!(
            "{what}: a worker received it ({worker_packets_before} -> {worker_packets})"
        ));
    }
    Ok(failures)
}

/// The positive control: valid frames from the same builder, plain and with the IPv4 options
/// the header checksum has to cover, and from 240.0.0.1, a source the kernel accepts
/// (240.0.0.0/4 is not martian) and so does MCR. Says what went wrong.
fn send_control(lab: &Lab, mcr: &Mcr, control: &Stream) -> anyhow::Result<Vec<String>> {
    let frames: Vec<Vec<u8>> = (0..control.count)
        .map(|sequence| {
            let frame = Frame::udp(GENERATOR, GROUP, 5000, control.payload(sequence));
            match sequence * 4 / control.count {
                0 => frame,
                1 => frame.options(&NOP_OPTIONS),
                2 => frame.options(&ROUTER_ALERT),
                _ => frame.from(Ipv4Addr::new(240, 0, 0, 1)),
            }
            .bytes()
        })
        .collect();
    let skips_before = mcr.skipped()?;
    send_frames(&lab.generator, "gen0", &frames)?;
    let mut failures = Vec::new();
    let counted = wait_for(Duration::from_secs(5), || {
        let rule = mcr.rule_stats("any-source").ok()?;
        (rule["rx_packets"] == control.count).then_some(rule)
    });
    if counted.is_none() {
        failures.push(format!(
            "control: the rule counted {} of {} valid frames",
            mcr.rule_stats("any-source")?["rx_packets"],
            control.count
        ));
    }
    if mcr.skipped()? != skips_before {
        failures.push("control: valid frames were counted as skipped".into());
    }
    Ok(failures)
}

/// Sums `MCR_SKIPS` over the CPUs, field by field, as bpftool names the fields.
fn bpftool_skips(mcr: &Mcr) -> anyhow::Result<Value> {
    let dump = mcr.bpftool_dump("MCR_SKIPS")?;
    let per_cpu = dump
        .first()
        .and_then(|entry| entry["values"].as_array())
        .context("no per-CPU values in MCR_SKIPS")?;
    let mut summed = serde_json::Map::new();
    for cpu in per_cpu {
        for (reason, count) in cpu["value"].as_object().context("a BTF struct")? {
            let sum = summed.get(reason).and_then(Value::as_u64).unwrap_or(0);
            summed.insert(
                reason.clone(),
                Value::from(sum + count.as_u64().unwrap_or(0)),
            );
        }
    }
    Ok(Value::Object(summed))
}

#[test]
fn frames_not_meant_for_this_host_and_link_are_left_alone_and_counted() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(RULES)?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let receiver = Receiver::start(&lab.sink, Some(OUTPUT_GROUP), SINK, 6000)?;
    let control = Stream::new(GROUP, 5000, 100, 40);

    // Every case is tried and every failure reported, so one run shows them all.
    let mut failures = Vec::new();
    for case in 0..REFUSED.len() {
        failures.extend(send_refused(&lab, &mcr, &control, case)?);
    }
    failures.extend(send_control(&lab, &mcr, &control)?);

    let (leaked, relayed): (Vec<_>, Vec<_>) = receiver
        .finish()?
        .into_iter()
        .partition(|datagram| datagram.sequence().is_some_and(|s| s >= first_sequence(0)));
    for datagram in leaked {
        let case = datagram.sequence().unwrap_or(0) / first_sequence(0) - 1;
        let what = usize::try_from(case)
            .ok()
            .and_then(|case| REFUSED.get(case))
            .map_or("?", |refused| refused.what);
        failures.push(format!("{what}: relayed to the sink"));
    }
    if let Err(error) = assert_delivered(
        &relayed,
        &control,
        Expected {
            destination: OUTPUT_GROUP.into(),
            source: RELAY_OUT0.into(),
            ttl: 16,
        },
    ) {
        failures.push(format!("control: {error}"));
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));

    // bpftool names every reason from BTF and agrees with mcr stats.
    assert_eq!(bpftool_skips(&mcr)?, mcr.skipped()?);
    Ok(())
}

#[test]
fn a_rule_with_min_ttl_holds_lower_ttls_back_and_counts_them() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let scoped = "\
rules:
  - name: scoped
    input: {interface: in0, group: 239.1.1.1, port: 5000, min_ttl: 2}
    outputs:
      - {interface: out0, destination: 239.2.2.1, port: 6000}
";
    let rules = RulesFile::new(scoped)?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let receiver = Receiver::start(&lab.sink, Some(OUTPUT_GROUP), SINK, 6000)?;
    // What the sink must get: 20 datagrams sent with TTL 5, then 10 with TTL 1 once the
    // minimum is gone, all re-originated with the output's TTL.
    let relayed = Stream::new(GROUP, 5000, 64, 30);
    let frame = |sequence: u64, ttl: u8| {
        Frame::udp(GENERATOR, GROUP, 5000, relayed.payload(sequence))
            .ttl(ttl)
            .bytes()
    };
    let counters = |mcr: &Mcr| -> Option<Value> {
        let rule = mcr.rule_stats("scoped").ok()?;
        Some(serde_json::json!([
            rule["rx_packets"],
            rule["below_min_ttl"]
        ]))
    };

    let held_back: Vec<Vec<u8>> = (1000..1010).map(|sequence| frame(sequence, 1)).collect();
    send_frames(&lab.generator, "gen0", &held_back)?;
    let passed: Vec<Vec<u8>> = (0..20).map(|sequence| frame(sequence, 5)).collect();
    send_frames(&lab.generator, "gen0", &passed)?;
    settles_at(|| counters(&mcr), &serde_json::json!([20, 10])).map_err(|now| {
        anyhow::anyhow!("[rx_packets, below_min_ttl] = {now:?}, expected [20, 10]")
    })?;
    let rule = mcr.rule_stats("scoped")?;
    assert_eq!(rule["min_ttl"], 2, "{rule}");
    let entries = mcr.bpftool_dump("MCR_RULES")?;
    ensure!(
        entries.len() == 1 && entries[0]["value"]["min_ttl"] == 2,
        "MCR_RULES: {entries:?}"
    );
    let table = mcr.cli(&["stats"])?;
    let row = table
        .lines()
        .find(|line| line.contains("ttl below 2"))
        .with_context(|| format!("no row for the held-back packets:\n{table}"))?;
    ensure!(
        row.split_whitespace().last() == Some("10"),
        "table row: {row}"
    );

    // Without a minimum, TTL 1 is relayed (the default); the counters carry on.
    rules.write(&scoped.replace(", min_ttl: 2", ""))?;
    mcr.cli(&["reload"])?;
    ensure!(
        mcr.rule_stats("scoped")?["min_ttl"].is_null(),
        "the reload did not remove the minimum"
    );
    let ttl_1: Vec<Vec<u8>> = (20..30).map(|sequence| frame(sequence, 1)).collect();
    send_frames(&lab.generator, "gen0", &ttl_1)?;
    settles_at(|| counters(&mcr), &serde_json::json!([30, 10])).map_err(|now| {
        anyhow::anyhow!("[rx_packets, below_min_ttl] = {now:?}, expected [30, 10]")
    })?;

    assert_delivered(
        &receiver.finish()?,
        &relayed,
        Expected {
            destination: OUTPUT_GROUP.into(),
            source: RELAY_OUT0.into(),
            ttl: 16,
        },
    )
}
