//! One trial: a fixed number of packets at a fixed rate through the chain, with every counter
//! on the way read before and after, so the loss can be placed where it happened.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use serde::Serialize;

use super::{
    cpu::{self, CpuStat},
    generator::{Generator, Pacing},
    process::process_tree,
    relay::{Relay, RelayCounters},
    sink::{Sink, SinkCounts},
    topology::{CpuPlan, IfStats, Topology},
    tx_timestamps::TxStamp,
};

/// Loss below this fraction of the expected deliveries counts as lossless.
pub const LOSSLESS: f64 = 0.001;

/// Where the expected deliveries that did not arrive were lost, in deliveries (a packet lost
/// before a 1→4 fan-out counts four times).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Loss {
    /// Never left the generator (trafgen or its qdisc).
    pub generator: u64,
    /// Dropped entering a relay: its interface's receive backlog was full.
    pub relay_interface: u64,
    /// Dropped by the relay's socket or ring before the relay read them, or refused on send
    /// (see `RelayKind::socket_drops_source`).
    pub relay_socket: u64,
    /// Shed by MCR's classifier because the rule's worker was a full window behind (overload;
    /// see `RelayKind::shed_source`). 0 for other relays.
    pub relay_shed: u64,
    /// Received by the relay's interface but not sent, for reasons its counters do not name.
    pub relay_other: u64,
    /// Dropped entering the sink (receive backlog) or lost on the way.
    pub sink_interface: u64,
    /// Reached the sink interface but not counted at a destination.
    pub sink: u64,
    /// Expected minus delivered minus all of the above (counters of other traffic, rounding).
    pub unattributed: i64,
}

/// CPU time over a trial's window (see `cpu.rs` for what each figure includes), in seconds.
#[derive(Clone, Debug, Serialize)]
#[allow(clippy::struct_field_names, reason = "the unit in the JSON names")]
pub struct CpuUse {
    /// Length of the measurement window.
    pub window_s: f64,
    /// Busy time of the relay CPUs (wall minus idle): relay processes plus kernel work there.
    pub relay_cpus_busy_s: f64,
    /// The same by tick sampling, which over-counts on CPUs that wake per packet.
    pub relay_cpus_ticked_s: f64,
    /// Scheduler run time of the relay processes and their threads and children.
    pub relay_process_s: f64,
    /// Steal time of the relay CPUs: the hypervisor ran something else while they wanted to run.
    pub relay_cpus_steal_s: f64,
}

/// Steal time, as a share of the busy time, above which a busy time is too uncertain to use.
const MAX_STEAL_SHARE: f64 = 0.1;

