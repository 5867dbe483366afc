//! The search for the highest offered rate a relay carries with less than 0.1 % loss: a
//! geometric ladder up (or down) from a start rate until the outcome flips, then bisection
//! (on a log scale) between the last lossless and the first lossy rate.

use serde::Serialize;

#[derive(Clone, Debug)]
pub struct SearchParams {
    pub start: f64,
    pub min: f64,
    pub max: f64,
    /// Ladder factor between successive rates.
    pub step: f64,
    /// Stop bisecting when lossy / lossless is at most this.
    pub precision: f64,
    pub max_trials: usize,
}

/// What one probe found: whether the trial was lossless, and the rate the generator actually
/// offered (which falls short of the requested rate when the generator saturates).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Probe {
    pub lossless: bool,
    pub offered: f64,
}

/// Why the search stopped climbing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    /// A lossy rate was found above the lossless one: the relay's limit.
    Relay,
    /// Asking for more no longer made the generator offer more: the relay's limit is higher.
    Generator,
    /// The search's highest rate was lossless.
    SearchMax,
    /// Lossy even at the lowest rate.
    NoneLossless,
    /// Ran out of trials.
    Trials,
}

#[derive(Clone, Debug, Serialize)]
pub struct SearchResult {
    /// Highest rate the generator offered in a lossless trial (input packets per second).
    pub lossless_pps: Option<f64>,
    /// Highest requested rate that was lossless.
    pub lossless_requested_pps: Option<f64>,
    /// Lowest requested rate that was lossy.
    pub lossy_pps: Option<f64>,
    pub bound: Bound,
    pub trials: usize,
}

/// A lossless trial that offered less than this much more than the best one so far means the
/// generator, not the relay, has stopped the climb.
const GROWTH: f64 = 1.1;

/// Runs the search over requested rates; `probe(rate)` runs one trial at `rate`.
pub fn search(
    params: &SearchParams,
    mut probe: impl FnMut(f64) -> anyhow::Result<Probe>,
) -> anyhow::Result<SearchResult> {
    let mut good: Option<f64> = None;
    let mut bad: Option<f64> = None;
    let mut best_offered: Option<f64> = None;
    let mut trials = 0;
    let mut rate = params.start.clamp(params.min, params.max);
    let mut bound = None;

    while trials < params.max_trials {
        trials += 1;
        let found = probe(rate)?;
        if found.lossless {
            let saturated = best_offered.is_some_and(|best| found.offered < best * GROWTH);
            good = Some(rate);
            best_offered = Some(best_offered.map_or(found.offered, |b| b.max(found.offered)));
            if bad.is_some() {
                break;
            }
            if saturated {
                bound = Some(Bound::Generator);
                break;
            }
            if rate >= params.max {
                bound = Some(Bound::SearchMax);
                break;
            }
            rate = (rate * params.step).min(params.max).round();
        } else {
            bad = Some(rate);
            if good.is_some() {
                break;
            }
            if rate <= params.min {
                bound = Some(Bound::NoneLossless);
                break;
            }
            rate = (rate / params.step).max(params.min).round();
        }
    }
    while let (None, Some(g), Some(b)) = (bound, good, bad) {
        if b / g <= params.precision || trials >= params.max_trials {
            break;
        }
        trials += 1;
        let mid = (g * b).sqrt().round();
        let found = probe(mid)?;
        if found.lossless {
            good = Some(mid);
            best_offered = Some(best_offered.map_or(found.offered, |b| b.max(found.offered)));
        } else {
            bad = Some(mid);
        }
    }
    let bound = bound.unwrap_or(match (good, bad) {
        (Some(_), Some(_)) => Bound::Relay,
        _ => Bound::Trials,
    });
    Ok(SearchResult {
        lossless_pps: best_offered,
        lossless_requested_pps: good,
        lossy_pps: bad,
        bound,
        trials,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SearchParams {
        SearchParams {
            start: 25_000.0,
            min: 1_000.0,
            max: 2_000_000.0,
            step: 2.0,
            precision: 1.1,
            max_trials: 14,
        }
    }

    fn relay_with_limit(limit: f64) -> impl FnMut(f64) -> anyhow::Result<Probe> {
        move |rate| {
            Ok(Probe {
                lossless: rate <= limit,
                offered: rate,
            })
        }
    }

    #[test]
    fn finds_a_limit_above_the_start_within_the_precision() {
        let result = search(&params(), relay_with_limit(130_000.0)).expect("search");
        let good = result.lossless_pps.expect("a lossless rate");
        let bad = result.lossy_pps.expect("a lossy rate");
        assert!(good <= 130_000.0 && bad > 130_000.0);
        assert!(bad / good <= 1.1);
        assert_eq!(result.bound, Bound::Relay);
    }

    #[test]
    fn walks_down_when_the_start_is_lossy() {
        let result = search(&params(), relay_with_limit(4_000.0)).expect("search");
        let good = result.lossless_pps.expect("a lossless rate");
        assert!(good <= 4_000.0 && good > 3_000.0);
    }

    #[test]
    fn reports_a_relay_lossy_everywhere() {
        let result = search(&params(), relay_with_limit(10.0)).expect("search");
        assert_eq!(result.lossless_pps, None);
        assert_eq!(result.bound, Bound::NoneLossless);
    }

    #[test]
    fn stops_where_the_generator_stops_growing() {
        let result = search(&params(), |rate: f64| {
            Ok(Probe {
                lossless: true,
                offered: rate.min(300_000.0),
            })
        })
        .expect("search");
        assert_eq!(result.lossless_pps, Some(300_000.0));
        assert_eq!(result.bound, Bound::Generator);
    }

    #[test]
    fn a_lossy_rate_above_makes_the_relay_the_bound_even_if_the_generator_lags() {
        // The generator offers 10 % less than asked; the relay loses above 280 k offered.
        let result = search(&params(), |rate: f64| {
            let offered = rate * 0.9;
            Ok(Probe {
                lossless: offered <= 280_000.0,
                offered,
            })
        })
        .expect("search");
        let best = result.lossless_pps.expect("a lossless rate");
        assert!(best <= 280_000.0 && best > 250_000.0, "{best}");
        assert_eq!(result.bound, Bound::Relay);
    }

    #[test]
    fn stops_at_the_search_maximum() {
        let result = search(&params(), relay_with_limit(1e9)).expect("search");
        assert_eq!(result.lossless_pps, Some(2_000_000.0));
        assert_eq!(result.bound, Bound::SearchMax);
    }
}
