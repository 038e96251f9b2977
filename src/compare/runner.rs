//! Running a comparison: data, base model, one training run per method, samples of the same
//! prompts and seeds from every model, their scores, and the report. Each step is a resumable
//! stage (see [`super::stage`]): an interrupted comparison picks up where it stopped, and
//! editing, say, the sampling settings redoes only sampling and scoring.
//!
//! Under a launcher ([`run_in`] with a group of several ranks) every stage runs on every rank:
//! rank 0 alone holds the lock, reads and writes the stage states (and broadcasts what it
//! decided), generates the data, writes the tiny model and merges the base model, while the
//! others wait; the training runs are data-parallel (the configured batch × accumulation is the
//! global batch, shared evenly by the ranks); each rank samples a contiguous share of whole
//! sampling batches and extracts the Inception features of a share of the images; rank 0
//! computes the scores and writes the outputs.
use super::config::{CompareConfig, DataSource, MethodEntry, ModelSource};
use super::machine::{git_commit, MachineInfo};
use super::prepare::{count_unet_parameters, PreparedData};
use super::report::{Check, Difference, MethodRow, StudyResults, BASE_ROW};
use super::sampling::{sample_plan, SampleItem, SampleJob, SampleRecord};
use super::score::{differences, Score, Scorer, ScorerWeights};
use super::stage::{Layout, Stage};
use super::training::{RunJob, RunRecord};
use crate::data::synthetic::Domain;
use crate::data::{Dataset, DatasetOptions, Split};
use crate::dist::ProcessGroup;
use crate::error::SettingsError;
use crate::model::source::ModelFiles;
use crate::schedulers::SchedulerKind;
use crate::util::fs::write_atomic_str;
use crate::util::progress::Progress;
use anyhow::{anyhow, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tch::Device;

/// Files a comparison writes at the top of its output folder.
pub const RESULTS_JSON: &str = "results.json";
pub const RESULTS_CSV: &str = "results.csv";
pub const REPORT_MD: &str = "report.md";
/// The resolved run file.
pub const CONFIG_FILE: &str = "compare.toml";

pub struct CompareOptions {
    pub config: CompareConfig,
    pub out: PathBuf,
    /// Draw training progress bars.
    pub progress: bool,
    /// Set (by a Ctrl-C handler) to stop at the next safe point, keeping all finished work.
    pub interrupt: Arc<AtomicBool>,
}

/// How a call of [`run`] ended.
pub enum Outcome {
    Finished(Box<StudyResults>),
    /// This rank's part of a data-parallel comparison is done; rank 0 holds the results and
    /// wrote the outputs.
    FinishedOnMainRank,
    /// Stopped by the interrupt flag; running again resumes.
    Interrupted,
}

/// What every stage of one comparison works with.
pub(crate) struct Study<'a> {
    pub config: &'a CompareConfig,
    pub opts: &'a CompareOptions,
    pub layout: Layout,
    pub device: Device,
    /// The resolved run file, as `compare.toml` holds it.
    pub settings_toml: String,
    /// The ranks taking part (a group of one without a launcher).
    pub group: &'a ProcessGroup,
}

/// A method's finished run with the stage key it was trained under.
pub struct TrainedRun<'a> {
    pub method: &'a MethodEntry,
    pub key: Value,
    pub record: RunRecord,
}

/// One row of the study: the base model, or the base model with a method's run applied.
struct StudyRow<'a> {
    name: String,
    label: String,
    run: Option<&'a TrainedRun<'a>>,
}

/// A row's finished sampling with the stage key it was sampled under.
struct SampledRow {
    key: Value,
    record: SampleRecord,
}

/// The base model every row starts from.
struct BaseModel {
    spec: String,
    files: ModelFiles,
    identity: String,
}

/// Returns from the enclosing function with [`Outcome::Interrupted`] on `None`.
macro_rules! or_interrupted {
    ($stage:expr) => {
        match $stage {
            Some(done) => done,
            None => return Ok(Outcome::Interrupted),
        }
    };
}

/// Runs (or resumes) a comparison in this process alone. See the module documentation.
pub fn run(opts: &CompareOptions) -> Result<Outcome> {
    run_in(opts, &ProcessGroup::single())
}

