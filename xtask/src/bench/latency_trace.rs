//! `--latency-trace`: where the slowest samples' time went. During each latency trial `perf
//! record` traces every CPU (scheduler switches and wake-ups, softirqs, the inter-processor
//! interrupts that hand received packets to the relay CPUs, `io_uring` waits and task work) on
//! `CLOCK_MONOTONIC`, the clock the slowest samples' departure and arrival are given in. After
//! the trial the trace is cut at each of those windows and what ran on each CPU in it is added
//! up: which task, which softirq, or nothing (idle). A worker that was runnable but not
//! running, asleep while its packets waited, or busy the whole time shows up as such; so does a
//! relay CPU that sat idle because nobody told it a packet was waiting.
//!
//! The trace costs the relay CPUs a little time per event, so traced figures are a diagnosis,
//! not a measurement; the settings in the JSON say whether a run was traced.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use mcr_tests::wait_for;

use super::{
    latency::{Around, Slow},
    process::{Daemon, run},
    relay::Relay,
    topology::CpuPlan,
};

/// The tracepoints recorded: enough to say what ran and why a task woke, without one event
/// per packet.
const EVENTS: [&str; 11] = [
    "sched:sched_switch",
    "sched:sched_wakeup",
    // What a kernel worker thread was running: its time is shown with the work's function.
    "workqueue:workqueue_execute_start",
    "workqueue:workqueue_execute_end",
    "irq:softirq_entry",
    "irq:softirq_exit",
    // Receive packet steering queues a packet to another CPU's backlog and tells that CPU with
    // an IPI, sent from the queueing CPU's receive softirq.
    "ipi:ipi_send_cpu",
    "irq_vectors:call_function_single_entry",
    "io_uring:io_uring_cqring_wait",
    "io_uring:io_uring_task_work_run",
    "io_uring:io_uring_local_work_run",
];

/// Traces the latency trials of one relay in one scenario.
pub struct Tracer {
    dir: PathBuf,
    relay_cpus: Vec<usize>,
    scenario: String,
    relay: String,
    current: Option<Recording>,
}

struct Recording {
    perf: Daemon,
    data: PathBuf,
    point: String,
    relay_pids: Vec<u32>,
}

impl Tracer {
    pub fn new(dir: &Path, cpus: &CpuPlan, scenario: &str, relay: &str) -> Self {
        Self {
            dir: dir.to_owned(),
            relay_cpus: cpus.relays.clone(),
            scenario: scenario.to_owned(),
            relay: relay.to_owned(),
            current: None,
        }
    }
}

impl Around for Tracer {
    fn before(&mut self, relay: &Relay, point: &str) -> anyhow::Result<()> {
        let data = self
            .dir
            .join(format!("{}-latency-{point}.perf.data", self.relay));
        let _ = std::fs::remove_file(&data);
        let mut command = std::process::Command::new("perf");
        command
            .args(["record", "--quiet", "-k", "CLOCK_MONOTONIC", "-a"])
            .args(["-m", "4096", "-o"])
            .arg(&data);
        for event in EVENTS {
            command.args(["-e", event]);
        }
        let mut perf = Daemon::spawn(
            "perf record",
            command,
            &self
                .dir
                .join(format!("{}-latency-{point}.perf.log", self.relay)),
        )?;
        // perf writes the file's header once its events are open; give it a moment more to
        // have them enabled.
        if wait_for(Duration::from_secs(10), || data.exists().then_some(())).is_none() {
            perf.check_running()?;
            anyhow::bail!("perf record did not start: {}", perf.log_tail());
        }
        std::thread::sleep(Duration::from_millis(500));
        perf.check_running()?;
        self.current = Some(Recording {
            perf,
            data,
            point: point.to_owned(),
            relay_pids: relay.pids(),
        });
        Ok(())
    }

