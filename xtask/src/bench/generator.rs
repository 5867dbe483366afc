//! The generator: Ethernet/IP/UDP multicast frames of the scenario's family (`frame.rs`), one per stream in round
//! robin, sent by the benchmark itself from the generator namespace on packet sockets
//! (`packet_socket.rs`), in batches as they fall due (`pacing.rs`).
//!
//! Two ways to the wire, chosen by the requested rate:
//!
//! - below [`TBF_MAX_PPS`], through a `tbf` qdisc on `gen0` set to the rate, whose bucket
//!   holds 80 µs of traffic (at least 16 frames): the kernel's timer releases the frames, a
//!   few at a time, whatever the generator's own scheduling does. The generator keeps about
//!   [`TBF_LEAD`] of frames queued in front of it.
//! - from [`TBF_MAX_PPS`] up, with the qdisc bypassed (`PACKET_QDISC_BYPASS`): the qdisc's
//!   per-frame cost and its timer cap the generator there, so the generator paces alone, with
//!   the same 80 µs bucket, and waits for the next batch spinning rather than sleeping (a
//!   wake-up from sleep comes later than a batch lasts).
//!
//! What was sent is read from the kernel's interface counters, not from the generator.
//!
//! Every frame carries a stamp (`stamp.rs`): its sequence number in the trial and the time its
//! batch was handed to the kernel. In latency trials every `n`-th frame is a sample, whose
//! transmit timestamp the kernel reports back (`tx_timestamps.rs`).

use std::{
    collections::HashSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::{
    frame::{Family, FrameSpec},
    pacing::{Pacer, Step, bucket_frames},
    packet_socket::{PacketSocket, Qdisc},
    stamp::StampedFrame,
    topology::Topology,
    tx_timestamps::{ErrorQueueReader, READ_BATCH, TxStamp},
};

/// UDP source port of every generated packet.
const SOURCE_PORT: u16 = 4000;
/// IP TTL (IPv6: hop limit) of generated packets: enough for the kernel to forward through three hops.
pub const TTL: u8 = 32;
/// Requested rates from here up bypass the `tbf` qdisc (see the module comment and
/// docs/benchmark.md for the measurements behind the figure).
pub const TBF_MAX_PPS: f64 = 400_000.0;
/// How far ahead of the schedule the generator keeps the `tbf` qdisc's queue filled, to
/// absorb its own late wake-ups.
const TBF_LEAD: Duration = Duration::from_millis(1);
/// How long to wait before trying again when the qdisc refuses frames (its queue is full).
const QDISC_FULL_WAIT: Duration = Duration::from_micros(50);
/// Waits shorter than this are spun, when the generator paces alone.
const SPIN_BELOW: Duration = Duration::from_micros(200);

/// A stream the generator sends: a group and a UDP port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Stream {
    pub group: IpAddr,
    pub port: u16,
}

/// What paced a trial's frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pacing {
    /// The `tbf` qdisc on the generator interface.
    Tbf,
    /// The generator itself, with the qdisc bypassed.
    Generator,
}

/// One trial's sending.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    /// From the first frame's time slot to the end of the last one's.
    pub elapsed: Duration,
    pub pacing: Pacing,
    /// CPU time of the generator's thread (with the kernel's send path it ran), over the
    /// trial: near `elapsed` when the generator could not go faster.
    pub busy: Duration,
    /// Latency samples handed to the kernel.
    pub samples: u64,
}

/// How long to wait for the last transmit timestamps once every frame is sent: the `tbf`
/// qdisc holds a few milliseconds of frames at most.
const LAST_TIMESTAMPS_WAIT: Duration = Duration::from_millis(200);
/// With a timestamp for every sample, how long to wait for repeated reports of them.
const ALL_TIMESTAMPS_QUIET: Duration = Duration::from_millis(10);

pub struct Generator {
    netns: String,
    interface: String,
    frames: Vec<StampedFrame>,
    family: Family,
    frame_len: usize,
    through_tbf: PacketSocket,
    bypassing_qdisc: PacketSocket,
}

impl Generator {
    /// Builds the frames of `streams` with `payload` bytes, sent from the generator interface's
    /// address of `family`, and opens the sockets on that interface.
    pub fn new(
        topology: &Topology,
        streams: &[Stream],
        payload: usize,
        family: Family,
    ) -> anyhow::Result<Self> {
        let link = topology.input_link(1)?;
        let netns = topology.generator();
        let source_mac = mac_address(&netns.ip(&["-j", "link", "show", &link.up_if])?)
            .with_context(|| format!("reading the MAC address of {}", link.up_if))?;
        let frames = streams
            .iter()
            .map(|stream| {
                FrameSpec {
                    source_mac,
                    source: link.up_addr(family),
                    group: stream.group,
                    source_port: SOURCE_PORT,
                    port: stream.port,
                    ttl: TTL,
                    payload,
                }
                .bytes()
                .and_then(StampedFrame::new)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            netns: netns.name().to_owned(),
            interface: link.up_if.clone(),
            through_tbf: PacketSocket::open(netns.name(), &link.up_if, Qdisc::Through)?,
            bypassing_qdisc: PacketSocket::open(netns.name(), &link.up_if, Qdisc::Bypassed)?,
            frames,
            family,
            frame_len: family.headers() + payload,
        })
    }

