//! Day-2 operations: rules change while streams run, interfaces come and go, bad files are
//! refused, and `mcr status` says what happened.

use std::{fmt::Write as _, net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, ensure};
use mcr_tests::{
    Datagram, Expected, Lab, Mcr, Netns, RELAY_OUT0, Receiver, RulesFile, SINK, Stream,
    assert_delivered, send_udp, veth, wait_for,
};
use nix::sys::{
    resource::{Resource, getrlimit, setrlimit},
    signal::Signal,
};

fn rule(name: &str, interface: &str, group: &str, output_group: &str) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "  - name: {name}");
    let _ = writeln!(
        text,
        "    input: {{interface: {interface}, group: {group}, port: 5000}}"
    );
    let _ = writeln!(text, "    outputs:");
    let _ = writeln!(
        text,
        "      - {{interface: out0, destination: {output_group}, port: 6000}}"
    );
    text
}

fn rules(parts: &[String]) -> String {
    format!("rules:\n{}", parts.concat())
}

/// Checks that `received` is `stream` complete, in order, once each, relayed through out0
/// to `group` with the default TTL.
fn assert_complete(received: &[Datagram], stream: &Stream, group: Ipv4Addr) -> anyhow::Result<()> {
    assert_delivered(
        received,
        stream,
        Expected {
            destination: group.into(),
            source: RELAY_OUT0.into(),
            ttl: 16,
        },
    )
}

/// Sends `count` packets to `group` and returns what the sink received on `output`.
fn probe(
    lab: &Lab,
    group: Ipv4Addr,
    output: Ipv4Addr,
    count: u64,
) -> anyhow::Result<(Stream, Vec<Datagram>)> {
    let receiver = Receiver::start(&lab.sink, Some(output), SINK, 6000)?;
    let stream = Stream::new(group, 5000, 200, count);
    send_udp(&lab.generator, &stream)?;
    Ok((stream, receiver.finish()?))
}

/// Sends `count` packets to `group` and checks that the sink received all of them, in order,
/// relayed to `output`.
fn assert_relayed(lab: &Lab, group: Ipv4Addr, output: Ipv4Addr, count: u64) -> anyhow::Result<()> {
    let (stream, received) = probe(lab, group, output, count)?;
    assert_complete(&received, &stream, output)
}

#[test]
fn an_unchanged_rule_loses_nothing_across_twenty_reloads() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let keep = rule("keep", "in0", "239.1.1.1", "239.2.2.1");
    let file = RulesFile::new(&rules(std::slice::from_ref(&keep)))?;
    let mcr = Mcr::start(&lab.relay, file.path())?;
    let receiver = Receiver::start(&lab.sink, Some(Ipv4Addr::new(239, 2, 2, 1)), SINK, 6000)?;
    // About 2.5 s of traffic: 4000 datagrams in bursts of 32 every 20 ms.
    let stream =
        Stream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 200, 4000).paced(Duration::from_millis(20));
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let sender = scope.spawn(|| send_udp(&lab.generator, &stream));
        for round in 0..20_u8 {
            let mut parts = vec![keep.clone()];
            // Other rules come and go: a different set each round.
            for other in 0..(round % 4) {
                parts.push(rule(
                    &format!("other-{round}-{other}"),
                    "in0",
                    &format!("239.1.9.{}", round * 4 + other + 1),
                    &format!("239.2.9.{}", round * 4 + other + 1),
                ));
            }
            file.write(&rules(&parts))?;
            let output = mcr.cli_output(&["reload"])?;
            ensure!(output.status.success(), "reload {round} failed: {output:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))?
    })?;
    assert_complete(&receiver.finish()?, &stream, Ipv4Addr::new(239, 2, 2, 1))?;
    let status = mcr.status()?;
    ensure!(status["reloads"].as_u64() >= Some(20), "{status}");
    assert_eq!(status["last_reload"]["result"], "applied");
    // Counters of the unchanged rule ran on through every reload.
    assert_eq!(mcr.rule_stats("keep")?["outputs"][0]["tx_packets"], 4000);
    Ok(())
}

