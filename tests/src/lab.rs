//! The standard forwarding topology and temporary rules files.
//!
//! ```text
//!  generator            relay                      sink
//!  gen0 10.1.0.1 ---- in0 10.1.0.2
//!       10.1.0.9         out0 10.2.0.1 ---- sink0 10.2.0.2
//!                        out1 10.4.0.1 ---- sink1 10.4.0.2   (sink2)
//! ```

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use crate::{Netns, unique_name, veth};

pub const GENERATOR: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
/// A second sender on the generator's link, for source-specific rules.
pub const GENERATOR_2: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 9);
pub const RELAY_OUT0: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);
pub const SINK: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 2);
pub const RELAY_OUT1: Ipv4Addr = Ipv4Addr::new(10, 4, 0, 1);
pub const SINK_2: Ipv4Addr = Ipv4Addr::new(10, 4, 0, 2);

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
        Ok(Self {
            generator,
            relay,
            sink,
            sink_2,
        })
    }
}

/// A rules file in a temporary directory, removed on drop.
pub struct RulesFile {
    dir: PathBuf,
    path: PathBuf,
}

impl RulesFile {
    pub fn new(text: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(unique_name("rules"));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("rules.yaml");
        std::fs::write(&path, text)?;
        Ok(Self { dir, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the file's text.
    pub fn write(&self, text: &str) -> anyhow::Result<()> {
        std::fs::write(&self.path, text)?;
        Ok(())
    }
}

impl Drop for RulesFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
