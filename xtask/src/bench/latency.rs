//! One-way latency: what each relay adds between the generator and the sink, at 10 %, 50 % and
//! 90 % of the relay's own lossless rate.
//!
//! A latency trial is a trial like the others (the same generator, pacing, nftables counters
//! and loss accounting) in which every `n`-th frame is a sample: the generator asks the kernel
//! for the sample's transmit timestamp (`tx_timestamps.rs`), and the sink's tap takes its
//! receive timestamp (`tap.rs`). Both are the kernel's software timestamps on the one
//! `CLOCK_REALTIME` every namespace shares, so their difference is the time from the frame
//! leaving the generator's interface to it entering the sink's, whatever relay sat between.
//! The payload's own stamp (`CLOCK_MONOTONIC`, when the generator handed the frame's batch to
//! the kernel) gives a second figure that also counts the generator's queueing in the `tbf`
//! qdisc; it is kept in the JSON only. Realtime is turned into monotonic time with the
//! offset between the two clocks read around the trial; a trial during which that offset moved
//! (the clock was stepped) says so.

use std::{collections::HashMap, time::Duration};

use anyhow::Context as _;
use nix::time::{ClockId, clock_gettime};
use serde::Serialize;

use super::{
    relay::Relay,
    tap::{RING_SLOTS, Tap, TapReadout},
    trial::{Bench, Trial, packet_count},
    tx_timestamps::TxStamp,
};

/// The load points, as fractions of a relay's highest lossless rate.
pub const LOADS: [f64; 3] = [0.1, 0.5, 0.9];
/// Latency samples per second a trial aims for: every frame up to this rate, every `n`-th
/// above it. Any stall longer than `n` frames' time catches a sample.
pub const SAMPLES_PER_SECOND: f64 = 25_000.0;
/// How long the kernel may take to start timestamping received frames once the tap asks
/// (it switches the timestamps on from a work queue).
const TIMESTAMPS_ON: Duration = Duration::from_millis(100);
/// A clock offset that moved by more than this during a trial: the clock was stepped.
const CLOCK_STEP_NS: i64 = 50_000;
/// Worst samples kept per trial, for tracing where their time went.
const WORST_KEPT: usize = 10;

/// Percentiles of the delays of one trial's samples, in microseconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub p9999_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `delays` (nanoseconds; sorted in place); `None` when empty.
    pub fn of(delays: &mut [u64]) -> Option<Self> {
        delays.sort_unstable();
        let count = delays.len();
        let max = *delays.last()?;
        let rank = |q: f64| -> f64 {
            // Nearest rank: the smallest value with at least a fraction `q` at or below it. In
            // range: finite, at least 1, at most `count`.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let index = (q * count as f64).ceil().max(1.0) as usize - 1;
            delays[index.min(count - 1)] as f64 / 1e3
        };
        let sum: u128 = delays.iter().map(|&d| u128::from(d)).sum();
        Some(Self {
            count: count as u64,
            min_us: delays[0] as f64 / 1e3,
            mean_us: sum as f64 / count as f64 / 1e3,
            p50_us: rank(0.5),
            p90_us: rank(0.9),
            p99_us: rank(0.99),
            p999_us: rank(0.999),
            p9999_us: rank(0.9999),
            max_us: max as f64 / 1e3,
        })
    }
}

/// How the samples of a trial fared.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SampleCounts {
    /// Samples the generator handed to the kernel.
    pub sent: u64,
    /// Of those, samples whose transmit timestamp came back.
    pub timestamped: u64,
    /// Deliveries with a delay: a sample arrived with both timestamps.
    pub measured: u64,
    /// Timestamped samples × outputs that did not arrive (lost like any other packet).
    pub not_delivered: u64,
    /// Arrived without a receive timestamp (the kernel had not switched them on yet).
    pub unstamped: u64,
    /// Arrived without a transmit timestamp to match.
    pub unmatched: u64,
    /// Arrived before they left: a clock step; left out.
    pub negative: u64,
    /// Arrived when the tap's ring was full; not measured.
    pub ring_dropped: u64,
}

/// One of the slowest deliveries of a trial, with its times on `CLOCK_MONOTONIC` (the clock
/// `perf record -k CLOCK_MONOTONIC` uses), to find in a trace.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Slow {
    pub sequence: u64,
    pub delay_us: f64,
    pub left_s: f64,
    pub arrived_s: f64,
}

