//! Keeps the classifier and the data plane equal to the rules file: where a rule becomes a
//! map entry and a worker route.

use std::{
    collections::{HashMap, HashSet},
    time::Instant,
};

use mcr_common::{ANY_SOURCE, RuleKey};

use serde::{Deserialize, Serialize};

use super::dataplane::{Dataplane, resolve_origins};
use crate::{
    bpf::{Classifier, MAX_SLOT},
    config::{Config, Input, Rule},
    sockets::{egress::Origin, interfaces},
    stats::{RateMeter, RuleDrops, RuleStats, StatsReport},
};

/// The rules the supervisor runs, each with its map key, counter slot and state.
#[derive(Default)]
pub struct RuleTable {
    entries: Vec<Entry>,
    slots: SlotAllocator,
}

struct Entry {
    rule: Rule,
    /// Present while the rule is in the classifier map (and so forwarding).
    key: Option<RuleKey>,
    /// The output interfaces the rule's sockets were opened on.
    origins: Vec<Option<Origin>>,
    slot: Option<u32>,
    state: String,
    meter: RateMeter,
    output_meters: Vec<RateMeter>,
}

impl Entry {
    fn new(rule: &Rule) -> Self {
        Self {
            rule: rule.clone(),
            key: None,
            origins: Vec::new(),
            slot: None,
            state: String::new(),
            meter: RateMeter::default(),
            output_meters: Vec::new(),
        }
    }
}

/// What one `apply` did, for the log and `mcr status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplySummary {
    pub active: usize,
    pub waiting: usize,
    pub failed: usize,
}

impl RuleTable {
    /// Makes the classifier and the workers run exactly the rules of `config`, as they can
    /// run on the interfaces that exist now. New rules start before old ones stop. A rule
    /// whose name, input and interfaces did not change keeps its map entry, worker and
    /// counters, so its stream is never interrupted; if only its outputs changed, its worker
    /// switches to the new ones in one step. A rule whose interface disappeared goes back to
    /// waiting.
    pub fn apply(
        &mut self,
        classifier: &mut Classifier,
        dataplane: &mut Dataplane,
        config: &Config,
    ) -> ApplySummary {
        let mut old: Vec<Entry> = std::mem::take(&mut self.entries);

        for rule in &config.rules {
            let key = resolve(&rule.input);
            let origins = key.clone().and_then(|_| resolve_origins(rule));
            let kept = old.iter().position(|entry| {
                entry.rule.name == rule.name
                    && entry.key.is_some()
                    && entry.key == key.as_ref().ok().copied()
                    && origins.is_ok()
            });
            let entry = match (kept, key, origins) {
                (Some(i), _, Ok(origins)) => {
                    let mut entry = old.swap_remove(i);
                    if entry.rule.min_ttl != rule.min_ttl
                        && let Some(key) = entry.key
                        && let Err(error) = classifier.set_min_ttl(&key, rule.min_ttl.unwrap_or(0))
                    {
                        tracing::warn!(rule = %rule.name, %error, "new minimum TTL not applied");
                    }
                    if entry.rule.outputs != rule.outputs || entry.origins != origins {
                        entry.rule = rule.clone();
                        Self::switch_outputs(classifier, dataplane, &mut entry, origins);
                    }
                    entry.rule = rule.clone();
                    entry
                }
                (_, Ok(key), Ok(origins)) => {
                    let mut entry = Entry::new(rule);
                    self.start(classifier, dataplane, &mut entry, key, origins);
                    entry
                }
                (_, Err(reason), _) | (_, Ok(_), Err(reason)) => {
                    let mut entry = Entry::new(rule);
                    entry.state = reason;
                    entry
                }
            };
            self.entries.push(entry);
        }

        let live: HashSet<RuleKey> = self.entries.iter().filter_map(|e| e.key).collect();
        for entry in old {
            if let Some(key) = entry.key
                && !live.contains(&key)
                && let Err(error) = classifier.remove_rule(&key)
            {
                tracing::warn!(rule = %entry.rule.name, %error, "cannot remove the rule's map entry");
            }
            if let Some(slot) = entry.slot {
                if entry.key.is_some() {
                    dataplane.stop_rule(slot);
                }
                self.slots.free(slot);
            }
        }
        self.detach_unused(classifier);
        self.summary()
    }

