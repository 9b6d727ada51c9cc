//! The report's plots, each written as PNG and SVG with `plotters`: latency against
//! output throughput across a sweep, and the TTFT and TPOT distributions (CDFs).
//!
//! PNG text is drawn with the DejaVu Sans font embedded in the binary
//! (`assets/DejaVuSans.ttf`), so plots render the same on a machine with no fonts and no
//! fontconfig; SVG text is left to the viewer's sans-serif font.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::register_font;

use crate::report::{PointResult, Sweep};
use crate::BenchError;

const FONT: &str = "sans-serif";
const DEJAVU_SANS: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Series colours, one per point, cycling past ten.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
];

/// The plots written, as (file stem, title).
pub const PLOTS: [(&str, &str); 3] = [
    ("latency_throughput", "Latency vs output throughput"),
    ("ttft_distribution", "TTFT distribution"),
    ("tpot_distribution", "TPOT distribution"),
];

fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is ours and valid; were it not, text would be missing, not the plot.
        let _ = register_font(FONT, FontStyle::Normal, DEJAVU_SANS);
    });
}

/// Writes every plot of [`PLOTS`] into `dir` as `.png` and `.svg`; returns the files.
pub fn write_plots(
    dir: &Path,
    title: &str,
    points: &[PointResult],
    sweep: Sweep,
) -> Result<Vec<PathBuf>, BenchError> {
    register();
    let figures: [(&str, Figure); 3] = [
        (PLOTS[0].0, Figure::LatencyThroughput),
        (PLOTS[1].0, Figure::Cdf(Metric::Ttft)),
        (PLOTS[2].0, Figure::Cdf(Metric::Tpot)),
    ];
    let mut written = Vec::new();
    for (stem, figure) in figures {
        let size = figure.size();
        let png = dir.join(format!("{stem}.png"));
        let svg = dir.join(format!("{stem}.svg"));
        let failed = |path: &Path, e: String| BenchError::Output {
            path: path.to_path_buf(),
            reason: e,
        };
        {
            let root = BitMapBackend::new(&png, size).into_drawing_area();
            figure
                .draw(&root, title, points, sweep)
                .and_then(|()| root.present().map_err(|e| e.to_string()))
                .map_err(|e| failed(&png, e))?;
        }
        {
            let root = SVGBackend::new(&svg, size).into_drawing_area();
            figure
                .draw(&root, title, points, sweep)
                .and_then(|()| root.present().map_err(|e| e.to_string()))
                .map_err(|e| failed(&svg, e))?;
        }
        written.push(png);
        written.push(svg);
    }
    Ok(written)
}

#[derive(Clone, Copy)]
enum Metric {
    Ttft,
    Tpot,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::Ttft => "TTFT",
            Metric::Tpot => "TPOT",
        }
    }

    /// The metric's values in ms, one per completed request that has it.
    fn values_ms(self, p: &PointResult) -> Vec<f64> {
        p.records
            .iter()
            .filter(|r| r.ok())
            .filter_map(|r| match self {
                Metric::Ttft => r.ttft_s(),
                Metric::Tpot => r.tpot_s(),
            })
            .map(|v| v * 1e3)
            .collect()
    }

    /// (median, p99) in ms.
    fn summary(self, p: &PointResult) -> (f64, f64) {
        let d = match self {
            Metric::Ttft => &p.metrics.ttft,
            Metric::Tpot => &p.metrics.tpot,
        };
        (d.median_ms, d.p99_ms)
    }
}

enum Figure {
    LatencyThroughput,
    Cdf(Metric),
}

type Area<DB> = DrawingArea<DB, Shift>;