/// A relay's latency at one load point.
#[derive(Clone, Debug, Serialize)]
pub struct LatencyPoint {
    /// Fraction of the lossless rate.
    pub load: f64,
    pub lossless_pps: f64,
    /// Every `sample_every`-th frame was a sample.
    pub sample_every: u64,
    /// From the frame leaving the generator's interface to it entering the sink's (both the
    /// kernel's timestamps): the headline figure.
    pub one_way: Option<Percentiles>,
    /// From the generator handing the frame's batch to the kernel (the payload's stamp) to it
    /// entering the sink: adds the generator's own queueing (the `tbf` qdisc's lead).
    pub from_send_call: Option<Percentiles>,
    pub samples: SampleCounts,
    /// The slowest deliveries.
    pub slowest: Vec<Slow>,
    /// How far the realtime clock moved against the monotonic one during the trial.
    pub clock_step_us: f64,
    /// The trace of this trial (`--latency-trace`), relative to the output directory.
    pub trace: Option<String>,
    pub trial: Trial,
}

impl LatencyPoint {
    /// `10 %`, `50 %`, `90 %`.
    pub fn label(&self) -> String {
        format!("{:.0} %", self.load * 100.0)
    }

    /// Whether the figures can be trusted: samples were measured and the clock held still.
    pub fn clock_held(&self) -> bool {
        self.clock_step_us.abs() * 1e3 <= CLOCK_STEP_NS as f64
    }
}

