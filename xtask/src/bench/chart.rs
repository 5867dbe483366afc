//! The charts, written as plain SVG. Delivered against offered rate: one panel per scenario,
//! one line per relay, on log–log axes; the overload points (1.5×, 2×, 4× a relay's lossless
//! rate) are squares, so a plateau or a cliff past the lossless rate stands out. Latency:
//! percentile bars per relay and load point.

use std::fmt::Write as _;

use super::report::{RelayResult, Report, ScenarioResult};

const PANEL_W: f64 = 420.0;
const PANEL_H: f64 = 300.0;
const LEFT: f64 = 62.0;
const RIGHT: f64 = 14.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 44.0;
const HEADER: f64 = 72.0;

fn color(relay: &str) -> &'static str {
    match relay {
        "mcr" => "#d62728",
        "mcr-kernel" => "#9467bd",
        "kernel" => "#1f77b4",
        "socat" => "#2ca02c",
        _ => "#ff7f0e",
    }
}

/// A log-scale axis from `lo` to `hi` onto `[start, end]` pixels.
struct Axis {
    lo: f64,
    hi: f64,
    start: f64,
    end: f64,
}

impl Axis {
    fn at(&self, value: f64) -> f64 {
        let value = value.clamp(self.lo, self.hi);
        let t = (value.ln() - self.lo.ln()) / (self.hi.ln() - self.lo.ln());
        self.start + t * (self.end - self.start)
    }

    /// 1, 2 and 5 times powers of ten inside the range.
    fn ticks(&self) -> Vec<f64> {
        let mut ticks = Vec::new();
        let mut decade = 10f64.powf(self.lo.log10().floor());
        while decade <= self.hi {
            for m in [1.0, 2.0, 5.0] {
                let tick = decade * m;
                if tick >= self.lo && tick <= self.hi {
                    ticks.push(tick);
                }
            }
            decade *= 10.0;
        }
        ticks
    }
}

fn label(value: f64) -> String {
    if value >= 1e6 {
        format!("{}M", value / 1e6)
    } else if value >= 1e3 {
        format!("{}k", value / 1e3)
    } else {
        format!("{value}")
    }
}

/// The SVG element on a white background, with `title` and the run's mode and date.
fn svg_open(width: f64, height: f64, title: &str, report: &Report) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="10" y="20" font-size="14" font-weight="bold">{title} ({} run, {})</text>"#,
        report.meta.settings.mode,
        escape(&report.meta.date)
    );
    svg
}

/// The SVG element, title and legend.
fn header(report: &Report, panels: &[&ScenarioResult], width: f64, height: f64) -> String {
    let mut svg = svg_open(
        width,
        height,
        "Delivered vs offered packets/s per relay",
        report,
    );
    let mut relays: Vec<String> = Vec::new();
    for scenario in panels {
        for relay in &scenario.relays {
            if !relays.contains(&relay.relay) {
                relays.push(relay.relay.clone());
            }
        }
    }
    let mut x = 10.0;
    for relay in &relays {
        let _ = writeln!(
            svg,
            r#"<line x1="{x}" y1="40" x2="{}" y2="40" stroke="{}" stroke-width="2.5"/><text x="{}" y="44">{}</text>"#,
            x + 22.0,
            color(relay),
            x + 27.0,
            escape(relay)
        );
        x += 40.0 + 7.0 * relay.len() as f64;
    }
    let _ = writeln!(
        svg,
        r##"<line x1="10" y1="58" x2="32" y2="58" stroke="#888" stroke-dasharray="4 3"/><text x="37" y="62">lossless (offered × outputs); squares: offered 1.5×, 2×, 4× the lossless rate; hollow: nothing delivered</text>"##
    );
    svg
}