    pub fn family(&self) -> Family {
        self.family
    }

    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// How frames at `rate` are paced: by the `tbf` qdisc below [`TBF_MAX_PPS`].
    pub fn pacing_for(rate: f64) -> Pacing {
        if rate < TBF_MAX_PPS {
            Pacing::Tbf
        } else {
            Pacing::Generator
        }
    }

    pub fn streams(&self) -> usize {
        self.frames.len()
    }

    /// Sends `count` frames at `rate` frames per second, paced as told, with every
    /// `sample_every`-th frame (counting from the first) a latency sample, and returns the
    /// samples' transmit timestamps (see `tx_timestamps.rs`). Frames still in the qdisc when
    /// this returns (a millisecond's worth) leave shortly after; the caller waits for the
    /// interface counter.
    pub fn send(
        &self,
        rate: f64,
        count: u64,
        pacing: Pacing,
        sample_every: Option<u64>,
    ) -> anyhow::Result<(Sent, Vec<TxStamp>)> {
        if pacing == Pacing::Tbf {
            self.pace(rate)?;
        }
        // A thread of its own, so the priority it raises is not inherited by the processes the
        // benchmark starts.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    raise_priority()?;
                    let cpu_before = thread_cpu_time()?;
                    let mut stamps = Vec::new();
                    let (elapsed, samples) =
                        self.paced(pacing, rate, count, sample_every, &mut stamps)?;
                    let sent = Sent {
                        elapsed,
                        pacing,
                        busy: thread_cpu_time()?.saturating_sub(cpu_before),
                        samples,
                    };
                    self.last_timestamps(pacing, samples, &mut stamps)?;
                    Ok((sent, stamps))
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the generator's thread panicked"))?
        })
    }

    /// Sends the trial's frames; returns how long they took and how many latency samples
    /// left, and collects the transmit timestamps that came back meanwhile into `stamps`.
    fn paced(
        &self,
        pacing: Pacing,
        rate: f64,
        count: u64,
        sample_every: Option<u64>,
        stamps: &mut Vec<TxStamp>,
    ) -> anyhow::Result<(Duration, u64)> {
        let socket = self.socket(pacing);
        let lead = match pacing {
            Pacing::Tbf => TBF_LEAD,
            Pacing::Generator => Duration::ZERO,
        };
        let mut sender = socket.sender(&self.frames);
        let mut reader = ErrorQueueReader::new();
        let start = Instant::now();
        // However slow the sender, a trial ends: four times its length and ten seconds more.
        let deadline = start + Duration::from_secs_f64(4.0 * count as f64 / rate + 10.0);
        let mut pacer = Pacer::new(rate, count, start, lead);
        let mut sent = 0;
        let mut samples = 0;
        let mut unread = 0;
        while !pacer.done() {
            let now = Instant::now();
            if now > deadline {
                bail!("sent only {sent} of {count} frames on {}", self.interface);
            }
            match pacer.next(now) {
                Step::Send(frames) => {
                    let handed = sender.send_round_robin(sent, frames, sample_every)?;
                    if handed.frames == 0 && pacing == Pacing::Tbf {
                        std::thread::sleep(QDISC_FULL_WAIT);
                    }
                    pacer.sent(handed.frames);
                    sent += handed.frames as u64;
                    samples += handed.samples as u64;
                    // A read per batch of timestamps keeps the error queue short without a
                    // read per sample; when none are back yet (the qdisc still holds their
                    // frames), the next read waits for another batch.
                    unread += handed.samples;
                    if unread >= READ_BATCH {
                        let read = socket.read_tx_timestamps(&mut reader, stamps)?;
                        unread = if read == 0 {
                            0
                        } else {
                            unread.saturating_sub(read)
                        };
                    }
                }
                Step::WaitUntil(then) => wait_until(then, pacing == Pacing::Generator),
            }
        }
        // The qdisc releases the last frames on the schedule, after the generator has queued
        // them; without it, the last frame left when it was sent, at the end of its slot.
        let end = pacer.schedule_end().max(Instant::now());
        Ok((end.saturating_duration_since(start), samples))
    }

    /// Reads transmit timestamps until there is one for each of the `samples` sent and no more
    /// came for a moment (a frame that crosses several veths may be reported by each), or none
    /// came for a while (a frame the driver dropped may have none).
    fn last_timestamps(
        &self,
        pacing: Pacing,
        samples: u64,
        stamps: &mut Vec<TxStamp>,
    ) -> anyhow::Result<()> {
        let socket = self.socket(pacing);
        let mut reader = ErrorQueueReader::new();
        let mut ids: HashSet<u32> = stamps.iter().map(|stamp| stamp.id).collect();
        let mut quiet_since = Instant::now();
        loop {
            let before = stamps.len();
            if socket.read_tx_timestamps(&mut reader, stamps)? > 0 {
                ids.extend(stamps[before..].iter().map(|stamp| stamp.id));
                quiet_since = Instant::now();
                continue;
            }
            let quiet = quiet_since.elapsed();
            if (ids.len() as u64 >= samples && quiet >= ALL_TIMESTAMPS_QUIET)
                || quiet >= LAST_TIMESTAMPS_WAIT
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn socket(&self, pacing: Pacing) -> &PacketSocket {
        match pacing {
            Pacing::Tbf => &self.through_tbf,
            Pacing::Generator => &self.bypassing_qdisc,
        }
    }

    /// A token bucket for `rate` frames per second holding the generator's bucket
    /// ([`super::pacing::BUCKET_TIME`] of traffic, at least 16 frames): frames leave in small bunches. (A smaller bucket makes
    /// the qdisc re-arm its timer for nearly every frame, which on a virtual machine caps the
    /// generator near 100 kpps.) Its queue holds twice what the generator keeps in it (the lead
    /// and a bucket): a generator ahead of that is told to wait.
    fn pace(&self, rate: f64) -> anyhow::Result<()> {
        let frame_bits = (self.frame_len * 8) as f64;
        let bits_per_second = (rate * frame_bits).round().max(8_000.0);
        let burst = bucket_frames(rate) as f64 * self.frame_len as f64;
        let queued = rate * TBF_LEAD.as_secs_f64() * self.frame_len as f64;
        run_tc(&[
            "-n",
            &self.netns,
            "qdisc",
            "replace",
            "dev",
            &self.interface,
            "root",
            "tbf",
            "rate",
            &format!("{bits_per_second:.0}bit"),
            "burst",
            &format!("{burst:.0}"),
            "limit",
            &format!("{:.0}", 2.0 * (burst + queued)),
        ])
    }
}

#[derive(Deserialize)]
struct IpLinkAddress {
    address: String,
}

/// The MAC address in `ip -j link show <interface>` output.
fn mac_address(json: &str) -> anyhow::Result<[u8; 6]> {
    let links: Vec<IpLinkAddress> = serde_json::from_str(json).context("parsing ip -j link")?;
    let link = links.first().context("no such link")?;
    let bytes: Vec<u8> = link
        .address
        .split(':')
        .map(|byte| u8::from_str_radix(byte, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC address {}", link.address))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC address {} is not six bytes", link.address))
}

/// The calling thread's run time so far, as the scheduler counts it (nanoseconds, exact).
fn thread_cpu_time() -> anyhow::Result<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat")
        .context("reading /proc/thread-self/schedstat")?;
    let nanos = text
        .split_whitespace()
        .next()
        .and_then(|ns| ns.parse().ok())
        .context("parsing /proc/thread-self/schedstat")?;
    Ok(Duration::from_nanos(nanos))
}