impl CpuUse {
    /// Whether the relay CPUs' busy time can stand. On a VM whose idle accounting overlaps
    /// steal time the busy time reads low, by as much as the steal time, down to 0. So the
    /// steal time must be small beside the busy time (at most a tenth), the relay processes,
    /// which run on those CPUs, cannot have run longer than the CPUs were busy (a little slack
    /// for the supervisor, which may run elsewhere), and CPUs that relayed packets were not
    /// idle for the whole window. A figure that fails is shown but left out of ratios and
    /// targets; the steal check is the only one that can catch a low reading of the kernel's
    /// forwarding, which has no process.
    pub fn consistent(&self) -> bool {
        self.relay_cpus_busy_s > 0.0
            && self.relay_process_s <= self.relay_cpus_busy_s * 1.05 + 0.05
            && self.relay_cpus_steal_s <= self.relay_cpus_busy_s * MAX_STEAL_SHARE
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Trial {
    /// The requested rate, input packets per second.
    pub rate_pps: f64,
    /// Input packets sent.
    pub packets: u64,
    /// How long the generator ran.
    pub seconds: f64,
    /// Input packets per second the generator achieved (`packets / seconds`).
    pub offered_pps: f64,
    /// What paced the frames: the `tbf` qdisc, or the generator with the qdisc bypassed.
    pub pacing: Pacing,
    /// CPU time of the generator's thread while it sent (near `seconds` when it sent flat out).
    pub generator_busy_s: f64,
    /// Deliveries expected at the sink: packets × outputs per packet.
    pub expected: u64,
    pub delivered: u64,
    /// Deliveries per second over the generator's run time.
    pub delivered_pps: f64,
    pub loss_pct: f64,
    /// The generator could not keep the requested rate (it ran more than 5 % + 20 ms long).
    pub generator_limited: bool,
    pub loss: Loss,
    pub fewest_per_destination: u64,
    pub most_per_destination: u64,
    /// The relay's own counters over the trial.
    pub relay: RelayCounters,
    /// Receive backlog drops on the whole machine (`/proc/net/softnet_stat`).
    pub backlog_drops: u64,
    /// CPU seconds used by processes outside the benchmark during the trial (noise).
    pub others_s: f64,
    pub cpu: Option<CpuUse>,
}

impl Trial {
    pub fn lossless(&self) -> bool {
        self.loss_pct < LOSSLESS * 100.0
    }

    /// Whether other processes used more than 5 % of a CPU during the trial.
    pub fn noisy(&self) -> bool {
        self.others_s > 0.05 * self.seconds
    }
}

/// The latency samples of a trial as they left the generator.
#[derive(Clone, Debug, Default)]
pub struct Departures {
    /// Samples handed to the kernel.
    pub samples: u64,
    /// Their transmit timestamps, as many as came back.
    pub timestamps: Vec<TxStamp>,
}

/// Everything a trial needs: the chain, its generator and sink, and how packets multiply.
pub struct Bench<'a> {
    pub topology: &'a Topology,
    pub generator: &'a Generator,
    pub sink: &'a Sink<'a>,
    pub cpus: &'a CpuPlan,
    /// Deliveries per input packet (the fan-out).
    pub copies: u64,
    /// What paces the frames; `None`: whatever suits the rate ([`Generator::pacing_for`]).
    pub pacing: Option<Pacing>,
}

struct Snapshot {
    interfaces: Vec<BTreeMap<String, IfStats>>,
    sink: SinkCounts,
    relay: RelayCounters,
    backlog_drops: u64,
}

impl Bench<'_> {
    fn snapshot(&self, relay: Option<&Relay>) -> anyhow::Result<Snapshot> {
        Ok(Snapshot {
            interfaces: self.topology.interface_stats()?,
            sink: self.sink.read()?,
            relay: relay.map(Relay::counters).transpose()?.unwrap_or_default(),
            backlog_drops: backlog_drops()?,
        })
    }

    /// Sends `rate × seconds` packets at `rate` and accounts for every one of them.
    pub fn run(
        &self,
        relay: Option<&mut Relay>,
        rate: f64,
        seconds: f64,
        measure_cpu: bool,
    ) -> anyhow::Result<Trial> {
        self.run_sampled(relay, rate, seconds, measure_cpu, None)
            .map(|(trial, _)| trial)
    }

    /// [`Self::run`] with every `sample_every`-th packet a latency sample; returns how many
    /// samples left and their transmit timestamps too.
    pub fn run_sampled(
        &self,
        mut relay: Option<&mut Relay>,
        rate: f64,
        seconds: f64,
        measure_cpu: bool,
        sample_every: Option<u64>,
    ) -> anyhow::Result<(Trial, Departures)> {
        super::check_interrupted()?;
        if let Some(relay) = relay.as_deref_mut() {
            relay.check_running()?;
        }
        let packets = packet_count(rate, seconds);
        cpu::wait_for_quiet(&process_tree(std::process::id()));
        let before = self.snapshot(relay.as_deref())?;
        let relay_pids = relay.as_deref().map(Relay::pids).unwrap_or_default();
        let others_before = cpu::others(&process_tree(std::process::id()));
        let cpu_before = measure_cpu
            .then(|| -> anyhow::Result<_> { Ok((CpuStat::read()?, cpu::run_time(&relay_pids))) })
            .transpose()?;

        let pacing = self.pacing.unwrap_or_else(|| Generator::pacing_for(rate));
        let (sent, tx_stamps) = self.generator.send(rate, packets, pacing, sample_every)?;
        self.drain(&before, packets)?;
        if let Some(relay) = relay.as_deref() {
            let delivered = self
                .sink
                .read()?
                .per_destination
                .iter()
                .sum::<u64>()
                .saturating_sub(before.sink.per_destination.iter().sum());
            if delivered < packets * self.copies && !relay.counters_lag().is_zero() {
                std::thread::sleep(relay.counters_lag());
            }
        }

        let cpu_use = match cpu_before {
            Some((stat_before, run_before)) => {
                let stat_after = CpuStat::read()?;
                let run_after =
                    cpu::run_time(&relay.as_deref().map(Relay::pids).unwrap_or_default());
                Some(CpuUse {
                    window_s: stat_before.seconds_since(&stat_after),
                    relay_cpus_busy_s: stat_before.busy_since(&stat_after, &self.cpus.relays),
                    relay_cpus_ticked_s: stat_before
                        .ticked_busy_since(&stat_after, &self.cpus.relays),
                    relay_process_s: cpu::run_time_since(&run_before, &run_after),
                    relay_cpus_steal_s: stat_before.steal_since(&stat_after, &self.cpus.relays),
                })
            }
            None => None,
        };
        let others_s = cpu::others_since(
            &others_before,
            &cpu::others(&process_tree(std::process::id())),
        );
        if let Some(relay) = relay.as_deref_mut() {
            relay.check_running()?;
        }
        let after = self.snapshot(relay.as_deref())?;
        let mut trial = self.account(rate, packets, sent.elapsed, &before, &after, cpu_use);
        trial.others_s = others_s;
        trial.pacing = sent.pacing;
        trial.generator_busy_s = sent.busy.as_secs_f64();
        Ok((
            trial,
            Departures {
                samples: sent.samples,
                timestamps: tx_stamps,
            },
        ))
    }