fn text_err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// A tick label with as many decimals as an axis reaching `max` needs.
fn tick(v: f64, max: f64) -> String {
    match max {
        m if m >= 20.0 => format!("{v:.0}"),
        m if m >= 2.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

impl Figure {
    fn size(&self) -> (u32, u32) {
        match self {
            Figure::LatencyThroughput => (1400, 600),
            Figure::Cdf(_) => (900, 600),
        }
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &Area<DB>,
        title: &str,
        points: &[PointResult],
        sweep: Sweep,
    ) -> Result<(), String> {
        root.fill(&WHITE).map_err(text_err)?;
        match self {
            Figure::LatencyThroughput => {
                let root = root
                    .titled(
                        &format!("Latency vs output throughput — {title}"),
                        (FONT, 26),
                    )
                    .map_err(text_err)?;
                let (left, right) = root.split_horizontally(root.dim_in_pixel().0 / 2);
                latency_panel(&left, Metric::Ttft, points, sweep)?;
                latency_panel(&right, Metric::Tpot, points, sweep)
            }
            Figure::Cdf(metric) => cdf(root, *metric, title, points, sweep),
        }
    }
}

/// One latency (median and p99) against output throughput, a marker per point labelled
/// with the point's rate or concurrency.
fn latency_panel<DB: DrawingBackend>(
    area: &Area<DB>,
    metric: Metric,
    points: &[PointResult],
    sweep: Sweep,
) -> Result<(), String> {
    let xs: Vec<f64> = points.iter().map(|p| p.metrics.output_throughput).collect();
    let sums: Vec<(f64, f64)> = points.iter().map(|p| metric.summary(p)).collect();
    // Room on the right for the last point's label.
    let x_max = xs.iter().copied().fold(0.0, f64::max).max(1e-3) * 1.3;
    let y_max = sums
        .iter()
        .map(|s| s.1.max(s.0))
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{} (median and p99)", metric.name()), (FONT, 20))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(text_err)?;
    chart
        .configure_mesh()
        .x_desc("output throughput (tokens/s)")
        .y_desc(format!("{} (ms)", metric.name()))
        .x_label_formatter(&|v| tick(*v, x_max))
        .y_label_formatter(&|v| tick(*v, y_max))
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 13))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(text_err)?;
    let series = [("median", COLORS[0], false), ("p99", COLORS[1], true)];
    for (name, color, is_p99) in series {
        let pts: Vec<(f64, f64)> = xs
            .iter()
            .zip(&sums)
            .map(|(&x, s)| (x, if is_p99 { s.1 } else { s.0 }))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(text_err)?
            .label(format!("{} {name}", metric.name()))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        if is_p99 {
            chart
                .draw_series(
                    pts.iter()
                        .map(|&c| TriangleMarker::new(c, 7, color.filled())),
                )
                .map_err(text_err)?;
        } else {
            chart
                .draw_series(pts.iter().map(|&c| Circle::new(c, 6, color.filled())))
                .map_err(text_err)?;
        }
    }
    // Each point's label beside its p99 marker, which is the higher of the two.
    chart
        .draw_series(points.iter().zip(xs.iter().zip(&sums)).map(|(p, (&x, s))| {
            EmptyElement::at((x, s.1)) + Text::new(p.label(sweep), (8, -18), (FONT, 14).into_font())
        }))
        .map_err(text_err)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(text_err)
}

/// The cumulative distribution of one latency, a line per point.
fn cdf<DB: DrawingBackend>(
    root: &Area<DB>,
    metric: Metric,
    title: &str,
    points: &[PointResult],
    sweep: Sweep,
) -> Result<(), String> {
    let values: Vec<Vec<f64>> = points
        .iter()
        .map(|p| {
            let mut v = metric.values_ms(p);
            v.sort_by(f64::total_cmp);
            v
        })
        .collect();
    let x_max = values
        .iter()
        .flatten()
        .copied()
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.05;
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!("{} distribution — {title}", metric.name()),
            (FONT, 22),
        )
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max, 0.0..1.02)
        .map_err(text_err)?;
    chart
        .configure_mesh()
        .x_desc(format!("{} (ms)", metric.name()))
        .y_desc("fraction of requests ≤ x")
        .x_label_formatter(&|v| tick(*v, x_max))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 13))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(text_err)?;
    for (i, (p, v)) in points.iter().zip(&values).enumerate() {
        let color = COLORS[i % COLORS.len()];
        let n = v.len() as f64;
        // A step per request: up by 1/n at each value.
        let steps: Vec<(f64, f64)> = v
            .iter()
            .enumerate()
            .flat_map(|(k, &x)| [(x, k as f64 / n), (x, (k + 1) as f64 / n)])
            .collect();
        chart
            .draw_series(LineSeries::new(steps, color.stroke_width(2)))
            .map_err(text_err)?
            .label(format!("{} ({} requests)", p.label(sweep), v.len()))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(text_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arrival::RequestRate;
    use crate::metrics::Metrics;
    use crate::record::{Chunk, RequestRecord};

    fn point(rate: f64, ttft: f64, tpot: f64) -> PointResult {
        let records: Vec<RequestRecord> = (0..20)
            .map(|i| {
                let ttft = ttft * (1.0 + i as f64 / 20.0);
                RequestRecord {
                    input_len: 8,
                    output_len: 4,
                    start_s: i as f64 / rate,
                    chunks: (0..4)
                        .map(|k| Chunk {
                            at_s: ttft + k as f64 * tpot,
                            tokens: 1,
                        })
                        .collect(),
                    e2el_s: ttft + 3.0 * tpot,
                    failure: None,
                }
            })
            .collect();
        PointResult {
            request_rate: RequestRate::PerSecond(rate),
            max_concurrency: None,
            metrics: Metrics::compute(&records, &[99.0], None),
            records,
        }
    }

    #[test]
    fn every_plot_is_written_as_png_and_svg() {
        let dir = std::env::temp_dir().join(format!("tessera-plots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let points = [
            point(1.0, 0.05, 0.01),
            point(4.0, 0.08, 0.015),
            point(16.0, 0.3, 0.04),
        ];
        let files = write_plots(&dir, "gpt2-tiny (tessera)", &points, Sweep::RequestRate).unwrap();
        assert_eq!(files.len(), 6);
        for (stem, _) in PLOTS {
            let png = std::fs::read(dir.join(format!("{stem}.png"))).unwrap();
            assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{stem}.png is a PNG");
            let svg = std::fs::read_to_string(dir.join(format!("{stem}.svg"))).unwrap();
            assert!(svg.starts_with("<svg"), "{stem}.svg is an SVG");
            assert!(svg.contains("(ms)"), "{stem}.svg has its axis labels");
        }
        let svg = std::fs::read_to_string(dir.join("latency_throughput.svg")).unwrap();
        assert!(
            svg.contains("16 req/s") && svg.contains("TPOT p99"),
            "labels and legend"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
