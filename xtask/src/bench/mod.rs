//! `cargo xtask bench`: MCR next to the kernel's multicast forwarding and socat, in network
//! namespaces.
//!
//! Each scenario builds a chain of namespaces (generator → relay hops → sink, see
//! `topology.rs`), then for each relay: starts it, runs one trial at a fixed offered rate for
//! the CPU figures, searches for the highest lossless rate, runs trials at 1.5×, 2× and 4× that
//! rate (`overload.rs`), measures the one-way latency at 10 %, 50 % and 90 % of that rate
//! (`latency.rs`), and stops it. The benchmark sends the frames itself (`generator.rs`),
//! nftables counts at the sink (`sink.rs`), a packet tap there times the latency samples
//! (`tap.rs`), every counter on the way is read around each trial (`trial.rs`). The results go
//! to `target/bench/` as Markdown, JSON and SVG charts (`report.rs`, `targets.rs`, `chart.rs`).

mod backlog;
mod chart;
mod cpu;
mod frame;
mod generator;
mod generator_check;
mod latency;
mod latency_trace;
mod overload;
mod pacing;
mod packet_socket;
mod process;
mod relay;
mod report;
mod scenario;
mod search;
mod sink;
mod stamp;
mod tap;
mod targets;
mod topology;
mod trial;
mod tx_timestamps;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;
use nix::{
    sched::{CpuSet, sched_setaffinity},
    sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction},
    unistd::Pid,
};

use self::{
    generator::{Generator, Pacing},
    latency::LatencyPoint,
    overload::OverloadPoint,
    relay::{Relay, RelayEnv, RelayKind},
    report::{OneHopCheck, RelayResult, Report, ScenarioResult},
    scenario::Scenario,
    search::{Probe, SearchParams},
    sink::Sink,
    topology::{CpuPlan, Topology},
    trial::{Bench, Trial},
};

#[derive(Args)]
pub struct BenchArgs {
    /// A short run (under two minutes) that checks the benchmark still works.
    #[arg(long)]
    pub quick: bool,
    /// Run only these scenarios (comma-separated: 1to1-64, 1to1-512, 1to1-1400, fanout4-512,
    /// streams50-512, 3hop-512, 1to1-512-v6).
    #[arg(long, value_delimiter = ',')]
    pub scenario: Vec<String>,
    /// Run only these relays (comma-separated: mcr, mcr-rt, mcr-2w, mcr-kernel, kernel, socat).
    #[arg(long, value_delimiter = ',')]
    pub relay: Vec<String>,
    /// Offered rate (input packets per second) of the trial the CPU figures come from.
    #[arg(long, default_value_t = 50_000.0)]
    pub cpu_rate: f64,
    /// Where results.md, results.json and the chart go.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Measure the generator: what it offers at a ladder of rates, paced by the tbf qdisc and
    /// with the qdisc bypassed, with no relay running (or with the relays --relay names), in
    /// 1to1-512 unless --scenario says others; writes generator.md and generator.json.
    #[arg(long)]
    pub generator: bool,
    /// Record a scheduler, softirq and `io_uring` trace of the relay CPUs (perf) during every
    /// latency trial, and say what ran there while the slowest samples waited
    /// (run/<scenario>/<relay>-latency-<load>pct.perf.data and .md).
    #[arg(long)]
    pub latency_trace: bool,
}

/// How long and how finely the benchmark measures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Settings {
    pub mode: &'static str,
    /// Length of each search trial and overload point.
    pub trial_s: f64,
    /// Length of the trial at the CPU rate.
    pub cpu_trial_s: f64,
    pub cpu_rate_pps: f64,
    pub search_start_pps: f64,
    pub search_min_pps: f64,
    pub search_max_pps: f64,
    pub search_step: f64,
    pub search_precision: f64,
    pub search_max_trials: usize,
    /// Length of each latency trial.
    pub latency_trial_s: f64,
    /// Load points of the latency trials, as fractions of each relay's lossless rate.
    pub latency_loads: Vec<f64>,
    /// Whether the latency trials were traced (`--latency-trace`), which costs the relay CPUs
    /// time of their own.
    pub latency_trace: bool,
}

