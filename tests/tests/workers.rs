//! The worker processes: what they run as and hold, and how the supervisor keeps them going
//! through crashes and package upgrades. The rules here pin `path: worker`, so the streams
//! that prove a worker forwards again really go through it.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use mcr_tests::{
    Expected, Lab, Launch, Mcr, RELAY_OUT0, Receiver, RulesFile, SINK, Stream, assert_delivered,
    mcr_binary, send_udp, unique_name, wait_for,
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Rules with `workers` workers (on the worker path) and one rule relaying 239.1.1.1:5000 on in0
/// to 239.2.2.1:6000 on out0, and, with `unicast`, also to 10.2.0.2:7000.
fn camera_rules(workers: usize, unicast: bool) -> anyhow::Result<RulesFile> {
    let mut text = format!(
        "settings:\n  workers: {workers}\n  path: worker\nrules:\n  - name: cam\n    input: {{interface: in0, group: 239.1.1.1, port: 5000}}\n    outputs:\n      - {{interface: out0, destination: 239.2.2.1, port: 6000}}\n"
    );
    if unicast {
        text.push_str("      - {destination: 10.2.0.2, port: 7000}\n");
    }
    RulesFile::new(&text)
}

/// Sends a stream to the camera rule and checks that the sink gets all of it.
fn assert_camera_relayed(lab: &Lab) -> anyhow::Result<()> {
    let receiver = Receiver::start(&lab.sink, Some(Ipv4Addr::new(239, 2, 2, 1)), SINK, 6000)?;
    let stream = Stream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 200, 300);
    send_udp(&lab.generator, &stream)?;
    assert_delivered(
        &receiver.finish()?,
        &stream,
        Expected {
            destination: Ipv4Addr::new(239, 2, 2, 1).into(),
            source: RELAY_OUT0.into(),
            ttl: 16,
        },
    )
}

fn pid_of(worker: &serde_json::Value) -> Option<u32> {
    worker["pid"]
        .as_u64()
        .and_then(|pid| u32::try_from(pid).ok())
}

/// The workers once every one of them is `running`.
fn running_workers(mcr: &Mcr, timeout: Duration) -> anyhow::Result<Vec<serde_json::Value>> {
    wait_for(timeout, || {
        let workers = mcr.workers().ok()?;
        workers
            .iter()
            .all(|worker| worker["state"] == "running" && pid_of(worker).is_some())
            .then_some(workers)
    })
    .with_context(|| format!("the workers never all ran; log:\n{}", mcr.log_text()))
}

fn sigkill(pid: u32) -> anyhow::Result<()> {
    kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGKILL)?;
    Ok(())
}

/// Waits until worker 0 runs again as a process other than `old`.
fn restarted_worker(mcr: &Mcr, old: u32, timeout: Duration) -> anyhow::Result<serde_json::Value> {
    wait_for(timeout, || {
        let workers = mcr.workers().ok()?;
        let worker = workers.into_iter().next()?;
        (worker["state"] == "running" && pid_of(&worker).is_some_and(|pid| pid != old))
            .then_some(worker)
    })
    .with_context(|| {
        format!(
            "worker 0 not running again within {timeout:?}: {:?}\nlog:\n{}",
            mcr.workers(),
            mcr.log_text()
        )
    })
}

/// `(device, inode)` of the executable process `pid` runs.
fn executable_of(pid: u32) -> anyhow::Result<(u64, u64)> {
    let metadata = std::fs::metadata(format!("/proc/{pid}/exe"))?;
    Ok((metadata.dev(), metadata.ino()))
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(unique_name(label));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_killed_worker_is_restarted_and_forwards_again() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = camera_rules(1, false)?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let first = pid_of(&running_workers(&mcr, Duration::from_secs(5))?[0]).context("pid")?;
    sigkill(first)?;
    let killed = Instant::now();
    let restarted = restarted_worker(&mcr, first, Duration::from_secs(1))?;
    assert_eq!(restarted["restarts"], 1);
    eprintln!("worker restarted {:?} after SIGKILL", killed.elapsed());
    assert_camera_relayed(&lab)
}

#[test]
fn workers_restart_after_the_binary_was_replaced_or_deleted() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = camera_rules(1, false)?;
    let dir = TempDir::new("bin")?;
    let binary = dir.path().join("mcr");
    std::fs::copy(mcr_binary(), &binary).context("copying mcr")?;
    let mcr = Mcr::start_with(
        &lab.relay,
        rules.path(),
        Launch {
            binary: Some(binary.clone()),
            ..Launch::default()
        },
    )?;
    let supervisor = mcr.pid().context("supervisor pid")?;
    let running = executable_of(supervisor)?;
    let first = pid_of(&running_workers(&mcr, Duration::from_secs(5))?[0]).context("pid")?;

    // A package upgrade: the new version is written beside the old and renamed over it.
    let staged = dir.path().join(".mcr.new");
    std::fs::copy(mcr_binary(), &staged)?;
    std::fs::rename(&staged, &binary)?;
    sigkill(first)?;
    let second = restarted_worker(&mcr, first, Duration::from_secs(2))?;
    let second = pid_of(&second).context("pid")?;
    assert_eq!(
        executable_of(second)?,
        running,
        "the restarted worker does not run the supervisor's binary"
    );
    assert_camera_relayed(&lab)?;

    // An uninstall, or an upgrade that deletes before it writes.
    std::fs::remove_file(&binary)?;
    sigkill(second)?;
    let third = restarted_worker(&mcr, second, Duration::from_secs(2))?;
    assert_eq!(third["restarts"], 2, "{third}");
    assert_camera_relayed(&lab)
}