/// Every how many frames a trial of `seconds` at `rate` takes a sample: about
/// [`SAMPLES_PER_SECOND`], no more than the tap's ring holds, and a number that shares no
/// factor with the number of streams, so every stream is sampled.
pub fn sample_every(rate: f64, seconds: f64, streams: usize) -> u64 {
    let packets = packet_count(rate, seconds) as f64;
    let by_rate = (rate / SAMPLES_PER_SECOND).ceil();
    let by_ring = (packets / (0.8 * RING_SLOTS as f64)).ceil();
    // In range: finite, positive, far below 2^53.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let mut every = by_rate.max(by_ring).max(1.0) as u64;
    let streams = streams.max(1) as u64;
    while gcd(every, streams) != 1 {
        every += 1;
    }
    every
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// `CLOCK_REALTIME − CLOCK_MONOTONIC` now, in nanoseconds: the realtime reading taken between
/// two monotonic ones no more than 2 µs apart (a thread interrupted between two readings would
/// otherwise shift the offset by as long as it waited).
fn realtime_offset_ns() -> anyhow::Result<i64> {
    let ns = |clock| -> anyhow::Result<i64> {
        let now = clock_gettime(clock).context("reading a clock")?;
        Ok(now.tv_sec() * 1_000_000_000 + now.tv_nsec())
    };
    for _ in 0..1000 {
        let before = ns(ClockId::CLOCK_MONOTONIC)?;
        let real = ns(ClockId::CLOCK_REALTIME)?;
        let after = ns(ClockId::CLOCK_MONOTONIC)?;
        if after - before <= 2_000 {
            return Ok(real - i64::midpoint(before, after));
        }
    }
    anyhow::bail!("could not read CLOCK_REALTIME and CLOCK_MONOTONIC within 2 µs of each other")
}

fn realtime_ns() -> anyhow::Result<u64> {
    let now = clock_gettime(ClockId::CLOCK_REALTIME).context("reading CLOCK_REALTIME")?;
    Ok(u64::try_from(now.tv_sec())? * 1_000_000_000 + u64::try_from(now.tv_nsec())?)
}

/// Hooks around a latency trial (`--latency-trace` records a trace there).
pub trait Around {
    /// Called just before the trial, with the relay and a name for the load point.
    fn before(&mut self, relay: &Relay, point: &str) -> anyhow::Result<()>;
    /// Called when the trial is over, with its slowest deliveries; returns the trace's name.
    fn after(&mut self, slowest: &[Slow]) -> anyhow::Result<Option<String>>;
}

/// One latency trial of `seconds` at `load` × `lossless`.
pub fn measure(
    bench: &Bench,
    relay: &mut Relay,
    load: f64,
    lossless: f64,
    seconds: f64,
    around: Option<&mut dyn Around>,
) -> anyhow::Result<LatencyPoint> {
    let rate = (load * lossless).round().max(1.0);
    let every = sample_every(rate, seconds, bench.generator.streams());
    let mut tap = Tap::open(
        bench.topology.sink(),
        &bench.sink_interfaces(),
        bench.generator.family(),
    )?;
    std::thread::sleep(TIMESTAMPS_ON);
    let label = format!("{:.0}pct", load * 100.0);
    let mut around = around;
    if let Some(hooks) = around.as_deref_mut() {
        hooks.before(relay, &label)?;
    }
    let offset_before = realtime_offset_ns()?;
    let since = realtime_ns()?;
    let (trial, departures) = bench.run_sampled(Some(relay), rate, seconds, false, Some(every))?;
    let offset_after = realtime_offset_ns()?;
    let readout = tap.collect()?;
    drop(tap);
    let joined = join(
        &departures.timestamps,
        &readout,
        offset_before,
        bench.copies,
        since,
    );
    let trace = match around {
        Some(hooks) => hooks.after(&joined.slowest)?,
        None => None,
    };
    let mut samples = joined.counts;
    samples.sent = departures.samples;
    Ok(LatencyPoint {
        load,
        lossless_pps: lossless,
        sample_every: every,
        one_way: joined.one_way,
        from_send_call: joined.from_send_call,
        samples,
        slowest: joined.slowest,
        clock_step_us: (offset_after - offset_before) as f64 / 1e3,
        trace,
        trial,
    })
}

struct Joined {
    one_way: Option<Percentiles>,
    from_send_call: Option<Percentiles>,
    counts: SampleCounts,
    slowest: Vec<Slow>,
}

/// Matches each delivery the tap saw with its sample's transmit timestamp. `offset_ns` is
/// realtime − monotonic; `copies` the deliveries each sample should make; transmit timestamps
/// from before `since_real_ns` belong to an earlier trial.
fn join(
    tx: &[TxStamp],
    readout: &TapReadout,
    offset_ns: i64,
    copies: u64,
    since_real_ns: u64,
) -> Joined {
    // A frame that reaches the next veth without passing an IP stack keeps the generator's
    // socket, and that veth reports its departure again, later: the first report is gen0's.
    let mut left: HashMap<u32, u64> = HashMap::new();
    for stamp in tx.iter().filter(|s| s.sent_real_ns >= since_real_ns) {
        left.entry(stamp.id)
            .and_modify(|sent| *sent = (*sent).min(stamp.sent_real_ns))
            .or_insert(stamp.sent_real_ns);
    }
    let mut counts = SampleCounts {
        timestamped: left.len() as u64,
        unstamped: readout.unstamped,
        ring_dropped: readout.dropped,
        ..SampleCounts::default()
    };
    let mut one_way = Vec::with_capacity(readout.samples.len());
    let mut from_send_call = Vec::with_capacity(readout.samples.len());
    let mut slow: Vec<(u64, u64, u64)> = Vec::new();
    for sample in &readout.samples {
        // The id is the sequence number's low 32 bits (see tx_timestamps.rs).
        #[allow(clippy::cast_possible_truncation)]
        let Some(&sent) = left.get(&(sample.sequence as u32)) else {
            counts.unmatched += 1;
            continue;
        };
        let Some(delay) = sample.arrived_real_ns.checked_sub(sent) else {
            counts.negative += 1;
            continue;
        };
        one_way.push(delay);
        slow.push((delay, sample.sequence, sent));
        let arrived_mono = i128::from(sample.arrived_real_ns) - i128::from(offset_ns);
        if let Ok(since_call) = u64::try_from(arrived_mono - i128::from(sample.sent_mono_ns)) {
            from_send_call.push(since_call);
        }
    }
    counts.measured = one_way.len() as u64;
    counts.not_delivered = (counts.timestamped * copies)
        .saturating_sub(counts.measured + counts.negative + counts.ring_dropped + counts.unstamped);
    slow.sort_unstable_by_key(|&(delay, _, _)| std::cmp::Reverse(delay));
    let to_mono_s = |real_ns: u64| (i128::from(real_ns) - i128::from(offset_ns)) as f64 / 1e9;
    let slowest = slow
        .iter()
        .take(WORST_KEPT)
        .map(|&(delay, sequence, sent)| Slow {
            sequence,
            delay_us: delay as f64 / 1e3,
            left_s: to_mono_s(sent),
            arrived_s: to_mono_s(sent + delay),
        })
        .collect();
    Joined {
        one_way: Percentiles::of(&mut one_way),
        from_send_call: Percentiles::of(&mut from_send_call),
        counts,
        slowest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::tap::RxSample;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut delays: Vec<u64> = (1..=1000).rev().map(|us| us * 1000).collect();
        let p = Percentiles::of(&mut delays).expect("samples");
        assert_eq!(p.count, 1000);
        assert!((p.min_us - 1.0).abs() < 1e-9);
        assert!((p.p50_us - 500.0).abs() < 1e-9);
        assert!((p.p99_us - 990.0).abs() < 1e-9);
        assert!((p.p999_us - 999.0).abs() < 1e-9);
        assert!((p.max_us - 1000.0).abs() < 1e-9);
        assert!((p.mean_us - 500.5).abs() < 1e-9);
        let mut one = vec![7_000];
        let p = Percentiles::of(&mut one).expect("a sample");
        assert!((p.p999_us - 7.0).abs() < 1e-9 && (p.max_us - 7.0).abs() < 1e-9);
        assert_eq!(Percentiles::of(&mut []), None);
    }

    #[test]
    fn samples_are_spread_over_every_stream_and_fit_the_ring() {
        assert_eq!(sample_every(10_000.0, 3.0, 1), 1);
        assert_eq!(sample_every(300_000.0, 3.0, 1), 12);
        // 50 streams: 12 shares a factor with 50, 13 does not.
        assert_eq!(sample_every(300_000.0, 3.0, 50), 13);
        // A long trial at a low rate still fits the ring.
        let every = sample_every(20_000.0, 100.0, 1);
        assert!(2_000_000 / every <= RING_SLOTS as u64, "{every}");
    }

    #[test]
    fn deliveries_are_matched_with_their_departures() {
        let offset = 1_000_000_000_000;
        let tx = [
            // Left before the trial: an earlier trial's.
            TxStamp {
                id: 15,
                sent_real_ns: offset - 1,
            },
            TxStamp {
                id: 0,
                sent_real_ns: offset + 10_000,
            },
            // Reported again by a later veth: the first report counts.
            TxStamp {
                id: 0,
                sent_real_ns: offset + 14_000,
            },
            TxStamp {
                id: 5,
                sent_real_ns: offset + 20_000,
            },
            TxStamp {
                id: 10,
                sent_real_ns: offset + 30_000,
            },
        ];
        let arrival = |sequence: u64, arrived: u64, sent_mono: u64| RxSample {
            sequence,
            sent_mono_ns: sent_mono,
            arrived_real_ns: offset + arrived,
        };
        let readout = TapReadout {
            samples: vec![
                arrival(0, 15_000, 9_000),
                arrival(5, 2_020_000, 19_000),
                // No departure on record.
                arrival(15, 40_000, 39_000),
                // Before it left: a stepped clock.
                arrival(10, 29_000, 28_000),
            ],
            unstamped: 1,
            dropped: 0,
        };
        let joined = join(
            &tx,
            &readout,
            i64::try_from(offset).expect("small"),
            1,
            offset,
        );
        let one_way = joined.one_way.expect("two measured");
        assert_eq!(one_way.count, 2);
        assert!((one_way.min_us - 5.0).abs() < 1e-9);
        assert!((one_way.max_us - 2000.0).abs() < 1e-9);
        let from_call = joined.from_send_call.expect("two measured");
        assert!((from_call.min_us - 6.0).abs() < 1e-9, "{from_call:?}");
        assert_eq!(
            joined.counts,
            SampleCounts {
                sent: 0,
                timestamped: 3,
                measured: 2,
                not_delivered: 0,
                unstamped: 1,
                unmatched: 1,
                negative: 1,
                ring_dropped: 0,
            }
        );
        assert_eq!(joined.slowest[0].sequence, 5);
        assert!((joined.slowest[0].left_s - 20e-6).abs() < 1e-12);
        assert!((joined.slowest[0].arrived_s - 2.02e-3).abs() < 1e-12);
    }
}
