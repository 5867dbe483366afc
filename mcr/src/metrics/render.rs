//! A [`Snapshot`] as Prometheus metrics, encoded by `prometheus-client` in the `OpenMetrics`
//! or the Prometheus text format.
//!
//! Every value comes from the snapshot, which holds the same report `mcr stats` prints: there
//! is no second set of counters. Names follow Prometheus conventions: an `mcr_` prefix,
//! counters end in `_total`, sizes are bytes, and rates are left to `rate()`. Labels are few and
//! bounded by the rules file: `rule`, `input`, `output`, `worker`, `reason`, `state`, `path`.

use std::{sync::Arc, time::UNIX_EPOCH};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{TypedMetric, counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::{Registry, Unit},
};

use super::Snapshot;
use crate::{
    state::{ForwardingPath, RuleState},
    stats::{OutputStats, StatsReport, WorkerStats},
};

/// The exposition formats a scraper can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `OpenMetrics` 1.0 text, what Prometheus asks for first.
    OpenMetrics,
    /// The Prometheus text format 0.0.4, for scrapers that do not ask for `OpenMetrics`.
    Prometheus,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

/// Encodes `snapshot` in `format`.
pub fn render(snapshot: Arc<Snapshot>, format: Format) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut text = String::new();
    match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut text, &registry)?,
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
        }
    }
    Ok(text)
}

/// The label set of a metric that has none.
const NO_LABELS: [(&str, &str); 0] = [];
const RULE_STATES: [&str; 3] = ["active", "waiting", "failed"];
const PATHS: [ForwardingPath; 2] = [ForwardingPath::Kernel, ForwardingPath::Worker];
const WORKER_STATES: [&str; 6] = [
    "starting",
    "running",
    "stalled",
    "restarting",
    "failed",
    "stopped",
];

#[derive(Debug)]
struct SnapshotCollector(Arc<Snapshot>);

/// One metric family: its descriptor, then one sample per label set. A family without samples
/// (no rules yet) keeps its descriptor, so a dashboard sees what it will hold.
fn family<L: EncodeLabelSet, M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (L, M)>,
) -> std::fmt::Result {
    let mut metrics = encoder.encode_descriptor(name, help, unit, M::TYPE)?;
    for (labels, metric) in samples {
        metric.encode(metrics.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(value: u64) -> ConstCounter<u64> {
    ConstCounter::new(value)
}

fn gauge(value: i64) -> ConstGauge<i64> {
    ConstGauge::new(value)
}

fn flag(on: bool) -> ConstGauge<i64> {
    gauge(i64::from(on))
}

fn rule_state_name(state: &RuleState) -> &'static str {
    match state {
        RuleState::Active { .. } => "active",
        RuleState::Waiting { .. } => "waiting",
        RuleState::Failed { .. } => "failed",
    }
}

/// `out0:239.2.2.1:6000`, or `10.2.0.2:7000` for a unicast output routing places: the output
/// as `mcr stats` names it, without its TTL (a TTL change keeps the output and its counters).
fn output_label(output: &OutputStats) -> String {
    match &output.interface {
        Some(interface) => format!("{interface}:{}", output.destination),
        None => output.destination.clone(),
    }
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let snapshot = &self.0;
        encode_build_and_config(&mut encoder, snapshot)?;
        encode_rules(&mut encoder, &snapshot.stats)?;
        encode_outputs(&mut encoder, &snapshot.stats)?;
        encode_workers(&mut encoder, &snapshot.stats)?;
        encode_skips(&mut encoder, &snapshot.stats)
    }
}

/// The version, and how the last reload went.
fn encode_build_and_config(e: &mut DescriptorEncoder<'_>, snapshot: &Snapshot) -> std::fmt::Result {
    family(
        e,
        "mcr_build",
        "The version of the running mcr",
        None,
        [(
            NO_LABELS,
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        )],
    )?;
    family(
        e,
        "mcr_config_last_reload_successful",
        "1 if the rules file last read (at start or on a reload) was applied, 0 if it was \
         rejected and the rules before it still run",
        None,
        [(NO_LABELS, flag(snapshot.config.last_reload_successful))],
    )?;
    let applied = snapshot
        .config
        .last_success
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64());
    family(
        e,
        "mcr_config_last_reload_success_timestamp",
        "When the rules file was last applied, at start or on a reload (Unix time)",
        Some(&Unit::Seconds),
        [(NO_LABELS, ConstGauge::new(applied))],
    )?;
    Ok(())
}