    /// How many rules are active, waiting and failed.
    pub fn summary(&self) -> ApplySummary {
        let mut summary = ApplySummary::default();
        for entry in &self.entries {
            match (&entry.key, entry.state.as_str()) {
                (Some(_), _) => summary.active += 1,
                (None, state) if state.starts_with("waiting") => summary.waiting += 1,
                (None, _) => summary.failed += 1,
            }
        }
        summary
    }

    /// Rules per input interface that is forwarding.
    pub fn rules_per_interface(&self) -> HashMap<&str, usize> {
        let mut counts = HashMap::new();
        for entry in self.entries.iter().filter(|e| e.key.is_some()) {
            *counts
                .entry(entry.rule.input.interface.as_str())
                .or_default() += 1;
        }
        counts
    }

    fn start(
        &mut self,
        classifier: &mut Classifier,
        dataplane: &mut Dataplane,
        entry: &mut Entry,
        key: RuleKey,
        origins: Vec<Option<Origin>>,
    ) {
        if let Err(error) = classifier.attach(&entry.rule.input.interface, key.ifindex) {
            entry.state = format!("error: {error}");
            return;
        }
        let Some(slot) = self.slots.allocate() else {
            entry.state = format!("error: more than {} rules", MAX_SLOT + 1);
            return;
        };
        // The worker gets the route before the classifier steers anything to it.
        let worker =
            match dataplane.start_rule(classifier, slot, &entry.rule, key.ifindex, &origins) {
                Ok(worker) => worker,
                Err(reason) => {
                    self.slots.free(slot);
                    entry.state = reason;
                    return;
                }
            };
        let worker = u32::try_from(worker).expect("worker count is bounded by MAX_WORKERS");
        match classifier.insert_rule(&key, slot, worker, entry.rule.min_ttl.unwrap_or(0)) {
            Ok(()) => {
                entry.key = Some(key);
                entry.slot = Some(slot);
                entry.origins = origins;
                entry.state = "active".into();
                entry.meter = RateMeter::default();
                entry.output_meters = vec![RateMeter::default(); entry.rule.outputs.len()];
            }
            Err(error) => {
                dataplane.stop_rule(slot);
                self.slots.free(slot);
                entry.state = format!("error: {error}");
            }
        }
    }

    /// A running rule got new outputs (or its output interfaces changed): the worker
    /// switches over; the map entry stays.
    fn switch_outputs(
        classifier: &Classifier,
        dataplane: &mut Dataplane,
        entry: &mut Entry,
        origins: Vec<Option<Origin>>,
    ) {
        let (Some(slot), Some(key)) = (entry.slot, entry.key) else {
            return;
        };
        match dataplane.start_rule(classifier, slot, &entry.rule, key.ifindex, &origins) {
            Ok(_) => {
                entry.origins = origins;
                entry.output_meters = vec![RateMeter::default(); entry.rule.outputs.len()];
            }
            Err(reason) => {
                tracing::warn!(rule = %entry.rule.name, "new outputs not applied: {reason}");
            }
        }
    }

    fn detach_unused(&self, classifier: &mut Classifier) {
        let used: HashSet<&str> = self
            .entries
            .iter()
            .filter(|entry| entry.key.is_some())
            .map(|entry| entry.rule.input.interface.as_str())
            .collect();
        let attached: Vec<String> = classifier
            .attachments()
            .map(|(interface, _)| interface)
            .filter(|interface| !used.contains(interface.as_str()))
            .cloned()
            .collect();
        for interface in attached {
            if let Err(error) = classifier.detach(&interface) {
                tracing::warn!(%interface, %error, "cannot detach the classifier");
            }
        }
    }

