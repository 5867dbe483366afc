//! The sink: nftables counters on the ingress hook of every sink interface, one per expected
//! destination (interface, group, port) and one for everything the interface received. The
//! kernel counts, so nothing at the sink can drop for lack of CPU the way an application can.
//! Counted packets are dropped there: the sink shares the generator's CPU, and a packet that
//! went on into the sink's IP stack would take CPU time the generator needs.

use std::{fmt::Write as _, net::IpAddr, path::Path};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::topology::Netns;

const TABLE: &str = "mcrb";

/// A destination the sink counts: packets to `group:port` arriving on `interface`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Destination {
    pub interface: String,
    pub group: IpAddr,
    pub port: u16,
}

/// The nftables match of `destination`'s packets (`ip daddr` or `ip6 daddr`, which also
/// match the packet's family in the netdev table).
fn matches(destination: &Destination) -> String {
    let family = match destination.group {
        IpAddr::V4(_) => "ip",
        IpAddr::V6(_) => "ip6",
    };
    format!(
        "{family} daddr {} udp dport {}",
        destination.group, destination.port
    )
}

/// Counter readings, in the order of the destinations and interfaces given to [`Sink::install`].
#[derive(Clone, Debug, Default)]
pub struct SinkCounts {
    pub per_destination: Vec<u64>,
    pub per_interface: Vec<u64>,
}

pub struct Sink<'a> {
    netns: &'a Netns,
    destinations: Vec<Destination>,
    interfaces: Vec<String>,
}

impl<'a> Sink<'a> {
    /// Replaces the sink's counter table with one for `destinations`.
    pub fn install(
        netns: &'a Netns,
        destinations: Vec<Destination>,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut interfaces: Vec<String> = Vec::new();
        for destination in &destinations {
            if !interfaces.contains(&destination.interface) {
                interfaces.push(destination.interface.clone());
            }
        }
        let mut text = format!("table netdev {TABLE} {{\n");
        for (j, interface) in interfaces.iter().enumerate() {
            writeln!(
                text,
                "  chain ingress_{j} {{\n    type filter hook ingress device \"{interface}\" \
                 priority 0; policy drop;"
            )?;
            for (i, destination) in destinations.iter().enumerate() {
                if &destination.interface == interface {
                    writeln!(
                        text,
                        "    {} counter comment \"d{i}\"",
                        matches(destination)
                    )?;
                }
            }
            writeln!(text, "    counter comment \"all{j}\"\n  }}")?;
        }
        text.push_str("}\n");
        let file = dir.join("sink.nft");
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        // The table of the previous relay, if any, goes first.
        let _ = netns.exec("nft", &["delete", "table", "netdev", TABLE]);
        netns.exec("nft", &["-f", &file.to_string_lossy()])?;
        Ok(Self {
            netns,
            destinations,
            interfaces,
        })
    }

    pub fn read(&self) -> anyhow::Result<SinkCounts> {
        let text = self
            .netns
            .exec("nft", &["-j", "list", "table", "netdev", TABLE])?;
        let json: serde_json::Value =
            serde_json::from_str(&text).context("parsing `nft -j list table`")?;
        let mut counts = SinkCounts {
            per_destination: vec![0; self.destinations.len()],
            per_interface: vec![0; self.interfaces.len()],
        };
        let mut found = 0;
        for item in json["nftables"].as_array().into_iter().flatten() {
            let rule = &item["rule"];
            let Some(comment) = rule["comment"].as_str() else {
                continue;
            };
            let packets = rule["expr"]
                .as_array()
                .into_iter()
                .flatten()
                .find_map(|expr| expr["counter"]["packets"].as_u64())
                .with_context(|| format!("sink rule {comment} has no counter"))?;
            let slot = if let Some(i) = comment.strip_prefix('d') {
                counts.per_destination.get_mut(i.parse::<usize>()?)
            } else if let Some(j) = comment.strip_prefix("all") {
                counts.per_interface.get_mut(j.parse::<usize>()?)
            } else {
                None
            };
            if let Some(slot) = slot {
                *slot = packets;
                found += 1;
            }
        }
        if found != self.destinations.len() + self.interfaces.len() {
            bail!(
                "the sink table has {found} of its {} counters",
                self.destinations.len() + self.interfaces.len()
            );
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_destination_is_matched_in_its_family() {
        let destination = |group: &str| Destination {
            interface: "sink0".to_owned(),
            group: group.parse().expect("a group"),
            port: 6000,
        };
        assert_eq!(
            matches(&destination("239.2.2.1")),
            "ip daddr 239.2.2.1 udp dport 6000"
        );
        assert_eq!(
            matches(&destination("ff0e::2:1")),
            "ip6 daddr ff0e::2:1 udp dport 6000"
        );
    }
}
