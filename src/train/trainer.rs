//! The training loop: the latent cache in, a tuned adapter out, with metrics, checkpoints, exact
//! resume, Ctrl-C handling and a stop on a non-finite loss. [`train`] reads as the loop it is;
//! [`Trainer`] holds the run's state and does each part (see [`super::batches`] for how every
//! random draw is seeded from the run's seed and the sample's position).
use super::batches::{prepare_cache, Batches, CachedBatch};
use super::checkpoint::{self, Checkpoint, CheckpointState};
use super::config::{Precision, RunConfig};
use super::metrics::{peak_rss_bytes, MetricsLog, StepMetrics};
use super::optim::AdamW;
use super::step::{attach_method, forward_backward, Objective};
use super::validation::{TrainedUnet, Validation};
use crate::model::source::ModelFiles;
use crate::peft::Tuned;
use anyhow::{bail, ensure, Context, Result};
use indicatif::ProgressBar;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Tensor};

/// What to train, from where, to where.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// A diffusers model folder or hub id.
    pub model: String,
    /// A dataset folder (cached first) or a cache folder made by `difftune cache`.
    pub data: PathBuf,
    /// Where a dataset's cache goes; default `OUT/cache`.
    pub cache: Option<PathBuf>,
    pub out: PathBuf,
    pub config: RunConfig,
    /// Continue from the newest checkpoint in `OUT/checkpoints`.
    pub resume: bool,
    /// Fail on an unreadable image instead of skipping it.
    pub strict: bool,
    /// Stop after this many optimizer steps in this invocation, saving a checkpoint, as an
    /// interrupted run does (for time-sliced jobs).
    pub stop_after: Option<usize>,
    /// Set (by a Ctrl-C handler) to save a checkpoint and stop after the current step.
    pub interrupt: Arc<AtomicBool>,
    /// Draw a progress bar.
    pub progress: bool,
}

/// How a call of [`train`] ended.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Optimizer steps done in total (including those of resumed runs).
    pub step: usize,
    /// All configured steps are done and the adapter is saved.
    pub finished: bool,
    /// The adapter file, when finished.
    pub adapter: Option<PathBuf>,
    pub checkpoint: Option<PathBuf>,
    pub trainable_parameters: usize,
    pub cached_samples: usize,
}

/// Names of the files a run writes in its output folder.
pub const RUN_CONFIG_FILE: &str = "run.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const ADAPTER_FILE: &str = "adapter.safetensors";

/// How a run computes on `device` under `precision`: whether the U-Net runs under bf16 autocast.
fn uses_autocast(precision: Precision, device: Device) -> bool {
    match precision {
        Precision::Auto => device.is_cuda(),
        Precision::Fp32 => false,
        Precision::Bf16 => true,
    }
}

/// Creates the output folder and writes the run config; returns the newest checkpoint when the
/// run is to resume from it. Checkpoints in a folder that is not resumed are an error.
fn open_run_folder(opts: &TrainOptions, config_text: &str) -> Result<Option<Checkpoint>> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let latest = checkpoint::latest(&opts.out.join(CHECKPOINTS_DIR))?;
    if latest.is_some() && !opts.resume {
        bail!(
            "{} already holds checkpoints of a run: pass --resume to continue it, or choose another --out",
            opts.out.display()
        );
    }
    crate::util::fs::write_atomic_str(&opts.out.join(RUN_CONFIG_FILE), config_text)?;
    Ok(latest)
}

