//! The results of a run, as JSON (everything measured) and as Markdown (per scenario and relay
//! the lossless rate, the CPU per packet and the overload points; the ratios of MCR's paths to
//! the kernel and socat; the targets of `targets.rs`).

use std::fmt::Write as _;

use serde::Serialize;

use super::{
    Settings,
    latency::LatencyPoint,
    overload::{FACTORS, OverloadPoint},
    relay::{MCR, MCR_KERNEL, MCR_RT, RelayKind},
    scenario::Scenario,
    search::{Bound, SearchResult},
    targets::{Target, targets},
    topology::CpuPlan,
    trial::Trial,
};

#[derive(Serialize)]
pub struct Report {
    pub meta: Meta,
    pub scenarios: Vec<ScenarioResult>,
    pub targets: Vec<Target>,
}

#[derive(Serialize)]
pub struct Meta {
    pub command: String,
    pub date: String,
    pub commit: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: CpuPlan,
    pub settings: Settings,
    pub seconds: f64,
    pub loss_threshold_pct: f64,
}

#[derive(Serialize)]
pub struct ScenarioResult {
    pub scenario: Scenario,
    /// The generator alone at the CPU rate, no relay running.
    pub baseline: Option<Trial>,
    pub relays: Vec<RelayResult>,
    pub error: Option<String>,
}

impl ScenarioResult {
    pub fn failed(scenario: &Scenario, error: &anyhow::Error) -> Self {
        Self {
            scenario: scenario.clone(),
            baseline: None,
            relays: Vec::new(),
            error: Some(format!("{error:#}")),
        }
    }

    pub fn relay(&self, kind: RelayKind) -> Option<&RelayResult> {
        self.relays.iter().find(|r| r.kind == kind)
    }
}

#[derive(Serialize)]
pub struct RelayResult {
    pub relay: String,
    pub kind: RelayKind,
    /// Whether anything arrived at the sink in the warm-up.
    pub forwarding: bool,
    pub warmup: Option<Trial>,
    /// The trial at the common CPU rate: the CPU figures.
    pub at_cpu_rate: Option<Trial>,
    pub search: Option<SearchResult>,
    /// Every trial of the search, in order.
    pub trials: Vec<Trial>,
    /// Trials at 1.5×, 2× and 4× the highest lossless rate.
    pub overload: Vec<OverloadPoint>,
    /// One-way latency at 10 %, 50 % and 90 % of the highest lossless rate.
    pub latency: Vec<LatencyPoint>,
    pub at_one_hop_rate: Option<OneHopCheck>,
    /// Derived figures (also in the Markdown).
    pub figures: Option<Figures>,
    pub error: Option<String>,
}

#[derive(Serialize)]
pub struct OneHopCheck {
    pub reference: String,
    pub rate_pps: f64,
    pub trial: Trial,
}

/// The per-relay figures of the Markdown table.
#[derive(Clone, Serialize)]
pub struct Figures {
    pub lossless_pps: Option<f64>,
    /// CPU seconds of the relay CPUs per million delivered packets, at the CPU rate.
    pub cpu_s_per_m_delivered: Option<f64>,
    /// The same per million input packets (for fan-out).
    pub cpu_s_per_m_input: Option<f64>,
    /// Relay processes' own run time per million delivered packets.
    pub process_cpu_s_per_m_delivered: Option<f64>,
}

impl RelayResult {
    pub fn new(kind: RelayKind) -> Self {
        Self {
            relay: kind.label(),
            kind,
            forwarding: false,
            warmup: None,
            at_cpu_rate: None,
            search: None,
            trials: Vec::new(),
            overload: Vec::new(),
            latency: Vec::new(),
            at_one_hop_rate: None,
            figures: None,
            error: None,
        }
    }

    /// The highest rate the generator offered in a lossless search trial.
    pub fn lossless_offered(&self) -> Option<f64> {
        self.search.as_ref()?.lossless_pps
    }

