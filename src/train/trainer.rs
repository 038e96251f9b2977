//! The training loop: the latent cache in, a tuned adapter out, with metrics, checkpoints, exact
//! resume, Ctrl-C handling and a stop on a non-finite loss. [`train`] reads as the loop it is;
//! [`Trainer`] holds the run's state and does each part (see [`super::batches`] for how every
//! random draw is seeded from the run's seed and the sample's position).
use super::batches::Batches;
use super::checkpoint::{self, Checkpoint, CheckpointState, Retention};
use super::config::{Precision, RunConfig};
use super::divergence::{self, Divergence};
use super::ema::Ema;
use super::metrics::{peak_rss_bytes, MetricsLog, StepMetrics};
use super::optim::AdamW;
use super::prefetch::{prefetched_batches, PrefetchedBatches};
use super::step::{attach_method, forward_backward, lay_out_for_training, Objective};
use super::tensorboard::TensorBoardLog;
use super::validation::{TrainedUnet, Validation};
use crate::dist::ProcessGroup;
use crate::error::SettingsError;
use crate::model::source::ModelFiles;
use crate::model::weights::Prefixed;
use crate::peft::file::AdapterFile;
use crate::peft::{export, Tuned};
use crate::util::progress::Progress;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

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
    /// Whether to continue from a checkpoint in `OUT/checkpoints`, and which.
    pub resume: Resume,
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

impl TrainOptions {
    /// Checks everything the run is given before it touches the data or writes anything: every
    /// setting (the method's were checked when it was built), the model's configs and weight
    /// headers, and that the data is a latent cache or a dataset of a known layout (from its file
    /// names; no image is read). Returns the model's files.
    pub fn check(&self) -> Result<ModelFiles> {
        self.config.validate()?;
        let files = ModelFiles::resolve(&self.model, None)?;
        files.check()?;
        let is_cache = self.data.join(crate::data::cache::MANIFEST_FILE).is_file();
        if !is_cache {
            crate::data::Layout::detect(&self.data)
                .map_err(|e| SettingsError::invalid("data", format!("{e:#}")))?;
        }
        Ok(files)
    }

    /// Where a dataset's latent cache goes: `--cache`, else `OUT/cache`.
    fn dataset_cache_dir(&self) -> PathBuf {
        self.cache.clone().unwrap_or_else(|| self.out.join("cache"))
    }
}

/// Where a run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// A new run (an output folder holding checkpoints is refused).
    No,
    /// From the newest checkpoint whose files verify (a new run when there is none).
    Newest,
    /// From the checkpoint of this step; newer ones are set aside (`step-N.abandoned`).
    From(usize),
}

/// How a call of [`train`] ended.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Optimizer steps done in total (including those of resumed runs).
    pub step: usize,
    /// All configured steps are done and the adapter file is saved.
    pub finished: bool,
    /// The adapter file, when finished.
    pub adapter: Option<PathBuf>,
    pub checkpoint: Option<PathBuf>,
    pub trainable_parameters: usize,
    pub cached_samples: usize,
    /// Samples per optimizer step over all ranks: world size × batch × accumulation.
    pub global_batch: usize,
    /// The run stopped early on an interrupt (of any rank).
    pub interrupted: bool,
}

/// Names of the files a run writes in its output folder.
pub const RUN_CONFIG_FILE: &str = "run.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Prefix of the EMA's tensors in a checkpoint's optimizer file.
pub const EMA_PREFIX: &str = "ema.";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const ADAPTER_FILE: &str = "adapter.safetensors";

/// How a run computes on `device` under `precision`: whether the U-Net runs under bf16 autocast.
pub fn uses_autocast(precision: Precision, device: Device) -> bool {
    match precision {
        Precision::Auto => device.is_cuda(),
        Precision::Fp32 => false,
        Precision::Bf16 => true,
    }
}

