//! The training log: one JSON object per optimizer step in `metrics.jsonl`, and the process's
//! peak memory.
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    /// Optimizer steps done (1 after the first update).
    pub step: usize,
    /// Mean loss over the step's accumulated forward passes.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Wall time of the step (data, forwards, backwards, update), seconds.
    pub step_time_s: f64,
    /// Peak resident memory of the process so far (`VmHWM`), bytes; `None` where unknown.
    pub peak_rss_bytes: Option<u64>,
    pub epoch: usize,
    /// Samples per optimizer step over all ranks: world size × batch × accumulation.
    #[serde(default)]
    pub global_batch: usize,
    /// Wall time of the step's gradient all-reduce (data-parallel runs only), seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all_reduce_s: Option<f64>,
}

impl StepMetrics {
    /// The scalars TensorBoard shows, tagged as (section/name).
    pub fn scalars(&self) -> Vec<(&'static str, f64)> {
        let mut scalars = vec![
            ("train/loss", self.loss),
            ("train/lr", self.lr),
            ("train/grad_norm", self.grad_norm),
            ("train/step_time_s", self.step_time_s),
            ("train/epoch", self.epoch as f64),
        ];
        if let Some(bytes) = self.peak_rss_bytes {
            scalars.push(("system/peak_rss_gib", bytes as f64 / (1u64 << 30) as f64));
        }
        scalars
    }
}

/// Appends step metrics to a JSONL file.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `path` for appending. When resuming from step `keep_through`, the log is cut after
    /// that step's line (dropping what the interrupted run logged after its checkpoint, and a line
    /// torn by a kill), so it has exactly one line per step; a fresh run (`keep_through` 0) starts
    /// an empty log. The file is cut in place: no temp copy of it exists for a kill to leave behind.
    pub fn open(path: &Path, keep_through: usize) -> Result<Self> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut kept = 0;
        if keep_through > 0 {
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)
                .with_context(|| format!("reading {}", path.display()))?;
            // The leading whole lines of steps up to `keep_through`.
            for line in bytes.split_inclusive(|&b| b == b'\n') {
                let step = serde_json::from_slice::<StepMetrics>(line).map(|m| m.step);
                if !line.ends_with(b"\n") || !step.is_ok_and(|s| s <= keep_through) {
                    break;
                }
                kept += line.len();
            }
        }
        file.set_len(kept as u64)
            .with_context(|| format!("truncating {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn append(&mut self, metrics: &StepMetrics) -> Result<()> {
        let line = serde_json::to_string(metrics)? + "\n";
        self.file
            .write_all(line.as_bytes())
            .with_context(|| format!("appending to {}", self.path.display()))
    }

    /// Reads every line of a metrics file.
    pub fn read(path: &Path) -> Result<Vec<StepMetrics>> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        text.lines()
            .enumerate()
            .map(|(i, line)| {
                serde_json::from_str(line)
                    .with_context(|| format!("{} line {}", path.display(), i + 1))
            })
            .collect()
    }
}

/// The process's peak resident set size (`VmHWM` in `/proc/self/status`), where Linux reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