    fn after(&mut self, slowest: &[Slow]) -> anyhow::Result<Option<String>> {
        let Some(mut recording) = self.current.take() else {
            return Ok(None);
        };
        recording.perf.stop()?;
        let script = run(
            "perf",
            &[
                "script",
                "--ns",
                "-F",
                "comm,tid,cpu,time,event,trace",
                "-i",
                &recording.data.to_string_lossy(),
            ],
        )
        .context("reading the trace with perf script")?;
        let trace = Trace::parse(&script, &self.relay_cpus);
        let report = trace.report(
            &format!(
                "{}, {}, {} of its lossless rate",
                self.scenario, self.relay, recording.point
            ),
            &recording.data,
            slowest,
            &recording.relay_pids,
        );
        let path = self
            .dir
            .join(format!("{}-latency-{}.md", self.relay, recording.point));
        std::fs::write(&path, report).with_context(|| format!("writing {}", path.display()))?;
        Ok(Some(path.to_string_lossy().into_owned()))
    }
}

/// What a CPU was doing.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Activity {
    Idle,
    Task {
        comm: String,
        pid: u32,
    },
    Softirq(String),
    /// Before the first switch the trace shows on that CPU.
    Unknown,
}

#[derive(Clone, Debug)]
struct Interval {
    start_ns: u64,
    end_ns: u64,
    activity: Activity,
}

/// An event to count in a window: on which CPU, by or for which task (or CPU, for an IPI).
#[derive(Clone, Debug)]
struct Mark {
    at_ns: u64,
    cpu: usize,
    pid: u32,
    event: String,
}

/// A parsed trace: per CPU, what ran when, and the marks.
#[derive(Debug, Default)]
struct Trace {
    relay_cpus: Vec<usize>,
    intervals: BTreeMap<usize, Vec<Interval>>,
    marks: Vec<Mark>,
    /// Woken task pids, with when (from `sched_wakeup`'s `pid=`).
    wakeups: Vec<Mark>,
    /// IPIs sent, with the CPU they went to in `pid`'s place.
    ipis: Vec<Mark>,
    start_ns: u64,
    end_ns: u64,
}

/// One line of `perf script -F comm,tid,cpu,time,event,trace --ns`:
/// `mcr 1234 [001] 5678.123456789: sched:sched_switch: prev_comm=…`.
struct Line<'a> {
    tid: u32,
    cpu: usize,
    at_ns: u64,
    event: &'a str,
    fields: &'a str,
}

fn parse_line(line: &str) -> Option<Line<'_>> {
    let open = line.find(" [")?;
    let tid = line[..open].rsplit(' ').next()?.parse().ok()?;
    let rest = &line[open + 2..];
    let close = rest.find(']')?;
    let cpu = rest[..close].trim().parse().ok()?;
    let rest = rest[close + 1..].trim_start();
    let (time, rest) = rest.split_once(": ")?;
    let (seconds, nanos) = time.trim().split_once('.')?;
    let at_ns = seconds.parse::<u64>().ok()? * 1_000_000_000 + nanos.parse::<u64>().ok()?;
    let (event, fields) = rest
        .split_once(": ")
        .unwrap_or((rest.trim_end_matches(':'), ""));
    Some(Line {
        tid,
        cpu,
        at_ns,
        event: event.trim(),
        fields,
    })
}

/// The value of `key=` in a tracepoint's text (up to the next ` key=`-looking word).
fn field<'a>(fields: &'a str, key: &str) -> Option<&'a str> {
    let start = fields.find(&format!("{key}="))? + key.len() + 1;
    let rest = &fields[start..];
    // comm values may hold spaces; they end where the next `name=` starts.
    let end = rest
        .match_indices(' ')
        .find(|(at, _)| {
            rest[at + 1..]
                .split([' ', '='])
                .next()
                .is_some_and(|word| rest[at + 1 + word.len()..].starts_with('='))
        })
        .map_or(rest.len(), |(at, _)| at);
    Some(rest[..end].trim())
}