/// Creates the output folder and writes the run config (on the main rank only); returns the
/// checkpoint the run resumes from ([`Resume`]). Checkpoints in a folder that is not resumed are
/// an error. Only the main rank moves checkpoints aside; the others read.
fn open_run_folder(
    opts: &TrainOptions,
    config_text: &str,
    group: &ProcessGroup,
) -> Result<Option<Checkpoint>> {
    if group.is_main() {
        std::fs::create_dir_all(&opts.out)
            .with_context(|| format!("creating {}", opts.out.display()))?;
    }
    let checkpoints = opts.out.join(CHECKPOINTS_DIR);
    if checkpoint::any(&checkpoints)? && opts.resume == Resume::No {
        bail!(
            "{} already holds checkpoints of a run: pass --resume to continue it, or choose another --out",
            opts.out.display()
        );
    }
    let latest = match (opts.resume, group.is_main()) {
        (Resume::No, _) => None,
        (Resume::Newest, true) => checkpoint::resume_point(&checkpoints)?,
        (Resume::Newest, false) => checkpoint::latest(&checkpoints)?,
        (Resume::From(step), true) => Some(checkpoint::resume_at(&checkpoints, step)?),
        (Resume::From(step), false) => Some(checkpoint::open_step(&checkpoints, step)?),
    };
    if group.is_main() {
        crate::util::fs::write_atomic_str(&opts.out.join(RUN_CONFIG_FILE), config_text)?;
    }
    Ok(latest)
}

/// One training run in memory: the model with its method attached, the optimizer, the data and
/// the position reached. [`train`] drives it; the pieces the next features need go here:
///
/// - a data-parallel group (in place): the trainable tensors are broadcast from rank 0 at the end
///   of [`Trainer::restore`], the gradients (and the loss) all-reduced in [`Trainer::step`]
///   before the update (which takes the norm and clips), and rank 0 alone owns the [`RunLog`],
///   [`Trainer::save`], [`Trainer::validate`] and the adapter file;
/// - EMA weights: updated in [`Trainer::step`] after the optimizer, saved by [`Trainer::save`];
/// - prefetching: [`Batches::read`] is the CPU part of a forward pass's input (no random draw),
///   so a background thread reads the next one while [`Trainer::step`] computes
///   ([`super::prefetch`]);
/// - signals: whatever sets [`TrainOptions::interrupt`] (the CLI's handler) stops the loop.
pub struct Trainer<'a> {
    opts: &'a TrainOptions,
    group: &'a ProcessGroup,
    device: Device,
    autocast: bool,
    base_unet: String,
    config_text: String,
    batches: PrefetchedBatches,
    /// Samples in the cache.
    cached_samples: usize,
    /// Samples per epoch (repeats and bucket padding included).
    epoch_len: usize,
    objective: Objective,
    model: TrainedUnet,
    /// The method and the parameters it added (kept alive here) and trains.
    tuned: Tuned,
    optimizer: AdamW,
    /// The moving average of the trained tensors, when `train.ema` is set.
    ema: Option<Ema>,
    validation: Option<Validation>,
    /// The checkpoint [`Trainer::restore`] continues from.
    resume_from: Option<Checkpoint>,
    /// The step of the checkpoint this invocation continued from.
    resumed_at: Option<usize>,
    steps_done: usize,
    last_saved: Option<(usize, PathBuf)>,
    /// Some rank was interrupted by the end of the last step (all ranks agree on it).
    interrupted: bool,
}

