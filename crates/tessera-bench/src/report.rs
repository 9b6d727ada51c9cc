//! Results as people and tools read them: a console table per point and across a sweep,
//! the JSON results file (vLLM's `bench serve` keys, plus Tessera's), the capacity
//! verdict against SLOs, and the Markdown report.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{json, Value};

use crate::arrival::RequestRate;
use crate::dataset::{Dataset, WorkloadSpec};
use crate::metrics::{percentile_name, Distribution, Metrics, Slo};
use crate::record::RequestRecord;
use crate::target::TargetInfo;

/// Which setting a sweep varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// One point.
    Single,
    /// Several request rates.
    RequestRate,
    /// Several concurrency limits.
    MaxConcurrency,
}

/// What every point of a run shares.
#[derive(Debug, Clone)]
pub struct Setup {
    /// When the run started, `YYYYMMDD-HHMMSS` (UTC).
    pub date: String,
    /// The target.
    pub target: TargetInfo,
    /// The workload.
    pub workload: WorkloadSpec,
    /// Burstiness of the arrivals.
    pub burstiness: f64,
    /// Whether generation went past the end-of-text token.
    pub ignore_eos: bool,
    /// Warm-up requests before each run of a point.
    pub num_warmups: usize,
    /// Runs of every point, pooled (`--repeat`).
    pub repeats: usize,
    /// Percentiles reported.
    pub percentiles: Vec<f64>,
    /// The SLOs, if any.
    pub slo: Option<Slo>,
    /// What the points vary.
    pub sweep: Sweep,
}

/// One point's load and results.
#[derive(Debug, Clone)]
pub struct PointResult {
    /// The arrival rate.
    pub request_rate: RequestRate,
    /// The concurrency limit.
    pub max_concurrency: Option<usize>,
    /// The metrics.
    pub metrics: Metrics,
    /// Every request, in the order sent.
    pub records: Vec<RequestRecord>,
}

impl PointResult {
    /// A short name for tables and plots: the swept setting's value.
    pub fn label(&self, sweep: Sweep) -> String {
        let rate = format!("{} req/s", self.request_rate);
        let conc = self.max_concurrency.map(|c| format!("concurrency {c}"));
        match (sweep, conc) {
            (Sweep::MaxConcurrency, Some(c)) => c,
            (Sweep::Single, Some(c)) => format!("{rate}, {c}"),
            _ => rate,
        }
    }

    /// The swept setting as a number, for ordering points.
    fn swept_value(&self, sweep: Sweep) -> f64 {
        match sweep {
            Sweep::MaxConcurrency => self.max_concurrency.map_or(f64::INFINITY, |c| c as f64),
            _ => self.request_rate.as_f64(),
        }
    }
}

/// The current time as vLLM stamps its results, `YYYYMMDD-HHMMSS`, in UTC.
pub fn date_stamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    stamp_of(secs)
}

