//! Overload points: after the search, one trial at each of 1.5×, 2× and 4× a relay's lossless
//! rate, to show whether what it delivers past its limit holds (a plateau) or collapses (a
//! cliff, receive livelock).

use serde::Serialize;

use super::trial::Trial;

/// Offered rates of the overload points, as multiples of the relay's lossless rate.
pub const FACTORS: [f64; 3] = [1.5, 2.0, 4.0];

#[derive(Clone, Debug, Serialize)]
pub struct OverloadPoint {
    pub factor: f64,
    /// The relay's highest lossless rate (offered input packets/s) the point multiplies.
    pub lossless_pps: f64,
    /// `factor × lossless_pps`, or the highest rate the benchmark asks for if that is less.
    pub requested_pps: f64,
    /// Delivered per second, in input packets (deliveries over the fan-out).
    pub delivered_input_pps: f64,
    /// `delivered_input_pps` over the lossless rate: 1 when the relay still carries its
    /// lossless rate.
    pub delivered_over_lossless: f64,
    /// The point did not get the offered rate it stands for: the generator fell short of the
    /// requested rate, or the request was capped.
    pub generator_bounded: bool,
    pub trial: Trial,
}

impl OverloadPoint {
    /// The rate to ask for at `factor`, capped at `max`.
    pub fn requested(factor: f64, lossless: f64, max: f64) -> f64 {
        (factor * lossless).min(max).round()
    }

    /// Point `factor` of a relay whose lossless rate is `lossless`, from its `trial` (every
    /// input packet delivered `copies` times when nothing is lost).
    pub fn new(factor: f64, lossless: f64, copies: u64, trial: Trial) -> Self {
        let capped = trial.rate_pps < 0.999 * factor * lossless;
        let delivered_input_pps = trial.delivered_pps / copies.max(1) as f64;
        Self {
            factor,
            lossless_pps: lossless,
            requested_pps: trial.rate_pps,
            delivered_input_pps,
            delivered_over_lossless: delivered_input_pps / lossless,
            generator_bounded: capped || trial.generator_limited,
            trial,
        }
    }

    /// `1.5×`, `2×`, `4×`.
    pub fn label(&self) -> String {
        format!("{}×", self.factor)
    }
}