impl<'a> Trainer<'a> {
    /// Loads the model `files` (checked by [`TrainOptions::check`]), attaches the method, builds
    /// the optimizer and the latent cache, as rank `group.rank()` of a data-parallel run (each
    /// rank encoding its share of the cache).
    pub fn setup(
        opts: &'a TrainOptions,
        files: &ModelFiles,
        group: &'a ProcessGroup,
    ) -> Result<Self> {
        let config = &opts.config;
        let train = &config.train;
        let device = group.local_device(train.device.resolve()?);
        let autocast = uses_autocast(train.precision, device);
        let base_unet = files.unet_identity()?;
        let config_text = config.to_toml()?;
        let resume_from = open_run_folder(opts, &config_text, group)?;

        // Every rank encodes its share of what the cache lacks; rank 0 completes the manifest.
        let cache_settings = train.cache_settings(opts.strict, device)?;
        let dataset_cache = opts.dataset_cache_dir();
        let cache_dir =
            crate::data::cache::prepare(files, &opts.data, &dataset_cache, &cache_settings, group)?;
        group
            .barrier()
            .context("waiting for the main rank's latent cache")?;
        let vae = crate::model::vae::VaeConfig::from_file(&files.vae.config)?;
        let scaling = vae.scaling_factor;
        let shard = (train.batch_size, group.rank(), group.world_size());
        let batches = Batches::open(&cache_dir, train.seed, shard, scaling)?;

        let (mut unet_vs, mut unet) = crate::model::pipeline::load_unet(files, device)?;
        batches.cache().check_fits(&unet.config)?;
        unet.gradient_checkpointing = train.gradient_checkpointing;
        if device.is_cuda() && group.is_main() {
            let factor = crate::sample::LatentGeometry::of_vae(&vae).scale_factor;
            let (batch, latent) = (train.batch_size as i64, train.resolution as i64 / factor);
            let kernels =
                crate::model::sdpa::describe(&unet.config, batch, latent, device, autocast)?;
            eprintln!("difftune train: scaled dot-product attention: {kernels}");
        }
        let scheduler = crate::model::pipeline::load_scheduler_config(files)?;
        let objective = Objective::new(&scheduler, train)?;
        let tuned = attach_method(&mut unet, &mut unet_vs, &config.method, train.seed)?;
        let tensors = lay_out_for_training(&unet_vs, &tuned, autocast, train.channels_last);
        let optimizer = AdamW::new(tensors, train.optimizer.clone())?;
        let ema = train.ema.map(|settings| Ema::new(settings, &tuned.trained));
        let validation = match train.validation_every {
            _ if !group.is_main() => None,
            0 => None,
            _ => Some(Validation::new(
                files,
                train,
                &batches.cache().manifest.prompts,
            )?),
        };
        let model = match validation {
            Some(_) => TrainedUnet::in_pipeline(files, unet_vs, unet)?,
            None => TrainedUnet::Bare(Box::new(unet)),
        };
        Ok(Self {
            opts,
            group,
            device,
            autocast,
            base_unet,
            config_text,
            cached_samples: batches.cache().len(),
            epoch_len: batches.len(),
            batches: prefetched_batches(batches, device),
            objective,
            model,
            tuned,
            optimizer,
            ema,
            validation,
            resume_from,
            resumed_at: None,
            steps_done: 0,
            last_saved: None,
            interrupted: false,
        })
    }

    /// Continues from the newest checkpoint when resuming: its trainable tensors, optimizer
    /// state and step, after checking that it was written by a run computing the same thing.
    /// Every rank then takes rank 0's trainable values, so all start from the same ones.
    pub fn restore(&mut self) -> Result<()> {
        self.restore_checkpoint()?;
        self.group
            .broadcast_from_main(self.optimizer.flat_params_mut())
            .context("taking the trainable weights from rank 0")
    }

    fn restore_checkpoint(&mut self) -> Result<()> {
        let Some(found) = self.resume_from.take() else {
            if self.opts.resume != Resume::No && self.group.is_main() {
                eprintln!(
                    "difftune train: no checkpoint in {} to resume from; starting a new run",
                    self.opts.out.join(CHECKPOINTS_DIR).display()
                );
            }
            return Ok(());
        };
        let source = found.dir.display().to_string();
        let world = self.group.world_size();
        ensure!(
            found.state.world_size == world,
            "refusing to resume from {source}: it was written by a run on {} rank(s), this one has {world}; \
             the data order and per-sample seeds follow the global batch, so resume on {} rank(s) \
             (a run continues exactly only at the world size that wrote it)",
            found.state.world_size,
            found.state.world_size
        );
        checkpoint::ensure_compatible(&found.state, &self.checkpoint_state(found.state.step))
            .with_context(|| format!("refusing to resume from {source}"))?;
        // Each file's tensors are read one at a time, straight into the run's.
        crate::peft::copy_named(&self.tuned.trained, &found.trainable_file()?, &source)?;
        let state = found.optimizer_file()?;
        self.optimizer.load_state(&state)?;
        if let Some(ema) = &mut self.ema {
            let ema_state = Prefixed {
                inner: &state,
                prefix: EMA_PREFIX,
            };
            ema.restore(&ema_state, found.state.step)
                .with_context(|| format!("{source}: restoring the EMA"))?;
        }
        ensure!(
            self.optimizer.step_count() as usize == found.state.step,
            "{source}: optimizer state is at step {} but the checkpoint at {}",
            self.optimizer.step_count(),
            found.state.step
        );
        self.steps_done = found.state.step;
        self.resumed_at = Some(found.state.step);
        Ok(())
    }

    /// The tensors the method trains, by name, as they are in memory now.
    pub fn trained(&self) -> &[(String, Tensor)] {
        &self.tuned.trained
    }

    /// Optimizer steps done (including those of resumed runs).
    pub fn steps_done(&self) -> usize {
        self.steps_done
    }