/// One training run in memory: the model with its method attached, the optimizer, the data and
/// the position reached. [`train`] drives it; the pieces the next features need go here:
///
/// - a data-parallel group: broadcast the trainable tensors at the end of [`Trainer::restore`],
///   all-reduce the optimizer's gradients in [`Trainer::step`] before the update (which takes the
///   norm and clips), and let rank 0 alone own the [`RunLog`], [`Trainer::save`] and
///   [`Trainer::validate`];
/// - EMA weights: updated in [`Trainer::step`] after the optimizer, saved by [`Trainer::save`];
/// - prefetching: [`Batches::read`] is the CPU part of a forward pass's input (no random draw),
///   so a background thread can read the next one while [`Trainer::step`] computes;
/// - checkpoint verification with fallback to an older one: [`Trainer::restore`];
/// - signals: whatever sets [`TrainOptions::interrupt`] (the CLI's handler) stops the loop.
pub struct Trainer<'a> {
    opts: &'a TrainOptions,
    device: Device,
    autocast: bool,
    base_unet: String,
    config_text: String,
    batches: Batches,
    objective: Objective,
    model: TrainedUnet,
    /// The method and the parameters it added (kept alive here) and trains.
    tuned: Tuned,
    optimizer: AdamW,
    validation: Option<Validation>,
    /// The checkpoint [`Trainer::restore`] continues from.
    resume_from: Option<Checkpoint>,
    steps_done: usize,
    last_saved: Option<(usize, PathBuf)>,
}

impl<'a> Trainer<'a> {
    /// Loads the model, attaches the method, builds the optimizer and the latent cache.
    pub fn setup(opts: &'a TrainOptions) -> Result<Self> {
        let config = &opts.config;
        let train = &config.train;
        train.validate()?;
        let device = train.device.resolve()?;
        let autocast = uses_autocast(train.precision, device);
        let files = ModelFiles::resolve(&opts.model, None)?;
        let base_unet = files.unet_identity()?;
        let config_text = config.to_toml()?;
        let resume_from = open_run_folder(opts, &config_text)?;

        let cache_dir = prepare_cache(opts, &files, device)?;
        let scaling = crate::model::vae::VaeConfig::from_file(&files.vae.config)?.scaling_factor;
        let batches = Batches::open(&cache_dir, train.seed, train.batch_size, scaling)?;

        let (mut unet_vs, mut unet) = crate::model::pipeline::load_unet(&files, device)?;
        unet.gradient_checkpointing = train.gradient_checkpointing;
        let scheduler = crate::model::pipeline::load_scheduler_config(&files)?;
        let objective = Objective::new(&scheduler, train)?;
        let tuned = attach_method(&mut unet, &mut unet_vs, &config.method, train.seed)?;
        let tensors: Vec<Tensor> = tuned
            .trained
            .iter()
            .map(|(_, t)| t.shallow_clone())
            .collect();
        if autocast {
            super::precision::freeze_to_bf16(&unet_vs, &tensors);
        }
        let optimizer = AdamW::new(tensors, train.optimizer.clone())?;
        let validation = match train.validation_every {
            0 => None,
            _ => Some(Validation::new(
                &files,
                train,
                &batches.cache().manifest.prompts,
            )?),
        };
        let model = match validation {
            Some(_) => TrainedUnet::in_pipeline(&files, unet_vs, unet)?,
            None => TrainedUnet::Bare(Box::new(unet)),
        };
        Ok(Self {
            opts,
            device,
            autocast,
            base_unet,
            config_text,
            batches,
            objective,
            model,
            tuned,
            optimizer,
            validation,
            resume_from,
            steps_done: 0,
            last_saved: None,
        })
    }

    /// Continues from the newest checkpoint when resuming: its trainable tensors, optimizer
    /// state and step, after checking that it was written by a run computing the same thing.
    pub fn restore(&mut self) -> Result<()> {
        let Some(found) = self.resume_from.take() else {
            if self.opts.resume {
                eprintln!(
                    "difftune train: no checkpoint in {} to resume from; starting a new run",
                    self.opts.out.join(CHECKPOINTS_DIR).display()
                );
            }
            return Ok(());
        };
        let source = found.dir.display().to_string();
        checkpoint::ensure_compatible(&found.state, &self.checkpoint_state(found.state.step))
            .with_context(|| format!("refusing to resume from {source}"))?;
        crate::peft::copy_named(&self.tuned.trained, &found.trainable()?, &source)?;
        let optimizer_state = found
            .optimizer()?
            .into_iter()
            .map(|(k, v)| (k, v.to_device(self.device)))
            .collect();
        self.optimizer.load_state(&optimizer_state)?;
        ensure!(
            self.optimizer.step_count() as usize == found.state.step,
            "{source}: optimizer state is at step {} but the checkpoint at {}",
            self.optimizer.step_count(),
            found.state.step
        );
        self.steps_done = found.state.step;
        Ok(())
    }

