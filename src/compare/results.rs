//! The study's results, assembled from its units' records: each method's runs summarised by the
//! hierarchical bootstrap (runs, then images), the paired differences by run, the scores along
//! the budget, the timing pass's ratios and the learning-rate search.
use super::lr_search::LearningRates;
use super::machine::{git_commit, load_averages, MachineInfo};
use super::prepare::{count_unet_parameters, BaseModel, PreparedData};
use super::report::{
    Check, ClassifierRecord, CurvePoint, MethodRow, RunResult, StudyResults, Summary, TimingResults, BASE_ROW,
};
use super::sampling::{SampledSet, StudySet};
use super::training::TrainedRun;
use super::score::{differences, summarise, RowScores, Score, Scorer};
use super::timing::{ratios, TimingRecord};
use super::Study;
use crate::data::Dataset;
use crate::eval::bootstrap::RunDraws;
use anyhow::{Context, Result};
use std::path::Path;

/// What the units recorded, in the runner's order: `sets`, `sampled` and `scores` align.
pub(super) struct Records<'a> {
    pub base: &'a BaseModel,
    pub target: &'a PreparedData,
    pub test: &'a Dataset,
    pub scorer: &'a Scorer,
    pub rates: LearningRates,
    pub runs: &'a [TrainedRun<'a>],
    pub sets: &'a [StudySet<'a>],
    pub sampled: &'a [SampledSet],
    pub scores: &'a [Score],
    pub timing: Option<TimingRecord>,
    pub classifier: Option<ClassifierRecord>,
}

/// A row's sets at one step (`None`: the end), in run order, with their runs.
fn sets_of<'r>(
    records: &'r Records,
    method: Option<&str>,
    step: Option<usize>,
) -> Vec<(usize, &'r StudySet<'r>, &'r Score, &'r SampledSet)> {
    records
        .sets
        .iter()
        .zip(records.scores)
        .zip(records.sampled)
        .enumerate()
        .filter(|(_, ((set, _), _))| {
            set.id.run.as_ref().map(|r| r.method.as_str()) == method && set.id.step == step
        })
        .map(|(i, ((set, score), sampled))| (i, set, score, sampled))
        .collect()
}