#[test]
fn rules_added_and_removed_by_editing_the_file() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let a = rule("a", "in0", "239.1.1.1", "239.2.2.1");
    let b = rule("b", "in0", "239.1.1.2", "239.2.2.2");
    let file = RulesFile::new(&rules(std::slice::from_ref(&a)))?;
    let mcr = Mcr::start(&lab.relay, file.path())?;
    let group_b = Ipv4Addr::new(239, 1, 1, 2);
    ensure!(!lab.igmp_groups("in0")?.contains(&group_b));

    file.write(&rules(&[a.clone(), b]))?;
    mcr.wait_for_status("two active rules", |s| s["rules"]["active"] == 2)?;
    ensure!(
        lab.igmp_groups("in0")?.contains(&group_b),
        "b's group was not joined"
    );
    assert_relayed(&lab, group_b, Ipv4Addr::new(239, 2, 2, 2), 200)?;

    file.write(&rules(&[a]))?;
    mcr.wait_for_status("one rule", |s| s["rules"]["total"] == 1)?;
    ensure!(
        !lab.igmp_groups("in0")?.contains(&group_b),
        "b's group is still joined after b was removed"
    );
    let (_, received) = probe(&lab, group_b, Ipv4Addr::new(239, 2, 2, 2), 200)?;
    ensure!(
        received.is_empty(),
        "a removed rule relayed {} datagrams",
        received.len()
    );
    assert_relayed(
        &lab,
        Ipv4Addr::new(239, 1, 1, 1),
        Ipv4Addr::new(239, 2, 2, 1),
        200,
    )?;
    let status = mcr.status()?;
    assert_eq!(status["last_reload"]["trigger"], "file-change", "{status}");
    Ok(())
}

#[test]
fn a_bad_file_changes_nothing_and_is_reported() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let a = rule("a", "in0", "239.1.1.1", "239.2.2.1");
    let file = RulesFile::new(&rules(std::slice::from_ref(&a)))?;
    let mcr = Mcr::start(&lab.relay, file.path())?;

    // Line 3 (the rule's input) gets a malformed group.
    let bad = rules(std::slice::from_ref(&a)).replace("239.1.1.1", "239.1.1");
    file.write(&bad)?;
    let status = mcr.wait_for_status("the rejected file", |s| {
        s["last_reload"]["result"] == "rejected"
    })?;
    let error = status["last_reload"]["error"].as_str().unwrap_or_default();
    let location = format!("{}:3: rules[0].input.group:", file.path().display());
    ensure!(
        error.contains(&location),
        "error {error:?} lacks {location:?}"
    );
    assert_eq!(status["rules"]["active"], 1);

    let output = mcr.cli_output(&["reload"])?;
    assert_eq!(output.status.code(), Some(1));
    ensure!(String::from_utf8_lossy(&output.stderr).contains(&location));

    assert_relayed(
        &lab,
        Ipv4Addr::new(239, 1, 1, 1),
        Ipv4Addr::new(239, 2, 2, 1),
        300,
    )?;

    let b = rule("b", "in0", "239.1.1.2", "239.2.2.2");
    file.write(&rules(&[a, b]))?;
    mcr.wait_for_status("the fixed file applied", |s| {
        s["last_reload"]["result"] == "applied" && s["rules"]["active"] == 2
    })?;
    Ok(())
}