    /// One optimizer step over `gradient_accumulation_steps` forward passes. The loss stays on
    /// the device until the step's one read of (loss, interrupt flag, gradient norm), after the
    /// all-reduce of a data-parallel run: a non-finite loss or norm stops the run before the
    /// update is applied ([`Trainer::stop_diverged`]).
    pub fn step(&mut self) -> Result<StepMetrics> {
        let started = Instant::now();
        let train = &self.opts.config.train;
        let accum = train.gradient_accumulation_steps;
        self.optimizer.zero_grad();
        let mut loss_sum = Tensor::zeros([], (Kind::Float, self.device));
        for micro in 0..accum {
            let index = self.steps_done * accum + micro;
            let batch = self.batches.take(index)?;
            let mut inputs =
                self.batches
                    .get_mut()?
                    .seeded_inputs(batch, &self.objective, self.device)?;
            if train.channels_last {
                // After the draws, which then give the same noise in either layout.
                inputs = inputs.into_channels_last();
            }
            self.batches.start(index + 1)?;
            let unet = self.model.unet();
            let loss = forward_backward(
                unet,
                &self.objective,
                &inputs,
                self.autocast,
                1.0 / accum as f64,
            )?;
            loss_sum += loss;
        }
        let interrupted = self.opts.interrupt.load(Ordering::SeqCst);
        let (loss_and_flag, all_reduce_s) =
            self.reduce_gradients(loss_sum / accum as f64, interrupted)?;
        let norm = tch::no_grad(|| self.optimizer.grad_norm());
        let read = Tensor::cat(&[loss_and_flag, norm.reshape([1])], 0).to_kind(Kind::Double);
        let read = Vec::<f64>::try_from(read.to_device(Device::Cpu))?;
        let (loss, grad_norm) = (read[0], read[2]);
        self.interrupted = read[1] > 0.0;
        if !(loss.is_finite() && grad_norm.is_finite()) {
            let message = format!("{:#}", self.stop_diverged(loss, grad_norm));
            let step = self.steps_done + 1;
            return Err(crate::error::Diverged { step, message }.into());
        }
        let step = self.steps_done;
        let lr = train.lr_schedule.lr(
            train.learning_rate,
            step,
            train.lr_warmup_steps,
            train.steps,
        );
        let clip = (train.max_grad_norm > 0.0).then_some(train.max_grad_norm);
        self.optimizer.apply(lr, grad_norm, clip);
        if let Some(ema) = &mut self.ema {
            ema.update(&self.tuned.trained);
        }
        self.steps_done += 1;
        let samples_seen = self.steps_done * self.global_batch();
        Ok(StepMetrics {
            step: self.steps_done,
            loss,
            lr,
            grad_norm,
            step_time_s: started.elapsed().as_secs_f64(),
            peak_rss_bytes: peak_rss_bytes(),
            epoch: (samples_seen - 1) / self.epoch_len,
            global_batch: self.global_batch(),
            all_reduce_s,
        })
    }

    /// Samples per optimizer step over all ranks.
    pub fn global_batch(&self) -> usize {
        let train = &self.opts.config.train;
        self.group.world_size() * train.batch_size * train.gradient_accumulation_steps
    }

    /// Whether any rank was interrupted by the end of the last step.
    pub fn interrupted(&self) -> bool {
        self.interrupted
    }

    /// Returns the step's mean `loss` and interrupt flag as a 2-element device tensor; on a
    /// data-parallel run averaged over all ranks with the gradients in one all-reduce (they
    /// ride at the end of the gradient buffer), so every rank updates alike and takes the same
    /// decisions (a flag above 0: some rank was interrupted). Also returns the all-reduce's time.
    fn reduce_gradients(
        &mut self,
        loss: Tensor,
        interrupted: bool,
    ) -> Result<(Tensor, Option<f64>)> {
        let flag = Tensor::from(if interrupted { 1.0f32 } else { 0.0 }).to_device(self.device);
        let loss_and_flag = Tensor::stack(&[loss.to_kind(Kind::Float), flag], 0);
        if !self.group.is_distributed() {
            return Ok((loss_and_flag, None));
        }
        let started = Instant::now();
        // The gradients are views of this buffer: reducing it in place reduces them.
        let mut buffer = self.optimizer.flat_grads(&loss_and_flag);
        self.group.all_reduce_sum(&mut buffer).with_context(|| {
            format!("all-reducing the gradients of step {}", self.steps_done + 1)
        })?;
        buffer /= self.group.world_size() as f64;
        let n = buffer.numel() as i64;
        let all_reduce_s = started.elapsed().as_secs_f64();
        Ok((buffer.narrow(0, n - 2, 2), Some(all_reduce_s)))
    }