    /// Takes a counter reading for the rates.
    pub fn sample(&mut self, classifier: &Classifier, dataplane: &Dataplane) {
        let now = Instant::now();
        for entry in &mut self.entries {
            let (Some(slot), Some(_)) = (entry.slot, entry.key) else {
                continue;
            };
            if let Ok(counters) = classifier.rule_counters(slot) {
                entry.meter.sample(now, counters.packets, counters.bytes);
            }
            for (meter, output) in entry
                .output_meters
                .iter_mut()
                .zip(dataplane.output_stats(slot))
            {
                meter.sample(now, output.tx_packets, output.tx_bytes);
            }
        }
    }

    /// Current counters of every rule, read now; rates from the last sample.
    pub fn report(&self, classifier: &Classifier, dataplane: &Dataplane) -> StatsReport {
        let rules = self
            .entries
            .iter()
            .map(|entry| {
                let active = entry.slot.filter(|_| entry.key.is_some());
                let counters = active
                    .and_then(|slot| classifier.rule_counters(slot).ok())
                    .unwrap_or_default();
                let mut outputs = active
                    .map(|slot| dataplane.output_stats(slot))
                    .unwrap_or_default();
                for (output, meter) in outputs.iter_mut().zip(&entry.output_meters) {
                    output.tx_pps = meter.packets_per_second();
                    output.tx_bps = meter.bits_per_second();
                }
                let drops = RuleDrops {
                    queue_full: outputs.iter().map(|o| o.queue_full).sum(),
                    send_errors: outputs.iter().map(|o| o.tx_errors).sum(),
                };
                RuleStats {
                    name: entry.rule.name.clone(),
                    input: entry.rule.input.to_string(),
                    state: entry.state.clone(),
                    rx_packets: counters.packets,
                    rx_bytes: counters.bytes,
                    rx_pps: entry.meter.packets_per_second(),
                    rx_bps: entry.meter.bits_per_second(),
                    min_ttl: entry.rule.min_ttl,
                    below_min_ttl: counters.below_min_ttl,
                    drops,
                    outputs,
                }
            })
            .collect();
        StatsReport {
            rules,
            workers: dataplane.worker_stats(),
            skipped: classifier.skip_counters().unwrap_or_default().into(),
        }
    }
}

/// The map key of `input`, or why it cannot have one yet.
fn resolve(input: &Input) -> Result<RuleKey, String> {
    let ifindex = interfaces::index(&input.interface)
        .ok_or_else(|| format!("waiting: interface {} does not exist", input.interface))?;
    Ok(RuleKey {
        ifindex,
        group: input.group.octets(),
        source: input.source.map_or(ANY_SOURCE, |source| source.octets()),
        port: input.port,
        pad: 0,
    })
}

/// Hands out counter slots; a freed slot is reused last-freed-first.
#[derive(Default)]
struct SlotAllocator {
    next: u32,
    free: Vec<u32>,
}

impl SlotAllocator {
    fn allocate(&mut self) -> Option<u32> {
        if let Some(slot) = self.free.pop() {
            return Some(slot);
        }
        if self.next > MAX_SLOT {
            return None;
        }
        self.next += 1;
        Some(self.next - 1)
    }

    fn free(&mut self, slot: u32) {
        self.free.push(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_and_bounded() {
        let mut slots = SlotAllocator::default();
        assert_eq!(slots.allocate(), Some(0));
        assert_eq!(slots.allocate(), Some(1));
        slots.free(0);
        assert_eq!(slots.allocate(), Some(0));
        for _ in 2..=MAX_SLOT {
            assert!(slots.allocate().is_some());
        }
        assert_eq!(slots.allocate(), None);
    }
}
