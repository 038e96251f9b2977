//! The report's figures, drawn with plotters into memory and written atomically as PNG: FID
//! against trainable parameters (log x, each run's FID and the mean with its 95% interval), step
//! time relative to full fine-tuning, training-loss curves, and (in [`study`]) the learning-rate
//! search and FID along the budget.
pub mod study;

use super::report::{StudyResults, BASE_ROW};
use crate::util::fs::write_atomic;
use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// Figure size in pixels.
const SIZE: (u32, u32) = (960, 600);
/// The family every label is drawn in; registered once from the embedded font.
const FONT: &str = "sans-serif";

/// DejaVu Sans, subset to Latin-1 and a few symbols (assets/fonts/README.md says how and why).
static FONT_BYTES: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans-subset.ttf");

/// plotters' ab_glyph backend draws text only with fonts registered at runtime.
pub fn register_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    if !ok {
        bail!("the embedded plot font could not be parsed");
    }
    Ok(())
}

/// One colour per method, stable across figures: the base row grey, then a qualitative palette
/// in row order (ten colours: every registered method gets its own).
pub fn method_color(index: usize, method: &str) -> RGBColor {
    const PALETTE: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
        RGBColor(174, 199, 232),
    ];
    if method == BASE_ROW {
        RGBColor(127, 127, 127)
    } else {
        PALETTE[index % PALETTE.len()]
    }
}

/// Renders `draw` on a white canvas of `SIZE` and writes it to `path` as PNG.
pub(super) fn render_png(
    path: &Path,
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    register_font()?;
    let (w, h) = SIZE;
    let mut pixels = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        draw(&root)?;
        root.present().map_err(plot_error)?;
    }
    let image = image::RgbImage::from_raw(w, h, pixels)
        .ok_or_else(|| anyhow!("plot buffer has the wrong size"))?;
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .context("encoding a plot as PNG")?;
    write_atomic(path, &png).with_context(|| format!("writing plot {}", path.display()))
}

pub(super) fn plot_error<E: std::error::Error + Send + Sync + 'static>(
    e: DrawingAreaErrorKind<E>,
) -> anyhow::Error {
    anyhow!("drawing a plot: {e}")
}

/// A method's point in the FID plot.
struct FidPoint<'a> {
    /// Its row in the results (for its colour).
    index: usize,
    method: &'a str,
    label: &'a str,
    params: f64,
    fid: f64,
    /// The FID's 95% interval (the bootstrap's).
    interval: (f64, f64),
    /// Each run's FID.
    runs: Vec<f64>,
}

/// The methods with a finite FID and a parameter count.
fn fid_points(results: &StudyResults) -> Vec<FidPoint<'_>> {
    results
        .rows
        .iter()
        .enumerate()
        .filter_map(|(index, r)| {
            r.trainable_params.map(|n| FidPoint {
                index,
                method: &r.method,
                label: &r.label,
                params: n.max(1) as f64,
                fid: r.fid,
                interval: interval_or_point(r.fid, r.fid_uncertainty.low, r.fid_uncertainty.high),
                runs: r
                    .runs
                    .iter()
                    .map(|run| run.fid)
                    .filter(|f| f.is_finite())
                    .collect(),
            })
        })
        .filter(|p| p.fid.is_finite())
        .collect()
}

/// The interval `[low, high]` around `value`, or the point itself when the interval is not
/// finite (a score without a bootstrap).
pub(super) fn interval_or_point(value: f64, low: f64, high: f64) -> (f64, f64) {
    match low.is_finite() && high.is_finite() {
        true => (low.min(value), high.max(value)),
        false => (value, value),
    }
}