    /// The error that stops a run whose step `steps_done + 1` found a non-finite `loss` or
    /// gradient norm: computed on the weights of step `steps_done`, which are therefore not to be
    /// continued. Nothing of the step is applied or saved; the main rank sets aside the
    /// checkpoints of those weights (or later) and names where to resume ([`divergence::stop`]).
    fn stop_diverged(&self, loss: f64, grad_norm: f64) -> anyhow::Error {
        let step = self.steps_done + 1;
        let what = format!("the loss is {loss} and the gradient norm {grad_norm} at step {step}");
        if !self.group.is_main() {
            return anyhow!(
                "{what}: stopping without applying it (rank 0 names the checkpoint to resume)"
            );
        }
        let divergence = Divergence {
            step,
            learning_rate: self.opts.config.train.learning_rate,
            resumed_from: self.resumed_at,
        };
        divergence::stop(&self.opts.out.join(CHECKPOINTS_DIR), &divergence, &what)
    }

    /// What `state.json` records for a checkpoint at `step`.
    fn checkpoint_state(&self, step: usize) -> CheckpointState {
        let train = &self.opts.config.train;
        let samples_seen = step * self.global_batch();
        CheckpointState {
            step,
            samples_seen,
            epoch: samples_seen / self.epoch_len,
            seed: train.seed,
            method: self.opts.config.method.name().to_string(),
            base_unet: self.base_unet.clone(),
            config: self.config_text.clone(),
            world_size: self.group.world_size(),
        }
    }

    /// Writes a checkpoint of the current step (once: a second call at the same step returns
    /// the first one's folder); the main rank alone writes, the others return `None`.
    pub fn save(&mut self) -> Result<Option<PathBuf>> {
        if !self.group.is_main() {
            return Ok(None);
        }
        if let Some((step, dir)) = &self.last_saved {
            if *step == self.steps_done {
                return Ok(Some(dir.clone()));
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
            &self.training_state(),
            Retention::of(&self.opts.config.train),
        )?;
        self.last_saved = Some((self.steps_done, dir.clone()));
        Ok(Some(dir))
    }

    /// What a checkpoint keeps beside the weights: the optimizer's state and the EMA's tensors
    /// (under [`EMA_PREFIX`]).
    fn training_state(&self) -> Vec<(String, Tensor)> {
        let mut state = self.optimizer.state();
        if let Some(ema) = &self.ema {
            state.extend(
                ema.tensors()
                    .iter()
                    .map(|(n, t)| (format!("{EMA_PREFIX}{n}"), t.shallow_clone())),
            );
        }
        state
    }

    /// Samples the validation images with the U-Net as trained so far (when validation is on;
    /// only the main rank has a [`Validation`]); returns their folder.
    pub fn validate(&self) -> Result<Option<PathBuf>> {
        match (&self.validation, &self.model) {
            (Some(validation), TrainedUnet::InPipeline(models)) => validation
                .run(models, self.autocast, &self.opts.out, self.steps_done)
                .map(Some),
            _ => Ok(None),
        }
    }

    /// Saves a checkpoint and stops before all steps are done; running again with `--resume`
    /// continues.
    pub fn stop(mut self) -> Result<TrainSummary> {
        self.save()?;
        Ok(self.summary(None))
    }

    /// After the last step: a checkpoint and the adapter file (of the EMA's tensors when on),
    /// and beside it the adapter in each of the other tools' formats of `train.export`.
    pub fn finish(mut self) -> Result<TrainSummary> {
        self.save()?;
        let path = self.opts.out.join(ADAPTER_FILE);
        if self.group.is_main() {
            let weights = match &self.ema {
                Some(ema) => ema.tensors(),
                None => &self.tuned.trained,
            };
            let adapter = AdapterFile::from_trained(
                self.tuned.method.as_ref(),
                weights,
                Some(self.base_unet.clone()),
            )?;
            adapter.save(&path)?;
            let unet = &self.model.unet().config;
            for &format in &self.opts.config.train.export {
                export::export(&adapter, format, Some(unet), &format.beside(&path))?;
            }
        }
        Ok(self.summary(Some(path)))
    }

    fn summary(self, adapter: Option<PathBuf>) -> TrainSummary {
        let global_batch = self.global_batch();
        TrainSummary {
            global_batch,
            step: self.steps_done,
            finished: adapter.is_some(),
            adapter,
            checkpoint: self.last_saved.map(|(_, dir)| dir),
            trainable_parameters: self.tuned.trained.iter().map(|(_, t)| t.numel()).sum(),
            cached_samples: self.cached_samples,
            interrupted: self.interrupted,
        }
    }
}

/// What the user sees of a run (the progress bar) and what it logs (`metrics.jsonl` and the same
/// scalars, with the validation images, for TensorBoard): the main rank's alone (the others have
/// no files).
struct RunLog {
    files: Option<(MetricsLog, TensorBoardLog)>,
    bar: Progress,
}

impl RunLog {
    /// Opens the metrics log, keeping the lines through step `resumed_at`, and a new event file.
    fn open(opts: &TrainOptions, resumed_at: usize, main: bool) -> Result<Self> {
        let files = match main {
            true => Some((
                MetricsLog::open(&opts.out.join(METRICS_FILE), resumed_at)?,
                TensorBoardLog::create(&opts.out, resumed_at)?,
            )),
            false => None,
        };
        let steps = opts.config.train.steps as u64;
        let bar = Progress::new("train", steps, "steps", opts.progress && main);
        bar.start_at(resumed_at as u64);
        Ok(Self { files, bar })
    }

