//! Keeps the classifier and the data plane equal to the rules file: where a rule becomes a
//! map entry and a worker route.
//!
//! A rule keeps its counters for as long as it is in the rules file: its ingress counter slot
//! and one counter per output are allocated when the rule first appears and released when it
//! is removed. A rule that waits for an interface keeps them, so its figures continue when it
//! starts again; a reload that changes an output's TTL keeps that output's counter.

use std::{
    collections::{HashMap, HashSet},
    time::Instant,
};

use mcr_common::{
    KernelOutputs, MAX_RULES, PATH_KERNEL, PATH_WORKER, RULE_LOCAL_DELIVERY, RuleSlot,
};

use serde::{Deserialize, Serialize};

use super::dataplane::{Dataplane, resolve_origins};
use crate::{
    bpf::{
        Classifier,
        outputs::{NotInKernel, Planner},
    },
    config::{Config, Input, Output, PathChoice, Rule},
    counters::{MAX_OUTPUTS, OutputTotals},
    flow::FlowKey,
    sockets::{egress::Origin, interfaces},
    state::{ForwardingPath, RuleState, StartError, Waiting},
    stats::{OutputStats, RateMeter, RuleDrops, RuleStats, StatsReport},
    status::RuleStatus,
};

/// The rules the supervisor runs, each with its map key, counters and state.
#[derive(Default)]
pub struct RuleTable {
    entries: Vec<Entry>,
    /// Rules of the file that could not even get counters, with why (shown as failed).
    unplaced: Vec<(Rule, String)>,
    planner: Planner,
    slots: IdAllocator<{ MAX_RULES as usize }>,
    output_counters: IdAllocator<MAX_OUTPUTS>,
}

/// One output's counter: an index into the owning worker's counter block, and the block's
/// reading when the output got it (a released counter may be handed out again).
struct OutputCounter {
    counter: u32,
    baseline: OutputTotals,
    meter: RateMeter,
}

struct Entry {
    rule: Rule,
    /// Index of the rule's ingress counters; held while the rule is in the rules file.
    slot: u32,
    /// One per output of `rule`, in the same order.
    outputs: Vec<OutputCounter>,
    /// Present while the rule is in the classifier map (and so forwarding).
    key: Option<FlowKey>,
    /// The outputs the data plane runs, and the interfaces their sockets were opened on.
    running_outputs: Vec<Output>,
    origins: Vec<Option<Origin>>,
    /// The classifier's map entry for `key`, as last written.
    value: Option<RuleSlot>,
    /// The rule's output set in the classifier, while it runs on the kernel path.
    kernel: Option<KernelOutputs>,
    state: RuleState,
    meter: RateMeter,
}

/// What one `apply` did, for the log and `mcr status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplySummary {
    pub active: usize,
    pub waiting: usize,
    pub failed: usize,
    /// Active rules on the kernel path.
    pub kernel: usize,
}

impl RuleTable {
    /// Makes the classifier and the workers run exactly the rules of `config`, as they can
    /// run on the interfaces that exist now. New rules start before old ones stop. A rule
    /// whose name and input did not change keeps its map entry, worker and counters, so its
    /// stream is never interrupted; if only its outputs changed, its worker switches to the
    /// new ones in one step. A rule whose interface disappeared goes back to waiting.
    pub fn apply(
        &mut self,
        classifier: &mut Classifier,
        dataplane: &mut Dataplane,
        config: &Config,
    ) -> ApplySummary {
        let mut old: Vec<Entry> = std::mem::take(&mut self.entries);
        self.unplaced.clear();
        for rule in &config.rules {
            let existing = old
                .iter()
                .position(|entry| entry.rule.name == rule.name && entry.rule.input == rule.input)
                .map(|i| old.swap_remove(i));
            let entry = match existing {
                Some(mut entry) => {
                    self.update_outputs(classifier, dataplane, &mut entry, &rule.outputs);
                    entry.rule = rule.clone();
                    entry
                }
                None => match self.new_entry(classifier, dataplane, rule) {
                    Ok(entry) => entry,
                    Err(error) => {
                        tracing::error!(rule = %rule.name, %error, "rule not started");
                        self.unplaced.push((rule.clone(), error.to_string()));
                        continue;
                    }
                },
            };
            self.entries.push(entry);
        }
        // Keys of rules that keep running: a renamed rule takes its old key over, which the
        // old entry's removal must not delete.
        let mut running: HashSet<FlowKey> = HashSet::new();
        self.planner.begin();
        for index in 0..self.entries.len() {
            self.bring_up(classifier, dataplane, index);
            if let Some(key) = self.entries[index].key {
                running.insert(key);
            }
        }
        for entry in old {
            self.remove(classifier, dataplane, entry, &running);
        }
        self.detach_unused(classifier);
        self.summary()
    }

