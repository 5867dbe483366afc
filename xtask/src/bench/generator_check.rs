//! `cargo xtask bench --generator`: what the generator offers with no relay running, at a
//! ladder of requested rates, once paced by the `tbf` qdisc and once pacing alone with the
//! qdisc bypassed. The frames enter the first relay namespace, whose CPU (the relay CPU, as
//! in every trial) receives and drops them; nothing is forwarded, so the sink's share of the
//! generator CPU is missing here. This is how the rate at which the generator stops using the
//! qdisc ([`super::generator::TBF_MAX_PPS`]) was chosen.

use std::{fmt::Write as _, path::Path};

use anyhow::Context as _;
use serde::Serialize;

use super::{
    Settings,
    generator::{Generator, Pacing},
    relay::RelayKind,
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
}

#[derive(Serialize)]
pub struct ScenarioSteps {
    pub scenario: String,
    pub steps: Vec<Step>,
}

pub fn run(
    scenarios: &[Scenario],
    settings: &Settings,
    cpus: &CpuPlan,
    out: &Path,
) -> anyhow::Result<()> {
    let dir = out.join("run").join("generator");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut all = Vec::new();
    for scenario in scenarios {
        eprintln!("\nbench: generator alone, scenario {}", scenario.name);
        let topology = Topology::build(scenario.hops, scenario.fanout, cpus)?;
        let generator = Generator::new(&topology, &scenario.generated()?, scenario.payload)?;
        let sink = Sink::install(
            topology.sink(),
            scenario.destinations(&topology, RelayKind::Kernel)?,
            &dir,
        )?;
        let mut steps = Vec::new();
        for pacing in [Pacing::Tbf, Pacing::Generator] {
            let bench = Bench {
                topology: &topology,
                generator: &generator,
                sink: &sink,
                cpus,
                copies: scenario.fanout as u64,
                pacing: Some(pacing),
            };
            for requested in LADDER {
                let trial = bench.run(None, requested, settings.trial_s, false)?;
                let step = Step { pacing, trial };
                eprintln!(
                    "bench:   {pacing:?} asked {} → offered {} ({:.0} % of asked), generator busy {:.0} %, dropped entering the relay {}",
                    rate(requested),
                    rate(step.trial.offered_pps),
                    100.0 * step.trial.offered_pps / requested,
                    100.0 * step.busy(),
                    step.trial.loss.relay_interface,
                );
                steps.push(step);
                super::check_interrupted()?;
            }
        }
        all.push(ScenarioSteps {
            scenario: scenario.name.clone(),
            steps,
        });
    }
    let markdown = markdown(&all, settings);
    std::fs::write(out.join("generator.md"), &markdown).context("writing generator.md")?;
    std::fs::write(
        out.join("generator.json"),
        serde_json::to_string_pretty(&all).context("serializing the generator steps")?,
    )
    .context("writing generator.json")?;
    println!("{markdown}");
    Ok(())
}

fn markdown(all: &[ScenarioSteps], settings: &Settings) -> String {
    let mut md = String::from("# What the generator offers, no relay running\n\n");
    let _ = writeln!(
        md,
        "{} s per trial. *asked*: the requested rate; *offered*: frames over the generator's \
         time; *generator busy*: CPU time of the generator's thread over that time (near 100 %: \
         it could go no faster); *dropped entering the relay*: frames the relay CPU's receive \
         backlog refused.\n",
        settings.trial_s
    );
    for scenario in all {
        let _ = writeln!(md, "## {}\n", scenario.scenario);
        let _ = writeln!(
            md,
            "| asked | tbf: offered | % of asked | generator busy | dropped entering the relay | qdisc bypassed: offered | % of asked | generator busy | dropped entering the relay |\n|---|---|---|---|---|---|---|---|---|"
        );
        for requested in LADDER {
            let cells: Vec<String> = [Pacing::Tbf, Pacing::Generator]
                .iter()
                .map(|&pacing| {
                    scenario
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
                                    100.0 * s.trial.loss.relay_interface as f64
                                        / s.trial.packets.max(1) as f64
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
