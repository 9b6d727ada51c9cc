//! What `tessera gpu-check` found: checks (pass or fail, with their error), timings
//! (measured against a floor), the time each section took, and the short table printed
//! last. Serialisable, so the same record is written as JSON.

use std::fmt::Write as _;

use serde::Serialize;

use super::floors::{Bound, Ceilings, Work};

/// One correctness check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// Section of the run: `ops`, `gpt2`, `nccl`, …
    pub section: String,
    /// What was checked, with its shape.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// The measured error (relative ‖gpu − cpu‖ / ‖cpu‖ unless `detail` says otherwise).
    pub error: Option<f64>,
    /// The largest error that passes.
    pub tolerance: Option<f64>,
    /// Anything else worth reading: why it failed, what else was measured.
    pub detail: String,
}

/// One timing against its floor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timing {
    /// Section of the run: `kernels`, `decode`, `prefill`.
    pub section: String,
    /// What was timed, with its shape.
    pub name: String,
    /// Median over the timed repeats, in milliseconds; `None` when it could not run.
    pub measured_ms: Option<f64>,
    /// Fastest repeat, in milliseconds.
    pub min_ms: Option<f64>,
    /// The floor in milliseconds (`None` before the ceilings were measured).
    pub floor_ms: Option<f64>,
    /// Which ceiling sets the floor.
    pub bound: Option<Bound>,
    /// Bytes and FLOPs the floor is computed from.
    pub work: Work,
    /// The ratio measured ÷ floor the project aims for, where it has one.
    pub target_ratio: Option<f64>,
    /// Repeats timed.
    pub repeats: usize,
    /// Why it could not run, or what else was measured.
    pub detail: String,
}

impl Timing {
    /// A timing of `work` not measured yet, with its floor under `ceilings`.
    pub fn new(section: &str, name: String, work: Work, ceilings: Option<&Ceilings>) -> Self {
        let floor = ceilings.map(|c| work.floor_s(c));
        Timing {
            section: section.to_string(),
            name,
            measured_ms: None,
            min_ms: None,
            floor_ms: floor.map(|(s, _)| s * 1e3),
            bound: floor.map(|(_, b)| b),
            work,
            target_ratio: None,
            repeats: 0,
            detail: String::new(),
        }
    }

    /// Measured ÷ floor.
    pub fn ratio(&self) -> Option<f64> {
        match (self.measured_ms, self.floor_ms) {
            (Some(m), Some(f)) if f > 0.0 => Some(m / f),
            _ => None,
        }
    }

    /// Whether the target ratio was met; `None` without a target or a measurement.
    pub fn target_met(&self) -> Option<bool> {
        Some(self.ratio()? <= self.target_ratio?)
    }
}

/// How one section of the run went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Section {
    /// Its name.
    pub name: String,
    /// Wall-clock seconds it took.
    pub elapsed_s: f64,
    /// Why it stopped early, if it did.
    pub error: Option<String>,
}

/// Everything a run found.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Report {
    /// The GPU, as the probe describes it.
    pub device: Option<String>,
    /// The measured ceilings.
    pub ceilings: Option<Ceilings>,
    /// Copy bandwidth split as the copy moved it: bytes read per second (half the
    /// read+write rate).
    pub copy_read_bytes_per_s: Option<f64>,
    /// Correctness checks, in run order.
    pub checks: Vec<Check>,
    /// Timings, in run order.
    pub timings: Vec<Timing>,
    /// Sections, in run order.
    pub sections: Vec<Section>,
    /// Facts a reader of the numbers needs (what was not run, and why).
    pub notes: Vec<String>,
    /// Wall-clock seconds of the whole run.
    pub total_s: f64,
}

impl Report {
    /// Checks that failed, plus timings and sections that could not run: a run with any
    /// of them exits non-zero.
    pub fn failures(&self) -> usize {
        self.checks.iter().filter(|c| !c.passed).count()
            + self
                .timings
                .iter()
                .filter(|t| t.measured_ms.is_none())
                .count()
            + self.sections.iter().filter(|s| s.error.is_some()).count()
    }

