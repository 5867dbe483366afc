//! The kernel path's maps: each kernel-path rule's output set (`MCR_KERNEL_OUTPUTS`, keyed by
//! the rule's slot) and what the classifier sent per output (`MCR_OUTPUT_STATS`, indexed like
//! the workers' output counters, so an output's figures are the sum of both, whichever path
//! carried its packets).

//!
//! [`Planner`] works out a rule's output set: every output must leave through an Ethernet
//! interface whose MAC is known, and a unicast output's next hop must be resolved; otherwise
//! the rule runs on its worker and says why ([`NotInKernel`]).

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    net::IpAddr,
};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray};
use mcr_common::{
    KEEP_DSCP, KernelOutput, KernelOutputs, MAP_KERNEL_OUTPUTS, MAP_OUTPUT_STATS, OutputCounters,
};

use super::{BpfError, map_error};
use crate::{
    config::{Output, Rule},
    flow::Family,
    sockets::{
        egress::Origin,
        interfaces::{self, Link, LinkError},
        routes::{self, NextHopError},
    },
};

pub struct KernelPathMaps {
    pub(super) outputs: BpfHashMap<MapData, u32, KernelOutputs>,
    pub(super) stats: PerCpuArray<MapData, OutputCounters>,
}

impl KernelPathMaps {
    /// Gives rule `slot` the output set `outputs`, replacing its old one in one step.
    pub fn set(&mut self, slot: u32, outputs: &KernelOutputs) -> Result<(), BpfError> {
        self.outputs
            .insert(slot, outputs, 0)
            .map_err(map_error(MAP_KERNEL_OUTPUTS))
    }

    /// The output set of rule `slot`, if it has one.
    pub fn get(&self, slot: u32) -> Option<KernelOutputs> {
        self.outputs.get(&slot, 0).ok()
    }

    pub fn remove(&mut self, slot: u32) -> Result<(), BpfError> {
        match self.outputs.remove(&slot) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(error) => Err(map_error(MAP_KERNEL_OUTPUTS)(error)),
        }
    }

    /// What the classifier sent for output counter `counter`, summed over all CPUs.
    pub fn counters(&self, counter: u32) -> Result<OutputCounters, BpfError> {
        let per_cpu = self
            .stats
            .get(&counter, 0)
            .map_err(map_error(MAP_OUTPUT_STATS))?;
        Ok(per_cpu
            .iter()
            .fold(OutputCounters::default(), |sum, c| OutputCounters {
                packets: sum.packets + c.packets,
                bytes: sum.bytes + c.bytes,
                errors: sum.errors + c.errors,
            }))
    }
}

/// Why a rule's outputs cannot all be written by the classifier: the rule runs on its
/// worker, and `mcr stats` says this.
#[derive(Debug, thiserror::Error)]
pub enum NotInKernel {
    #[error("output interface {0}: {1}")]
    Link(String, #[source] LinkError),
    #[error("{0} is not an Ethernet interface")]
    NotEthernet(String),
    #[error(transparent)]
    NextHop(#[from] NextHopError),
    #[error(
        "output {output} is {output_family} and the input {input_family}: translating between \
         the families runs on the workers"
    )]
    Translation {
        output: String,
        output_family: Family,
        input_family: Family,
    },
    #[error("cannot write the kernel path's output set: {0}")]
    Map(#[source] BpfError),
}

/// Works out the kernel path's output sets. Interface facts are looked up once per pass
/// ([`Planner::begin`]), so one pass over many rules asks the kernel about each interface
/// once.
#[derive(Default)]
pub struct Planner {
    links: HashMap<u32, Link>,
    /// Next hops MCR asked the kernel to resolve and that have not resolved since. Each is
    /// solicited once: after that, the rule's worker sends keep asking, as any sender's do,
    /// and a next hop that never answers costs no more than that.
    solicited: HashSet<(IpAddr, u32)>,
}

impl Planner {
    /// Starts a pass over the rules: interfaces are looked up afresh.
    pub fn begin(&mut self) {
        self.links.clear();
    }

