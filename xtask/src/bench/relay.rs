//! The relays under test, started in the relay namespaces of a topology and stopped (by pid)
//! when their guard drops:
//!
//! - **MCR**: `mcr run` (release build) with a rules file per hop, its own pin directory and
//!   control socket under the `mcrb-` prefix; workers pinned to the relay CPUs. The rules file
//!   names the path (`settings.path`), and the relay counts as started only when every rule
//!   is active on that path, so a row labelled `mcr-kernel` is never the worker path.
//!   `mcr-apart` is the worker path with its input received on the generator's CPU (RPS)
//!   instead of the relay's, the layout the README recommends where there are cores for it.
//! - **kernel**: the kernel's multicast forwarding, programmed by `smcrouted` with static
//!   (S,G) routes (IPv4's `ipmr` or IPv6's `ip6mr`, by the scenario's family). It cannot
//!   change the group or port, so its streams arrive unchanged.
//! - **socat**: one `socat -u UDP4-RECV … UDP4-SENDTO …` per stream and hop, the plain
//!   user-space relay (IPv4 scenarios only).

use std::{
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use mcr_tests::wait_for;
use serde::Serialize;

use super::{
    frame::Family,
    generator::{Stream, TTL},
    process::{Daemon, nsenter, process_tree},
    topology::{CpuPlan, PREFIX},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayKind {
    /// `realtime`: the workers run `SCHED_FIFO` (`settings.realtime: true`).
    /// `receive_apart`: the relay's input is received (RPS) on the generator's CPU, not on
    /// the relay's, which then does only the workers' part.
    Mcr {
        workers: usize,
        path: McrPath,
        realtime: bool,
        receive_apart: bool,
    },
    Kernel,
    Socat,
}

/// Which of MCR's paths writes the outputs (`settings.path` in the rules file).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum McrPath {
    /// The workers: the classifier steers each packet to a worker process.
    Worker,
    /// The classifier rewrites and clones the packet itself.
    Kernel,
}

impl McrPath {
    /// The word MCR uses, in the rules file and in `mcr stats --json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Worker => "worker",
            Self::Kernel => "kernel",
        }
    }
}

/// MCR on the worker path, one worker.
pub const MCR: RelayKind = RelayKind::Mcr {
    workers: 1,
    path: McrPath::Worker,
    realtime: false,
    receive_apart: false,
};
/// MCR on the worker path, one worker under `SCHED_FIFO` (`settings.realtime`).
pub const MCR_RT: RelayKind = RelayKind::Mcr {
    workers: 1,
    path: McrPath::Worker,
    realtime: true,
    receive_apart: false,
};
/// MCR on the worker path, two workers.
pub const MCR_2W: RelayKind = RelayKind::Mcr {
    workers: 2,
    path: McrPath::Worker,
    realtime: false,
    receive_apart: false,
};
/// MCR on the kernel path.
pub const MCR_KERNEL: RelayKind = RelayKind::Mcr {
    workers: 1,
    path: McrPath::Kernel,
    realtime: false,
    receive_apart: false,
};
/// MCR on the worker path, one worker, its input received on another CPU than the worker's.
pub const MCR_APART: RelayKind = RelayKind::Mcr {
    workers: 1,
    path: McrPath::Worker,
    realtime: false,
    receive_apart: true,
};

impl RelayKind {
    /// Every relay the benchmark knows.
    pub const ALL: [Self; 7] = [
        MCR,
        MCR_RT,
        MCR_2W,
        MCR_APART,
        MCR_KERNEL,
        Self::Kernel,
        Self::Socat,
    ];

    pub fn label(self) -> String {
        let Self::Mcr {
            workers,
            path,
            realtime,
            receive_apart,
        } = self
        else {
            return match self {
                Self::Kernel => "kernel",
                _ => "socat",
            }
            .to_owned();
        };
        let mut label = match path {
            McrPath::Worker => "mcr".to_owned(),
            McrPath::Kernel => "mcr-kernel".to_owned(),
        };
        if workers != 1 {
            let _ = write!(label, "-{workers}w");
        }
        if realtime {
            label.push_str("-rt");
        }
        if receive_apart {
            label.push_str("-apart");
        }
        label
    }