impl Settings {
    fn new(quick: bool, cpu_rate: f64) -> Self {
        if quick {
            Self {
                mode: "quick",
                trial_s: 0.4,
                cpu_trial_s: 0.5,
                cpu_rate_pps: cpu_rate,
                search_start_pps: 50_000.0,
                search_min_pps: 5_000.0,
                search_max_pps: 2_000_000.0,
                search_step: 2.0,
                search_precision: 1.5,
                search_max_trials: 7,
                latency_trial_s: 0.5,
                latency_loads: latency::LOADS.to_vec(),
                latency_trace: false,
            }
        } else {
            Self {
                mode: "full",
                trial_s: 2.0,
                cpu_trial_s: 5.0,
                cpu_rate_pps: cpu_rate,
                search_start_pps: 25_000.0,
                search_min_pps: 1_000.0,
                search_max_pps: 2_000_000.0,
                search_step: 2.0,
                search_precision: 1.1,
                search_max_trials: 15,
                latency_trial_s: 3.0,
                latency_loads: latency::LOADS.to_vec(),
                latency_trace: false,
            }
        }
    }

    fn search(&self) -> SearchParams {
        SearchParams {
            start: self.search_start_pps,
            min: self.search_min_pps,
            max: self.search_max_pps,
            step: self.search_step,
            precision: self.search_precision,
            max_trials: self.search_max_trials,
        }
    }
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmark creates network namespaces: run it as root");
    }
    check_tools()?;
    let mut settings = Settings::new(args.quick, args.cpu_rate);
    settings.latency_trace = args.latency_trace;
    let scenarios = select(args)?;
    let generator_relays = generator_check_relays(args);
    let needs_mcr = if args.generator {
        generator_relays.iter().any(|relay| relay.is_mcr())
    } else {
        scenarios
            .iter()
            .any(|s| s.relays.iter().any(|relay| relay.is_mcr()))
    };
    let mcr = if needs_mcr {
        crate::run(Command::new("cargo").args(["build", "--release", "--package", "mcr"]))?;
        crate::workspace_root().join("target/release/mcr")
    } else {
        PathBuf::new()
    };

    if args.generator {
        return check_generator(args, &settings, scenarios, &generator_relays, &mcr);
    }

    // The time a run reports is measurement only; building MCR comes first and is reported
    // apart (it dominates a quick run on a clean checkout).
    let build_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    catch_interrupts()?;
    cpu::set_quiet_budget(Duration::from_secs(if args.quick { 20 } else { 180 }));
    topology::sweep_stale();
    let _backlog = backlog::DeepBacklog::raise()?;
    let cpus = cpu_plan()?;
    pin_to(cpus.generator)?;
    let out = &args.out;
    let run_dir = out.join("run");
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let run_dir = run_dir
        .canonicalize()
        .context("resolving the run directory")?;
    eprintln!(
        "bench: {} run, {} scenarios; generator on CPU {}, relays on CPU {}",
        settings.mode,
        scenarios.len(),
        cpus.generator,
        cpus.relay_list()
    );

    let mut results: Vec<ScenarioResult> = Vec::new();
    for scenario in &scenarios {
        eprintln!("\nbench: scenario {} — {}", scenario.name, scenario.title);
        let result = run_scenario(scenario, &settings, &cpus, &mcr, &run_dir, &results);
        let result = result.unwrap_or_else(|error| {
            eprintln!("bench: scenario {} failed: {error:#}", scenario.name);
            ScenarioResult::failed(scenario, &error)
        });
        results.push(result);
        if interrupted() {
            break;
        }
    }

    let report = Report::new(
        command_line(),
        settings,
        cpus,
        results,
        started.elapsed().as_secs_f64(),
    );
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let markdown = report.markdown();
    write(&out.join("results.md"), &markdown)?;
    write(
        &out.join("results.json"),
        &serde_json::to_string_pretty(&report).context("serializing the results")?,
    )?;
    write(
        &out.join("delivered-vs-offered.svg"),
        &chart::render(&report),
    )?;
    let latency_chart = out.join("latency.svg");
    match chart::render_latency(&report) {
        Some(svg) => write(&latency_chart, &svg)?,
        None => {
            let _ = std::fs::remove_file(&latency_chart);
        }
    }
    println!("{markdown}");
    eprintln!(
        "bench: wrote {0}/results.md, {0}/results.json, {0}/delivered-vs-offered.svg and {0}/latency.svg after {1:.0} s of measurement ({2:.0} s building MCR before)",
        out.display(),
        started.elapsed().as_secs_f64(),
        build_s
    );
    check_interrupted()?;
    let failures = report.failures();
    if !failures.is_empty() {
        bail!("the benchmark did not complete:\n{}", failures.join("\n"));
    }
    Ok(())
}