/// The smallest and largest of `values`.
pub(super) fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// FID of each method against its trainable parameters on a log axis: each run's FID as a small
/// ring, the mean over runs as a dot with its 95% interval as an error bar; the base model
/// (nothing trained) is a dashed horizontal line in a grey band of its interval.
pub fn fid_vs_params(results: &StudyResults, path: &Path) -> Result<()> {
    let points = fid_points(results);
    if points.is_empty() {
        bail!("no method has a finite FID and a parameter count to plot");
    }
    let base = results.base().filter(|b| b.fid.is_finite()).map(|b| {
        (
            b.fid,
            interval_or_point(b.fid, b.fid_uncertainty.low, b.fid_uncertainty.high),
        )
    });
    let base_fid = base.map(|(fid, _)| fid);
    let (x_lo, x_hi) = span(points.iter().map(|p| p.params));
    let (y_lo, y_hi) = span(
        points
            .iter()
            .flat_map(|p| {
                [p.interval.0, p.interval.1]
                    .into_iter()
                    .chain(p.runs.iter().copied())
            })
            .chain(base.iter().flat_map(|(_, (lo, hi))| [*lo, *hi])),
    );
    let y_pad = ((y_hi - y_lo) * 0.15).max(y_hi.abs() * 0.05).max(1e-3);
    render_png(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("FID against trainable parameters", (FONT, 28))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(
                ((x_lo / 3.0)..(x_hi * 3.0)).log_scale(),
                (y_lo - y_pad).max(0.0)..(y_hi + y_pad),
            )
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("trainable parameters (log scale)")
            .y_desc("FID (lower is better)")
            .x_label_formatter(&|v| axis_count(*v))
            .label_style((FONT, 16))
            .axis_desc_style((FONT, 18))
            .draw()
            .map_err(plot_error)?;
        if let Some((_, (lo, hi))) = base {
            let band = Rectangle::new(
                [(x_lo / 3.0, lo), (x_hi * 3.0, hi)],
                BLACK.mix(0.08).filled(),
            );
            chart.draw_series([band]).map_err(plot_error)?;
        }
        if let Some(base) = base_fid {
            let line = DashedLineSeries::new(
                [(x_lo / 3.0, base), (x_hi * 3.0, base)],
                10,
                6,
                BLACK.mix(0.6).stroke_width(2),
            );
            chart.draw_series(line).map_err(plot_error)?;
            let grey = BLACK.mix(0.7);
            let style = TextStyle::from((FONT, 16).into_font())
                .color(&grey)
                .pos(Pos::new(HPos::Left, VPos::Bottom));
            let caption =
                EmptyElement::at((x_lo / 2.8, base)) + Text::new("no fine-tuning", (0, -4), style);
            chart.draw_series([caption]).map_err(plot_error)?;
        }
        for point in &points {
            draw_fid_point(&mut chart, point, x_hi)?;
        }
        Ok(())
    })
}

/// One method's FID with its 95% interval as an error bar, and its label beside it (left of the
/// point at the right edge, where the label would be cut).
fn draw_fid_point(
    chart: &mut ChartContext<'_, BitMapBackend<'_>, Cartesian2d<LogCoord<f64>, RangedCoordf64>>,
    point: &FidPoint,
    x_hi: f64,
) -> Result<()> {
    let (x, y, label) = (point.params, point.fid, point.label);
    let color = method_color(point.index, point.method);
    let (dx, anchor) = if x >= x_hi {
        (-12, HPos::Right)
    } else {
        (12, HPos::Left)
    };
    let (lo, hi) = point.interval;
    let stroke = color.stroke_width(2);
    let bar = PathElement::new([(x, lo), (x, hi)], stroke);
    chart.draw_series([bar]).map_err(plot_error)?;
    let caps = [lo, hi]
        .map(|end| EmptyElement::at((x, end)) + PathElement::new([(-8, 0), (8, 0)], stroke));
    chart.draw_series(caps).map_err(plot_error)?;
    let rings = point
        .runs
        .iter()
        .map(|&fid| EmptyElement::at((x, fid)) + Circle::new((14, 0), 4, color.stroke_width(1)));
    chart.draw_series(rings).map_err(plot_error)?;
    let style = TextStyle::from((FONT, 18).into_font())
        .color(&color)
        .pos(Pos::new(anchor, VPos::Center));
    let mark = EmptyElement::at((x, y))
        + Circle::new((0, 0), 7, color.filled())
        + Text::new(label.to_string(), (dx, 0), style);
    chart.draw_series([mark]).map_err(plot_error)?;
    Ok(())
}

/// A bar of [`train_time`]: the row's index, method, label, ratio and its interval.
type TimeBar<'a> = (usize, &'a str, &'a str, f64, Option<(f64, f64)>);