    /// Whether the relay can re-publish on another group and port.
    pub fn translates(self) -> bool {
        !matches!(self, Self::Kernel)
    }

    pub fn is_mcr(self) -> bool {
        matches!(self, Self::Mcr { .. })
    }

    /// Whether the relay's input is received on the generator's CPU (see [`MCR_APART`]).
    pub fn receives_apart(self) -> bool {
        matches!(
            self,
            Self::Mcr {
                receive_apart: true,
                ..
            }
        )
    }

    /// What this relay's loss column "relay socket" means.
    pub fn socket_drops_source(self) -> &'static str {
        match self {
            Self::Mcr {
                path: McrPath::Worker,
                ..
            } => {
                "MCR's own counters: workers' kernel_drops (AF_PACKET) + rules' queue_full and send_errors"
            }
            Self::Mcr {
                path: McrPath::Kernel,
                ..
            } => {
                "MCR's own counters: rules' send_errors (copies the kernel refused to send), plus what the workers dropped of packets handed to them (kernel_drops, queue_full)"
            }
            Self::Kernel => "none (no socket)",
            Self::Socat => {
                "Udp RcvbufErrors and SndbufErrors of the relay namespace (/proc/net/snmp)"
            }
        }
    }

    /// What this relay's loss column "relay shed" means.
    pub fn shed_source(self) -> &'static str {
        match self {
            Self::Mcr {
                path: McrPath::Worker,
                ..
            } => {
                "MCR's own counters: rules' shed (packets the classifier dropped because their worker was a full window behind)"
            }
            Self::Mcr {
                path: McrPath::Kernel,
                ..
            } => {
                "MCR's own counters: rules' shed, of the packets the kernel path hands to a worker (over an output's MTU) when that worker is a full window behind"
            }
            Self::Kernel | Self::Socat => "none (no such counter)",
        }
    }
}

/// One input stream of a hop and where it goes.
#[derive(Clone, Debug)]
pub struct Route {
    pub input: Stream,
    pub outputs: Vec<Output>,
}

#[derive(Clone, Debug)]
pub struct Output {
    pub interface: String,
    /// The relay's own address on `interface`, of the scenario's family.
    pub local: IpAddr,
    pub stream: Stream,
}

/// What one relay hop does.
#[derive(Clone, Debug)]
pub struct HopPlan {
    pub netns: String,
    pub in_interface: String,
    pub in_addr: IpAddr,
    /// The generator's address: the S of the kernel's (S,G) routes.
    pub source: IpAddr,
    pub routes: Vec<Route>,
    pub family: Family,
}

/// Where relays find their binary, write their files, and run.
pub struct RelayEnv<'a> {
    pub dir: &'a Path,
    pub mcr: &'a Path,
    pub cpus: &'a CpuPlan,
}

/// Counters a relay keeps about itself (summed over hops).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct RelayCounters {
    /// Packets the relay application received (MCR: classified by its eBPF program).
    pub received: u64,
    /// Packets it sent.
    pub sent: u64,
    /// Packets the kernel dropped before the relay could read them (socket or ring full).
    pub input_drops: u64,
    /// Copies the relay could not send (send queue or socket buffer full, send errors).
    pub output_drops: u64,
    /// Input packets MCR's classifier dropped because the rule's worker was a full window
    /// behind (its rules' `shed`); 0 for other relays.
    pub shed: u64,
    /// MCR's workers: sends the kernel accepted, and the packets they carried (a run of
    /// datagrams is one send); 0 for other relays.
    pub worker_sends: u64,
    pub worker_sent: u64,
}