/// Runs (or resumes) a comparison as this process's rank of `group` (see the module
/// documentation); rank 0 gets the results, the others [`Outcome::FinishedOnMainRank`].
pub fn run_in(opts: &CompareOptions, group: &ProcessGroup) -> Result<Outcome> {
    let config = &opts.config;
    // Everything is checked before the lock, which creates the output folder.
    config.validate()?;
    check_world_size(config, group.world_size())?;
    check_inputs(config)?;
    let main = group.is_main();
    let _lock = match main {
        true => Some(crate::util::lock::DirLock::acquire(&opts.out, "compare")?),
        false => None,
    };
    let study = Study {
        config,
        opts,
        layout: match main {
            true => Layout::create(&opts.out)?,
            false => Layout::open(&opts.out),
        },
        device: group.local_device(config.train.device.resolve()?),
        settings_toml: config.to_toml()?,
        group,
    };
    if main {
        write_atomic_str(&study.layout.root.join(CONFIG_FILE), &study.settings_toml)?;
    }

    let target = study.prepare_dataset(Domain::Target)?;
    let source = match config.pretrain {
        Some(_) => Some(study.prepare_dataset(Domain::Source)?),
        None => None,
    };
    let spec = or_interrupted!(study.prepare_base_model(&target, source.as_ref())?);
    let files = ModelFiles::resolve(&spec, None)?;
    let base = BaseModel {
        identity: files.unet_identity()?,
        files,
        spec,
    };
    let runs = or_interrupted!(study.train_methods(&base, &target)?);

    let test = Dataset::open(
        &target.path,
        &DatasetOptions {
            split: Split::Test,
            ..Default::default()
        },
    )?;
    let plan = sample_plan(config, &test)?;
    let rows = study_rows(&runs);
    let sampled = or_interrupted!(study.sample_rows(&base, &rows, &plan)?);
    if group.any(opts.interrupt.load(Ordering::SeqCst))? {
        return Ok(Outcome::Interrupted);
    }
    let scored = study.score_rows(&base, &target, &test, &rows, &sampled, &plan)?;
    let Some(results) = scored else {
        return Ok(Outcome::FinishedOnMainRank);
    };
    study.write_outputs(&results, &runs, &plan, &test)?;
    study.layout.save_clock()?;
    Ok(Outcome::Finished(Box::new(results)))
}

/// Refuses, before anything runs, a world size that cannot split the study's settings as one
/// process runs them: every run's global batch must divide evenly over the ranks, and
/// euler_ancestral sampling draws its noise from one generator through a whole row. The command
/// line checks it before the ranks join, so that every rank refuses on its own.
pub fn check_world_size(config: &CompareConfig, world: usize) -> Result<()> {
    if world == 1 {
        return Ok(());
    }
    if config.sample.scheduler == SchedulerKind::EulerAncestral {
        let reason = format!(
            "euler_ancestral cannot be split across {world} ranks with the single-process images \
             (its noise comes from one generator through a whole row): use another scheduler or \
             one process"
        );
        return Err(SettingsError::invalid("sample.scheduler", reason).into());
    }
    for (name, train) in config.runs() {
        super::training::rank_share(train.batch_size, train.gradient_accumulation_steps, world)
            .map_err(|e| SettingsError::invalid(format!("run `{name}`"), e))?;
    }
    Ok(())
}

/// Refuses, before anything runs, a dataset folder that is not there and a model whose configs
/// or weight headers do not read (the tiny model is written here, and checked when trained).
fn check_inputs(config: &CompareConfig) -> Result<()> {
    if let DataSource::Folder(path) = &config.data.source {
        if !path.exists() {
            return Err(SettingsError::invalid(
                "data.source",
                format!("{} does not exist", path.display()),
            )
            .into());
        }
    }
    if let ModelSource::Pretrained(spec) = &config.model.source {
        ModelFiles::resolve(spec, None)?.check()?;
    }
    Ok(())
}

