//! The search for the highest offered rate a relay carries with less than 0.1 % loss: a
//! geometric ladder up (or down) from a start rate until the outcome flips, then bisection
//! (on a log scale) between the last lossless and the first lossy rate, then a second trial
//! at the lossless rate found. On a machine whose CPUs are shared, one trial can pass a rate
//! the relay does not carry (a quiet moment on the host); the rate counts only if the second
//! trial passes too, and if it does not, the search goes on below it.

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
    /// What the generator offered at the highest lossless rate (input packets per second):
    /// the less of its two trials there.
    pub lossless_pps: Option<f64>,
    /// Highest requested rate that was lossless.
    pub lossless_requested_pps: Option<f64>,
    /// Lowest requested rate that was lossy.
    pub lossy_pps: Option<f64>,
    pub bound: Bound,
    pub trials: usize,
    /// Whether the highest lossless rate passed its second trial (false only when the search
    /// ran out of trials before it).
    pub repeated: bool,
    /// Rates that passed one trial and failed their second.
    pub flukes: Vec<f64>,
}

/// A lossless trial that offered less than this much more than the best one so far means the
/// generator, not the relay, has stopped the climb.
const GROWTH: f64 = 1.1;

/// Runs the search over requested rates; `probe(rate)` runs one trial at `rate`.
pub fn search(
    params: &SearchParams,
    mut probe: impl FnMut(f64) -> anyhow::Result<Probe>,
) -> anyhow::Result<SearchResult> {
    // Lossless trials not disproved by a second trial: (requested, offered), rates ascending.
    let mut passed: Vec<(f64, f64)> = Vec::new();
    let mut bad: Option<f64> = None;
    // Why the climb stopped short of a lossy rate (the generator, the search's maximum).
    let mut stopped: Option<Bound> = None;
    // What the second trial at the best lossless rate offered, once it passed.
    let mut repeat: Option<f64> = None;
    let mut flukes = Vec::new();
    let mut trials = 0;

    while trials < params.max_trials {
        let good = passed.last().map(|&(rate, _)| rate);
        let (rate, repeating) = match (good, bad) {
            (Some(g), Some(b)) if b / g > params.precision => ((g * b).sqrt().round(), false),
            (Some(g), Some(_)) => (g, true),
            (Some(g), None) if stopped.is_some() => (g, true),
            (Some(g), None) => ((g * params.step).min(params.max).round(), false),
            (None, Some(b)) if b <= params.min => {
                stopped = Some(Bound::NoneLossless);
                break;
            }
            (None, Some(b)) => ((b / params.step).max(params.min).round(), false),
            (None, None) => (params.start.clamp(params.min, params.max), false),
        };
        if repeating && repeat.is_some() {
            break;
        }
        trials += 1;
        let found = probe(rate)?;
        match (found.lossless, repeating) {
            (true, true) => repeat = Some(found.offered),
            (false, true) => {
                // The rate held once only: the relay's limit is below it.
                passed.pop();
                flukes.push(rate);
                bad = Some(rate);
                stopped = None;
            }
            (true, false) => {
                let best = passed.iter().map(|&(_, offered)| offered).reduce(f64::max);
                let climbing = bad.is_none();
                passed.push((rate, found.offered));
                if climbing && best.is_some_and(|best| found.offered < best * GROWTH) {
                    stopped = Some(Bound::Generator);
                } else if climbing && rate >= params.max {
                    stopped = Some(Bound::SearchMax);
                }
            }
            (false, false) => bad = Some(bad.map_or(rate, |b| b.min(rate))),
        }
    }
    let good = passed.last().copied();
    let bound = match (stopped, good, bad) {
        (Some(bound), _, _) => bound,
        (None, Some(_), Some(_)) => Bound::Relay,
        _ => Bound::Trials,
    };
    Ok(SearchResult {
        lossless_pps: good.map(|(_, offered)| repeat.map_or(offered, |again| again.min(offered))),
        lossless_requested_pps: good.map(|(rate, _)| rate),
        lossy_pps: bad,
        bound,
        trials,
        repeated: repeat.is_some(),
        flukes,
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
    fn the_lossless_rate_found_is_trialled_twice() {
        let mut calls: Vec<f64> = Vec::new();
        let mut relay = relay_with_limit(130_000.0);
        let result = search(&params(), |rate| {
            calls.push(rate);
            relay(rate)
        })
        .expect("search");
        let good = result.lossless_requested_pps.expect("a lossless rate");
        assert_eq!(
            calls
                .iter()
                .filter(|&&rate| (rate - good).abs() < 0.5)
                .count(),
            2
        );
        assert!(calls.last().is_some_and(|&last| (last - good).abs() < 0.5));
        assert!(result.repeated);
        assert!(result.flukes.is_empty());
        assert_eq!(result.trials, calls.len());
    }

    #[test]
    fn a_rate_that_passes_once_only_does_not_count() {
        // The relay carries 200 k; the first trial above it (283 k, bisecting between 200 k
        // and 400 k) passes anyway, once.
        let mut quiet_moment = true;
        let result = search(&params(), |rate: f64| {
            let fluke = quiet_moment && rate > 200_000.0 && rate <= 300_000.0;
            quiet_moment &= !fluke;
            Ok(Probe {
                lossless: rate <= 200_000.0 || fluke,
                offered: rate,
            })
        })
        .expect("search");
        let good = result.lossless_requested_pps.expect("a lossless rate");
        assert!(good <= 200_000.0 && good > 180_000.0, "{good}");
        assert!(!result.flukes.is_empty());
        assert!(result.flukes.iter().all(|&fluke| fluke > 200_000.0));
        assert!(result.repeated);
        assert_eq!(result.bound, Bound::Relay);
    }

    #[test]
    fn the_lossless_rate_is_what_the_lesser_of_its_two_trials_offered() {
        let mut tried: Vec<f64> = Vec::new();
        let result = search(&params(), |rate: f64| {
            let again = tried.contains(&rate);
            tried.push(rate);
            Ok(Probe {
                lossless: rate <= 130_000.0,
                offered: if again { rate * 0.95 } else { rate },
            })
        })
        .expect("search");
        let good = result.lossless_requested_pps.expect("a lossless rate");
        assert_eq!(result.lossless_pps, Some(good * 0.95));
    }

    #[test]
    fn says_when_the_trials_ran_out_before_the_second_one() {
        let few = SearchParams {
            max_trials: 4,
            ..params()
        };
        // 25 k, 50 k, 100 k pass, 200 k fails: no trial left for 100 k again.
        let result = search(&few, relay_with_limit(130_000.0)).expect("search");
        assert_eq!(result.lossless_requested_pps, Some(100_000.0));
        assert!(!result.repeated);
        assert_eq!(result.trials, 4);
    }

    #[test]
    fn stops_at_the_search_maximum() {
        let result = search(&params(), relay_with_limit(1e9)).expect("search");
        assert_eq!(result.lossless_pps, Some(2_000_000.0));
        assert_eq!(result.bound, Bound::SearchMax);
    }
}