impl RelayCounters {
    pub fn since(self, before: Self) -> Self {
        Self {
            received: self.received.saturating_sub(before.received),
            sent: self.sent.saturating_sub(before.sent),
            input_drops: self.input_drops.saturating_sub(before.input_drops),
            output_drops: self.output_drops.saturating_sub(before.output_drops),
            shed: self.shed.saturating_sub(before.shed),
            worker_sends: self.worker_sends.saturating_sub(before.worker_sends),
            worker_sent: self.worker_sent.saturating_sub(before.worker_sent),
        }
    }

    /// Packets per send of MCR's workers, once they sent anything.
    pub fn per_send(&self) -> Option<f64> {
        (self.worker_sends > 0).then(|| self.worker_sent as f64 / self.worker_sends as f64)
    }
}

impl std::ops::AddAssign for RelayCounters {
    fn add_assign(&mut self, hop: Self) {
        self.received += hop.received;
        self.sent += hop.sent;
        self.input_drops += hop.input_drops;
        self.output_drops += hop.output_drops;
        self.shed += hop.shed;
        self.worker_sends += hop.worker_sends;
        self.worker_sent += hop.worker_sent;
    }
}

/// A running relay (all hops). Dropping it stops every process and removes their files.
pub struct Relay {
    pub kind: RelayKind,
    daemons: Vec<Daemon>,
    hops: Vec<HopPlan>,
    mcr: PathBuf,
    mcr_sockets: Vec<PathBuf>,
}

impl Relay {
    pub fn start(kind: RelayKind, hops: &[HopPlan], env: &RelayEnv) -> anyhow::Result<Self> {
        let mut relay = Self {
            kind,
            daemons: Vec::new(),
            hops: hops.to_vec(),
            mcr: env.mcr.to_owned(),
            mcr_sockets: Vec::new(),
        };
        for (index, hop) in hops.iter().enumerate() {
            let tag = format!("{PREFIX}{}-{}-h{}", std::process::id(), unique(), index + 1);
            match kind {
                RelayKind::Mcr {
                    workers,
                    path,
                    realtime,
                    ..
                } => {
                    relay.start_mcr(hop, workers, path, realtime, &tag, env)?;
                }
                RelayKind::Kernel => relay.start_kernel(hop, &tag, env)?,
                RelayKind::Socat => relay.start_socat(hop, &tag, env)?,
            }
        }
        Ok(relay)
    }

