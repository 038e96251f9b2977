//! The training stage: resumable training runs (each method's runs and learning-rate candidates,
//! and the pre-training run), with their cost measured and their weights kept at the steps the
//! study scores along the budget. A run is data-parallel over the comparison's ranks; the run file's batch
//! (`batch_size` × `gradient_accumulation_steps`) is the global batch, shared by the W ranks (see
//! [`rank_share`]), so the run computes what one process computes (the learning rate is the run
//! file's, whatever W).
use super::config::MethodEntry;
use super::machine::{MemoryKind, PeakMemory};
use super::report::TrainMeasure;
use super::stage::Stage;
use super::Study;
use crate::train::checkpoint;
use crate::train::config::RunConfig;
use crate::train::metrics::{MetricsLog, StepMetrics};
use crate::train::trainer::{ADAPTER_FILE, CHECKPOINTS_DIR, EMA_PREFIX, METRICS_FILE};
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A finished training run, as recorded in its stage state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub adapter: PathBuf,
    pub trainable_params: u64,
    pub train: TrainMeasure,
    /// The adapter files of the run's weights at `eval.at_steps`, by step.
    #[serde(default)]
    pub at_steps: BTreeMap<usize, PathBuf>,
}

/// A finished final run of a method with the stage key it was trained under.
pub struct TrainedRun<'a> {
    pub method: &'a MethodEntry,
    /// Its index among the method's runs.
    pub run: usize,
    pub seed: u64,
    pub key: Value,
    pub record: RunRecord,
}

/// A training run to do: `runs/NAME`, trained from `model` on the dataset folder `data`.
#[derive(Debug, Clone)]
pub struct RunJob {
    pub name: String,
    pub model: String,
    pub data: PathBuf,
    pub config: RunConfig,
    /// Steps whose weights are saved as adapter files too (each below the run's steps).
    pub at_steps: Vec<usize>,
    /// The stage key: what the run is computed from.
    pub key: Value,
}

/// The adapter file of a run's weights at `step`, in the run's folder.
fn adapter_at(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("adapter-step-{step:08}.safetensors"))
}

