//! The benchmark's network: a chain of namespaces joined by veth pairs, generator → relay
//! (one or more hops) → sink, with the last relay joined to the sink by one link per fan-out
//! output. Every name starts with [`PREFIX`] so the end-to-end tests' sweep (`mcrt-`) never
//! sees them; everything is removed when the [`Topology`] drops.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::Context as _;
use serde::Deserialize;

use super::{
    frame::Family,
    process::{nsenter, run},
};

/// Prefix of every namespace, pin directory and socket the benchmark creates.
pub const PREFIX: &str = "mcrb-";

/// A network namespace, deleted (with every interface in it) when dropped.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `mcrb-<pid>-<n>-<label>` with loopback up and reverse-path filtering off. For
    /// IPv4 scenarios IPv6 is off (no neighbour discovery or MLD chatter in the counters); for
    /// IPv6 ones it is on, with what chatter it can do without switched off: no duplicate
    /// address detection (an address is usable the moment it is added) and no router
    /// solicitations.
    pub fn create(label: &str, family: Family) -> anyhow::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}-{label}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        netns.sysctl(&[
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ])?;
        match family {
            Family::Ipv4 => netns.sysctl(&[
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ])?,
            // `default` is what the veths added later start from.
            Family::Ipv6 => netns.sysctl(&[
                "net.ipv6.conf.all.disable_ipv6=0",
                "net.ipv6.conf.default.disable_ipv6=0",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.all.router_solicitations=0",
                "net.ipv6.conf.default.router_solicitations=0",
            ])?,
        }
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <name> args…`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `program args…` in the namespace and returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let output = nsenter(&self.name, program, args)
            .output()
            .with_context(|| format!("starting {program} in {}", self.name))?;
        if !output.status.success() {
            anyhow::bail!(
                "{program} {} in {} failed: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Sets `key=value` sysctls (`/proc/sys/net` is per network namespace).
    pub fn sysctl(&self, settings: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["-q"];
        for setting in settings {
            args.extend(["-w", setting]);
        }
        self.exec("sysctl", &args).map(drop)
    }

    /// Steers the receive processing of `interface` (RPS) to the CPUs in `mask`. Sysfs shows
    /// a namespace's devices only when mounted inside it, which `ip netns exec` does.
    pub fn steer_rx(&self, interface: &str, mask: u64) -> anyhow::Result<()> {
        let script = format!("echo {mask:x} > /sys/class/net/{interface}/queues/rx-0/rps_cpus");
        run("ip", &["netns", "exec", &self.name, "sh", "-c", &script]).map(drop)
    }

    /// Turns off UDP segmentation offload on `interface` (see [`Topology::build`] for why)
    /// and checks that it is off.
    pub fn split_udp_segments(&self, interface: &str) -> anyhow::Result<()> {
        let ethtool = |args: &[&str]| {
            let mut full = vec!["netns", "exec", self.name.as_str(), "ethtool"];
            full.extend_from_slice(args);
            run("ip", &full).with_context(|| {
                format!(
                    "ethtool {} in {} (ethtool is installed by cargo xtask setup)",
                    args.join(" "),
                    self.name
                )
            })
        };
        ethtool(&["-K", interface, "tx-udp-segmentation", "off"])?;
        match udp_segmentation_offloaded(&ethtool(&["-k", interface])?) {
            Some(false) => Ok(()),
            Some(true) => anyhow::bail!(
                "tx-udp-segmentation of {interface} in {} is still on after ethtool -K … off",
                self.name
            ),
            None => anyhow::bail!(
                "ethtool -k {interface} in {} does not list tx-udp-segmentation",
                self.name
            ),
        }
    }

    /// Counters of every interface in the namespace, by name.
    pub fn interface_stats(&self) -> anyhow::Result<BTreeMap<String, IfStats>> {
        let text = self.ip(&["-s", "-j", "link", "show"])?;
        let links: Vec<IpLink> = serde_json::from_str(&text)
            .with_context(|| format!("parsing `ip -s -j link show` of {}", self.name))?;
        Ok(links
            .into_iter()
            .map(|link| {
                let stats = link.stats64.unwrap_or_default();
                (
                    link.ifname,
                    IfStats {
                        rx_packets: stats.rx.packets,
                        rx_dropped: stats.rx.dropped,
                        tx_packets: stats.tx.packets,
                        tx_dropped: stats.tx.dropped,
                    },
                )
            })
            .collect())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("bench: cleanup: {error:#}");
        }
    }
}

#[derive(Deserialize)]
struct IpLink {
    ifname: String,
    stats64: Option<IpStats>,
}

#[derive(Default, Deserialize)]
struct IpStats {
    rx: IpCounters,
    tx: IpCounters,
}

#[derive(Default, Deserialize)]
struct IpCounters {
    packets: u64,
    dropped: u64,
}

/// Whether `ethtool -k` output says `tx-udp-segmentation` is on; `None` when it is not listed.
fn udp_segmentation_offloaded(features: &str) -> Option<bool> {
    features.lines().find_map(|line| {
        let state = line.trim().strip_prefix("tx-udp-segmentation:")?;
        Some(state.trim_start().starts_with("on"))
    })
}

/// The kernel's counters of one interface.
#[derive(Clone, Copy, Debug, Default)]
pub struct IfStats {
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

/// One veth pair: `up_if` in node `up` sends towards `down_if` in node `down`. Each end has an
/// IPv4 address, and in IPv6 scenarios an IPv6 one too.
#[derive(Clone, Debug)]
pub struct Link {
    pub up: usize,
    pub up_if: String,
    pub up_v4: Ipv4Addr,
    pub up_v6: Ipv6Addr,
    pub down: usize,
    pub down_if: String,
    pub down_v4: Ipv4Addr,
    pub down_v6: Ipv6Addr,
}

impl Link {
    /// The upstream end's address of `family`.
    pub fn up_addr(&self, family: Family) -> IpAddr {
        match family {
            Family::Ipv4 => self.up_v4.into(),
            Family::Ipv6 => self.up_v6.into(),
        }
    }

    /// The downstream end's address of `family`.
    pub fn down_addr(&self, family: Family) -> IpAddr {
        match family {
            Family::Ipv4 => self.down_v4.into(),
            Family::Ipv6 => self.down_v6.into(),
        }
    }
}

/// Which CPUs do what: the generator (and the benchmark itself, and the sink's receive
/// processing) on one, relays and their receive processing on the others.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CpuPlan {
    pub generator: usize,
    pub relays: Vec<usize>,
}

impl CpuPlan {
    pub fn relay_mask(&self) -> u64 {
        self.relays.iter().fold(0, |mask, cpu| mask | (1 << cpu))
    }

    pub fn generator_mask(&self) -> u64 {
        1 << self.generator
    }

    /// `1,2,3` for taskset.
    pub fn relay_list(&self) -> String {
        let cpus: Vec<String> = self.relays.iter().map(ToString::to_string).collect();
        cpus.join(",")
    }

    /// The generator's and the relays' CPUs, for taskset.
    pub fn all_list(&self) -> String {
        let mut cpus = self.relays.clone();
        cpus.push(self.generator);
        cpus.sort_unstable();
        cpus.dedup();
        let cpus: Vec<String> = cpus.iter().map(ToString::to_string).collect();
        cpus.join(",")
    }
}

/// Nodes `0` (generator), `1..=hops` (relays) and `hops + 1` (sink).
pub struct Topology {
    pub nodes: Vec<Netns>,
    pub links: Vec<Link>,
    pub hops: usize,
    pub family: Family,
}

impl Topology {
    /// Link `k` uses `10.(k+1).0.1` upstream and `10.(k+1).0.2` downstream, and for `family`
    /// IPv6 also `fd00:(k+1)::1` and `fd00:(k+1)::2` (a /64 each). Interfaces: `gen0` → `in0`
    /// of relay 1, `out0` → `in0` between relays, `out<j>` → `sink<j>` into the sink.
    ///
    /// Every interface a relay sends from has UDP segmentation offload (`tx-udp-segmentation`)
    /// off. A relay that sends a batch of one flow's datagrams as one GSO packet (MCR's
    /// workers do) hands the kernel one super-packet for N datagrams. Before a real wire it is
    /// split into N packets, by the NIC or, for a NIC without the offload, by the kernel on
    /// the sending CPU. A veth advertises the offload and carries the super-packet whole into
    /// the next namespace: the sink's counters and latency tap would count one packet where
    /// the wire carries N, and the splitting would be done by the receiving side's CPU. With
    /// the offload off the kernel splits it before the veth, on the relay's CPU, as for a NIC
    /// without UDP segmentation offload: the relay pays for the splitting, the conservative
    /// case. The kernel's forwarding, socat and MCR's kernel path never send such packets, so
    /// the setting changes nothing for them; it is the same for every relay.
    pub fn build(
        hops: usize,
        fanout: usize,
        family: Family,
        cpus: &CpuPlan,
    ) -> anyhow::Result<Self> {
        let mut nodes = vec![Netns::create("gen", family)?];
        for hop in 1..=hops {
            let relay = Netns::create(&format!("relay{hop}"), family)?;
            relay.sysctl(&["net.ipv4.ip_forward=1"])?;
            if family == Family::Ipv6 {
                relay.sysctl(&["net.ipv6.conf.all.forwarding=1"])?;
            }
            nodes.push(relay);
        }
        nodes.push(Netns::create("sink", family)?);
        let sink = hops + 1;

        let mut links = Vec::new();
        for up in 0..hops {
            let up_if = if up == 0 { "gen0" } else { "out0" };
            links.push((up, up_if.to_owned(), up + 1, "in0".to_owned()));
        }
        for j in 0..fanout {
            links.push((hops, format!("out{j}"), sink, format!("sink{j}")));
        }
        let links: Vec<Link> = links
            .into_iter()
            .enumerate()
            .map(|(k, (up, up_if, down, down_if))| {
                let subnet = u8::try_from(k + 1).context("too many links for 10.x.0.0/24")?;
                Ok(Link {
                    up,
                    up_if,
                    up_v4: Ipv4Addr::new(10, subnet, 0, 1),
                    up_v6: Ipv6Addr::new(0xfd00, u16::from(subnet), 0, 0, 0, 0, 0, 1),
                    down,
                    down_if,
                    down_v4: Ipv4Addr::new(10, subnet, 0, 2),
                    down_v6: Ipv6Addr::new(0xfd00, u16::from(subnet), 0, 0, 0, 0, 0, 2),
                })
            })
            .collect::<anyhow::Result<_>>()?;

        let topology = Self {
            nodes,
            links,
            hops,
            family,
        };
        for link in &topology.links {
            topology.connect(link)?;
            if (1..=hops).contains(&link.up) {
                topology.nodes[link.up].split_udp_segments(&link.up_if)?;
            }
        }
        // Relays and the sink route everything else upstream (nothing depends on it; it
        // keeps the source addresses reachable for anyone who checks).
        for node in 1..=sink {
            let link = topology
                .links
                .iter()
                .find(|link| link.down == node)
                .context("a node without an upstream link")?;
            topology.nodes[node].ip(&[
                "route",
                "add",
                "default",
                "via",
                &link.up_v4.to_string(),
            ])?;
            if family == Family::Ipv6 {
                topology.nodes[node].ip(&[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &link.up_v6.to_string(),
                ])?;
            }
        }
        topology.steer_relay_inputs(cpus.relay_mask())?;
        for link in topology.links.iter().filter(|link| link.down == sink) {
            topology.nodes[sink].steer_rx(&link.down_if, cpus.generator_mask())?;
        }
        Ok(topology)
    }

    fn connect(&self, link: &Link) -> anyhow::Result<()> {
        let up = &self.nodes[link.up];
        let down = &self.nodes[link.down];
        run(
            "ip",
            &[
                "link",
                "add",
                &link.up_if,
                "netns",
                up.name(),
                "type",
                "veth",
                "peer",
                "name",
                &link.down_if,
                "netns",
                down.name(),
            ],
        )?;
        for (node, interface, v4, v6) in [
            (up, &link.up_if, link.up_v4, link.up_v6),
            (down, &link.down_if, link.down_v4, link.down_v6),
        ] {
            node.ip(&["addr", "add", &format!("{v4}/24"), "dev", interface])?;
            if self.family == Family::Ipv6 {
                // `nodad`: usable at once, not after a second of duplicate address detection.
                let address = format!("{v6}/64");
                node.ip(&["-6", "addr", "add", &address, "dev", interface, "nodad"])?;
            }
            node.ip(&["link", "set", interface, "up"])?;
        }
        Ok(())
    }

    pub fn generator(&self) -> &Netns {
        &self.nodes[0]
    }

    pub fn sink(&self) -> &Netns {
        &self.nodes[self.hops + 1]
    }

    pub fn sink_node(&self) -> usize {
        self.hops + 1
    }

    /// Steers the receive processing of every relay's input to the CPUs in `mask`.
    pub fn steer_relay_inputs(&self, mask: u64) -> anyhow::Result<()> {
        for hop in 1..=self.hops {
            let link = self.input_link(hop)?;
            self.nodes[hop].steer_rx(&link.down_if, mask)?;
        }
        Ok(())
    }

    /// The link into relay `hop` (1-based).
    pub fn input_link(&self, hop: usize) -> anyhow::Result<&Link> {
        self.links
            .iter()
            .find(|link| link.down == hop)
            .with_context(|| format!("no link into node {hop}"))
    }

    /// The links out of relay `hop` (1-based).
    pub fn output_links(&self, hop: usize) -> Vec<&Link> {
        self.links.iter().filter(|link| link.up == hop).collect()
    }

    /// Interface counters of every node, indexed like `nodes`.
    pub fn interface_stats(&self) -> anyhow::Result<Vec<BTreeMap<String, IfStats>>> {
        self.nodes.iter().map(Netns::interface_stats).collect()
    }
}

/// Removes `mcrb-` namespaces, pins and sockets left by benchmark runs that no longer exist
/// (a run that was killed cannot clean up after itself). Names carry the run's pid.
pub fn sweep_stale() {
    let own = std::process::id();
    let stale = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            return false;
        };
        let Some(pid) = rest
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            return false;
        };
        pid != own && !std::path::Path::new(&format!("/proc/{pid}")).exists()
    };
    if let Ok(list) = run("ip", &["netns", "list"]) {
        for name in list
            .lines()
            .filter_map(|line| line.split_whitespace().next())
        {
            if stale(name) {
                eprintln!("bench: removing namespace {name} left by an earlier run");
                let _ = run("ip", &["netns", "del", name]);
            }
        }
    }
    for dir in ["/sys/fs/bpf", "/run/mcr", "/run"] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if stale(&name) {
                eprintln!("bench: removing {dir}/{name} left by an earlier run");
                let path = entry.path();
                let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines around it in `ethtool -k` of a veth (ethtool 6.1): the tunnel variant must
    /// not be taken for it.
    const VETH_FEATURES: &str = "Features for out0:\n\
        generic-segmentation-offload: on\n\
        \ttx-udp_tnl-segmentation: on\n\
        \ttx-udp_tnl-csum-segmentation: on\n\
        \ttx-udp-segmentation: STATE\n\
        rx-udp-gro-forwarding: off\n";

    #[test]
    fn ethtool_features_say_whether_udp_segmentation_is_offloaded() {
        let with = |state: &str| VETH_FEATURES.replace("STATE", state);
        assert_eq!(udp_segmentation_offloaded(&with("on")), Some(true));
        assert_eq!(udp_segmentation_offloaded(&with("off")), Some(false));
        assert_eq!(udp_segmentation_offloaded(&with("on [fixed]")), Some(true));
        assert_eq!(
            udp_segmentation_offloaded(&with("off [requested on]")),
            Some(false)
        );
        let without = VETH_FEATURES.replace("\ttx-udp-segmentation: STATE\n", "");
        assert_eq!(udp_segmentation_offloaded(&without), None);
    }
}