    fn compute_figures(&self) -> Figures {
        let cpu_trial = self.at_cpu_rate.as_ref();
        // A busy time that cannot stand (`CpuUse::consistent`) is no figure to compare.
        let busy = |t: &Trial| {
            t.cpu
                .as_ref()
                .filter(|cpu| cpu.consistent())
                .map(|cpu| cpu.relay_cpus_busy_s)
        };
        Figures {
            // What the generator achieved in the trial at that rate, not what was asked.
            lossless_pps: self.lossless_offered(),
            cpu_s_per_m_delivered: cpu_trial.and_then(|t| per_million(busy(t)?, t.delivered)),
            cpu_s_per_m_input: cpu_trial.and_then(|t| per_million(busy(t)?, t.packets)),
            process_cpu_s_per_m_delivered: cpu_trial
                .and_then(|t| per_million(t.cpu.as_ref()?.relay_process_s, t.delivered)),
        }
    }

    /// The latency trial at `load` (a fraction of the lossless rate), if it ran.
    pub fn latency_at(&self, load: f64) -> Option<&LatencyPoint> {
        self.latency
            .iter()
            .find(|point| (point.load - load).abs() < 1e-9)
    }

    pub fn figures(&self) -> Figures {
        self.figures
            .clone()
            .unwrap_or_else(|| self.compute_figures())
    }

    /// Every trial with traffic worth plotting: search, CPU rate and overload points.
    pub fn curve(&self) -> Vec<&Trial> {
        let mut trials: Vec<&Trial> = self
            .trials
            .iter()
            .chain(&self.at_cpu_rate)
            .chain(self.overload.iter().map(|point| &point.trial))
            .collect();
        trials.sort_by(|a, b| a.offered_pps.total_cmp(&b.offered_pps));
        trials
    }
}