    /// How many rules are active, waiting and failed.
    pub fn summary(&self) -> ApplySummary {
        let mut summary = ApplySummary {
            failed: self.unplaced.len(),
            ..ApplySummary::default()
        };
        for entry in &self.entries {
            match entry.state {
                RuleState::Active { path, .. } => {
                    summary.active += 1;
                    if path == ForwardingPath::Kernel {
                        summary.kernel += 1;
                    }
                }
                RuleState::Waiting { .. } => summary.waiting += 1,
                RuleState::Failed { .. } => summary.failed += 1,
            }
        }
        summary
    }

    /// Every rule with its state, in the rules file's order.
    pub fn rule_states(&self) -> Vec<RuleStatus> {
        self.entries
            .iter()
            .map(|entry| RuleStatus {
                name: entry.rule.name.clone(),
                state: entry.state.clone(),
            })
            .chain(self.unplaced.iter().map(|(rule, reason)| RuleStatus {
                name: rule.name.clone(),
                state: RuleState::Failed {
                    reason: reason.clone(),
                },
            }))
            .collect()
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

    /// A table entry for a rule that was not in the table: its slot (counters zeroed) and
    /// its output counters. It starts in `bring_up`.
    fn new_entry(
        &mut self,
        classifier: &mut Classifier,
        dataplane: &Dataplane,
        rule: &Rule,
    ) -> Result<Entry, StartError> {
        let slot = self.slots.allocate().ok_or(StartError::NoSlot(MAX_RULES))?;
        if let Err(error) = classifier.clear_rule_counters(slot) {
            self.slots.free(slot);
            return Err(StartError::Map(error));
        }
        let mut entry = Entry {
            rule: rule.clone(),
            slot,
            outputs: Vec::new(),
            key: None,
            running_outputs: Vec::new(),
            origins: Vec::new(),
            value: None,
            kernel: None,
            state: RuleState::Waiting {
                reason: "not started yet".into(),
            },
            meter: RateMeter::default(),
        };
        self.update_outputs(classifier, dataplane, &mut entry, &rule.outputs);
        Ok(entry)
    }

    /// Gives `entry` one counter per output of `outputs`: an output that was there before
    /// (same interface, destination and port) keeps its counter, a new one gets a fresh
    /// counter, and the counters of outputs that went away are released.
    fn update_outputs(
        &mut self,
        classifier: &Classifier,
        dataplane: &Dataplane,
        entry: &mut Entry,
        outputs: &[Output],
    ) {
        let mut previous: Vec<(Output, OutputCounter)> = entry
            .rule
            .outputs
            .iter()
            .cloned()
            .zip(std::mem::take(&mut entry.outputs))
            .collect();
        let mut counters = Vec::with_capacity(outputs.len());
        for output in outputs {
            if let Some(i) = previous
                .iter()
                .position(|(old, _)| same_output(old, output))
            {
                counters.push(previous.swap_remove(i).1);
            } else if let Some(counter) = self.output_counters.allocate() {
                counters.push(OutputCounter {
                    counter,
                    baseline: output_totals(classifier, dataplane, entry.slot, counter),
                    meter: RateMeter::default(),
                });
            } else {
                // The pool is exhausted: the rule gets no counters at all (so none can be
                // attributed to the wrong output) and fails to start with `NoOutputCounter`.
                previous.extend(outputs.iter().cloned().zip(counters.drain(..)));
                break;
            }
        }
        for (_, released) in previous {
            self.output_counters.free(released.counter);
        }
        entry.outputs = counters;
    }

    /// Starts, restarts or re-plumbs entry `index` as its rule and the interfaces now allow,
    /// or sends it back to waiting.
    fn bring_up(&mut self, classifier: &mut Classifier, dataplane: &mut Dataplane, index: usize) {
        let entry = &mut self.entries[index];
        let planner = &mut self.planner;
        let wanted = resolve(&entry.rule.input)
            .and_then(|key| resolve_origins(&entry.rule).map(|origins| (key, origins)));
        let (key, origins) = match wanted {
            Ok(wanted) => wanted,
            Err(reason) => {
                stop(classifier, dataplane, entry, None);
                entry.state = RuleState::waiting(&reason);
                return;
            }
        };
        if entry.outputs.len() != entry.rule.outputs.len() {
            stop(classifier, dataplane, entry, None);
            entry.state = RuleState::failed(&StartError::NoOutputCounter(MAX_OUTPUTS));
            return;
        }
        match entry.key {
            // Running with the same key: only the outputs may have changed.
            Some(running) if running == key => {
                if let Err(error) = switch_outputs(classifier, dataplane, entry, origins) {
                    tracing::warn!(rule = %entry.rule.name, "new outputs not applied: {error}");
                }
            }
            // The interface was deleted and created again (a new index): start afresh.
            Some(_) => {
                stop(classifier, dataplane, entry, None);
                start(classifier, dataplane, entry, key, origins);
            }
            None => start(classifier, dataplane, entry, key, origins),
        }
        if entry.key.is_some()
            && let Err(error) = publish(classifier, dataplane, planner, entry)
        {
            tracing::error!(rule = %entry.rule.name, %error, "rule not started");
            stop(classifier, dataplane, entry, None);
            entry.state = RuleState::failed(&error);
        }
    }

    /// Next hops or routes changed: every running rule takes the path its outputs allow now.
    pub fn replan(&mut self, classifier: &mut Classifier, dataplane: &mut Dataplane) {
        self.planner.begin();
        for entry in &mut self.entries {
            if entry.key.is_some()
                && let Err(error) = publish(classifier, dataplane, &mut self.planner, entry)
            {
                tracing::warn!(rule = %entry.rule.name, %error, "path not updated");
            }
        }
    }

    /// Stops a rule that left the rules file and releases its counters.
    fn remove(
        &mut self,
        classifier: &mut Classifier,
        dataplane: &mut Dataplane,
        mut entry: Entry,
        running: &HashSet<FlowKey>,
    ) {
        stop(classifier, dataplane, &mut entry, Some(running));
        self.slots.free(entry.slot);
        for output in entry.outputs {
            self.output_counters.free(output.counter);
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
            if let Ok(counters) = classifier.rule_counters(entry.slot) {
                entry.meter.sample(now, counters.packets, counters.bytes);
            }
            for output in &mut entry.outputs {
                let totals = output_totals(classifier, dataplane, entry.slot, output.counter)
                    - output.baseline;
                output.meter.sample(now, totals.packets, totals.bytes);
            }
        }
    }

    /// Current counters of every rule, read now; rates from the last sample.
    pub fn report(&self, classifier: &Classifier, dataplane: &Dataplane) -> StatsReport {
        let rules = self
            .entries
            .iter()
            .map(|entry| {
                let counters = classifier.rule_counters(entry.slot).unwrap_or_default();
                let outputs: Vec<OutputStats> = entry
                    .rule
                    .outputs
                    .iter()
                    .zip(&entry.outputs)
                    .map(|(output, counter)| {
                        let totals =
                            output_totals(classifier, dataplane, entry.slot, counter.counter)
                                - counter.baseline;
                        let mut stats = OutputStats::new(output, totals);
                        stats.tx_pps = counter.meter.packets_per_second();
                        stats.tx_bps = counter.meter.bits_per_second();
                        stats
                    })
                    .collect();
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
                    to_worker: counters.to_worker,
                    shed: counters.shed,
                    drops,
                    outputs,
                }
            })
            .chain(self.unplaced.iter().map(|(rule, reason)| RuleStats {
                name: rule.name.clone(),
                input: rule.input.to_string(),
                state: RuleState::Failed {
                    reason: reason.clone(),
                },
                rx_packets: 0,
                rx_bytes: 0,
                rx_pps: 0.0,
                rx_bps: 0.0,
                min_ttl: rule.min_ttl,
                below_min_ttl: 0,
                to_worker: 0,
                shed: 0,
                drops: RuleDrops::default(),
                outputs: Vec::new(),
            }))
            .collect();
        StatsReport {
            rules,
            workers: dataplane.worker_stats(|index| {
                u32::try_from(index)
                    .ok()
                    .and_then(|index| classifier.worker_load(index))
                    .unwrap_or_default()
            }),
            skipped: classifier.skip_counters().unwrap_or_default().into(),
        }
    }
}

