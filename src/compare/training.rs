//! The training stage: one resumable training run per method (and the pre-training run), with
//! its cost measured. A run is data-parallel over the comparison's ranks; the run file's batch
//! (`batch_size` × `gradient_accumulation_steps`) is the global batch, shared by the W ranks (see
//! [`rank_share`]), so the run computes what one process computes (the learning rate is the run
//! file's, whatever W).
use super::machine::{MemoryKind, PeakMemory};
use super::report::TrainMeasure;
use super::stage::Stage;
use super::Study;
use crate::train::config::RunConfig;
use crate::train::metrics::{MetricsLog, StepMetrics};
use crate::train::trainer::{ADAPTER_FILE, CHECKPOINTS_DIR, METRICS_FILE};
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A finished training run, as recorded in its stage state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub adapter: PathBuf,
    pub trainable_params: u64,
    pub train: TrainMeasure,
}

/// A training run to do: `runs/NAME`, trained from `model` on the dataset folder `data`.
pub struct RunJob<'a> {
    pub name: &'a str,
    pub model: &'a str,
    pub data: &'a Path,
    pub config: RunConfig,
    /// The stage key: what the run is computed from.
    pub key: Value,
}

impl Study<'_> {
    /// Trains (or resumes, or reuses) one run; measures its cost. `None` when interrupted.
    pub(super) fn train_run(&self, job: RunJob) -> Result<Option<RunRecord>> {
        let stage = Stage::Run(job.name);
        let dir = self.layout.run(job.name);
        let (done, resume) = self.on_main(|| {
            let done = self
                .layout
                .enter::<RunRecord>(stage, Some(&dir), &job.key)?;
            Ok((done, dir.join(CHECKPOINTS_DIR).is_dir()))
        })?;
        if let Some(record) = done {
            if self.group.is_main() {
                eprintln!("compare: reusing the finished run in {}", dir.display());
            }
            return Ok(Some(record));
        }
        let mut config = job.config;
        let train = &mut config.train;
        (train.batch_size, train.gradient_accumulation_steps) = rank_share(
            train.batch_size,
            train.gradient_accumulation_steps,
            self.group.world_size(),
        )?;
        let probe = PeakMemory::start(self.device);
        let options = crate::train::TrainOptions {
            model: job.model.to_string(),
            data: job.data.to_path_buf(),
            cache: Some(self.cache_dir(job.data)),
            out: dir.clone(),
            config,
            resume: match resume {
                true => crate::train::Resume::Newest,
                false => crate::train::Resume::No,
            },
            strict: false,
            stop_after: None,
            interrupt: self.opts.interrupt.clone(),
            progress: self.opts.progress,
        };
        let summary = crate::train::trainer::train_in(&options, self.group)
            .with_context(|| format!("training run {}", dir.display()))?;
        let memory = probe.finish();
        if !summary.finished {
            return Ok(None);
        }
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
            };
            self.layout.finish(stage, &job.key, &record)?;
            Ok(record)
        })?;
        Ok(Some(record))
    }

    /// The latent cache of the dataset folder `data`: one per generated domain, one for an
    /// outside dataset.
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