    /// Optimizer steps done (including those of resumed runs).
    pub fn steps_done(&self) -> usize {
        self.steps_done
    }

    /// One optimizer step over `gradient_accumulation_steps` forward passes.
    pub fn step(&mut self) -> Result<StepMetrics> {
        let started = Instant::now();
        let train = &self.opts.config.train;
        let accum = train.gradient_accumulation_steps;
        self.optimizer.zero_grad();
        let mut loss_sum = 0.0;
        for micro in 0..accum {
            let batch = self.batches.read(self.steps_done * accum + micro)?;
            loss_sum += self.forward_backward(batch, 1.0 / accum as f64)?;
        }
        let step = self.steps_done;
        let lr = train.lr_schedule.lr(
            train.learning_rate,
            step,
            train.lr_warmup_steps,
            train.steps,
        );
        let clip = (train.max_grad_norm > 0.0).then_some(train.max_grad_norm);
        let grad_norm = self
            .optimizer
            .step(lr, clip)
            .with_context(|| format!("optimizer step {}", step + 1))?;
        self.steps_done += 1;
        let samples_seen = self.steps_done * train.batch_size * accum;
        Ok(StepMetrics {
            step: self.steps_done,
            loss: loss_sum / accum as f64,
            lr,
            grad_norm,
            step_time_s: started.elapsed().as_secs_f64(),
            peak_rss_bytes: peak_rss_bytes(),
            epoch: (samples_seen - 1) / self.batches.len(),
        })
    }

    /// Forward and backward over one batch; returns its loss, which must be finite.
    fn forward_backward(&self, batch: CachedBatch, loss_scale: f64) -> Result<f64> {
        let inputs = self.batches.seeded_inputs(batch, self.device);
        let unet = self.model.unet();
        let loss = forward_backward(unet, &self.objective, &inputs, self.autocast, loss_scale)?
            .double_value(&[]);
        if !loss.is_finite() {
            bail!(
                "the loss is {loss} at step {}: stopping without saving a checkpoint{} (lower the learning rate, or check the data)",
                self.steps_done + 1,
                self.last_saved
                    .as_ref()
                    .map(|(s, p)| format!("; the last good one is {} (step {s})", p.display()))
                    .unwrap_or_default()
            );
        }
        Ok(loss)
    }

    /// What `state.json` records for a checkpoint at `step`.
    fn checkpoint_state(&self, step: usize) -> CheckpointState {
        let train = &self.opts.config.train;
        let samples_seen = step * train.batch_size * train.gradient_accumulation_steps;
        CheckpointState {
            step,
            samples_seen,
            epoch: samples_seen / self.batches.len(),
            seed: train.seed,
            method: self.opts.config.method.name.clone(),
            base_unet: self.base_unet.clone(),
            config: self.config_text.clone(),
        }
    }

    /// Writes a checkpoint of the current step (once: a second call at the same step returns
    /// the first one's folder).
    pub fn save(&mut self) -> Result<PathBuf> {
        if let Some((step, dir)) = &self.last_saved {
            if *step == self.steps_done {
                return Ok(dir.clone());
            }
        }
        let weights: Vec<(String, Tensor)> = self
            .tuned
            .trained
            .iter()
            .map(|(n, t)| (n.clone(), t.detach()))
            .collect();
        let dir = checkpoint::save(
            &self.opts.out.join(CHECKPOINTS_DIR),
            &self.checkpoint_state(self.steps_done),
            &weights,
            &self.optimizer.state(),
            self.opts.config.train.keep_checkpoints,
        )?;
        self.last_saved = Some((self.steps_done, dir.clone()));
        Ok(dir)
    }

    /// Samples the validation images with the U-Net as trained so far (when validation is on).
    pub fn validate(&self) -> Result<()> {
        if let (Some(validation), TrainedUnet::InPipeline(models)) = (&self.validation, &self.model)
        {
            validation.run(models, self.autocast, &self.opts.out, self.steps_done)?;
        }
        Ok(())
    }