impl Report {
    pub fn new(
        command: String,
        settings: Settings,
        cpus: CpuPlan,
        mut scenarios: Vec<ScenarioResult>,
        seconds: f64,
    ) -> Self {
        for scenario in &mut scenarios {
            for relay in &mut scenario.relays {
                relay.figures = Some(relay.compute_figures());
            }
        }
        let targets = targets(&scenarios);
        Self {
            meta: Meta {
                command,
                date: crate::output(
                    std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]),
                )
                .map_or_else(String::new, |d| d.trim().to_owned()),
                commit: crate::output(std::process::Command::new("git").args([
                    "rev-parse",
                    "--short",
                    "HEAD",
                ]))
                .map_or_else(|| "unknown".to_owned(), |c| c.trim().to_owned()),
                kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned()),
                cpu_model: cpu_model(),
                cpus,
                settings,
                seconds,
                loss_threshold_pct: super::trial::LOSSLESS * 100.0,
            },
            scenarios,
            targets,
        }
    }

    /// One line per scenario or relay that did not complete.
    pub fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        for scenario in &self.scenarios {
            if let Some(error) = &scenario.error {
                failures.push(format!("{}: {error}", scenario.scenario.name));
            }
            for relay in &scenario.relays {
                if let Some(error) = &relay.error {
                    failures.push(format!(
                        "{} / {}: {error}",
                        scenario.scenario.name, relay.relay
                    ));
                }
            }
        }
        failures
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let meta = &self.meta;
        let settings = &meta.settings;
        let _ = writeln!(md, "# MCR benchmark results\n");
        let _ = writeln!(
            md,
            "`{}` — {} run, {}, commit `{}`, kernel {}, {} CPUs ({}): generator on CPU {}, \
             relays on CPU {}. {:.0} s.\n",
            meta.command,
            settings.mode,
            meta.date,
            meta.commit,
            meta.kernel,
            meta.cpus.relays.len() + 1,
            meta.cpu_model,
            meta.cpus.generator,
            meta.cpus.relay_list(),
            meta.seconds
        );
        let _ = writeln!(
            md,
            "Rates are input packets per second offered by the generator (the benchmark's own \
             sender: paced by a tbf qdisc below {} pps, by itself with the qdisc bypassed from \
             there up); delivered counts every copy at the sink (nftables counters). Lossless \
             means loss under {} %. The search steps ×{} from {}, then bisects to within \
             ×{}; each search trial is {} s, and the highest lossless rate counts only if a \
             second trial at it is lossless too (else the search goes on below it; \
             \"(one trial)\" where the trials ran out first). CPU figures come from one {} s trial at {} pps \
             offered to every relay: **relay CPUs** is the busy time (wall − idle) of the CPUs \
             reserved for relays, so it includes the kernel's softirq work and is the only \
             figure the kernel's forwarding has; **processes** is the relay processes' own run \
             time. Both in CPU seconds per million delivered packets (= µs per packet). \
             **Overload** points offer {} the relay's lossless rate; each shows what was \
             delivered per second (in input packets, so fan-out does not count four times) and, \
             in brackets, that over the lossless rate: 1.00 is a plateau at the lossless rate, \
             less a relay that delivers less when offered more. **Latency** is one-way, from \
             the frame leaving the generator's interface to it entering the sink's (the \
             kernel's software timestamps at both ends), over about {} samples per second \
             (every frame below that rate) of a {} s trial at {} of each relay's own lossless \
             rate; its targets are in the table of targets.\n",
            rate(super::generator::TBF_MAX_PPS),
            meta.loss_threshold_pct,
            settings.search_step,
            rate(settings.search_start_pps),
            settings.search_precision,
            settings.trial_s,
            settings.cpu_trial_s,
            rate(settings.cpu_rate_pps),
            factors_text(),
            rate(super::latency::SAMPLES_PER_SECOND),
            settings.latency_trial_s,
            loads_text(&settings.latency_loads),
        );
        for scenario in &self.scenarios {
            self.scenario_markdown(&mut md, scenario);
        }
        self.ratios_markdown(&mut md);
        let _ = writeln!(md, "## Targets\n");
        let _ = writeln!(
            md,
            "| target | scenario | figures | verdict |\n|---|---|---|---|"
        );
        for target in &self.targets {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                target.goal, target.scenario, target.figures, target.verdict
            );
        }
        let _ = writeln!(md);
        relay_counters_markdown(&mut md);
        let failures = self.failures();
        if !failures.is_empty() {
            let _ = writeln!(md, "\n## Failures\n");
            for failure in failures {
                let _ = writeln!(md, "- {}", failure.replace('\n', " "));
            }
        }
        md
    }

    fn scenario_markdown(&self, md: &mut String, result: &ScenarioResult) {
        let scenario = &result.scenario;
        let cpu_rate = rate(self.meta.settings.cpu_rate_pps);
        let _ = writeln!(md, "## {} — {}\n", scenario.name, scenario.title);
        if let Some(error) = &result.error {
            let _ = writeln!(md, "Failed: {}\n", error.replace('\n', " "));
            return;
        }
        let overload_columns: Vec<String> = FACTORS
            .iter()
            .map(|factor| format!("{factor}× lossless: delivered/s (÷ lossless)"))
            .collect();
        let _ = writeln!(
            md,
            "| relay | highest lossless rate | at {cpu_rate} pps: delivered/s | loss | CPU s/M (relay CPUs) | CPU s/M (processes) | {} | lost where at {}× |",
            overload_columns.join(" | "),
            FACTORS[FACTORS.len() - 1]
        );
        let _ = writeln!(
            md,
            "|---|---|---|---|---|---|{}---|",
            "---|".repeat(FACTORS.len())
        );
        for relay in &result.relays {
            let _ = writeln!(md, "{}", relay_row(relay));
        }
        let _ = writeln!(md);
        latency_markdown(md, result);
        overload_notes(md, result);
        fluke_notes(md, result);
        batching_notes(md, result);
        if let Some(baseline) = &result.baseline
            && let Some(cpu) = &baseline.cpu
        {
            let _ = writeln!(
                md,
                "Without a relay, the relay CPUs spent {} s per million offered packets receiving \
                 and dropping them (included in every relay's relay-CPUs figure).",
                seconds(Some(
                    cpu.relay_cpus_busy_s / baseline.packets.max(1) as f64 * 1e6
                ))
            );
        }
        for relay in &result.relays {
            if let Some(check) = &relay.at_one_hop_rate {
                let _ = writeln!(
                    md,
                    "\n{} at its {} lossless rate ({} pps): loss {} ({}){}.",
                    relay.relay,
                    check.reference,
                    rate(check.rate_pps),
                    percent(check.trial.loss_pct),
                    where_lost(&check.trial),
                    if check.trial.generator_limited {
                        format!(
                            "; the generator reached only {} pps",
                            rate(check.trial.offered_pps)
                        )
                    } else {
                        String::new()
                    }
                );
            }
            if let Some(error) = &relay.error {
                let _ = writeln!(md, "\n{} failed: {}", relay.relay, error.replace('\n', " "));
            }
        }
        let flagged = result.relays.iter().any(|r| {
            r.at_cpu_rate
                .as_ref()
                .is_some_and(|t| !t.lossless() || t.noisy())
        });
        if flagged {
            let _ = writeln!(
                md,
                "\n† lost packets at the CPU rate (per delivered packet, the figure is high). \
                 \\* other processes used more than 5 % of a CPU during the CPU trial."
            );
        }
        let unusable = result.relays.iter().any(|r| {
            r.at_cpu_rate
                .as_ref()
                .and_then(|t| t.cpu.as_ref())
                .is_some_and(|cpu| !cpu.consistent())
        });
        if unusable {
            let _ = writeln!(
                md,
                "\n§ the relay CPUs' busy time of this CPU trial cannot stand: more than a tenth \
                 of it stolen, below the relay processes' run time on those CPUs, or none at \
                 all (the VM's idle accounting overlaps steal time, so the busy time can read \
                 low by as much as was stolen). Shown, but left out of the ratios and targets."
            );
        }
        let _ = writeln!(md);
    }

    fn ratios_markdown(&self, md: &mut String) {
        let _ = writeln!(md, "## Ratios (same run)\n");
        let _ = writeln!(
            md,
            "| scenario | MCR relay | lossless rate /kernel | CPU per packet /kernel | lossless rate /socat | CPU per packet /socat |\n|---|---|---|---|---|---|"
        );
        for result in &self.scenarios {
            for ours in [MCR, MCR_RT, MCR_KERNEL]
                .iter()
                .filter_map(|&kind| result.relay(kind))
            {
                let ratio = |other: RelayKind, pick: fn(&Figures) -> Option<f64>| -> String {
                    let Some(theirs) = result.relay(other) else {
                        return "—".to_owned();
                    };
                    match (pick(&ours.figures()), pick(&theirs.figures())) {
                        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                        _ => "n/a".to_owned(),
                    }
                };
                let lossless: fn(&Figures) -> Option<f64> = |f| f.lossless_pps;
                let cpu: fn(&Figures) -> Option<f64> = |f| f.cpu_s_per_m_delivered;
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} |",
                    result.scenario.name,
                    ours.relay,
                    ratio(RelayKind::Kernel, lossless),
                    ratio(RelayKind::Kernel, cpu),
                    ratio(RelayKind::Socat, lossless),
                    ratio(RelayKind::Socat, cpu),
                );
            }
        }
        let _ = writeln!(
            md,
            "\nA lossless-rate ratio below 1 means MCR carries less without loss; a CPU ratio \
             above 1 means MCR costs more per packet. Lossless rates marked ≥ were bounded by \
             the generator or the search, not the relay, so their ratios are bounds too.\n"
        );
    }
}