/// Each method's step time relative to full fine-tuning's (the timing pass's ratio, with its
/// 95% interval as a whisker), as bars labelled with the ratio and, from the timing pass, the
/// share of full fine-tuning's FLOPs per step.
pub fn train_time(results: &StudyResults, path: &Path) -> Result<()> {
    let bars: Vec<TimeBar> = results
        .rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.train.is_some())
        .filter_map(|(i, r)| {
            let (ratio, interval) = results.time_ratio(&r.method)?;
            Some((i, r.method.as_str(), r.label.as_str(), ratio, interval))
        })
        .collect();
    if bars.is_empty() {
        bail!("no method has a training time to plot");
    }
    let flops = |method: &str| -> Option<f64> {
        let timing = results.timing.as_ref()?;
        let of = |m: &str| {
            Some(
                timing
                    .methods
                    .iter()
                    .find(|t| t.method == m)?
                    .flops_per_step,
            )
        };
        Some(of(method)? / of("full")?)
    };
    let y_hi = bars
        .iter()
        .map(|b| b.4.map_or(b.3, |i| i.1).max(b.3))
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.2;
    let labels: Vec<String> = bars.iter().map(|b| b.2.to_string()).collect();
    render_png(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("Step time relative to full fine-tuning", (FONT, 28))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d((0..bars.len() - 1).into_segmented(), 0.0..y_hi)
            .map_err(plot_error)?;
        let label_of = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(bars.len())
            .x_label_formatter(&label_of)
            .y_desc("step time / full fine-tuning's")
            .label_style((FONT, 16))
            .axis_desc_style((FONT, 18))
            .draw()
            .map_err(plot_error)?;
        for (slot, &(i, method, _, ratio, interval)) in bars.iter().enumerate() {
            let color = method_color(i, method);
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(slot), 0.0),
                    (SegmentValue::Exact(slot + 1), ratio),
                ],
                color.filled(),
            );
            bar.set_margin(0, 0, 12, 12);
            chart.draw_series([bar]).map_err(plot_error)?;
            let mut top = ratio;
            if let Some((low, high)) = interval {
                let centre = || SegmentValue::CenterOf(slot);
                let whisker =
                    PathElement::new([(centre(), low), (centre(), high)], BLACK.stroke_width(2));
                chart.draw_series([whisker]).map_err(plot_error)?;
                top = high.max(ratio);
            }
            let text = match flops(method) {
                Some(share) => format!("{:.0}% (FLOPs {:.0}%)", 100.0 * ratio, 100.0 * share),
                None => format!("{:.0}%", 100.0 * ratio),
            };
            let style =
                TextStyle::from((FONT, 16).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
            let caption = EmptyElement::at((SegmentValue::CenterOf(slot), top))
                + Text::new(text, (0, -4), style);
            chart.draw_series([caption]).map_err(plot_error)?;
        }
        Ok(())
    })
}

/// Tick labels of a log-scale count axis: 100K, 1M, 10M, 1B.
fn axis_count(v: f64) -> String {
    let (scaled, suffix) = match v {
        v if v >= 1e9 => (v / 1e9, "B"),
        v if v >= 1e6 => (v / 1e6, "M"),
        v if v >= 1e3 => (v / 1e3, "K"),
        v => (v, ""),
    };
    let digits = if scaled >= 10.0 || scaled.fract().abs() < 1e-6 {
        0
    } else {
        1
    };
    format!("{scaled:.digits$}{suffix}")
}

/// One training run's loss over its steps.
#[derive(Debug, Clone)]
pub struct LossCurve {
    pub method: String,
    pub label: String,
    /// Row index in the results (for the colour).
    pub index: usize,
    pub points: Vec<(f64, f64)>,
}

/// Exponential moving average, so single-batch noise does not hide the trend.
pub fn smooth(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let mut avg: Option<f64> = None;
    points
        .iter()
        .map(|&(x, y)| {
            let v = avg.map_or(y, |a| weight * a + (1.0 - weight) * y);
            avg = Some(v);
            (x, v)
        })
        .collect()
}