#[test]
fn workers_run_unprivileged() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = camera_rules(2, false)?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    // A worker starts as root and reports "running" only once it has given everything up.
    let workers = running_workers(&mcr, Duration::from_secs(5))?;
    assert_eq!(workers.len(), 2);
    for worker in &workers {
        let pid = pid_of(worker).context("worker pid")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> anyhow::Result<String> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|value| value.trim().to_owned())
                .with_context(|| format!("{name} missing from /proc/{pid}/status"))
        };
        for ids in [field("Uid:")?, field("Gid:")?] {
            ensure!(
                ids.split_whitespace().all(|id| id != "0"),
                "worker {pid} has id 0: {ids}"
            );
        }
        for set in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            assert_eq!(field(set)?, "0000000000000000", "worker {pid} {set}");
        }
        assert_eq!(field("NoNewPrivs:")?, "1", "worker {pid}");
        assert_eq!(field("Groups:")?, "", "worker {pid} supplementary groups");
    }
    Ok(())
}

/// The `Seccomp:` mode of process `pid`: 2 is a filter.
fn seccomp_mode(pid: u32) -> anyhow::Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Seccomp:"))
        .map(|mode| mode.trim().to_owned())
        .with_context(|| format!("no Seccomp: in /proc/{pid}/status"))
}

#[test]
fn workers_forward_under_a_seccomp_filter_also_after_changes_and_restarts() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = camera_rules(2, false)?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let workers = running_workers(&mcr, Duration::from_secs(5))?;
    for worker in &workers {
        let pid = pid_of(worker).context("pid")?;
        assert_eq!(seccomp_mode(pid)?, "2", "worker {pid}");
    }
    assert_camera_relayed(&lab)?;

    // Commands after the filter is in place: a new rule on a new input (new sockets), the
    // old one removed (sockets closed), then traffic for the new rule.
    rules.write(
        "settings:\n  workers: 2\n  path: worker\nrules:\n  - name: other\n    input: {interface: in0, group: 239.1.1.7, port: 5007}\n    outputs:\n      - {interface: out0, destination: 239.2.2.7, port: 6007}\n      - {destination: 10.2.0.2, port: 7007}\n",
    )?;
    mcr.cli(&["reload"])?;
    let receiver = Receiver::start(&lab.sink, Some(Ipv4Addr::new(239, 2, 2, 7)), SINK, 6007)?;
    let unicast = Receiver::start(&lab.sink, None, SINK, 7007)?;
    let stream = Stream::new(Ipv4Addr::new(239, 1, 1, 7), 5007, 100, 300);
    send_udp(&lab.generator, &stream)?;
    let expected = |destination: Ipv4Addr| Expected {
        destination: destination.into(),
        source: RELAY_OUT0.into(),
        ttl: 16,
    };
    assert_delivered(
        &receiver.finish()?,
        &stream,
        expected(Ipv4Addr::new(239, 2, 2, 7)),
    )?;
    assert_delivered(&unicast.finish()?, &stream, expected(SINK))?;

    // Nothing was killed on the way, and a restarted worker is confined again.
    let now = mcr.workers()?;
    for (before, after) in workers.iter().zip(&now) {
        assert_eq!(before["pid"], after["pid"], "a worker died: {now:?}");
        assert_eq!(after["restarts"], 0, "{now:?}");
    }
    let first = pid_of(&now[0]).context("pid")?;
    sigkill(first)?;
    let restarted = restarted_worker(&mcr, first, Duration::from_secs(2))?;
    let pid = pid_of(&restarted).context("pid")?;
    assert_eq!(seccomp_mode(pid)?, "2", "restarted worker {pid}");
    Ok(())
}

/// The socket inodes of one kind listed in `/proc/<pid>/net/<table>` (the inode is the last
/// column of `unix` and `packet`, the tenth of `udp`).
fn socket_inodes(pid: u32, table: &str) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            let inode = if table == "udp" {
                columns.get(9)
            } else {
                columns.last()
            };
            inode.map(|inode| (*inode).to_owned())
        })
        .collect())
}