    fn start_mcr(
        &mut self,
        hop: &HopPlan,
        workers: usize,
        path: McrPath,
        realtime: bool,
        tag: &str,
        env: &RelayEnv,
    ) -> anyhow::Result<()> {
        let mut yaml = format!(
            "# written by cargo xtask bench\nsettings:\n  workers: {workers}\n  cpus: [{}]\n  path: {}\n  realtime: {realtime}\nrules:\n",
            env.cpus.relay_list(),
            path.name()
        );
        for (i, route) in hop.routes.iter().enumerate() {
            write!(
                yaml,
                "  - name: s{i}\n    input:\n      interface: {}\n      group: {}\n      port: {}\n    outputs:\n",
                hop.in_interface, route.input.group, route.input.port
            )?;
            for output in &route.outputs {
                write!(
                    yaml,
                    "      - interface: {}\n        destination: {}\n        port: {}\n        ttl: {TTL}\n",
                    output.interface, output.stream.group, output.stream.port
                )?;
            }
        }
        let config = env.dir.join(format!("{tag}.yaml"));
        std::fs::write(&config, yaml).with_context(|| format!("writing {}", config.display()))?;
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{tag}"));
        let socket = PathBuf::from(format!("/run/mcr/{tag}.sock"));
        // MCR pins its workers itself (`settings.cpus`) and checks those CPUs against the ones
        // it may run on, so the supervisor gets every CPU back (the benchmark's own mask is
        // the generator's CPU).
        let mut command = nsenter(
            &hop.netns,
            "taskset",
            &["-c", &env.cpus.all_list(), &self.mcr.to_string_lossy()],
        );
        command
            .args(["run", "--log-level", "info", "--config"])
            .arg(&config)
            .arg("--pin-dir")
            .arg(&pin_dir);
        let mut daemon = Daemon::spawn(
            &format!("mcr in {}", hop.netns),
            command,
            &env.dir.join(format!("{tag}.log")),
        )?;
        daemon.remove_on_stop(pin_dir);
        daemon.remove_on_stop(socket.clone());
        self.daemons.push(daemon);
        let daemon = self.daemons.last_mut().context("no daemon")?;
        let ready = wait_for(Duration::from_secs(15), || {
            if daemon.has_exited() {
                return Some(false);
            }
            socket.exists().then_some(true)
        });
        if ready != Some(true) {
            bail!(
                "mcr did not start in {}; its log:\n{}",
                hop.netns,
                daemon.log_tail()
            );
        }
        self.mcr_sockets.push(socket.clone());
        // Rules become active once the workers and the classifier are in place, and take
        // the kernel path once MCR has found every output's MAC.
        let mcr = self.mcr.clone();
        let ready = wait_for(Duration::from_secs(10), || {
            let rules = mcr_json(&mcr, &socket, false).ok()?;
            all_active_on(&rules, path).then_some(())
        });
        if ready.is_none() {
            let states = mcr_json(&self.mcr, &socket, false)
                .map_or_else(|error| format!("{error:#}"), |rules| rule_states(&rules));
            bail!(
                "mcr's rules in {} are not all active on the {} path after 10 s: {states}",
                hop.netns,
                path.name()
            );
        }
        Ok(())
    }

    fn start_kernel(&mut self, hop: &HopPlan, tag: &str, env: &RelayEnv) -> anyhow::Result<()> {
        let mut interfaces = vec![hop.in_interface.clone()];
        let mut routes = String::new();
        for route in &hop.routes {
            let mut outs = Vec::new();
            for output in &route.outputs {
                if output.stream != route.input {
                    bail!("the kernel's forwarding cannot change a stream's group or port");
                }
                if !interfaces.contains(&output.interface) {
                    interfaces.push(output.interface.clone());
                }
                outs.push(output.interface.clone());
            }
            writeln!(
                routes,
                "mroute from {} source {} group {} to {}",
                hop.in_interface,
                hop.source,
                route.input.group,
                outs.join(" ")
            )?;
        }
        let mut conf = String::from("# written by cargo xtask bench\n");
        for interface in &interfaces {
            writeln!(conf, "phyint {interface} enable")?;
        }
        conf.push_str(&routes);
        let conf_path = env.dir.join(format!("{tag}.conf"));
        std::fs::write(&conf_path, conf)
            .with_context(|| format!("writing {}", conf_path.display()))?;
        let pid_file = PathBuf::from(format!("/run/{tag}.pid"));
        let socket = PathBuf::from(format!("/run/{tag}.sock"));
        let mut command = nsenter(&hop.netns, "smcrouted", &[]);
        command
            .args(["-n", "-N", "-l", "notice", "-i", tag, "-f"])
            .arg(&conf_path)
            .arg("-P")
            .arg(&pid_file)
            .arg("-u")
            .arg(&socket);
        let mut daemon = Daemon::spawn(
            &format!("smcrouted in {}", hop.netns),
            command,
            &env.dir.join(format!("{tag}.log")),
        )?;
        daemon.remove_on_stop(pid_file.clone());
        daemon.remove_on_stop(socket);
        self.daemons.push(daemon);
        let daemon = self.daemons.last_mut().context("no daemon")?;
        let netns = hop.netns.clone();
        let expected = hop.routes.len();
        let cache_file = mroute_files(hop.family).cache;
        let ready = wait_for(Duration::from_secs(10), || {
            if daemon.has_exited() {
                return Some(false);
            }
            let cache = nsenter(&netns, "cat", &[cache_file]).output().ok()?;
            let routes = String::from_utf8_lossy(&cache.stdout)
                .lines()
                .count()
                .saturating_sub(1);
            (pid_file.exists() && routes >= expected).then_some(true)
        });
        if ready != Some(true) {
            bail!(
                "smcrouted did not install {expected} routes in {}; its log:\n{}",
                hop.netns,
                daemon.log_tail()
            );
        }
        Ok(())
    }

