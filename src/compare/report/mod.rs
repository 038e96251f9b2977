//! The comparison's results, as written to `results.json`, and the checks on them; their
//! renderings are `tables` (the study's tables and `results.csv`) and `markdown` (`report.md`).
mod format;
mod markdown;
mod tables;

pub use format::{
    format_bytes, format_count, format_estimate, format_flops, format_interval, format_percent,
    format_score, format_seconds, format_share, format_summary,
};
pub use markdown::Figure;

use super::machine::{MachineInfo, MemoryKind};
use crate::eval::classifier::ContentScore;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Method id of the reference row: the base model sampled before any fine-tuning.
pub const BASE_ROW: &str = "base";

/// Everything a comparison measured, as written to `results.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StudyResults {
    /// The run's name (the preset's, or the run file's stem).
    pub name: String,
    pub git_commit: String,
    pub machine: MachineInfo,
    /// Data-parallel processes the comparison ran on (1 without a launcher, and with
    /// run-parallel ranks, each of which runs its units alone); `machine` describes rank 0's.
    pub world_size: usize,
    /// What the FID numbers are computed with, and why (real or random Inception weights).
    pub fid_features: String,
    /// What the evaluation compares against, e.g. "test split of the target domain (100 images)".
    pub reference: String,
    /// The base-model row first, then the methods in run-file order.
    pub rows: Vec<MethodRow>,
    /// Training runs per method (`study.runs`): each method's row is the mean over them.
    pub runs: usize,
    /// How the uncertainties were estimated, e.g. "bootstrap, 100 resamples, seed 0".
    pub uncertainty: String,
    /// The learning-rate search, when some method chose its rate.
    pub lr_search: Option<LrSearchResults>,
    /// Each method's scores along its budget (`eval.at_steps` and the end).
    pub curves: Vec<CurvePoint>,
    /// The timing pass: each method's step time relative to full fine-tuning's, and its FLOPs.
    pub timing: Option<TimingResults>,
    /// The content classifier, where the study has one.
    pub classifier: Option<ClassifierRecord>,
    /// The 1-, 5- and 15-minute load averages when this invocation started and when it ended.
    pub load_average: Vec<Option<[f64; 3]>>,
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

/// One method's scores and costs: the mean over its runs, each with the hierarchical bootstrap's
/// uncertainty (runs, then images), and every run's own.
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
    /// Standard deviation of KID over its random subsets in run 0 (torch-fidelity's `kid_std`,
    /// not an uncertainty of the mean).
    pub kid_std: f64,
    /// Precision and recall (Kynkäänniemi et al. 2019): mean over runs, with the run-to-run
    /// spread as uncertainty (none for sets no larger than the neighbourhood size).
    pub precision: Option<Summary>,
    pub recall: Option<Summary>,
    /// The content classifier's share of images drawn as the prompted dish, and in the target's
    /// style, where the study has a classifier.
    pub class_accuracy: Option<Summary>,
    pub target_share: Option<Summary>,
    /// Generated images scored per run.
    pub images: usize,
    /// Parameters the method trains; `None` for the base row.
    pub trainable_params: Option<u64>,
    /// Parameters of the (unmodified) U-Net, the denominator of the share.
    pub unet_params: u64,
    /// The learning rate its runs trained at (chosen on the validation split or configured).
    pub learning_rate: Option<f64>,
    /// Run 0's costs.
    pub train: Option<TrainMeasure>,
    /// Seconds spent generating run 0's images.
    pub sample_seconds: f64,
    /// Every training run's seed and scores (none for the base row).
    pub runs: Vec<RunResult>,
}

/// A score summarised over runs: the mean and its uncertainty.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub value: f64,
    pub uncertainty: Uncertainty,
}

impl From<&crate::eval::Estimate> for Summary {
    fn from(e: &crate::eval::Estimate) -> Self {
        Self {
            value: e.value,
            uncertainty: e.into(),
        }
    }
}

/// One training run of a method and the scores of its samples.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunResult {
    pub run: usize,
    pub seed: u64,
    pub fid: f64,
    pub fid_uncertainty: Uncertainty,
    pub kid: f64,
    pub kid_uncertainty: Uncertainty,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub content: Option<ContentScore>,
    pub train: TrainMeasure,
}

/// The learning-rate search: what each method chose from, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LrSearchResults {
    /// The score the choice minimised.
    pub score: Metric,
    /// What the candidates were scored against, e.g. "8 validation images per class held out
    /// ...".
    pub validation: String,
    /// Steps of each candidate's run.
    pub steps: Vec<(String, usize)>,
    pub methods: Vec<LrChoice>,
}