/// What each descriptor of process `pid` is, by number: a path, or `unix socket`, `packet
/// socket`, `udp socket`, `pipe`, `anon_inode:[io_uring]`.
fn descriptors(pid: u32) -> anyhow::Result<Vec<(i32, String)>> {
    let unix = socket_inodes(pid, "unix")?;
    let packet = socket_inodes(pid, "packet")?;
    let udp = socket_inodes(pid, "udp")?;
    let mut found = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let fd: i32 = entry.file_name().to_string_lossy().parse()?;
        let target = std::fs::read_link(entry.path())?
            .to_string_lossy()
            .into_owned();
        let kind = if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
        {
            let inode = inode.to_owned();
            if unix.contains(&inode) {
                "unix socket".to_owned()
            } else if packet.contains(&inode) {
                "packet socket".to_owned()
            } else if udp.contains(&inode) {
                "udp socket".to_owned()
            } else {
                target
            }
        } else if target.starts_with("pipe:") {
            "pipe".to_owned()
        } else {
            target
        };
        found.push((fd, kind));
    }
    found.sort();
    Ok(found)
}

#[test]
fn workers_hold_only_the_descriptors_mcr_gave_them() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = camera_rules(1, true)?;
    let dir = TempDir::new("secret")?;
    let secret = dir.path().join("root-only");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&secret)?
        .write_all(b"not for workers")?;
    let file = std::fs::File::open(&secret)?;
    // The launcher leaves a root-only file open: mcr runs with it as descriptor 9.
    let mcr = Mcr::start_with(
        &lab.relay,
        rules.path(),
        Launch {
            inherit: vec![(9, file.into())],
            ..Launch::default()
        },
    )?;
    let supervisor = mcr.pid().context("supervisor pid")?;
    let secret_name = secret.display().to_string();
    ensure!(
        descriptors(supervisor)?
            .iter()
            .any(|(fd, target)| *fd == 9 && *target == secret_name),
        "the supervisor did not inherit the file; the test proves nothing"
    );

    let worker = pid_of(&running_workers(&mcr, Duration::from_secs(5))?[0]).context("pid")?;
    let held = descriptors(worker)?;
    ensure!(
        held.iter().all(|(_, target)| *target != secret_name),
        "the worker holds the launcher's file: {held:?}"
    );
    let numbered: Vec<(i32, &str)> = held
        .iter()
        .take(4)
        .map(|(fd, kind)| (*fd, kind.as_str()))
        .collect();
    assert_eq!(
        numbered,
        [
            (0, "/dev/null"),
            (1, "/dev/null"),
            (2, "pipe"),
            (3, "unix socket")
        ],
        "stdio and the control socket: {held:?}"
    );
    let mut rest: Vec<&str> = held.iter().skip(4).map(|(_, kind)| kind.as_str()).collect();
    rest.sort_unstable();
    assert_eq!(
        rest,
        [
            // Its counter block, its ring, the input's packet socket, the two link-layer
            // sockets of multicast outputs (IP packets; Ethernet frames) and the unicast
            // output's UDP socket: nothing else.
            "/memfd:mcr-worker-0 (deleted)",
            "anon_inode:[io_uring]",
            "packet socket",
            "packet socket",
            "packet socket",
            "udp socket",
        ],
        "{held:?}"
    );
    Ok(())
}

#[test]
fn a_stopped_worker_is_shown_stalled_and_restarted() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    // The default stall timeout (3 s); the bulk rule carries the traffic that piles up while
    // the worker is stopped, the camera rule the stream checked afterwards.
    let rules = RulesFile::new(
        "settings:\n  workers: 1\n  path: worker\nrules:\n  - name: cam\n    input: {interface: in0, group: 239.1.1.1, port: 5000}\n    outputs:\n      - {interface: out0, destination: 239.2.2.1, port: 6000}\n  - name: bulk\n    input: {interface: in0, group: 239.1.1.9, port: 5009}\n    outputs:\n      - {interface: out0, destination: 239.2.2.9, port: 6009}\n",
    )?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let first = pid_of(&running_workers(&mcr, Duration::from_secs(5))?[0]).context("pid")?;

    // About ten seconds of a few thousand packets per second.
    let bulk = Stream::new(Ipv4Addr::new(239, 1, 1, 9), 5009, 100, 30_000)
        .paced(Duration::from_millis(10));
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let sender = scope.spawn(|| send_udp(&lab.generator, &bulk));
        std::thread::sleep(Duration::from_millis(500));
        kill(Pid::from_raw(i32::try_from(first)?), Signal::SIGSTOP)?;
        let stopped = Instant::now();

        let stalled = wait_for(Duration::from_secs(5), || {
            let worker = mcr.workers().ok()?.into_iter().next()?;
            (worker["state"] == "stalled").then_some(worker)
        })
        .with_context(|| {
            format!(
                "a stopped worker was not shown as stalled: {:?}\nlog:\n{}",
                mcr.workers(),
                mcr.log_text()
            )
        })?;
        eprintln!("stalled after {:?}: {stalled}", stopped.elapsed());
        assert_eq!(pid_of(&stalled), Some(first), "{stalled}");
        ensure!(
            stalled["reason"]
                .as_str()
                .is_some_and(|reason| reason.contains("no progress")),
            "{stalled}"
        );
        let status = mcr.status()?;
        assert_eq!(status["workers"][0]["state"], "stalled", "{status}");

        let restarted = restarted_worker(&mcr, first, Duration::from_secs(3 + 4))?;
        eprintln!("restarted after {:?}", stopped.elapsed());
        assert_eq!(restarted["restarts"], 1, "{restarted}");
        ensure!(
            mcr.log_text().contains("worker stalled"),
            "the stall is not in the log:\n{}",
            mcr.log_text()
        );
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("the sender panicked"))?
    })?;

    // The restarted worker has its rules: a fresh stream arrives whole.
    std::thread::sleep(Duration::from_millis(500));
    assert_camera_relayed(&lab)
}

