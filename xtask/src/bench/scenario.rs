//! The scenarios of the benchmark and how each one's streams are addressed at every stage.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;
use serde::Serialize;

use super::{
    frame::Family,
    generator::Stream,
    relay::{HopPlan, MCR, MCR_2W, MCR_APART, MCR_KERNEL, MCR_RT, Output, RelayKind, Route},
    sink::Destination,
    topology::Topology,
};

#[derive(Clone, Debug, Serialize)]
pub struct Scenario {
    pub name: String,
    pub title: String,
    pub streams: usize,
    pub payload: usize,
    pub fanout: usize,
    pub hops: usize,
    /// IPv4 or IPv6, end to end: generator, relays' inputs and outputs, sink.
    pub family: Family,
    pub relays: Vec<RelayKind>,
    /// Also run a trial at the 1-hop lossless rate this scenario names (the 3-hop chain).
    pub one_hop_reference: Option<String>,
}

const KERNEL: RelayKind = RelayKind::Kernel;
const SOCAT: RelayKind = RelayKind::Socat;

fn scenario(
    name: &str,
    title: &str,
    (streams, payload, fanout, hops): (usize, usize, usize, usize),
    relays: &[RelayKind],
) -> Scenario {
    Scenario {
        name: name.to_owned(),
        title: title.to_owned(),
        streams,
        payload,
        fanout,
        hops,
        family: Family::Ipv4,
        relays: relays.to_vec(),
        one_hop_reference: (hops > 1).then(|| format!("1to1-{payload}")),
    }
}

/// Every scenario, in the order they run (the 3-hop chain after the 1-hop run it refers to).
pub fn all() -> Vec<Scenario> {
    vec![
        scenario(
            "1to1-64",
            "1 stream 1→1, 64-byte payload",
            (1, 64, 1, 1),
            &[MCR, MCR_KERNEL, KERNEL, SOCAT],
        ),
        scenario(
            "1to1-512",
            "1 stream 1→1, 512-byte payload",
            (1, 512, 1, 1),
            &[MCR, MCR_RT, MCR_2W, MCR_APART, MCR_KERNEL, KERNEL, SOCAT],
        ),
        scenario(
            "1to1-1400",
            "1 stream 1→1, 1400-byte payload",
            (1, 1400, 1, 1),
            &[MCR, MCR_KERNEL, KERNEL, SOCAT],
        ),
        scenario(
            "fanout4-512",
            "1 stream 1→4 fan-out, 512 bytes",
            (1, 512, 4, 1),
            &[MCR, MCR_KERNEL, KERNEL],
        ),
        scenario(
            "streams50-512",
            "50 streams 1→1, 512 bytes",
            (50, 512, 1, 1),
            &[MCR, MCR_2W, MCR_KERNEL, KERNEL],
        ),
        scenario(
            "3hop-512",
            "1 stream through 3 relays, 512 bytes",
            (1, 512, 1, 3),
            &[MCR, MCR_KERNEL, KERNEL, SOCAT],
        ),
        Scenario {
            family: Family::Ipv6,
            ..scenario(
                "1to1-512-v6",
                "1 stream 1→1, 512-byte payload, IPv6",
                (1, 512, 1, 1),
                &[MCR, MCR_KERNEL, KERNEL],
            )
        },
    ]
}

/// MCR's variants that only full runs measure (realtime, two workers, the input received
/// apart): `--quick` leaves them out, with or without `--scenario`.
pub const FULL_RUN_ONLY: [RelayKind; 3] = [MCR_2W, MCR_RT, MCR_APART];

/// The scenarios of `--quick`: one stream 1→1, fan-out and the 3-hop chain, without the
/// payload sweep, the 50 streams and [`FULL_RUN_ONLY`], to stay near two minutes.
pub fn quick() -> Vec<Scenario> {
    all()
        .into_iter()
        .filter(|s| ["1to1-512", "fanout4-512", "3hop-512"].contains(&s.name.as_str()))
        .map(|mut s| {
            s.relays.retain(|relay| !FULL_RUN_ONLY.contains(relay));
            s
        })
        .collect()
}

impl Scenario {
    /// Stream `i` after `stage` relays that translate: stage 0 is what the generator sends
    /// (`239.1.1.<i+1>:5000`; IPv6 `ff0e::1:<i+1>`), stage `s` is
    /// `239.<s+1>.<s+1>.<i+1>:<5000 + 1000 s>` (IPv6 `[ff0e::<s+1>:<i+1>]`, global scope).
    pub fn stream(family: Family, i: usize, stage: usize) -> anyhow::Result<Stream> {
        let stage8 = u8::try_from(stage + 1).context("too many hops")?;
        let index = u8::try_from(i + 1)
            .ok()
            .filter(|&n| n < 255)
            .context("too many streams")?;
        let group = match family {
            Family::Ipv4 => Ipv4Addr::new(239, stage8, stage8, index).into(),
            Family::Ipv6 => {
                Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0, u16::from(stage8), u16::from(index)).into()
            }
        };
        Ok(Stream {
            group,
            port: 5000 + 1000 * u16::try_from(stage).context("too many hops")?,
        })
    }

    /// What the generator sends.
    pub fn generated(&self) -> anyhow::Result<Vec<Stream>> {
        (0..self.streams)
            .map(|i| Self::stream(self.family, i, 0))
            .collect()
    }

    fn stage_stream(&self, i: usize, stage: usize, relay: RelayKind) -> anyhow::Result<Stream> {
        Self::stream(self.family, i, if relay.translates() { stage } else { 0 })
    }

    /// What the sink counts for `relay`: every stream on every sink interface.
    pub fn destinations(
        &self,
        topology: &Topology,
        relay: RelayKind,
    ) -> anyhow::Result<Vec<Destination>> {
        let mut destinations = Vec::new();
        for link in topology.output_links(self.hops) {
            for i in 0..self.streams {
                let stream = self.stage_stream(i, self.hops, relay)?;
                destinations.push(Destination {
                    interface: link.down_if.clone(),
                    group: stream.group,
                    port: stream.port,
                });
            }
        }
        Ok(destinations)
    }

    /// What each relay hop does with each stream.
    pub fn hop_plans(&self, topology: &Topology, relay: RelayKind) -> anyhow::Result<Vec<HopPlan>> {
        let family = self.family;
        let source = topology.input_link(1)?.up_addr(family);
        (1..=self.hops)
            .map(|hop| {
                let input = topology.input_link(hop)?;
                let routes = (0..self.streams)
                    .map(|i| {
                        Ok(Route {
                            input: self.stage_stream(i, hop - 1, relay)?,
                            outputs: topology
                                .output_links(hop)
                                .into_iter()
                                .map(|link| {
                                    Ok(Output {
                                        interface: link.up_if.clone(),
                                        local: link.up_addr(family),
                                        stream: self.stage_stream(i, hop, relay)?,
                                    })
                                })
                                .collect::<anyhow::Result<_>>()?,
                        })
                    })
                    .collect::<anyhow::Result<_>>()?;
                Ok(HopPlan {
                    netns: topology.nodes[hop].name().to_owned(),
                    in_interface: input.down_if.clone(),
                    in_addr: input.down_addr(family),
                    family,
                    source,
                    routes,
                })
            })
            .collect()
    }
}