pub fn render(report: &Report) -> String {
    let panels: Vec<&ScenarioResult> = report
        .scenarios
        .iter()
        .filter(|s| s.relays.iter().any(|r| !r.curve().is_empty()))
        .collect();
    let columns = panels.len().clamp(1, 3);
    let rows = panels.len().div_ceil(columns).max(1);
    let width = PANEL_W * columns as f64;
    let height = HEADER + PANEL_H * rows as f64;
    let mut svg = header(report, &panels, width, height);

    for (index, scenario) in panels.iter().enumerate() {
        let ox = PANEL_W * (index % columns) as f64;
        let oy = HEADER + PANEL_H * (index / columns) as f64;
        panel(&mut svg, scenario, ox, oy);
    }
    svg.push_str("</svg>\n");
    svg
}

/// One scenario's panel with its top-left corner at (`ox`, `oy`).
fn panel(svg: &mut String, scenario: &ScenarioResult, ox: f64, oy: f64) {
    let copies = scenario.scenario.fanout as f64;
    let points: Vec<(f64, f64)> = scenario
        .relays
        .iter()
        .flat_map(|r| r.curve())
        .map(|t| (t.offered_pps, t.delivered_pps))
        .collect();
    let xs = points.iter().map(|p| p.0).filter(|v| *v > 0.0);
    let x_lo = xs.clone().fold(f64::INFINITY, f64::min) / 1.4;
    let x_hi = xs.fold(0.0, f64::max) * 1.4;
    let ys = points
        .iter()
        .map(|p| p.1)
        .chain(points.iter().map(|p| p.0 * copies))
        .filter(|v| *v > 0.0);
    let y_lo = ys.clone().fold(f64::INFINITY, f64::min) / 1.4;
    let y_hi = ys.fold(0.0, f64::max) * 1.4;
    if !(x_lo.is_finite() && y_lo.is_finite() && x_hi > x_lo && y_hi > y_lo) {
        return;
    }
    let ax = Axis {
        lo: x_lo,
        hi: x_hi,
        start: ox + LEFT,
        end: ox + PANEL_W - RIGHT,
    };
    let ay = Axis {
        lo: y_lo,
        hi: y_hi,
        start: oy + PANEL_H - BOTTOM,
        end: oy + TOP,
    };
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" font-weight="bold">{}</text>"#,
        ox + LEFT,
        oy + 18.0,
        escape(&format!(
            "{} — {}",
            scenario.scenario.name, scenario.scenario.title
        ))
    );
    frame(svg, &ax, &ay, ox, oy);
    let _ = writeln!(
        svg,
        r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#888" stroke-dasharray="4 3"/>"##,
        ax.at(x_lo),
        ay.at(x_lo * copies),
        ax.at(x_hi),
        ay.at(x_hi * copies)
    );
    for relay in &scenario.relays {
        curve(svg, relay, &ax, &ay);
    }
}

