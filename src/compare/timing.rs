//! The timing pass: Table 2's relative time, measured so that load on the machine does not bend
//! it. Every method's training step (the trainer's own step, [`TimedStep`], on the base model's
//! U-Net at the study's batch and resolution, on random latents) is timed in this one process,
//! the methods taking turns: each round times every method (`warmup` untimed steps, then `steps`
//! timed ones), starting one method later than the round before. A method's ratio to full
//! fine-tuning is taken within each round (median step time over full fine-tuning's median in the
//! same round), where both met the same load, and the reported ratio is the median over rounds,
//! with a 95% bootstrap interval (each method's steps resampled within each round), as
//! `bench/ratio_report.py` reports difftune against its peer. Beside it each method's FLOPs per
//! step, counted from torch's profiler trace of one step ([`crate::train::flops`]).
//!
//! The pass is one unit; its finished rounds are kept (`timing/rounds.json`), so an interrupted
//! pass resumes at its next round.
use super::prepare::BaseModel;
use super::report::TimingRow;
use super::stage::Stage;
use super::Study;
use crate::model::pipeline::{load_scheduler_config, load_unet};
use crate::model::source::ModelFiles;
use crate::model::vae::VaeConfig;
use crate::peft::MethodSettings;
use crate::sample::LatentGeometry;
use crate::train::step::Objective;
use crate::train::timed_step::{StepShape, TimedStep};
use crate::util::fs::{read_json, write_json};
use crate::util::stats::{interval_95, median};
use anyhow::{Context, Result};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// The steps of every method in every round, and their FLOPs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TimingRecord {
    /// Intra-op threads the steps ran with.
    pub threads: i64,
    pub methods: Vec<MethodTiming>,
    /// The 1-minute load average when each round started (where it can be read).
    pub load_average: Vec<Option<f64>>,
}

/// One method's timed steps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MethodTiming {
    pub method: String,
    /// Seconds of each timed step, per round.
    pub rounds: Vec<Vec<f64>>,
    /// FLOPs of one step (see [`crate::train::flops`]).
    pub flops_per_step: f64,
}

/// What the timing pass times: each method's step at the study's shape.
pub struct TimingJob {
    pub methods: Vec<(String, MethodSettings)>,
    pub key: Value,
}

impl Study<'_> {
    /// The timing job of the study's methods on `base`.
    pub(super) fn timing_job(&self, base: &BaseModel) -> TimingJob {
        let timing = &self.config.study.timing;
        let methods = self
            .config
            .methods
            .iter()
            .map(|m| (m.name().to_string(), m.run.method.clone()))
            .collect::<Vec<_>>();
        let key = json!({
            "base": base.identity,
            "methods": methods.iter().map(|(_, m)| m.written()).collect::<Vec<_>>(),
            "batch": self.config.train.batch_size,
            "resolution": self.config.train.resolution,
            "rounds": timing.rounds,
            "steps": timing.steps,
            "warmup": timing.warmup,
            "threads": tch::get_num_threads(),
            "device": format!("{:?}", self.device),
        });
        TimingJob { methods, key }
    }

    /// Runs (or resumes, or reuses) the timing pass on rank 0, which the others wait for. `None`
    /// when interrupted.
    pub(super) fn time_steps(
        &self,
        job: &TimingJob,
        base: &ModelFiles,
    ) -> Result<Option<TimingRecord>> {
        let stage = Stage::Timing;
        self.on_main(|| {
            match self
                .layout
                .enter::<TimingRecord>(stage, Some(&self.layout.timing()), &job.key)?
            {
                Some(done) => Ok(Some(done)),
                None => self.timing_pass(job, base),
            }
        })
    }

    /// The timing pass, continuing from its finished rounds.
    fn timing_pass(&self, job: &TimingJob, base: &ModelFiles) -> Result<Option<TimingRecord>> {
        let progress = self.layout.timing().join("rounds.json");
        let mut record: TimingRecord = match read_json::<(Value, TimingRecord)>(&progress) {
            Ok((key, record)) if key == job.key => record,
            _ => TimingRecord {
                threads: tch::get_num_threads() as i64,
                methods: Vec::new(),
                load_average: Vec::new(),
            },
        };
        let timing = &self.config.study.timing;
        let shape = self.step_shape(base)?;
        if record.methods.is_empty() {
            eprintln!("compare: counting each method's FLOPs per step");
            for (name, method) in &job.methods {
                let mut step = self.timed_step(base, method, &shape)?;
                let flops = crate::train::flops::count_flops(|| step.step())?;
                record.methods.push(MethodTiming {
                    method: name.clone(),
                    rounds: Vec::new(),
                    flops_per_step: flops,
                });
            }
        }
        let methods = job.methods.len();
        while record.load_average.len() < timing.rounds {
            let round = record.load_average.len();
            if self.opts.interrupt.load(Ordering::SeqCst) {
                return Ok(None);
            }
            eprintln!(
                "compare: timing every method's step, round {}/{}",
                round + 1,
                timing.rounds
            );
            let load = super::machine::load_average();
            for turn in 0..methods {
                let index = (round + turn) % methods;
                let times = self.time_method(base, &job.methods[index].1, &shape)?;
                record.methods[index].rounds.push(times);
            }
            record.load_average.push(load);
            write_json(&progress, &(&job.key, &record))?;
        }
        self.layout.finish(Stage::Timing, &job.key, &record)?;
        Ok(Some(record))
    }

    /// One method's turn: a fresh step, its warm-up, then the timed steps' seconds.
    fn time_method(
        &self,
        base: &ModelFiles,
        method: &MethodSettings,
        shape: &StepShape,
    ) -> Result<Vec<f64>> {
        let timing = &self.config.study.timing;
        let mut step = self.timed_step(base, method, shape)?;
        for _ in 0..timing.warmup {
            step.step()?;
        }
        (0..timing.steps)
            .map(|_| {
                let started = Instant::now();
                step.step()?;
                Ok(started.elapsed().as_secs_f64())
            })
            .collect()
    }

    /// The study's step: its batch, at its resolution's latent size, on this device.
    fn step_shape(&self, base: &ModelFiles) -> Result<StepShape> {
        let vae = VaeConfig::from_file(&base.vae.config)?;
        let factor = LatentGeometry::of_vae(&vae).scale_factor;
        let train = &self.config.train;
        Ok(StepShape {
            batch: train.batch_size as i64,
            resolution: train.resolution as i64,
            latent: train.resolution as i64 / factor,
            context_tokens: crate::model::tokenizer::DEFAULT_MAX_LENGTH as i64,
            autocast: crate::train::trainer::uses_autocast(train.precision, self.device),
            channels_last: train.channels_last,
            fused_adamw: false,
        })
    }

    /// `method` on the base model's U-Net, with the study's objective, inputs drawn from seed 0.
    fn timed_step(
        &self,
        base: &ModelFiles,
        method: &MethodSettings,
        shape: &StepShape,
    ) -> Result<TimedStep> {
        let train = &self.config.train;
        let (vs, mut unet) = load_unet(base, self.device)?;
        unet.gradient_checkpointing = train.gradient_checkpointing;
        let objective = Objective::new(&load_scheduler_config(base)?, train)?;
        tch::manual_seed(0);
        TimedStep::new(vs, unet, method, objective, shape).context("setting up a timed step")
    }
}

