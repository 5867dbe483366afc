//! Per-rule statistics: what the supervisor reports and `mcr stats` prints.

use std::{fmt::Write as _, time::Instant};

use mcr_common::SkipCounters;
use serde::{Deserialize, Serialize};

use crate::{config::Output, counters::OutputTotals, state::RuleState, status::WorkerStatus};

/// One rule as `mcr stats` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuleStats {
    pub name: String,
    /// `interface:group:port`, with ` from source` for source-specific rules.
    pub input: String,
    /// `active`, or why the rule is not classifying yet (`state`, and `reason`).
    #[serde(flatten)]
    pub state: RuleState,
    /// Packets the classifier matched for this rule.
    pub rx_packets: u64,
    /// UDP payload bytes of those packets.
    pub rx_bytes: u64,
    /// Packets per second over the last sampling interval.
    pub rx_pps: f64,
    /// Payload bits per second over the last sampling interval.
    pub rx_bps: f64,
    /// The rule's minimum input TTL, if it has one.
    #[serde(default)]
    pub min_ttl: Option<u8>,
    /// Packets of the rule that arrived with a TTL below `min_ttl`: not relayed, and not in
    /// `rx_packets`.
    #[serde(default)]
    pub below_min_ttl: u64,
    /// Packets of a kernel-path rule handed to its worker: longer than an output's MTU allows.
    #[serde(default)]
    pub to_worker: u64,
    /// Packets of a worker-path rule shed in the classifier: its worker was a full window
    /// behind (overload).
    #[serde(default)]
    pub shed: u64,
    /// Packets lost for this rule after classification, by reason.
    pub drops: RuleDrops,
    pub outputs: Vec<OutputStats>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleDrops {
    /// Not sent because the worker's send queue or the output socket's buffer was full.
    pub queue_full: u64,
    /// Sends the kernel refused.
    pub send_errors: u64,
}

/// What one output sent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputStats {
    pub interface: Option<String>,
    /// `address:port`.
    pub destination: String,
    pub ttl: u8,
    /// The DSCP the output sets; `None`: it carries the input's.
    #[serde(default)]
    pub dscp: Option<u8>,
    pub tx_packets: u64,
    /// UDP payload bytes.
    pub tx_bytes: u64,
    pub tx_errors: u64,
    pub queue_full: u64,
    pub tx_pps: f64,
    pub tx_bps: f64,
}

impl OutputStats {
    pub fn new(output: &Output, totals: OutputTotals) -> Self {
        Self {
            interface: output.interface.clone(),
            destination: std::net::SocketAddr::new(output.destination, output.port).to_string(),
            ttl: output.ttl,
            dscp: output.dscp,
            tx_packets: totals.packets,
            tx_bytes: totals.bytes,
            tx_errors: totals.errors,
            queue_full: totals.queue_full,
            tx_pps: 0.0,
            tx_bps: 0.0,
        }
    }
}

/// One worker process and the drops it counted before knowing the rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStats {
    /// Which worker, its process and its state: the same fields `mcr status` shows.
    #[serde(flatten)]
    pub process: WorkerStatus,
    /// Packets the worker received from its sockets.
    pub received: u64,
    /// Packets steered to the worker that it has not taken yet: how far behind it is now. The
    /// classifier sheds the worker's packets once this reaches the shedding window.
    #[serde(default)]
    pub backlog: u64,
    /// Packets for this worker the classifier dropped because it was a full window behind
    /// (overload, shed before it cost a socket enqueue).
    #[serde(default)]
    pub shed: u64,
    /// Packets the kernel dropped because the worker's socket was full (`PACKET_STATISTICS`).
    pub kernel_drops: u64,
    pub malformed: u64,
    pub too_big: u64,
    pub no_rule: u64,
    /// Times receiving paused because every buffer was in use.
    pub no_buffer: u64,
    /// Sends the kernel accepted (each one packet or a run of them) and the packets they
    /// carried, over all outputs: `sent / sends` packets per send.
    #[serde(default)]
    pub sends: u64,
    #[serde(default)]
    pub sent: u64,
}

impl WorkerStats {
    /// Packets per send, when the worker has sent anything.
    pub fn per_send(&self) -> Option<f64> {
        (self.sends > 0).then(|| self.sent as f64 / self.sends as f64)
    }
}

/// Everything `mcr stats` receives from a running instance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    pub rules: Vec<RuleStats>,
    pub workers: Vec<WorkerStats>,
    /// Multicast UDP the classifier saw but could not classify, by reason.
    pub skipped: Skipped,
}