/// Whether `a` and `b` are the same output for its counters: same interface, destination and
/// port (TTL and other header settings may change).
fn same_output(a: &Output, b: &Output) -> bool {
    a.interface == b.interface && a.destination == b.destination && a.port == b.port
}

/// Gives `entry`'s worker the route for `key` through `origins`. The worker gets the route
/// before the classifier steers anything to it, and keeps it on the kernel path (for the
/// packets that path hands back, and to take over at once when the path changes).
fn start(
    classifier: &mut Classifier,
    dataplane: &mut Dataplane,
    entry: &mut Entry,
    key: FlowKey,
    origins: Vec<Option<Origin>>,
) {
    let result = (|| {
        classifier
            .attach(&entry.rule.input.interface, key.ifindex())
            .map_err(StartError::Attach)?;
        let counters: Vec<u32> = entry.outputs.iter().map(|o| o.counter).collect();
        dataplane.start_rule(
            classifier,
            entry.slot,
            &entry.rule,
            key,
            &origins,
            &counters,
        )
    })();
    match result {
        // The classifier learns of the rule in `publish`.
        Ok(_) => {
            entry.key = Some(key);
            entry.running_outputs = entry.rule.outputs.clone();
            entry.origins = origins;
        }
        Err(error) => {
            tracing::error!(rule = %entry.rule.name, %error, "rule not started");
            entry.state = RuleState::failed(&error);
        }
    }
}