    /// The output set that relays `rule` in the classifier, if every output can be written
    /// there. `origins` are the output interfaces (see `supervisor::dataplane::resolve_origins`)
    /// and `counters` the outputs' counters, one per output. An unresolved next hop is
    /// solicited, as a send would, so that a later plan finds it.
    pub fn plan(
        &mut self,
        rule: &Rule,
        origins: &[Option<Origin>],
        counters: &[u32],
    ) -> Result<KernelOutputs, NotInKernel> {
        let input_family = Family::of(rule.input.group);
        if let Some(output) = rule
            .outputs
            .iter()
            .find(|output| Family::of(output.destination) != input_family)
        {
            return Err(NotInKernel::Translation {
                output: output.to_string(),
                output_family: Family::of(output.destination),
                input_family,
            });
        }
        let mut set = KernelOutputs::default();
        let mut smallest_mtu = u32::MAX;
        for (index, ((output, origin), &counter)) in
            rule.outputs.iter().zip(origins).zip(counters).enumerate()
        {
            let (written, mtu) = match origin {
                Some(origin) if output.destination.is_multicast() => {
                    self.multicast(output, origin, counter)?
                }
                _ => self.unicast(output, origin.as_ref(), counter)?,
            };
            set.outputs[index] = written;
            set.count += 1;
            smallest_mtu = smallest_mtu.min(mtu);
        }
        set.max_frame = smallest_mtu.saturating_add(ETHERNET_HEADER);
        Ok(set)
    }

    fn link(&mut self, ifindex: u32, name: &str) -> Result<&Link, NotInKernel> {
        match self.links.entry(ifindex) {
            Entry::Occupied(known) => Ok(known.into_mut()),
            Entry::Vacant(vacant) => {
                let link = interfaces::link_by_index(ifindex)
                    .map_err(|error| NotInKernel::Link(name.into(), error))?;
                Ok(vacant.insert(link))
            }
        }
    }

    /// A multicast output: the group's MAC, sent from the output interface.
    fn multicast(
        &mut self,
        output: &Output,
        origin: &Origin,
        counter: u32,
    ) -> Result<(KernelOutput, u32), NotInKernel> {
        let link = self.link(origin.ifindex, &origin.interface)?;
        let source_mac = ethernet_mac(link)?;
        let written = KernelOutput {
            ifindex: origin.ifindex,
            counter,
            destination_mac: routes::multicast_mac(output.destination),
            source_mac,
            source: address(origin.address),
            destination: address(output.destination),
            port: output.port,
            ttl: output.ttl,
            dscp: output.dscp.unwrap_or(KEEP_DSCP),
        };
        Ok((written, link.mtu))
    }

    /// A unicast output: to the next hop the kernel's routing names, from the output
    /// interface's address (or the route's source when the output names no interface).
    fn unicast(
        &mut self,
        output: &Output,
        origin: Option<&Origin>,
        counter: u32,
    ) -> Result<(KernelOutput, u32), NotInKernel> {
        let next_hop = match routes::next_hop(output.destination, origin.map(|o| o.ifindex)) {
            Ok(next_hop) => next_hop,
            Err(NextHopError::NotResolved {
                next_hop,
                interface,
                ifindex,
            }) => {
                if self.solicited.insert((next_hop, ifindex))
                    && let Err(error) = routes::solicit(next_hop, ifindex)
                {
                    tracing::debug!(%next_hop, %interface, %error, "cannot solicit the next hop");
                }
                return Err(NextHopError::NotResolved {
                    next_hop,
                    interface,
                    ifindex,
                }
                .into());
            }
            Err(error) => return Err(error.into()),
        };
        let resolved = next_hop.gateway.unwrap_or(output.destination);
        self.solicited.remove(&(resolved, next_hop.ifindex()));
        let source_mac = ethernet_mac(&next_hop.egress)?;
        let written = KernelOutput {
            ifindex: next_hop.ifindex(),
            counter,
            destination_mac: next_hop.destination_mac,
            source_mac,
            source: address(origin.map_or(next_hop.source, |o| o.address)),
            destination: address(output.destination),
            port: output.port,
            ttl: output.ttl,
            dscp: output.dscp.unwrap_or(KEEP_DSCP),
        };
        Ok((written, next_hop.mtu()))
    }
}

/// An address as a kernel output holds it: an IPv4 address in the first four of sixteen
/// bytes, an IPv6 address in all sixteen.
fn address(address: IpAddr) -> [u8; 16] {
    match address {
        IpAddr::V4(v4) => {
            let mut bytes = [0; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            bytes
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Ethernet header length: a frame may be this much longer than the interface's MTU.
const ETHERNET_HEADER: u32 = 14;

fn ethernet_mac(link: &Link) -> Result<[u8; 6], NotInKernel> {
    match link.mac {
        Some(mac) if link.is_ethernet() => Ok(mac),
        _ => Err(NotInKernel::NotEthernet(link.name.clone())),
    }
}
