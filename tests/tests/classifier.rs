//! The classifier counts exactly the packets of each rule, nothing else, agrees with bpftool,
//! and leaves nothing behind when MCR stops.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use anyhow::{Context as _, ensure};
use aya::programs::{SchedClassifier, TcAttachType};
use mcr_tests::{Lab, Mcr, Netns, RulesFile, Stream, in_netns, send_udp, veth, wait_for};
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

/// `bpftool -j map dump pinned <path>`, each entry's BTF-formatted form.
fn bpftool_dump(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = mcr_tests::run_tool(
        "bpftool",
        &["-j", "map", "dump", "pinned", &path.to_string_lossy()],
    )?;
    let entries: Vec<Value> = serde_json::from_str(&text).context("parsing bpftool output")?;
    Ok(entries
        .into_iter()
        .map(|entry| entry.get("formatted").cloned().unwrap_or(entry))
        .collect())
}

/// Per rule (group, port) the packets and bytes bpftool shows, summed over CPUs.
fn bpftool_counters(pin_dir: &Path, group: [u8; 4], port: u16) -> anyhow::Result<(u64, u64)> {
    let group: Vec<Value> = group.iter().map(|b| Value::from(*b)).collect();
    let rules = bpftool_dump(&pin_dir.join("MCR_RULES"))?;
    let slot = rules
        .iter()
        .find(|entry| {
            entry["key"]["group"] == Value::Array(group.clone()) && entry["key"]["port"] == port
        })
        .and_then(|entry| entry["value"]["slot"].as_u64())
        .context("rule key not in MCR_RULES")?;
    let stats = bpftool_dump(&pin_dir.join("MCR_RULE_STATS"))?;
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
        bpftool_counters(&pin_dir, [239, 1, 1, 1], 5000)?,
        (1000, 200_000)
    );
    assert_eq!(
        bpftool_counters(&pin_dir, [239, 1, 1, 2], 5002)?,
        (500, 25_000)
    );

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
        "{}:7: rules[1].input.group: 10.1.1.2 is not an IPv4 multicast group (224.0.0.0/4)",
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