/// The camera rule with `outputs` (rules-file lines) on one worker that may be stopped for
/// a while without being taken for wedged (a stall timeout of 30 s): the rules file (kept
/// while MCR runs), MCR and the worker's pid.
fn one_stoppable_worker(lab: &Lab, outputs: &str) -> anyhow::Result<(RulesFile, Mcr, Pid)> {
    let rules = RulesFile::new(&stoppable_camera(outputs))?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let pid = mcr.workers()?[0]["pid"].as_u64().context("worker pid")?;
    Ok((rules, mcr, Pid::from_raw(i32::try_from(pid)?)))
}

/// The camera rule's one output, as a rules-file line: 239.2.2.1:6000 on out0.
const CAMERA_OUTPUT: &str = "      - {interface: out0, destination: 239.2.2.1, port: 6000}\n";

/// The rules file of [`one_stoppable_worker`] with [`CAMERA_OUTPUT`] and a shedding window of
/// `window` packets.
fn camera_with_window(window: u64) -> String {
    stoppable_camera(CAMERA_OUTPUT).replacen(
        "settings:\n",
        &format!("settings:\n  shed_window: {window}\n"),
        1,
    )
}

/// The rules file of [`one_stoppable_worker`]: the camera rule with `outputs`.
fn stoppable_camera(outputs: &str) -> String {
    stoppable_rules(&format!(
        "  - name: cam\n    input: {{interface: in0, group: 239.1.1.1, port: 5000}}\n    outputs:\n{outputs}"
    ))
}

/// A rules file of one worker with a stall timeout of 30 s and `rules` (rules-file lines).
fn stoppable_rules(rules: &str) -> String {
    format!("settings:\n  workers: 1\n  path: worker\n  stall_timeout: 30\nrules:\n{rules}")
}

/// The sequence numbers of `arrived`, checked to be rising: nothing duplicated or reordered.
fn in_order(arrived: &[mcr_tests::Datagram]) -> anyhow::Result<Vec<u64>> {
    let sequences: Vec<u64> = arrived
        .iter()
        .map(|datagram| datagram.sequence().context("no sequence"))
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        sequences.windows(2).all(|pair| pair[0] < pair[1]),
        "duplicated or reordered"
    );
    Ok(sequences)
}

/// Sends `burst` from the generator while `worker` is stopped, so that it all waits for the
/// worker at once; the worker runs again afterwards, also when sending failed.
fn send_while_stopped(lab: &Lab, worker: Pid, burst: &Stream) -> anyhow::Result<()> {
    while_stopped(worker, || send_udp(&lab.generator, burst))
}

/// Runs `work` while `worker` is stopped (`SIGSTOP`), then lets the worker run again, also
/// when `work` failed.
fn while_stopped<T>(worker: Pid, work: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    kill(worker, Signal::SIGSTOP)?;
    let done = work();
    kill(worker, Signal::SIGCONT)?;
    done
}

#[test]
fn a_worker_behind_by_a_full_window_has_its_excess_shed_and_then_keeps_up() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    // A stall timeout well past the overload below: the worker is behind, not wedged.
    let (_rules, mcr, pid) = one_stoppable_worker(&lab, CAMERA_OUTPUT)?;
    let group = Ipv4Addr::new(239, 1, 1, 1);
    let output = Ipv4Addr::new(239, 2, 2, 1);

    let (relayed, shed) = overloaded_once(&lab, &mcr, pid, 16_000)?;
    ensure!(
        relayed >= 8192,
        "the worker kept less than its window: {relayed}"
    );

    // The overload is over: the worker relays everything again.
    let receiver = Receiver::start(&lab.sink, Some(output), SINK, 6000)?;
    let after = Stream::new(group, 5000, 100, 1000);
    send_udp(&lab.generator, &after)?;
    assert_delivered(
        &receiver.finish()?,
        &after,
        Expected {
            destination: output.into(),
            source: RELAY_OUT0.into(),
            ttl: 16,
        },
    )?;
    assert_eq!(
        mcr.rule_stats("cam")?["shed"],
        shed,
        "nothing more was shed"
    );
    Ok(())
}