/// Each method's ratio to `reference` (full fine-tuning) from `record`, with `resamples`
/// bootstrap resamples seeded by `seed`; `None` when the reference was not timed.
pub fn ratios(
    record: &TimingRecord,
    reference: &str,
    resamples: usize,
    seed: u64,
) -> Option<Vec<TimingRow>> {
    let full = record.methods.iter().find(|m| m.method == reference)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let rows = record
        .methods
        .iter()
        .map(|m| {
            let pairs: Vec<(&[f64], &[f64])> = m
                .rounds
                .iter()
                .zip(&full.rounds)
                .map(|(a, b)| (a.as_slice(), b.as_slice()))
                .collect();
            let round_ratios: Vec<f64> = pairs.iter().map(|(a, b)| ratio(a, b)).collect();
            let draws: Vec<f64> = (0..resamples)
                .map(|_| {
                    let mut resampled: Vec<f64> = pairs
                        .iter()
                        .map(|(a, b)| ratio(&resample(a, &mut rng), &resample(b, &mut rng)))
                        .collect();
                    median(&mut resampled)
                })
                .collect();
            let (ratio_low, ratio_high) = interval_95(&draws);
            let mut all: Vec<f64> = m.rounds.iter().flatten().copied().collect();
            TimingRow {
                method: m.method.clone(),
                median_step_seconds: median(&mut all),
                ratio: median(&mut round_ratios.clone()),
                ratio_low,
                ratio_high,
                round_ratios,
                flops_per_step: m.flops_per_step,
            }
        })
        .collect();
    Some(rows)
}

fn ratio(steps: &[f64], reference: &[f64]) -> f64 {
    median(&mut steps.to_vec()) / median(&mut reference.to_vec())
}

fn resample(values: &[f64], rng: &mut ChaCha8Rng) -> Vec<f64> {
    (0..values.len())
        .map(|_| values[rng.random_range(0..values.len())])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(method: &str, rounds: Vec<Vec<f64>>) -> MethodTiming {
        MethodTiming {
            method: method.into(),
            rounds,
            flops_per_step: 1.0,
        }
    }

    #[test]
    fn ratios_are_taken_within_rounds_so_load_between_rounds_cancels() {
        // Round 2 ran under load twice as heavy for both methods.
        let record = TimingRecord {
            threads: 1,
            methods: vec![
                timing(
                    "full",
                    vec![
                        vec![1.0, 1.1, 0.9],
                        vec![2.0, 2.2, 1.8],
                        vec![1.0, 1.0, 1.0],
                    ],
                ),
                timing(
                    "lora",
                    vec![
                        vec![0.5, 0.55, 0.45],
                        vec![1.0, 1.1, 0.9],
                        vec![0.5, 0.5, 0.5],
                    ],
                ),
            ],
            load_average: vec![Some(0.1), Some(2.0), Some(0.1)],
        };
        let rows = ratios(&record, "full", 200, 0).unwrap();
        assert_eq!(rows[0].ratio, 1.0);
        assert_eq!(rows[1].ratio, 0.5);
        assert_eq!(rows[1].round_ratios, vec![0.5, 0.5, 0.5]);
        assert!(rows[1].ratio_low <= 0.5 && 0.5 <= rows[1].ratio_high);
        assert!(ratios(&record, "adapter", 10, 0).is_none());
    }
}
