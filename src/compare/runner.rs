//! Running a comparison: data, base model, the learning-rate search, every method's training
//! runs, the timing pass and the content classifier, samples of the same prompts and seeds from
//! every model (at the end of every run and along it), their scores, and the report. The study is
//! a sequence of waves of independent units (see [`super::units`]), each a resumable stage (see
//! [`super::stage`]): an interrupted comparison picks up where it stopped, and editing, say, the
//! sampling settings redoes only sampling and scoring; adding a run or a candidate adds its units
//! and reuses the others.
//!
//! Under a launcher ([`run_in`] with a group of several ranks) every stage runs on every rank:
//! rank 0 alone holds the lock, reads and writes the stage states (and broadcasts what it
//! decided), generates the data, writes the tiny model and merges the base model, times the steps
//! and trains the content classifier, while the others wait; the training runs are data-parallel
//! (the configured batch × accumulation is the global batch, shared evenly by the ranks); each
//! rank samples a contiguous share of whole sampling batches and extracts the Inception features
//! of a share of the images; rank 0 computes the scores and writes the outputs.
use super::claim::FolderUse;
use super::config::{CompareConfig, DataSource, MethodEntry, ModelSource};
use super::lr_search::LearningRates;
use super::prepare::{BaseModel, PreparedData};
use super::report::StudyResults;
use super::sampling::{sample_plan, SampleItem, SampleJob, SampledSet, StudySet};
use super::score::{Content, Score, Scorer, ScorerWeights};
use super::stage::Layout;
use super::teams::Teams;
use super::training::{RunJob, TrainedRun};
use super::units::{serial, RunId, SetId};
use crate::data::synthetic::Domain;
use crate::data::{Dataset, DatasetOptions, Split};
use crate::dist::ProcessGroup;
use crate::error::SettingsError;
use crate::eval::classifier::ContentClassifier;
use crate::model::source::ModelFiles;
use crate::schedulers::SchedulerKind;
use crate::util::progress::Progress;
use anyhow::{anyhow, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;
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
    /// This rank's part of a comparison under a launcher is done; rank 0 holds the results
    /// (and, data-parallel, wrote the outputs).
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
    /// The teams that train the data-parallel runs of a run-parallel study (see
    /// [`super::teams`]); none otherwise.
    pub teams: &'a Teams,
    /// The machine's load averages when this invocation started.
    pub load_at_start: Option<[f64; 3]>,
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
    let device = group.local_device(opts.config.train.device.resolve()?);
    run_on(opts, group, device, &Teams::none())
}