    fn record(&mut self, step: &StepMetrics) -> Result<()> {
        if let Some((metrics, tensorboard)) = &mut self.files {
            metrics.append(step)?;
            tensorboard.scalars(step.step, &step.scalars())?;
        }
        self.bar.set_message(format!("loss {:.4}", step.loss));
        self.bar.set_position(step.step as u64);
        Ok(())
    }
}

/// Whether step `step` of a schedule firing every `every` steps (0: never) is due.
fn due(step: usize, every: usize) -> bool {
    every > 0 && step.is_multiple_of(every)
}

/// Runs (or resumes) a training run in this process alone. See [`TrainOptions`].
pub fn train(opts: &TrainOptions) -> Result<TrainSummary> {
    train_in(opts, &ProcessGroup::single())
}

/// Runs (or resumes) a training run as this process's rank of `group` (data-parallel when it
/// has more than one). The main rank holds the run folder's lock.
pub fn train_in(opts: &TrainOptions, group: &ProcessGroup) -> Result<TrainSummary> {
    // Before the lock, which creates the output folder: a bad setting leaves nothing behind.
    let files = opts.check()?;
    let _lock = match group.is_main() {
        true => Some(crate::util::lock::DirLock::acquire(&opts.out, "train")?),
        false => None,
    };
    let train = &opts.config.train;
    let mut trainer = Trainer::setup(opts, &files, group)?;
    trainer.restore()?;
    if group.is_main() && group.is_distributed() {
        eprintln!(
            "difftune train: {} ranks x batch {} x accumulation {} = global batch {} (the learning rate is not rescaled)",
            group.world_size(),
            train.batch_size,
            train.gradient_accumulation_steps,
            trainer.global_batch()
        );
    }
    let mut log = RunLog::open(opts, trainer.steps_done(), group.is_main())?;
    let start = trainer.steps_done();
    while trainer.steps_done() < train.steps {
        let metrics = trainer.step().inspect_err(|_| log.bar.abandon())?;
        log.record(&metrics)?;
        let step = trainer.steps_done();
        if due(step, train.checkpoint_every) {
            log.bar.suspend(|| trainer.save())?;
        }
        // Validation also runs after the last step, whatever its schedule.
        let last = step == train.steps && train.validation_every > 0;
        if due(step, train.validation_every) || last {
            let dir = log.bar.suspend(|| trainer.validate())?;
            if let (Some(dir), Some((_, tensorboard))) = (dir, &mut log.files) {
                tensorboard.png_folder(step, "validation", &dir)?;
            }
        }
        let interrupted = trainer.interrupted();
        let stopped = opts.stop_after.is_some_and(|n| step - start >= n);
        if (interrupted || stopped) && step < train.steps {
            log.bar.abandon();
            if interrupted && group.is_main() {
                eprintln!("difftune train: interrupted at step {step}; resume with --resume");
            }
            return trainer.stop();
        }
    }
    log.bar.finish();
    trainer.finish()
}

/// The trainable tensors recorded in the newest checkpoint of a run folder, for inspection and tests.
pub fn latest_trainable(out: &Path) -> Result<BTreeMap<String, Tensor>> {
    let found = checkpoint::latest(&out.join(CHECKPOINTS_DIR))?
        .with_context(|| format!("{} has no checkpoint", out.display()))?;
    found.trainable()
}