/// Rules: state, path, what the classifier matched, and what it held back.
fn encode_rules(e: &mut DescriptorEncoder<'_>, stats: &StatsReport) -> std::fmt::Result {
    family(
        e,
        "mcr_rules",
        "Rules in the rules file by state",
        None,
        RULE_STATES.map(|state| {
            let count = stats
                .rules
                .iter()
                .filter(|rule| rule_state_name(&rule.state) == state)
                .count();
            (
                [("state", state)],
                gauge(i64::try_from(count).unwrap_or(i64::MAX)),
            )
        }),
    )?;
    family(
        e,
        "mcr_rule_state",
        "1 for the state a rule is in (active, waiting for an interface, or failed to start)",
        None,
        stats.rules.iter().flat_map(|rule| {
            let current = rule_state_name(&rule.state);
            RULE_STATES.map(|state| {
                (
                    [("rule", rule.name.as_str()), ("state", state)],
                    flag(state == current),
                )
            })
        }),
    )?;
    family(
        e,
        "mcr_rule_path",
        "1 for the path an active rule is forwarded on: kernel (the classifier writes its \
         outputs) or worker",
        None,
        stats.rules.iter().flat_map(|rule| {
            let current = rule.state.path();
            PATHS.map(|path| {
                (
                    [("rule", rule.name.clone()), ("path", path.to_string())],
                    flag(current == Some(path)),
                )
            })
        }),
    )?;
    family(
        e,
        "mcr_rule_received_packets",
        "Packets the classifier matched for the rule, on either path",
        None,
        stats.rules.iter().map(|rule| {
            (
                [("rule", rule.name.as_str()), ("input", rule.input.as_str())],
                counter(rule.rx_packets),
            )
        }),
    )?;
    family(
        e,
        "mcr_rule_received",
        "UDP payload bytes of the packets the classifier matched for the rule",
        Some(&Unit::Bytes),
        stats.rules.iter().map(|rule| {
            (
                [("rule", rule.name.as_str()), ("input", rule.input.as_str())],
                counter(rule.rx_bytes),
            )
        }),
    )?;
    family(
        e,
        "mcr_rule_dropped_packets",
        "Packets of the rule not relayed, by reason (below_min_ttl: arrived with a TTL \
         below the rule's min_ttl; shed: its worker was a full window behind)",
        None,
        stats.rules.iter().flat_map(|rule| {
            [("below_min_ttl", rule.below_min_ttl), ("shed", rule.shed)].map(|(reason, value)| {
                (
                    [("rule", rule.name.as_str()), ("reason", reason)],
                    counter(value),
                )
            })
        }),
    )?;
    family(
        e,
        "mcr_rule_to_worker_packets",
        "Packets of a kernel-path rule handed to its worker: longer than an output's MTU \
         allows",
        None,
        stats
            .rules
            .iter()
            .map(|rule| ([("rule", rule.name.as_str())], counter(rule.to_worker))),
    )?;
    Ok(())
}

/// Outputs: what was sent, whichever path sent it.
fn encode_outputs(e: &mut DescriptorEncoder<'_>, stats: &StatsReport) -> std::fmt::Result {
    let outputs = || {
        stats.rules.iter().flat_map(|rule| {
            rule.outputs
                .iter()
                .map(move |output| (rule.name.as_str(), output_label(output), output))
        })
    };
    family(
        e,
        "mcr_output_sent_packets",
        "Packets sent to the output, by the classifier and the rule's worker together",
        None,
        outputs().map(|(rule, label, output)| {
            (
                [("rule", rule), ("output", label.as_str())].map(owned),
                counter(output.tx_packets),
            )
        }),
    )?;
    family(
        e,
        "mcr_output_sent",
        "UDP payload bytes sent to the output",
        Some(&Unit::Bytes),
        outputs().map(|(rule, label, output)| {
            (
                [("rule", rule), ("output", label.as_str())].map(owned),
                counter(output.tx_bytes),
            )
        }),
    )?;
    family(
        e,
        "mcr_output_send_errors",
        "Sends to the output the kernel refused (for example to an interface that is down)",
        None,
        outputs().map(|(rule, label, output)| {
            (
                [("rule", rule), ("output", label.as_str())].map(owned),
                counter(output.tx_errors),
            )
        }),
    )?;
    family(
        e,
        "mcr_output_dropped_packets",
        "Packets not sent to the output, by reason (queue_full: the worker's send queue or \
         the socket buffer was full)",
        None,
        outputs().map(|(rule, label, output)| {
            (
                [
                    ("rule", rule),
                    ("output", label.as_str()),
                    ("reason", "queue_full"),
                ]
                .map(owned),
                counter(output.queue_full),
            )
        }),
    )?;
    Ok(())
}