/// [`run_in`] with this rank's tensors on `device` and the data-parallel runs trained by
/// `teams` (the run-parallel ranks of [`super::ranks`] each run alone on their launcher rank's
/// device, and in teams).
pub(super) fn run_on(
    opts: &CompareOptions,
    group: &ProcessGroup,
    device: Device,
    teams: &Teams,
) -> Result<Outcome> {
    let config = &opts.config;
    // Everything is checked before the lock, which creates the output folder.
    config.validate()?;
    check_world_size(config, group.world_size())?;
    check_inputs(config)?;
    let main = group.is_main();
    let settings_toml = config.to_toml()?;
    // Without a launcher, processes on one folder cooperate (see super::claim).
    let folder = match main {
        true => Some(FolderUse::enter(
            &opts.out,
            CONFIG_FILE,
            &settings_toml,
            !group.is_distributed(),
        )?),
        false => None,
    };
    let study = Study {
        config,
        opts,
        layout: match main {
            true => Layout::create(&opts.out)?,
            false => Layout::open(&opts.out),
        },
        device,
        settings_toml,
        group,
        teams,
        load_at_start: super::machine::load_averages(),
    };

    // Wave 1: the data and the base model.
    let target = study.prepare_dataset(Domain::Target)?;
    let source = match config.pretrain.is_some() || config.eval.classifier.is_some() {
        true => Some(study.prepare_dataset(Domain::Source)?),
        false => None,
    };
    let pretrain_source = source.as_ref().filter(|_| config.pretrain.is_some());
    let spec = or_interrupted!(study.prepare_base_model(&target, pretrain_source)?);
    let files = ModelFiles::resolve(&spec, None)?;
    let base = BaseModel {
        identity: files.unet_identity()?,
        files,
        spec,
    };
    let weights = study.on_main(|| ScorerWeights::choose(&config.eval, &study.layout.eval()))?;
    let scorer = Scorer::new(&config.eval, study.device, weights)?;

    // Wave 2: the learning-rate search.
    let rates = or_interrupted!(study.choose_learning_rates(&base, &target, &scorer)?);
    // Wave 3: the final runs, the timing pass and the content classifier.
    let runs = or_interrupted!(study.train_methods(&base, &target, &rates)?);
    let timing = match config.study.timing.rounds {
        0 => None,
        _ => Some(or_interrupted!(
            study.time_steps(&study.timing_job(&base), &base.files)?
        )),
    };
    let classifier = match &source {
        Some(source) => study.train_classifier(&target, source)?,
        None => None,
    };

    // Waves 4 and 5: every sample set, then its scores.
    let test = Dataset::open(
        &target.path,
        &DatasetOptions {
            split: Split::Test,
            ..Default::default()
        },
    )?;
    let plan = sample_plan(config, &test)?;
    let sets = study_sets(&runs);
    let sampled = or_interrupted!(study.sample_sets(&base, &sets, &plan)?);
    if group.any(opts.interrupt.load(Ordering::SeqCst))? {
        return Ok(Outcome::Interrupted);
    }
    let content = match &classifier {
        Some(record) => Some(ContentClassifier::load(&record.weights)?),
        None => None,
    };
    let scores = study.score_sets(
        &target,
        &test,
        &sets,
        &sampled,
        &plan,
        &scorer,
        content.as_ref(),
    )?;
    let Some(scores) = scores else {
        return Ok(Outcome::FinishedOnMainRank);
    };
    let records = super::results::Records {
        base: &base,
        target: &target,
        test: &test,
        scorer: &scorer,
        rates,
        runs: &runs,
        sets: &sets,
        sampled: &sampled,
        scores: &scores,
        timing,
        classifier,
    };
    let results = study.results(records)?;
    // Of the processes on the folder, the last to leave writes the report.
    match folder.map(|f| f.leave(&opts.out)).transpose()?.flatten() {
        Some(_turn) => {
            study.write_outputs(&results, &runs, &plan, &test)?;
            study.layout.save_clock()?;
            eprintln!("compare: wrote the report in {}", opts.out.display());
        }
        None => eprintln!(
            "compare: every unit is done; the last process to leave {} writes the report",
            opts.out.display()
        ),
    }
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

/// The study's sample sets: the base model's, then each method's runs in order, each at its end
/// and then at each of its kept steps.
fn study_sets<'a>(runs: &'a [TrainedRun<'a>]) -> Vec<StudySet<'a>> {
    let mut sets = vec![StudySet {
        id: SetId::base(),
        adapter: None,
        run: None,
    }];
    for run in runs {
        let id = RunId::final_run(run.method.name(), run.run);
        sets.push(StudySet {
            id: SetId {
                run: Some(id.clone()),
                step: None,
            },
            adapter: Some(run.record.adapter.clone()),
            run: Some(run),
        });
        for (&step, adapter) in &run.record.at_steps {
            sets.push(StudySet {
                id: SetId {
                    run: Some(id.clone()),
                    step: Some(step),
                },
                adapter: Some(adapter.clone()),
                run: Some(run),
            });
        }
    }
    sets
}

impl<'a> Study<'a> {
    /// Trains every method's runs from the base model on the target data, at the rates chosen.
    /// `None` when interrupted.
    fn train_methods(
        &self,
        base: &BaseModel,
        target: &PreparedData,
        rates: &LearningRates,
    ) -> Result<Option<Vec<TrainedRun<'a>>>> {
        // Its index, method, run and job.
        type Unit<'m> = (usize, &'m MethodEntry, usize, RunJob);
        let methods = &self.config.methods;
        let mut units: Vec<Unit<'a>> = Vec::new();
        for (method, &learning_rate) in methods.iter().zip(&rates.rates) {
            for run in 0..self.config.study.runs {
                let mut config = method.run.clone();
                config.train.learning_rate = learning_rate;
                config.train.seed = method.run.train.seed + run as u64;
                let key =
                    json!({ "base": base.identity, "data": target.key, "run": config.to_toml()? });
                let job = RunJob {
                    name: RunId::final_run(method.name(), run).name(),
                    model: base.spec.clone(),
                    data: target.path.clone(),
                    config,
                    at_steps: self.config.eval.at_steps.clone(),
                    key,
                };
                units.push((units.len(), method, run, job));
            }
        }
        let total = units.len();
        let train = |study: &Study<'a>,
                     (index, method, run, job): &Unit<'a>|
         -> Result<Option<TrainedRun<'a>>> {
            if study.group.is_main() {
                eprintln!(
                    "compare: [{}/{total}] {} run {run}",
                    index + 1,
                    method.label()
                );
            }
            Ok(study.train_run(job.clone())?.map(|record| TrainedRun {
                method,
                run: *run,
                seed: job.config.train.seed,
                key: job.key.clone(),
                record,
            }))
        };
        self.train_wave(&units, |(_, method, _, job)| (method.name(), job), train)
    }

    /// Samples the plan with every set. `None` when interrupted.
    fn sample_sets(
        &self,
        base: &BaseModel,
        sets: &[StudySet],
        plan: &[SampleItem],
    ) -> Result<Option<Vec<SampledSet>>> {
        let samples_key = json!({
            "base": base.identity,
            "sample": self.config.sample,
            "resolution": self.config.sample_resolution(),
            "plan": plan,
        });
        serial(sets, |set| {
            let mut key = json!({ "samples": samples_key, "run": set.run.map(|r| &r.key) });
            if let Some(step) = set.id.step {
                key["step"] = json!(step);
            }
            let job = SampleJob {
                set: set.id.name(),
                adapter: set.adapter.clone(),
                key,
            };
            if self.group.is_main() {
                eprintln!("compare: sampling {} images with {}", plan.len(), job.set);
            }
            Ok(self
                .sample_row(&job, &base.files, plan)?
                .map(|record| SampledSet {
                    key: job.key,
                    record,
                }))
        })
    }

    /// Scores every set against the test split (and with the content classifier): every rank
    /// extracts the features of its share of the images, rank 0 computes the scores. `None` on
    /// the other ranks.
    #[allow(clippy::too_many_arguments)]
    fn score_sets(
        &self,
        target: &PreparedData,
        test: &Dataset,
        sets: &[StudySet],
        sampled: &[SampledSet],
        plan: &[SampleItem],
        scorer: &Scorer,
        classifier: Option<&ContentClassifier>,
    ) -> Result<Option<Vec<Score>>> {
        if self.group.is_main() {
            eprintln!("compare: scoring");
        }
        let reference_key = format!("{}|{}|test|{}", scorer.identity, target.key, test.len());
        let visible = self.opts.progress && self.group.is_main();
        let progress = Progress::new(
            "compare scoring",
            sets.len() as u64 + 1,
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
        let intended: Vec<i64> = plan.iter().map(|item| item.class as i64).collect();
        let content_key = self.config.eval.classifier.as_ref().map(|s| json!(s));
        // Units like the others: cooperating processes score different sets.
        let scores = serial(sets.iter().zip(sampled), |(set, sampled)| {
            let name = set.id.name();
            let key = json!({
                "samples": sampled.key,
                "scores": scorer.key(),
                "reference": reference_key,
                "content": content_key,
            });
            let content = classifier.map(|classifier| Content {
                classifier,
                intended: &intended,
            });
            let paths = self.sample_paths(&name, plan);
            let score = self.score_set(&name, &key, scorer, reference.as_ref(), &paths, content)?;
            progress.set_message(name);
            progress.inc(1);
            Ok(Some(score))
        })?;
        let scores: Vec<Score> = scores.into_iter().flatten().flatten().collect();
        progress.finish_and_clear();
        Ok(self.group.is_main().then_some(scores))
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
}