/// The relays `--generator` runs with: those `--relay` names, none without it.
fn generator_check_relays(args: &BenchArgs) -> Vec<RelayKind> {
    RelayKind::ALL
        .into_iter()
        .filter(|kind| args.relay.contains(&kind.label()))
        .collect()
}

/// `--generator`: the generator's ladder (1to1-512 unless scenarios were named), with no relay
/// or with the relays `--relay` names.
fn check_generator(
    args: &BenchArgs,
    settings: &Settings,
    mut scenarios: Vec<Scenario>,
    relays: &[RelayKind],
    mcr: &Path,
) -> anyhow::Result<()> {
    if args.scenario.is_empty() {
        scenarios = scenario::all()
            .into_iter()
            .filter(|s| s.name == "1to1-512")
            .collect();
    }
    catch_interrupts()?;
    cpu::set_quiet_budget(Duration::from_secs(if args.quick { 20 } else { 180 }));
    topology::sweep_stale();
    let _backlog = backlog::DeepBacklog::raise()?;
    let cpus = cpu_plan()?;
    pin_to(cpus.generator)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let out = args
        .out
        .canonicalize()
        .context("resolving the output directory")?;
    generator_check::run(&scenarios, relays, settings, &cpus, mcr, &out)?;
    check_interrupted()
}

/// Fails naming the first tool the benchmark needs that is missing.
fn check_tools() -> anyhow::Result<()> {
    for tool in [
        "tc",
        "nft",
        "ethtool",
        "smcrouted",
        "socat",
        "taskset",
        "nsenter",
        "ip",
    ] {
        if crate::output(Command::new("sh").args(["-c", &format!("command -v {tool}")])).is_none() {
            bail!("{tool} is missing (cargo xtask setup installs it)");
        }
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn select(args: &BenchArgs) -> anyhow::Result<Vec<Scenario>> {
    let mut scenarios = if args.quick {
        scenario::quick()
    } else {
        scenario::all()
    };
    for name in &args.scenario {
        if !scenario::all().iter().any(|s| &s.name == name) {
            bail!("no scenario {name}");
        }
    }
    let known: Vec<String> = RelayKind::ALL.iter().map(|kind| kind.label()).collect();
    for name in &args.relay {
        if !known.contains(name) {
            bail!("no relay {name} ({})", known.join(", "));
        }
    }
    if !args.scenario.is_empty() {
        scenarios = scenario::all()
            .into_iter()
            .filter(|s| args.scenario.contains(&s.name))
            .collect();
        if args.quick {
            for s in &mut scenarios {
                s.relays
                    .retain(|relay| !scenario::FULL_RUN_ONLY.contains(relay));
            }
        }
    }
    if !args.relay.is_empty() {
        for s in &mut scenarios {
            s.relays.retain(|relay| args.relay.contains(&relay.label()));
        }
    }
    scenarios.retain(|s| !s.relays.is_empty());
    if scenarios.is_empty() {
        bail!("nothing to run with these --scenario and --relay filters");
    }
    Ok(scenarios)
}

/// The generator (and the benchmark, and the sink's receive processing) on CPU 0, relays on
/// the others.
fn cpu_plan() -> anyhow::Result<CpuPlan> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let cpus: Vec<usize> = stat
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|name| name.strip_prefix("cpu")?.parse().ok())
        .collect();
    let generator = *cpus.first().context("no CPUs in /proc/stat")?;
    let mut relays: Vec<usize> = cpus.into_iter().filter(|&cpu| cpu != generator).collect();
    if relays.is_empty() {
        eprintln!("bench: warning: one CPU only; generator and relays share it");
        relays.push(generator);
    }
    Ok(CpuPlan { generator, relays })
}