    fn start_socat(&mut self, hop: &HopPlan, tag: &str, env: &RelayEnv) -> anyhow::Result<()> {
        if hop.family != Family::Ipv4 {
            bail!("the benchmark runs socat in IPv4 scenarios only");
        }
        for (i, route) in hop.routes.iter().enumerate() {
            let [output] = route.outputs.as_slice() else {
                bail!("socat relays one stream to one output");
            };
            let receive = format!(
                "UDP4-RECV:{},ip-add-membership={}:{}",
                route.input.port, route.input.group, hop.in_addr
            );
            let send = format!(
                "UDP4-SENDTO:{}:{},ip-multicast-if={local},ip-multicast-ttl={TTL},bind={local}",
                output.stream.group,
                output.stream.port,
                local = output.local
            );
            let mut command = pinned(&hop.netns, env.cpus, "socat");
            command.args(["-u", &receive, &send]);
            let daemon = Daemon::spawn(
                &format!("socat in {}", hop.netns),
                command,
                &env.dir.join(format!("{tag}-{i}.log")),
            )?;
            self.daemons.push(daemon);
            let daemon = self.daemons.last_mut().context("no daemon")?;
            let pid = daemon.pid().context("socat has no pid")?;
            let port = format!(":{:04X}", route.input.port);
            let ready = wait_for(Duration::from_secs(5), || {
                if daemon.has_exited() {
                    return Some(false);
                }
                let table = std::fs::read_to_string(format!("/proc/{pid}/net/udp")).ok()?;
                table
                    .lines()
                    .skip(1)
                    .any(|line| {
                        line.split_whitespace()
                            .nth(1)
                            .is_some_and(|local| local.ends_with(&port))
                    })
                    .then_some(true)
            });
            if ready != Some(true) {
                bail!(
                    "socat did not start in {}; its log:\n{}",
                    hop.netns,
                    daemon.log_tail()
                );
            }
        }
        Ok(())
    }

    /// How long the relay's own counters may lag behind: MCR's supervisor reads the kernel's
    /// per-socket drop counts of its workers once a second. (Rule and output counters, the
    /// kernel path's included, are read when asked.)
    pub fn counters_lag(&self) -> Duration {
        match self.kind {
            RelayKind::Mcr {
                path: McrPath::Worker,
                ..
            } => Duration::from_millis(1_100),
            _ => Duration::ZERO,
        }
    }

    /// The relay's processes and all their descendants (MCR's workers), alive now.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .daemons
            .iter()
            .filter_map(Daemon::pid)
            .flat_map(process_tree)
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Fails with the log of a process that exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        self.daemons.iter_mut().try_for_each(Daemon::check_running)
    }

    /// The relay's own view of what it received, sent and dropped, summed over hops.
    pub fn counters(&self) -> anyhow::Result<RelayCounters> {
        let mut total = RelayCounters::default();
        match self.kind {
            RelayKind::Mcr { .. } => {
                for socket in &self.mcr_sockets {
                    let rules = mcr_json(&self.mcr, socket, false)?;
                    let workers = mcr_json(&self.mcr, socket, true)?;
                    total += mcr_counters(&rules, &workers);
                }
            }
            RelayKind::Socat => {
                for hop in &self.hops {
                    let udp = udp_counters(&hop.netns)?;
                    total.received += udp.in_datagrams;
                    total.sent += udp.out_datagrams;
                    total.input_drops += udp.rcvbuf_errors;
                    total.output_drops += udp.sndbuf_errors;
                }
            }
            RelayKind::Kernel => {
                for hop in &self.hops {
                    let (received, sent) =
                        mroute_counters(&hop.netns, hop.family, &hop.in_interface)?;
                    total.received += received;
                    total.sent += sent;
                }
            }
        }
        Ok(total)
    }

    /// `mcr stats` (the table) of every hop, for the log of a run.
    pub fn describe(&self) -> String {
        let mut text = String::new();
        for socket in &self.mcr_sockets {
            let output = Command::new(&self.mcr)
                .args(["stats", "--control-socket"])
                .arg(socket)
                .output();
            if let Ok(output) = output {
                text.push_str(&String::from_utf8_lossy(&output.stdout));
            }
        }
        text
    }
}