/// A scenario's latency table: one row per relay and load point.
fn latency_markdown(md: &mut String, result: &ScenarioResult) {
    if result.relays.iter().all(|relay| relay.latency.is_empty()) {
        return;
    }
    let _ = writeln!(
        md,
        "One-way latency, µs (generator interface → sink interface):\n\n\
         | relay | load | offered | p50 | p99 | p99.9 | max | samples | loss | note |\n\
         |---|---|---|---|---|---|---|---|---|---|"
    );
    for relay in &result.relays {
        for point in &relay.latency {
            let mut notes = Vec::new();
            if !point.clock_held() {
                notes.push(format!("clock stepped {:.0} µs", point.clock_step_us));
            }
            if point.trial.generator_limited {
                notes.push("generator-limited".to_owned());
            }
            let missed = point.samples.unmatched
                + point.samples.unstamped
                + point.samples.negative
                + point.samples.ring_dropped;
            if missed > 0 {
                notes.push(format!("{missed} samples not measured"));
            }
            if let Some(trace) = &point.trace {
                notes.push(format!("trace: `{trace}`"));
            }
            let cells = point.one_way.as_ref().map_or_else(
                || vec!["—".to_owned(); 4],
                |p| {
                    vec![
                        micros(p.p50_us),
                        micros(p.p99_us),
                        micros(p.p999_us),
                        micros(p.max_us),
                    ]
                },
            );
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                relay.relay,
                point.label(),
                rate(point.trial.offered_pps),
                cells.join(" | "),
                point.samples.measured,
                percent(point.trial.loss_pct),
                notes.join("; ")
            );
        }
    }
    let _ = writeln!(md);
}