/// A counter family with one sample per worker, labelled `worker`.
fn worker_counter(
    e: &mut DescriptorEncoder<'_>,
    stats: &StatsReport,
    name: &str,
    help: &str,
    value: impl Fn(&WorkerStats) -> u64,
) -> std::fmt::Result {
    family(
        e,
        name,
        help,
        None,
        stats.workers.iter().map(|worker| {
            (
                [("worker", worker.process.worker.to_string())],
                counter(value(worker)),
            )
        }),
    )
}

/// Workers: state, restarts, and what they lost before a rule was known.
fn encode_workers(e: &mut DescriptorEncoder<'_>, stats: &StatsReport) -> std::fmt::Result {
    family(
        e,
        "mcr_worker_state",
        "1 for the state a worker process is in",
        None,
        stats.workers.iter().flat_map(|worker| {
            let current = worker.process.state.name();
            WORKER_STATES.map(|state| {
                (
                    [
                        ("worker", worker.process.worker.to_string()),
                        ("state", state.to_owned()),
                    ],
                    flag(state == current),
                )
            })
        }),
    )?;
    worker_counter(
        e,
        stats,
        "mcr_worker_restarts",
        "Times the worker process was started again after it ended or was killed",
        |worker| u64::from(worker.process.restarts),
    )?;
    worker_counter(
        e,
        stats,
        "mcr_worker_received_packets",
        "Packets the worker received from its sockets",
        |worker| worker.received,
    )?;
    family(
        e,
        "mcr_worker_backlog_packets",
        "Packets steered to the worker that it has not taken yet; the classifier sheds its \
         packets once this reaches settings.shed_window",
        None,
        stats.workers.iter().map(|worker| {
            (
                [("worker", worker.process.worker.to_string())],
                gauge(i64::try_from(worker.backlog).unwrap_or(i64::MAX)),
            )
        }),
    )?;
    family(
        e,
        "mcr_worker_dropped_packets",
        "Packets the worker lost before a rule was known, by reason (shed: dropped in the \
         classifier while the worker was a full window behind; kernel_drops: its socket \
         overflowed; malformed; too_big: longer than a receive buffer; no_rule: the rule was \
         removed in flight)",
        None,
        stats.workers.iter().flat_map(|worker| {
            let index = worker.process.worker.to_string();
            [
                ("shed", worker.shed),
                ("kernel_drops", worker.kernel_drops),
                ("malformed", worker.malformed),
                ("too_big", worker.too_big),
                ("no_rule", worker.no_rule),
            ]
            .map(|(reason, value)| {
                (
                    [("worker", index.clone()), ("reason", reason.to_owned())],
                    counter(value),
                )
            })
        }),
    )?;
    worker_counter(
        e,
        stats,
        "mcr_worker_no_buffer",
        "Times the worker paused receiving because every receive buffer was in use",
        |worker| worker.no_buffer,
    )?;
    worker_counter(
        e,
        stats,
        "mcr_worker_sends",
        "Sends the kernel accepted from the worker, to any output: each one packet or a run of \
         packets the kernel splits",
        |worker| worker.sends,
    )?;
    worker_counter(
        e,
        stats,
        "mcr_worker_sent_packets",
        "Packets the worker's sends carried; divided by mcr_worker_sends, packets per send",
        |worker| worker.sent,
    )?;
    Ok(())
}

/// What the classifier passed on untouched, by reason.
fn encode_skips(e: &mut DescriptorEncoder<'_>, stats: &StatsReport) -> std::fmt::Result {
    family(
        e,
        "mcr_classifier_skipped_packets",
        "Multicast UDP on an interface with a rule that the classifier passed on untouched, \
         by reason",
        None,
        stats
            .skipped
            .reasons()
            .map(|(reason, value)| ([("reason", reason)], counter(value))),
    )?;
    Ok(())
}

