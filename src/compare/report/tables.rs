//! The study's tables (Table 1 with its paired differences, Table 2 and the measurements
//! behind it) as markdown, and `results.csv`.
use super::format::{
    format_bytes, format_count, format_estimate, format_interval, format_seconds, format_share,
};
use super::{Metric, StudyResults, TrainMeasure};
use std::fmt::Write;

impl StudyResults {
    /// Table 1: FID and KID per method with their uncertainties, base model first.
    pub fn table1(&self) -> String {
        let mut t = String::from(
            "| method | FID | FID 95% interval | KID (×10³) | KID 95% interval (×10³) |\n|---|---|---|---|---|\n",
        );
        for row in &self.rows {
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} |",
                row.label,
                format_estimate(row.fid, &row.fid_uncertainty, 1.0),
                format_interval(&row.fid_uncertainty, 1.0),
                format_estimate(row.kid_mean, &row.kid_uncertainty, 1e3),
                format_interval(&row.kid_uncertainty, 1e3),
            );
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

    /// Table 2: trained parameters (with their share of the U-Net), training time relative to
    /// full fine-tuning, and peak memory. Time is the median step time times the steps, which
    /// load on the machine distorts far less than wall time (beside it).
    pub fn table2(&self) -> String {
        let full = self.full().and_then(|r| r.train.as_ref());
        let mut t = String::from(
            "| method | # params | time | wall time | peak memory |\n|---|---|---|---|---|\n",
        );
        for row in self.methods() {
            let params = match row.trainable_params {
                Some(n) => format!("{} ({})", format_count(n), format_share(n, row.unet_params)),
                None => "–".into(),
            };
            let relative = |measure: fn(&TrainMeasure) -> f64| match (row.train.as_ref(), full) {
                (Some(train), Some(full)) if measure(full) > 0.0 => {
                    format!("{:.0}%", 100.0 * measure(train) / measure(full))
                }
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
                "| {} | {params} | {} | {} | {memory} |",
                row.label,
                relative(TrainMeasure::step_seconds),
                relative(|t| t.total_seconds)
            );
        }
        t
    }

    /// The absolute numbers behind Table 2.
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

    /// `results.csv`: one row per method (the base row included), raw numbers.
    pub fn to_csv(&self) -> String {
        let mut csv = String::from(
            "method,label,fid,fid_std,fid_low,fid_high,kid_mean,kid_bootstrap_std,kid_low,kid_high,kid_subset_std,\
             images,trainable_params,unet_params,trainable_share,train_steps,train_seconds,median_step_seconds,\
             time_vs_full,wall_time_vs_full,peak_memory_bytes,memory_kind,final_loss,sample_seconds\n",
        );
        let full = self.full().and_then(|r| r.train.as_ref());
        let opt = |v: Option<String>| v.unwrap_or_default();
        for row in &self.rows {
            let tr = row.train.as_ref();
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
                row.images.to_string(),
                opt(row.trainable_params.map(|n| n.to_string())),
                row.unet_params.to_string(),
                opt(row
                    .trainable_params
                    .map(|n| (n as f64 / row.unet_params as f64).to_string())),
                opt(tr.map(|t| t.steps.to_string())),
                opt(tr.map(|t| t.total_seconds.to_string())),
                opt(tr.map(|t| t.median_step_seconds.to_string())),
                opt(tr
                    .zip(full)
                    .filter(|(_, f)| f.step_seconds() > 0.0)
                    .map(|(t, f)| (t.step_seconds() / f.step_seconds()).to_string())),
                opt(tr
                    .zip(full)
                    .filter(|(_, f)| f.total_seconds > 0.0)
                    .map(|(t, f)| (t.total_seconds / f.total_seconds).to_string())),
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
    fn table2_matches_the_study_format() {
        let t = study().table2();
        assert!(
            t.contains("| Full fine-tuning | 860M (100%) | 100% | 100% | 3.00 GiB |"),
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
        assert!(t.contains("| LoRA | 0.20M (0.023%) | 42% | 84% |"), "{t}");
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
