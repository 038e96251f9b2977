//! The comparison's results and their renderings: `results.json` (everything), `results.csv` (one
//! row per method) and `report.md` with the study's two tables, the checks, plots and settings.
use super::machine::{MachineInfo, MemoryKind};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::fmt::Write;

/// Method id of the reference row: the base model sampled before any fine-tuning.
pub const BASE_ROW: &str = "base";

/// Everything a comparison measured, as written to `results.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StudyResults {
    /// The run's name (the preset's, or the run file's stem).
    pub name: String,
    pub git_commit: String,
    pub machine: MachineInfo,
    /// What the FID numbers are computed with, and why (real or random Inception weights).
    pub fid_features: String,
    /// What the evaluation compares against, e.g. "test split of the target domain (100 images)".
    pub reference: String,
    /// The base-model row first, then the methods in run-file order.
    pub rows: Vec<MethodRow>,
    /// How the uncertainties were estimated, e.g. "bootstrap, 100 resamples, seed 0".
    pub uncertainty: String,
    /// Paired differences between rows (each method against the base row, then neighbours in
    /// the FID ranking), with whether their uncertainty covers zero.
    pub differences: Vec<Difference>,
    pub checks: Vec<Check>,
    /// Wall time spent on this comparison over all its invocations (an interrupted invocation
    /// counts up to its last finished stage).
    pub wall_seconds: f64,
    /// How many invocations of `compare` that time is spread over.
    pub invocations: u32,
    /// Wall time of the invocation that wrote these results.
    pub invocation_seconds: f64,
    /// The resolved run file, as TOML.
    pub settings_toml: String,
}

/// One method's scores and costs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MethodRow {
    /// `base`, or the tuning method's id (`full`, `adapter`, `lora`, `prefix`, `bitfit`).
    pub method: String,
    /// Display name, e.g. "Prefix-tuning".
    pub label: String,
    pub fid: f64,
    pub fid_uncertainty: Uncertainty,
    pub kid_mean: f64,
    /// KID's bootstrap uncertainty.
    pub kid_uncertainty: Uncertainty,
    /// Standard deviation of KID over its random subsets (torch-fidelity's `kid_std`, not an
    /// uncertainty of the mean).
    pub kid_std: f64,
    /// Generated images scored.
    pub images: usize,
    /// Parameters the method trains; `None` for the base row.
    pub trainable_params: Option<u64>,
    /// Parameters of the (unmodified) U-Net, the denominator of the share.
    pub unet_params: u64,
    pub train: Option<TrainMeasure>,
    /// Seconds spent generating this row's images.
    pub sample_seconds: f64,
}

/// The bootstrap uncertainty of a score: standard deviation and 95% interval.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Uncertainty {
    pub std: f64,
    pub low: f64,
    pub high: f64,
}

impl From<&crate::eval::Estimate> for Uncertainty {
    fn from(e: &crate::eval::Estimate) -> Self {
        Self {
            std: e.std,
            low: e.low,
            high: e.high,
        }
    }
}

/// The scores FID and KID.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Metric {
    #[serde(rename = "FID")]
    Fid,
    #[serde(rename = "KID")]
    Kid,
}

/// `first`'s score minus `second`'s, paired over the same bootstrap draws.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Difference {
    pub metric: Metric,
    /// Row ids (`base`, `full`, ...).
    pub first: String,
    pub second: String,
    pub value: f64,
    pub uncertainty: Uncertainty,
}

impl Difference {
    /// The 95% interval holds zero: which of the two scores is lower is not established.
    pub fn within_uncertainty(&self) -> bool {
        self.uncertainty.low <= 0.0 && self.uncertainty.high >= 0.0
    }
}

/// An image of the report: its path relative to the report, and its caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    pub file: String,
    pub caption: String,
}

impl Figure {
    pub fn new(file: impl Into<String>, caption: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            caption: caption.into(),
        }
    }
}

/// A section of images, when there are any.
fn write_figures(md: &mut String, heading: &str, figures: &[Figure]) -> std::fmt::Result {
    if !figures.is_empty() {
        writeln!(md, "## {heading}\n")?;
        for Figure { file, caption } in figures {
            writeln!(md, "![{caption}]({file})\n")?;
        }
    }
    Ok(())
}

