//! The results of a run, as JSON (everything measured) and as Markdown (the figures the issue
//! asks for, the MCR/kernel and MCR/socat ratios, and the targets).

use std::fmt::Write as _;

use serde::Serialize;

use super::{
    Settings,
    relay::{self, MCR, RelayKind},
    scenario::Scenario,
    search::{Bound, SearchResult},
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

    fn relay(&self, kind: RelayKind) -> Option<&RelayResult> {
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
    /// One trial well above the highest lossless rate.
    pub overload: Option<Trial>,
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
            overload: None,
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
        let per_million =
            |seconds: f64, packets: u64| (packets > 0).then(|| seconds / packets as f64 * 1e6);
        Figures {
            // What the generator achieved in the trial at that rate, not what was asked.
            lossless_pps: self.lossless_offered(),
            cpu_s_per_m_delivered: cpu_trial
                .and_then(|t| per_million(t.cpu.as_ref()?.relay_cpus_busy_s, t.delivered)),
            cpu_s_per_m_input: cpu_trial
                .and_then(|t| per_million(t.cpu.as_ref()?.relay_cpus_busy_s, t.packets)),
            process_cpu_s_per_m_delivered: cpu_trial
                .and_then(|t| per_million(t.cpu.as_ref()?.relay_process_s, t.delivered)),
        }
    }

    fn figures(&self) -> Figures {
        self.figures
            .clone()
            .unwrap_or_else(|| self.compute_figures())
    }

    /// Every trial with traffic worth plotting: search, CPU rate and overload.
    pub fn curve(&self) -> Vec<&Trial> {
        let mut trials: Vec<&Trial> = self
            .trials
            .iter()
            .chain(&self.at_cpu_rate)
            .chain(&self.overload)
            .collect();
        trials.sort_by(|a, b| a.offered_pps.total_cmp(&b.offered_pps));
        trials
    }
}

#[derive(Serialize)]
pub struct Target {
    pub goal: String,
    pub scenario: String,
    pub figures: String,
    pub verdict: String,
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
            "Rates are input packets per second offered by the generator (trafgen, paced by a \
             tbf qdisc); delivered counts every copy at the sink (nftables counters). Lossless \
             means loss under {} %. The search steps ×{} from {}, then bisects to within \
             ×{}; each search trial is {} s. CPU figures come from one {} s trial at {} pps \
             offered to every relay: **relay CPUs** is the busy time (wall − idle) of the CPUs \
             reserved for relays, so it includes the kernel's softirq work and is the only \
             figure the kernel's forwarding has; **processes** is the relay processes' own run \
             time. Both in CPU seconds per million delivered packets (= µs per packet).\n",
            meta.loss_threshold_pct,
            settings.search_step,
            rate(settings.search_start_pps),
            settings.search_precision,
            settings.trial_s,
            settings.cpu_trial_s,
            rate(settings.cpu_rate_pps),
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
        let _ = writeln!(md, "## Where the relay-socket column comes from\n");
        for kind in [
            relay::MCR,
            relay::MCR_KERNEL,
            RelayKind::Kernel,
            RelayKind::Socat,
        ] {
            let _ = writeln!(md, "- {}: {}", kind.label(), kind.socket_drops_source());
        }
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
        let _ = writeln!(
            md,
            "| relay | highest lossless rate | at {cpu_rate} pps: delivered/s | loss | CPU s/M (relay CPUs) | CPU s/M (processes) | overload: offered → delivered/s | loss | lost where |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
        for relay in &result.relays {
            let _ = writeln!(md, "{}", relay_row(relay));
        }
        let _ = writeln!(md);
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
        let _ = writeln!(md);
    }

