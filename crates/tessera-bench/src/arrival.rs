//! When requests are sent: the open-loop arrival process.
//!
//! Gaps between requests are gamma-distributed with shape `burstiness` and mean
//! `1 / rate` (vLLM's model): burstiness 1 is a Poisson process (exponential gaps), below
//! 1 the arrivals come in bursts, above 1 they are more evenly spaced. An infinite rate
//! sends everything at once.

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};

use crate::BenchError;

/// A request rate: requests per second, or all at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RequestRate {
    /// Every request at time zero.
    Infinite,
    /// Requests per second (positive, finite).
    PerSecond(f64),
}

impl RequestRate {
    /// Reads `inf` or a positive number of requests per second.
    pub fn parse(s: &str) -> Result<RequestRate, BenchError> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("inf") || s.eq_ignore_ascii_case("infinity") {
            return Ok(RequestRate::Infinite);
        }
        match s.parse::<f64>() {
            Ok(r) if r.is_infinite() && r > 0.0 => Ok(RequestRate::Infinite),
            Ok(r) if r > 0.0 && r.is_finite() => Ok(RequestRate::PerSecond(r)),
            _ => Err(BenchError::invalid(
                "--request-rate",
                format!("must be a positive number of requests/s or `inf`, got `{s}`"),
            )),
        }
    }

    /// As a number (`f64::INFINITY` for all at once), for ordering and plots.
    pub fn as_f64(self) -> f64 {
        match self {
            RequestRate::Infinite => f64::INFINITY,
            RequestRate::PerSecond(r) => r,
        }
    }
}

impl std::fmt::Display for RequestRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestRate::Infinite => f.write_str("inf"),
            RequestRate::PerSecond(r) => write!(f, "{r}"),
        }
    }
}

/// The gaps between consecutive requests, in seconds: an endless, seeded sequence.
pub struct Arrivals {
    gamma: Option<Gamma<f64>>,
    rng: StdRng,
}

impl Arrivals {
    /// Gaps for `rate` with `burstiness` (> 0), drawn from a generator seeded by `seed`.
    pub fn new(rate: RequestRate, burstiness: f64, seed: u64) -> Result<Arrivals, BenchError> {
        if !(burstiness > 0.0 && burstiness.is_finite()) {
            return Err(BenchError::invalid(
                "--burstiness",
                format!("must be a positive number, got {burstiness}"),
            ));
        }
        let gamma = match rate {
            RequestRate::Infinite => None,
            // Mean of Gamma(k, θ) is kθ: θ = 1 / (rate · k) makes the mean gap 1 / rate.
            RequestRate::PerSecond(r) => {
                Some(Gamma::new(burstiness, 1.0 / (r * burstiness)).map_err(|e| {
                    BenchError::invalid("--burstiness", format!("with rate {r}: {e}"))
                })?)
            }
        };
        // Its own stream, apart from the dataset's, so the arrivals do not depend on how
        // many draws the prompts took.
        let rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
        Ok(Arrivals { gamma, rng })
    }

    /// Send times of `n` requests, seconds from the start: the first at 0.
    pub fn schedule(&mut self, n: usize) -> Vec<f64> {
        let mut at = 0.0;
        (0..n)
            .map(|i| {
                if i > 0 {
                    at += self.next_gap();
                }
                at
            })
            .collect()
    }

    /// The next gap, in seconds.
    pub fn next_gap(&mut self) -> f64 {
        match &self.gamma {
            None => 0.0,
            Some(g) => g.sample(&mut self.rng),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaps(rate: f64, burstiness: f64, n: usize) -> Vec<f64> {
        let mut a = Arrivals::new(RequestRate::PerSecond(rate), burstiness, 3).unwrap();
        (0..n).map(|_| a.next_gap()).collect()
    }

    fn mean_and_cv(v: &[f64]) -> (f64, f64) {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
        (m, var.sqrt() / m)
    }

    #[test]
    fn the_mean_gap_is_one_over_the_rate() {
        for (rate, b) in [(4.0, 1.0), (50.0, 0.5), (0.5, 3.0)] {
            let (m, _) = mean_and_cv(&gaps(rate, b, 20_000));
            assert!(
                (m * rate - 1.0).abs() < 0.05,
                "rate {rate}, burstiness {b}: mean gap {m}"
            );
        }
    }

    #[test]
    fn burstiness_changes_the_spread() {
        // Gamma(k) gaps have a coefficient of variation of 1/√k: 1 for Poisson.
        let (_, poisson) = mean_and_cv(&gaps(10.0, 1.0, 20_000));
        let (_, bursty) = mean_and_cv(&gaps(10.0, 0.25, 20_000));
        let (_, even) = mean_and_cv(&gaps(10.0, 4.0, 20_000));
        assert!((poisson - 1.0).abs() < 0.05, "{poisson}");
        assert!((bursty - 2.0).abs() < 0.15, "{bursty}");
        assert!((even - 0.5).abs() < 0.05, "{even}");
    }

    #[test]
    fn schedules_are_seeded_and_infinite_rate_is_all_at_once() {
        let s = |seed| {
            Arrivals::new(RequestRate::PerSecond(2.0), 1.0, seed)
                .unwrap()
                .schedule(10)
        };
        assert_eq!(s(1), s(1));
        assert_ne!(s(1), s(2));
        let a = s(1);
        assert_eq!(a[0], 0.0);
        assert!(a.windows(2).all(|w| w[1] >= w[0]));
        let mut inf = Arrivals::new(RequestRate::Infinite, 1.0, 1).unwrap();
        assert_eq!(inf.schedule(4), [0.0; 4]);
    }

    #[test]
    fn rates_and_burstiness_are_checked() {
        assert_eq!(RequestRate::parse("inf").unwrap(), RequestRate::Infinite);
        assert_eq!(
            RequestRate::parse(" 2.5").unwrap(),
            RequestRate::PerSecond(2.5)
        );
        for bad in ["0", "-1", "fast", "NaN"] {
            let e = RequestRate::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("--request-rate must be"), "{e}");
        }
        let e = Arrivals::new(RequestRate::Infinite, 0.0, 0).err().unwrap();
        assert!(e.to_string().starts_with("--burstiness"));
    }
}