/// Keeps this process (and every helper it starts) on `cpu`, away from the relays.
fn pin_to(cpu: usize) -> anyhow::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu).context("CPU number")?;
    sched_setaffinity(Pid::from_raw(0), &set).context("pinning the benchmark to its CPU")
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C stops the run between trials, so the guards remove every namespace and process.
fn catch_interrupts() -> anyhow::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }.context("installing a signal handler")?;
    }
    Ok(())
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("cargo xtask {}", args.join(" "))
}

fn run_scenario(
    scenario: &Scenario,
    settings: &Settings,
    cpus: &CpuPlan,
    mcr: &Path,
    run_dir: &Path,
    earlier: &[ScenarioResult],
) -> anyhow::Result<ScenarioResult> {
    let dir = run_dir.join(&scenario.name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let topology = Topology::build(scenario.hops, scenario.fanout, scenario.family, cpus)?;
    let generator = Generator::new(
        &topology,
        &scenario.generated()?,
        scenario.payload,
        scenario.family,
    )?;

    let copies = scenario.fanout as u64;

    // The generator alone, relays stopped: what receiving and dropping the packets costs.
    let baseline = {
        let destinations = scenario.destinations(&topology, RelayKind::Kernel)?;
        let sink = Sink::install(topology.sink(), destinations, &dir)?;
        let bench = Bench {
            topology: &topology,
            generator: &generator,
            sink: &sink,
            cpus,
            copies,
            pacing: None,
        };
        let trial = bench.run(None, settings.cpu_rate_pps, settings.cpu_trial_s, true)?;
        eprintln!("bench:   baseline (no relay) {}", describe(&trial));
        trial
    };

    let mut relays = Vec::new();
    for &kind in &scenario.relays {
        let env = RelayEnv {
            dir: &dir,
            mcr,
            cpus,
        };
        let mut result = RelayResult::new(kind);
        if let Err(error) = run_relay(
            scenario,
            settings,
            &topology,
            &generator,
            &env,
            earlier,
            &mut result,
        ) {
            eprintln!("bench:   {} failed: {error:#}", kind.label());
            result.error = Some(format!("{error:#}"));
        }
        relays.push(result);
        check_interrupted()?;
    }
    Ok(ScenarioResult {
        scenario: scenario.clone(),
        baseline: Some(baseline),
        relays,
        error: None,
    })
}

/// Why the search stopped, whether its lossless rate held a second trial, and which rates
/// passed once only: `Relay, held twice; lossless once only at 283 k`.
fn search_summary(found: &search::SearchResult) -> String {
    let held = if found.repeated {
        "held twice"
    } else {
        "one trial"
    };
    if found.flukes.is_empty() {
        format!("{:?}, {held}", found.bound)
    } else {
        format!(
            "{:?}, {held}; lossless once only at {}",
            found.bound,
            report::rates(&found.flukes)
        )
    }
}

/// While it lives, the relays' inputs are received on the generator's CPU, for a relay that
/// asks for it ([`RelayKind::receives_apart`]); dropped, they are received on the relay CPUs
/// again, as every other relay has them.
struct ReceivedApart<'a> {
    topology: &'a Topology,
    relay_mask: u64,
}