/// Microseconds: one decimal below 100, whole above.
pub fn micros(us: f64) -> String {
    if us < 100.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.0}")
    }
}

/// `10 %, 50 % and 90 %`.
fn loads_text(loads: &[f64]) -> String {
    let labels: Vec<String> = loads
        .iter()
        .map(|load| format!("{:.0} %", load * 100.0))
        .collect();
    match labels.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => labels.join(""),
    }
}

/// The overload points the generator could not offer, named under a scenario's table.
fn overload_notes(md: &mut String, result: &ScenarioResult) {
    let bounded: Vec<String> = result
        .relays
        .iter()
        .flat_map(|relay| {
            relay
                .overload
                .iter()
                .filter(|point| point.generator_bounded)
                .map(move |point| {
                    format!(
                        "{} at {} (asked {}, offered {})",
                        relay.relay,
                        point.label(),
                        rate(point.requested_pps),
                        rate(point.trial.offered_pps)
                    )
                })
        })
        .collect();
    if !bounded.is_empty() {
        let _ = writeln!(
            md,
            "‡ bounded by the generator, which offered less than the point stands for: {}.\n",
            bounded.join("; ")
        );
    }
}

/// The rates that passed their first trial and failed the second, named under a scenario's
/// table: what one trial alone would have called the relay's lossless rate.
fn fluke_notes(md: &mut String, result: &ScenarioResult) {
    let flukes: Vec<String> = result
        .relays
        .iter()
        .filter_map(|relay| {
            let search = relay.search.as_ref()?;
            (!search.flukes.is_empty())
                .then(|| format!("{} {}", relay.relay, rates(&search.flukes)))
        })
        .collect();
    if !flukes.is_empty() {
        let _ = writeln!(
            md,
            "Lossless once, lossy in the second trial (requested rates; not counted): {}.\n",
            flukes.join("; ")
        );
    }
}