/// Sleeps until `then`, or until shortly before it and spins the rest.
fn wait_until(then: Instant, spin: bool) {
    loop {
        let left = then.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        if !spin {
            std::thread::sleep(left);
        } else if left > SPIN_BELOW {
            std::thread::sleep(left.saturating_sub(SPIN_BELOW));
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Makes the calling thread the generator CPU's first claim: nice −20 (as trafgen's
/// `--prio-high`, short of its real-time class, which would starve the sink's receive
/// processing on the same CPU whenever the generator runs flat out), and wake-ups on time.
fn raise_priority() -> anyhow::Result<()> {
    // SAFETY: plain system call on the calling thread (`who` 0), no memory handed over.
    let result = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, -20) };
    nix::errno::Errno::result(result).context("raising the generator thread's priority")?;
    // The sender sleeps between batches tens of microseconds apart; the default timer slack
    // (50 µs) would stretch every one of those sleeps.
    nix::sys::prctl::set_timerslack(1).context("setting the timer slack")?;
    Ok(())
}

fn run_tc(args: &[&str]) -> anyhow::Result<()> {
    super::process::run("tc", args).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_mac_address_of_a_link() {
        let json = r#"[{"ifindex":2,"ifname":"gen0","address":"1a:55:79:a5:53:28"}]"#;
        assert_eq!(
            mac_address(json).expect("a MAC"),
            [0x1a, 0x55, 0x79, 0xa5, 0x53, 0x28]
        );
        assert!(mac_address(r#"[{"address":"1a:55"}]"#).is_err());
        assert!(mac_address("[]").is_err());
    }
}
