//! Per-rule statistics: what the supervisor reports and `mcr stats` prints.

use std::{fmt::Write as _, time::Instant};

use mcr_common::{RuleCounters, SkipCounters};
use serde::{Deserialize, Serialize};

/// One rule as `mcr stats` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuleStats {
    pub name: String,
    /// `interface:group:port`, with ` from source` for source-specific rules.
    pub input: String,
    /// `active`, or why the rule is not classifying yet.
    pub state: String,
    /// Packets the classifier matched for this rule.
    pub rx_packets: u64,
    /// UDP payload bytes of those packets.
    pub rx_bytes: u64,
    /// Packets per second over the last sampling interval.
    pub rx_pps: f64,
    /// Payload bits per second over the last sampling interval.
    pub rx_bps: f64,
}

/// Everything `mcr stats` receives from a running instance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    pub rules: Vec<RuleStats>,
    /// Multicast UDP the classifier saw but could not classify, by reason.
    pub skipped: Skipped,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub malformed: u64,
    pub fragments: u64,
}

impl From<SkipCounters> for Skipped {
    fn from(counters: SkipCounters) -> Self {
        Self {
            malformed: counters.malformed,
            fragments: counters.fragments,
        }
    }
}

/// Turns successive counter readings into rates over the last interval.
#[derive(Clone, Debug, Default)]
pub struct RateMeter {
    last: Option<(Instant, RuleCounters)>,
    pps: f64,
    bps: f64,
}

impl RateMeter {
    /// Records a reading taken at `now`; the rates become the change since the last reading.
    pub fn sample(&mut self, now: Instant, counters: RuleCounters) {
        if let Some((then, before)) = self.last {
            let seconds = now.duration_since(then).as_secs_f64();
            if seconds > 0.0 {
                self.pps = counters.packets.saturating_sub(before.packets) as f64 / seconds;
                self.bps = counters.bytes.saturating_sub(before.bytes) as f64 * 8.0 / seconds;
            }
        }
        self.last = Some((now, counters));
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

/// The human-readable table of `mcr stats`.
pub fn render_table(report: &StatsReport) -> String {
    let headers = [
        "RULE", "INPUT", "STATE", "PACKETS", "BYTES", "PKT/S", "BIT/S",
    ];
    let rows: Vec<[String; 7]> = report
        .rules
        .iter()
        .map(|rule| {
            [
                rule.name.clone(),
                rule.input.clone(),
                rule.state.clone(),
                rule.rx_packets.to_string(),
                rule.rx_bytes.to_string(),
                si(rule.rx_pps),
                si(rule.rx_bps),
            ]
        })
        .collect();
    let mut widths = headers.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            // Text columns align left, figures right.
            if i < 3 {
                let _ = write!(out, "{cell:<width$}  ");
            } else {
                let _ = write!(out, "{cell:>width$}  ");
            }
        }
        let trimmed = out.trim_end().len();
        out.truncate(trimmed);
        out.push('\n');
    };
    line(&headers);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    let _ = writeln!(
        out,
        "not classified (multicast UDP that no rule can take): malformed {}, IP fragments {}",
        report.skipped.malformed, report.skipped.fragments
    );
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rates_are_the_change_over_the_interval() {
        let mut meter = RateMeter::default();
        let start = Instant::now();
        meter.sample(
            start,
            RuleCounters {
                packets: 100,
                bytes: 1000,
            },
        );
        assert!(
            meter.packets_per_second().abs() < f64::EPSILON,
            "no rate from one reading"
        );
        meter.sample(
            start + Duration::from_secs(2),
            RuleCounters {
                packets: 300,
                bytes: 3000,
            },
        );
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

    #[test]
    fn table_has_a_row_per_rule() {
        let report = StatsReport {
            rules: vec![RuleStats {
                name: "cam".into(),
                input: "eth0:239.1.1.1:5000".into(),
                state: "active".into(),
                rx_packets: 7,
                rx_bytes: 700,
                rx_pps: 0.0,
                rx_bps: 0.0,
            }],
            skipped: Skipped {
                malformed: 1,
                fragments: 2,
            },
        };
        let table = render_table(&report);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("RULE"));
        assert!(lines[1].starts_with("cam  "), "{table}");
        assert!(lines[1].contains("700"));
        assert!(lines[2].contains("malformed 1, IP fragments 2"));
    }
}