/// Stops `worker` while `count` packets of the camera rule arrive, then runs it again: it can
/// be at most a window (8,192 unless the rules file sets another) behind, and the classifier
/// drops the rest. Checks that some were shed and that every packet was relayed (in order,
/// none twice) or shed, and counted so by the rule, the worker and the output, and that the
/// worker's backlog showed what waited for it and then went back to none; returns how many
/// were relayed and how many shed.
fn overloaded_once(lab: &Lab, mcr: &Mcr, worker: Pid, count: u64) -> anyhow::Result<(u64, u64)> {
    let group = Ipv4Addr::new(239, 1, 1, 1);
    let output = Ipv4Addr::new(239, 2, 2, 1);
    let before = mcr.rule_stats("cam")?;
    let shed_before = before["shed"].as_u64().context("shed")?;
    let relayed_before = before["outputs"][0]["tx_packets"]
        .as_u64()
        .context("tx_packets")?;
    let receiver = Receiver::start(&lab.sink, Some(output), SINK, 6000)?;
    let burst = Stream::new(group, 5000, 100, count);
    let waiting = while_stopped(worker, || {
        send_udp(&lab.generator, &burst)?;
        mcr.workers_total("backlog")
    })?;
    let sequences = in_order(&receiver.finish()?)?;
    let rule = mcr.rule_stats("cam")?;
    let stats = &mcr.workers()?[0];
    let shed = rule["shed"].as_u64().context("shed")? - shed_before;
    let relayed = sequences.len() as u64;
    eprintln!("{relayed} of {count} relayed, {shed} shed");
    ensure!(shed > 0, "nothing was shed: {rule}");
    assert_eq!(
        stats["shed"].as_u64(),
        rule["shed"].as_u64(),
        "the worker's shed is the rule's: {stats}"
    );
    assert_eq!(
        relayed + shed,
        burst.count,
        "each packet is relayed or shed: {rule} {stats}"
    );
    assert_eq!(
        stats["kernel_drops"], 0,
        "shed before its socket overflowed: {stats}"
    );
    assert_eq!(
        rule["outputs"][0]["tx_packets"].as_u64(),
        Some(relayed_before + relayed),
        "{rule}"
    );
    // Once the window was full nothing more was steered to the stopped worker, so what waited
    // for it is exactly what it relayed when it ran again; then it had caught up.
    assert_eq!(
        waiting, relayed,
        "the stopped worker's backlog is not what waited for it"
    );
    assert_eq!(stats["backlog"], 0, "the worker did not catch up: {stats}");
    Ok((relayed, shed))
}

#[test]
fn a_worker_restarted_with_packets_waiting_takes_them_and_sheds_nothing() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let (_rules, mcr, pid) = one_stoppable_worker(&lab, CAMERA_OUTPUT)?;
    let receiver = Receiver::start(&lab.sink, Some(Ipv4Addr::new(239, 2, 2, 1)), SINK, 6000)?;
    // About two seconds of some 3,000 packets per second. The worker stops for half a second
    // (some 1,500 packets wait, far from a window) and is killed: its successor takes what
    // waits while more keeps coming, and none of it is more than a window behind.
    let stream =
        Stream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 100, 6400).paced(Duration::from_millis(10));
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let sender = scope.spawn(|| send_udp(&lab.generator, &stream));
        std::thread::sleep(Duration::from_millis(300));
        kill(pid, Signal::SIGSTOP)?;
        std::thread::sleep(Duration::from_millis(500));
        let old = u32::try_from(pid.as_raw())?;
        sigkill(old)?;
        restarted_worker(&mcr, old, Duration::from_secs(5))?;
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("the sender panicked"))?
    })?;
    let sequences = in_order(&receiver.finish()?)?;
    let worker = &mcr.workers()?[0];
    eprintln!("{} of {} relayed: {worker}", sequences.len(), stream.count);
    assert_eq!(worker["shed"], 0, "shed after the restart: {worker}");
    assert_eq!(worker["kernel_drops"], 0, "{worker}");
    // What the killed worker had taken and not yet sent is lost with it: a burst at most.
    ensure!(
        sequences.len() as u64 + 32 >= stream.count,
        "{} of {} relayed",
        sequences.len(),
        stream.count
    );
    Ok(())
}

/// The shedding window the classifier applies to each worker: the `window` of the worker's
/// page of the pinned `MCR_WORKER_LOAD`, as bpftool reads it.
fn shedding_windows(mcr: &Mcr, workers: u32) -> anyhow::Result<Vec<u64>> {
    let map = mcr.pin_dir.join("MCR_WORKER_LOAD");
    (0..workers)
        .map(|worker| {
            let key = worker.to_le_bytes().map(|byte| byte.to_string());
            let mut args = vec!["-j", "map", "lookup", "pinned"];
            let map = map.to_string_lossy();
            args.push(&map);
            args.push("key");
            args.extend(key.iter().map(String::as_str));
            let text = mcr_tests::run_tool("bpftool", &args)?;
            let entry: serde_json::Value = serde_json::from_str(&text)?;
            let entry = entry.get("formatted").unwrap_or(&entry);
            entry["value"]["window"]
                .as_u64()
                .with_context(|| format!("no window for worker {worker}: {entry}"))
        })
        .collect()
}

/// Writes `text` over `rules` and waits for the reload mcr's watcher makes of it, a moment
/// after the write: a `mcr reload` right after the write would be a second reload, and the
/// watcher's could come later, in the middle of what the test does next.
fn rewrite(mcr: &Mcr, rules: &RulesFile, text: &str) -> anyhow::Result<()> {
    let reloads = |status: &serde_json::Value| status["reloads"].as_u64();
    let before = reloads(&mcr.status()?);
    rules.write(text)?;
    mcr.wait_for_status("the watcher's reload of the rules file", |status| {
        reloads(status) > before && status["last_reload"]["trigger"] == "file-change"
    })?;
    Ok(())
}