    /// The sink's interfaces, in the order of the topology's links.
    pub fn sink_interfaces(&self) -> Vec<String> {
        let sink = self.topology.sink_node();
        self.topology
            .links
            .iter()
            .filter(|link| link.down == sink)
            .map(|link| link.down_if.clone())
            .collect()
    }

    /// Waits until the generator's interface has sent everything (the qdisc may still hold
    /// frames when trafgen exits) and the sink's counters have stopped moving.
    fn drain(&self, before: &Snapshot, packets: u64) -> anyhow::Result<()> {
        let generator = self.topology.generator();
        let interface = self.generator.interface();
        let sent = |stats: &BTreeMap<String, IfStats>| {
            stats
                .get(interface)
                .map_or(0, |s| s.tx_packets + s.tx_dropped)
        };
        let start = sent(&before.interfaces[0]);
        let mut last = None;
        for _ in 0..100 {
            let now = sent(&generator.interface_stats()?);
            if now.saturating_sub(start) >= packets || last == Some(now) {
                break;
            }
            last = Some(now);
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut last = None;
        let mut steady = 0;
        for _ in 0..60 {
            std::thread::sleep(Duration::from_millis(50));
            let counts = self.sink.read()?;
            let total: u64 = counts.per_interface.iter().sum();
            if last == Some(total) {
                steady += 1;
                if steady >= 2 {
                    break;
                }
            } else {
                steady = 0;
            }
            last = Some(total);
        }
        Ok(())
    }

    /// Losses along the path, link by link and relay by relay (all but the sink's own).
    fn path_losses(&self, packets: u64, before: &Snapshot, after: &Snapshot) -> Loss {
        let topology = self.topology;
        let delta = |node: usize, interface: &str| interface_delta(before, after, node, interface);
        let copies = self.copies;
        let hops = topology.hops;
        let sink_node = topology.sink_node();
        let mut loss = Loss::default();

        for link in &topology.links {
            let up = delta(link.up, &link.up_if);
            let down = delta(link.down, &link.down_if);
            let lost_on_link = down.rx_dropped + up.tx_packets.saturating_sub(down.rx_packets);
            if link.down == sink_node {
                loss.sink_interface += lost_on_link;
            } else {
                loss.relay_interface += lost_on_link * copies;
            }
            if link.up == 0 {
                loss.generator = packets.saturating_sub(up.tx_packets + down.rx_dropped) * copies;
            }
        }
        let mut relay_lost = 0;
        for hop in 1..=hops {
            let Ok(input) = topology.input_link(hop) else {
                continue;
            };
            let received = delta(hop, &input.down_if).rx_packets;
            let per_input = if hop == hops { copies } else { 1 };
            // What left the relay, including what the next interface then dropped.
            let handed_on: u64 = topology
                .output_links(hop)
                .iter()
                .map(|link| {
                    delta(hop, &link.up_if).tx_packets + delta(link.down, &link.down_if).rx_dropped
                })
                .sum();
            let dropped = (received * per_input).saturating_sub(handed_on);
            relay_lost += if hop == hops {
                dropped
            } else {
                dropped * copies
            };
        }
        let relay_counters = after.relay.since(before.relay);
        let split = RelayLoss::split(
            relay_lost,
            relay_counters.input_drops * copies + relay_counters.output_drops,
            relay_counters.shed * copies,
        );
        loss.relay_socket = split.socket;
        loss.relay_shed = split.shed;
        loss.relay_other = split.other;
        loss
    }

    fn account(
        &self,
        rate: f64,
        packets: u64,
        elapsed: Duration,
        before: &Snapshot,
        after: &Snapshot,
        cpu: Option<CpuUse>,
    ) -> Trial {
        let topology = self.topology;
        let sink_node = topology.sink_node();
        let mut loss = self.path_losses(packets, before, after);
        let relay_counters = after.relay.since(before.relay);

        let per_destination: Vec<u64> = after
            .sink
            .per_destination
            .iter()
            .zip(&before.sink.per_destination)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        let delivered: u64 = per_destination.iter().sum();
        let sink_received: u64 = topology
            .links
            .iter()
            .filter(|link| link.down == sink_node)
            .map(|link| interface_delta(before, after, sink_node, &link.down_if).rx_packets)
            .sum();
        loss.sink = sink_received.saturating_sub(delivered);

        let expected = packets * self.copies;
        let missing = i128::from(expected) - i128::from(delivered);
        let attributed = i128::from(
            loss.generator
                + loss.relay_interface
                + loss.relay_socket
                + loss.relay_shed
                + loss.relay_other
                + loss.sink_interface
                + loss.sink,
        );
        loss.unattributed = i64::try_from(missing - attributed).unwrap_or(i64::MAX);

        let seconds = elapsed.as_secs_f64();
        let nominal = packets as f64 / rate;
        Trial {
            rate_pps: rate,
            packets,
            seconds,
            offered_pps: packets as f64 / seconds,
            pacing: Pacing::Tbf,
            generator_busy_s: 0.0,
            expected,
            delivered,
            delivered_pps: delivered as f64 / seconds,
            loss_pct: if expected == 0 {
                0.0
            } else {
                100.0 * (1.0 - delivered as f64 / expected as f64)
            },
            generator_limited: seconds > nominal * 1.05 + 0.02,
            loss,
            fewest_per_destination: per_destination.iter().copied().min().unwrap_or(0),
            most_per_destination: per_destination.iter().copied().max().unwrap_or(0),
            relay: relay_counters,
            backlog_drops: after.backlog_drops.saturating_sub(before.backlog_drops),
            others_s: 0.0,
            cpu,
        }
    }
}

#[cfg(test)]
impl Trial {
    /// A lossless trial of `packets` at `rate`, for tests of what is derived from trials.
    pub fn lossless_at(rate: f64, packets: u64) -> Self {
        Self {
            rate_pps: rate,
            packets,
            seconds: packets as f64 / rate,
            offered_pps: rate,
            pacing: Pacing::Tbf,
            generator_busy_s: 0.0,
            expected: packets,
            delivered: packets,
            delivered_pps: rate,
            loss_pct: 0.0,
            generator_limited: false,
            loss: Loss::default(),
            fewest_per_destination: packets,
            most_per_destination: packets,
            relay: RelayCounters::default(),
            backlog_drops: 0,
            others_s: 0.0,
            cpu: None,
        }
    }
}

/// The deliveries lost inside the relays, by what the relays' own counters say.
#[derive(Debug, PartialEq, Eq)]
struct RelayLoss {
    socket: u64,
    shed: u64,
    other: u64,
}

impl RelayLoss {
    /// Splits `lost` (what the relays' interfaces received, times the fan-out, but did not
    /// send) into what the relays counted as dropped at a socket (`socket`) and as shed
    /// (`shed`), and the rest. A relay's counter can run ahead of its interfaces' (it is read
    /// a moment later), so each share is capped by what is left: the shares never add up to
    /// more than `lost`.
    fn split(lost: u64, socket: u64, shed: u64) -> Self {
        let socket = socket.min(lost);
        let shed = shed.min(lost - socket);
        Self {
            socket,
            shed,
            other: lost - socket - shed,
        }
    }
}

/// How an interface's counters moved between two snapshots.
fn interface_delta(before: &Snapshot, after: &Snapshot, node: usize, interface: &str) -> IfStats {
    let get = |snapshot: &Snapshot| {
        snapshot.interfaces[node]
            .get(interface)
            .copied()
            .unwrap_or_default()
    };
    let (b, a) = (get(before), get(after));
    IfStats {
        rx_packets: a.rx_packets.saturating_sub(b.rx_packets),
        rx_dropped: a.rx_dropped.saturating_sub(b.rx_dropped),
        tx_packets: a.tx_packets.saturating_sub(b.tx_packets),
        tx_dropped: a.tx_dropped.saturating_sub(b.tx_dropped),
    }
}

/// `rate × seconds`, at least one.
pub fn packet_count(rate: f64, seconds: f64) -> u64 {
    let packets = (rate * seconds).round();
    if packets.is_finite() && packets >= 1.0 {
        // In range: finite, positive, and far below 2^53 for any rate the benchmark uses.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let packets = packets as u64;
        packets
    } else {
        1
    }
}

/// Packets dropped because a CPU's receive backlog was full, summed over CPUs.
fn backlog_drops() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/net/softnet_stat").context("reading softnet_stat")?;
    Ok(text
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter_map(|dropped| u64::from_str_radix(dropped, 16).ok())
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(busy: f64, process: f64) -> CpuUse {
        CpuUse {
            window_s: 5.2,
            relay_cpus_busy_s: busy,
            relay_cpus_ticked_s: busy,
            relay_process_s: process,
            relay_cpus_steal_s: 0.0,
        }
    }

    fn stolen(busy: f64, process: f64, steal: f64) -> CpuUse {
        CpuUse {
            relay_cpus_steal_s: steal,
            ..cpu(busy, process)
        }
    }

    #[test]
    fn a_busy_time_below_the_relays_run_time_or_none_cannot_stand() {
        // Readings of one run on a VM whose idle accounting overlapped steal time.
        assert!(
            !cpu(1.075, 1.833).consistent(),
            "busy below the worker's run time"
        );
        assert!(!cpu(0.0, 0.007).consistent(), "no busy time while relaying");
        assert!(!cpu(0.0, 0.0).consistent());
        // Readings that stand: MCR (the supervisor may run on another CPU), the kernel's
        // forwarding (no process), MCR's kernel path (the supervisor only).
        assert!(cpu(2.572, 2.109).consistent());
        assert!(cpu(2.128, 2.160).consistent());
        assert!(cpu(1.938, 0.0).consistent());
        assert!(cpu(0.854, 0.006).consistent());
    }

    #[test]
    fn a_busy_time_with_much_steal_beside_it_cannot_stand() {
        // The kernel's forwarding in one run's 5 s CPU trials: more than a tenth of the busy
        // time stolen, which the run-time check cannot see (no process).
        assert!(!stolen(0.853, 0.0, 0.510).consistent());
        assert!(!stolen(0.656, 0.0, 0.720).consistent());
        assert!(!stolen(1.014, 0.0, 0.410).consistent());
        // MCR's kernel path (the supervisor only) in the same run.
        assert!(!stolen(1.338, 0.006, 0.210).consistent());
        // Readings of the same run that stand: MCR's worker path, the kernel's forwarding
        // with little steal.
        assert!(stolen(2.542, 2.145, 0.040).consistent());
        assert!(stolen(2.619, 2.402, 0.200).consistent());
        assert!(stolen(2.350, 0.0, 0.050).consistent());
        assert!(stolen(1.0, 0.0, 0.1).consistent(), "a tenth is allowed");
    }

    #[test]
    fn relay_loss_is_split_into_socket_shed_and_the_rest() {
        assert_eq!(
            RelayLoss::split(1_000, 100, 600),
            RelayLoss {
                socket: 100,
                shed: 600,
                other: 300
            }
        );
        // Overload on MCR's worker path: everything lost was shed.
        assert_eq!(
            RelayLoss::split(4_000, 0, 4_000),
            RelayLoss {
                socket: 0,
                shed: 4_000,
                other: 0
            }
        );
        // Counters ahead of the interfaces: the shares stop at what was lost.
        assert_eq!(
            RelayLoss::split(500, 300, 400),
            RelayLoss {
                socket: 300,
                shed: 200,
                other: 0
            }
        );
        assert_eq!(
            RelayLoss::split(200, 300, 400),
            RelayLoss {
                socket: 200,
                shed: 0,
                other: 0
            }
        );
        // A relay without such counters: all of it is "other".
        assert_eq!(
            RelayLoss::split(70, 0, 0),
            RelayLoss {
                socket: 0,
                shed: 0,
                other: 70
            }
        );
    }
}
