//! The serving metrics of vLLM's `bench serve`, computed from request records.
//!
//! - TTFT: sent → first chunk with a token. TPOT: `(E2EL − TTFT) / (output tokens − 1)`
//!   per request with more than one output token. ITL: every gap between consecutive
//!   chunks, all requests pooled. E2EL: sent → end of the stream.
//! - Each is summarised by mean, median, population standard deviation and percentiles
//!   (linear interpolation between closest ranks, numpy's default), in milliseconds.
//! - Throughputs divide by the duration: first request sent → last request finished.
//! - Failed requests count only in `failed` and `failures`, never in latencies or tokens.

use std::collections::BTreeMap;

use crate::record::RequestRecord;
use crate::BenchError;

/// The percentiles reported when none are asked for.
pub const DEFAULT_PERCENTILES: [f64; 2] = [90.0, 99.0];

/// A latency's summary, in milliseconds.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Distribution {
    /// Mean.
    pub mean_ms: f64,
    /// Median (the 50th percentile).
    pub median_ms: f64,
    /// Population standard deviation.
    pub std_ms: f64,
    /// `(p, value)` for each percentile asked for, in the order asked.
    pub percentiles: Vec<(f64, f64)>,
    /// The 99th percentile, always: SLOs and capacity are judged on it.
    pub p99_ms: f64,
}

impl Distribution {
    /// The summary of `values_s` (seconds) with the given percentiles. An empty set
    /// summarises to zeros.
    pub fn of(values_s: &[f64], percentiles: &[f64]) -> Distribution {
        let mut sorted: Vec<f64> = values_s.iter().map(|v| v * 1e3).collect();
        if sorted.is_empty() {
            return Distribution {
                percentiles: percentiles.iter().map(|&p| (p, 0.0)).collect(),
                ..Default::default()
            };
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len() as f64;
        let mean = sorted.iter().sum::<f64>() / n;
        let var = sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        Distribution {
            mean_ms: mean,
            median_ms: percentile(&sorted, 50.0),
            std_ms: var.sqrt(),
            percentiles: percentiles
                .iter()
                .map(|&p| (p, percentile(&sorted, p)))
                .collect(),
            p99_ms: percentile(&sorted, 99.0),
        }
    }
}

/// The `p`-th percentile (0 to 100) of sorted values: linear interpolation between the
/// closest ranks, as numpy's default. `sorted` must not be empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// vLLM's name for a percentile in JSON keys: `99` for 99.0, `99.9` for 99.9.
pub fn percentile_name(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{}", p as i64)
    } else {
        format!("{p}")
    }
}

/// Refuses percentiles outside `[0, 100]`.
pub fn check_percentiles(percentiles: &[f64]) -> Result<(), BenchError> {
    if percentiles.is_empty() {
        return Err(BenchError::invalid(
            "--metric-percentiles",
            "needs at least one value",
        ));
    }
    match percentiles.iter().find(|p| !(0.0..=100.0).contains(*p)) {
        Some(p) => Err(BenchError::invalid(
            "--metric-percentiles",
            format!("values must be in [0, 100], got {p}"),
        )),
        None => Ok(()),
    }
}

/// Service-level objectives, in milliseconds; a request meets them when it meets every
/// one given. They are judged per request for goodput and on the p99 for capacity.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Slo {
    /// Time to first token.
    pub ttft_ms: Option<f64>,
    /// Time per output token.
    pub tpot_ms: Option<f64>,
    /// End-to-end latency.
    pub e2el_ms: Option<f64>,
}