#[test]
fn the_shedding_window_of_the_rules_file_is_the_classifiers_until_the_next_start()
-> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(&camera_with_window(2048))?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let pid = Pid::from_raw(i32::try_from(
        mcr.workers()?[0]["pid"].as_u64().context("worker pid")?,
    )?);
    ensure!(
        mcr.log_text().contains("shed_window=2048"),
        "the worker does not say its window:\n{}",
        mcr.log_text()
    );
    assert_eq!(shedding_windows(&mcr, 1)?, [2048], "the worker's page");

    // 6,000 packets wait for the stopped worker: the default window (8,192) would hold them
    // all, this one holds 2,048 and the classifier sheds the rest.
    let (relayed, shed) = overloaded_once(&lab, &mcr, pid, 6000)?;
    // A few more than the window when the classifier ran on two CPUs at once as it filled.
    ensure!(
        (2048..2100).contains(&relayed),
        "{relayed} relayed and {shed} shed: not a window of 2,048"
    );

    // A reload keeps the window the workers and their sockets started with, and says so.
    rewrite(&mcr, &rules, &camera_with_window(4096))?;
    assert_eq!(shedding_windows(&mcr, 1)?, [2048], "changed by a reload");
    assert_eq!(
        mcr.status()?["shed_window"],
        2048,
        "mcr status shows the window in force, not the reloaded file's"
    );
    let status = mcr.cli(&["status"])?;
    ensure!(
        status.contains("past 2048 packets waiting for a worker"),
        "{status}"
    );
    ensure!(
        mcr.log_text()
            .contains("settings.shed_window changed: the running value stays until mcr restarts"),
        "no word that the new window waits for a restart:\n{}",
        mcr.log_text()
    );
    // So does a worker restarted after the reload: it writes the window its sockets were
    // sized for, not the reloaded file's.
    let old = u32::try_from(pid.as_raw())?;
    sigkill(old)?;
    restarted_worker(&mcr, old, Duration::from_secs(5))?;
    assert_eq!(
        shedding_windows(&mcr, 1)?,
        [2048],
        "the restarted worker's page"
    );
    // Every reload of a file that differs from what runs says so again.
    let waits = "settings.shed_window changed";
    let warned = || mcr.log_text().matches(waits).count();
    let before = warned();
    mcr.cli(&["reload"])?;
    ensure!(
        warned() > before,
        "a second reload of the changed window says nothing:\n{}",
        mcr.log_text()
    );
    // The file put back as mcr runs it: nothing waits for a restart any more, nothing to say.
    let before = warned();
    rewrite(&mcr, &rules, &camera_with_window(2048))?;
    assert_eq!(
        warned(),
        before,
        "a reload back to the running window says it waits:\n{}",
        mcr.log_text()
    );
    Ok(())
}

#[test]
fn a_window_of_jumbo_frames_too_large_for_a_socket_is_reported() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    lab.relay.ip(&["link", "set", "in0", "mtu", "9000"])?;
    let warning = "more than the 160 MiB a socket gets";
    // 8,192 jumbo frames fit a socket: nothing to say.
    let fits = RulesFile::new(&camera_with_window(8192))?;
    let mcr = Mcr::start(&lab.relay, fits.path())?;
    assert_camera_relayed(&lab)?;
    ensure!(!mcr.log_text().contains(warning), "{}", mcr.log_text());
    drop(mcr);
    // 32,768 do not: the operator learns that this input's sockets may overflow first.
    let too_large = RulesFile::new(&camera_with_window(32_768))?;
    let mcr = Mcr::start(&lab.relay, too_large.path())?;
    assert_camera_relayed(&lab)?;
    let log = mcr.log_text();
    let line = log
        .lines()
        .find(|line| line.contains(warning))
        .with_context(|| format!("no warning:\n{log}"))?;
    for expected in ["in0 (MTU 9000)", "32768 packets", "594 MiB"] {
        ensure!(line.contains(expected), "{expected} not in: {line}");
    }
    Ok(())
}

