//! `cargo xtask bench --generator`: what the generator offers at a ladder of requested rates,
//! once paced by the `tbf` qdisc and once pacing alone with the qdisc bypassed. With no relay
//! (the default) the frames enter the first relay namespace, whose CPU (the relay CPU, as in
//! every trial) receives and drops them, and the sink's share of the generator CPU is missing;
//! with `--relay` the named relays forward them to the sink, as in a run. This is how the rate
//! at which the generator stops using the qdisc ([`super::generator::TBF_MAX_PPS`]) was chosen.

use std::{fmt::Write as _, path::Path};

use anyhow::Context as _;
use serde::Serialize;

use super::{
    Settings,
    generator::{Generator, Pacing},
    relay::{Relay, RelayEnv, RelayKind},
    report::rate,
    scenario::Scenario,
    sink::Sink,
    topology::{CpuPlan, Topology},
    trial::{Bench, Trial},
};

/// Requested rates of the ladder, input packets per second.
const LADDER: [f64; 13] = [
    25e3, 50e3, 100e3, 200e3, 300e3, 400e3, 500e3, 600e3, 800e3, 1e6, 1.2e6, 1.5e6, 2e6,
];

#[derive(Serialize)]
pub struct Step {
    pub pacing: Pacing,
    pub trial: Trial,
}

impl Step {
    /// Share of the generator CPU its thread used while sending.
    fn busy(&self) -> f64 {
        self.trial.generator_busy_s / self.trial.seconds
    }

    /// Share of the frames the relay's input (or, with no relay, the relay namespace's
    /// interface) refused: its CPU's receive backlog was full.
    fn dropped_entering_the_relay(&self) -> f64 {
        self.trial.loss.relay_interface as f64 / self.trial.expected.max(1) as f64
    }
}

/// One ladder: a scenario, with a relay or without.
#[derive(Serialize)]
pub struct Ladder {
    pub scenario: String,
    /// `none`, or the relay's label.
    pub relay: String,
    pub steps: Vec<Step>,
}

/// Runs the ladder in each of `scenarios`, with no relay when `relays` is empty, else with each
/// of them; writes `generator.md` and `generator.json` to `out`.
pub fn run(
    scenarios: &[Scenario],
    relays: &[RelayKind],
    settings: &Settings,
    cpus: &CpuPlan,
    mcr: &Path,
    out: &Path,
) -> anyhow::Result<()> {
    let dir = out.join("run").join("generator");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let relays: Vec<Option<RelayKind>> = if relays.is_empty() {
        vec![None]
    } else {
        relays.iter().copied().map(Some).collect()
    };
    let mut all = Vec::new();
    for scenario in scenarios {
        for &kind in &relays {
            let label = kind.map_or_else(|| "none".to_owned(), RelayKind::label);
            eprintln!(
                "\nbench: the generator in scenario {}, relay {label}",
                scenario.name
            );
            let env = RelayEnv {
                dir: &dir,
                mcr,
                cpus,
            };
            all.push(Ladder {
                scenario: scenario.name.clone(),
                relay: label,
                steps: ladder(scenario, kind, settings, &env)?,
            });
        }
    }
    let markdown = markdown(&all, settings);
    std::fs::write(out.join("generator.md"), &markdown).context("writing generator.md")?;
    std::fs::write(
        out.join("generator.json"),
        serde_json::to_string_pretty(&all).context("serializing the generator ladders")?,
    )
    .context("writing generator.json")?;
    println!("{markdown}");
    Ok(())
}

/// Both pacings at every rate of the ladder, in a chain of their own.
fn ladder(
    scenario: &Scenario,
    kind: Option<RelayKind>,
    settings: &Settings,
    env: &RelayEnv,
) -> anyhow::Result<Vec<Step>> {
    let topology = Topology::build(scenario.hops, scenario.fanout, scenario.family, env.cpus)?;
    let generator = Generator::new(
        &topology,
        &scenario.generated()?,
        scenario.payload,
        scenario.family,
    )?;
    let counted = kind.unwrap_or(RelayKind::Kernel);
    let sink = Sink::install(
        topology.sink(),
        scenario.destinations(&topology, counted)?,
        env.dir,
    )?;
    let mut relay = kind
        .map(|kind| Relay::start(kind, &scenario.hop_plans(&topology, kind)?, env))
        .transpose()?;
    let mut steps = Vec::new();
    for pacing in [Pacing::Tbf, Pacing::Generator] {
        let bench = Bench {
            topology: &topology,
            generator: &generator,
            sink: &sink,
            cpus: env.cpus,
            copies: scenario.fanout as u64,
            pacing: Some(pacing),
        };
        for requested in LADDER {
            let trial = bench.run(relay.as_mut(), requested, settings.trial_s, false)?;
            let step = Step { pacing, trial };
            eprintln!(
                "bench:   {pacing:?} asked {} → offered {} ({:.0} % of asked), generator busy {:.0} %, delivered {}, dropped entering the relay {:.2} %",
                rate(requested),
                rate(step.trial.offered_pps),
                100.0 * step.trial.offered_pps / requested,
                100.0 * step.busy(),
                rate(step.trial.delivered_pps),
                100.0 * step.dropped_entering_the_relay(),
            );
            steps.push(step);
            super::check_interrupted()?;
        }
    }
    Ok(steps)
}

fn markdown(all: &[Ladder], settings: &Settings) -> String {
    let mut md = String::from("# What the generator offers\n\n");
    let _ = writeln!(
        md,
        "{} s per trial. *asked*: the requested rate; *offered*: frames over the generator's \
         time; *busy*: CPU time of the generator's thread over that time (near 100 %: it \
         could go no faster); *dropped*: frames the relay CPU's receive backlog refused.\n",
        settings.trial_s
    );
    for ladder in all {
        let _ = writeln!(md, "## {}, relay {}\n", ladder.scenario, ladder.relay);
        let _ = writeln!(
            md,
            "| asked | tbf: offered | % of asked | busy | dropped | qdisc bypassed: offered | % of asked | busy | dropped |\n|---|---|---|---|---|---|---|---|---|"
        );
        for requested in LADDER {
            let cells: Vec<String> = [Pacing::Tbf, Pacing::Generator]
                .iter()
                .map(|&pacing| {
                    ladder
                        .steps
                        .iter()
                        .find(|s| s.pacing == pacing && (s.trial.rate_pps - requested).abs() < 0.5)
                        .map_or_else(
                            || "— | — | — | —".to_owned(),
                            |s| {
                                format!(
                                    "{} | {:.0} % | {:.0} % | {:.2} %",
                                    rate(s.trial.offered_pps),
                                    100.0 * s.trial.offered_pps / requested,
                                    100.0 * s.busy(),
                                    100.0 * s.dropped_entering_the_relay()
                                )
                            },
                        )
                })
                .collect();
            let _ = writeln!(md, "| {} | {} |", rate(requested), cells.join(" | "));
        }
        let _ = writeln!(md);
    }
    md
}
