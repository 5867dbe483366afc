//! CPU time, read from `/proc`.
//!
//! The kernel here accounts user/system/softirq time by sampling at the timer tick, which is
//! badly biased on a mostly idle CPU that wakes for every packet (the tick tends to land in the
//! interrupt that woke it). Two figures avoid the bias:
//!
//! - **relay CPUs busy**: wall time minus idle, iowait and steal time of the CPUs reserved for
//!   relays. Idle time is measured exactly when the CPU enters and leaves idle (`NO_HZ`), so this
//!   counts everything the CPUs did — relay processes, their system calls, and the softirq work
//!   of receiving, routing and forwarding packets, which is the whole cost of the kernel's own
//!   forwarding since it has no process.
//! - **relay processes**: the scheduler's run time (`/proc/<pid>/task/*/schedstat`, in ns) of
//!   the relay processes and all their threads and children. Softirq work that happens to run
//!   while a relay process is current is included.
//!
//! Other processes on the machine are measured too (`utime + stime` of every user-space process
//! outside the benchmark), to flag a measurement that shared its CPUs.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;

/// The `flags` bit of kernel threads in `/proc/<pid>/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Ticks per second of `/proc/stat` and `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// One reading of `/proc/stat`.
#[derive(Clone, Debug)]
pub struct CpuStat {
    at: Instant,
    /// Per CPU: (idle + iowait + steal, busy by tick sampling, steal), in ticks.
    cpus: HashMap<usize, (u64, u64, u64)>,
}

impl CpuStat {
    pub fn read() -> anyhow::Result<Self> {
        let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let at = Instant::now();
        let mut cpus = HashMap::new();
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let Some(cpu) = fields
                .next()
                .and_then(|name| name.strip_prefix("cpu"))
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            let values: Vec<u64> = fields.filter_map(|value| value.parse().ok()).collect();
            // user nice system idle iowait irq softirq steal …
            let get = |i: usize| values.get(i).copied().unwrap_or(0);
            let not_busy = get(3) + get(4) + get(7);
            let busy = get(0) + get(1) + get(2) + get(5) + get(6);
            cpus.insert(cpu, (not_busy, busy, get(7)));
        }
        Ok(Self { at, cpus })
    }

    /// Seconds the CPUs in `set` were busy between `self` and `later`: wall time minus idle.
    pub fn busy_since(&self, later: &Self, set: &[usize]) -> f64 {
        let wall = later.at.duration_since(self.at).as_secs_f64();
        let not_busy = self.seconds_of(later, set, |counts| counts.0);
        (wall * set.len() as f64 - not_busy).max(0.0)
    }

    /// The same by tick sampling (user + nice + system + irq + softirq), for comparison.
    pub fn ticked_busy_since(&self, later: &Self, set: &[usize]) -> f64 {
        self.seconds_of(later, set, |counts| counts.1)
    }

    /// Seconds the hypervisor ran something else while the CPUs in `set` wanted to run.
    pub fn steal_since(&self, later: &Self, set: &[usize]) -> f64 {
        self.seconds_of(later, set, |counts| counts.2)
    }

    /// Seconds that one of a CPU's counts (`pick`) grew by between `self` and `later`, summed
    /// over the CPUs in `set`.
    fn seconds_of(&self, later: &Self, set: &[usize], pick: fn(&(u64, u64, u64)) -> u64) -> f64 {
        let ticks: u64 = set
            .iter()
            .map(|cpu| {
                let before = self.cpus.get(cpu).map_or(0, pick);
                let after = later.cpus.get(cpu).map_or(0, pick);
                after.saturating_sub(before)
            })
            .sum();
        ticks as f64 / USER_HZ
    }

    pub fn seconds_since(&self, later: &Self) -> f64 {
        later.at.duration_since(self.at).as_secs_f64()
    }
}

/// Scheduler run time of the processes `pids` and all their threads, in ns, keyed by
/// `pid/tid` so a later reading can be matched.
pub fn run_time(pids: &[u32]) -> HashMap<(u32, u32), u64> {
    let mut times = HashMap::new();
    for &pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
                continue;
            };
            if let Some(ns) = text.split_whitespace().next().and_then(|v| v.parse().ok()) {
                times.insert((pid, tid), ns);
            }
        }
    }
    times
}

/// Seconds of run time added between two readings (threads in both, or new in the later one).
pub fn run_time_since(before: &HashMap<(u32, u32), u64>, after: &HashMap<(u32, u32), u64>) -> f64 {
    let ns: u64 = after
        .iter()
        .map(|(key, &now)| now.saturating_sub(before.get(key).copied().unwrap_or(0)))
        .sum();
    ns as f64 / 1e9
}

/// CPU ticks (`utime + stime`) of every user-space process that is not `exclude` or a child of
/// one; kernel threads are left out.
pub fn others(exclude: &[u32]) -> HashMap<u32, u64> {
    let mut times = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return times;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if exclude.contains(&pid) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The command name is in parentheses and may contain spaces: fields follow the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] is the state (field 3), so field n is fields[n - 3].
        let field =
            |n: usize| -> u64 { fields.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0) };
        let parent = field(4);
        let flags = field(9);
        if pid == 2 || parent == 2 || flags & PF_KTHREAD != 0 {
            continue;
        }
        if exclude.iter().any(|&e| u64::from(e) == parent) {
            continue;
        }
        times.insert(pid, field(14) + field(15));
    }
    times
}

/// Seconds other processes ran between two readings (processes that started in between count
/// whole).
pub fn others_since(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> f64 {
    let ticks: u64 = after
        .iter()
        .map(|(pid, &now)| now.saturating_sub(before.get(pid).copied().unwrap_or(0)))
        .sum();
    ticks as f64 / USER_HZ
}

/// Milliseconds the run may still spend waiting for other processes to go quiet.
static QUIET_BUDGET_MS: AtomicU64 = AtomicU64::new(0);

pub fn set_quiet_budget(budget: Duration) {
    QUIET_BUDGET_MS.store(
        u64::try_from(budget.as_millis()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

/// Waits (within the run's budget, at most 10 s at a time) until processes outside the
/// benchmark use less than a tenth of a CPU, so they do not skew a trial. Returns their load.
pub fn wait_for_quiet(exclude: &[u32]) -> f64 {
    let started = Instant::now();
    let mut announced = false;
    loop {
        let before = others(exclude);
        let from = Instant::now();
        std::thread::sleep(Duration::from_millis(200));
        let load = others_since(&before, &others(exclude)) / from.elapsed().as_secs_f64();
        let waited = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let budget = QUIET_BUDGET_MS.load(Ordering::Relaxed);
        if load < 0.1 || waited >= budget.min(10_000) {
            QUIET_BUDGET_MS.store(budget.saturating_sub(waited), Ordering::Relaxed);
            if announced {
                eprintln!(
                    "bench:   {} after {:.1} s (other processes at {:.0} % of a CPU)",
                    if load < 0.1 { "quiet" } else { "going on" },
                    waited as f64 / 1000.0,
                    load * 100.0
                );
            }
            return load;
        }
        if !announced {
            eprintln!(
                "bench:   other processes use {:.0} % of a CPU; waiting for them",
                load * 100.0
            );
            announced = true;
        }
    }
}