    fn ratios_markdown(&self, md: &mut String) {
        let mcr = MCR;
        let _ = writeln!(md, "## Ratios (same run)\n");
        let _ = writeln!(
            md,
            "| scenario | lossless rate MCR/kernel | CPU per packet MCR/kernel | lossless rate MCR/socat | CPU per packet MCR/socat |\n|---|---|---|---|---|"
        );
        for result in &self.scenarios {
            let Some(ours) = result.relay(mcr) else {
                continue;
            };
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
                "| {} | {} | {} | {} | {} |",
                result.scenario.name,
                ratio(RelayKind::Kernel, lossless),
                ratio(RelayKind::Kernel, cpu),
                ratio(RelayKind::Socat, lossless),
                ratio(RelayKind::Socat, cpu),
            );
        }
        let _ = writeln!(
            md,
            "\nA lossless-rate ratio below 1 means MCR carries less without loss; a CPU ratio \
             above 1 means MCR costs more per packet. Lossless rates marked ≥ were bounded by \
             the generator or the search, not the relay, so their ratios are bounds too.\n"
        );
    }
}

/// The targets of the issue, judged on this run's figures (reported, not enforced).
fn targets(scenarios: &[ScenarioResult]) -> Vec<Target> {
    let mut targets = against_the_kernel(scenarios);
    targets.extend(scaling(scenarios));
    targets
}

fn verdict(ok: bool) -> String {
    if ok { "met" } else { "not met" }.to_owned()
}

/// Lossless wherever the kernel is; CPU per packet within 2× the kernel's.
fn against_the_kernel(scenarios: &[ScenarioResult]) -> Vec<Target> {
    let mcr = MCR;
    let find = |name: &str| scenarios.iter().find(|s| s.scenario.name == name);
    let mut targets = Vec::new();
    for result in scenarios {
        let (Some(ours), Some(kernel)) = (result.relay(mcr), result.relay(RelayKind::Kernel))
        else {
            continue;
        };
        let (a, b) = (ours.figures().lossless_pps, kernel.figures().lossless_pps);
        targets.push(Target {
            goal: "MCR lossless wherever the kernel is".to_owned(),
            scenario: result.scenario.name.clone(),
            figures: format!("MCR {}, kernel {}", opt_rate(a), opt_rate(b)),
            verdict: match (a, b) {
                (_, None) => "n/a".to_owned(),
                (None, Some(_)) => "not met".to_owned(),
                // Within the search's precision of the kernel's rate.
                (Some(a), Some(b)) => verdict(a >= 0.9 * b),
            },
        });
    }
    for name in ["1to1-64", "1to1-512", "1to1-1400"] {
        let Some(result) = find(name) else { continue };
        let (Some(ours), Some(kernel)) = (result.relay(mcr), result.relay(RelayKind::Kernel))
        else {
            continue;
        };
        let (a, b) = (
            ours.figures().cpu_s_per_m_delivered,
            kernel.figures().cpu_s_per_m_delivered,
        );
        targets.push(Target {
            goal: "CPU per packet within 2× the kernel's".to_owned(),
            scenario: name.to_owned(),
            figures: format!("MCR {} s/M, kernel {} s/M", seconds(a), seconds(b)),
            verdict: match (a, b) {
                (Some(a), Some(b)) => verdict(a <= 2.0 * b),
                _ => "n/a".to_owned(),
            },
        });
    }
    targets
}