    /// The short table printed last.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "== tessera gpu-check: {} ==",
            self.device.as_deref().unwrap_or("no device")
        );
        match &self.ceilings {
            Some(c) => {
                let _ = writeln!(
                    out,
                    "ceilings: copy {:.0} GB/s read+write ({:.0} GB/s read, as copied), \
                     bf16 GEMM {:.0} TFLOP/s",
                    c.memory_bytes_per_s / 1e9,
                    self.copy_read_bytes_per_s
                        .unwrap_or(c.memory_bytes_per_s / 2.0)
                        / 1e9,
                    c.matrix_flops_per_s / 1e12
                );
            }
            None => out.push_str("ceilings: not measured, so no floors\n"),
        }
        if !self.checks.is_empty() {
            let (names, w) = labels(
                self.checks
                    .iter()
                    .map(|c| (c.section.as_str(), c.name.as_str())),
            );
            let _ = writeln!(
                out,
                "{:<w$}  {:<6} {:>9} {:>9}",
                "check", "result", "error", "tolerance"
            );
            for (c, name) in self.checks.iter().zip(&names) {
                let _ = write!(
                    out,
                    "{:<w$}  {:<6} {:>9} {:>9}",
                    name,
                    if c.passed { "pass" } else { "FAIL" },
                    sci(c.error),
                    sci(c.tolerance)
                );
                if !c.passed && !c.detail.is_empty() {
                    let _ = write!(out, "  {}", first_line(&c.detail));
                }
                out.push('\n');
            }
        }
        if !self.timings.is_empty() {
            let (names, w) = self.timing_labels();
            let _ = writeln!(
                out,
                "{:<w$}  {:>11} {:>11} {:>7}  {:<7}",
                "timing", "measured", "floor", "ratio", "bound"
            );
            for (t, name) in self.timings.iter().zip(&names) {
                let _ = write!(
                    out,
                    "{:<w$}  {:>11} {:>11} {:>7}  {:<7}",
                    name,
                    ms(t.measured_ms),
                    ms(t.floor_ms),
                    t.ratio().map_or("-".to_string(), |r| format!("{r:.2}x")),
                    t.bound.map_or("-".to_string(), |b| b.to_string()),
                );
                match (t.target_ratio, t.target_met()) {
                    (Some(target), Some(met)) => {
                        let _ = write!(
                            out,
                            "  target <= {target:.2}x {}",
                            if met { "met" } else { "MISSED" }
                        );
                    }
                    (Some(target), None) => {
                        let _ = write!(out, "  target <= {target:.2}x not measured");
                    }
                    _ => {}
                }
                if t.measured_ms.is_none() && !t.detail.is_empty() {
                    let _ = write!(out, "  {}", first_line(&t.detail));
                }
                out.push('\n');
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        let sections: Vec<String> = self
            .sections
            .iter()
            .map(|s| {
                format!(
                    "{} {:.1} s{}",
                    s.name,
                    s.elapsed_s,
                    if s.error.is_some() { " (stopped)" } else { "" }
                )
            })
            .collect();
        if !sections.is_empty() {
            let _ = writeln!(out, "sections: {}", sections.join(", "));
        }
        let failures = self.failures();
        let _ = writeln!(
            out,
            "{} checks, {} timings: {} ({:.1} s)",
            self.checks.len(),
            self.timings.len(),
            if failures == 0 {
                "all passed".to_string()
            } else {
                format!("{failures} FAILED")
            },
            self.total_s
        );
        trim_lines(&out)
    }
}

impl Report {
    /// The timings' `section/name` labels and their column width.
    fn timing_labels(&self) -> (Vec<String>, usize) {
        labels(
            self.timings
                .iter()
                .map(|t| (t.section.as_str(), t.name.as_str())),
        )
    }