/// Training-loss curves of every run (EMA-smoothed, raw values faint behind).
pub fn loss_curves(curves: &[LossCurve], path: &Path) -> Result<()> {
    let all: Vec<(f64, f64)> = curves
        .iter()
        .flat_map(|c| c.points.iter().copied())
        .filter(|p| p.1.is_finite())
        .collect();
    if all.is_empty() {
        bail!("no training loss to plot");
    }
    let x_hi = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let (y_lo, y_hi) = all.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let y_pad = ((y_hi - y_lo) * 0.05).max(1e-4);
    render_png(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("Training loss", (FONT, 28))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_hi, (y_lo - y_pad).max(0.0)..(y_hi + y_pad))
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (MSE)")
            .label_style((FONT, 16))
            .axis_desc_style((FONT, 18))
            .draw()
            .map_err(plot_error)?;
        for curve in curves {
            let color = method_color(curve.index, &curve.method);
            let finite: Vec<(f64, f64)> = curve
                .points
                .iter()
                .copied()
                .filter(|p| p.1.is_finite())
                .collect();
            chart
                .draw_series(LineSeries::new(finite.clone(), color.mix(0.2)))
                .map_err(plot_error)?;
            chart
                .draw_series(LineSeries::new(smooth(&finite, 0.9), color.stroke_width(2)))
                .map_err(plot_error)?
                .label(curve.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT, 16))
            .draw()
            .map_err(plot_error)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::report::example::study;

    fn decode(path: &Path) -> image::RgbImage {
        image::open(path).unwrap().to_rgb8()
    }

    /// Share of pixels that are not white: a drawn figure has axes, labels and marks.
    fn ink(image: &image::RgbImage) -> f64 {
        image.pixels().filter(|p| p.0 != [255, 255, 255]).count() as f64
            / (image.width() * image.height()) as f64
    }

    #[test]
    fn figures_are_valid_pngs_with_content() {
        let dir = tempfile::tempdir().unwrap();
        let results = study();
        fid_vs_params(&results, &dir.path().join("fid.png")).unwrap();
        train_time(&results, &dir.path().join("time.png")).unwrap();
        let curves: Vec<LossCurve> = results
            .methods()
            .enumerate()
            .map(|(i, r)| LossCurve {
                method: r.method.clone(),
                label: r.label.clone(),
                index: i + 1,
                points: (0..50)
                    .map(|s| (s as f64, 1.0 / (1.0 + s as f64 * (i + 1) as f64)))
                    .collect(),
            })
            .collect();
        loss_curves(&curves, &dir.path().join("loss.png")).unwrap();
        for name in ["fid.png", "time.png", "loss.png"] {
            let image = decode(&dir.path().join(name));
            assert_eq!(image.dimensions(), SIZE);
            let share = ink(&image);
            assert!(
                share > 0.01 && share < 0.6,
                "{name}: {share} of the pixels are drawn"
            );
        }
    }

    #[test]
    fn fid_plot_draws_each_interval() {
        let dir = tempfile::tempdir().unwrap();
        let mut results = study();
        let mut drawn = |half_width: f64, name: &str| {
            for row in &mut results.rows {
                row.fid_uncertainty.low = row.fid - half_width;
                row.fid_uncertainty.high = row.fid + half_width;
            }
            let path = dir.path().join(name);
            fid_vs_params(&results, &path).unwrap();
            ink(&decode(&path))
        };
        let (points, bars) = (drawn(0.0, "points.png"), drawn(5.0, "bars.png"));
        assert!(
            bars > points,
            "error bars add no ink: {bars} against {points}"
        );
    }

    #[test]
    fn nothing_to_plot_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut results = study();
        results.rows.retain(|r| r.method == BASE_ROW);
        assert!(fid_vs_params(&results, &dir.path().join("fid.png")).is_err());
        assert!(train_time(&results, &dir.path().join("time.png")).is_err());
        assert!(loss_curves(&[], &dir.path().join("loss.png")).is_err());
    }

    #[test]
    fn count_ticks_are_compact() {
        assert_eq!(axis_count(1e5), "100K");
        assert_eq!(axis_count(1e6), "1M");
        assert_eq!(axis_count(2.5e6), "2.5M");
        assert_eq!(axis_count(1e9), "1B");
    }

    #[test]
    fn smoothing_follows_the_trend() {
        let smoothed = smooth(&[(0.0, 1.0), (1.0, 0.0), (2.0, 0.0)], 0.5);
        assert_eq!(smoothed, vec![(0.0, 1.0), (1.0, 0.5), (2.0, 0.25)]);
    }
}