/// A running rule got new outputs (or its output interfaces changed): the worker switches
/// over; the map entry stays.
fn switch_outputs(
    classifier: &Classifier,
    dataplane: &mut Dataplane,
    entry: &mut Entry,
    origins: Vec<Option<Origin>>,
) -> Result<(), StartError> {
    let Some(key) = entry.key else {
        return Ok(());
    };
    if entry.origins == origins && entry.running_outputs == entry.rule.outputs {
        return Ok(());
    }
    let counters: Vec<u32> = entry.outputs.iter().map(|o| o.counter).collect();
    dataplane.start_rule(
        classifier,
        entry.slot,
        &entry.rule,
        key,
        &origins,
        &counters,
    )?;
    entry.running_outputs = entry.rule.outputs.clone();
    entry.origins = origins;
    Ok(())
}

/// Tells the classifier about running `entry`: its map entry, and its output set when every
/// output can be written in the kernel (`path: auto` or `kernel`). A rule that moves to the
/// kernel path gets its output set before its map entry says so; one that leaves it is
/// steered to its worker before the output set goes. Either way each packet takes one path.
fn publish(
    classifier: &mut Classifier,
    dataplane: &Dataplane,
    planner: &mut Planner,
    entry: &mut Entry,
) -> Result<(), StartError> {
    let Some(key) = entry.key else {
        return Ok(());
    };
    let counters: Vec<u32> = entry.outputs.iter().map(|o| o.counter).collect();
    let plan = match entry.rule.path {
        PathChoice::Worker => Err(None),
        PathChoice::Auto | PathChoice::Kernel => planner
            .plan(&entry.rule, &entry.origins, &counters)
            .map_err(Some),
    };
    let plan = plan.and_then(|outputs| {
        if entry.kernel != Some(outputs) {
            classifier
                .kernel
                .set(entry.slot, &outputs)
                .map_err(|error| Some(NotInKernel::Map(error)))?;
            entry.kernel = Some(outputs);
        }
        Ok(())
    });
    let worker = u32::try_from(dataplane.worker_for(entry.slot))
        .expect("worker count is bounded by MAX_WORKERS");
    let value = RuleSlot {
        slot: entry.slot,
        worker,
        min_ttl: entry.rule.min_ttl.unwrap_or(0),
        path: if plan.is_ok() {
            PATH_KERNEL
        } else {
            PATH_WORKER
        },
        flags: if entry.rule.local_delivery {
            RULE_LOCAL_DELIVERY
        } else {
            0
        },
        pad: 0,
    };
    if entry.value != Some(value) {
        classifier
            .insert_rule(&key, value)
            .map_err(StartError::Map)?;
        entry.value = Some(value);
    }
    if plan.is_err()
        && entry.kernel.take().is_some()
        && let Err(error) = classifier.kernel.remove(entry.slot)
    {
        tracing::warn!(rule = %entry.rule.name, %error, "cannot remove the rule's output set");
    }
    let state = match plan {
        Ok(()) => RuleState::Active {
            path: ForwardingPath::Kernel,
            reason: None,
        },
        Err(reason) => RuleState::Active {
            path: ForwardingPath::Worker,
            reason: reason.map(|reason| reason.to_string()),
        },
    };
    if entry.state != state {
        log_path(&entry.rule, &state);
        entry.state = state;
    }
    Ok(())
}