impl Study<'_> {
    /// Trains (or resumes, or reuses) one run; measures its cost. `None` when interrupted. A run
    /// with `at_steps` trains up to each of them in turn (stopping there with a checkpoint, as a
    /// time-sliced run does, which resuming continues exactly) and saves its weights there as an
    /// adapter file before going on. A finished run that lacks one of them is trained again.
    pub(super) fn train_run(&self, job: RunJob) -> Result<Option<RunRecord>> {
        let stage = Stage::Run(&job.name);
        let dir = self.layout.run(&job.name);
        let (done, resume) = self.on_main(|| {
            let done = self
                .layout
                .enter::<RunRecord>(stage, Some(&dir), &job.key)?;
            let complete = done.filter(|r| job.at_steps.iter().all(|s| r.at_steps.contains_key(s)));
            if complete.is_none() && passed_without(&dir, &job)? {
                eprintln!("compare: {stage}: needs its weights at other steps, training it again");
                self.layout.reset(stage, &dir, &job.key)?;
            }
            Ok((complete, dir.join(CHECKPOINTS_DIR).is_dir()))
        })?;
        if let Some(record) = done {
            if self.group.is_main() {
                eprintln!("compare: reusing the finished run in {}", dir.display());
            }
            return Ok(Some(record));
        }
        let probe = PeakMemory::start(self.device);
        let mut resume = resume;
        for &target in &job.at_steps {
            if adapter_at(&dir, target).is_file() {
                continue;
            }
            let reached = self.on_main(|| reached_step(&dir))?;
            if reached < target {
                let trained = self.train_segment(&job, &dir, resume, Some(target - reached))?;
                resume = true;
                if trained.step != target {
                    return Ok(None);
                }
                self.on_main(|| save_weights_at(&dir, &job, target))?;
                if trained.interrupted {
                    return Ok(None);
                }
            } else {
                // Stopped there before its weights were saved.
                self.on_main(|| save_weights_at(&dir, &job, target))?;
            }
        }
        let summary = self.train_segment(&job, &dir, resume, None)?;
        if !summary.finished {
            return Ok(None);
        }
        let memory = probe.finish();
        // Rank 0 records the run once it has written the adapter the others go on to sample with.
        let record = self.on_main(|| {
            let metrics = MetricsLog::read(&dir.join(METRICS_FILE))?;
            let record = RunRecord {
                adapter: summary
                    .adapter
                    .clone()
                    .unwrap_or_else(|| dir.join(ADAPTER_FILE)),
                trainable_params: summary.trainable_parameters as u64,
                train: measure(summary.step, &metrics, memory),
                at_steps: job
                    .at_steps
                    .iter()
                    .map(|&s| (s, adapter_at(&dir, s)))
                    .collect(),
            };
            self.layout.finish(stage, &job.key, &record)?;
            Ok(record)
        })?;
        Ok(Some(record))
    }

    /// Trains the run in `dir` on (resuming when `resume`), for `stop_after` steps or to its end.
    fn train_segment(
        &self,
        job: &RunJob,
        dir: &Path,
        resume: bool,
        stop_after: Option<usize>,
    ) -> Result<crate::train::TrainSummary> {
        let mut config = job.config.clone();
        let train = &mut config.train;
        (train.batch_size, train.gradient_accumulation_steps) = rank_share(
            train.batch_size,
            train.gradient_accumulation_steps,
            self.group.world_size(),
        )?;
        let options = crate::train::TrainOptions {
            model: job.model.clone(),
            data: job.data.clone(),
            cache: Some(self.cache_dir(&job.data)),
            out: dir.to_path_buf(),
            config,
            resume: match resume {
                true => crate::train::Resume::Newest,
                false => crate::train::Resume::No,
            },
            strict: false,
            stop_after,
            interrupt: self.opts.interrupt.clone(),
            progress: self.opts.progress,
        };
        crate::train::trainer::train_in(&options, self.group)
            .with_context(|| format!("training run {}", dir.display()))
    }

    /// The latent cache of the dataset folder `data`: one per generated domain (and split), one
    /// for an outside dataset.
    fn cache_dir(&self, data: &Path) -> PathBuf {
        let domain = match data.starts_with(&self.layout.root) {
            true => data.file_name(),
            false => None,
        };
        self.layout.cache(
            &domain
                .map(|d| d.to_string_lossy().into_owned())
                .unwrap_or_else(|| "data".into()),
        )
    }
}

/// Whether the run in `dir` trained past one of the job's steps without saving its weights
/// there (it finished, or stopped later, under settings that did not ask for that step): its
/// checkpoint there is gone, so the run is trained again.
fn passed_without(dir: &Path, job: &RunJob) -> Result<bool> {
    let reached = match dir.join(ADAPTER_FILE).is_file() {
        true => usize::MAX,
        false => reached_step(dir)?,
    };
    Ok(job
        .at_steps
        .iter()
        .any(|&s| s < reached && !adapter_at(dir, s).is_file()))
}

/// The step of the newest checkpoint in the run folder `dir` (0 without one).
fn reached_step(dir: &Path) -> Result<usize> {
    Ok(checkpoint::latest(&dir.join(CHECKPOINTS_DIR))?.map_or(0, |c| c.state.step))
}

/// Saves the run's weights at `step` (its newest checkpoint, which the segment that stopped there
/// wrote) as an adapter file: the exponential moving average's when the run keeps one, as its
/// final adapter file is.
fn save_weights_at(dir: &Path, job: &RunJob, step: usize) -> Result<()> {
    let found = checkpoint::latest(&dir.join(CHECKPOINTS_DIR))?
        .filter(|c| c.state.step == step)
        .with_context(|| format!("{} has no checkpoint at step {step}", dir.display()))?;
    let weights: Vec<(String, tch::Tensor)> = match job.config.train.ema {
        Some(_) => found
            .optimizer()?
            .into_iter()
            .filter_map(|(name, t)| Some((name.strip_prefix(EMA_PREFIX)?.to_string(), t)))
            .collect(),
        None => found.trainable()?.into_iter().collect(),
    };
    let method = job.config.method.build();
    crate::peft::file::save_adapter(
        &adapter_at(dir, step),
        method.as_ref(),
        &weights,
        &found.state.base_unet,
    )
}