/// Fan-out, 50 streams, and the 3-hop chain.
fn scaling(scenarios: &[ScenarioResult]) -> Vec<Target> {
    let mcr = MCR;
    let find = |name: &str| scenarios.iter().find(|s| s.scenario.name == name);
    let mut targets = Vec::new();
    let per_input =
        |name: &str, kind: RelayKind| find(name)?.relay(kind)?.figures().cpu_s_per_m_input;
    if find("fanout4-512").is_some() {
        let (one, four) = (per_input("1to1-512", mcr), per_input("fanout4-512", mcr));
        let kernel = per_input("fanout4-512", RelayKind::Kernel)
            .zip(per_input("1to1-512", RelayKind::Kernel))
            .map_or_else(
                || "n/a".to_owned(),
                |(four, one)| format!("{:.2}×", four / one),
            );
        targets.push(Target {
            goal: "CPU per input packet grows less than linearly with fan-out".to_owned(),
            scenario: "fanout4-512 vs 1to1-512".to_owned(),
            figures: format!(
                "MCR {} → {} s per M input packets ({}); kernel {kernel}",
                seconds(one),
                seconds(four),
                one.zip(four).map_or_else(
                    || "n/a".to_owned(),
                    |(one, four)| format!("{:.2}×", four / one)
                )
            ),
            verdict: one
                .zip(four)
                .map_or_else(|| "n/a".to_owned(), |(one, four)| verdict(four < 4.0 * one)),
        });
    }
    let delivered = |name: &str| find(name)?.relay(mcr)?.figures().cpu_s_per_m_delivered;
    if find("streams50-512").is_some() {
        let (one, fifty) = (delivered("1to1-512"), delivered("streams50-512"));
        targets.push(Target {
            goal: "50 streams as cheap per packet as 1".to_owned(),
            scenario: "streams50-512 vs 1to1-512".to_owned(),
            figures: format!("MCR {} vs {} s/M", seconds(fifty), seconds(one)),
            // Within 10 %: the figures of two trials on a shared machine differ that much.
            verdict: one.zip(fifty).map_or_else(
                || "n/a".to_owned(),
                |(one, fifty)| verdict(fifty <= 1.1 * one),
            ),
        });
    }
    if let Some(result) = find("3hop-512") {
        for relay in &result.relays {
            let check = relay.at_one_hop_rate.as_ref();
            targets.push(Target {
                goal: "3-hop chain loses nothing at the 1-hop lossless rate".to_owned(),
                scenario: format!("3hop-512, {}", relay.relay),
                figures: check.map_or_else(
                    || "no 1-hop lossless rate".to_owned(),
                    |c| format!("{} at {} pps", percent(c.trial.loss_pct), rate(c.rate_pps)),
                ),
                verdict: match check {
                    Some(c) if relay.kind.is_mcr() => verdict(c.trial.lossless()),
                    Some(_) => "(reference)".to_owned(),
                    None if relay.kind.is_mcr() => "not met".to_owned(),
                    None => "n/a".to_owned(),
                },
            });
        }
    }
    targets
}

/// One relay's line of a scenario table.
fn relay_row(relay: &RelayResult) -> String {
    let figures = relay.figures();
    let lossless = match (&relay.search, relay.forwarding) {
        (_, false) if relay.warmup.is_some() => "forwards nothing".to_owned(),
        (Some(search), _) => bounded(search.bound, figures.lossless_pps),
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
    let (overload, overload_loss, where_lost) = relay
        .overload
        .as_ref()
        .or(relay.at_cpu_rate.as_ref().filter(|t| !t.lossless()))
        .map_or_else(
            || ("—".to_owned(), "—".to_owned(), "—".to_owned()),
            |t| {
                (
                    format!("{} → {}", rate(t.offered_pps), rate(t.delivered_pps)),
                    percent(t.loss_pct),
                    where_lost(t),
                )
            },
        );
    format!(
        "| {} | {} | {} | {} | {}{} | {}{} | {} | {} | {} |",
        relay.relay,
        lossless,
        cpu_delivered,
        cpu_loss,
        seconds(figures.cpu_s_per_m_delivered),
        cpu_flags,
        seconds(figures.process_cpu_s_per_m_delivered),
        cpu_flags,
        overload,
        overload_loss,
        where_lost,
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

fn opt_rate(pps: Option<f64>) -> String {
    pps.map_or_else(|| "none".to_owned(), rate)
}

fn bounded(bound: Bound, lossless: Option<f64>) -> String {
    match (lossless, bound) {
        (None, _) => "none".to_owned(),
        (Some(pps), Bound::Generator) => format!("≥ {} (generator)", rate(pps)),
        (Some(pps), Bound::SearchMax) => format!("≥ {} (search max)", rate(pps)),
        (Some(pps), _) => rate(pps),
    }
}

fn percent(value: f64) -> String {
    if value == 0.0 {
        "0 %".to_owned()
    } else if value.abs() < 0.01 {
        format!("{value:.4} %")
    } else {
        format!("{value:.2} %")
    }
}

fn seconds(value: Option<f64>) -> String {
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