/// The study's rows: the base model, then each method's run.
fn study_rows<'a>(runs: &'a [TrainedRun<'a>]) -> Vec<StudyRow<'a>> {
    let base = StudyRow {
        name: BASE_ROW.to_string(),
        label: "No fine-tuning (base model)".to_string(),
        run: None,
    };
    let methods = runs.iter().map(|run| StudyRow {
        name: run.method.name().to_string(),
        label: run.method.label(),
        run: Some(run),
    });
    std::iter::once(base).chain(methods).collect()
}

impl<'a> Study<'a> {
    /// Trains every method from the base model on the target data. `None` when interrupted.
    fn train_methods(
        &self,
        base: &BaseModel,
        target: &PreparedData,
    ) -> Result<Option<Vec<TrainedRun<'a>>>> {
        let methods = &self.config.methods;
        let mut runs = Vec::new();
        for (i, method) in methods.iter().enumerate() {
            if self.group.is_main() {
                eprintln!("compare: [{}/{}] {}", i + 1, methods.len(), method.label());
            }
            let config = method.run.clone();
            let key =
                json!({ "base": base.identity, "data": target.key, "run": config.to_toml()? });
            let job = RunJob {
                name: method.name(),
                model: &base.spec,
                data: &target.path,
                config,
                key: key.clone(),
            };
            let Some(record) = self.train_run(job)? else {
                return Ok(None);
            };
            runs.push(TrainedRun {
                method,
                key,
                record,
            });
        }
        Ok(Some(runs))
    }

    /// Samples the plan with every row. `None` when interrupted.
    fn sample_rows(
        &self,
        base: &BaseModel,
        rows: &[StudyRow],
        plan: &[SampleItem],
    ) -> Result<Option<Vec<SampledRow>>> {
        let samples_key = json!({
            "base": base.identity,
            "sample": self.config.sample,
            "resolution": self.config.sample_resolution(),
            "plan": plan,
        });
        let mut sampled = Vec::new();
        for row in rows {
            let job = SampleJob {
                row: &row.name,
                adapter: row.run.map(|r| r.record.adapter.as_path()),
                key: json!({ "samples": samples_key, "run": row.run.map(|r| &r.key) }),
            };
            if self.group.is_main() {
                eprintln!("compare: sampling {} images with {}", plan.len(), row.label);
            }
            let Some(record) = self.sample_row(&job, &base.files, plan)? else {
                return Ok(None);
            };
            sampled.push(SampledRow {
                key: job.key,
                record,
            });
        }
        Ok(Some(sampled))
    }

    /// Scores every row's samples against the test split: every rank extracts the features of
    /// its share of the images, rank 0 computes the scores. `None` on the other ranks.
    fn score_rows(
        &self,
        base: &BaseModel,
        target: &PreparedData,
        test: &Dataset,
        rows: &[StudyRow],
        sampled: &[SampledRow],
        plan: &[SampleItem],
    ) -> Result<Option<StudyResults>> {
        if self.group.is_main() {
            eprintln!("compare: scoring");
        }
        let eval = &self.config.eval;
        let weights = self.on_main(|| ScorerWeights::choose(eval, &self.layout.eval()))?;
        let scorer = Scorer::new(eval, self.device, weights)?;
        let reference_key = format!("{}|{}|test|{}", scorer.identity, target.key, test.len());
        let visible = self.opts.progress && self.group.is_main();
        let progress = Progress::new(
            "compare scoring",
            rows.len() as u64 + 1,
            "image sets",
            visible,
        );
        let reference = scorer.reference(
            test,
            &self.layout.eval().join("reference-features.safetensors"),
            &reference_key,
            self.group,
        )?;
        // The message names the image set just scored.
        progress.set_message("test split".into());
        progress.inc(1);
        let mut scores = Vec::new();
        for (row, sampled) in rows.iter().zip(sampled) {
            let key = json!({
                "samples": sampled.key,
                "scorer": scorer.identity,
                "reference": reference_key,
                "kid": [eval.kid_subsets, eval.kid_subset_size, eval.random_seed],
                "bootstrap": scorer.bootstrap(),
            });
            let stage = Stage::Score(&row.name);
            let done: Option<Score> = self.on_main(|| self.layout.enter(stage, None, &key))?;
            let score = match done {
                Some(score) => Some(score),
                None => {
                    let paths = self.sample_paths(&row.name, plan);
                    let score = scorer
                        .score(reference.as_ref(), &paths, self.group)
                        .with_context(|| format!("scoring {}", row.label))?;
                    if let Some(score) = &score {
                        self.layout.finish(stage, &key, score)?;
                    }
                    score
                }
            };
            scores.extend(score.map(|score| (row.name.clone(), score)));
            progress.set_message(row.label.clone());
            progress.inc(1);
        }
        progress.finish_and_clear();
        if !self.group.is_main() {
            return Ok(None);
        }
        let unet_params = count_unet_parameters(&base.files)?;
        let scored = rows
            .iter()
            .zip(sampled)
            .zip(&scores)
            .map(|((row, sampled), (_, score))| MethodRow {
                method: row.name.clone(),
                label: row.label.clone(),
                fid: score.fid.value,
                fid_uncertainty: (&score.fid).into(),
                kid_mean: score.kid.value,
                kid_uncertainty: (&score.kid).into(),
                kid_std: score.kid_subset_std,
                images: score.images,
                trainable_params: row.run.map(|r| r.record.trainable_params),
                unet_params,
                train: row.run.map(|r| r.record.train.clone()),
                sample_seconds: sampled.record.seconds,
            })
            .collect();
        let differences = differences(&scores)?;
        Ok(Some(self.results(
            scored,
            differences,
            &scorer,
            target,
            test,
        )))
    }

    /// What `decide` gives on rank 0, on every rank: the stage engine's decisions (is a stage
    /// done, with what record) are taken by rank 0 alone, which alone reads and writes the
    /// stage states and the files of the stages that are not data-parallel; the other ranks wait
    /// here for it. An error on rank 0 becomes an error naming it on every rank.
    pub(super) fn on_main<T: Serialize + DeserializeOwned>(
        &self,
        decide: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        if !self.group.is_distributed() {
            return decide();
        }
        if self.group.is_main() {
            let decided = decide();
            let shared: Result<&T, String> = decided.as_ref().map_err(|e| format!("{e:#}"));
            let bytes = serde_json::to_vec(&shared)?;
            self.group
                .broadcast_bytes_from_main(&bytes)
                .context("sharing rank 0's stage decision")?;
            return decided;
        }
        let bytes = self
            .group
            .broadcast_bytes_from_main(&[])
            .context("waiting for rank 0's stage decision")?;
        let shared: Result<T, String> =
            serde_json::from_slice(&bytes).context("reading rank 0's stage decision")?;
        shared.map_err(|e| anyhow!("rank 0 failed: {e}"))
    }

    /// The study's results from its scored rows.
    fn results(
        &self,
        rows: Vec<MethodRow>,
        differences: Vec<Difference>,
        scorer: &Scorer,
        target: &PreparedData,
        test: &Dataset,
    ) -> StudyResults {
        let mut checks =
            StudyResults::improvement_checks(&rows, &differences, &self.config.eval.must_improve);
        checks.push(Check {
            statement: "every FID and KID is a finite number".into(),
            passed: rows
                .iter()
                .all(|r| r.fid.is_finite() && r.kid_mean.is_finite()),
        });
        let clock = &self.layout.clock;
        StudyResults {
            name: self.config.name.clone(),
            git_commit: git_commit(Path::new(env!("CARGO_MANIFEST_DIR"))),
            machine: MachineInfo::detect(self.device),
            world_size: self.group.world_size(),
            fid_features: scorer.description.clone(),
            reference: format!(
                "test split of {} ({} images)",
                target.description,
                test.len()
            ),
            rows,
            uncertainty: format!(
                "bootstrap over the generated and the reference features, {} resamples with replacement, seed {}",
                scorer.bootstrap().resamples,
                scorer.bootstrap().seed
            ),
            differences,
            checks,
            wall_seconds: clock.total(),
            invocations: clock.invocations,
            invocation_seconds: clock.this_invocation(),
            settings_toml: self.settings_toml.clone(),
        }
    }
}
