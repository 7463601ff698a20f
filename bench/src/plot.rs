//! The SVG plots of `embar bench --plot DIR` (plotters, its SVG backend only): the latency
//! percentile distribution on log scales, throughput over time, and one ORDER against another.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::{BenchError, BenchResult};

/// One line of a plot: `(x, y)` points.
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed, in the colour of the curve before it (a second figure of one run).
    pub dashed: bool,
}

/// Grouped bars: `runs[r][s]` is series `s` of run `r`.
pub struct Bars {
    pub series: Vec<String>,
    pub runs: Vec<Vec<f64>>,
}

const SIZE: (u32, u32) = (1024, 640);
/// The latency plot's x axis ends at this many nines past the run's count of samples.
const ONE_IN_MAX: f64 = 1e7;

fn fail(path: &Path) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> BenchError + '_ {
    move |e| BenchError::Plot {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Calls `draw` on a white SVG canvas at `path` and writes it.
fn svg(
    path: &Path,
    draw: impl FnOnce(
        &DrawingArea<SVGBackend<'_>, Shift>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> BenchResult<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(path)(e.into()))?;
    draw(&root).map_err(fail(path))?;
    root.present().map_err(|e| fail(path)(e.into()))
}

/// The latency distribution as HdrHistogram plots it: x is `1 / (1 - quantile)` (so 90%, 99%,
/// 99.9% are evenly spaced), y the latency in microseconds.
pub fn percentile_points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let top = (h.len() as f64).clamp(10.0, ONE_IN_MAX);
    let mut out: Vec<(f64, f64)> = h
        .iter_quantiles(5)
        .map(|v| {
            let q = v.quantile_iterated_to();
            let x = if q >= 1.0 {
                top
            } else {
                (1.0 / (1.0 - q)).min(top)
            };
            (x, (v.value_iterated_to() as f64 / 1e3).max(1e-3))
        })
        .collect();
    out.dedup_by(|b, a| a.0 >= b.0);
    out
}

/// `1 / (1 - q)` as a percentile label: 1 is 0%, 10 is 90%, 1000 is 99.9%.
fn percentile_label(x: f64) -> String {
    let pct = 100.0 * (1.0 - 1.0 / x.max(1.0));
    let decimals = ((x.max(1.0).log10() - 1e-9).ceil() as i64 - 2).max(0) as usize;
    format!("{pct:.decimals$}%")
}

fn colour(i: usize) -> RGBAColor {
    Palette99::pick(i).to_rgba()
}

/// Latency percentile distributions on log scales.
pub fn latency_percentiles(path: &Path, curves: &[Curve]) -> BenchResult<()> {
    let all = || curves.iter().flat_map(|c| c.points.iter());
    let x_max = all().map(|p| p.0).fold(10.0, f64::max);
    let y_min = all().map(|p| p.1).fold(f64::MAX, f64::min);
    let y_max = all().map(|p| p.1).fold(0.0, f64::max);
    let (y_min, y_max) = if y_max > 0.0 {
        (
            10f64.powf(y_min.log10().floor()),
            10f64.powf(y_max.log10().ceil()).max(y_min * 10.0),
        )
    } else {
        (1.0, 10.0)
    };
    svg(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                "latency by percentile (solid: publish-to-ack, dashed: publish-to-deliver)",
                ("sans-serif", 20),
            )
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((1f64..x_max).log_scale(), (y_min..y_max).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (us)")
            .x_label_formatter(&|x| percentile_label(*x))
            .y_label_formatter(&|y| format!("{y}"))
            .draw()?;
        draw_curves(&mut chart, curves)?;
        Ok(())
    })
}

/// Throughput delivered over the run, one line a run.
pub fn throughput_over_time(path: &Path, curves: &[Curve]) -> BenchResult<()> {
    let all = || curves.iter().flat_map(|c| c.points.iter());
    let x_max = all().map(|p| p.0).fold(0.1, f64::max);
    let y_max = all().map(|p| p.1).fold(0.1, f64::max) * 1.1;
    svg(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                "throughput delivered to each subscriber over the run",
                ("sans-serif", 20),
            )
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the subscribers opened")
            .y_desc("GB/s (100 ms intervals)")
            .draw()?;
        draw_curves(&mut chart, curves)?;
        Ok(())
    })
}

type Chart<'a, 'b, X, Y> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<X, Y>>;

fn draw_curves<'a, 'b: 'a, X, Y>(
    chart: &mut Chart<'a, 'b, X, Y>,
    curves: &[Curve],
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let mut c = 0;
    for (i, curve) in curves.iter().enumerate() {
        if i > 0 && !curve.dashed {
            c += 1;
        }
        if curve.points.is_empty() {
            continue;
        }
        let style = ShapeStyle {
            color: colour(c),
            filled: false,
            stroke_width: 2,
        };
        let pts = curve.points.clone();
        let drawn = if curve.dashed {
            chart.draw_series(DashedLineSeries::new(pts, 8, 5, style))?
        } else {
            chart.draw_series(LineSeries::new(pts, style))?
        };
        let dashed = curve.dashed;
        drawn.label(curve.label.as_str()).legend(move |(x, y)| {
            if dashed {
                PathElement::new(vec![(x, y), (x + 8, y)], style)
            } else {
                PathElement::new(vec![(x, y), (x + 20, y)], style)
            }
        });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Throughput of each ORDER (and the same run's memcpy) side by side, a group a run.
pub fn order_comparison(path: &Path, bars: &Bars) -> BenchResult<()> {
    let runs = bars.runs.len().max(1);
    let y_max = bars.runs.iter().flatten().copied().fold(0.1, f64::max) * 1.15;
    let width = 0.8 / bars.series.len().max(1) as f64;
    svg(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("throughput by ORDER, each run", ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.5f64..runs as f64 + 0.5, 0f64..y_max)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(runs + 1)
            .x_label_formatter(&|x| {
                if (x - x.round()).abs() < 1e-6 && *x >= 1.0 {
                    format!("run {}", x.round())
                } else {
                    String::new()
                }
            })
            .y_desc("GB/s")
            .draw()?;
        for (s, name) in bars.series.iter().enumerate() {
            let fill = colour(s).filled();
            chart
                .draw_series(bars.runs.iter().enumerate().map(|(r, v)| {
                    let x0 = r as f64 + 1.0 - 0.4 + s as f64 * width;
                    Rectangle::new(
                        [
                            (x0, 0.0),
                            (x0 + width * 0.9, v.get(s).copied().unwrap_or(0.0)),
                        ],
                        fill,
                    )
                }))?
                .label(name.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], fill));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_labels_name_the_nines() {
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(percentile_label(10.0), "90%");
        assert_eq!(percentile_label(100.0), "99%");
        assert_eq!(percentile_label(1000.0), "99.9%");
        assert_eq!(percentile_label(200.0), "99.5%");
    }

    #[test]
    fn percentile_points_rise_and_end_at_the_max() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        for v in 1..=10_000u64 {
            h.record(v * 1000).unwrap();
        }
        let p = percentile_points(&h);
        assert!(p.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        let last = p.last().unwrap();
        assert!((last.1 - h.max() as f64 / 1e3).abs() < 1e-9);
    }
}