#[test]
fn packets_lost_in_a_closed_socket_are_forgiven_once_the_worker_is_idle() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let output = CAMERA_OUTPUT;
    let (rules, mcr, pid) = one_stoppable_worker(&lab, output)?;
    let camera = stoppable_camera(output);
    // An IPv6 rule keeps in0's IPv6 sockets while the camera rule's IPv4 ones close.
    let other = stoppable_rules(
        "  - name: v6\n    input: {interface: in0, group: 'ff0e::1:9', port: 5009}\n    outputs:\n      - {interface: out0, destination: 'ff0e::2:9', port: 6009}\n",
    );

    // 5,000 packets wait for the stopped worker, then its rule goes: the input's sockets close
    // with the packets the worker had not taken, which the classifier still counts as the
    // worker's backlog.
    let waiting = Stream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 100, 5000);
    while_stopped(pid, || {
        send_udp(&lab.generator, &waiting)?;
        rules.write(&other)?;
        mcr.cli(&["reload"]).map(drop)
    })?;
    let taken = wait_for(Duration::from_secs(5), || {
        let workers = mcr.workers().ok()?;
        let received = workers.first()?["received"].as_u64()?;
        std::thread::sleep(Duration::from_millis(300));
        (mcr.workers().ok()?.first()?["received"].as_u64()? == received).then_some(received)
    })
    .context("the worker kept taking packets")?;
    ensure!(
        taken < waiting.count,
        "every waiting packet was taken ({taken}): none was lost with the socket"
    );
    eprintln!("{} lost with the closed socket", waiting.count - taken);

    // The rule comes back; the worker, idle for longer than 100 ms, forgives what was lost,
    // so its next overload has the whole window again.
    rules.write(&camera)?;
    mcr.cli(&["reload"])?;
    std::thread::sleep(Duration::from_millis(500));
    assert_camera_relayed(&lab)?;
    std::thread::sleep(Duration::from_millis(500));
    let (relayed, _shed) = overloaded_once(&lab, &mcr, pid, 16_000)?;
    ensure!(
        relayed >= 8192,
        "the worker kept less than its window: {relayed} (lost packets held against it)"
    );
    Ok(())
}

/// Frames that entered `interface` of `netns`, by the kernel's count.
fn frames_received(netns: &mcr_tests::Netns, interface: &str) -> anyhow::Result<u64> {
    let text = netns.ip(&["-s", "-j", "link", "show", "dev", interface])?;
    let links: serde_json::Value = serde_json::from_str(&text)?;
    links[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .with_context(|| format!("no receive counter for {interface}: {text}"))
}

#[test]
fn a_backlog_leaves_in_runs_and_every_datagram_arrives_in_order() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let (_rules, mcr, pid) = one_stoppable_worker(
        &lab,
        "      - {interface: out0, destination: 239.2.2.1, port: 6000}\n      - {interface: out1, destination: 239.2.2.2, port: 6002, dscp: 46}\n",
    )?;
    let first = Ipv4Addr::new(239, 2, 2, 1);
    let second = Ipv4Addr::new(239, 2, 2, 2);
    let receivers = [
        Receiver::start(&lab.sink, Some(first), SINK, 6000)?,
        Receiver::start(&lab.sink_2, Some(second), mcr_tests::SINK_2, 6002)?,
    ];
    let frames_before = [
        frames_received(&lab.sink, "sink0")?,
        frames_received(&lab.sink_2, "sink1")?,
    ];

    // 3,000 datagrams wait while the worker is stopped (within its window: none is shed);
    // once it runs, it takes them in batches and sends runs of up to 64 per output.
    let burst = Stream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 300, 3000);
    send_while_stopped(&lab, pid, &burst)?;
    let [to_first, to_second] = receivers;
    let expected = [
        (to_first.finish()?, first, RELAY_OUT0, "sink0"),
        (to_second.finish()?, second, mcr_tests::RELAY_OUT1, "sink1"),
    ];
    let rule = mcr.rule_stats("cam")?;
    for (index, (arrived, destination, source, interface)) in expected.iter().enumerate() {
        // Each datagram once, in order, whole, from the relay's address.
        assert_delivered(
            arrived,
            &burst,
            Expected {
                destination: (*destination).into(),
                source: (*source).into(),
                ttl: 16,
            },
        )?;
        assert_eq!(
            rule["outputs"][index]["tx_packets"], burst.count,
            "every datagram counted as sent: {rule}"
        );
        // The test's veths pass a run whole to the receiving namespace (whose UDP layer
        // splits it for the socket), so fewer frames than datagrams arrive: runs were sent.
        let frames = frames_received(if index == 0 { &lab.sink } else { &lab.sink_2 }, interface)?
            - frames_before[index];
        eprintln!(
            "{interface}: {} datagrams in {frames} frames",
            arrived.len()
        );
        ensure!(
            frames < burst.count / 2,
            "{interface}: {frames} frames for {} datagrams: the backlog did not leave in runs",
            burst.count
        );
    }
    assert_eq!(rule["shed"], 0, "{rule}");
    // The worker's own counters tell the operator the same: every datagram of both outputs
    // sent, in far fewer sends.
    let sent = mcr.workers_total("sent")?;
    let sends = mcr.workers_total("sends")?;
    assert_eq!(
        sent,
        2 * burst.count,
        "sent counts every datagram once per output"
    );
    ensure!(
        sends > 0 && sends < sent / 2,
        "{sends} sends for {sent} datagrams: mcr stats does not show the runs"
    );
    Ok(())
}