/// One method's candidates with their validation scores, and the rate chosen.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LrChoice {
    pub method: String,
    pub candidates: Vec<LrCandidate>,
    pub chosen: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LrCandidate {
    pub learning_rate: f64,
    /// FID and KID on the validation split, each with its bootstrap uncertainty; none where the
    /// candidate's run diverged (a non-finite loss).
    pub fid: Option<Summary>,
    pub kid: Option<Summary>,
}

impl LrCandidate {
    /// Its validation score by `metric`; none when its run diverged.
    pub fn score(&self, metric: Metric) -> Option<&Summary> {
        match metric {
            Metric::Kid => self.kid.as_ref(),
            Metric::Fid => self.fid.as_ref(),
        }
    }
}

/// One method's scores after `step` steps: the mean over its runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CurvePoint {
    pub method: String,
    pub step: usize,
    /// Its time: steps × the method's step time relative to full fine-tuning's from the timing
    /// pass (the median step time of its runs without one), in full fine-tuning steps; `None`
    /// without full fine-tuning to compare with.
    pub full_steps: Option<f64>,
    pub fid: Summary,
    pub kid: Summary,
    /// Each run's FID there.
    pub run_fids: Vec<f64>,
}

/// The trained classifier and how well it reads the held-out test images.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClassifierRecord {
    pub weights: PathBuf,
    /// Share of both domains' test images classified as their dish.
    pub test_class_accuracy: f64,
    /// Share of both domains' test images classified as their domain.
    pub test_domain_accuracy: f64,
    pub test_images: usize,
    pub training_images: usize,
    pub seconds: f64,
}

/// A method's time relative to full fine-tuning's, as Table 2 reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TimingRow {
    pub method: String,
    /// Median of all its timed steps.
    pub median_step_seconds: f64,
    /// Median over rounds of its median step time over full fine-tuning's in the same round.
    pub ratio: f64,
    /// 95% bootstrap interval of `ratio`.
    pub ratio_low: f64,
    pub ratio_high: f64,
    /// Each round's ratio.
    pub round_ratios: Vec<f64>,
    pub flops_per_step: f64,
}

/// The timing pass, as Table 2 reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TimingResults {
    pub rounds: usize,
    pub steps: usize,
    pub warmup: usize,
    pub threads: i64,
    /// The 1-minute load average when each round started.
    pub load_average: Vec<Option<f64>>,
    pub methods: Vec<TimingRow>,
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
    /// FID below the base model's beyond its uncertainty (the paired difference's 95% interval
    /// below zero; the point estimates alone where there is no difference).
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
                let judged = differences.iter().find(|d| {
                    d.metric == Metric::Fid && d.first == row.method && d.second == BASE_ROW
                });
                let (passed, verdict) = match judged {
                    Some(d) => {
                        let beyond = !d.within_uncertainty();
                        let verdict = if beyond { "beyond" } else { "within" };
                        (
                            beyond && d.value < 0.0,
                            format!(
                                "; the difference, {}, is {verdict} its uncertainty",
                                format_estimate(d.value, &d.uncertainty, 1.0)
                            ),
                        )
                    }
                    None => (row.fid < base.fid, String::new()),
                };
                Check {
                    statement: format!(
                        "FID after {} ({}) is lower than before fine-tuning ({}){verdict}",
                        row.label,
                        format_estimate(row.fid, &row.fid_uncertainty, 1.0),
                        format_estimate(base.fid, &base.fid_uncertainty, 1.0)
                    ),
                    passed,
                }
            })
            .collect()
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
            precision: Some(summary(0.8)),
            recall: Some(summary(0.6)),
            class_accuracy: None,
            target_share: None,
            images: 100,
            trainable_params: params,
            unet_params: 859_520_964,
            learning_rate: params.map(|_| 1e-5),
            train: params.map(|_| TrainMeasure {
                steps: 10_000,
                total_seconds: seconds,
                median_step_seconds: seconds / 10_000.0,
                peak_memory_bytes: Some(3 << 30),
                memory_kind: MemoryKind::CudaAllocated,
                final_loss: Some(0.1),
            }),
            sample_seconds: 12.0,
            runs: Vec::new(),
        }
    }

    fn summary(value: f64) -> Summary {
        Summary {
            value,
            uncertainty: Uncertainty {
                std: 0.02,
                low: value - 0.04,
                high: value + 0.04,
            },
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
            world_size: 1,
            fid_features: "test".into(),
            reference: "test split".into(),
            rows,
            runs: 1,
            uncertainty: "bootstrap, 100 resamples".into(),
            lr_search: None,
            curves: Vec::new(),
            timing: None,
            classifier: None,
            load_average: vec![Some([0.5, 0.4, 0.3]), None],
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
}