/// One MCR instance's counters from `mcr stats --json` (`rules`) and `mcr stats --json
/// --workers` (`workers`). Shed packets are not in a rule's `rx_packets` (the classifier
/// counts a packet as one or the other), and the rules' `shed` and the workers' count the
/// same packets, so only the rules' is taken.
fn mcr_counters(rules: &serde_json::Value, workers: &serde_json::Value) -> RelayCounters {
    let mut counters = RelayCounters::default();
    for rule in rules.as_array().into_iter().flatten() {
        counters.received += rule["rx_packets"].as_u64().unwrap_or(0);
        counters.output_drops += rule["drops"]["queue_full"].as_u64().unwrap_or(0)
            + rule["drops"]["send_errors"].as_u64().unwrap_or(0);
        counters.shed += rule["shed"].as_u64().unwrap_or(0);
        for output in rule["outputs"].as_array().into_iter().flatten() {
            counters.sent += output["tx_packets"].as_u64().unwrap_or(0);
        }
    }
    for worker in workers.as_array().into_iter().flatten() {
        counters.input_drops += worker["kernel_drops"].as_u64().unwrap_or(0);
        counters.worker_sends += worker["sends"].as_u64().unwrap_or(0);
        counters.worker_sent += worker["sent"].as_u64().unwrap_or(0);
    }
    counters
}

/// Whether `mcr stats --json` shows rules, all of them active on `path`.
fn all_active_on(rules: &serde_json::Value, path: McrPath) -> bool {
    rules.as_array().is_some_and(|rules| {
        !rules.is_empty()
            && rules
                .iter()
                .all(|rule| rule["state"] == "active" && rule["path"] == path.name())
    })
}