/// `YYYYMMDD-HHMMSS` of seconds since the Unix epoch (UTC, proleptic Gregorian).
fn stamp_of(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01, by 400-year eras of 146 097 days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A JSON object that keeps its keys in the order they were added.
#[derive(Debug, Clone, Default)]
pub struct Object(Vec<(String, Value)>);

impl Object {
    fn put(&mut self, key: impl Into<String>, value: Value) {
        self.0.push((key.into(), value));
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

impl Serialize for Object {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// The metric names of the latency summaries, as in vLLM's keys.
const LATENCIES: [(&str, &str); 4] = [
    ("ttft", "Time to First Token"),
    ("tpot", "Time per Output Token (excl. 1st token)"),
    ("itl", "Inter-token Latency"),
    ("e2el", "End-to-end Latency"),
];

fn distribution<'a>(m: &'a Metrics, name: &str) -> &'a Distribution {
    match name {
        "ttft" => &m.ttft,
        "tpot" => &m.tpot,
        "itl" => &m.itl,
        _ => &m.e2el,
    }
}

/// One point as a JSON object with vLLM's `bench serve` keys, then Tessera's own.
/// `detailed` adds the per-request arrays (`input_lens`, `output_lens`, `ttfts`, `itls`,
/// `errors`), as vLLM's `--save-detailed`.
pub fn point_json(setup: &Setup, point: &PointResult, detailed: bool) -> Object {
    let m = &point.metrics;
    let mut o = Object::default();
    o.put("date", json!(setup.date));
    o.put("backend", json!(setup.target.backend));
    o.put("model_id", json!(setup.target.model_id));
    o.put("num_prompts", json!(setup.workload.num_prompts));
    o.put(
        "request_rate",
        match point.request_rate {
            RequestRate::Infinite => json!("inf"),
            RequestRate::PerSecond(r) => json!(r),
        },
    );
    o.put("burstiness", json!(setup.burstiness));
    o.put("max_concurrency", json!(point.max_concurrency));
    o.put("duration", json!(m.duration_s));
    o.put("completed", json!(m.completed));
    o.put("failed", json!(m.failed));
    o.put("total_input_tokens", json!(m.total_input_tokens));
    o.put("total_output_tokens", json!(m.total_output_tokens));
    o.put("request_throughput", json!(m.request_throughput));
    o.put("request_goodput", json!(m.request_goodput));
    o.put("output_throughput", json!(m.output_throughput));
    o.put("total_token_throughput", json!(m.total_token_throughput));
    o.put("max_output_tokens_per_s", json!(m.max_output_tokens_per_s));
    o.put("max_concurrent_requests", json!(m.max_concurrent_requests));
    for (name, _) in LATENCIES {
        let d = distribution(m, name);
        o.put(format!("mean_{name}_ms"), json!(d.mean_ms));
        o.put(format!("median_{name}_ms"), json!(d.median_ms));
        o.put(format!("std_{name}_ms"), json!(d.std_ms));
        for &(p, v) in &d.percentiles {
            o.put(format!("p{}_{name}_ms", percentile_name(p)), json!(v));
        }
    }
    if detailed {
        let r = &point.records;
        o.put(
            "input_lens",
            json!(r.iter().map(|r| r.input_len).collect::<Vec<_>>()),
        );
        o.put(
            "output_lens",
            json!(r.iter().map(|r| r.output_len).collect::<Vec<_>>()),
        );
        // As vLLM's: a failed request has a TTFT of 0 and no ITLs.
        o.put(
            "ttfts",
            json!(r
                .iter()
                .map(|r| r.ttft_s().filter(|_| r.ok()).unwrap_or(0.0))
                .collect::<Vec<_>>()),
        );
        o.put(
            "itls",
            json!(r
                .iter()
                .map(|r| match r.ok() {
                    true => r.itls_s().collect::<Vec<_>>(),
                    false => Vec::new(),
                })
                .collect::<Vec<_>>()),
        );
        o.put(
            "errors",
            json!(r
                .iter()
                .map(|r| r
                    .failure
                    .as_ref()
                    .map(|f| format!("{}: {}", f.status, f.message))
                    .unwrap_or_default())
                .collect::<Vec<_>>()),
        );
    }
    let w = &setup.workload;
    o.put("tp", json!(setup.target.tp));
    o.put("pp", json!(setup.target.pp));
    o.put("target", json!(setup.target.address));
    o.put("dataset_name", json!(w.dataset.name()));
    let (input_len, prefix) = match &w.dataset {
        Dataset::Random => (Some(w.input_len), None),
        Dataset::ShareGpt { .. } => (None, None),
        Dataset::SharedPrefix {
            prefix_len,
            num_prefixes,
        } => (Some(w.input_len), Some((*prefix_len, *num_prefixes))),
    };
    o.put("input_len", json!(input_len));
    o.put(
        "output_len",
        json!(match &w.dataset {
            Dataset::ShareGpt { .. } => w.output_len,
            _ => Some(w.output_len.unwrap_or(crate::dataset::DEFAULT_OUTPUT_LEN)),
        }),
    );
    o.put("range_ratio", json!(w.range_ratio));
    if let Some((prefix_len, num_prefixes)) = prefix {
        o.put("prefix_len", json!(prefix_len));
        o.put("num_prefixes", json!(num_prefixes));
    }
    o.put("seed", json!(w.seed));
    o.put("ignore_eos", json!(setup.ignore_eos));
    o.put("num_warmups", json!(setup.num_warmups));
    o.put("repeats", json!(setup.repeats));
    o.put("failures", json!(m.failures));
    o.put(
        "slo",
        match &setup.slo {
            None => Value::Null,
            Some(slo) => Value::Object(
                slo.entries()
                    .into_iter()
                    .map(|(n, v)| (format!("{n}_ms"), json!(v)))
                    .collect(),
            ),
        },
    );
    o
}

/// The results file: one object for a single point, an array of them for a sweep.
pub fn results_json(setup: &Setup, points: &[PointResult], detailed: bool) -> String {
    let objects: Vec<Object> = points
        .iter()
        .map(|p| point_json(setup, p, detailed))
        .collect();
    let text = match (setup.sweep, objects.as_slice()) {
        (Sweep::Single, [one]) => serde_json::to_string_pretty(one),
        _ => serde_json::to_string_pretty(&objects),
    };
    // Serializing strings and finite numbers cannot fail.
    text.unwrap_or_default() + "\n"
}

const WIDTH: usize = 56;

fn heading(out: &mut String, fill: char, title: &str) {
    let title = if title.is_empty() {
        String::new()
    } else {
        format!(" {title} ")
    };
    let n = title.chars().count();
    let left = WIDTH.saturating_sub(n) / 2;
    let right = WIDTH.saturating_sub(n + left);
    let _ = writeln!(
        out,
        "{}{title}{}",
        fill.to_string().repeat(left),
        fill.to_string().repeat(right)
    );
}

fn row(out: &mut String, label: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{label:<42}{value:>14}");
}

/// The console summary of one point, in the layout of vLLM's.
pub fn console_point(setup: &Setup, point: &PointResult) -> String {
    let m = &point.metrics;
    let mut out = String::new();
    heading(
        &mut out,
        '=',
        &format!("Serving Benchmark Result: {}", point.label(setup.sweep)),
    );
    row(&mut out, "Successful requests:", m.completed);
    row(&mut out, "Failed requests:", m.failed);
    for (status, n) in &m.failures {
        row(&mut out, &format!("  failed with {status}:"), n);
    }
    row(
        &mut out,
        "Maximum request concurrency:",
        point
            .max_concurrency
            .map_or("none".to_string(), |c| c.to_string()),
    );
    row(
        &mut out,
        "Benchmark duration (s):",
        format!("{:.2}", m.duration_s),
    );
    row(&mut out, "Total input tokens:", m.total_input_tokens);
    row(&mut out, "Total generated tokens:", m.total_output_tokens);
    row(
        &mut out,
        "Request throughput (req/s):",
        format!("{:.2}", m.request_throughput),
    );
    if let Some(g) = m.request_goodput {
        row(&mut out, "Request goodput (req/s):", format!("{g:.2}"));
    }
    row(
        &mut out,
        "Output token throughput (tok/s):",
        format!("{:.2}", m.output_throughput),
    );
    row(
        &mut out,
        "Peak output token throughput (tok/s):",
        format!("{:.2}", m.max_output_tokens_per_s),
    );
    row(
        &mut out,
        "Peak concurrent requests:",
        m.max_concurrent_requests,
    );
    row(
        &mut out,
        "Total token throughput (tok/s):",
        format!("{:.2}", m.total_token_throughput),
    );
    for (name, title) in LATENCIES {
        heading(&mut out, '-', title);
        let d = distribution(m, name);
        let upper = name.to_uppercase();
        row(
            &mut out,
            &format!("Mean {upper} (ms):"),
            format!("{:.2}", d.mean_ms),
        );
        row(
            &mut out,
            &format!("Median {upper} (ms):"),
            format!("{:.2}", d.median_ms),
        );
        for &(p, v) in &d.percentiles {
            row(
                &mut out,
                &format!("P{} {upper} (ms):", percentile_name(p)),
                format!("{v:.2}"),
            );
        }
    }
    heading(&mut out, '=', "");
    out
}

/// The columns of the sweep table: header and one row per point.
fn sweep_rows(setup: &Setup, points: &[PointResult]) -> (Vec<String>, Vec<Vec<String>>) {
    let mut header: Vec<String> = [
        "point",
        "done",
        "failed",
        "req/s",
        "out tok/s",
        "TTFT med ms",
        "TTFT p99 ms",
        "TPOT med ms",
        "TPOT p99 ms",
        "E2EL p99 ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if setup.slo.is_some() {
        header.push("goodput req/s".into());
    }
    let rows = points
        .iter()
        .map(|p| {
            let m = &p.metrics;
            let mut r = vec![
                p.label(setup.sweep),
                m.completed.to_string(),
                m.failed.to_string(),
                format!("{:.2}", m.request_throughput),
                format!("{:.1}", m.output_throughput),
                format!("{:.1}", m.ttft.median_ms),
                format!("{:.1}", m.ttft.p99_ms),
                format!("{:.2}", m.tpot.median_ms),
                format!("{:.2}", m.tpot.p99_ms),
                format!("{:.1}", m.e2el.p99_ms),
            ];
            if let Some(g) = m.request_goodput {
                r.push(format!("{g:.2}"));
            }
            r
        })
        .collect();
    (header, rows)
}

/// The table across a sweep's points, aligned for a terminal.
pub fn console_sweep(setup: &Setup, points: &[PointResult]) -> String {
    let (header, rows) = sweep_rows(setup, points);
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 0 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = String::new();
    let _ = writeln!(out, "{}", line(&header));
    for r in &rows {
        let _ = writeln!(out, "{}", line(r));
    }
    out
}

/// Why a point does not meet the SLOs on its p99s, or `None` when it does. A point with
/// failed requests does not meet them.
fn shortfall(slo: &Slo, point: &PointResult) -> Option<String> {
    let m = &point.metrics;
    if m.failed > 0 {
        return Some(format!("{} of its requests failed", m.failed));
    }
    slo.p99_miss(m).map(|(name, p99, limit)| {
        format!("p99 {} is {p99:.1} ms > {limit} ms", name.to_uppercase())
    })
}

/// The closing verdict: the highest rate or concurrency whose p99s meet every SLO, and
/// what failed first above it.
pub fn capacity_line(setup: &Setup, points: &[PointResult]) -> String {
    let Some(slo) = &setup.slo else {
        return "Capacity: no SLO was given (--slo ttft:MS,tpot:MS,e2el:MS), so none is judged."
            .into();
    };
    let mut order: Vec<&PointResult> = points.iter().collect();
    order.sort_by(|a, b| {
        a.swept_value(setup.sweep)
            .total_cmp(&b.swept_value(setup.sweep))
    });
    let what = match setup.sweep {
        Sweep::MaxConcurrency => "concurrency",
        _ => "request rate",
    };
    let name = |p: &PointResult| p.label(setup.sweep);
    let best = order.iter().rposition(|p| shortfall(slo, p).is_none());
    match best {
        None => {
            let lowest = order[0];
            let why = shortfall(slo, lowest).unwrap_or_default();
            if order.len() == 1 {
                format!(
                    "Capacity: {} does not meet the SLO ({slo}): {why}.",
                    name(lowest)
                )
            } else {
                format!(
                    "Capacity: no {what} tried meets the SLO ({slo}); at the lowest, {}, {why}.",
                    name(lowest)
                )
            }
        }
        Some(i) if i + 1 == order.len() => {
            if order.len() == 1 {
                format!("Capacity: {} meets the SLO ({slo}) at p99.", name(order[i]))
            } else {
                format!(
                    "Capacity: every {what} tried meets the SLO ({slo}) at p99, up to {}; \
                     capacity is at least that.",
                    name(order[i])
                )
            }
        }
        Some(i) => {
            let above = order[i + 1];
            format!(
                "Capacity: {} is the highest {what} whose p99s meet the SLO ({slo}); above it, at {}, {}.",
                name(order[i]),
                name(above),
                shortfall(slo, above).unwrap_or_default()
            )
        }
    }
}

/// The Markdown report: the setup, the results, the capacity verdict, and links to
/// the plots in the same folder.
pub fn markdown(setup: &Setup, points: &[PointResult], plots: &[(&str, &str)]) -> String {
    let mut md = String::new();
    let t = &setup.target;
    let w = &setup.workload;
    let _ = writeln!(md, "# Serving benchmark: {}\n", t.model_id);
    let _ = writeln!(md, "## Setup\n");
    let split = match (t.tp, t.pp) {
        (Some(tp), Some(pp)) => format!(" (tp={tp}, pp={pp})"),
        _ => String::new(),
    };
    let _ = writeln!(md, "- Date (UTC): {}", setup.date);
    let _ = writeln!(
        md,
        "- Target: `{}` ({}), model `{}`{split}",
        t.address,
        t.api(),
        t.model_id
    );
    let lengths = match &w.dataset {
        Dataset::ShareGpt { path } => format!(
            "`{}`, output {}",
            path.display(),
            w.output_len
                .map_or("as in the conversations".to_string(), |n| format!("{n} tokens"))
        ),
        Dataset::Random => format!(
            "input {} tokens, output {} tokens, range ratio {}",
            w.input_len,
            w.output_len.unwrap_or(crate::dataset::DEFAULT_OUTPUT_LEN),
            w.range_ratio
        ),
        Dataset::SharedPrefix {
            prefix_len,
            num_prefixes,
        } => format!(
            "{num_prefixes} prefixes of {prefix_len} tokens, suffix {} tokens, output {} tokens, range ratio {}",
            w.input_len,
            w.output_len.unwrap_or(crate::dataset::DEFAULT_OUTPUT_LEN),
            w.range_ratio
        ),
    };
    let _ = writeln!(
        md,
        "- Workload: {} prompts, {} dataset, {lengths}, seed {}{}",
        w.num_prompts,
        w.dataset.name(),
        w.seed,
        if setup.ignore_eos { ", ignore_eos" } else { "" }
    );
    let _ = writeln!(
        md,
        "- Load: burstiness {}, {} warm-up request(s) per point{}",
        setup.burstiness,
        setup.num_warmups,
        if setup.repeats > 1 {
            format!(
                "; every point run {} times in alternating order, pooled",
                setup.repeats
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        md,
        "- SLO: {}\n",
        setup
            .slo
            .as_ref()
            .map_or("none".to_string(), |s| s.to_string())
    );
    let _ = writeln!(md, "## Results\n");
    let (header, rows) = sweep_rows(setup, points);
    let _ = writeln!(md, "| {} |", header.join(" | "));
    let _ = writeln!(
        md,
        "|{}",
        header
            .iter()
            .enumerate()
            .map(|(i, _)| if i == 0 { " --- |" } else { " ---: |" })
            .collect::<String>()
    );
    for r in &rows {
        let _ = writeln!(md, "| {} |", r.join(" | "));
    }
    let failures: Vec<String> = points
        .iter()
        .filter(|p| p.metrics.failed > 0)
        .map(|p| {
            let by: Vec<String> = p
                .metrics
                .failures
                .iter()
                .map(|(s, n)| format!("{n} × `{s}`"))
                .collect();
            format!("{}: {}", p.label(setup.sweep), by.join(", "))
        })
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(md, "\nFailed requests: {}.", failures.join("; "));
    }
    let _ = writeln!(md, "\n**{}**\n", capacity_line(setup, points));
    let _ = writeln!(md, "## Latency summaries (ms)\n");
    let labels: Vec<String> = points.iter().map(|p| p.label(setup.sweep)).collect();
    let _ = writeln!(md, "| metric | {} |", labels.join(" | "));
    let _ = writeln!(md, "| --- |{}", " ---: |".repeat(points.len()));
    for (name, _) in LATENCIES {
        let ds: Vec<&Distribution> = points
            .iter()
            .map(|p| distribution(&p.metrics, name))
            .collect();
        let mut stat_rows: Vec<(String, Vec<f64>)> = vec![
            (
                format!("mean {name}"),
                ds.iter().map(|d| d.mean_ms).collect(),
            ),
            (
                format!("median {name}"),
                ds.iter().map(|d| d.median_ms).collect(),
            ),
            (format!("std {name}"), ds.iter().map(|d| d.std_ms).collect()),
        ];
        for (i, &p) in setup.percentiles.iter().enumerate() {
            stat_rows.push((
                format!("p{} {name}", percentile_name(p)),
                ds.iter()
                    .map(|d| d.percentiles.get(i).map_or(0.0, |x| x.1))
                    .collect(),
            ));
        }
        for (label, values) in stat_rows {
            let cells: Vec<String> = values.iter().map(|v| format!("{v:.2}")).collect();
            let _ = writeln!(md, "| {label} | {} |", cells.join(" | "));
        }
    }
    if !plots.is_empty() {
        let _ = writeln!(md, "\n## Plots\n");
        for (stem, title) in plots {
            let _ = writeln!(
                md,
                "### {title}\n\n![{title}]({stem}.png)\n\n[SVG]({stem}.svg) · [PNG]({stem}.png)\n"
            );
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::PromptForm;
    use crate::metrics::Metrics;
    use crate::record::{Chunk, Failure};

    fn setup(sweep: Sweep, slo: Option<Slo>) -> Setup {
        Setup {
            date: "20250101-000000".into(),
            target: TargetInfo {
                backend: "tessera",
                address: "127.0.0.1:50051".into(),
                model_id: "gpt2-tiny".into(),
                tp: Some(2),
                pp: Some(1),
                form: PromptForm::Text,
            },
            workload: WorkloadSpec {
                dataset: Dataset::Random,
                num_prompts: 2,
                input_len: 8,
                output_len: Some(3),
                range_ratio: 0.0,
                seed: 0,
            },
            burstiness: 1.0,
            ignore_eos: true,
            num_warmups: 0,
            repeats: 1,
            percentiles: vec![90.0, 99.9],
            slo,
            sweep,
        }
    }

    /// A point whose requests all have this TTFT and TPOT (three tokens each).
    fn point(rate: f64, ttft: f64, tpot: f64, fail: bool, slo: Option<&Slo>) -> PointResult {
        let mut records: Vec<RequestRecord> = (0..2)
            .map(|i| RequestRecord {
                input_len: 8,
                output_len: 3,
                start_s: i as f64 * 0.1,
                chunks: (0..3)
                    .map(|k| Chunk {
                        at_s: ttft + k as f64 * tpot,
                        tokens: 1,
                    })
                    .collect(),
                e2el_s: ttft + 2.0 * tpot,
                failure: None,
            })
            .collect();
        if fail {
            records[1].failure = Some(Failure::new("429", "busy"));
        }
        PointResult {
            request_rate: RequestRate::PerSecond(rate),
            max_concurrency: None,
            metrics: Metrics::compute(&records, &[90.0, 99.9], slo),
            records,
        }
    }

    #[test]
    fn json_has_vllms_keys_and_tesseras() {
        let s = setup(Sweep::Single, None);
        let p = point(2.0, 0.1, 0.02, true, None);
        let o = point_json(&s, &p, false);
        for key in [
            "date",
            "backend",
            "model_id",
            "num_prompts",
            "request_rate",
            "burstiness",
            "max_concurrency",
            "duration",
            "completed",
            "failed",
            "total_input_tokens",
            "total_output_tokens",
            "request_throughput",
            "request_goodput",
            "output_throughput",
            "total_token_throughput",
            "max_output_tokens_per_s",
            "max_concurrent_requests",
            "mean_ttft_ms",
            "median_tpot_ms",
            "std_itl_ms",
            "p90_e2el_ms",
            "p99.9_ttft_ms",
            "tp",
            "pp",
            "dataset_name",
            "input_len",
            "output_len",
            "range_ratio",
            "seed",
            "failures",
            "slo",
        ] {
            assert!(o.get(key).is_some(), "missing {key}");
        }
        assert!(
            o.get("p99_ttft_ms").is_none(),
            "only the percentiles asked for"
        );
        assert!(
            o.get("itls").is_none(),
            "per-request arrays only when detailed"
        );
        assert_eq!(o.get("request_rate"), Some(&json!(2.0)));
        assert_eq!(o.get("max_concurrency"), Some(&Value::Null));
        assert_eq!(o.get("request_goodput"), Some(&Value::Null));
        assert_eq!(o.get("failures"), Some(&json!({"429": 1})));
        assert_eq!(o.get("completed"), Some(&json!(1)));
        let v: Value =
            serde_json::from_str(&results_json(&s, std::slice::from_ref(&p), true)).unwrap();
        assert!(v.is_object());
        assert_eq!(v["itls"].as_array().unwrap().len(), 2);
        assert_eq!(v["itls"][0].as_array().unwrap().len(), 2);
        assert_eq!(v["errors"][1], "429: busy");
        assert_eq!(v["ttfts"][1], 0.0);
        let sweep = setup(Sweep::RequestRate, None);
        let v: Value = serde_json::from_str(&results_json(&sweep, &[p.clone(), p], false)).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2);
    }

    #[test]
    fn an_infinite_rate_is_the_string_inf() {
        let s = setup(Sweep::Single, Some(Slo::parse("ttft:200").unwrap()));
        let mut p = point(1.0, 0.1, 0.02, false, s.slo.as_ref());
        p.request_rate = RequestRate::Infinite;
        p.max_concurrency = Some(4);
        let o = point_json(&s, &p, false);
        assert_eq!(o.get("request_rate"), Some(&json!("inf")));
        assert_eq!(o.get("max_concurrency"), Some(&json!(4)));
        assert_eq!(o.get("slo"), Some(&json!({"ttft_ms": 200.0})));
        assert!(o.get("request_goodput").unwrap().as_f64().unwrap() > 0.0);
    }

    #[test]
    fn capacity_is_the_highest_point_meeting_the_slo_on_p99() {
        let slo = Slo::parse("ttft:150,tpot:30").unwrap();
        let s = setup(Sweep::RequestRate, Some(slo));
        let points = vec![
            point(8.0, 0.12, 0.04, false, Some(&slo)), // TPOT 40 ms misses
            point(1.0, 0.05, 0.01, false, Some(&slo)),
            point(4.0, 0.10, 0.02, false, Some(&slo)),
        ];
        let line = capacity_line(&s, &points);
        assert!(
            line.starts_with("Capacity: 4 req/s is the highest request rate"),
            "{line}"
        );
        assert!(
            line.contains("at 8 req/s, p99 TPOT is 40.0 ms > 30 ms"),
            "{line}"
        );

        let failing = vec![
            point(1.0, 0.05, 0.01, false, Some(&slo)),
            point(2.0, 0.05, 0.01, true, Some(&slo)),
        ];
        let line = capacity_line(&s, &failing);
        assert!(
            line.contains("at 2 req/s, 1 of its requests failed"),
            "{line}"
        );

        let none = vec![point(1.0, 0.5, 0.01, false, Some(&slo))];
        let line = capacity_line(&setup(Sweep::Single, Some(slo)), &none);
        assert!(
            line.contains("does not meet") && line.contains("p99 TTFT is 500.0 ms"),
            "{line}"
        );

        let all = vec![
            point(1.0, 0.05, 0.01, false, Some(&slo)),
            point(2.0, 0.05, 0.01, false, Some(&slo)),
        ];
        assert!(capacity_line(&s, &all).contains("every request rate tried meets"));

        let line = capacity_line(&setup(Sweep::RequestRate, None), &points);
        assert!(line.contains("no SLO was given"), "{line}");
    }

    #[test]
    fn console_and_markdown_show_every_point() {
        let slo = Slo::parse("tpot:30").unwrap();
        let s = setup(Sweep::RequestRate, Some(slo));
        let points = vec![
            point(1.0, 0.05, 0.01, false, Some(&slo)),
            point(2.0, 0.05, 0.01, true, Some(&slo)),
        ];
        let c = console_point(&s, &points[1]);
        assert!(
            c.contains("Failed requests:") && c.contains("failed with 429:"),
            "{c}"
        );
        assert!(
            c.contains("P99.9 TTFT (ms):") && c.contains("Request goodput (req/s):"),
            "{c}"
        );
        let t = console_sweep(&s, &points);
        assert_eq!(t.lines().count(), 3);
        assert!(t.lines().nth(2).unwrap().starts_with("2 req/s"), "{t}");
        let md = markdown(
            &s,
            &points,
            &[("latency_throughput", "Latency vs throughput")],
        );
        assert!(md.contains("| point | done |"), "{md}");
        assert!(md.contains("![Latency vs throughput](latency_throughput.png)"));
        assert!(md.contains("**Capacity: 1 req/s is the highest"), "{md}");
        assert!(md.contains("| p99.9 ttft |"), "{md}");
    }

    #[test]
    fn dates_are_utc_stamps() {
        assert_eq!(stamp_of(0), "19700101-000000");
        // 2024-02-29 12:34:56 UTC.
        assert_eq!(stamp_of(1_709_210_096), "20240229-123456");
        assert_eq!(date_stamp().len(), 15);
    }
}