#[test]
fn a_file_renamed_over_the_rules_file_is_picked_up() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let a = rule("a", "in0", "239.1.1.1", "239.2.2.1");
    let file = RulesFile::new(&rules(std::slice::from_ref(&a)))?;
    let mcr = Mcr::start(&lab.relay, file.path())?;
    file.rename_over(&rules(&[a, rule("b", "in0", "239.1.1.2", "239.2.2.2")]))?;
    mcr.wait_for_status("two active rules", |s| s["rules"]["active"] == 2)?;
    assert_relayed(
        &lab,
        Ipv4Addr::new(239, 1, 1, 2),
        Ipv4Addr::new(239, 2, 2, 2),
        200,
    )?;
    // A second edit after the rename is seen too: the watch follows the name, not the inode.
    file.rename_over(&rules(&[rule("a", "in0", "239.1.1.1", "239.2.2.1")]))?;
    mcr.wait_for_status("one rule", |s| s["rules"]["total"] == 1)?;
    Ok(())
}

#[test]
fn sighup_reloads_and_does_not_kill() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let file = RulesFile::new(&rules(&[rule("a", "in0", "239.1.1.1", "239.2.2.1")]))?;
    let mut mcr = Mcr::start(&lab.relay, file.path())?;
    mcr.signal(Signal::SIGHUP)?;
    let status = mcr.wait_for_status("a SIGHUP reload", |s| {
        s["last_reload"]["trigger"] == "sighup"
    })?;
    assert_eq!(status["last_reload"]["result"], "applied");
    ensure!(mcr.is_running(), "SIGHUP ended mcr");
    assert_relayed(
        &lab,
        Ipv4Addr::new(239, 1, 1, 1),
        Ipv4Addr::new(239, 2, 2, 1),
        200,
    )
}

#[test]
fn a_rule_starts_when_its_interface_appears_and_waits_when_it_goes() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let file = RulesFile::new(&rules(&[
        rule("a", "in0", "239.1.1.1", "239.2.2.1"),
        rule("late", "in7", "239.1.1.7", "239.2.2.7"),
    ]))?;
    let mut mcr = Mcr::start(&lab.relay, file.path())?;
    let status = mcr.status()?;
    assert_eq!(status["rules"]["waiting"], 1, "{status}");
    let late = mcr.rule_stats("late")?;
    assert_eq!(late["state"], "waiting", "{late}");
    assert_eq!(late["reason"], "interface in7 does not exist", "{late}");

    // A second generator behind a veth pair created after mcr started.
    let late_generator = Netns::new("gen7")?;
    veth(&late_generator, "gen7", &lab.relay, "in7")?;
    late_generator.address("gen7", "10.7.0.1/24")?;
    late_generator.ip(&["route", "add", "224.0.0.0/4", "dev", "gen7"])?;
    lab.relay.address("in7", "10.7.0.2/24")?;
    let status = mcr.wait_for_status("the late rule active", |s| s["rules"]["active"] == 2)?;
    let interfaces: Vec<&str> = status["interfaces"]
        .as_array()
        .context("interfaces")?
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(interfaces, ["in0", "in7"], "{status}");

    let late_sink = Receiver::start(&lab.sink, Some(Ipv4Addr::new(239, 2, 2, 7)), SINK, 6000)?;
    let stream = Stream::new(Ipv4Addr::new(239, 1, 1, 7), 5000, 200, 200);
    send_udp(&late_generator, &stream)?;
    assert_complete(&late_sink.finish()?, &stream, Ipv4Addr::new(239, 2, 2, 7))?;

    lab.relay.ip(&["link", "del", "in7"])?;
    mcr.wait_for_status("the late rule waiting again", |s| {
        s["rules"]["waiting"] == 1 && s["rules"]["active"] == 1
    })?;
    ensure!(mcr.is_running(), "mcr exited when in7 went away");
    assert_relayed(
        &lab,
        Ipv4Addr::new(239, 1, 1, 1),
        Ipv4Addr::new(239, 2, 2, 1),
        200,
    )
}

/// Packet sockets open in the relay namespace, from `/proc/net/packet`: all of them, and
/// those that receive IPv4 (protocol 0800; the output sockets have protocol 0 and only send).
fn packet_sockets(lab: &Lab) -> anyhow::Result<(usize, usize)> {
    let text = lab.relay.exec("cat", &["/proc/net/packet"])?;
    let sockets: Vec<&str> = text.lines().skip(1).collect();
    let receiving = sockets
        .iter()
        .filter(|line| line.split_whitespace().nth(3) == Some("0800"))
        .count();
    Ok((sockets.len(), receiving))
}