/// Each rule's name, state, path and reason, from `mcr stats --json`.
fn rule_states(rules: &serde_json::Value) -> String {
    let Some(rules) = rules.as_array().filter(|rules| !rules.is_empty()) else {
        return format!("no rules ({rules})");
    };
    let field =
        |rule: &serde_json::Value, key: &str| rule[key].as_str().unwrap_or("none").to_owned();
    rules
        .iter()
        .map(|rule| {
            let mut text = format!(
                "{}: {}, path {}",
                field(rule, "name"),
                field(rule, "state"),
                field(rule, "path")
            );
            if let Some(reason) = rule["reason"].as_str() {
                write!(text, " ({reason})").unwrap_or_default();
            }
            text
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A number no other relay of this run uses.
fn unique() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// `nsenter … taskset -c <relay CPUs> program`: a relay process on the relay CPUs.
fn pinned(netns: &str, cpus: &CpuPlan, program: &str) -> Command {
    nsenter(netns, "taskset", &["-c", &cpus.relay_list(), program])
}

fn mcr_json(mcr: &Path, socket: &Path, workers: bool) -> anyhow::Result<serde_json::Value> {
    let mut command = Command::new(mcr);
    command.args(["stats", "--json"]);
    if workers {
        command.arg("--workers");
    }
    let output = command
        .arg("--control-socket")
        .arg(socket)
        .output()
        .context("running mcr stats")?;
    if !output.status.success() {
        bail!(
            "mcr stats failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout).context("parsing mcr stats --json")
}

#[derive(Default)]
struct UdpCounters {
    in_datagrams: u64,
    out_datagrams: u64,
    rcvbuf_errors: u64,
    sndbuf_errors: u64,
}

/// The `Udp:` lines of a namespace's `/proc/net/snmp`.
fn udp_counters(netns: &str) -> anyhow::Result<UdpCounters> {
    let output = nsenter(netns, "cat", &["/proc/net/snmp"])
        .output()
        .context("reading /proc/net/snmp")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut lines = text.lines().filter(|line| line.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no Udp counters in /proc/net/snmp of {netns}");
    };
    let mut counters = UdpCounters::default();
    for (name, value) in names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
    {
        let value = value.parse().unwrap_or(0);
        match name {
            "InDatagrams" => counters.in_datagrams = value,
            "OutDatagrams" => counters.out_datagrams = value,
            "RcvbufErrors" => counters.rcvbuf_errors = value,
            "SndbufErrors" => counters.sndbuf_errors = value,
            _ => {}
        }
    }
    Ok(counters)
}

/// Where the kernel shows its multicast routes and virtual interfaces for a family.
struct MrouteFiles {
    cache: &'static str,
    vifs: &'static str,
}

fn mroute_files(family: Family) -> MrouteFiles {
    match family {
        Family::Ipv4 => MrouteFiles {
            cache: "/proc/net/ip_mr_cache",
            vifs: "/proc/net/ip_mr_vif",
        },
        Family::Ipv6 => MrouteFiles {
            cache: "/proc/net/ip6_mr_cache",
            vifs: "/proc/net/ip6_mr_vif",
        },
    }
}

/// Packets in on `in_interface` and out on all other interfaces, from `/proc/net/ip_mr_vif`
/// (IPv6: `ip6_mr_vif`, the same columns up to the flags).
fn mroute_counters(netns: &str, family: Family, in_interface: &str) -> anyhow::Result<(u64, u64)> {
    let file = mroute_files(family).vifs;
    let output = nsenter(netns, "cat", &[file])
        .output()
        .with_context(|| format!("reading {file}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let (mut received, mut sent) = (0, 0);
    // Interface BytesIn PktsIn BytesOut PktsOut Flags (IPv4: Local Remote), after the vif
    // index.
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(name), Some(pkts_in), Some(pkts_out)) = (
            fields.get(1),
            fields.get(3).and_then(|v| v.parse::<u64>().ok()),
            fields.get(5).and_then(|v| v.parse::<u64>().ok()),
        ) else {
            continue;
        };
        if *name == in_interface {
            received += pkts_in;
        } else {
            sent += pkts_out;
        }
    }
    Ok((received, sent))
}

#[cfg(test)]
mod tests {
    use mcr::{
        config::Scheduling,
        state::{ForwardingPath, RuleState},
        stats::{OutputStats, RuleDrops, RuleStats, WorkerStats},
        status::{WorkerState, WorkerStatus},
    };
    use serde_json::json;

    use super::*;

    #[test]
    fn a_relay_is_ready_when_every_rule_is_active_on_its_path() {
        let kernel = json!([
            {"name": "s0", "state": "active", "path": "kernel"},
            {"name": "s1", "state": "active", "path": "kernel"},
        ]);
        assert!(all_active_on(&kernel, McrPath::Kernel));
        assert!(!all_active_on(&kernel, McrPath::Worker));
        let mixed = json!([
            {"name": "s0", "state": "active", "path": "kernel"},
            {"name": "s1", "state": "active", "path": "worker",
             "reason": "out0 is not an Ethernet interface"},
        ]);
        assert!(!all_active_on(&mixed, McrPath::Kernel));
        let waiting = json!([{"name": "s0", "state": "waiting", "reason": "no in0"}]);
        assert!(!all_active_on(&waiting, McrPath::Worker));
        assert!(!all_active_on(&json!([]), McrPath::Worker));
        assert_eq!(
            rule_states(&mixed),
            "s0: active, path kernel; s1: active, path worker (out0 is not an Ethernet interface)"
        );
        assert_eq!(rule_states(&waiting), "s0: waiting, path none (no in0)");
    }

    /// A worker-path rule of `mcr stats --json` with these counters, serialized from MCR's own
    /// type so that a renamed field fails here rather than reading as 0.
    fn rule(rx_packets: u64, shed: u64, queue_full: u64, tx_packets: &[u64]) -> RuleStats {
        RuleStats {
            name: "s0".into(),
            input: "in0:239.1.1.1:5000".into(),
            state: RuleState::Active {
                path: ForwardingPath::Worker,
                reason: None,
            },
            rx_packets,
            rx_bytes: rx_packets * 512,
            rx_pps: 0.0,
            rx_bps: 0.0,
            min_ttl: None,
            below_min_ttl: 0,
            to_worker: 0,
            shed,
            drops: RuleDrops {
                queue_full,
                send_errors: 1,
            },
            outputs: tx_packets
                .iter()
                .enumerate()
                .map(|(j, &tx_packets)| OutputStats {
                    interface: Some(format!("out{j}")),
                    destination: "239.2.2.1:6000".into(),
                    ttl: TTL,
                    dscp: None,
                    tx_packets,
                    tx_bytes: tx_packets * 512,
                    tx_errors: 0,
                    queue_full: 0,
                    tx_pps: 0.0,
                    tx_bps: 0.0,
                })
                .collect(),
        }
    }

    fn worker(index: usize, shed: u64, kernel_drops: u64) -> WorkerStats {
        WorkerStats {
            process: WorkerStatus {
                worker: index,
                pid: Some(100),
                cpu: Some(1),
                state: WorkerState::Running,
                restarts: 0,
                scheduling: Scheduling::Normal,
            },
            received: 10,
            backlog: 0,
            shed,
            kernel_drops,
            malformed: 0,
            too_big: 0,
            no_rule: 0,
            no_buffer: 0,
            sends: 100 + index as u64,
            sent: 400,
        }
    }

    #[test]
    fn mcr_counters_take_shed_from_the_rules_apart_from_socket_drops() {
        let rules = serde_json::to_value(vec![
            rule(1_000, 300, 4, &[990, 990]),
            rule(500, 20, 0, &[500]),
        ])
        .expect("serializable");
        // The workers count the same shed packets as the rules: not added twice.
        let workers =
            serde_json::to_value(vec![worker(0, 300, 7), worker(1, 20, 2)]).expect("serializable");
        let counters = mcr_counters(&rules, &workers);
        assert_eq!(counters.received, 1_500);
        assert_eq!(counters.sent, 2_480);
        assert_eq!(counters.shed, 320);
        assert_eq!(counters.input_drops, 9);
        assert_eq!(counters.output_drops, 4 + 1 + 1);
        assert_eq!((counters.worker_sends, counters.worker_sent), (201, 800));

        let before = RelayCounters {
            shed: 20,
            ..counters
        };
        assert_eq!(counters.since(before).shed, 300);
        // The hops of a chain add up, the workers' sends too.
        let mut chain = counters;
        chain += counters;
        assert_eq!((chain.worker_sends, chain.worker_sent), (402, 1_600));
        assert_eq!(chain.received, 3_000);
    }

    #[test]
    fn labels_name_the_path_and_the_workers() {
        let labels: Vec<String> = RelayKind::ALL.iter().map(|kind| kind.label()).collect();
        assert_eq!(
            labels,
            [
                "mcr",
                "mcr-rt",
                "mcr-2w",
                "mcr-apart",
                "mcr-kernel",
                "kernel",
                "socat"
            ]
        );
        assert!(MCR_APART.receives_apart());
        assert!(!MCR.receives_apart() && !RelayKind::Kernel.receives_apart());
    }
}
