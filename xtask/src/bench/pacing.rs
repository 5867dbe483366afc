//! When the generator sends: frame `k` of a trial is due `k / rate` seconds after the start,
//! and frames go out in small batches as they fall due. A sender that fell behind (preempted,
//! or asked for more than it can do) carries at most one bucket of frames over, as a token
//! bucket does: it never makes up for lost time with a burst longer than the bucket, so the
//! frames the relay sees are never bunched more than the rate and the bucket say.
//!
//! In front of a `tbf` qdisc, which does the fine pacing itself, the sender runs a `lead`
//! ahead of the schedule and may make up for that much more: the qdisc's queue then absorbs
//! late wake-ups (40–50 µs late as a rule on a virtual machine, some a millisecond).

use std::time::{Duration, Instant};

/// How long a bucket lasts: bursts of at most this much traffic, as the `tbf` qdisc's bucket.
pub const BUCKET_TIME: Duration = Duration::from_micros(80);
/// The fewest frames a bucket holds (a bucket of a few frames makes a timer fire per frame).
pub const BUCKET_MIN_FRAMES: u64 = 16;
/// The most frames handed to the kernel in one call.
pub const MAX_BATCH: usize = 64;
/// How long the sender sleeps at least: it wakes when this much traffic is due (or one frame).
const WAKE_TIME: Duration = Duration::from_micros(40);

/// Frames a bucket holds at `rate`: [`BUCKET_TIME`] of traffic, at least [`BUCKET_MIN_FRAMES`].
pub fn bucket_frames(rate: f64) -> u64 {
    frames_in(rate, BUCKET_TIME).max(BUCKET_MIN_FRAMES)
}

/// Frames due in `time` at `rate`, rounded up.
fn frames_in(rate: f64, time: Duration) -> u64 {
    let frames = (rate * time.as_secs_f64()).ceil();
    // In range: finite and positive for any rate the benchmark asks for, far below 2^53.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    if frames.is_finite() && frames > 0.0 {
        frames as u64
    } else {
        0
    }
}

/// What the sender does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this many frames now.
    Send(usize),
    /// Nothing is due before this instant.
    WaitUntil(Instant),
}

/// The schedule of one trial.
pub struct Pacer {
    rate: f64,
    /// Frame `k` is due at `origin + k / rate`; moves later when the sender falls behind.
    origin: Instant,
    /// How far ahead of the schedule frames may be sent.
    lead: Duration,
    /// The most frames owed when the sender is late: a bucket, plus the lead's worth.
    carry_over: u64,
    /// Frames due together before the sender wakes: [`WAKE_TIME`] of traffic, at most half a
    /// bucket, so a wake-up that comes a little late still finds room in the bucket.
    wake_batch: u64,
    sent: u64,
    count: u64,
}

impl Pacer {
    pub fn new(rate: f64, count: u64, start: Instant, lead: Duration) -> Self {
        let bucket = bucket_frames(rate);
        let wake_batch = frames_in(rate, WAKE_TIME).clamp(1, bucket / 2);
        Self {
            rate,
            origin: start,
            lead,
            carry_over: bucket + frames_in(rate, lead),
            wake_batch,
            sent: 0,
            count,
        }
    }

    pub fn done(&self) -> bool {
        self.sent >= self.count
    }

    /// When the last frame is due: when it leaves the qdisc, or is sent without one.
    pub fn schedule_end(&self) -> Instant {
        self.due_at(self.count)
    }