impl<'a> ReceivedApart<'a> {
    fn steer(
        topology: &'a Topology,
        cpus: &CpuPlan,
        kind: RelayKind,
    ) -> anyhow::Result<Option<Self>> {
        if !kind.receives_apart() {
            return Ok(None);
        }
        let apart = Self {
            topology,
            relay_mask: cpus.relay_mask(),
        };
        topology.steer_relay_inputs(cpus.generator_mask())?;
        Ok(Some(apart))
    }
}

impl Drop for ReceivedApart<'_> {
    fn drop(&mut self) {
        if let Err(error) = self.topology.steer_relay_inputs(self.relay_mask) {
            eprintln!(
                "bench:   the relays' inputs stay received on the generator's CPU: {error:#}"
            );
        }
    }
}

fn run_relay(
    scenario: &Scenario,
    settings: &Settings,
    topology: &Topology,
    generator: &Generator,
    env: &RelayEnv,
    earlier: &[ScenarioResult],
    result: &mut RelayResult,
) -> anyhow::Result<()> {
    let kind = result.kind;
    let label = kind.label();
    let sink = Sink::install(
        topology.sink(),
        scenario.destinations(topology, kind)?,
        env.dir,
    )?;
    let bench = Bench {
        topology,
        generator,
        sink: &sink,
        cpus: env.cpus,
        copies: scenario.fanout as u64,
        pacing: None,
    };
    let plans = scenario.hop_plans(topology, kind)?;
    let _apart = ReceivedApart::steer(topology, env.cpus, kind)?;
    let mut relay = Relay::start(kind, &plans, env)?;

    // Warm-up: a few hundred packets, to see the relay forwards at all.
    let mut warmup = bench.run(Some(&mut relay), 5_000.0, 0.1, false)?;
    if warmup.delivered == 0 {
        std::thread::sleep(Duration::from_secs(1));
        warmup = bench.run(Some(&mut relay), 5_000.0, 0.1, false)?;
    }
    result.forwarding = warmup.delivered > 0;
    eprintln!("bench:   {label} warm-up {}", describe(&warmup));
    if !result.forwarding && kind.is_mcr() {
        eprintln!(
            "bench:   {label} forwards nothing; its stats:\n{}",
            relay.describe()
        );
    }
    result.warmup = Some(warmup);

    let at_cpu_rate = bench.run(
        Some(&mut relay),
        settings.cpu_rate_pps,
        settings.cpu_trial_s,
        true,
    )?;
    eprintln!(
        "bench:   {label} at the CPU rate {}",
        describe(&at_cpu_rate)
    );
    result.at_cpu_rate = Some(at_cpu_rate);
    if !result.forwarding {
        return Ok(());
    }

    let mut trials = Vec::new();
    let found = search::search(&settings.search(), |rate| {
        let trial = bench.run(Some(&mut relay), rate, settings.trial_s, false)?;
        eprintln!("bench:   {label} search {}", describe(&trial));
        let probe = Probe {
            lossless: trial.lossless(),
            offered: trial.offered_pps,
        };
        trials.push(trial);
        Ok(probe)
    });
    result.trials = trials;
    let found = found?;

    let summary = search_summary(&found);
    result.search = Some(found);
    eprintln!(
        "bench:   {label} highest lossless rate: {} offered ({summary})",
        result
            .lossless_offered()
            .map_or_else(|| "none".to_owned(), report::rate),
    );

    // Latency first: the overload points leave queues behind.
    if let Some(lossless) = result.lossless_offered() {
        result.latency = latency_points(
            &bench,
            &mut relay,
            lossless,
            settings,
            env,
            &scenario.name,
            &label,
        )?;
        result.overload = overload_points(&bench, &mut relay, lossless, settings, &label)?;
    }

    if let Some(reference) = &scenario.one_hop_reference {
        let one_hop = earlier
            .iter()
            .find(|s| &s.scenario.name == reference)
            .and_then(|s| s.relays.iter().find(|r| r.kind == kind))
            .and_then(RelayResult::lossless_offered);
        if let Some(rate) = one_hop {
            let trial = bench.run(Some(&mut relay), rate, settings.trial_s, false)?;
            eprintln!(
                "bench:   {label} at its 1-hop lossless rate {}",
                describe(&trial)
            );
            result.at_one_hop_rate = Some(OneHopCheck {
                reference: reference.clone(),
                rate_pps: rate,
                trial,
            });
        }
    }
    drop(relay);
    Ok(())
}

