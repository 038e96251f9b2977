//! The training stage: one resumable training run per method (and the pre-training run), with
//! its cost measured.
use super::machine::{MemoryKind, PeakMemory};
use super::prepare::PreparedData;
use super::report::TrainMeasure;
use super::stage::Stage;
use super::Study;
use crate::train::config::RunConfig;
use crate::train::metrics::{MetricsLog, StepMetrics};
use crate::train::trainer::{ADAPTER_FILE, CHECKPOINTS_DIR, METRICS_FILE};
use anyhow::{Context, Result};
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

/// A training run to do: `runs/NAME`, trained from `model` on `data`.
pub struct RunJob<'a> {
    pub name: &'a str,
    pub model: &'a str,
    pub data: &'a PreparedData,
    pub config: RunConfig,
    /// The stage key: what the run is computed from.
    pub key: Value,
}

impl Study<'_> {
    /// Trains (or resumes, or reuses) one run; measures its cost. `None` when interrupted.
    pub(super) fn train_run(&self, job: RunJob) -> Result<Option<RunRecord>> {
        let stage = Stage::Run(job.name);
        let dir = self.layout.run(job.name);
        if let Some(record) = self
            .layout
            .enter::<RunRecord>(stage, Some(&dir), &job.key)?
        {
            eprintln!("compare: reusing the finished run in {}", dir.display());
            return Ok(Some(record));
        }
        let probe = PeakMemory::start(job.config.train.device.resolve()?);
        let summary = crate::train::train(&crate::train::TrainOptions {
            model: job.model.to_string(),
            data: job.data.path.clone(),
            cache: Some(self.cache_dir(job.data)),
            out: dir.clone(),
            config: job.config,
            resume: dir.join(CHECKPOINTS_DIR).is_dir(),
            strict: false,
            stop_after: None,
            interrupt: self.opts.interrupt.clone(),
            progress: self.opts.progress,
        })
        .with_context(|| format!("training run {}", dir.display()))?;
        let memory = probe.finish();
        if !summary.finished {
            return Ok(None);
        }
        let metrics = MetricsLog::read(&dir.join(METRICS_FILE))?;
        let record = RunRecord {
            adapter: summary.adapter.unwrap_or_else(|| dir.join(ADAPTER_FILE)),
            trainable_params: summary.trainable_parameters as u64,
            train: measure(summary.step, &metrics, memory),
        };
        self.layout.finish(stage, &job.key, &record)?;
        Ok(Some(record))
    }

    /// The latent cache of `data`: one per generated domain, one for an outside dataset.
    fn cache_dir(&self, data: &PreparedData) -> PathBuf {
        let domain = match data.path.starts_with(&self.layout.root) {
            true => data.path.file_name(),
            false => None,
        };
        self.layout.cache(
            &domain
                .map(|d| d.to_string_lossy().into_owned())
                .unwrap_or_else(|| "data".into()),
        )
    }
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
