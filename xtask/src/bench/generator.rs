//! The generator: trafgen (netsniff-ng) sending Ethernet/IPv4/UDP multicast frames from the
//! generator namespace, paced by a token-bucket qdisc on its interface.
//!
//! trafgen's own `--rate` sends each second's packets in one burst at the start of the second,
//! and its `--gap` sleeps between packets and tops out near 40 kpps here. So trafgen writes
//! through the qdisc layer (`--qdisc-path`, blocking `sendto`, no gap) and a `tbf` qdisc on
//! `gen0` releases the frames at the requested rate, at most 80 µs worth (16 frames at low
//! rates) at a time. What was sent is read from the kernel's interface counters, not from
//! trafgen.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{process::nsenter, topology::Topology};

/// UDP source port of every generated packet.
const SOURCE_PORT: u16 = 4000;
/// IP TTL of generated packets: enough for the kernel to forward through three hops.
pub const TTL: u8 = 32;
/// Ethernet + IPv4 + UDP headers.
const HEADERS: usize = 14 + 20 + 8;

/// A stream the generator sends: a group and a UDP port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Stream {
    pub group: Ipv4Addr,
    pub port: u16,
}

pub struct Generator {
    netns: String,
    interface: String,
    config: PathBuf,
    log: PathBuf,
    frame_len: usize,
    /// trafgen's start-up and exit time, taken off its run time.
    overhead: Duration,
}

impl Generator {
    /// Writes the trafgen configuration: one frame per stream, sent round robin.
    pub fn new(
        topology: &Topology,
        streams: &[Stream],
        payload: usize,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let link = topology.input_link(1)?;
        let mut text = String::from("# written by cargo xtask bench\n");
        for stream in streams {
            let [_, b, c, d] = stream.group.octets();
            writeln!(
                text,
                "{{ eth(da=01:00:5e:{:02x}:{c:02x}:{d:02x}), \
                 ipv4(sa={}, da={}, ttl={TTL}), udp(sp={SOURCE_PORT}, dp={}), \
                 fill(0xa5, {payload}) }}",
                b & 0x7f,
                link.up_addr,
                stream.group,
                stream.port
            )?;
        }
        let config = dir.join("trafgen.cfg");
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        Ok(Self {
            netns: topology.generator().name().to_owned(),
            interface: link.up_if.clone(),
            config,
            log: dir.join("trafgen.log"),
            frame_len: HEADERS + payload,
            overhead: Duration::ZERO,
        })
    }

    /// Measures trafgen's fixed cost (start-up, exit) by sending single packets, so the run
    /// time of a trial is the time the packets took.
    pub fn calibrate(&mut self) -> anyhow::Result<()> {
        let mut fastest = Duration::MAX;
        for _ in 0..3 {
            fastest = fastest.min(self.run_trafgen(1)?);
        }
        self.overhead = fastest;
        Ok(())
    }

    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Sends `count` frames at `rate` frames per second and returns how long that took
    /// (trafgen's run time less its fixed cost). Frames still in the qdisc when trafgen exits
    /// (at most a socket buffer's worth) leave shortly after; the caller waits for the
    /// interface counter.
    pub fn send(&self, rate: f64, count: u64) -> anyhow::Result<Duration> {
        self.pace(rate)?;
        let elapsed = self.run_trafgen(count)?;
        Ok(elapsed
            .saturating_sub(self.overhead)
            .max(Duration::from_millis(1)))
    }

    fn run_trafgen(&self, count: u64) -> anyhow::Result<Duration> {
        let count = count.to_string();
        let config = self.config.to_string_lossy();
        let log = std::fs::File::create(&self.log).context("creating the trafgen log")?;
        let started = Instant::now();
        let status = nsenter(
            &self.netns,
            "trafgen",
            &[
                "--dev",
                &self.interface,
                "--conf",
                &config,
                "--qdisc-path",
                "--gap",
                "0",
                "--num",
                &count,
                "--cpus",
                "1",
                "--no-sock-mem",
                "--prio-high",
                "--notouch-irq",
                "--no-cpu-stats",
            ],
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("running trafgen")?;
        let elapsed = started.elapsed();
        if !status.success() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            bail!("trafgen failed ({status}):\n{}", log.trim());
        }
        Ok(elapsed)
    }

    /// A token bucket for `rate` frames per second holding 16 frames or 80 µs of traffic,
    /// whichever is more: frames leave in small bunches, not in the one-second bursts of
    /// trafgen's own `--rate`. (A smaller bucket makes the qdisc re-arm its timer for nearly
    /// every frame, which on a virtual machine caps the generator near 100 kpps.)
    fn pace(&self, rate: f64) -> anyhow::Result<()> {
        let frame_bits = (self.frame_len * 8) as f64;
        let bits_per_second = (rate * frame_bits).round().max(8_000.0);
        let frames_per_bucket = (rate * 80e-6).ceil().max(16.0);
        let burst = (frames_per_bucket * self.frame_len as f64).round();
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
            "8388608",
        ])
    }
}

fn run_tc(args: &[&str]) -> anyhow::Result<()> {
    super::process::run("tc", args).map(drop)
}