#[test]
fn an_interface_has_packet_sockets_only_while_it_has_rules() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let file = RulesFile::new(&format!(
        "settings:\n  workers: 2\n{}",
        rules(&[rule("a", "in0", "239.1.1.1", "239.2.2.1")])
    ))?;
    let mcr = Mcr::start(&lab.relay, file.path())?;
    let (all, receiving) = packet_sockets(&lab)?;
    assert_eq!(
        receiving, 2,
        "one receiving packet socket per worker on in0"
    );
    assert_eq!(
        all, 6,
        "and two sending sockets per worker (IP packets, Ethernet frames), for multicast outputs"
    );

    // The only rule moves to an interface that does not exist: in0 loses its sockets; the
    // workers keep their sending sockets.
    file.write(&format!(
        "settings:\n  workers: 2\n{}",
        rules(&[rule("a", "in9", "239.1.1.1", "239.2.2.1")])
    ))?;
    let status = mcr.wait_for_status("the rule waiting", |s| s["rules"]["waiting"] == 1)?;
    ensure!(
        status["interfaces"].as_array().is_some_and(Vec::is_empty),
        "{status}"
    );
    let closed = wait_for(Duration::from_secs(3), || {
        (packet_sockets(&lab).ok()? == (4, 0)).then_some(())
    });
    ensure!(
        closed.is_some(),
        "packet sockets still open (all, receiving): {:?}",
        packet_sockets(&lab)?
    );
    ensure!(
        !lab.igmp_groups("in0")?
            .contains(&Ipv4Addr::new(239, 1, 1, 1)),
        "239.1.1.1 still joined on in0"
    );
    Ok(())
}

/// A rule relaying `group:port` on in0 to `output_group:6000` on out0 with `ttl`.
fn rule_with(name: &str, group: &str, port: u16, output_group: &str, ttl: u8) -> String {
    format!(
        "  - name: {name}\n    input: {{interface: in0, group: {group}, port: {port}}}\n    outputs:\n      - {{interface: out0, destination: {output_group}, port: 6000, ttl: {ttl}}}\n"
    )
}

/// Writes `parts` as the rules file and has mcr apply it now.
fn reload_with(mcr: &Mcr, file: &RulesFile, parts: &[String]) -> anyhow::Result<()> {
    file.write(&rules(parts))?;
    let output = mcr.cli_output(&["reload"])?;
    ensure!(output.status.success(), "reload failed: {output:?}");
    Ok(())
}

/// Sends `count` datagrams to `group:port` and checks that all arrive at `output:6000`
/// through out0 with `ttl`.
fn assert_relayed_to(
    lab: &Lab,
    (group, port): (Ipv4Addr, u16),
    output: Ipv4Addr,
    ttl: u8,
    count: u64,
) -> anyhow::Result<()> {
    let receiver = Receiver::start(&lab.sink, Some(output), SINK, 6000)?;
    let stream = Stream::new(group, port, 200, count);
    send_udp(&lab.generator, &stream)?;
    assert_delivered(
        &receiver.finish()?,
        &stream,
        Expected {
            destination: output.into(),
            source: RELAY_OUT0.into(),
            ttl,
        },
    )
    .with_context(|| format!("{group}:{port} to {output}"))
}