impl Trace {
    fn parse(script: &str, relay_cpus: &[usize]) -> Self {
        let mut trace = Self {
            relay_cpus: relay_cpus.to_vec(),
            ..Self::default()
        };
        // Per CPU: the open interval's start, the task, the softirqs it is inside.
        let mut state: BTreeMap<usize, (u64, Activity, Vec<String>)> = BTreeMap::new();
        for line in script.lines().filter_map(parse_line) {
            if trace.start_ns == 0 {
                trace.start_ns = line.at_ns;
            }
            trace.end_ns = trace.end_ns.max(line.at_ns);
            let entry =
                state
                    .entry(line.cpu)
                    .or_insert((line.at_ns, Activity::Unknown, Vec::new()));
            let (since, task, softirqs) = entry;
            let current = softirqs
                .last()
                .map_or_else(|| task.clone(), |name| Activity::Softirq(name.clone()));
            let intervals = trace.intervals.entry(line.cpu).or_default();
            if line.at_ns > *since {
                intervals.push(Interval {
                    start_ns: *since,
                    end_ns: line.at_ns,
                    activity: current,
                });
            }
            *since = line.at_ns;
            match line.event {
                "sched:sched_switch" => {
                    let pid = field(line.fields, "next_pid")
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(0);
                    *task = if pid == 0 {
                        Activity::Idle
                    } else {
                        Activity::Task {
                            comm: field(line.fields, "next_comm").unwrap_or("?").to_owned(),
                            pid,
                        }
                    };
                }
                "irq:softirq_entry" => softirqs.push(
                    line.fields
                        .split("action=")
                        .nth(1)
                        .map_or("?", |a| a.trim_end_matches(']'))
                        .to_owned(),
                ),
                "irq:softirq_exit" => {
                    softirqs.pop();
                }
                "workqueue:workqueue_execute_start" => {
                    if let Activity::Task { comm, pid } = task
                        && *pid == line.tid
                    {
                        let function = line.fields.rsplit("function ").next().unwrap_or("?");
                        *comm = format!("{} [{}]", base_comm(comm), function.trim());
                    }
                }
                "workqueue:workqueue_execute_end" => {
                    if let Activity::Task { comm, .. } = task {
                        *comm = base_comm(comm).to_owned();
                    }
                }
                "sched:sched_wakeup" => trace.wakeups.push(Mark {
                    at_ns: line.at_ns,
                    cpu: line.cpu,
                    pid: field(line.fields, "pid")
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(0),
                    event: line.event.to_owned(),
                }),
                "ipi:ipi_send_cpu" => trace.ipis.push(Mark {
                    at_ns: line.at_ns,
                    cpu: line.cpu,
                    pid: field(line.fields, "cpu")
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(u32::MAX),
                    event: line.event.to_owned(),
                }),
                _ => trace.marks.push(Mark {
                    at_ns: line.at_ns,
                    cpu: line.cpu,
                    pid: line.tid,
                    event: line.event.to_owned(),
                }),
            }
        }
        trace
    }

    /// Time per CPU and activity inside `[from, to)`.
    fn window(&self, from: u64, to: u64) -> BTreeMap<(usize, Activity), u64> {
        let mut spent = BTreeMap::new();
        for (&cpu, intervals) in &self.intervals {
            let first = intervals.partition_point(|i| i.end_ns <= from);
            for interval in intervals[first..].iter().take_while(|i| i.start_ns < to) {
                let overlap = interval
                    .end_ns
                    .min(to)
                    .saturating_sub(interval.start_ns.max(from));
                if overlap > 0 {
                    *spent.entry((cpu, interval.activity.clone())).or_insert(0) += overlap;
                }
            }
        }
        spent
    }