/// The classifier's [`SkipCounters`], named as in the pinned map. Missing fields read as 0,
/// so a newer CLI can read the report of an older supervisor.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Skipped {
    pub malformed: u64,
    pub fragments: u64,
    pub vlan: u64,
    pub other_host: u64,
    pub bad_checksum: u64,
    pub ttl_zero: u64,
    pub bad_source: u64,
    pub extension_headers: u64,
}

impl From<SkipCounters> for Skipped {
    fn from(counters: SkipCounters) -> Self {
        let SkipCounters {
            malformed,
            fragments,
            vlan,
            other_host,
            bad_checksum,
            ttl_zero,
            bad_source,
            extension_headers,
        } = counters;
        Self {
            malformed,
            fragments,
            vlan,
            other_host,
            bad_checksum,
            ttl_zero,
            bad_source,
            extension_headers,
        }
    }
}

impl Skipped {
    /// Each reason with its count, in the order of the pinned map.
    pub fn reasons(&self) -> [(&'static str, u64); 8] {
        [
            ("malformed", self.malformed),
            ("fragments", self.fragments),
            ("vlan", self.vlan),
            ("other_host", self.other_host),
            ("bad_checksum", self.bad_checksum),
            ("ttl_zero", self.ttl_zero),
            ("bad_source", self.bad_source),
            ("extension_headers", self.extension_headers),
        ]
    }
}

/// Turns successive counter readings into rates over the last interval.
#[derive(Clone, Debug, Default)]
pub struct RateMeter {
    last: Option<(Instant, u64, u64)>,
    pps: f64,
    bps: f64,
}

impl RateMeter {
    /// Records a reading of `packets` and `bytes` taken at `now`; the rates become the change
    /// since the last reading.
    pub fn sample(&mut self, now: Instant, packets: u64, bytes: u64) {
        if let Some((then, before_packets, before_bytes)) = self.last {
            let seconds = now.duration_since(then).as_secs_f64();
            if seconds > 0.0 {
                self.pps = packets.saturating_sub(before_packets) as f64 / seconds;
                self.bps = bytes.saturating_sub(before_bytes) as f64 * 8.0 / seconds;
            }
        }
        self.last = Some((now, packets, bytes));
    }

    pub fn packets_per_second(&self) -> f64 {
        self.pps
    }