/// A training run's costs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainMeasure {
    pub steps: usize,
    /// Wall time of the training loop (model loading and saving excluded).
    pub total_seconds: f64,
    pub median_step_seconds: f64,
    pub peak_memory_bytes: Option<u64>,
    pub memory_kind: MemoryKind,
    /// Mean loss over the last tenth of the steps.
    pub final_loss: Option<f64>,
}

impl TrainMeasure {
    /// Median step time times the steps: the training time without the load spikes that
    /// inflate wall time on a shared machine.
    pub fn step_seconds(&self) -> f64 {
        self.median_step_seconds * self.steps as f64
    }
}

/// A statement about the results that a user expects to hold, and whether it does.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Check {
    pub statement: String,
    pub passed: bool,
}

impl StudyResults {
    pub fn base(&self) -> Option<&MethodRow> {
        self.rows.iter().find(|r| r.method == BASE_ROW)
    }

    pub fn methods(&self) -> impl Iterator<Item = &MethodRow> {
        self.rows.iter().filter(|r| r.method != BASE_ROW)
    }

    /// The full fine-tuning row, the reference for relative training time.
    pub fn full(&self) -> Option<&MethodRow> {
        self.rows.iter().find(|r| r.method == "full")
    }

    /// The standard checks: for each method named in `must_improve`, that fine-tuning lowered the
    /// FID below the base model's; each says whether the drop is beyond its uncertainty.
    pub fn improvement_checks(
        rows: &[MethodRow],
        differences: &[Difference],
        must_improve: &[String],
    ) -> Vec<Check> {
        let Some(base) = rows.iter().find(|r| r.method == BASE_ROW) else {
            return Vec::new();
        };
        must_improve
            .iter()
            .filter_map(|m| rows.iter().find(|r| &r.method == m))
            .map(|row| {
                let judged = differences
                    .iter()
                    .find(|d| {
                        d.metric == Metric::Fid && d.first == row.method && d.second == BASE_ROW
                    })
                    .map(|d| {
                        let verdict = match d.within_uncertainty() {
                            true => "within",
                            false => "beyond",
                        };
                        format!(
                            "; the difference, {}, is {verdict} its uncertainty",
                            format_estimate(d.value, &d.uncertainty, 1.0)
                        )
                    })
                    .unwrap_or_default();
                Check {
                    statement: format!(
                        "FID after {} ({}) is lower than before fine-tuning ({}){judged}",
                        row.label,
                        format_estimate(row.fid, &row.fid_uncertainty, 1.0),
                        format_estimate(base.fid, &base.fid_uncertainty, 1.0)
                    ),
                    passed: row.fid < base.fid,
                }
            })
            .collect()
    }

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

    /// `report.md`, showing `plots` and `grids`.
    pub fn to_markdown(&self, plots: &[Figure], grids: &[Figure]) -> Result<String> {
        let mut md = String::new();
        writeln!(md, "# difftune compare: {}\n", self.name)?;
        writeln!(
            md,
            "Fine-tuning the U-Net with five methods on the same data and budget, after \
             Kim, Ahn & Jung, *Comparative Study of Efficient Parameter Tuning Techniques in Diffusion Models*.\n"
        )?;
        self.write_table1(&mut md)?;
        self.write_table2(&mut md)?;
        if !self.checks.is_empty() {
            writeln!(md, "## Checks\n")?;
            for check in &self.checks {
                let mark = if check.passed { "PASS" } else { "FAIL" };
                writeln!(md, "- **{mark}**: {}", check.statement)?;
            }
            md.push('\n');
        }
        writeln!(md, "## Measurements\n")?;
        md.push_str(&self.details_table());
        md.push('\n');
        write_figures(&mut md, "Plots", plots)?;
        write_figures(&mut md, "Samples", grids)?;
        self.write_setup(&mut md)?;
        Ok(md)
    }

    /// Table 1 with its note on uncertainties and the paired differences.
    fn write_table1(&self, md: &mut String) -> Result<()> {
        writeln!(
            md,
            "## Table 1. FID against the {} (lower is better)\n",
            self.reference
        )?;
        md.push_str(&self.table1());
        writeln!(
            md,
            "\nThe first row samples the base model before any fine-tuning, with the same prompts and seeds. \
             Uncertainties (value ± standard deviation, and the 95% interval): {}.\n",
            self.uncertainty
        )?;
        if !self.differences.is_empty() {
            writeln!(
                md,
                "### Which differences are real\n\nPaired over the same bootstrap draws: each method against \
                 the base model, then each method against the next in the FID ranking. A difference whose \
                 95% interval holds zero is **within the uncertainty**: these images do not establish which \
                 of the two is lower.\n"
            )?;
            md.push_str(&self.differences_table());
            md.push('\n');
        }
        Ok(())
    }