#[test]
fn runs_follow_an_output_interface_whose_mtu_shrinks() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let (_rules, mcr, pid) = one_stoppable_worker(&lab, CAMERA_OUTPUT)?;
    let output = Ipv4Addr::new(239, 2, 2, 1);
    // 1300-byte payloads make 1328-byte packets: more than out0 carries once its MTU is 1200.
    // The receiving end keeps 1500, so a packet sent too long would still arrive there.
    lab.relay
        .ip(&["link", "set", "dev", "out0", "mtu", "1200"])?;
    // The supervisor sees the link change and re-plumbs the rule (it settles for 200 ms).
    std::thread::sleep(Duration::from_secs(2));

    let receiver = Receiver::start(&lab.sink, Some(output), SINK, 6000)?;
    let burst = Stream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 1300, 40);
    send_while_stopped(&lab, pid, &burst)?;
    let arrived = receiver.finish()?;
    let rule = mcr.rule_stats("cam")?;
    // Each packet was refused as too long for out0 rather than sent in a run sized for the
    // old MTU.
    ensure!(
        arrived.is_empty(),
        "{} datagrams left out0 longer than its MTU: {rule}",
        arrived.len()
    );
    assert_eq!(rule["outputs"][0]["tx_errors"], burst.count, "{rule}");
    assert_eq!(rule["outputs"][0]["tx_packets"], 0, "{rule}");
    Ok(())
}

/// The camera rule on one worker, with `realtime` as `settings.realtime` when given.
fn camera_rules_realtime(realtime: Option<&str>) -> String {
    let realtime = realtime.map_or_else(String::new, |value| format!("  realtime: {value}\n"));
    format!(
        "settings:\n  workers: 1\n  path: worker\n{realtime}rules:\n  - name: cam\n    input: {{interface: in0, group: 239.1.1.1, port: 5000}}\n    outputs:\n      - {{interface: out0, destination: 239.2.2.1, port: 6000}}\n"
    )
}

/// `(policy, real-time priority)` of process `pid` as the kernel has them (`/proc/<pid>/stat`
/// fields 41 and 40): policy 0 is `SCHED_OTHER`, 1 `SCHED_FIFO`.
fn scheduling_of(pid: u32) -> anyhow::Result<(u32, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name, in brackets, may hold spaces: count fields after it.
    let rest = stat.rsplit_once(") ").context("no ) in stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3.
    let field = |n: usize| -> anyhow::Result<u32> {
        Ok(fields
            .get(n - 3)
            .with_context(|| format!("stat has no field {n}: {stat}"))?
            .parse()?)
    };
    Ok((field(41)?, field(40)?))
}

const SCHED_OTHER: u32 = 0;
const SCHED_FIFO: u32 = 1;

/// Waits until worker 0 runs under `(policy, priority)`; returns its pid.
fn worker_scheduled(mcr: &Mcr, expected: (u32, u32)) -> anyhow::Result<u32> {
    let mut last = None;
    wait_for(Duration::from_secs(5), || {
        let pid = pid_of(&running_workers(mcr, Duration::from_secs(5)).ok()?[0])?;
        last = Some((pid, scheduling_of(pid).ok()?));
        (last?.1 == expected).then_some(pid)
    })
    .with_context(|| {
        format!(
            "worker 0 (pid, (policy, priority)) is {last:?}, not {expected:?}; log:\n{}",
            mcr.log_text()
        )
    })
}

#[test]
fn realtime_workers_run_sched_fifo_through_a_restart_and_relay() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(&camera_rules_realtime(Some("{priority: 20}")))?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let first = worker_scheduled(&mcr, (SCHED_FIFO, 20))?;
    let worker = &mcr.workers()?[0];
    assert_eq!(worker["scheduling"]["policy"], "fifo", "{worker}");
    assert_eq!(worker["scheduling"]["priority"], 20, "{worker}");
    let status = mcr.cli(&["status"])?;
    let row = status
        .lines()
        .skip_while(|line| !line.starts_with("WORKER"))
        .nth(1)
        .context("no worker row")?;
    assert_eq!(
        row.split_whitespace().take(5).collect::<Vec<_>>(),
        ["0", &first.to_string(), "0", "fifo", "20"],
        "{status}"
    );
    assert_camera_relayed(&lab)?;

    // A restarted worker is a new process: it gets the policy again.
    sigkill(first)?;
    restarted_worker(&mcr, first, Duration::from_secs(2))?;
    let second = worker_scheduled(&mcr, (SCHED_FIFO, 20))?;
    assert_ne!(first, second);
    assert_camera_relayed(&lab)
}

#[test]
fn a_reload_switches_running_workers_between_realtime_and_time_sharing() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let rules = RulesFile::new(&camera_rules_realtime(Some("true")))?;
    let mcr = Mcr::start(&lab.relay, rules.path())?;
    let pid = worker_scheduled(&mcr, (SCHED_FIFO, 10))?;

    rules.write(&camera_rules_realtime(None))?;
    mcr.cli(&["reload"])?;
    let same = worker_scheduled(&mcr, (SCHED_OTHER, 0))?;
    assert_eq!(
        pid, same,
        "the reload restarted the worker instead of rescheduling it"
    );
    assert_eq!(mcr.workers()?[0]["scheduling"]["policy"], "normal");
    assert_camera_relayed(&lab)?;

    rules.write(&camera_rules_realtime(Some("{priority: 5}")))?;
    mcr.cli(&["reload"])?;
    assert_eq!(worker_scheduled(&mcr, (SCHED_FIFO, 5))?, pid);
    assert_camera_relayed(&lab)
}