/// One latency trial at each load point of the lossless rate.
fn latency_points(
    bench: &Bench,
    relay: &mut Relay,
    lossless: f64,
    settings: &Settings,
    env: &RelayEnv,
    scenario: &str,
    label: &str,
) -> anyhow::Result<Vec<LatencyPoint>> {
    let mut tracer = settings
        .latency_trace
        .then(|| latency_trace::Tracer::new(env.dir, env.cpus, scenario, label));
    let mut points = Vec::new();
    for &load in &settings.latency_loads {
        let around = tracer
            .as_mut()
            .map(|tracer| tracer as &mut dyn latency::Around);
        let point = latency::measure(
            bench,
            relay,
            load,
            lossless,
            settings.latency_trial_s,
            around,
        )?;
        eprintln!(
            "bench:   {label} latency at {} of its lossless rate {}: {}",
            point.label(),
            describe(&point.trial),
            point.one_way.as_ref().map_or_else(
                || "no samples measured".to_owned(),
                |p| format!(
                    "one-way p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs ({} samples)",
                    p.p50_us, p.p99_us, p.p999_us, p.max_us, p.count
                )
            )
        );
        points.push(point);
    }
    Ok(points)
}

/// One trial at each overload factor of the lossless rate.
fn overload_points(
    bench: &Bench,
    relay: &mut Relay,
    lossless: f64,
    settings: &Settings,
    label: &str,
) -> anyhow::Result<Vec<OverloadPoint>> {
    let mut points = Vec::new();
    for factor in overload::FACTORS {
        let rate = OverloadPoint::requested(factor, lossless, settings.search_max_pps);
        let trial = bench.run(Some(&mut *relay), rate, settings.trial_s, false)?;
        eprintln!(
            "bench:   {label} at {factor}× its lossless rate {}",
            describe(&trial)
        );
        points.push(OverloadPoint::new(factor, lossless, bench.copies, trial));
    }
    Ok(points)
}

fn describe(trial: &Trial) -> String {
    format!(
        "{} pps offered ({:.3} s, {}, generator {:.0} % busy), {} delivered/s, loss {:.3} %{}{}",
        report::rate(trial.offered_pps),
        trial.seconds,
        match trial.pacing {
            Pacing::Tbf => "paced by tbf",
            Pacing::Generator => "qdisc bypassed",
        },
        100.0 * trial.generator_busy_s / trial.seconds,
        report::rate(trial.delivered_pps),
        trial.loss_pct,
        if trial.generator_limited {
            " (generator-limited)"
        } else {
            ""
        },
        trial.cpu.as_ref().map_or_else(String::new, |cpu| format!(
            ", relay CPUs {:.3} s busy ({:.3} s stolen{}), relay processes {:.3} s",
            cpu.relay_cpus_busy_s,
            cpu.relay_cpus_steal_s,
            if cpu.consistent() {
                ""
            } else {
                "; busy time cannot stand"
            },
            cpu.relay_process_s
        ))
    )
}
