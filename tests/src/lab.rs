//! The standard forwarding topology and temporary rules files.
//!
//! ```text
//!  generator            relay                      sink
//!  gen0 10.1.0.1 ---- in0 10.1.0.2
//!       10.1.0.9         out0 10.2.0.1 ---- sink0 10.2.0.2
//!                        out1 10.4.0.1 ---- sink1 10.4.0.2   (sink2)
//! ```
//!
//! Every link is dual-stack: `fd01::1` (and `fd01::9`) on gen0, `fd01::2` on in0, `fd02::1`
//! on out0, `fd02::2` on sink0, `fd04::1` on out1, `fd04::2` on sink1, each /64, besides the
//! link-local addresses.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use crate::{Netns, path::with_test_path, unique_name, veth};

pub const GENERATOR: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
/// A second sender on the generator's link, for source-specific rules.
pub const GENERATOR_2: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 9);
pub const RELAY_OUT0: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);
pub const SINK: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 2);
pub const RELAY_OUT1: Ipv4Addr = Ipv4Addr::new(10, 4, 0, 1);
pub const SINK_2: Ipv4Addr = Ipv4Addr::new(10, 4, 0, 2);
pub const GENERATOR6: Ipv6Addr = Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 1);
/// A second IPv6 sender on the generator's link, for source-specific rules.
pub const GENERATOR6_2: Ipv6Addr = Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 9);
pub const RELAY6_OUT0: Ipv6Addr = Ipv6Addr::new(0xfd02, 0, 0, 0, 0, 0, 0, 1);
pub const SINK6: Ipv6Addr = Ipv6Addr::new(0xfd02, 0, 0, 0, 0, 0, 0, 2);
pub const RELAY6_OUT1: Ipv6Addr = Ipv6Addr::new(0xfd04, 0, 0, 0, 0, 0, 0, 1);
pub const SINK6_2: Ipv6Addr = Ipv6Addr::new(0xfd04, 0, 0, 0, 0, 0, 0, 2);

pub struct Lab {
    pub generator: Netns,
    pub relay: Netns,
    pub sink: Netns,
    pub sink_2: Netns,
}

impl Lab {
    pub fn new() -> anyhow::Result<Self> {
        let generator = Netns::new("gen")?;
        let relay = Netns::new("relay")?;
        let sink = Netns::new("sink")?;
        let sink_2 = Netns::new("sink2")?;
        veth(&generator, "gen0", &relay, "in0")?;
        veth(&relay, "out0", &sink, "sink0")?;
        veth(&relay, "out1", &sink_2, "sink1")?;
        generator.address("gen0", "10.1.0.1/24")?;
        generator.ip(&["addr", "add", "10.1.0.9/24", "dev", "gen0"])?;
        generator.ip(&["route", "add", "224.0.0.0/4", "dev", "gen0"])?;
        relay.address("in0", "10.1.0.2/24")?;
        relay.address("out0", "10.2.0.1/24")?;
        relay.address("out1", "10.4.0.1/24")?;
        sink.address("sink0", "10.2.0.2/24")?;
        sink_2.address("sink1", "10.4.0.2/24")?;
        for (netns, interface, address) in [
            (&generator, "gen0", "fd01::1/64"),
            (&generator, "gen0", "fd01::9/64"),
            (&relay, "in0", "fd01::2/64"),
            (&relay, "out0", "fd02::1/64"),
            (&relay, "out1", "fd04::1/64"),
            (&sink, "sink0", "fd02::2/64"),
            (&sink_2, "sink1", "fd04::2/64"),
        ] {
            netns.ip(&["-6", "addr", "add", address, "dev", interface, "nodad"])?;
        }
        Ok(Self {
            generator,
            relay,
            sink,
            sink_2,
        })
    }
}

impl Lab {
    /// The IGMP groups joined on `interface` inside the relay, from `/proc/net/igmp`.
    pub fn igmp_groups(&self, interface: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
        let text = self.relay.exec("cat", &["/proc/net/igmp"])?;
        let mut groups = Vec::new();
        let mut in_device = false;
        for line in text.lines().skip(1) {
            if !line.starts_with('\t') {
                in_device = line.split_whitespace().nth(1) == Some(interface);
                continue;
            }
            if in_device
                && let Some(hex) = line.split_whitespace().next()
                && let Ok(value) = u32::from_str_radix(hex, 16)
            {
                // The kernel prints the network-order address as a host-order number.
                groups.push(Ipv4Addr::from(value.to_ne_bytes()));
            }
        }
        Ok(groups)
    }
}

impl Lab {
    /// The IPv6 groups joined on `interface` inside the relay, from `/proc/net/igmp6`.
    pub fn mld_groups(&self, interface: &str) -> anyhow::Result<Vec<Ipv6Addr>> {
        let text = self.relay.exec("cat", &["/proc/net/igmp6"])?;
        Ok(text
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.get(1) != Some(&interface) {
                    return None;
                }
                u128::from_str_radix(fields.get(2)?, 16)
                    .ok()
                    .map(Ipv6Addr::from)
            })
            .collect())
    }
}

/// A rules file in a temporary directory, removed on drop. Its text gets the forwarding path
/// `MCR_TEST_PATH` names (see `path.rs`).
pub struct RulesFile {
    dir: PathBuf,
    path: PathBuf,
}

impl RulesFile {
    pub fn new(text: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(unique_name("rules"));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("rules.yaml");
        std::fs::write(&path, with_test_path(text))?;
        Ok(Self { dir, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the file's text in place.
    pub fn write(&self, text: &str) -> anyhow::Result<()> {
        std::fs::write(&self.path, with_test_path(text))?;
        Ok(())
    }

    /// Replaces the file the way many editors do: a new file renamed over the old one.
    pub fn rename_over(&self, text: &str) -> anyhow::Result<()> {
        let new = self.dir.join(".rules.yaml.new");
        std::fs::write(&new, with_test_path(text))?;
        std::fs::rename(&new, &self.path)?;
        Ok(())
    }
}

impl Drop for RulesFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