    fn report(&self, title: &str, data: &Path, slowest: &[Slow], relay_pids: &[u32]) -> String {
        let mut md = format!("# Latency trace: {title}\n\n");
        let _ = writeln!(
            md,
            "Trace `{}` (perf record -k CLOCK_MONOTONIC on every CPU; events: {}). Relay CPUs: \
             {}; the others run the generator and the sink. Relay processes: {}. Times are \
             CLOCK_MONOTONIC seconds, as in the JSON's `slowest`.\n",
            data.display(),
            EVENTS.join(", "),
            self.relay_cpus
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            relay_pids
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        if self.intervals.is_empty() {
            md.push_str("The trace holds no events.\n");
            return md;
        }
        let _ = writeln!(md, "## The whole trace\n");
        self.table(&mut md, self.start_ns, self.end_ns, relay_pids);
        let _ = writeln!(md, "## The slowest deliveries\n");
        for (rank, slow) in slowest.iter().enumerate() {
            let from = seconds_to_ns(slow.left_s);
            let to = seconds_to_ns(slow.arrived_s);
            let _ = writeln!(
                md,
                "### {}. {:.1} µs (sequence {}), left {:.9} s, arrived {:.9} s\n",
                rank + 1,
                slow.delay_us,
                slow.sequence,
                slow.left_s,
                slow.arrived_s
            );
            if from < self.start_ns || to > self.end_ns {
                let _ = writeln!(md, "Outside the trace.\n");
                continue;
            }
            self.table(&mut md, from, to, relay_pids);
        }
        md
    }

    /// What ran on each relay CPU in `[from, to)`, and the relay's wake-ups and `io_uring`
    /// events.
    fn table(&self, md: &mut String, from: u64, to: u64, relay_pids: &[u32]) {
        let length = to.saturating_sub(from).max(1);
        let mut rows: Vec<((usize, Activity), u64)> = self.window(from, to).into_iter().collect();
        rows.sort_by(|a, b| a.0.0.cmp(&b.0.0).then(b.1.cmp(&a.1)));
        let _ = writeln!(md, "| CPU | what ran | µs | share |\n|---|---|---|---|");
        for ((cpu, activity), ns) in rows {
            let role = if self.relay_cpus.contains(&cpu) {
                "relay"
            } else {
                "generator"
            };
            let what = match activity {
                Activity::Idle => "idle".to_owned(),
                Activity::Unknown => "(before the trace's first switch)".to_owned(),
                Activity::Softirq(name) => format!("softirq {name}"),
                Activity::Task { comm, pid } => format!(
                    "{comm}/{pid}{}",
                    if relay_pids.contains(&pid) {
                        " (relay)"
                    } else {
                        ""
                    }
                ),
            };
            let _ = writeln!(
                md,
                "| {cpu} ({role}) | {what} | {:.1} | {:.0} % |",
                ns as f64 / 1e3,
                100.0 * ns as f64 / length as f64
            );
        }
        let inside = |mark: &&Mark| mark.at_ns >= from && mark.at_ns < to;
        let relay_wakeups = self
            .wakeups
            .iter()
            .filter(inside)
            .filter(|mark| relay_pids.contains(&mark.pid))
            .count();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for mark in self
            .marks
            .iter()
            .filter(inside)
            .filter(|mark| relay_pids.contains(&mark.pid))
        {
            *counts.entry(mark.event.as_str()).or_insert(0) += 1;
        }
        let events: Vec<String> = counts
            .iter()
            .map(|(event, n)| format!("{event} {n}"))
            .collect();
        let ipis = self
            .ipis
            .iter()
            .filter(inside)
            .filter(|mark| {
                usize::try_from(mark.pid).is_ok_and(|cpu| self.relay_cpus.contains(&cpu))
            })
            .count();
        let calls = self
            .marks
            .iter()
            .filter(inside)
            .filter(|mark| {
                mark.event == "irq_vectors:call_function_single_entry"
                    && self.relay_cpus.contains(&mark.cpu)
            })
            .count();
        let _ = writeln!(
            md,
            "\nRelay processes woken {relay_wakeups} times; their io_uring events: {}. IPIs sent \
             to the relay CPUs: {ipis}; function-call interrupts taken there: {calls}.\n",
            if events.is_empty() {
                "none".to_owned()
            } else {
                events.join(", ")
            }
        );
    }
}

/// A task's name without the work function a kernel worker was shown with.
fn base_comm(comm: &str) -> &str {
    comm.split_once(" [").map_or(comm, |(base, _)| base)
}

fn seconds_to_ns(seconds: f64) -> u64 {
    // In range: a monotonic time in seconds since boot, positive and far below 2^53 ns.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let ns = (seconds * 1e9).round().max(0.0) as u64;
    ns
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "\
mcr 500 [001] 100.000000000: sched:sched_switch: prev_comm=swapper/1 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=mcr worker next_pid=500 next_prio=120
mcr 500 [001] 100.000100000: io_uring:io_uring_cqring_wait: ring 0xffff, min_events 1
mcr 500 [001] 100.000100000: sched:sched_switch: prev_comm=mcr prev_pid=500 prev_prio=120 prev_state=S ==> next_comm=ksoftirqd/1 next_pid=22 next_prio=120
gen 7 [000] 100.000150000: ipi:ipi_send_cpu: cpu=1 callsite=__smp_call_single_queue+0x9 callback=rps_trigger_softirq+0x0
ksoftirqd/1 22 [001] 100.000190000: irq_vectors:call_function_single_entry: vector=251
ksoftirqd/1 22 [001] 100.000200000: irq:softirq_entry: vec=3 [action=NET_RX]
ksoftirqd/1 22 [001] 100.001200000: sched:sched_wakeup: comm=mcr pid=500 prio=120 target_cpu=001
ksoftirqd/1 22 [001] 100.001200000: irq:softirq_exit: vec=3 [action=NET_RX]
ksoftirqd/1 22 [001] 100.001300000: sched:sched_switch: prev_comm=ksoftirqd/1 prev_pid=22 prev_prio=120 prev_state=S ==> next_comm=swapper/1 next_pid=0 next_prio=120
swapper 0 [000] 100.001300000: sched:sched_switch: prev_comm=swapper/0 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=x next_pid=9 next_prio=120
swapper 0 [001] 100.002000000: sched:sched_switch: prev_comm=swapper/1 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=kworker/1:0 next_pid=30 next_prio=120
kworker/1:0 30 [001] 100.002100000: workqueue:workqueue_execute_start: work struct 0xffff8881: function cleanup_net
kworker/1:0 30 [001] 100.012100000: workqueue:workqueue_execute_end: work struct 0xffff8881: function cleanup_net
kworker/1:0 30 [001] 100.012200000: sched:sched_switch: prev_comm=kworker/1:0 prev_pid=30 prev_prio=120 prev_state=I ==> next_comm=mcr next_pid=500 next_prio=120
";

    #[test]
    fn reads_perf_script_lines() {
        let line = parse_line(
            "ksoftirqd/1 22 [001] 100.000200000: irq:softirq_entry: vec=3 [action=NET_RX]",
        )
        .expect("a line");
        assert_eq!((line.tid, line.cpu, line.at_ns), (22, 1, 100_000_200_000));
        assert_eq!(line.event, "irq:softirq_entry");
        assert_eq!(
            field("prev_comm=mcr worker prev_pid=500", "prev_comm"),
            Some("mcr worker")
        );
        assert_eq!(field("comm=mcr pid=500 prio=120", "pid"), Some("500"));
    }

    #[test]
    fn a_window_adds_up_what_ran_on_each_cpu() {
        let trace = Trace::parse(SCRIPT, &[1]);
        let spent = trace.window(100_000_000_000, 100_002_000_000);
        let worker = Activity::Task {
            comm: "mcr worker".to_owned(),
            pid: 500,
        };
        assert_eq!(spent.get(&(1, worker)), Some(&100_000));
        let softirqd = Activity::Task {
            comm: "ksoftirqd/1".to_owned(),
            pid: 22,
        };
        assert_eq!(spent.get(&(1, softirqd)), Some(&200_000));
        assert_eq!(
            spent.get(&(1, Activity::Softirq("NET_RX".to_owned()))),
            Some(&1_000_000)
        );
        assert_eq!(spent.get(&(1, Activity::Idle)), Some(&700_000));
        // A kernel worker's time is shown with the work it ran.
        let later = trace.window(100_002_000_000, 100_012_200_000);
        let worker = |comm: &str| Activity::Task {
            comm: comm.to_owned(),
            pid: 30,
        };
        assert_eq!(later.get(&(1, worker("kworker/1:0"))), Some(&200_000));
        assert_eq!(
            later.get(&(1, worker("kworker/1:0 [cleanup_net]"))),
            Some(&10_000_000)
        );
        // CPU 0 ran something the trace never switched to.
        assert_eq!(spent.get(&(0, Activity::Unknown)), Some(&1_150_000));
        let report = trace.report(
            "test",
            Path::new("x.perf.data"),
            &[Slow {
                sequence: 7,
                delay_us: 1500.0,
                left_s: 100.0001,
                arrived_s: 100.0016,
            }],
            &[500],
        );
        assert!(
            report.contains("softirq NET_RX | 1000.0 | 67 %"),
            "{report}"
        );
        assert!(
            report.contains(
                "woken 1 times; their io_uring events: io_uring:io_uring_cqring_wait 1. IPIs \
                 sent to the relay CPUs: 1; function-call interrupts taken there: 1."
            ),
            "{report}"
        );
    }
}
