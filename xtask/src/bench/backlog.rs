//! The per-CPU receive backlog (`net.core.netdev_max_backlog`) for the length of a run.
//!
//! Packets that receive packet steering moves to a relay CPU wait in that CPU's backlog, 1000
//! packets by default. A virtual machine's CPU is sometimes taken away for milliseconds (steal
//! time), and then a backlog of 1000 overflows at 120 kpps: every relay, the kernel's own
//! forwarding included, loses packets at its input interface for reasons none of them
//! controls, and every lossless rate reads about the same. Measured on the 2-vCPU VM, kernel
//! forwarding 1→1 512 B: lossless to 114 k pps with 1000, to 424 k pps with 10,000. A router
//! that forwards at these rates is configured with a deep backlog too. The setting is global
//! (not per network namespace), so the run puts the old value back when it ends.

use anyhow::Context as _;

const SYSCTL: &str = "/proc/sys/net/core/netdev_max_backlog";
/// The backlog the benchmark runs with.
pub const RELAY_BACKLOG: u32 = 10_000;

/// Raises the backlog to [`RELAY_BACKLOG`] until dropped.
pub struct DeepBacklog {
    before: Option<u32>,
}

impl DeepBacklog {
    pub fn raise() -> anyhow::Result<Self> {
        let before: u32 = std::fs::read_to_string(SYSCTL)
            .with_context(|| format!("reading {SYSCTL}"))?
            .trim()
            .parse()
            .with_context(|| format!("parsing {SYSCTL}"))?;
        if before >= RELAY_BACKLOG {
            return Ok(Self { before: None });
        }
        std::fs::write(SYSCTL, RELAY_BACKLOG.to_string())
            .with_context(|| format!("writing {SYSCTL}"))?;
        eprintln!("bench: netdev_max_backlog {before} -> {RELAY_BACKLOG} for this run");
        Ok(Self {
            before: Some(before),
        })
    }
}

impl Drop for DeepBacklog {
    fn drop(&mut self) {
        if let Some(before) = self.before
            && let Err(error) = std::fs::write(SYSCTL, before.to_string())
        {
            eprintln!("bench: cannot put netdev_max_backlog back to {before}: {error}");
        }
    }
}
