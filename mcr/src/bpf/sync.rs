//! Keeps the classifier's maps equal to the rules file: where a rule becomes a map entry.

use std::{collections::HashSet, time::Instant};

use mcr_common::{ANY_SOURCE, RuleKey};

use super::{Classifier, MAX_SLOT};
use crate::{
    config::{Config, Input, Rule},
    stats::{RateMeter, RuleStats, StatsReport},
};

/// The rules the supervisor runs, each with its map key, counter slot and state.
#[derive(Default)]
pub struct RuleTable {
    entries: Vec<Entry>,
    slots: SlotAllocator,
}

struct Entry {
    rule: Rule,
    /// Present while the rule is in the classifier map.
    key: Option<RuleKey>,
    slot: Option<u32>,
    state: String,
    meter: RateMeter,
}

/// What one `apply` did, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub active: usize,
    pub waiting: usize,
    pub failed: usize,
}

impl RuleTable {
    /// Makes the classifier match exactly the rules of `config`. New entries go in before old
    /// ones come out, and a rule whose name and input did not change keeps its map entry and
    /// counters untouched, so its stream is never interrupted.
    pub fn apply(&mut self, classifier: &mut Classifier, config: &Config) -> ApplySummary {
        let mut old: Vec<Entry> = std::mem::take(&mut self.entries);
        let mut summary = ApplySummary::default();

        for rule in &config.rules {
            let resolved = resolve(&rule.input);
            let kept = old.iter().position(|entry| {
                entry.rule.name == rule.name
                    && entry.key.is_some()
                    && entry.key == resolved.as_ref().ok().copied()
            });
            let mut entry = match kept {
                Some(i) => {
                    let mut entry = old.swap_remove(i);
                    entry.rule = rule.clone();
                    entry
                }
                None => Entry {
                    rule: rule.clone(),
                    key: None,
                    slot: None,
                    state: String::new(),
                    meter: RateMeter::default(),
                },
            };
            if entry.key.is_none() {
                match resolved {
                    Ok(key) => self.start(classifier, &mut entry, key),
                    Err(reason) => entry.state = reason,
                }
            }
            match (&entry.key, entry.state.as_str()) {
                (Some(_), _) => summary.active += 1,
                (None, state) if state.starts_with("waiting") => summary.waiting += 1,
                (None, _) => summary.failed += 1,
            }
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
                self.slots.free(slot);
            }
        }
        self.detach_unused(classifier);
        summary
    }

    fn start(&mut self, classifier: &mut Classifier, entry: &mut Entry, key: RuleKey) {
        let interface = &entry.rule.input.interface;
        if let Err(error) = classifier.attach(interface) {
            entry.state = format!("error: {error}");
            return;
        }
        let Some(slot) = entry.slot.or_else(|| self.slots.allocate()) else {
            entry.state = format!("error: more than {} rules", MAX_SLOT + 1);
            return;
        };
        entry.slot = Some(slot);
        match classifier.insert_rule(&key, slot) {
            Ok(()) => {
                entry.key = Some(key);
                entry.state = "active".into();
                entry.meter = RateMeter::default();
            }
            Err(error) => entry.state = format!("error: {error}"),
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
            .attached_interfaces()
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
    pub fn sample(&mut self, classifier: &Classifier) {
        let now = Instant::now();
        for entry in &mut self.entries {
            if let Some(slot) = entry.slot
                && entry.key.is_some()
                && let Ok(counters) = classifier.rule_counters(slot)
            {
                entry.meter.sample(now, counters);
            }
        }
    }

    /// Current counters of every rule, read from the maps now; rates from the last sample.
    pub fn report(&self, classifier: &Classifier) -> StatsReport {
        let rules = self
            .entries
            .iter()
            .map(|entry| {
                let counters = entry
                    .slot
                    .filter(|_| entry.key.is_some())
                    .and_then(|slot| classifier.rule_counters(slot).ok())
                    .unwrap_or_default();
                RuleStats {
                    name: entry.rule.name.clone(),
                    input: entry.rule.input.to_string(),
                    state: entry.state.clone(),
                    rx_packets: counters.packets,
                    rx_bytes: counters.bytes,
                    rx_pps: entry.meter.packets_per_second(),
                    rx_bps: entry.meter.bits_per_second(),
                }
            })
            .collect();
        StatsReport {
            rules,
            skipped: classifier.skip_counters().unwrap_or_default().into(),
        }
    }
}

/// The map key of `input`, or why it cannot have one yet.
fn resolve(input: &Input) -> Result<RuleKey, String> {
    let ifindex = nix::net::if_::if_nametoindex(input.interface.as_str())
        .map_err(|_| format!("waiting: interface {} does not exist", input.interface))?;
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