    /// The work behind each timing: bytes, FLOPs and (given ceilings) the floor; what
    /// `--dry-run` prints.
    pub fn work_table(&self) -> String {
        let mut out = String::new();
        let (names, w) = self.timing_labels();
        let _ = writeln!(
            out,
            "{:<w$}  {:>12} {:>12} {:>11}  {:<7}",
            "timing", "GB moved", "GFLOP", "floor", "bound"
        );
        for (t, name) in self.timings.iter().zip(&names) {
            let _ = writeln!(
                out,
                "{:<w$}  {:>12.4} {:>12.1} {:>11}  {:<7}",
                name,
                t.work.bytes / 1e9,
                t.work.flops / 1e9,
                ms(t.floor_ms),
                t.bound.map_or("-".to_string(), |b| b.to_string()),
            );
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        trim_lines(&out)
    }
}

/// `s` without the padding its last columns leave at the ends of lines.
fn trim_lines(s: &str) -> String {
    s.lines().map(|l| format!("{}\n", l.trim_end())).collect()
}

/// `section/name` of each row, and the width of a column that fits them (10 to 60).
fn labels<'a>(rows: impl Iterator<Item = (&'a str, &'a str)>) -> (Vec<String>, usize) {
    let names: Vec<String> = rows.map(|(s, n)| format!("{s}/{n}")).collect();
    let width = names
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(0)
        .clamp(10, 60);
    (names, width)
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

fn sci(v: Option<f64>) -> String {
    match v {
        Some(0.0) => "0".to_string(),
        Some(v) if v.is_finite() => format!("{v:.2e}"),
        Some(v) => v.to_string(),
        None => "-".to_string(),
    }
}

/// Milliseconds with three significant figures, or microseconds under 0.1 ms.
fn ms(v: Option<f64>) -> String {
    match v {
        None => "-".to_string(),
        Some(v) if v < 0.1 => format!("{:.1} us", v * 1e3),
        Some(v) if v < 10.0 => format!("{v:.3} ms"),
        Some(v) if v < 100.0 => format!("{v:.2} ms"),
        Some(v) => format!("{v:.1} ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ceilings() -> Ceilings {
        Ceilings {
            memory_bytes_per_s: 4.0e12,
            matrix_flops_per_s: 800.0e12,
        }
    }

    fn report() -> Report {
        let c = ceilings();
        let mut decode = Timing::new(
            "decode",
            "batch 1".into(),
            Work::new(40.0e9, 1.0e9),
            Some(&c),
        );
        decode.measured_ms = Some(12.5);
        decode.target_ratio = Some(1.25);
        let mut missing = Timing::new(
            "prefill",
            "2048 tokens".into(),
            Work::new(0.0, 8.0e13),
            Some(&c),
        );
        missing.detail = "out of memory\nsecond line".into();
        Report {
            device: Some("cuda:0 NVIDIA H200 (sm_90)".into()),
            ceilings: Some(c),
            copy_read_bytes_per_s: Some(2.0e12),
            checks: vec![
                Check {
                    section: "ops".into(),
                    name: "layer_norm 37x1000".into(),
                    passed: true,
                    error: Some(2.5e-3),
                    tolerance: Some(1e-2),
                    detail: String::new(),
                },
                Check {
                    section: "gpt2".into(),
                    name: "prefill logits".into(),
                    passed: false,
                    error: Some(0.5),
                    tolerance: Some(5e-2),
                    detail: "top-1 agreement 3/8".into(),
                },
            ],
            timings: vec![decode, missing],
            sections: vec![Section {
                name: "ops".into(),
                elapsed_s: 1.25,
                error: None,
            }],
            notes: vec!["collectives are world-1 no-ops".into()],
            total_s: 3.0,
        }
    }

    #[test]
    fn the_table_shows_every_check_and_timing_with_its_ratio() {
        let r = report();
        let t = r.table();
        assert!(t.contains("NVIDIA H200"), "{t}");
        assert!(t.contains("4000 GB/s read+write (2000 GB/s read"), "{t}");
        assert!(t.contains("800 TFLOP/s"), "{t}");
        let ln = t.lines().find(|l| l.contains("ops/layer_norm")).unwrap();
        assert!(ln.contains("pass") && ln.contains("2.50e-3"), "{ln}");
        let bad = t.lines().find(|l| l.contains("gpt2/prefill")).unwrap();
        assert!(
            bad.contains("FAIL") && bad.contains("top-1 agreement 3/8"),
            "{bad}"
        );
        // 40 GB over 4 TB/s is 10 ms; 12.5 ms is 1.25x: the target is met.
        let d = t.lines().find(|l| l.contains("decode/batch 1")).unwrap();
        assert!(d.contains("12.50 ms") && d.contains("10.00 ms"), "{d}");
        assert!(
            d.contains("1.25x") && d.contains("memory") && d.contains("met"),
            "{d}"
        );
        let p = t.lines().find(|l| l.contains("prefill/2048")).unwrap();
        assert!(p.contains("100.0 ms") && p.contains("compute"), "{p}");
        assert!(
            p.contains("out of memory") && !p.contains("second line"),
            "{p}"
        );
        assert!(t.contains("note: collectives are world-1 no-ops"), "{t}");
        assert!(t.contains("sections: ops 1.2 s"), "{t}");
        // One failed check and one timing that did not run.
        assert_eq!(r.failures(), 2);
        assert!(
            t.trim_end()
                .ends_with("2 checks, 2 timings: 2 FAILED (3.0 s)"),
            "{t}"
        );
    }

    #[test]
    fn a_missed_target_says_so_and_no_ceilings_means_no_floor() {
        let mut r = report();
        r.timings[0].measured_ms = Some(13.0);
        assert_eq!(r.timings[0].target_met(), Some(false));
        assert!(r.table().contains("MISSED"));
        let t = Timing::new("kernels", "gelu".into(), Work::new(1.0, 0.0), None);
        assert_eq!(t.floor_ms, None);
        assert_eq!(t.ratio(), None);
        let empty = Report::default();
        assert!(empty.table().contains("ceilings: not measured"));
        assert_eq!(empty.failures(), 0);
    }

    #[test]
    fn the_work_table_lists_bytes_flops_and_floors() {
        let t = report().work_table();
        let d = t.lines().find(|l| l.contains("decode/batch 1")).unwrap();
        assert!(
            d.contains("40.0000") && d.contains("1.0") && d.contains("10.00 ms"),
            "{d}"
        );
    }

    #[test]
    fn the_report_is_json() {
        let v: serde_json::Value = serde_json::to_value(report()).unwrap();
        assert_eq!(v["timings"][0]["bound"], "memory");
        assert_eq!(v["checks"][1]["passed"], false);
    }
}