    pub fn bits_per_second(&self) -> f64 {
        self.bps
    }
}

/// Formats `value` with an SI prefix: `1.50 M`, `12.0 k`, `950`.
pub fn si(value: f64) -> String {
    const PREFIXES: [(f64, &str); 3] = [(1e9, "G"), (1e6, "M"), (1e3, "k")];
    for (scale, prefix) in PREFIXES {
        if value >= scale {
            return format!("{:.2} {prefix}", value / scale);
        }
    }
    format!("{value:.0}")
}

/// Columns aligned to their widest cell: text to the left, figures to the right.
struct Table {
    rows: Vec<Vec<String>>,
    /// Columns before this index hold text.
    text_columns: usize,
}

impl Table {
    fn new(headers: &[&str], text_columns: usize) -> Self {
        Self {
            rows: vec![headers.iter().map(|h| (*h).to_owned()).collect()],
            text_columns,
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self, out: &mut String) {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; columns];
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.len());
            }
        }
        for row in &self.rows {
            let mut line = String::new();
            for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
                if i < self.text_columns {
                    let _ = write!(line, "{cell:<width$}  ");
                } else {
                    let _ = write!(line, "{cell:>width$}  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
}

/// One table row of rates: label cells, then packets, bytes, packets/s, bits/s and the
/// optional error and drop counts.
fn rate_row(
    labels: [String; 4],
    packets: u64,
    bytes: u64,
    pps: f64,
    bps: f64,
    errors_and_drops: Option<(u64, u64)>,
) -> Vec<String> {
    let [name, flow, state, path] = labels;
    let (errors, drops) = errors_and_drops.map_or((String::new(), String::new()), |(e, d)| {
        (e.to_string(), d.to_string())
    });
    vec![
        name,
        flow,
        state,
        path,
        packets.to_string(),
        bytes.to_string(),
        si(pps),
        si(bps),
        errors,
        drops,
    ]
}

fn output_row(label: String, outputs: &[&OutputStats]) -> Vec<String> {
    let sum = |f: fn(&OutputStats) -> u64| outputs.iter().map(|o| f(o)).sum::<u64>();
    rate_row(
        [String::new(), label, String::new(), String::new()],
        sum(|o| o.tx_packets),
        sum(|o| o.tx_bytes),
        outputs.iter().map(|o| o.tx_pps).sum(),
        outputs.iter().map(|o| o.tx_bps).sum(),
        Some((sum(|o| o.tx_errors), sum(|o| o.queue_full))),
    )
}

/// A line per rule and per output, and totals when there are several rules.
fn rules_table(rules: &[RuleStats]) -> Table {
    let mut table = Table::new(
        &[
            "RULE", "FLOW", "STATE", "PATH", "PACKETS", "BYTES", "PKT/S", "BIT/S", "ERRORS",
            "DROPS",
        ],
        4,
    );
    for rule in rules {
        table.row(rate_row(
            [
                rule.name.clone(),
                format!("in  {}", rule.input),
                rule.state.to_string(),
                rule.state
                    .path()
                    .map_or_else(String::new, |path| path.to_string()),
            ],
            rule.rx_packets,
            rule.rx_bytes,
            rule.rx_pps,
            rule.rx_bps,
            None,
        ));
        if let Some(min_ttl) = rule.min_ttl {
            table.row(vec![
                String::new(),
                format!("in  ttl below {min_ttl}, not relayed"),
                String::new(),
                String::new(),
                rule.below_min_ttl.to_string(),
            ]);
        }
        if rule.shed > 0 {
            table.row(vec![
                String::new(),
                "in  shed, worker behind".into(),
                String::new(),
                String::new(),
                rule.shed.to_string(),
            ]);
        }
        if rule.to_worker > 0 {
            table.row(vec![
                String::new(),
                "in  over an output's MTU".into(),
                String::new(),
                "worker".into(),
                rule.to_worker.to_string(),
            ]);
        }
        for output in &rule.outputs {
            let mut to = match &output.interface {
                Some(interface) => {
                    format!("out {interface}:{} ttl {}", output.destination, output.ttl)
                }
                None => format!("out {} ttl {}", output.destination, output.ttl),
            };
            if let Some(dscp) = output.dscp {
                let _ = write!(to, " dscp {dscp}");
            }
            table.row(output_row(to, &[output]));
        }
    }
    if rules.len() > 1 {
        table.row(rate_row(
            [
                "total".into(),
                format!("in  {} rules", rules.len()),
                String::new(),
                String::new(),
            ],
            rules.iter().map(|r| r.rx_packets).sum(),
            rules.iter().map(|r| r.rx_bytes).sum(),
            rules.iter().map(|r| r.rx_pps).sum(),
            rules.iter().map(|r| r.rx_bps).sum(),
            None,
        ));
        let outputs: Vec<&OutputStats> = rules.iter().flat_map(|r| &r.outputs).collect();
        table.row(output_row("out all outputs".into(), &outputs));
    }
    table
}

fn workers_table(workers: &[WorkerStats]) -> Table {
    let mut table = Table::new(
        &[
            "WORKER",
            "PID",
            "CPU",
            "STATE",
            "RESTARTS",
            "RECEIVED",
            "BACKLOG",
            "SHED",
            "KERNEL-DROPS",
            "MALFORMED",
            "TOO-BIG",
            "NO-RULE",
            "NO-BUFFER",
            "SENDS",
            "PER-SEND",
        ],
        4,
    );
    for worker in workers {
        let optional = |value: Option<String>| value.unwrap_or_else(|| "-".into());
        let process = &worker.process;
        table.row(vec![
            process.worker.to_string(),
            optional(process.pid.map(|p| p.to_string())),
            optional(process.cpu.map(|c| c.to_string())),
            process.state.to_string(),
            process.restarts.to_string(),
            worker.received.to_string(),
            worker.backlog.to_string(),
            worker.shed.to_string(),
            worker.kernel_drops.to_string(),
            worker.malformed.to_string(),
            worker.too_big.to_string(),
            worker.no_rule.to_string(),
            worker.no_buffer.to_string(),
            worker.sends.to_string(),
            optional(worker.per_send().map(|ratio| format!("{ratio:.1}"))),
        ]);
    }
    table
}

/// The human-readable view of `mcr stats`: a line per rule and per output, then the workers.
pub fn render_table(report: &StatsReport) -> String {
    let mut out = String::new();
    rules_table(&report.rules).render(&mut out);
    for rule in &report.rules {
        if let RuleState::Active {
            path,
            reason: Some(reason),
        } = &rule.state
        {
            let _ = writeln!(out, "{} runs on the {path}: {reason}", rule.name);
        }
    }
    if !report.workers.is_empty() {
        out.push('\n');
        workers_table(&report.workers).render(&mut out);
        for worker in &report.workers {
            let process = &worker.process;
            if let Some(reason) = process.state.reason() {
                let _ = writeln!(out, "worker {} {}: {reason}", process.worker, process.state);
            }
        }
    }
    let reasons: Vec<String> = report
        .skipped
        .reasons()
        .iter()
        .map(|(reason, count)| format!("{reason} {count}"))
        .collect();
    let _ = writeln!(
        out,
        "\nnot relayed by the classifier (multicast UDP, passed on untouched):\n{}",
        reasons.join(", ")
    );
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::status::WorkerState;

    #[test]
    fn rates_are_the_change_over_the_interval() {
        let mut meter = RateMeter::default();
        let start = Instant::now();
        meter.sample(start, 100, 1000);
        assert!(
            meter.packets_per_second().abs() < f64::EPSILON,
            "no rate from one reading"
        );
        meter.sample(start + Duration::from_secs(2), 300, 3000);
        assert!((meter.packets_per_second() - 100.0).abs() < 1e-9);
        assert!((meter.bits_per_second() - 8000.0).abs() < 1e-9);
    }

    #[test]
    fn si_prefixes() {
        assert_eq!(si(950.0), "950");
        assert_eq!(si(12_000.0), "12.00 k");
        assert_eq!(si(1_500_000.0), "1.50 M");
        assert_eq!(si(2.5e9), "2.50 G");
    }

    /// One rule with one output, one worker, and a different count for every skip reason.
    fn sample_report() -> StatsReport {
        let output = Output {
            interface: Some("eth1".into()),
            destination: "239.2.2.2".parse().expect("address"),
            port: 6000,
            ttl: 4,
            dscp: None,
        };
        let totals = OutputTotals {
            packets: 6,
            bytes: 600,
            errors: 1,
            queue_full: 2,
        };
        StatsReport {
            rules: vec![RuleStats {
                name: "cam".into(),
                input: "eth0:239.1.1.1:5000".into(),
                state: RuleState::Active {
                    path: crate::state::ForwardingPath::Worker,
                    reason: None,
                },
                rx_packets: 7,
                rx_bytes: 700,
                rx_pps: 0.0,
                rx_bps: 0.0,
                min_ttl: None,
                below_min_ttl: 0,
                to_worker: 0,
                shed: 0,
                drops: RuleDrops::default(),
                outputs: vec![OutputStats::new(&output, totals)],
            }],
            workers: vec![WorkerStats {
                process: WorkerStatus {
                    worker: 0,
                    pid: Some(42),
                    cpu: Some(1),
                    state: WorkerState::Running,
                    restarts: 3,
                    scheduling: crate::config::Scheduling::Normal,
                },
                received: 7,
                backlog: 9,
                shed: 0,
                kernel_drops: 5,
                malformed: 0,
                too_big: 0,
                no_rule: 0,
                no_buffer: 0,
                sends: 4,
                sent: 7,
            }],
            skipped: Skipped {
                malformed: 1,
                fragments: 2,
                vlan: 3,
                other_host: 4,
                bad_checksum: 5,
                ttl_zero: 6,
                bad_source: 7,
                extension_headers: 8,
            },
        }
    }

    /// The table's lines, split into cells.
    fn cells(table: &str) -> Vec<Vec<&str>> {
        table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect()
    }

    #[test]
    fn table_shows_rules_outputs_and_workers() {
        let report = sample_report();
        let table = render_table(&report);
        let lines = cells(&table);
        assert_eq!(lines[0][0], "RULE");
        assert_eq!(
            lines[1],
            [
                "cam",
                "in",
                "eth0:239.1.1.1:5000",
                "active",
                "worker",
                "7",
                "700",
                "0",
                "0"
            ]
        );
        assert_eq!(
            lines[2],
            [
                "out",
                "eth1:239.2.2.2:6000",
                "ttl",
                "4",
                "6",
                "600",
                "0",
                "0",
                "1",
                "2"
            ]
        );
        assert_eq!(
            lines[5],
            [
                "0", "42", "1", "running", "3", "7", "9", "0", "5", "0", "0", "0", "0", "4", "1.8"
            ]
        );
        // A worker that has sent nothing has no packets per send.
        let mut idle = report.clone();
        idle.workers[0].sends = 0;
        idle.workers[0].sent = 0;
        assert_eq!(cells(&render_table(&idle))[5][13..], ["0", "-"]);

        // With two rules a total follows them.
        let mut two = report.clone();
        two.rules.push(two.rules[0].clone());
        let table = render_table(&two);
        let total = table
            .lines()
            .find(|l| l.starts_with("total"))
            .expect("a total row");
        let cells: Vec<&str> = total.split_whitespace().collect();
        assert_eq!(cells, ["total", "in", "2", "rules", "14", "1400", "0", "0"]);
        assert!(table.contains("out all outputs"));
    }

    #[test]
    fn a_rule_shows_its_path_and_why_it_runs_on_the_worker() {
        let mut report = sample_report();
        report.rules[0].state = RuleState::Active {
            path: crate::state::ForwardingPath::Kernel,
            reason: None,
        };
        report.rules[0].to_worker = 3;
        let table = render_table(&report);
        let lines = cells(&table);
        assert_eq!(lines[1][3..5], ["active", "kernel"]);
        assert_eq!(
            lines[2],
            ["in", "over", "an", "output's", "MTU", "worker", "3"]
        );

        report.rules[0].state = RuleState::Active {
            path: crate::state::ForwardingPath::Worker,
            reason: Some("next hop 10.2.0.9 not resolved on out0".into()),
        };
        let table = render_table(&report);
        assert!(
            table.contains("\ncam runs on the worker: next hop 10.2.0.9 not resolved on out0\n"),
            "{table}"
        );
    }

    #[test]
    fn footer_names_every_skip_reason_as_the_map_does() {
        let table = render_table(&sample_report());
        assert!(
            table.ends_with(
                "malformed 1, fragments 2, vlan 3, other_host 4, bad_checksum 5, ttl_zero 6, \
                 bad_source 7, extension_headers 8\n"
            ),
            "{table}"
        );
    }

    #[test]
    fn a_rule_with_min_ttl_shows_what_it_held_back() {
        let mut report = sample_report();
        report.rules[0].min_ttl = Some(2);
        report.rules[0].below_min_ttl = 9;
        let table = render_table(&report);
        let lines = cells(&table);
        assert_eq!(lines[1][0], "cam");
        assert_eq!(
            lines[2],
            ["in", "ttl", "below", "2,", "not", "relayed", "9"]
        );
        assert_eq!(lines[3][0], "out");
    }

    fn worker(state: WorkerState) -> WorkerStats {
        WorkerStats {
            process: WorkerStatus {
                worker: 1,
                pid: None,
                cpu: Some(0),
                state,
                restarts: 4,
                scheduling: crate::config::Scheduling::Normal,
            },
            received: 10,
            backlog: 0,
            shed: 0,
            kernel_drops: 0,
            malformed: 0,
            too_big: 0,
            no_rule: 0,
            no_buffer: 0,
            sends: 0,
            sent: 0,
        }
    }

    #[test]
    fn worker_json_keeps_its_field_names_and_adds_a_reason() {
        let running = serde_json::to_value(worker(WorkerState::Running)).expect("json");
        assert_eq!(running["state"], "running");
        assert_eq!(running["worker"], 1);
        assert_eq!(running["restarts"], 4);
        assert_eq!(running["received"], 10);
        assert!(running.get("reason").is_none(), "{running}");

        let failed = worker(WorkerState::Failed {
            reason: "starting a worker: No such file or directory".into(),
        });
        let json = serde_json::to_value(&failed).expect("json");
        assert_eq!(json["state"], "failed");
        assert_eq!(
            json["reason"],
            "starting a worker: No such file or directory"
        );
        let back: WorkerStats = serde_json::from_value(json).expect("parse back");
        assert_eq!(back, failed);
    }

    #[test]
    fn table_names_the_reason_of_a_worker_in_trouble() {
        let report = StatsReport {
            workers: vec![
                worker(WorkerState::Stalled {
                    reason: "no progress for 2 s while packets wait".into(),
                }),
                worker(WorkerState::Running),
            ],
            ..StatsReport::default()
        };
        let table = render_table(&report);
        let row = table
            .lines()
            .find(|line| line.starts_with("1 "))
            .expect("a worker row");
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            [
                "1", "-", "0", "stalled", "4", "10", "0", "0", "0", "0", "0", "0", "0", "0", "-"
            ]
        );
        let reasons: Vec<&str> = table
            .lines()
            .filter(|line| line.starts_with("worker "))
            .collect();
        assert_eq!(
            reasons,
            ["worker 1 stalled: no progress for 2 s while packets wait"]
        );
    }
}
