//! The study's tables (Table 1 with its paired differences, Table 2 and the measurements
//! behind it, every run, the learning-rate search and the scores along the budget) as markdown,
//! and `results.csv`.
use super::format::{
    format_bytes, format_count, format_estimate, format_flops, format_interval, format_percent,
    format_seconds, format_share, format_summary,
};
use super::{MethodRow, Metric, StudyResults, Summary, Uncertainty};
use std::fmt::Write;

impl StudyResults {
    /// Whether the rows carry the content classifier's score.
    fn has_content(&self) -> bool {
        self.rows.iter().any(|r| r.class_accuracy.is_some())
    }

    /// Table 1: per method (base model first) the learning rate, FID and KID with their
    /// uncertainties and 95% intervals, precision and recall, and the content score where there
    /// is one; every value the mean over the method's runs.
    pub fn table1(&self) -> String {
        let content = self.has_content();
        let mut t = String::from(
            "| method | FID | FID 95% interval | KID (×10³) | KID 95% interval (×10³) | precision | recall |",
        );
        if content {
            t.push_str(" dish as prompted | target style |");
        }
        t.push_str(" learning rate |\n|---|---|---|---|---|---|---|");
        if content {
            t.push_str("---|---|");
        }
        t.push_str("---|\n");
        for row in &self.rows {
            let _ = write!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} |",
                row.label,
                format_estimate(row.fid, &row.fid_uncertainty, 1.0),
                format_interval(&row.fid_uncertainty, 1.0),
                format_estimate(row.kid_mean, &row.kid_uncertainty, 1e3),
                format_interval(&row.kid_uncertainty, 1e3),
                row.precision.as_ref().map_or("–".into(), format_summary),
                row.recall.as_ref().map_or("–".into(), format_summary),
            );
            if content {
                let _ = write!(
                    t,
                    " {} | {} |",
                    row.class_accuracy
                        .as_ref()
                        .map_or("–".into(), format_summary),
                    row.target_share.as_ref().map_or("–".into(), format_summary),
                );
            }
            let lr = row.learning_rate.map_or("–".into(), |lr| format!("{lr:e}"));
            let _ = writeln!(t, " {lr} |");
        }
        t
    }

    /// The paired differences, each marked real or within its uncertainty.
    pub fn differences_table(&self) -> String {
        let label = |id: &str| {
            self.rows
                .iter()
                .find(|r| r.method == id)
                .map_or(id.to_string(), |r| r.label.clone())
        };
        let mut t = String::from(
            "| score | difference | value | 95% interval | verdict |\n|---|---|---|---|---|\n",
        );
        for d in &self.differences {
            let (name, scale) = match d.metric {
                Metric::Fid => ("FID", 1.0),
                Metric::Kid => ("KID (×10³)", 1e3),
            };
            let verdict = match d.within_uncertainty() {
                true => "**within the uncertainty**",
                false => "real",
            };
            let _ = writeln!(
                t,
                "| {name} | {} − {} | {} | {} | {verdict} |",
                label(&d.first),
                label(&d.second),
                format_estimate(d.value, &d.uncertainty, scale),
                format_interval(&d.uncertainty, scale),
            );
        }
        t
    }

    /// A method's step time relative to full fine-tuning's, with its 95% interval: the timing
    /// pass's, else the median step times of the methods' first runs (no interval).
    pub fn time_ratio(&self, method: &str) -> Option<(f64, Option<(f64, f64)>)> {
        if let Some(timing) = &self.timing {
            let row = timing.methods.iter().find(|m| m.method == method)?;
            return Some((row.ratio, Some((row.ratio_low, row.ratio_high))));
        }
        let full = self.full()?.train.as_ref()?.step_seconds();
        let row = self.rows.iter().find(|r| r.method == method)?;
        let own = row.train.as_ref()?.step_seconds();
        (full > 0.0).then(|| (own / full, None))
    }

    /// The mean over a row's runs of their training loops' wall time.
    fn mean_wall_seconds(row: &MethodRow) -> Option<f64> {
        match row.runs.is_empty() {
            true => row.train.as_ref().map(|t| t.total_seconds),
            false => Some(
                row.runs.iter().map(|r| r.train.total_seconds).sum::<f64>() / row.runs.len() as f64,
            ),
        }
    }

    /// Table 2: trained parameters (with their share of the U-Net), the step time relative to
    /// full fine-tuning from the timing pass with its 95% interval, the FLOPs per step, the wall
    /// time of the runs relative to full fine-tuning's, and peak memory.
    pub fn table2(&self) -> String {
        let full_wall = self.full().and_then(Self::mean_wall_seconds);
        let full_flops = self.flops("full");
        let mut t = String::from(
            "| method | # params | time | time 95% interval | FLOPs per step | wall time | peak memory |\n\
             |---|---|---|---|---|---|---|\n",
        );
        for row in self.methods() {
            let params = match row.trainable_params {
                Some(n) => format!("{} ({})", format_count(n), format_share(n, row.unet_params)),
                None => "–".into(),
            };
            let (time, interval) = match self.time_ratio(&row.method) {
                Some((ratio, Some((low, high)))) => (
                    format_percent(ratio),
                    format!("[{}, {}]", format_percent(low), format_percent(high)),
                ),
                Some((ratio, None)) => (format_percent(ratio), "–".into()),
                None => ("–".into(), "–".into()),
            };
            let flops = match (self.flops(&row.method), full_flops) {
                (Some(f), Some(full)) if full > 0.0 => {
                    format!("{} ({})", format_flops(f), format_percent(f / full))
                }
                (Some(f), _) => format_flops(f),
                _ => "–".into(),
            };
            let wall = match (Self::mean_wall_seconds(row), full_wall) {
                (Some(own), Some(full)) if full > 0.0 => format_percent(own / full),
                _ => "–".into(),
            };
            let memory = row
                .train
                .as_ref()
                .and_then(|t| t.peak_memory_bytes)
                .map(format_bytes)
                .unwrap_or_else(|| "–".into());
            let _ = writeln!(
                t,
                "| {} | {params} | {time} | {interval} | {flops} | {wall} | {memory} |",
                row.label
            );
        }
        t
    }

    /// A method's FLOPs per step, from the timing pass.
    fn flops(&self, method: &str) -> Option<f64> {
        let timing = self.timing.as_ref()?;
        Some(
            timing
                .methods
                .iter()
                .find(|m| m.method == method)?
                .flops_per_step,
        )
    }

    /// Every training run: its seed, learning rate, scores and training time.
    pub fn runs_table(&self) -> String {
        let content = self.has_content();
        let mut t = String::from(
            "| method | run | seed | learning rate | FID | KID (×10³) | precision | recall |",
        );
        if content {
            t.push_str(" dish as prompted | target style |");
        }
        t.push_str(" train time |\n|---|---|---|---|---|---|---|---|");
        if content {
            t.push_str("---|---|");
        }
        t.push_str("---|\n");
        for row in self.methods() {
            for run in &row.runs {
                let lr = row.learning_rate.map_or("–".into(), |lr| format!("{lr:e}"));
                let _ = write!(
                    t,
                    "| {} | {} | {} | {lr} | {} | {} | {} | {} |",
                    row.label,
                    run.run,
                    run.seed,
                    format_estimate(run.fid, &run.fid_uncertainty, 1.0),
                    format_estimate(run.kid, &run.kid_uncertainty, 1e3),
                    run.precision.map_or("–".into(), |p| format!("{p:.3}")),
                    run.recall.map_or("–".into(), |r| format!("{r:.3}")),
                );
                if content {
                    let (dish, target) = run.content.map_or(("–".into(), "–".into()), |c| {
                        (
                            format_percent(c.class_accuracy),
                            format_percent(c.target_share),
                        )
                    });
                    let _ = write!(t, " {dish} | {target} |");
                }
                let _ = writeln!(t, " {} |", format_seconds(run.train.total_seconds));
            }
        }
        t
    }

    /// The learning-rate search: each method's candidates with their validation scores.
    pub fn lr_table(&self) -> Option<String> {
        let search = self.lr_search.as_ref()?;
        let label = |id: &str| {
            self.rows
                .iter()
                .find(|r| r.method == id)
                .map_or(id.to_string(), |r| r.label.clone())
        };
        let mut t = String::from(
            "| method | learning rate | validation FID | validation KID (×10³) | |\n|---|---|---|---|---|\n",
        );
        for choice in &search.methods {
            let chosen = choice
                .candidates
                .iter()
                .find(|c| c.learning_rate == choice.chosen)
                .and_then(|c| c.score(search.score));
            for c in &choice.candidates {
                let tied = match (c.score(search.score), chosen) {
                    (Some(c), Some(chosen)) => overlap(&c.uncertainty, &chosen.uncertainty),
                    _ => false,
                };
                let mark = match (c.learning_rate == choice.chosen, tied) {
                    (true, _) => "**chosen**",
                    (false, true) => "tie: its interval overlaps the chosen one's",
                    (false, false) => "",
                };
                let score = |s: &Option<Summary>, scale: f64| {
                    s.as_ref().map_or("diverged".into(), |s| {
                        format_estimate(s.value, &s.uncertainty, scale)
                    })
                };
                let _ = writeln!(
                    t,
                    "| {} | {:e} | {} | {} | {mark} |",
                    label(&choice.method),
                    c.learning_rate,
                    score(&c.fid, 1.0),
                    score(&c.kid, 1e3),
                );
            }
        }
        Some(t)
    }

    /// FID along the budget: each method's mean over runs at each scored step.
    pub fn curve_table(&self) -> String {
        let mut t = String::from(
            "| method | step | time (full fine-tuning steps) | FID | FID 95% interval | KID (×10³) |\n\
             |---|---|---|---|---|---|\n",
        );
        for p in &self.curves {
            let label = self
                .rows
                .iter()
                .find(|r| r.method == p.method)
                .map_or(p.method.clone(), |r| r.label.clone());
            let _ = writeln!(
                t,
                "| {label} | {} | {} | {} | {} | {} |",
                p.step,
                p.full_steps.map_or("–".into(), |s| format!("{s:.0}")),
                format_estimate(p.fid.value, &p.fid.uncertainty, 1.0),
                format_interval(&p.fid.uncertainty, 1.0),
                format_estimate(p.kid.value, &p.kid.uncertainty, 1e3),
            );
        }
        t
    }

    /// The absolute numbers behind Table 2 (each method's first run).
    pub fn details_table(&self) -> String {
        let mut t = String::from(
            "| method | trainable | steps | train time | median step | final loss | sampling time | images |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        for row in &self.rows {
            let trainable = row
                .trainable_params
                .map(|n| n.to_string())
                .unwrap_or_else(|| "–".into());
            let (steps, total, step, loss) = match &row.train {
                Some(tr) => (
                    tr.steps.to_string(),
                    format_seconds(tr.total_seconds),
                    format!("{:.1} ms", tr.median_step_seconds * 1e3),
                    tr.final_loss
                        .map(|l| format!("{l:.4}"))
                        .unwrap_or_else(|| "–".into()),
                ),
                None => ("–".into(), "–".into(), "–".into(), "–".into()),
            };
            let _ = writeln!(
                t,
                "| {} | {trainable} | {steps} | {total} | {step} | {loss} | {} | {} |",
                row.label,
                format_seconds(row.sample_seconds),
                row.images
            );
        }
        t
    }

    /// `results.csv`: one row per method (the base row included), raw numbers (means over runs).
    pub fn to_csv(&self) -> String {
        let mut csv = String::from(
            "method,label,fid,fid_std,fid_low,fid_high,kid_mean,kid_bootstrap_std,kid_low,kid_high,kid_subset_std,\
             precision,recall,class_accuracy,target_share,learning_rate,runs,\
             images,trainable_params,unet_params,trainable_share,train_steps,train_seconds,median_step_seconds,\
             time_vs_full,time_vs_full_low,time_vs_full_high,flops_per_step,wall_time_vs_full,peak_memory_bytes,\
             memory_kind,final_loss,sample_seconds\n",
        );
        let full_wall = self.full().and_then(Self::mean_wall_seconds);
        let opt = |v: Option<String>| v.unwrap_or_default();
        for row in &self.rows {
            let tr = row.train.as_ref();
            let ratio = self.time_ratio(&row.method).filter(|_| row.train.is_some());
            let fields = [
                row.method.clone(),
                csv_field(&row.label),
                row.fid.to_string(),
                row.fid_uncertainty.std.to_string(),
                row.fid_uncertainty.low.to_string(),
                row.fid_uncertainty.high.to_string(),
                row.kid_mean.to_string(),
                row.kid_uncertainty.std.to_string(),
                row.kid_uncertainty.low.to_string(),
                row.kid_uncertainty.high.to_string(),
                row.kid_std.to_string(),
                opt(row.precision.map(|s| s.value.to_string())),
                opt(row.recall.map(|s| s.value.to_string())),
                opt(row.class_accuracy.map(|s| s.value.to_string())),
                opt(row.target_share.map(|s| s.value.to_string())),
                opt(row.learning_rate.map(|lr| lr.to_string())),
                row.runs.len().to_string(),
                row.images.to_string(),
                opt(row.trainable_params.map(|n| n.to_string())),
                row.unet_params.to_string(),
                opt(row
                    .trainable_params
                    .map(|n| (n as f64 / row.unet_params as f64).to_string())),
                opt(tr.map(|t| t.steps.to_string())),
                opt(tr.map(|t| t.total_seconds.to_string())),
                opt(tr.map(|t| t.median_step_seconds.to_string())),
                opt(ratio.map(|r| r.0.to_string())),
                opt(ratio.and_then(|r| r.1).map(|i| i.0.to_string())),
                opt(ratio.and_then(|r| r.1).map(|i| i.1.to_string())),
                opt(self.flops(&row.method).map(|f| f.to_string())),
                opt(Self::mean_wall_seconds(row)
                    .zip(full_wall)
                    .filter(|(_, f)| *f > 0.0 && row.train.is_some())
                    .map(|(own, full)| (own / full).to_string())),
                opt(tr.and_then(|t| t.peak_memory_bytes).map(|b| b.to_string())),
                opt(tr.map(|t| {
                    serde_json::to_value(t.memory_kind)
                        .map(|v| v.as_str().unwrap_or_default().to_string())
                        .unwrap_or_default()
                })),
                opt(tr.and_then(|t| t.final_loss).map(|l| l.to_string())),
                row.sample_seconds.to_string(),
            ];
            csv.push_str(&fields.join(","));
            csv.push('\n');
        }
        csv
    }
}