    /// Frames due by `now` plus the lead (at least the first).
    fn due(&self, now: Instant) -> u64 {
        let elapsed = (now + self.lead)
            .saturating_duration_since(self.origin)
            .as_secs_f64();
        // The tolerance absorbs rounding: at `due_at(k)` frame `k` is due.
        let due = (elapsed * self.rate + 1e-6).floor();
        // In range: finite and non-negative; capped to the trial's count below.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let due = if due.is_finite() && due > 0.0 {
            due as u64
        } else {
            0
        };
        (due + 1).min(self.count)
    }

    fn due_at(&self, frame: u64) -> Instant {
        let nanos = (frame as f64 * 1e9 / self.rate).ceil();
        // In range: finite and non-negative, and a trial lasts seconds, not centuries.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let nanos = nanos as u64;
        self.origin + Duration::from_nanos(nanos)
    }

    pub fn next(&mut self, now: Instant) -> Step {
        let mut due = self.due(now);
        if due > self.sent + self.carry_over {
            // Behind by more than a bucket: the frames beyond it are late, not owed.
            let late = due - self.sent - self.carry_over;
            self.origin += Duration::from_secs_f64(late as f64 / self.rate);
            due = self.sent + self.carry_over;
        }
        let behind = due.saturating_sub(self.sent);
        if behind == 0 {
            let target = (self.sent + self.wake_batch - 1).min(self.count - 1);
            return Step::WaitUntil(
                self.due_at(target)
                    .checked_sub(self.lead)
                    .unwrap_or(self.origin),
            );
        }
        let batch = usize::try_from(behind).unwrap_or(MAX_BATCH).min(MAX_BATCH);
        Step::Send(batch)
    }

    /// Records that `frames` of the batch went out.
    pub fn sent(&mut self, frames: usize) {
        self.sent += frames as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a pacer against a clock that advances only when told: `delay(k)` is how long the
    /// `k`-th send takes. Returns (send time, frames) of every batch.
    fn simulate(
        rate: f64,
        count: u64,
        delay: impl FnMut(usize) -> Duration,
    ) -> Vec<(Duration, usize)> {
        simulate_with_lead(rate, count, Duration::ZERO, delay)
    }

    fn simulate_with_lead(
        rate: f64,
        count: u64,
        lead: Duration,
        mut delay: impl FnMut(usize) -> Duration,
    ) -> Vec<(Duration, usize)> {
        let start = Instant::now();
        let mut now = start;
        let mut pacer = Pacer::new(rate, count, start, lead);
        let mut sends = Vec::new();
        while !pacer.done() {
            match pacer.next(now) {
                Step::Send(frames) => {
                    sends.push((now - start, frames));
                    pacer.sent(frames);
                    now += delay(sends.len());
                }
                Step::WaitUntil(then) => {
                    assert!(then > now, "waits for a later time");
                    now = then;
                }
            }
        }
        sends
    }

    /// Whether `sends` never exceed a token bucket of `bucket` frames filling at `rate`: no
    /// stretch of time holds more than its share of frames plus one bucket.
    fn within_token_bucket(sends: &[(Duration, usize)], rate: f64, bucket: u64) -> bool {
        let bucket = bucket as f64;
        let mut tokens = bucket;
        let mut last = Duration::ZERO;
        sends.iter().all(|&(at, frames)| {
            tokens = (tokens + at.saturating_sub(last).as_secs_f64() * rate).min(bucket);
            last = at;
            tokens -= frames as f64;
            tokens > -1.0
        })
    }

    #[test]
    fn sends_at_the_rate_in_small_batches() {
        let rate = 500_000.0;
        let sends = simulate(rate, 100_000, |_| Duration::from_micros(2));
        let total: usize = sends.iter().map(|s| s.1).sum();
        assert_eq!(total, 100_000);
        let last = sends.last().expect("sends").0.as_secs_f64();
        assert!(
            (last - 0.2).abs() < 0.001,
            "took {last} s for 0.2 s of frames"
        );
        assert!(within_token_bucket(&sends, rate, bucket_frames(rate)));
        assert!(
            sends.len() > 2_000,
            "batches of a few frames: {}",
            sends.len()
        );
    }

    #[test]
    fn at_low_rates_sends_one_frame_per_wake_up() {
        let sends = simulate(5_000.0, 50, |_| Duration::from_micros(2));
        assert!(sends.iter().all(|s| s.1 == 1), "{sends:?}");
        let gaps: Vec<Duration> = sends
            .windows(2)
            .map(|w| w[1].0.saturating_sub(w[0].0))
            .collect();
        assert!(
            gaps.iter().all(|gap| gap.as_micros().abs_diff(200) <= 2),
            "{gaps:?}"
        );
    }

    #[test]
    fn a_stall_costs_frames_instead_of_a_burst() {
        let rate = 200_000.0;
        // The 100th send is held up for 10 ms (2000 frames' worth).
        let sends = simulate(rate, 20_000, |k| {
            Duration::from_micros(if k == 100 { 10_000 } else { 1 })
        });
        assert!(within_token_bucket(&sends, rate, bucket_frames(rate)));
        let last = sends.last().expect("sends").0.as_secs_f64();
        assert!(
            last > 0.1 + 0.009,
            "the stall was not made up for: {last} s"
        );
    }

    #[test]
    fn a_slow_sender_runs_flat_out_without_piling_up() {
        // Each send of up to 64 frames takes 100 µs: at most 640 kpps, asked for 2 Mpps.
        let sends = simulate(2_000_000.0, 64_000, |_| Duration::from_micros(100));
        assert!(sends.iter().all(|s| s.1 <= MAX_BATCH));
        let last = sends.last().expect("sends").0.as_secs_f64();
        assert!(last > 0.09, "{last}");
    }

    #[test]
    fn with_a_lead_runs_ahead_and_absorbs_late_wake_ups() {
        let rate = 100_000.0;
        let lead = Duration::from_micros(320);
        // Every 20th send comes 300 µs late: within the lead, so nothing is lost.
        let sends = simulate_with_lead(rate, 50_000, lead, |k| {
            Duration::from_micros(if k % 20 == 0 { 300 } else { 1 })
        });
        let first = sends[0].1;
        assert!(first >= 32, "starts a lead ahead: {first} frames");
        let last = sends.last().expect("sends").0.as_secs_f64();
        assert!((last - 0.5).abs() < 0.001, "kept the schedule: {last} s");
        let extra = frames_in(rate, lead);
        assert!(within_token_bucket(
            &sends,
            rate,
            bucket_frames(rate) + extra
        ));
        assert!(!within_token_bucket(&sends, rate, bucket_frames(rate)));
    }
}