#[test]
fn a_group_two_rules_share_stays_joined_until_neither_needs_it() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let shared = Ipv4Addr::new(239, 1, 1, 1);
    let a = rule_with("a", "239.1.1.1", 5000, "239.2.2.1", 16);
    let b = rule_with("b", "239.1.1.1", 5001, "239.2.2.2", 16);
    let file = RulesFile::new(&rules(&[a.clone(), b.clone()]))?;
    let mcr = Mcr::start(&lab.relay, file.path())?;
    ensure!(lab.igmp_groups("in0")?.contains(&shared), "not joined");

    // Renaming one rule: the new name starts before the old one stops.
    let a_renamed = rule_with("a-renamed", "239.1.1.1", 5000, "239.2.2.1", 16);
    reload_with(&mcr, &file, &[a_renamed.clone(), b.clone()])?;
    ensure!(
        lab.igmp_groups("in0")?.contains(&shared),
        "renaming a rule left a group two rules need"
    );
    assert_relayed_to(&lab, (shared, 5000), Ipv4Addr::new(239, 2, 2, 1), 16, 100)?;

    // Removing one rule: the other still needs the group.
    reload_with(&mcr, &file, std::slice::from_ref(&b))?;
    ensure!(
        lab.igmp_groups("in0")?.contains(&shared),
        "removing one rule left a group the other still needs"
    );
    assert_relayed_to(&lab, (shared, 5001), Ipv4Addr::new(239, 2, 2, 2), 16, 100)?;

    // The last rule that needs it goes: the group is left.
    reload_with(
        &mcr,
        &file,
        &[rule_with("c", "239.1.1.3", 5000, "239.2.2.3", 16)],
    )?;
    let groups = lab.igmp_groups("in0")?;
    ensure!(
        !groups.contains(&shared),
        "group kept after its last rule: {groups:?}"
    );
    ensure!(groups.contains(&Ipv4Addr::new(239, 1, 1, 3)), "{groups:?}");
    Ok(())
}

#[test]
fn counters_survive_a_ttl_change_and_an_interface_that_comes_back() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let group = (Ipv4Addr::new(239, 1, 1, 1), 5000);
    let output = Ipv4Addr::new(239, 2, 2, 1);
    let file = RulesFile::new(&rules(&[rule_with(
        "cam",
        "239.1.1.1",
        5000,
        "239.2.2.1",
        8,
    )]))?;
    let mcr = Mcr::start(&lab.relay, file.path())?;
    assert_relayed_to(&lab, group, output, 8, 300)?;

    // Only the TTL changes: same output, same counter.
    reload_with(
        &mcr,
        &file,
        &[rule_with("cam", "239.1.1.1", 5000, "239.2.2.1", 9)],
    )?;
    assert_relayed_to(&lab, group, output, 9, 200)?;
    let stats = mcr.rule_stats("cam")?;
    assert_eq!(stats["rx_packets"], 500, "{stats}");
    assert_eq!(stats["outputs"][0]["tx_packets"], 500, "{stats}");
    assert_eq!(stats["outputs"][0]["ttl"], 9, "{stats}");

    // The output interface goes away and comes back: the rule waits, then carries on
    // counting from where it was.
    lab.relay
        .ip(&["link", "set", "out0", "netns", lab.sink_2.name()])?;
    wait_for(Duration::from_secs(5), || {
        let stats = mcr.rule_stats("cam").ok()?;
        (stats["state"] == "waiting").then_some(())
    })
    .context("the rule never waited for out0")?;
    lab.sink_2
        .ip(&["link", "set", "out0", "netns", lab.relay.name()])?;
    lab.relay.address("out0", "10.2.0.1/24")?;
    wait_for(Duration::from_secs(5), || {
        let stats = mcr.rule_stats("cam").ok()?;
        (stats["state"] == "active").then_some(())
    })
    .context("the rule never came back")?;
    assert_relayed_to(&lab, group, output, 9, 100)?;
    let stats = mcr.rule_stats("cam")?;
    assert_eq!(stats["rx_packets"], 600, "{stats}");
    assert_eq!(stats["outputs"][0]["tx_packets"], 600, "{stats}");
    assert_eq!(stats["outputs"][0]["tx_bytes"], 600 * 200, "{stats}");
    Ok(())
}