/// Whether two 95% intervals share a value: scores that a rerun (another seed, thread count or
/// validation split) may rank the other way.
fn overlap(a: &Uncertainty, b: &Uncertainty) -> bool {
    a.low <= b.high && b.low <= a.high
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::super::example::study;

    #[test]
    fn the_learning_rate_table_marks_candidates_tied_with_the_chosen_one() {
        use super::super::{LrCandidate, LrChoice, LrSearchResults, Metric, Summary, Uncertainty};
        let kid = |value, low, high| {
            let uncertainty = Uncertainty {
                std: 0.0,
                low,
                high,
            };
            Some(Summary { value, uncertainty })
        };
        let candidate = |learning_rate, kid| LrCandidate {
            learning_rate,
            fid: None,
            kid,
        };
        let mut s = study();
        s.lr_search = Some(LrSearchResults {
            score: Metric::Kid,
            validation: "2 images per class".into(),
            steps: vec![("lora".into(), 10)],
            methods: vec![LrChoice {
                method: "lora".into(),
                chosen: 3e-2,
                candidates: vec![
                    candidate(1e-2, kid(0.030, 0.025, 0.035)),
                    candidate(3e-2, kid(0.014, 0.012, 0.016)),
                    candidate(1e-1, kid(0.0145, 0.013, 0.017)),
                    candidate(1.0, None),
                ],
            }],
        });
        let t = s.lr_table().unwrap();
        let line = |rate: &str| {
            let cell = format!("| {rate} |");
            t.lines().find(|l| l.contains(&cell)).unwrap().to_string()
        };
        assert!(line("3e-2").ends_with("| **chosen** |"), "{t}");
        assert!(line("1e-1").contains("tie"), "{t}");
        assert!(!line("1e-2").contains("tie"), "{t}");
        assert!(
            line("1e0").contains("diverged") && !line("1e0").contains("tie"),
            "{t}"
        );
    }

    #[test]
    fn table2_matches_the_study_format() {
        let t = study().table2();
        assert!(
            t.contains("| Full fine-tuning | 860M (100%) | 100% | – | – | 100% | 3.00 GiB |"),
            "{t}"
        );
        assert!(t.contains("| Adapter | 1.23M (0.143%) | 56% |"), "{t}");
        assert!(t.contains("| LoRA | 0.20M (0.023%) | 42% |"), "{t}");
        assert!(
            t.contains("| Prefix-tuning | 0.25M (0.029%) | 44% |"),
            "{t}"
        );
        assert!(t.contains("| BitFit | 0.17M (0.020%) | 39% |"), "{t}");
        assert!(!t.contains("No fine-tuning"), "{t}");
    }

    #[test]
    fn table2_time_follows_the_median_step_and_wall_time_stands_beside_it() {
        let mut s = study();
        // A load spike doubles LoRA's wall time but not its median step.
        s.rows[3].train.as_mut().unwrap().total_seconds *= 2.0;
        let t = s.table2();
        assert!(
            t.contains("| LoRA | 0.20M (0.023%) | 42% | – | – | 84% |"),
            "{t}"
        );
    }

    #[test]
    fn table2_takes_time_from_the_timing_pass_and_shows_flops() {
        use super::super::{TimingResults, TimingRow};
        let mut s = study();
        let row = |method: &str, ratio: f64, flops: f64| TimingRow {
            method: method.into(),
            median_step_seconds: ratio * 0.1,
            ratio,
            ratio_low: ratio - 0.05,
            ratio_high: ratio + 0.05,
            round_ratios: vec![ratio],
            flops_per_step: flops,
        };
        s.timing = Some(TimingResults {
            rounds: 1,
            steps: 5,
            warmup: 1,
            threads: 1,
            load_average: vec![Some(0.2)],
            methods: vec![row("full", 1.0, 4e9), row("lora", 0.6, 2e9)],
        });
        let t = s.table2();
        assert!(
            t.contains("| LoRA | 0.20M (0.023%) | 60% | [55%, 65%] | 2.00 GFLOP (50%) | 42% |"),
            "{t}"
        );
    }

    #[test]
    fn every_run_has_a_line() {
        use super::super::RunResult;
        let mut s = study();
        let measure = s.rows[1].train.clone().unwrap();
        s.rows[1].runs = (0..3)
            .map(|run| RunResult {
                run,
                seed: run as u64,
                fid: 40.0 + run as f64,
                fid_uncertainty: s.rows[1].fid_uncertainty,
                kid: 0.01,
                kid_uncertainty: s.rows[1].kid_uncertainty,
                precision: Some(0.5),
                recall: Some(0.25),
                content: None,
                train: measure.clone(),
            })
            .collect();
        let t = s.runs_table();
        assert_eq!(t.lines().count(), 2 + 3, "{t}");
        assert!(
            t.contains(
                "| Full fine-tuning | 2 | 2 | 1e-5 | 42.00 ± 2.00 | 10.00 ± 0.40 | 0.500 | 0.250 |"
            ),
            "{t}"
        );
    }

    #[test]
    fn table1_lists_base_then_methods() {
        let t = study().table1();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2 + 6);
        assert!(
            lines[2].starts_with(
                "| No fine-tuning | 80.00 ± 2.00 | [76.00, 84.00] | 12.30 ± 0.40 | [11.50, 13.10] |"
            ),
            "{t}"
        );
        assert!(
            lines[6].starts_with("| Prefix-tuning | 32.57 ± 2.00 |"),
            "{t}"
        );
    }

    #[test]
    fn csv_has_one_line_per_row_and_consistent_columns() {
        let csv = study().to_csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 7);
        let columns = lines[0].split(',').count();
        assert!(
            lines.iter().all(|l| l.split(',').count() == columns),
            "{csv}"
        );
        assert!(
            lines[2].starts_with("full,Full fine-tuning,43.33,"),
            "{csv}"
        );
    }
}