impl Slo {
    /// Reads `ttft:MS,tpot:MS,e2el:MS` (any non-empty subset, in any order).
    pub fn parse(s: &str) -> Result<Slo, BenchError> {
        let bad = |reason: String| BenchError::invalid("--slo", reason);
        let mut slo = Slo::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once(':')
                .ok_or_else(|| bad(format!("`{part}` is not METRIC:MS, e.g. ttft:500")))?;
            let ms: f64 = value
                .trim()
                .parse()
                .ok()
                .filter(|v: &f64| *v > 0.0 && v.is_finite())
                .ok_or_else(|| bad(format!("`{value}` is not a positive number of ms")))?;
            let slot = match name.trim() {
                "ttft" => &mut slo.ttft_ms,
                "tpot" => &mut slo.tpot_ms,
                "e2el" => &mut slo.e2el_ms,
                other => return Err(bad(format!("`{other}` is not one of ttft, tpot, e2el"))),
            };
            *slot = Some(ms);
        }
        if slo.entries().is_empty() {
            return Err(bad("names no objective; give e.g. ttft:500,tpot:50".into()));
        }
        Ok(slo)
    }

    /// The objectives given, as `(metric, ms)`.
    pub fn entries(&self) -> Vec<(&'static str, f64)> {
        [
            ("ttft", self.ttft_ms),
            ("tpot", self.tpot_ms),
            ("e2el", self.e2el_ms),
        ]
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| (n, v)))
        .collect()
    }

    /// Whether a completed request meets every objective. A request with one output
    /// token has no TPOT and meets a TPOT objective.
    pub fn met_by(&self, r: &RequestRecord) -> bool {
        let within = |limit: Option<f64>, value_s: Option<f64>| match (limit, value_s) {
            (Some(ms), Some(v)) => v * 1e3 <= ms,
            _ => true,
        };
        r.ok()
            && within(self.ttft_ms, r.ttft_s())
            && within(self.tpot_ms, r.tpot_s())
            && within(self.e2el_ms, Some(r.e2el_s))
    }

    /// The first objective the p99s of `m` miss, as `(metric, p99 ms, objective ms)`.
    pub fn p99_miss(&self, m: &Metrics) -> Option<(&'static str, f64, f64)> {
        self.entries().into_iter().find_map(|(name, limit)| {
            let p99 = match name {
                "ttft" => m.ttft.p99_ms,
                "tpot" => m.tpot.p99_ms,
                _ => m.e2el.p99_ms,
            };
            (p99 > limit).then_some((name, p99, limit))
        })
    }
}

impl std::fmt::Display for Slo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .entries()
            .iter()
            .map(|(n, v)| format!("{n} ≤ {v} ms"))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// The metrics of one run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Metrics {
    /// Requests that completed.
    pub completed: usize,
    /// Requests that failed.
    pub failed: usize,
    /// Failed requests by status.
    pub failures: BTreeMap<String, usize>,
    /// Prompt tokens of the completed requests.
    pub total_input_tokens: usize,
    /// Output tokens of the completed requests.
    pub total_output_tokens: usize,
    /// Seconds from the first request sent to the last one finished.
    pub duration_s: f64,
    /// Completed requests per second.
    pub request_throughput: f64,
    /// Requests meeting every SLO per second; `None` without SLOs.
    pub request_goodput: Option<f64>,
    /// Output tokens per second.
    pub output_throughput: f64,
    /// Prompt and output tokens per second.
    pub total_token_throughput: f64,
    /// The most output tokens that arrived in one 1-second bucket of the run.
    pub max_output_tokens_per_s: f64,
    /// The most requests in flight at once.
    pub max_concurrent_requests: usize,
    /// Time to first token.
    pub ttft: Distribution,
    /// Time per output token.
    pub tpot: Distribution,
    /// Inter-token latency.
    pub itl: Distribution,
    /// End-to-end latency.
    pub e2el: Distribution,
}

impl Metrics {
    /// Reduces a run's records.
    pub fn compute(records: &[RequestRecord], percentiles: &[f64], slo: Option<&Slo>) -> Metrics {
        let done: Vec<&RequestRecord> = records.iter().filter(|r| r.ok()).collect();
        let mut failures = BTreeMap::new();
        for f in records.iter().filter_map(|r| r.failure.as_ref()) {
            *failures.entry(f.status.clone()).or_insert(0) += 1;
        }
        let t0 = records
            .iter()
            .map(|r| r.start_s)
            .fold(f64::INFINITY, f64::min);
        let t1 = records
            .iter()
            .map(|r| r.end_s())
            .fold(f64::NEG_INFINITY, f64::max);
        let duration_s = if records.is_empty() { 0.0 } else { t1 - t0 };
        let per_s = |x: f64| {
            if duration_s > 0.0 {
                x / duration_s
            } else {
                0.0
            }
        };
        let total_input_tokens: usize = done.iter().map(|r| r.input_len).sum();
        let total_output_tokens: usize = done.iter().map(|r| r.output_len).sum();
        let ttfts: Vec<f64> = done.iter().filter_map(|r| r.ttft_s()).collect();
        let tpots: Vec<f64> = done.iter().filter_map(|r| r.tpot_s()).collect();
        let itls: Vec<f64> = done.iter().flat_map(|r| r.itls_s()).collect();
        let e2els: Vec<f64> = done.iter().map(|r| r.e2el_s).collect();
        Metrics {
            completed: done.len(),
            failed: records.len() - done.len(),
            failures,
            total_input_tokens,
            total_output_tokens,
            duration_s,
            request_throughput: per_s(done.len() as f64),
            request_goodput: slo
                .map(|slo| per_s(done.iter().filter(|r| slo.met_by(r)).count() as f64)),
            output_throughput: per_s(total_output_tokens as f64),
            total_token_throughput: per_s((total_input_tokens + total_output_tokens) as f64),
            max_output_tokens_per_s: peak_tokens_per_s(&done, t0),
            max_concurrent_requests: peak_in_flight(records),
            ttft: Distribution::of(&ttfts, percentiles),
            tpot: Distribution::of(&tpots, percentiles),
            itl: Distribution::of(&itls, percentiles),
            e2el: Distribution::of(&e2els, percentiles),
        }
    }
}