    /// Saves a checkpoint and stops before all steps are done; running again with `--resume`
    /// continues.
    pub fn stop(mut self) -> Result<TrainSummary> {
        self.save()?;
        Ok(self.summary(None))
    }

    /// After the last step: validation (unless that step had it), a checkpoint, the adapter file.
    pub fn finish(mut self) -> Result<TrainSummary> {
        let every = self.opts.config.train.validation_every;
        if every > 0 && !self.steps_done.is_multiple_of(every) {
            self.validate()?;
        }
        self.save()?;
        let adapter = self.opts.out.join(ADAPTER_FILE);
        crate::peft::file::save_adapter(
            &adapter,
            self.tuned.method.as_ref(),
            &self.tuned.trained,
            &self.base_unet,
        )?;
        Ok(self.summary(Some(adapter)))
    }

    fn summary(self, adapter: Option<PathBuf>) -> TrainSummary {
        TrainSummary {
            step: self.steps_done,
            finished: adapter.is_some(),
            adapter,
            checkpoint: self.last_saved.map(|(_, dir)| dir),
            trainable_parameters: self.tuned.trained.iter().map(|(_, t)| t.numel()).sum(),
            cached_samples: self.batches.len(),
        }
    }
}

/// What the user sees of a run (the progress bar) and what it logs (`metrics.jsonl`).
struct RunLog {
    metrics: MetricsLog,
    bar: ProgressBar,
}

impl RunLog {
    /// Opens the metrics log, keeping the lines through step `resumed_at`.
    fn open(opts: &TrainOptions, resumed_at: usize) -> Result<Self> {
        let metrics = MetricsLog::open(&opts.out.join(METRICS_FILE), resumed_at)?;
        let bar = match opts.progress {
            true => ProgressBar::new(opts.config.train.steps as u64),
            false => ProgressBar::hidden(),
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} loss {msg} {per_sec} ETA {eta}",
            )
            .expect("valid template"),
        );
        bar.set_position(resumed_at as u64);
        bar.reset_eta();
        Ok(Self { metrics, bar })
    }

    fn record(&mut self, step: &StepMetrics) -> Result<()> {
        self.metrics.append(step)?;
        self.bar.set_message(format!("{:.4}", step.loss));
        self.bar.set_position(step.step as u64);
        Ok(())
    }
}

/// Whether step `step` of a schedule firing every `every` steps (0: never) is due.
fn due(step: usize, every: usize) -> bool {
    every > 0 && step.is_multiple_of(every)
}

/// Runs (or resumes) a training run. See [`TrainOptions`].
pub fn train(opts: &TrainOptions) -> Result<TrainSummary> {
    let train = &opts.config.train;
    let mut trainer = Trainer::setup(opts)?;
    trainer.restore()?;
    let mut log = RunLog::open(opts, trainer.steps_done())?;
    let start = trainer.steps_done();
    while trainer.steps_done() < train.steps {
        let metrics = trainer.step().inspect_err(|_| log.bar.abandon())?;
        log.record(&metrics)?;
        let step = trainer.steps_done();
        if due(step, train.checkpoint_every) {
            log.bar.suspend(|| trainer.save())?;
        }
        if due(step, train.validation_every) {
            log.bar.suspend(|| trainer.validate())?;
        }
        let interrupted = opts.interrupt.load(Ordering::SeqCst);
        let stopped = opts.stop_after.is_some_and(|n| step - start >= n);
        if (interrupted || stopped) && step < train.steps {
            log.bar.abandon();
            if interrupted {
                eprintln!("difftune train: interrupted at step {step}; resume with --resume");
            }
            return trainer.stop();
        }
    }
    log.bar.finish();
    trainer.finish()
}

/// The trainable tensors recorded in the newest checkpoint of a run folder, for inspection and tests.
pub fn latest_trainable(out: &Path) -> Result<std::collections::BTreeMap<String, Tensor>> {
    let found = checkpoint::latest(&out.join(CHECKPOINTS_DIR))?
        .with_context(|| format!("{} has no checkpoint", out.display()))?;
    found.trainable()
}