/// The plot area's border, grid, tick labels and axis titles.
fn frame(svg: &mut String, ax: &Axis, ay: &Axis, ox: f64, oy: f64) {
    let _ = writeln!(
        svg,
        r##"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        ax.start,
        ay.end,
        ax.end - ax.start,
        ay.start - ay.end
    );
    for tick in ax.ticks() {
        let px = ax.at(tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{px:.1}" y1="{}" x2="{px:.1}" y2="{}" stroke="#e4e4e4"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
            ay.end,
            ay.start,
            ay.start + 14.0,
            label(tick)
        );
    }
    for tick in ay.ticks() {
        let py = ay.at(tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            ax.start,
            ax.end,
            ax.start - 4.0,
            py + 4.0,
            label(tick)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">offered, packets/s</text>"#,
        f64::midpoint(ax.start, ax.end),
        oy + PANEL_H - 12.0
    );
    let middle = f64::midpoint(ay.start, ay.end);
    let _ = writeln!(
        svg,
        r#"<text x="{x}" y="{middle}" text-anchor="middle" transform="rotate(-90 {x} {middle})">delivered, packets/s</text>"#,
        x = ox + 14.0,
    );
}

/// One relay's trials as a line with a marker per trial (hollow when nothing arrived).
fn curve(svg: &mut String, relay: &RelayResult, ax: &Axis, ay: &Axis) {
    let curve = relay.curve();
    if curve.is_empty() {
        return;
    }
    let stroke = color(&relay.relay);
    let path: Vec<String> = curve
        .iter()
        .map(|t| format!("{:.1},{:.1}", ax.at(t.offered_pps), ay.at(t.delivered_pps)))
        .collect();
    let _ = writeln!(
        svg,
        r#"<polyline points="{}" fill="none" stroke="{stroke}" stroke-width="2" opacity="0.85"/>"#,
        path.join(" ")
    );
    for trial in curve {
        let fill = if trial.delivered == 0 {
            "white"
        } else {
            stroke
        };
        let (x, y) = (ax.at(trial.offered_pps), ay.at(trial.delivered_pps));
        let title = format!(
            "{}: {:.0} offered, {:.0} delivered/s, loss {:.3} %",
            escape(&relay.relay),
            trial.offered_pps,
            trial.delivered_pps,
            trial.loss_pct
        );
        let overload = relay
            .overload
            .iter()
            .find(|point| std::ptr::eq(&raw const point.trial, trial));
        if let Some(point) = overload {
            let _ = writeln!(
                svg,
                r#"<rect x="{:.1}" y="{:.1}" width="7" height="7" fill="{fill}" stroke="{stroke}"><title>{title} ({} the lossless rate)</title></rect>"#,
                x - 3.5,
                y - 3.5,
                point.label()
            );
        } else {
            let _ = writeln!(
                svg,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{fill}" stroke="{stroke}"><title>{title}</title></circle>"#
            );
        }
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The latency chart: one panel per scenario; in each, a group per load point (10 %, 50 %,
/// 90 % of each relay's lossless rate) with a column per relay on a log scale of µs: a box
/// from p50 to p99, a bar at p99.9 and a dot at the longest delay. `None` when no latency was
/// measured.
pub fn render_latency(report: &Report) -> Option<String> {
    let panels: Vec<&ScenarioResult> = report
        .scenarios
        .iter()
        .filter(|s| {
            s.relays
                .iter()
                .any(|r| r.latency.iter().any(|p| p.one_way.is_some()))
        })
        .collect();
    if panels.is_empty() {
        return None;
    }
    let columns = panels.len().clamp(1, 3);
    let rows = panels.len().div_ceil(columns);
    // Room for the title and the key, however few panels.
    let width = (PANEL_W * columns as f64).max(720.0);
    let height = HEADER + PANEL_H * rows as f64;
    let mut svg = svg_open(
        width,
        height,
        "One-way latency per relay at 10 %, 50 %, 90 % of its lossless rate",
        report,
    );
    let relays = relay_names(&panels);
    let mut x = 10.0;
    for relay in &relays {
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="34" width="10" height="10" fill="{}"/><text x="{}" y="43">{}</text>"#,
            color(relay),
            x + 14.0,
            escape(relay)
        );
        x += 30.0 + 7.0 * relay.len() as f64;
    }
    let _ = writeln!(
        svg,
        r#"<text x="10" y="62">box: p50 to p99; bar: p99.9; dot: longest delay (generator interface → sink interface)</text>"#
    );
    for (index, scenario) in panels.iter().enumerate() {
        let ox = PANEL_W * (index % columns) as f64;
        let oy = HEADER + PANEL_H * (index / columns) as f64;
        latency_panel(&mut svg, scenario, &relays, ox, oy);
    }
    svg.push_str("</svg>\n");
    Some(svg)
}

/// `5 µs`, `200 µs`, `2 ms`.
fn delay_label(us: f64) -> String {
    if us >= 1000.0 {
        format!("{} ms", us / 1000.0)
    } else {
        format!("{us} µs")
    }
}

fn relay_names(panels: &[&ScenarioResult]) -> Vec<String> {
    let mut relays: Vec<String> = Vec::new();
    for scenario in panels {
        for relay in &scenario.relays {
            if !relay.latency.is_empty() && !relays.contains(&relay.relay) {
                relays.push(relay.relay.clone());
            }
        }
    }
    relays
}

fn latency_panel(svg: &mut String, scenario: &ScenarioResult, relays: &[String], ox: f64, oy: f64) {
    let points: Vec<(&str, f64, &super::latency::Percentiles)> = scenario
        .relays
        .iter()
        .flat_map(|relay| {
            relay
                .latency
                .iter()
                .filter_map(move |p| Some((relay.relay.as_str(), p.load, p.one_way.as_ref()?)))
        })
        .collect();
    let lo = points
        .iter()
        .map(|p| p.2.p50_us)
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min)
        / 1.5;
    let hi = points.iter().map(|p| p.2.max_us).fold(0.0, f64::max) * 1.5;
    if !(lo.is_finite() && hi > lo) {
        return;
    }
    let ay = Axis {
        lo,
        hi,
        start: oy + PANEL_H - BOTTOM,
        end: oy + TOP,
    };
    let (left, right) = (ox + LEFT, ox + PANEL_W - RIGHT);
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="{}" font-weight="bold">{}</text>"#,
        oy + 18.0,
        escape(&format!(
            "{} — {}",
            scenario.scenario.name, scenario.scenario.title
        ))
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{left}" y="{}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        ay.end,
        right - left,
        ay.start - ay.end
    );
    for tick in ay.ticks() {
        let py = ay.at(tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{py:.1}" x2="{right}" y2="{py:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left - 4.0,
            py + 4.0,
            delay_label(tick)
        );
    }
    let middle = f64::midpoint(ay.start, ay.end);
    let _ = writeln!(
        svg,
        r#"<text x="{x}" y="{middle}" text-anchor="middle" transform="rotate(-90 {x} {middle})">one-way delay</text>"#,
        x = ox + 14.0,
    );
    let loads = &super::latency::LOADS;
    let group_w = (right - left) / loads.len() as f64;
    let slot_w = group_w / (relays.len() as f64 + 1.0);
    for (g, &load) in loads.iter().enumerate() {
        let gx = left + group_w * g as f64;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.0} % of lossless</text>"#,
            gx + group_w / 2.0,
            ay.start + 14.0,
            load * 100.0
        );
        for (r, relay) in relays.iter().enumerate() {
            let Some((_, _, p)) = points
                .iter()
                .find(|(name, l, _)| name == relay && (l - load).abs() < 1e-9)
            else {
                continue;
            };
            percentile_bar(svg, relay, load, p, gx + slot_w * (r as f64 + 1.0), &ay);
        }
    }
}