impl Study<'_> {
    /// The study's results from its units' records.
    pub(super) fn results(&self, records: Records) -> Result<StudyResults> {
        let config = self.config;
        let draws = RunDraws::new(config.study.runs, &records.scorer.bootstrap())?;
        let timing = records.timing.as_ref().and_then(|record| {
            let rows = ratios(
                record,
                "full",
                config.study.timing.bootstrap,
                config.eval.bootstrap_seed,
            )?;
            let timing = &config.study.timing;
            Some(TimingResults {
                rounds: timing.rounds,
                steps: timing.steps,
                warmup: timing.warmup,
                threads: record.threads,
                load_average: record.load_average.clone(),
                methods: rows,
            })
        });
        let unet_params = count_unet_parameters(&records.base.files)?;
        let mut rows = vec![self.base_row(&records, &draws, unet_params)?];
        let mut row_scores = vec![RowScores {
            id: BASE_ROW,
            runs: sets_of(&records, None, None).iter().map(|s| s.2).collect(),
        }];
        let mut curves = Vec::new();
        for (index, method) in config.methods.iter().enumerate() {
            let name = method.name();
            let ends = sets_of(&records, Some(name), None);
            let scores: Vec<&Score> = ends.iter().map(|s| s.2).collect();
            rows.push(self.method_row(&records, index, &ends, &draws, unet_params)?);
            row_scores.push(RowScores {
                id: name,
                runs: scores,
            });
            curves.extend(self.curve(&records, name, &draws, timing.as_ref())?);
        }
        let differences = differences(&row_scores, &draws)?;
        let mut checks =
            StudyResults::improvement_checks(&rows, &differences, &config.eval.must_improve);
        checks.push(Check {
            statement: "every FID and KID is a finite number".into(),
            passed: rows
                .iter()
                .all(|r| r.fid.is_finite() && r.kid_mean.is_finite()),
        });
        let clock = &self.layout.clock;
        let bootstrap = records.scorer.bootstrap();
        Ok(StudyResults {
            name: config.name.clone(),
            git_commit: git_commit(Path::new(env!("CARGO_MANIFEST_DIR"))),
            machine: MachineInfo::detect(self.device),
            world_size: self.group.world_size(),
            fid_features: records.scorer.description.clone(),
            reference: format!(
                "test split of {} ({} images)",
                records.target.description,
                records.test.len()
            ),
            rows,
            runs: config.study.runs,
            uncertainty: format!(
                "hierarchical bootstrap over the {} training run(s) of each method and the images: \
                 {} resamples (seed {}), each drawing runs with replacement and, within each drawn run, \
                 the generated and the reference features with replacement",
                config.study.runs, bootstrap.resamples, bootstrap.seed
            ),
            lr_search: records.rates.search.clone(),
            curves,
            timing,
            classifier: records.classifier.clone(),
            differences,
            checks,
            wall_seconds: clock.total(),
            invocations: clock.invocations,
            invocation_seconds: clock.this_invocation(),
            load_average: vec![self.load_at_start, load_averages()],
            settings_toml: self.settings_toml.clone(),
        })
    }

    /// The base model's row: its one sample set.
    fn base_row(&self, records: &Records, draws: &RunDraws, unet_params: u64) -> Result<MethodRow> {
        let sets = sets_of(records, None, None);
        let (_, _, score, sampled) = sets.first().context("the base model's samples")?;
        let summary = summarise(&[score], draws)?;
        Ok(MethodRow {
            method: BASE_ROW.to_string(),
            label: "No fine-tuning (base model)".to_string(),
            fid: summary.fid.value,
            fid_uncertainty: (&summary.fid).into(),
            kid_mean: summary.kid.value,
            kid_uncertainty: (&summary.kid).into(),
            kid_std: score.kid_subset_std,
            precision: summary.precision.as_ref().map(Summary::from),
            recall: summary.recall.as_ref().map(Summary::from),
            class_accuracy: summary.class_accuracy.as_ref().map(Summary::from),
            target_share: summary.target_share.as_ref().map(Summary::from),
            images: score.images,
            trainable_params: None,
            unet_params,
            learning_rate: None,
            train: None,
            sample_seconds: sampled.record.seconds,
            runs: Vec::new(),
        })
    }

    /// Method `index`'s row from its runs' end sets `ends`.
    fn method_row(
        &self,
        records: &Records,
        index: usize,
        ends: &[(usize, &StudySet, &Score, &SampledSet)],
        draws: &RunDraws,
        unet_params: u64,
    ) -> Result<MethodRow> {
        let method = &self.config.methods[index];
        let scores: Vec<&Score> = ends.iter().map(|s| s.2).collect();
        let summary = summarise(&scores, draws)?;
        let runs: Vec<RunResult> = ends
            .iter()
            .map(|(_, set, score, _)| {
                let run = set.run.context("a method's set comes from a run")?;
                Ok(RunResult {
                    run: run.run,
                    seed: run.seed,
                    fid: score.fid.value,
                    fid_uncertainty: (&score.fid).into(),
                    kid: score.kid.value,
                    kid_uncertainty: (&score.kid).into(),
                    precision: score.precision_recall.map(|p| p.precision),
                    recall: score.precision_recall.map(|p| p.recall),
                    content: score.content,
                    train: run.record.train.clone(),
                })
            })
            .collect::<Result<_>>()?;
        let (_, first, score, sampled) = ends.first().context("a method without runs")?;
        let run = first.run.context("a method's set comes from a run")?;
        Ok(MethodRow {
            method: method.name().to_string(),
            label: method.label(),
            fid: summary.fid.value,
            fid_uncertainty: (&summary.fid).into(),
            kid_mean: summary.kid.value,
            kid_uncertainty: (&summary.kid).into(),
            kid_std: score.kid_subset_std,
            precision: summary.precision.as_ref().map(Summary::from),
            recall: summary.recall.as_ref().map(Summary::from),
            class_accuracy: summary.class_accuracy.as_ref().map(Summary::from),
            target_share: summary.target_share.as_ref().map(Summary::from),
            images: score.images,
            trainable_params: Some(run.record.trainable_params),
            unet_params,
            learning_rate: Some(records.rates.rates[index]),
            train: Some(run.record.train.clone()),
            sample_seconds: sampled.record.seconds,
            runs,
        })
    }

    /// `method`'s scores at step 0 (the base model's: every method starts from it, its new
    /// tensors set so that the U-Net's output is unchanged), at each of `eval.at_steps` and at
    /// its end, over its runs, with each point's time in full fine-tuning steps: the timing
    /// pass's ratio, else the runs' median step times over full fine-tuning's.
    fn curve(
        &self,
        records: &Records,
        method: &str,
        draws: &RunDraws,
        timing: Option<&TimingResults>,
    ) -> Result<Vec<CurvePoint>> {
        let median_step = |name: &str| {
            records
                .runs
                .iter()
                .find(|r| r.method.name() == name)
                .map(|r| r.record.train.median_step_seconds)
        };
        let ratio = timing
            .and_then(|t| t.methods.iter().find(|m| m.method == method))
            .map(|m| m.ratio)
            .or_else(|| Some(median_step(method)? / median_step("full")?));
        let end = self
            .config
            .methods
            .iter()
            .find(|m| m.name() == method)
            .map_or(0, |m| m.run.train.steps);
        let steps = self.config.eval.at_steps.iter().map(|&s| (Some(s), s));
        let mut points = Vec::new();
        for (step, at) in [(Some(0), 0)].into_iter().chain(steps).chain([(None, end)]) {
            let sets = match at {
                0 => sets_of(records, None, None),
                _ => sets_of(records, Some(method), step),
            };
            if sets.is_empty() {
                continue;
            }
            let scores: Vec<&Score> = sets.iter().map(|s| s.2).collect();
            let summary = summarise(&scores, draws)?;
            points.push(CurvePoint {
                method: method.to_string(),
                step: at,
                full_steps: ratio.map(|r| at as f64 * r),
                fid: (&summary.fid).into(),
                kid: (&summary.kid).into(),
                run_fids: scores.iter().map(|s| s.fid.value).collect(),
            });
        }
        Ok(points)
    }
}
