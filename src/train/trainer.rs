//! The training loop: the latent cache in, a tuned adapter out, with metrics, checkpoints, exact
//! resume, Ctrl-C handling and a stop on a non-finite loss.
//!
//! Every random draw is a function of (seed, position): the data order of epoch `e` is a seeded
//! permutation, and before each forward pass torch's generator is re-seeded from (seed, forward
//! index) to draw the latent sample, the noise and the timesteps. A run resumed from a checkpoint
//! therefore repeats the uninterrupted run bit for bit (on the same device and thread count).
use super::checkpoint::{self, CheckpointState};
use super::config::{Precision, RunConfig};
use super::metrics::{peak_rss_bytes, MetricsLog, StepMetrics};
use super::optim::AdamW;
use super::step::{attach_method, forward_backward, Objective, StepInputs};
use super::validation::{TrainedUnet, Validation};
use crate::data::cache::{self, CacheSettings, LatentCache, Manifest, MANIFEST_FILE};
use crate::data::images::DecodeOptions;
use crate::data::PromptTemplate;
use crate::model::source::ModelFiles;
use anyhow::{bail, ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
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

/// The seed of forward pass `index` of a run seeded with `seed` (SplitMix64 of both).
fn forward_seed(seed: u64, index: u64) -> i64 {
    let mut z = seed
        ^ index
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as i64 & i64::MAX
}

/// The seeded order of the cached samples in each epoch.
struct DataOrder {
    seed: u64,
    len: usize,
    epoch: usize,
    order: Vec<usize>,
}

impl DataOrder {
    fn new(seed: u64, len: usize) -> Self {
        let mut order = Self {
            seed,
            len,
            epoch: usize::MAX,
            order: Vec::new(),
        };
        order.set_epoch(0);
        order
    }

    fn set_epoch(&mut self, epoch: usize) {
        if epoch != self.epoch {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(epoch as u64);
            self.order = (0..self.len).collect();
            self.order.shuffle(&mut rng);
            self.epoch = epoch;
        }
    }

    /// The cached sample at overall position `position` (epochs back to back).
    fn sample(&mut self, position: usize) -> usize {
        self.set_epoch(position / self.len);
        self.order[position % self.len]
    }
}

/// Builds or reuses the latent cache for this run; returns its folder.
fn prepare_cache(opts: &TrainOptions, files: &ModelFiles, device: Device) -> Result<PathBuf> {
    let train = &opts.config.train;
    if opts.data.join(MANIFEST_FILE).is_file() {
        // A cache folder: rebuild it from its recorded dataset when that is still there, else
        // use it only if it was made with this model's VAE and text encoder.
        let manifest = Manifest::read(&opts.data)?;
        if manifest.dataset_path.is_dir() {
            let settings = CacheSettings {
                split: manifest.key.split.parse()?,
                resolution: manifest.key.resolution,
                resize_filter: manifest.key.resize_filter.parse()?,
                prompt_template: PromptTemplate::new(&manifest.prompt_template)?,
                limit_per_class: manifest.limit_per_class,
                batch_size: train.cache_batch_size,
                shard_size: manifest.key.shard_size,
                strict: opts.strict,
                decode: DecodeOptions {
                    exif_orientation: manifest.key.exif_orientation,
                    max_pixels: train.max_image_pixels,
                },
                device,
            };
            cache::build(files, &manifest.dataset_path, &settings, &opts.data)?;
        }
        return Ok(opts.data.clone());
    }
    let dir = opts.cache.clone().unwrap_or_else(|| opts.out.join("cache"));
    let settings = CacheSettings {
        resolution: train.resolution,
        resize_filter: train.resize_filter.parse()?,
        prompt_template: PromptTemplate::new(&train.prompt_template)?,
        limit_per_class: (train.limit_per_class > 0).then_some(train.limit_per_class),
        batch_size: train.cache_batch_size,
        strict: opts.strict,
        decode: DecodeOptions {
            exif_orientation: train.exif_orientation,
            max_pixels: train.max_image_pixels,
        },
        device,
        ..CacheSettings::default()
    };
    cache::build(files, &opts.data, &settings, &dir)?;
    Ok(dir)
}

/// Runs (or resumes) a training run. See [`TrainOptions`].
pub fn train(opts: &TrainOptions) -> Result<TrainSummary> {
    let config = &opts.config;
    let train = &config.train;
    train.validate()?;
    let device = train.device.resolve()?;
    let autocast = match train.precision {
        Precision::Auto => device.is_cuda(),
        Precision::Fp32 => false,
        Precision::Bf16 if device.is_cuda() => true,
        Precision::Bf16 => {
            bail!("precision = \"bf16\" needs a CUDA device (the CPU trains in fp32)")
        }
    };
    let files = ModelFiles::resolve(&opts.model, None)?;
    let base_unet = files.unet_identity()?;
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let checkpoints_dir = opts.out.join(CHECKPOINTS_DIR);
    let latest = checkpoint::latest(&checkpoints_dir)?;
    if latest.is_some() && !opts.resume {
        bail!(
            "{} already holds checkpoints of a run: pass --resume to continue it, or choose another --out",
            opts.out.display()
        );
    }
    let config_text = config.to_toml()?;
    crate::util::fs::write_atomic_str(&opts.out.join(RUN_CONFIG_FILE), &config_text)?;

    let cache_dir = prepare_cache(opts, &files, device)?;
    let data = LatentCache::open(&cache_dir)?;
    ensure!(
        !data.is_empty(),
        "the cache in {} holds no samples",
        cache_dir.display()
    );
    let vae_config = crate::model::vae::VaeConfig::from_file(&files.vae.config)?;
    let scaling = vae_config.scaling_factor;

    let (mut unet_vs, mut unet) = crate::model::pipeline::load_unet(&files, device)?;
    let scheduler = crate::model::pipeline::load_scheduler_config(&files)?;
    let objective = Objective::new(&scheduler, train)?;
    let tuned = attach_method(&mut unet, &mut unet_vs, &config.method, device)?;
    let trainable = &tuned.trainable;
    let trainable_parameters: usize = trainable.iter().map(|(_, t)| t.numel()).sum();
    let tensors: Vec<Tensor> = trainable.iter().map(|(_, t)| t.shallow_clone()).collect();
    if autocast {
        super::precision::freeze_to_bf16(&unet_vs, &tensors);
    }
    let mut optimizer = AdamW::new(tensors, train.optimizer.clone())?;
    let validation = match train.validation_every {
        0 => None,
        _ => Some(Validation::new(&files, train, &data.manifest.prompts)?),
    };
    let model = match validation {
        Some(_) => TrainedUnet::in_pipeline(&files, unet_vs, unet)?,
        None => TrainedUnet::Bare(Box::new(unet)),
    };
    let validate = |step: usize| -> Result<()> {
        if let (Some(validation), TrainedUnet::InPipeline(models)) = (&validation, &model) {
            validation.run(models, autocast, &opts.out, step)?;
        }
        Ok(())
    };

    let accum = train.gradient_accumulation_steps;
    let per_step = train.batch_size * accum;
    let state_at = |step: usize| CheckpointState {
        step,
        samples_seen: step * per_step,
        epoch: step * per_step / data.len(),
        seed: train.seed,
        method: config.method.name.clone(),
        base_unet: base_unet.clone(),
        config: config_text.clone(),
    };
    let mut step = 0;
    if let Some(found) = latest.filter(|_| opts.resume) {
        checkpoint::ensure_compatible(&found.state, &state_at(found.state.step))
            .with_context(|| format!("refusing to resume from {}", found.dir.display()))?;
        let saved = found.trainable()?;
        tch::no_grad(|| -> Result<()> {
            ensure!(
                saved.len() == trainable.len(),
                "{} holds {} trainable tensors, this run trains {}",
                found.dir.display(),
                saved.len(),
                trainable.len()
            );
            for (name, t) in trainable {
                let src = saved
                    .get(name)
                    .with_context(|| format!("{} has no `{name}`", found.dir.display()))?;
                ensure!(
                    src.size() == t.size(),
                    "`{name}` is {:?} in the checkpoint, {:?} here",
                    src.size(),
                    t.size()
                );
                t.shallow_clone()
                    .f_copy_(&src.to_device(device).to_kind(t.kind()))?;
            }
            Ok(())
        })?;
        let optimizer_state = found.optimizer()?;
        let moved = optimizer_state
            .into_iter()
            .map(|(k, v)| (k, v.to_device(device)))
            .collect();
        optimizer.load_state(&moved)?;
        step = found.state.step;
        ensure!(
            optimizer.step_count() as usize == step,
            "{}: optimizer state is at step {} but the checkpoint at {step}",
            found.dir.display(),
            optimizer.step_count()
        );
    } else if opts.resume {
        eprintln!(
            "difftune train: no checkpoint in {} to resume from; starting a new run",
            checkpoints_dir.display()
        );
    }

    let mut metrics = MetricsLog::open(&opts.out.join(METRICS_FILE), step)?;
    let mut order = DataOrder::new(train.seed, data.len());
    let bar = if opts.progress {
        indicatif::ProgressBar::new(train.steps as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} loss {msg} {per_sec} ETA {eta}",
        )
        .expect("valid template"),
    );
    bar.set_position(step as u64);
    bar.reset_eta();

    let save = |step: usize, optimizer: &AdamW| -> Result<PathBuf> {
        let weights: Vec<(String, Tensor)> = trainable
            .iter()
            .map(|(n, t)| (n.clone(), t.detach()))
            .collect();
        checkpoint::save(
            &checkpoints_dir,
            &state_at(step),
            &weights,
            &optimizer.state(),
            train.keep_checkpoints,
        )
    };
    let mut last_saved: Option<(usize, PathBuf)> = None;
    let start = step;
    while step < train.steps {
        let started = Instant::now();
        optimizer.zero_grad();
        let mut loss_sum = 0.0;
        for micro in 0..accum {
            let forward_index = step * accum + micro;
            let first = forward_index * train.batch_size;
            let indices: Vec<usize> = (first..first + train.batch_size)
                .map(|p| order.sample(p))
                .collect();
            let (mean, logvar, context) = data.batch(&indices)?;
            tch::manual_seed(forward_seed(train.seed, forward_index as u64));
            let (mean, logvar) = (mean.to_device(device), logvar.to_device(device));
            let latents = (&mean + (logvar * 0.5).exp() * mean.randn_like()) * scaling;
            let inputs = StepInputs {
                latents,
                context: context.to_device(device).to_kind(Kind::Float),
            };
            let loss = forward_backward(
                model.unet(),
                &objective,
                &inputs,
                autocast,
                1.0 / accum as f64,
            )?
            .double_value(&[]);
            if !loss.is_finite() {
                bar.abandon();
                bail!(
                    "the loss is {loss} at step {}: stopping without saving a checkpoint{} (lower the learning rate, or check the data)",
                    step + 1,
                    last_saved
                        .as_ref()
                        .map(|(s, p)| format!("; the last good one is {} (step {s})", p.display()))
                        .unwrap_or_default()
                );
            }
            loss_sum += loss;
        }
        let lr = train.lr_schedule.lr(
            train.learning_rate,
            step,
            train.lr_warmup_steps,
            train.steps,
        );
        let clip = (train.max_grad_norm > 0.0).then_some(train.max_grad_norm);
        let grad_norm = optimizer
            .step(lr, clip)
            .with_context(|| format!("optimizer step {}", step + 1))?;
        step += 1;
        let loss = loss_sum / accum as f64;
        metrics.append(&StepMetrics {
            step,
            loss,
            lr,
            grad_norm,
            step_time_s: started.elapsed().as_secs_f64(),
            peak_rss_bytes: peak_rss_bytes(),
            epoch: (step * per_step - 1) / data.len(),
        })?;
        bar.set_message(format!("{loss:.4}"));
        bar.set_position(step as u64);
        if train.checkpoint_every > 0 && step % train.checkpoint_every == 0 {
            last_saved = Some((step, bar.suspend(|| save(step, &optimizer))?));
        }
        if train.validation_every > 0 && step % train.validation_every == 0 {
            bar.suspend(|| validate(step))?;
        }
        let interrupted = opts.interrupt.load(Ordering::SeqCst);
        let stopped = opts.stop_after.is_some_and(|n| step - start >= n);
        if (interrupted || stopped) && step < train.steps {
            if last_saved.as_ref().is_none_or(|(s, _)| *s != step) {
                last_saved = Some((step, save(step, &optimizer)?));
            }
            bar.abandon();
            if interrupted {
                eprintln!("difftune train: interrupted at step {step}; resume with --resume");
            }
            return Ok(TrainSummary {
                step,
                finished: false,
                adapter: None,
                checkpoint: last_saved.map(|(_, p)| p),
                trainable_parameters,
                cached_samples: data.len(),
            });
        }
    }
    bar.finish();
    if train.validation_every > 0 && step % train.validation_every != 0 {
        validate(step)?;
    }
    if last_saved.as_ref().is_none_or(|(s, _)| *s != step) {
        last_saved = Some((step, save(step, &optimizer)?));
    }
    let adapter = opts.out.join(ADAPTER_FILE);
    crate::peft::file::save_adapter(&adapter, tuned.method.as_ref(), trainable, &base_unet)?;
    Ok(TrainSummary {
        step,
        finished: true,
        adapter: Some(adapter),
        checkpoint: last_saved.map(|(_, p)| p),
        trainable_parameters,
        cached_samples: data.len(),
    })
}

/// The trainable tensors recorded in the newest checkpoint of a run folder, for inspection and tests.
pub fn latest_trainable(out: &Path) -> Result<std::collections::BTreeMap<String, Tensor>> {
    let found = checkpoint::latest(&out.join(CHECKPOINTS_DIR))?
        .with_context(|| format!("{} has no checkpoint", out.display()))?;
    found.trainable()
}