    /// Table 2 with its note on what the columns measure.
    fn write_table2(&self, md: &mut String) -> Result<()> {
        writeln!(
            md,
            "## Table 2. Trained parameters and training time relative to full fine-tuning\n"
        )?;
        md.push_str(&self.table2());
        let kinds: Vec<MemoryKind> = {
            let mut k: Vec<MemoryKind> = self
                .rows
                .iter()
                .filter_map(|r| r.train.as_ref().map(|t| t.memory_kind))
                .collect();
            k.dedup();
            k
        };
        let memory_note = kinds
            .iter()
            .map(|k| k.describe())
            .collect::<Vec<_>>()
            .join("; ");
        writeln!(
            md,
            "\n# params: parameters trained, with their share of the U-Net's parameters. Time: median step \
             time × steps, which load on the machine barely moves; wall time: the training loop's wall time \
             (both relative to full fine-tuning's). Peak memory: {memory_note}.\n"
        )?;
        Ok(())
    }

    fn write_setup(&self, md: &mut String) -> Result<()> {
        writeln!(md, "## Setup\n")?;
        writeln!(md, "- Machine: {}", self.machine.describe())?;
        writeln!(md, "- Commit: {}", self.git_commit)?;
        writeln!(md, "- FID features: {}", self.fid_features)?;
        writeln!(
            md,
            "- Wall time: {} in all, over {} invocation(s) of `difftune compare` (this one: {})\n",
            format_seconds(self.wall_seconds),
            self.invocations,
            format_seconds(self.invocation_seconds)
        )?;
        writeln!(
            md,
            "Settings (the resolved run file):\n\n```toml\n{}```",
            self.settings_toml
        )?;
        Ok(())
    }
}

/// Parameter counts as the study prints them: 860M, 1.23M, 0.23M; small models get K.
pub fn format_count(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e8 {
        format!("{:.0}M", n / 1e6)
    } else if n >= 1e5 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}K", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// A share of the U-Net as the study prints it: 100%, 0.143%, 0.029%; three significant digits
/// at most (12.5%, 1.23%).
pub fn format_share(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "–".into();
    }
    let pct = 100.0 * part as f64 / whole as f64;
    if part == whole {
        "100%".into()
    } else if pct >= 10.0 {
        format!("{pct:.1}%")
    } else if pct >= 1.0 {
        format!("{pct:.2}%")
    } else {
        format!("{pct:.3}%")
    }
}

pub fn format_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", b / (1u64 << 20) as f64)
    }
}

pub fn format_seconds(s: f64) -> String {
    if s >= 3600.0 {
        format!(
            "{:.0} h {:02.0} min",
            (s / 3600.0).floor(),
            (s % 3600.0) / 60.0
        )
    } else if s >= 60.0 {
        format!("{:.0} min {:02.0} s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{s:.1} s")
    }
}

/// `value ± std`, both times `scale`.
pub fn format_estimate(value: f64, uncertainty: &Uncertainty, scale: f64) -> String {
    format!(
        "{} ± {}",
        format_score(value * scale),
        format_score(uncertainty.std * scale)
    )
}

/// `[low, high]`, both times `scale`.
pub fn format_interval(uncertainty: &Uncertainty, scale: f64) -> String {
    format!(
        "[{}, {}]",
        format_score(uncertainty.low * scale),
        format_score(uncertainty.high * scale)
    )
}

