//! The figures of a study's search and budget: each method's validation score against its
//! candidate learning rates, and FID along the budget against steps and against time.
use super::{interval_or_point, method_color, plot_error, render_png, span, FONT};
use crate::compare::report::{Metric, StudyResults, Summary, BASE_ROW};
use anyhow::{bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// A method's line: its colour index, label and (x, value, 95% interval) points.
struct Line {
    index: usize,
    method: String,
    label: String,
    points: Vec<(f64, f64, (f64, f64))>,
    /// The point to mark (the chosen learning rate).
    marked: Option<f64>,
}

/// `summary` as (value, interval).
fn with_interval(summary: &Summary) -> (f64, (f64, f64)) {
    let u = &summary.uncertainty;
    (
        summary.value,
        interval_or_point(summary.value, u.low, u.high),
    )
}

/// Each searching method's validation score against its candidate learning rates (log x), the
/// chosen rate ringed.
pub fn lr_search(results: &StudyResults, path: &Path) -> Result<()> {
    let Some(search) = &results.lr_search else {
        bail!("the study did not search learning rates");
    };
    let (name, scale) = match search.score {
        Metric::Kid => ("validation KID (×10³)", 1e3),
        Metric::Fid => ("validation FID", 1.0),
    };
    let lines: Vec<Line> = search
        .methods
        .iter()
        .map(|choice| {
            let index = results
                .rows
                .iter()
                .position(|r| r.method == choice.method)
                .unwrap_or(0);
            Line {
                index,
                method: choice.method.clone(),
                label: results.rows[index].label.clone(),
                // A diverged candidate has no point.
                points: choice
                    .candidates
                    .iter()
                    .filter_map(|c| {
                        let summary = match search.score {
                            Metric::Kid => c.kid.as_ref(),
                            Metric::Fid => c.fid.as_ref(),
                        }?;
                        let (v, (lo, hi)) = with_interval(summary);
                        Some((c.learning_rate, v * scale, (lo * scale, hi * scale)))
                    })
                    .collect(),
                marked: Some(choice.chosen),
            }
        })
        .collect();
    render_png(path, |root| {
        draw_lines(
            root,
            "Learning rates on the validation split",
            "learning rate (log scale)",
            name,
            true,
            &lines,
            None,
        )
    })
}

/// FID along the budget: against steps (left) and against time in full fine-tuning steps
/// (right), each method's mean over runs with its 95% interval, the base model's FID dashed.
pub fn fid_curves(results: &StudyResults, path: &Path) -> Result<()> {
    let lines = |x: &dyn Fn(&crate::compare::report::CurvePoint) -> Option<f64>| -> Vec<Line> {
        results
            .methods()
            .enumerate()
            .map(|(i, row)| Line {
                index: i + 1,
                method: row.method.clone(),
                label: row.label.clone(),
                points: results
                    .curves
                    .iter()
                    .filter(|p| p.method == row.method)
                    .filter_map(|p| {
                        let (v, interval) = with_interval(&p.fid);
                        Some((x(p)?, v, interval))
                    })
                    .collect(),
                marked: None,
            })
            .filter(|l| !l.points.is_empty())
            .collect()
    };
    let by_step = lines(&|p| Some(p.step as f64));
    let by_time = lines(&|p| p.full_steps);
    if by_step.iter().all(|l| l.points.len() < 2) {
        bail!("no method was scored at more than one step");
    }
    let base = results
        .rows
        .iter()
        .find(|r| r.method == BASE_ROW)
        .map(|r| r.fid)
        .filter(|f| f.is_finite());
    render_png(path, |root| {
        let (left, right) = root.split_horizontally(root.dim_in_pixel().0 / 2);
        draw_lines(
            &left,
            "FID against steps",
            "step",
            "FID (lower is better)",
            false,
            &by_step,
            base,
        )?;
        draw_lines(
            &right,
            "FID against training time",
            "time (full fine-tuning steps)",
            "FID (lower is better)",
            false,
            &by_time,
            base,
        )
    })
}

/// Lines of points with interval whiskers on `area`, a legend, and `level` as a dashed line.
fn draw_lines(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    caption: &str,
    x_desc: &str,
    y_desc: &str,
    log_x: bool,
    lines: &[Line],
    level: Option<f64>,
) -> Result<()> {
    let points = || lines.iter().flat_map(|l| l.points.iter());
    if points().next().is_none() {
        bail!("nothing to plot in {caption:?}");
    }
    let (x_lo, x_hi) = span(points().map(|p| p.0));
    let (y_lo, y_hi) = span(points().flat_map(|p| [p.2 .0, p.2 .1]).chain(level));
    let y_pad = ((y_hi - y_lo) * 0.1).max(y_hi.abs() * 0.02).max(1e-6);
    let y_range = (y_lo - y_pad).max(0.0)..(y_hi + y_pad);
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, (FONT, 24))
        .margin(16)
        .x_label_area_size(45)
        .y_label_area_size(65);
    // A log axis and a linear one are different chart types: both branches draw the same.
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .label_style((FONT, 14))
                .axis_desc_style((FONT, 16))
                .draw()
                .map_err(plot_error)?;
            if let Some(level) = level {
                let (from, to) = (x_lo, x_hi);
                let dashed = DashedLineSeries::new(
                    [(from, level), (to, level)],
                    10,
                    6,
                    BLACK.mix(0.6).stroke_width(2),
                );
                chart
                    .draw_series(dashed)
                    .map_err(plot_error)?
                    .label("no fine-tuning")
                    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.6)));
            }
            for line in lines {
                let color = method_color(line.index, &line.method);
                let xy: Vec<(f64, f64)> = line.points.iter().map(|p| (p.0, p.1)).collect();
                chart
                    .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))
                    .map_err(plot_error)?
                    .label(line.label.clone())
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3))
                    });
                let whiskers = line.points.iter().map(|&(x, _, (lo, hi))| {
                    PathElement::new([(x, lo), (x, hi)], color.stroke_width(1))
                });
                chart.draw_series(whiskers).map_err(plot_error)?;
                let dots = xy.iter().map(|&p| Circle::new(p, 4, color.filled()));
                chart.draw_series(dots).map_err(plot_error)?;
                if let Some(marked) = line.marked {
                    let ring = xy
                        .iter()
                        .filter(|p| p.0 == marked)
                        .map(|&p| Circle::new(p, 9, color.stroke_width(2)));
                    chart.draw_series(ring).map_err(plot_error)?;
                }
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font((FONT, 14))
                .draw()
                .map_err(plot_error)?;
        }};
    }
    match log_x {
        true => draw!(builder
            .build_cartesian_2d(((x_lo / 2.0)..(x_hi * 2.0)).log_scale(), y_range)
            .map_err(plot_error)?),
        false => {
            let x_pad = ((x_hi - x_lo) * 0.05).max(1.0);
            draw!(builder
                .build_cartesian_2d((x_lo - x_pad).max(0.0)..(x_hi + x_pad), y_range)
                .map_err(plot_error)?)
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::report::example::study;
    use crate::compare::report::{CurvePoint, LrCandidate, LrChoice, LrSearchResults};

    fn summary(value: f64) -> Summary {
        Summary {
            value,
            uncertainty: crate::compare::report::Uncertainty {
                std: 1.0,
                low: value - 2.0,
                high: value + 2.0,
            },
        }
    }

    #[test]
    fn search_and_curves_draw() {
        let dir = tempfile::tempdir().unwrap();
        let mut results = study();
        results.lr_search = Some(LrSearchResults {
            score: Metric::Kid,
            validation: "held out".into(),
            steps: vec![("lora".into(), 10)],
            methods: vec![LrChoice {
                method: "lora".into(),
                candidates: [1e-4, 1e-3, 1e-2]
                    .iter()
                    .map(|&lr| LrCandidate {
                        learning_rate: lr,
                        fid: Some(summary(30.0)),
                        kid: Some(summary(0.01 / lr.sqrt())),
                    })
                    .collect(),
                chosen: 1e-2,
            }],
        });
        results.curves = ["full", "lora"]
            .iter()
            .flat_map(|m| {
                [100, 200].map(|step| CurvePoint {
                    method: m.to_string(),
                    step,
                    full_steps: Some(step as f64 * 0.5),
                    fid: summary(60.0 - step as f64 / 10.0),
                    kid: summary(0.01),
                    run_fids: vec![50.0],
                })
            })
            .collect();
        lr_search(&results, &dir.path().join("lr.png")).unwrap();
        fid_curves(&results, &dir.path().join("curves.png")).unwrap();
        for name in ["lr.png", "curves.png"] {
            let image = image::open(dir.path().join(name)).unwrap().to_rgb8();
            let ink = image.pixels().filter(|p| p.0 != [255, 255, 255]).count();
            assert!(ink > 5_000, "{name}: {ink} pixels drawn");
        }
        results.curves.retain(|p| p.step == 100);
        assert!(fid_curves(&results, &dir.path().join("one.png")).is_err());
    }
}