/// How many packets each of MCR's worker sends carried, at the CPU rate, at the lossless rate
/// and at each overload point: 1.0 is a packet per send, more is runs (decision 0014).
fn batching_notes(md: &mut String, result: &ScenarioResult) {
    let per_send = |trial: Option<&Trial>| -> Option<String> {
        trial
            .and_then(|trial| trial.relay.per_send())
            .map(|ratio| format!("{ratio:.1}"))
    };
    let lines: Vec<String> = result
        .relays
        .iter()
        .filter_map(|relay| {
            // The last trial at the rate the search settled on (its second one), not a rate
            // that passed once and failed again.
            let settled = relay
                .search
                .as_ref()
                .and_then(|search| search.lossless_requested_pps);
            let lossless = relay
                .trials
                .iter()
                .rfind(|trial| trial.lossless() && Some(trial.rate_pps) == settled);
            let mut points = vec![
                (
                    "at the CPU rate".to_owned(),
                    per_send(relay.at_cpu_rate.as_ref()),
                ),
                ("lossless".to_owned(), per_send(lossless)),
            ];
            points.extend(
                relay
                    .overload
                    .iter()
                    .map(|point| (point.label(), per_send(Some(&point.trial)))),
            );
            let shown: Vec<String> = points
                .into_iter()
                .filter_map(|(label, ratio)| Some(format!("{label} {}", ratio?)))
                .collect();
            (!shown.is_empty()).then(|| format!("{} {}", relay.relay, shown.join(", ")))
        })
        .collect();
    if !lines.is_empty() {
        let _ = writeln!(
            md,
            "Packets per send of MCR's workers (`sent / sends` of `mcr stats --workers`; 1.0: \
             each packet on its own, more: runs): {}.\n",
            lines.join("; ")
        );
    }
}

/// `1.5×, 2× and 4×`.
fn factors_text() -> String {
    let labels: Vec<String> = FACTORS.iter().map(|factor| format!("{factor}×")).collect();
    match labels.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => labels.join(""),
    }
}

/// Where the loss shares "relay socket" and "relay shed" come from, relay by relay.
fn relay_counters_markdown(md: &mut String) {
    let _ = writeln!(md, "## Where relay socket and relay shed come from\n");
    for kind in [MCR, MCR_KERNEL, RelayKind::Kernel, RelayKind::Socat] {
        let _ = writeln!(
            md,
            "- {}: relay socket: {}; relay shed: {}",
            kind.label(),
            kind.socket_drops_source(),
            kind.shed_source()
        );
    }
}