/// FID/KID with two decimals, as the study prints FID; non-finite values spelled out.
pub fn format_score(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        format!("{v}")
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The study's published numbers as results, for tests of the renderings.
#[cfg(test)]
pub(crate) mod example {
    use super::*;

    fn row(method: &str, label: &str, fid: f64, params: Option<u64>, seconds: f64) -> MethodRow {
        MethodRow {
            method: method.into(),
            label: label.into(),
            fid,
            fid_uncertainty: Uncertainty {
                std: 2.0,
                low: fid - 4.0,
                high: fid + 4.0,
            },
            kid_mean: 0.0123,
            kid_uncertainty: Uncertainty {
                std: 0.0004,
                low: 0.0115,
                high: 0.0131,
            },
            kid_std: 0.0002,
            images: 100,
            trainable_params: params,
            unet_params: 859_520_964,
            train: params.map(|_| TrainMeasure {
                steps: 10_000,
                total_seconds: seconds,
                median_step_seconds: seconds / 10_000.0,
                peak_memory_bytes: Some(3 << 30),
                memory_kind: MemoryKind::CudaUsed,
                final_loss: Some(0.1),
            }),
            sample_seconds: 12.0,
        }
    }

    pub fn study() -> StudyResults {
        let rows = vec![
            row(BASE_ROW, "No fine-tuning", 80.0, None, 0.0),
            row("full", "Full fine-tuning", 43.33, Some(859_520_964), 1000.0),
            row("adapter", "Adapter", 47.41, Some(1_229_280), 560.0),
            row("lora", "LoRA", 35.68, Some(198_912), 420.0),
            row("prefix", "Prefix-tuning", 32.57, Some(249_600), 440.0),
            row("bitfit", "BitFit", 68.53, Some(174_720), 390.0),
        ];
        let difference = |first: &str, second: &str, value: f64| Difference {
            metric: Metric::Fid,
            first: first.into(),
            second: second.into(),
            value,
            uncertainty: Uncertainty {
                std: 2.0,
                low: value - 4.0,
                high: value + 4.0,
            },
        };
        let differences = vec![
            difference("full", BASE_ROW, -36.67),
            difference("lora", "prefix", 3.11),
        ];
        let checks =
            StudyResults::improvement_checks(&rows, &differences, &["full".into(), "lora".into()]);
        StudyResults {
            name: "study".into(),
            git_commit: "abc".into(),
            machine: MachineInfo::detect(tch::Device::Cpu),
            fid_features: "test".into(),
            reference: "test split".into(),
            rows,
            uncertainty: "bootstrap, 100 resamples".into(),
            differences,
            checks,
            wall_seconds: 3.0,
            invocations: 1,
            invocation_seconds: 3.0,
            settings_toml: "a = 1\n".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::example::study;
    use super::*;

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
    fn checks_compare_with_the_base_row() {
        let s = study();
        assert_eq!(s.checks.len(), 2);
        assert!(s.checks.iter().all(|c| c.passed));
        assert!(
            s.checks[0]
                .statement
                .ends_with("; the difference, -36.67 ± 2.00, is beyond its uncertainty"),
            "{}",
            s.checks[0].statement
        );
        let mut rows = s.rows.clone();
        rows[3].fid = 90.0;
        let checks = StudyResults::improvement_checks(&rows, &[], &["lora".into()]);
        assert!(!checks[0].passed);
        assert!(
            checks[0].statement.contains("LoRA (90.00 ± 2.00)"),
            "{}",
            checks[0].statement
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

    #[test]
    fn markdown_holds_tables_checks_and_setup() {
        let md = study()
            .to_markdown(&[Figure::new("plots/fid.png", "FID")], &[])
            .unwrap();
        for needle in [
            "## Table 1.",
            "## Table 2.",
            "**PASS**",
            "### Which differences are real",
            "| FID | LoRA − Prefix-tuning | 3.11 ± 2.00 | [-0.89, 7.11] | **within the uncertainty** |",
            "| FID | Full fine-tuning − No fine-tuning | -36.67 ± 2.00 | [-40.67, -32.67] | real |",
            "![FID](plots/fid.png)",
            "Commit: abc",
            "```toml\na = 1\n```",
        ] {
            assert!(md.contains(needle), "missing {needle:?} in\n{md}");
        }
    }

    #[test]
    fn counts_and_shares_format_like_the_study() {
        assert_eq!(format_count(859_520_964), "860M");
        assert_eq!(format_count(1_229_280), "1.23M");
        assert_eq!(format_count(12_345), "12.3K");
        assert_eq!(format_share(1, 8), "12.5%");
        assert_eq!(format_share(1_229_280, 859_520_964), "0.143%");
        assert_eq!(format_seconds(125.0), "2 min 05 s");
    }
}