fn owned<'a>((key, value): (&'a str, &str)) -> (&'a str, String) {
    (key, value.to_owned())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::{
        metrics::ConfigHealth,
        stats::{RuleDrops, RuleStats, Skipped},
        status::WorkerState,
        status::WorkerStatus,
    };

    fn snapshot() -> Arc<Snapshot> {
        let output = |interface: Option<&str>, destination: &str, packets| OutputStats {
            interface: interface.map(str::to_owned),
            destination: destination.into(),
            ttl: 16,
            dscp: None,
            tx_packets: packets,
            tx_bytes: packets * 100,
            tx_errors: 1,
            queue_full: 2,
            tx_pps: 5.0,
            tx_bps: 4000.0,
        };
        Arc::new(Snapshot {
            stats: StatsReport {
                rules: vec![
                    RuleStats {
                        name: "camera-1".into(),
                        input: "in0:239.1.1.1:5000".into(),
                        state: RuleState::Active {
                            path: ForwardingPath::Kernel,
                            reason: None,
                        },
                        rx_packets: 10,
                        rx_bytes: 1000,
                        rx_pps: 5.0,
                        rx_bps: 4000.0,
                        min_ttl: Some(2),
                        below_min_ttl: 3,
                        to_worker: 0,
                        shed: 5,
                        drops: RuleDrops::default(),
                        outputs: vec![
                            output(Some("out0"), "239.2.2.1:6000", 10),
                            output(None, "10.2.0.2:7000", 9),
                        ],
                    },
                    RuleStats {
                        name: "camera-2".into(),
                        input: "in\"0:239.1.1.2:5000".into(),
                        state: RuleState::Waiting {
                            reason: "interface in\"0 does not exist".into(),
                        },
                        rx_packets: 0,
                        rx_bytes: 0,
                        rx_pps: 0.0,
                        rx_bps: 0.0,
                        min_ttl: None,
                        below_min_ttl: 0,
                        to_worker: 0,
                        shed: 0,
                        drops: RuleDrops::default(),
                        outputs: vec![output(Some("out1"), "239.2.2.2:6000", 0)],
                    },
                ],
                workers: vec![WorkerStats {
                    process: WorkerStatus {
                        worker: 0,
                        pid: Some(42),
                        cpu: Some(1),
                        state: WorkerState::Running,
                        restarts: 2,
                        scheduling: crate::config::Scheduling::Normal,
                    },
                    received: 19,
                    backlog: 3,
                    shed: 5,
                    kernel_drops: 4,
                    malformed: 0,
                    too_big: 1,
                    no_rule: 0,
                    no_buffer: 6,
                    sends: 8,
                    sent: 19,
                }],
                skipped: Skipped {
                    fragments: 7,
                    ..Skipped::default()
                },
            },
            config: ConfigHealth {
                last_reload_successful: false,
                last_success: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            },
        })
    }

    /// The states a worker can be in, named as [`WorkerState::name`] names them.
    fn all_worker_states() -> [WorkerState; 6] {
        let reason = String::new;
        [
            WorkerState::Starting,
            WorkerState::Running,
            WorkerState::Stalled { reason: reason() },
            WorkerState::Restarting { reason: reason() },
            WorkerState::Failed { reason: reason() },
            WorkerState::Stopped,
        ]
    }

    fn has_line(text: &str, line: &str) {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }

    #[test]
    fn openmetrics_names_follow_prometheus_conventions() {
        let text = render(snapshot(), Format::OpenMetrics).expect("encodes");
        assert!(text.ends_with("# EOF\n"), "{text}");
        has_line(&text, "# TYPE mcr_build info");
        has_line(
            &text,
            &format!(
                "mcr_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
        );
        has_line(&text, "mcr_config_last_reload_successful 0");
        has_line(
            &text,
            "# UNIT mcr_config_last_reload_success_timestamp_seconds seconds",
        );
        has_line(
            &text,
            "mcr_config_last_reload_success_timestamp_seconds 1700000000.0",
        );
        has_line(&text, "mcr_rules{state=\"active\"} 1");
        has_line(&text, "mcr_rules{state=\"waiting\"} 1");
        has_line(
            &text,
            "mcr_rule_state{rule=\"camera-2\",state=\"waiting\"} 1",
        );
        has_line(
            &text,
            "mcr_rule_state{rule=\"camera-2\",state=\"active\"} 0",
        );
        has_line(&text, "mcr_rule_path{rule=\"camera-1\",path=\"kernel\"} 1");
        has_line(&text, "mcr_rule_path{rule=\"camera-2\",path=\"kernel\"} 0");
        has_line(
            &text,
            "mcr_rule_received_packets_total{rule=\"camera-1\",input=\"in0:239.1.1.1:5000\"} 10",
        );
        has_line(&text, "# TYPE mcr_rule_received_bytes counter");
        has_line(
            &text,
            "mcr_rule_received_bytes_total{rule=\"camera-1\",input=\"in0:239.1.1.1:5000\"} 1000",
        );
        // A quote in an interface name is escaped, not a broken line.
        has_line(
            &text,
            "mcr_rule_received_packets_total{rule=\"camera-2\",input=\"in\\\"0:239.1.1.2:5000\"} 0",
        );
        has_line(
            &text,
            "mcr_rule_dropped_packets_total{rule=\"camera-1\",reason=\"below_min_ttl\"} 3",
        );
        has_line(
            &text,
            "mcr_rule_dropped_packets_total{rule=\"camera-1\",reason=\"shed\"} 5",
        );
        has_line(
            &text,
            "mcr_output_sent_packets_total{rule=\"camera-1\",output=\"out0:239.2.2.1:6000\"} 10",
        );
        has_line(
            &text,
            "mcr_output_sent_bytes_total{rule=\"camera-1\",output=\"10.2.0.2:7000\"} 900",
        );
        has_line(
            &text,
            "mcr_output_send_errors_total{rule=\"camera-1\",output=\"10.2.0.2:7000\"} 1",
        );
        has_line(
            &text,
            "mcr_output_dropped_packets_total{rule=\"camera-1\",output=\"out0:239.2.2.1:6000\",reason=\"queue_full\"} 2",
        );
        has_line(&text, "mcr_worker_state{worker=\"0\",state=\"running\"} 1");
        has_line(&text, "mcr_worker_state{worker=\"0\",state=\"stalled\"} 0");
        has_line(&text, "mcr_worker_restarts_total{worker=\"0\"} 2");
        has_line(&text, "mcr_worker_received_packets_total{worker=\"0\"} 19");
        has_line(&text, "mcr_worker_backlog_packets{worker=\"0\"} 3");
        has_line(
            &text,
            "mcr_worker_dropped_packets_total{worker=\"0\",reason=\"shed\"} 5",
        );
        has_line(
            &text,
            "mcr_worker_dropped_packets_total{worker=\"0\",reason=\"kernel_drops\"} 4",
        );
        has_line(
            &text,
            "mcr_worker_dropped_packets_total{worker=\"0\",reason=\"too_big\"} 1",
        );
        has_line(&text, "mcr_worker_no_buffer_total{worker=\"0\"} 6");
        has_line(&text, "mcr_worker_sends_total{worker=\"0\"} 8");
        has_line(&text, "mcr_worker_sent_packets_total{worker=\"0\"} 19");
        has_line(
            &text,
            "mcr_classifier_skipped_packets_total{reason=\"fragments\"} 7",
        );
        has_line(
            &text,
            "mcr_classifier_skipped_packets_total{reason=\"bad_source\"} 0",
        );
        // No rates: `rate()` computes them from the counters.
        assert!(!text.contains("per_second"), "{text}");
    }

    #[test]
    fn the_prometheus_text_format_is_served_too() {
        let text = render(snapshot(), Format::Prometheus).expect("encodes");
        assert!(!text.contains("# EOF"), "{text}");
        has_line(&text, "# TYPE mcr_rule_received_packets_total counter");
        has_line(
            &text,
            "mcr_rule_received_packets_total{rule=\"camera-1\",input=\"in0:239.1.1.1:5000\"} 10",
        );
    }

    #[test]
    fn every_worker_state_has_a_series() {
        for state in all_worker_states() {
            assert!(
                WORKER_STATES.contains(&state.name()),
                "{} has no mcr_worker_state series",
                state.name()
            );
        }
    }
}