/// Each rank's `(batch_size, gradient_accumulation_steps)` when `world` ranks share a run whose
/// run file trains `batch` samples per forward pass and `accumulation` passes per step, so that
/// every step sees the same global batch `batch × accumulation` (the same samples: rank `r`'s
/// forward pass `f` reads global positions `(f W + r) b ..`, see [`crate::train::batches`]):
/// the largest per-rank batch up to `batch` that divides the rank's share of the global batch,
/// with as many accumulation steps as fill it. Refused when the ranks cannot share it evenly (a
/// different global batch would train something else than one process does).
pub(super) fn rank_share(
    batch: usize,
    accumulation: usize,
    world: usize,
) -> Result<(usize, usize)> {
    let global = batch * accumulation;
    ensure!(
        global.is_multiple_of(world),
        "its global batch of {global} (batch_size {batch} x gradient_accumulation_steps \
         {accumulation}) cannot be shared evenly by {world} ranks: use a global batch divisible \
         by {world} (the learning rate is not rescaled either way) or another number of ranks"
    );
    let share = global / world;
    let per_pass = (1..=batch.min(share))
        .rev()
        .find(|b| share.is_multiple_of(*b))
        .unwrap_or(1);
    Ok((per_pass, share / per_pass))
}

/// The costs of a run of `steps` steps from its step metrics and its peak memory.
fn measure(
    steps: usize,
    metrics: &[StepMetrics],
    (memory_kind, peak_memory_bytes): (MemoryKind, Option<u64>),
) -> TrainMeasure {
    let mut step_times: Vec<f64> = metrics.iter().map(|m| m.step_time_s).collect();
    let total_seconds = step_times.iter().sum();
    let tail = (metrics.len() / 10).max(1).min(metrics.len());
    let final_loss = (!metrics.is_empty()).then(|| {
        metrics[metrics.len() - tail..]
            .iter()
            .map(|m| m.loss)
            .sum::<f64>()
            / tail as f64
    });
    TrainMeasure {
        steps,
        total_seconds,
        median_step_seconds: crate::util::stats::median(&mut step_times),
        peak_memory_bytes,
        memory_kind,
        final_loss,
    }
}

/// The training loss curve of the run whose adapter is `adapter`.
pub fn loss_points(adapter: &Path) -> Result<Vec<(f64, f64)>> {
    let metrics = MetricsLog::read(&adapter.with_file_name(METRICS_FILE))?;
    Ok(metrics.iter().map(|m| (m.step as f64, m.loss)).collect())
}

#[cfg(test)]
mod tests {
    use super::rank_share;

    #[test]
    fn ranks_share_the_global_batch() {
        assert_eq!(rank_share(8, 1, 1).unwrap(), (8, 1));
        assert_eq!(rank_share(4, 1, 2).unwrap(), (2, 1));
        // The study's batch 1 x 4 accumulation steps on 2 and 4 ranks.
        assert_eq!(rank_share(1, 4, 2).unwrap(), (1, 2));
        assert_eq!(rank_share(1, 4, 4).unwrap(), (1, 1));
        assert_eq!(rank_share(6, 2, 4).unwrap(), (3, 1));
        assert_eq!(rank_share(4, 3, 3).unwrap(), (4, 1));
        assert_eq!(rank_share(4, 3, 2).unwrap(), (3, 2));
        let refused = rank_share(1, 4, 8).unwrap_err().to_string();
        assert!(refused.contains("global batch of 4"), "{refused}");
        assert!(rank_share(3, 1, 2).is_err());
    }
}