/// The most tokens that arrived within one 1-second bucket `[t0 + k, t0 + k + 1)`.
fn peak_tokens_per_s(done: &[&RequestRecord], t0: f64) -> f64 {
    let mut buckets: BTreeMap<u64, u64> = BTreeMap::new();
    for r in done {
        for c in &r.chunks {
            let k = (r.start_s + c.at_s - t0).max(0.0).floor() as u64;
            *buckets.entry(k).or_insert(0) += u64::from(c.tokens);
        }
    }
    buckets.values().copied().max().unwrap_or(0) as f64
}

/// The most requests in flight at once; one that ends as another starts is not counted
/// with it.
fn peak_in_flight(records: &[RequestRecord]) -> usize {
    let mut events: Vec<(f64, i32)> = records
        .iter()
        .flat_map(|r| [(r.start_s, 1), (r.end_s(), -1)])
        .collect();
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut peak) = (0i32, 0i32);
    for (_, d) in events {
        now += d;
        peak = peak.max(now);
    }
    peak as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Chunk, Failure};

    /// A completed request sent at `start_s` whose chunks of one token arrive at `at`
    /// (seconds from sending) and whose stream ends at `e2el_s`.
    fn done(start_s: f64, at: &[f64], e2el_s: f64) -> RequestRecord {
        RequestRecord {
            input_len: 10,
            output_len: at.len(),
            start_s,
            chunks: at.iter().map(|&at_s| Chunk { at_s, tokens: 1 }).collect(),
            e2el_s,
            failure: None,
        }
    }

    fn failed(start_s: f64, e2el_s: f64, status: &str) -> RequestRecord {
        RequestRecord {
            input_len: 10,
            output_len: 0,
            start_s,
            chunks: vec![],
            e2el_s,
            failure: Some(Failure::new(status, "no")),
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        // numpy.percentile([1, 2, 3, 4], q): 50 → 2.5, 90 → 3.7, 99 → 3.97, 0 → 1, 100 → 4.
        assert!(close(percentile(&v, 50.0), 2.5));
        assert!(close(percentile(&v, 90.0), 3.7));
        assert!(close(percentile(&v, 99.0), 3.97));
        assert!(close(percentile(&v, 0.0), 1.0));
        assert!(close(percentile(&v, 100.0), 4.0));
        assert!(close(percentile(&[5.0], 99.9), 5.0));
        assert_eq!(percentile_name(99.0), "99");
        assert_eq!(percentile_name(99.9), "99.9");
        assert_eq!(percentile_name(50.0), "50");
    }

    #[test]
    fn distributions_are_in_ms_with_population_std() {
        // 0.010, 0.020, 0.030, 0.060 s → mean 30 ms, median 25 ms,
        // std sqrt((400 + 100 + 0 + 900) / 4) = sqrt(350) ms.
        let d = Distribution::of(&[0.03, 0.01, 0.06, 0.02], &[90.0]);
        assert!(close(d.mean_ms, 30.0));
        assert!(close(d.median_ms, 25.0));
        assert!(close(d.std_ms, 350f64.sqrt()));
        // rank 0.9 · 3 = 2.7 → 30 + 0.7 · 30 = 51 ms.
        assert_eq!(d.percentiles.len(), 1);
        assert!(close(d.percentiles[0].1, 51.0));
        assert!(close(d.p99_ms, 30.0 + 0.97 * 30.0));
        let empty = Distribution::of(&[], &[99.0]);
        assert_eq!((empty.mean_ms, empty.percentiles[0].1), (0.0, 0.0));
    }

    #[test]
    fn ttft_tpot_and_itl_per_request() {
        let r = done(1.0, &[0.1, 0.12, 0.15, 0.2], 0.25);
        assert!(close(r.ttft_s().unwrap(), 0.1));
        // (0.25 − 0.1) / (4 − 1) = 0.05.
        assert!(close(r.tpot_s().unwrap(), 0.05));
        let itls: Vec<f64> = r.itls_s().collect();
        assert_eq!(itls.len(), 3);
        assert!(close(itls[0], 0.02) && close(itls[1], 0.03) && close(itls[2], 0.05));
        // One output token: no TPOT.
        assert_eq!(done(0.0, &[0.1], 0.1).tpot_s(), None);
        // The server's token count, not the chunk count, divides.
        let mut r = done(0.0, &[0.1, 0.2], 0.4);
        r.output_len = 4;
        assert!(close(r.tpot_s().unwrap(), 0.1));
    }

    #[test]
    fn run_metrics_pool_itls_and_skip_failures() {
        let records = vec![
            done(0.0, &[0.1, 0.2, 0.3], 0.3),
            done(0.5, &[0.2, 0.25], 0.5),
            failed(0.6, 0.01, "429"),
            failed(0.7, 2.0, "timeout"),
            failed(0.8, 0.01, "429"),
        ];
        let m = Metrics::compute(&records, &[50.0], None);
        assert_eq!((m.completed, m.failed), (2, 3));
        assert_eq!(m.failures.get("429"), Some(&2));
        assert_eq!(m.failures.get("timeout"), Some(&1));
        assert_eq!((m.total_input_tokens, m.total_output_tokens), (20, 5));
        // First sent at 0, last finished at 0.7 + 2.0.
        assert!(close(m.duration_s, 2.7));
        assert!(close(m.request_throughput, 2.0 / 2.7));
        assert!(close(m.output_throughput, 5.0 / 2.7));
        assert!(close(m.total_token_throughput, 25.0 / 2.7));
        assert_eq!(m.request_goodput, None);
        // TTFTs 100 and 200 ms.
        assert!(close(m.ttft.mean_ms, 150.0));
        // TPOTs (0.3 − 0.1) / 2 = 100 ms and (0.5 − 0.2) / 1 = 300 ms.
        assert!(close(m.tpot.mean_ms, 200.0));
        // ITLs pooled: 100, 100 (first) and 50 ms (second).
        assert!(close(m.itl.mean_ms, 250.0 / 3.0));
        assert!(close(m.itl.median_ms, 100.0));
        // E2ELs 300 and 500 ms.
        assert!(close(m.e2el.median_ms, 400.0));
        // At 0.8 in flight: the second (0.5–1.0), the timeout (0.7–2.7) and the last 429.
        assert_eq!(m.max_concurrent_requests, 3);
    }

    #[test]
    fn goodput_counts_requests_meeting_every_slo() {
        let records = vec![
            done(0.0, &[0.05, 0.07, 0.09], 0.09), // TTFT 50, TPOT 20, E2EL 90
            done(0.0, &[0.2, 0.22, 0.24], 0.24),  // TTFT 200: misses ttft
            done(0.0, &[0.05, 0.15, 0.25], 0.25), // TPOT 100: misses tpot
            done(0.0, &[0.05], 1.0),              // one token: TPOT not judged
            failed(0.0, 0.01, "429"),
        ];
        let slo = Slo::parse("ttft:100,tpot:50").unwrap();
        let m = Metrics::compute(&records, &[99.0], Some(&slo));
        // Two of the completed requests meet both, over a duration of 1 s.
        assert!(close(m.request_goodput.unwrap(), 2.0));
        let e2el = Slo::parse("e2el:100").unwrap();
        let m = Metrics::compute(&records, &[99.0], Some(&e2el));
        assert!(close(m.request_goodput.unwrap(), 1.0));
    }

    #[test]
    fn peak_output_tokens_are_counted_in_one_second_buckets() {
        let mut a = done(0.0, &[0.5, 0.9, 1.1, 1.2, 1.3], 1.3);
        a.chunks[4].tokens = 3; // a chunk of three tokens
        let b = done(0.2, &[0.85, 1.5, 2.5], 2.5); // arrive at 1.05, 1.7, 2.7
        let m = Metrics::compute(&[a, b], &[99.0], None);
        // [0, 1): 2 tokens; [1, 2): 1 + 1 + 3 + 1 + 1 = 7; [2, 3): 1.
        assert_eq!(m.max_output_tokens_per_s, 7.0);
        assert_eq!(m.max_concurrent_requests, 2);
    }

    #[test]
    fn slos_parse_and_refuse_with_the_flag_named() {
        let s = Slo::parse("tpot:50, ttft:500").unwrap();
        assert_eq!(
            s,
            Slo {
                ttft_ms: Some(500.0),
                tpot_ms: Some(50.0),
                e2el_ms: None
            }
        );
        assert_eq!(s.to_string(), "ttft ≤ 500 ms, tpot ≤ 50 ms");
        for bad in ["", "ttft", "ttft:0", "ttft:-1", "itl:5", "ttft:abc"] {
            let e = Slo::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("--slo "), "{bad}: {e}");
        }
        assert!(check_percentiles(&[50.0, 99.9]).is_ok());
        assert!(check_percentiles(&[101.0]).is_err());
        assert!(check_percentiles(&[]).is_err());
    }
}