#[test]
fn sigterm_with_idle_workers_stops_at_once() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let file = RulesFile::new(&format!(
        "settings:\n  workers: 2\n{}",
        rules(&[rule("a", "in0", "239.1.1.1", "239.2.2.1")])
    ))?;
    let mut mcr = Mcr::start(&lab.relay, file.path())?;
    assert_relayed(
        &lab,
        Ipv4Addr::new(239, 1, 1, 1),
        Ipv4Addr::new(239, 2, 2, 1),
        100,
    )?;
    let asked = std::time::Instant::now();
    let status = mcr.stop()?;
    let took = asked.elapsed();
    ensure!(status.success(), "{status}");
    eprintln!("stopped {took:?} after SIGTERM");
    ensure!(took < Duration::from_secs(1), "SIGTERM took {took:?}");
    Ok(())
}

#[test]
fn four_thousand_rules_start_and_stop_within_seconds() -> anyhow::Result<()> {
    const RULES: u16 = 4000;
    let lab = Lab::new()?;
    // Every other rule has a unicast output, each a UDP socket of its own.
    let parts: Vec<String> = (0..RULES)
        .map(|k| {
            let (high, low) = (k / 250, k % 250 + 1);
            if k % 2 == 0 {
                rule_with(
                    &format!("r{k}"),
                    &format!("239.10.{high}.{low}"),
                    5000,
                    &format!("239.20.{high}.{low}"),
                    16,
                )
            } else {
                format!(
                    "  - name: r{k}\n    input: {{interface: in0, group: 239.10.{high}.{low}, port: 5000}}\n    outputs:\n      - {{destination: {SINK}, port: {}}}\n",
                    7000 + k
                )
            }
        })
        .collect();
    let file = RulesFile::new(&rules(&parts))?;
    // mcr is started the way many service managers start it: with a soft limit of 1024 open
    // files (which its workers inherit).
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, 1024, hard)?;
    let started = std::time::Instant::now();
    let mcr = Mcr::start(&lab.relay, file.path());
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    let mut mcr = mcr?;
    let status = mcr.wait_for_status("4000 active rules", |s| {
        s["rules"]["active"] == u64::from(RULES)
    })?;
    eprintln!("{RULES} rules active after {:?}", started.elapsed());
    ensure!(status["rules"]["failed"] == 0, "{}", status["rules"]);
    let joined = lab.igmp_groups("in0")?.len();
    ensure!(joined >= usize::from(RULES), "{joined} groups joined");
    let asked = std::time::Instant::now();
    let status = mcr.stop()?;
    let took = asked.elapsed();
    ensure!(status.success(), "{status}");
    eprintln!("stopped {took:?} after SIGTERM with {RULES} rules");
    ensure!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    ensure!(lab.igmp_groups("in0")?.len() < 10, "groups left behind");
    Ok(())
}

#[test]
fn a_slow_reload_does_not_hold_up_the_control_socket() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rule_text = rules(&[rule("a", "in0", "239.1.1.1", "239.2.2.1")]);
    let file = RulesFile::new(&rule_text)?;
    let mcr = Mcr::start(&lab.relay, file.path())?;
    // A valid file that takes a while to read: the same rule and about 6 MB of comments.
    let comment = format!("# {}\n", "x".repeat(98));
    file.write(&format!("{rule_text}{}", comment.repeat(60_000)))?;
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let reload = scope.spawn(|| mcr.cli_output(&["reload"]));
        std::thread::sleep(Duration::from_millis(200));
        let stats = mcr.stats()?;
        ensure!(
            !reload.is_finished(),
            "the reload ended before the stats call: this file reads too fast to show anything"
        );
        assert_eq!(stats.len(), 1, "{stats:?}");
        let reloaded = reload
            .join()
            .map_err(|_| anyhow::anyhow!("reload thread panicked"))??;
        ensure!(reloaded.status.success(), "{reloaded:?}");
        Ok(())
    })?;
    assert_relayed(
        &lab,
        Ipv4Addr::new(239, 1, 1, 1),
        Ipv4Addr::new(239, 2, 2, 1),
        100,
    )
}