/// One relay's line of a scenario table.
fn relay_row(relay: &RelayResult) -> String {
    let figures = relay.figures();
    let lossless = match (&relay.search, relay.forwarding) {
        (_, false) if relay.warmup.is_some() => "forwards nothing".to_owned(),
        (Some(search), _) => bounded(search, figures.lossless_pps),
        (None, _) => "—".to_owned(),
    };
    let (cpu_delivered, cpu_loss, cpu_flags) = relay.at_cpu_rate.as_ref().map_or_else(
        || ("—".to_owned(), "—".to_owned(), String::new()),
        |t| {
            let mut flags = String::new();
            if !t.lossless() {
                flags.push('†');
            }
            if t.noisy() {
                flags.push('*');
            }
            (rate(t.delivered_pps), percent(t.loss_pct), flags)
        },
    );
    // The busy time as read, also when it cannot stand (then marked §, and not a figure).
    let relay_cpus = relay
        .at_cpu_rate
        .as_ref()
        .and_then(|t| {
            let cpu = t.cpu.as_ref()?;
            Some(format!(
                "{}{}",
                seconds(per_million(cpu.relay_cpus_busy_s, t.delivered)),
                if cpu.consistent() { "" } else { "§" }
            ))
        })
        .unwrap_or_else(|| seconds(None));
    let overload: Vec<String> = FACTORS
        .iter()
        .map(|&factor| {
            relay
                .overload
                .iter()
                .find(|point| (point.factor - factor).abs() < 1e-9)
                .map_or_else(
                    || "—".to_owned(),
                    |point| {
                        format!(
                            "{} ({:.2}){}",
                            rate(point.delivered_input_pps),
                            point.delivered_over_lossless,
                            if point.generator_bounded { " ‡" } else { "" }
                        )
                    },
                )
        })
        .collect();
    let where_lost_at_most = relay
        .overload
        .last()
        .map_or_else(|| "—".to_owned(), |point| where_lost(&point.trial));
    format!(
        "| {} | {} | {} | {} | {}{} | {}{} | {} | {} |",
        relay.relay,
        lossless,
        cpu_delivered,
        cpu_loss,
        relay_cpus,
        cpu_flags,
        seconds(figures.process_cpu_s_per_m_delivered),
        cpu_flags,
        overload.join(" | "),
        where_lost_at_most,
    )
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

/// `950`, `12.3 k`, `123 k`, `1.23 M`.
pub fn rate(pps: f64) -> String {
    if pps >= 1e6 {
        format!("{:.2} M", pps / 1e6)
    } else if pps >= 1e5 {
        format!("{:.0} k", pps / 1e3)
    } else if pps >= 1e3 {
        format!("{:.1} k", pps / 1e3)
    } else {
        format!("{pps:.0}")
    }
}

fn bounded(search: &SearchResult, lossless: Option<f64>) -> String {
    let once = if search.repeated { "" } else { " (one trial)" };
    match (lossless, search.bound) {
        (None, _) => "none".to_owned(),
        (Some(pps), Bound::Generator) => format!("≥ {} (generator){once}", rate(pps)),
        (Some(pps), Bound::SearchMax) => format!("≥ {} (search max){once}", rate(pps)),
        (Some(pps), _) => format!("{}{once}", rate(pps)),
    }
}

pub fn percent(value: f64) -> String {
    if value == 0.0 {
        "0 %".to_owned()
    } else if value.abs() < 0.01 {
        format!("{value:.4} %")
    } else {
        format!("{value:.2} %")
    }
}

/// CPU seconds per million packets (= µs per packet); none for no packets.
fn per_million(seconds: f64, packets: u64) -> Option<f64> {
    (packets > 0).then(|| seconds / packets as f64 * 1e6)
}

/// `283 k, 141 k`.
pub fn rates(pps: &[f64]) -> String {
    let rates: Vec<String> = pps.iter().map(|&pps| rate(pps)).collect();
    rates.join(", ")
}

pub fn seconds(value: Option<f64>) -> String {
    value.map_or_else(|| "—".to_owned(), |v| format!("{v:.2}"))
}

/// The loss categories of a trial that are not zero, as percentages of the expected deliveries.
fn where_lost(trial: &Trial) -> String {
    let loss = &trial.loss;
    let expected = trial.expected.max(1) as f64;
    let parts: Vec<String> = [
        ("generator", loss.generator),
        ("relay interface", loss.relay_interface),
        ("relay socket", loss.relay_socket),
        ("relay shed", loss.relay_shed),
        ("relay other", loss.relay_other),
        ("sink interface", loss.sink_interface),
        ("sink", loss.sink),
    ]
    .into_iter()
    .filter(|(_, packets)| *packets > 0)
    .map(|(name, packets)| format!("{name} {}", percent(100.0 * packets as f64 / expected)))
    .collect();
    if parts.is_empty() {
        "nowhere".to_owned()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_where_names_shed_apart_from_the_rest_of_the_relay() {
        let mut trial = Trial::lossless_at(100_000.0, 10_000);
        assert_eq!(where_lost(&trial), "nowhere");
        trial.loss.relay_socket = 100;
        trial.loss.relay_shed = 2_500;
        trial.loss.relay_other = 1;
        assert_eq!(
            where_lost(&trial),
            "relay socket 1.00 %, relay shed 25.00 %, relay other 0.01 %"
        );
    }

    #[test]
    fn the_markdown_says_where_shed_comes_from_for_every_relay() {
        let mut md = String::new();
        relay_counters_markdown(&mut md);
        for kind in [MCR, MCR_KERNEL, RelayKind::Kernel, RelayKind::Socat] {
            let line = md
                .lines()
                .find(|line| line.starts_with(&format!("- {}:", kind.label())))
                .unwrap_or_else(|| panic!("no line for {}", kind.label()));
            assert!(line.contains(kind.shed_source()), "{line}");
            assert!(line.contains(kind.socket_drops_source()), "{line}");
        }
        assert!(md.contains("rules' shed"), "{md}");
    }

    #[test]
    fn a_busy_time_that_cannot_stand_is_shown_marked_and_left_out_of_the_figures() {
        let at_cpu_rate = |busy: f64, process: f64| {
            let mut trial = Trial::lossless_at(50_000.0, 250_000);
            trial.cpu = Some(crate::bench::trial::CpuUse {
                window_s: 5.2,
                relay_cpus_busy_s: busy,
                relay_cpus_ticked_s: 1.5,
                relay_process_s: process,
                relay_cpus_steal_s: 0.1,
            });
            trial
        };
        let mut relay = RelayResult::new(MCR);
        relay.at_cpu_rate = Some(at_cpu_rate(1.075, 1.833));
        assert_eq!(relay.figures().cpu_s_per_m_delivered, None);
        assert_eq!(relay.figures().cpu_s_per_m_input, None);
        let row = relay_row(&relay);
        assert!(row.contains("| 4.30§ | 7.33 |"), "{row}");

        relay.at_cpu_rate = Some(at_cpu_rate(2.5, 2.1));
        let figure = relay.figures().cpu_s_per_m_delivered.expect("a figure");
        assert!((figure - 10.0).abs() < 1e-9, "{figure}");
        let row = relay_row(&relay);
        assert!(row.contains("| 10.00 | 8.40 |"), "{row}");
    }

    #[test]
    fn packets_per_send_come_from_the_lossless_trial_and_the_overload_points() {
        let trial = |offered: f64, lost: u64, sends: u64, sent: u64| {
            let mut trial = Trial::lossless_at(offered, 100_000);
            trial.delivered -= lost;
            trial.loss_pct = lost as f64 / 1000.0;
            trial.relay.worker_sends = sends;
            trial.relay.worker_sent = sent;
            trial
        };
        let mut relay = RelayResult::new(MCR);
        relay.at_cpu_rate = Some(trial(50_000.0, 0, 1_000, 1_000));
        relay.trials = vec![
            trial(100_000.0, 0, 800, 1_000),
            // The settled rate's trial is the one that counts, not the last, a lossy one or
            // one that passed once only.
            trial(200_000.0, 0, 500, 1_000),
            trial(400_000.0, 5_000, 100, 1_000),
            trial(283_000.0, 0, 50, 1_000),
            trial(283_000.0, 3_000, 50, 1_000),
            trial(200_000.0, 0, 500, 1_000),
        ];
        relay.search = Some(SearchResult {
            lossless_pps: Some(200_000.0),
            lossless_requested_pps: Some(200_000.0),
            lossy_pps: Some(283_000.0),
            bound: Bound::Relay,
            trials: 6,
            repeated: true,
            flukes: vec![283_000.0],
        });
        relay.overload = vec![OverloadPoint {
            factor: 2.0,
            lossless_pps: 200_000.0,
            requested_pps: 400_000.0,
            delivered_input_pps: 200_000.0,
            delivered_over_lossless: 1.0,
            generator_bounded: false,
            trial: trial(400_000.0, 5_000, 125, 1_000),
        }];
        let result = ScenarioResult {
            scenario: crate::bench::scenario::all().remove(0),
            baseline: None,
            relays: vec![relay, RelayResult::new(RelayKind::Kernel)],
            error: None,
        };
        let mut md = String::new();
        batching_notes(&mut md, &result);
        assert!(
            md.contains("mcr at the CPU rate 1.0, lossless 2.0, 2× 8.0."),
            "{md}"
        );
        // The kernel's forwarding has no sends of its own to show.
        assert!(!md.contains("kernel"), "{md}");
        let mut md = String::new();
        fluke_notes(&mut md, &result);
        assert!(md.contains("not counted): mcr 283 k."), "{md}");
    }
}