fn log_path(rule: &Rule, state: &RuleState) {
    match state {
        RuleState::Active {
            path,
            reason: Some(reason),
        } if rule.path == PathChoice::Kernel => {
            tracing::warn!(rule = %rule.name, %path, "path: kernel asked for, but {reason}");
        }
        RuleState::Active { path, reason } => {
            tracing::info!(rule = %rule.name, %path, reason = reason.as_deref(), "forwarding");
        }
        RuleState::Waiting { .. } | RuleState::Failed { .. } => {}
    }
}

/// What output counter `counter` of rule `slot` holds now: what the worker sent plus what
/// the classifier sent on the kernel path.
fn output_totals(
    classifier: &Classifier,
    dataplane: &Dataplane,
    slot: u32,
    counter: u32,
) -> OutputTotals {
    let mut totals = dataplane.output_totals(slot, counter);
    if let Ok(kernel) = classifier.kernel.counters(counter) {
        totals.packets += kernel.packets;
        totals.bytes += kernel.bytes;
        totals.errors += kernel.errors;
    }
    totals
}

/// Takes `entry` out of the classifier and the data plane, if it is running. The map entry
/// stays when `keep` holds its key (another rule took it over).
fn stop(
    classifier: &mut Classifier,
    dataplane: &mut Dataplane,
    entry: &mut Entry,
    keep: Option<&HashSet<FlowKey>>,
) {
    let Some(key) = entry.key.take() else {
        return;
    };
    if entry.value.take().is_some()
        && !keep.is_some_and(|keep| keep.contains(&key))
        && let Err(error) = classifier.remove_rule(&key)
    {
        tracing::warn!(rule = %entry.rule.name, %error, "cannot remove the rule's map entry");
    }
    if entry.kernel.take().is_some()
        && let Err(error) = classifier.kernel.remove(entry.slot)
    {
        tracing::warn!(rule = %entry.rule.name, %error, "cannot remove the rule's output set");
    }
    dataplane.stop_rule(entry.slot);
    entry.running_outputs.clear();
    entry.origins.clear();
}

/// The map key of `input`, or why it cannot have one yet.
fn resolve(input: &Input) -> Result<FlowKey, Waiting> {
    let ifindex = interfaces::index(&input.interface)
        .ok_or_else(|| Waiting::InputInterface(input.interface.clone()))?;
    FlowKey::new(ifindex, input.group, input.source, input.port)
        .ok_or_else(|| Waiting::MixedFamilies(input.to_string()))
}

/// Hands out the numbers `0..LIMIT`; a freed number is reused last-freed-first.
#[derive(Default)]
struct IdAllocator<const LIMIT: usize> {
    next: u32,
    free: Vec<u32>,
}

impl<const LIMIT: usize> IdAllocator<LIMIT> {
    fn allocate(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop() {
            return Some(id);
        }
        if self.next as usize >= LIMIT {
            return None;
        }
        self.next += 1;
        Some(self.next - 1)
    }

    fn free(&mut self, id: u32) {
        self.free.push(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_reused_and_bounded() {
        let mut ids = IdAllocator::<4>::default();
        assert_eq!(ids.allocate(), Some(0));
        assert_eq!(ids.allocate(), Some(1));
        ids.free(0);
        assert_eq!(ids.allocate(), Some(0));
        assert_eq!(ids.allocate(), Some(2));
        assert_eq!(ids.allocate(), Some(3));
        assert_eq!(ids.allocate(), None);
    }

    #[test]
    fn an_output_is_the_same_whatever_its_ttl() {
        let output = |port, ttl| Output {
            interface: Some("out0".into()),
            destination: "239.2.2.1".parse().expect("address"),
            port,
            ttl,
            dscp: None,
        };
        assert!(same_output(&output(6000, 8), &output(6000, 16)));
        assert!(!same_output(&output(6000, 8), &output(6001, 8)));
    }
}