/// One relay's percentiles at one load point, as a column centred at `cx`.
fn percentile_bar(
    svg: &mut String,
    relay: &str,
    load: f64,
    p: &super::latency::Percentiles,
    cx: f64,
    ay: &Axis,
) {
    let stroke = color(relay);
    let title = format!(
        "{relay} at {:.0} %: p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs ({} samples)",
        load * 100.0,
        p.p50_us,
        p.p99_us,
        p.p999_us,
        p.max_us,
        p.count
    );
    let (y50, y99, y999, ymax) = (
        ay.at(p.p50_us),
        ay.at(p.p99_us),
        ay.at(p.p999_us),
        ay.at(p.max_us),
    );
    let _ = writeln!(
        svg,
        r#"<g><title>{}</title><line x1="{cx:.1}" y1="{y50:.1}" x2="{cx:.1}" y2="{ymax:.1}" stroke="{stroke}"/><rect x="{:.1}" y="{y99:.1}" width="8" height="{:.1}" fill="{stroke}" opacity="0.8"/><line x1="{:.1}" y1="{y999:.1}" x2="{:.1}" y2="{y999:.1}" stroke="{stroke}" stroke-width="2.5"/><circle cx="{cx:.1}" cy="{ymax:.1}" r="2.5" fill="{stroke}"/></g>"#,
        escape(&title),
        cx - 4.0,
        (y50 - y99).max(1.0),
        cx - 6.0,
        cx + 6.0,
    );
}
