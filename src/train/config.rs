//! The run configuration: a TOML file with a `[train]` table (these settings) and a `[method]`
//! table (the tuning method's name and its own settings, built by the peft module). The command
//! line's run files and `--set` overrides are merged into it by [`crate::settings`]. Every field has
//! a default; the study's where it states one (10,000 steps, learning rate 1e-5, AdamW, bf16), else
//! the Stable Diffusion fine-tuning example of diffusers' `train_text_to_image.py` README
//! (512 px, batch 1 with 4 accumulation steps, gradient-norm clipping at 1, constant schedule).
use super::ema::EmaSettings;
use super::optim::{AdamWConfig, LrSchedule};
use crate::data::buckets::buckets;
use crate::data::cache::CacheSettings;
use crate::data::captions::CaptionOptions;
use crate::data::images::{DecodeOptions, ExifOrientation, ResizeFilter, DEFAULT_MAX_IMAGE_PIXELS};
use crate::data::PromptTemplate;
use crate::error::SettingsError;
use crate::peft::export::AdapterFormat;
use crate::peft::MethodSettings;
use crate::schedulers::SchedulerKind;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Numeric precision of the U-Net during training.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// bf16 autocast on CUDA (as the study trained), f32 on the CPU.
    #[default]
    Auto,
    /// f32 everywhere.
    Fp32,
    /// bf16 autocast with f32 trainable weights and bf16 frozen weights, on CUDA or the CPU.
    Bf16,
}

/// What the U-Net is trained to predict.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum PredictionTarget {
    /// The scheduler config's `prediction_type` (epsilon when it has none), as diffusers does.
    #[default]
    Scheduler,
    Epsilon,
    VPrediction,
}

pub use crate::util::device::DeviceChoice;

/// The `[train]` table. Documented defaults in [`TrainConfig::default`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Seeds every random choice: data order, latent samples, noise, timesteps. Default 0.
    pub seed: u64,
    /// Optimizer steps. Default 10,000 (the study).
    pub steps: usize,
    /// Images per forward pass. Default 1.
    pub batch_size: usize,
    /// Forward passes whose gradients are summed per optimizer step. Default 4.
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate. Default 1e-5 (the study).
    pub learning_rate: f64,
    /// Default `constant`.
    pub lr_schedule: LrSchedule,
    /// Optimizer steps of linear warm-up (for `constant_with_warmup` and `cosine`). Default 0.
    pub lr_warmup_steps: usize,
    /// AdamW moments, epsilon and decoupled weight decay. Defaults 0.9, 0.999, 1e-8, 1e-2.
    pub optimizer: AdamWConfig,
    /// Clip the global gradient norm to this; 0 disables clipping. Default 1.0.
    pub max_grad_norm: f64,
    /// Default `auto`: bf16 autocast on CUDA, f32 on the CPU.
    pub precision: Precision,
    /// Recompute each U-Net resnet and transformer block in the backward pass instead of keeping
    /// its activations: less memory for about one more forward pass. Default false.
    pub gradient_checkpointing: bool,
    /// Lay the U-Net's 4-D weights (convolutions) and the latents out channels-last (NHWC), so
    /// that torch runs its NHWC convolution kernels: the same result up to float rounding, and
    /// files are written in the standard order. Faster on the CPU for LoRA on an SD-sized U-Net,
    /// not measurably for full fine-tuning nor for tiny models (see the README). Default false.
    pub channels_last: bool,
    /// Default `scheduler`: follow the model's scheduler config.
    pub prediction_type: PredictionTarget,
    /// Min-SNR-γ loss weighting (Hang et al. 2023; 5.0 is the paper's choice); 0 disables. Default 0.
    pub snr_gamma: f64,
    /// Scale of per-channel noise offset added to the noise; 0 disables. Default 0.
    pub noise_offset: f64,
    /// Training images are resized (shorter side) and centre-cropped to this. Default 512.
    pub resolution: u32,
    /// Resize filter: `bilinear`, `bicubic` or `lanczos3`. Default `bilinear` (diffusers' scripts).
    pub resize_filter: ResizeFilter,
    /// EXIF orientation of training images: `apply` (rotate as the tag says) or `ignore` (the
    /// stored pixels, as Pillow's `Image.open` gives them). Default `apply`.
    pub exif_orientation: ExifOrientation,
    /// Training images with more pixels are skipped (an error with `--strict`), refused from
    /// their header before decoding. Default 178,956,970 (Pillow's decompression-bomb limit).
    pub max_image_pixels: u64,
    /// Caption of a labelled dataset's images. Default `a photo of {label}, a type of food`.
    pub prompt_template: String,
    /// Train on at most this many images per class; 0 means all. Default 0.
    pub limit_per_class: usize,
    /// Images encoded per VAE forward when building the latent cache. Default 8.
    pub cache_batch_size: usize,
    /// Probability of training an image on the empty prompt (kohya's `caption_dropout_rate`).
    /// Default 0.
    pub caption_dropout_rate: f64,
    /// Shuffle the comma-separated tags of each caption (kohya's `shuffle_caption`). Default
    /// false.
    pub shuffle_caption: bool,
    /// Tags at the front of a caption kept in place when shuffling (kohya's `keep_tokens`).
    /// Default 0.
    pub keep_tokens: usize,
    /// Captions cached per image when shuffling: the caption as written and this many minus one
    /// seeded shuffles, one drawn per appearance. Default 4.
    pub caption_variants: usize,
    /// Aspect-ratio buckets: each image trains at the size nearest its aspect ratio within the
    /// pixel budget `resolution²`, every batch from one bucket. Default false.
    pub bucket: bool,
    /// Side step of the buckets, a multiple of 8 (SD's U-Net needs 64). Default 64.
    pub bucket_step: u32,
    /// Train on each image or its mirror image by a seeded draw (both latents are cached).
    /// Default false.
    pub random_flip: bool,
    /// Save a checkpoint every this many optimizer steps (and at the end): at least 1; a value
    /// of at least `steps` saves only at the end. Default 500.
    pub checkpoint_every: usize,
    /// Checkpoints kept; older ones are deleted. Default 3.
    pub keep_checkpoints: usize,
    /// Default `auto`: CUDA when available.
    pub device: DeviceChoice,
    /// Sample validation images every this many optimizer steps and at the end; 0 disables.
    /// Default 0.
    pub validation_every: usize,
    /// Validation prompts; empty takes the first `validation_images` captions of the data.
    /// Default empty.
    pub validation_prompts: Vec<String>,
    /// How many of the data's captions to sample when `validation_prompts` is empty. Default 4.
    pub validation_images: usize,
    /// Validation image `i` starts from the noise of seed `validation_seed + i`. Default 0.
    pub validation_seed: u64,
    /// Sampling scheduler of the validation images (as `difftune sample` names them). Default
    /// `dpmsolver++`.
    pub validation_scheduler: SchedulerKind,
    /// Denoising steps of the validation images. Default 25.
    pub validation_steps: usize,
    /// Classifier-free guidance scale of the validation images. Default 7.5.
    pub validation_guidance: f64,
    /// An exponential moving average of the trained tensors (a `[train.ema]` table, or e.g.
    /// `--set ema.decay=0.999`), kept in checkpoints and saved as the adapter file. Default off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ema: Option<EmaSettings>,
    /// Other tools' formats the adapter file is also written in at the end of a run, beside it
    /// (`adapter-kohya.safetensors`, `adapter-diffusers/`, `adapter-peft/`): `kohya` for ComfyUI
    /// and A1111, `diffusers` for `load_lora_weights`, `peft` for `PeftModel`; e.g.
    /// `export = ["kohya"]`. The method must be able to go to each (LoRA: all three; DoRA: not
    /// kohya). Default none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub export: Vec<AdapterFormat>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            steps: 10_000,
            batch_size: 1,
            gradient_accumulation_steps: 4,
            gradient_checkpointing: false,
            channels_last: false,
            learning_rate: 1e-5,
            lr_schedule: LrSchedule::Constant,
            lr_warmup_steps: 0,
            optimizer: AdamWConfig::default(),
            max_grad_norm: 1.0,
            precision: Precision::Auto,
            prediction_type: PredictionTarget::Scheduler,
            snr_gamma: 0.0,
            noise_offset: 0.0,
            resolution: 512,
            resize_filter: ResizeFilter::Bilinear,
            exif_orientation: ExifOrientation::Apply,
            max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS,
            prompt_template: crate::data::prompts::DEFAULT_TEMPLATE.into(),
            limit_per_class: 0,
            cache_batch_size: 8,
            caption_dropout_rate: 0.0,
            shuffle_caption: false,
            keep_tokens: 0,
            caption_variants: 4,
            bucket: false,
            bucket_step: 64,
            random_flip: false,
            checkpoint_every: 500,
            keep_checkpoints: 3,
            device: DeviceChoice::Auto,
            validation_every: 0,
            validation_prompts: Vec::new(),
            validation_images: 4,
            validation_seed: 0,
            validation_scheduler: SchedulerKind::DpmSolverPlusPlus,
            validation_steps: 25,
            validation_guidance: 7.5,
            ema: None,
            export: Vec::new(),
        }
    }
}

impl TrainConfig {
    /// Checks every value; errors are [`SettingsError`]s naming the setting.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
            ("resolution", self.resolution as usize),
            ("cache_batch_size", self.cache_batch_size),
            ("keep_checkpoints", self.keep_checkpoints),
            ("max_image_pixels", self.max_image_pixels as usize),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(invalid(name, "must be positive"));
        }
        if self.checkpoint_every == 0 {
            return Err(invalid(
                "checkpoint_every",
                format!(
                    "must be positive (0 no longer means \"only at the end\"): to save only at the end, \
                     use a value of at least train.steps, e.g. checkpoint_every = {}",
                    self.steps
                ),
            ));
        }
        if !self.resolution.is_multiple_of(8) {
            return Err(invalid(
                "resolution",
                format!(
                    "{} is not a multiple of 8 (the VAE's downsampling factor)",
                    self.resolution
                ),
            ));
        }
        for (name, v) in [
            ("learning_rate", self.learning_rate),
            ("max_grad_norm", self.max_grad_norm),
            ("snr_gamma", self.snr_gamma),
            ("noise_offset", self.noise_offset),
            ("optimizer.weight_decay", self.optimizer.weight_decay),
            ("optimizer.eps", self.optimizer.eps),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(
                    name,
                    format!("must be a finite, non-negative number, got {v}"),
                ));
            }
        }
        for (name, v) in [
            ("optimizer.beta1", self.optimizer.beta1),
            ("optimizer.beta2", self.optimizer.beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(invalid(name, format!("must be in [0, 1), got {v}")));
            }
        }
        self.validate_parts()
    }

    /// Checks the settings that other modules judge: the prompt template, the caption options,
    /// the buckets and the EMA.
    fn validate_parts(&self) -> Result<()> {
        let checks = [
            (
                "prompt_template",
                PromptTemplate::new(&self.prompt_template).map(drop),
            ),
            ("caption_*", self.captions().validate()),
            (
                "bucket_step",
                self.bucket_step()
                    .map_or(Ok(()), |step| buckets(self.resolution, step).map(drop)),
            ),
            (
                "ema",
                self.ema.as_ref().map_or(Ok(()), EmaSettings::validate),
            ),
        ];
        for (name, check) in checks {
            check.map_err(|e| invalid(name, e))?;
        }
        Ok(())
    }

    /// Settings that are valid but do nothing as combined, each said in a sentence (the command
    /// line prints them as warnings).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.lr_warmup_steps > 0 && !self.lr_schedule.warms_up() {
            warnings.push(format!(
                "train.lr_warmup_steps = {} is ignored by lr_schedule = {} (warm-up needs \
                 \"constant_with_warmup\" or \"cosine\")",
                self.lr_warmup_steps,
                toml::Value::try_from(self.lr_schedule)
                    .map_or_else(|_| "?".into(), |v| v.to_string())
            ));
        }
        warnings
    }

    /// Whether `key` names a setting of the `[train]` table (for `--set KEY=VALUE` without a
    /// table name).
    pub fn is_setting(key: &str) -> bool {
        let all = Self {
            ema: Some(EmaSettings::default()),
            export: vec![AdapterFormat::Kohya],
            ..Self::default()
        };
        toml::Table::try_from(all).is_ok_and(|table| table.contains_key(key))
    }

    /// The caption options of the latent cache.
    pub fn captions(&self) -> CaptionOptions {
        CaptionOptions {
            dropout: self.caption_dropout_rate,
            shuffle: self.shuffle_caption,
            keep_first: self.keep_tokens,
            variants: self.caption_variants,
        }
    }

    /// What the latent cache of a dataset holds for a run with these settings, encoded on
    /// `device` (`strict`: an unreadable image is an error rather than skipped).
    pub fn cache_settings(&self, strict: bool, device: tch::Device) -> Result<CacheSettings> {
        Ok(CacheSettings {
            resolution: self.resolution,
            resize_filter: self.resize_filter,
            prompt_template: PromptTemplate::new(&self.prompt_template)?,
            limit_per_class: (self.limit_per_class > 0).then_some(self.limit_per_class),
            captions: self.captions(),
            bucket_step: self.bucket_step(),
            flip: self.random_flip,
            batch_size: self.cache_batch_size,
            strict,
            decode: DecodeOptions {
                exif_orientation: self.exif_orientation,
                max_pixels: self.max_image_pixels,
            },
            device,
            ..CacheSettings::default()
        })
    }

    /// The step of the aspect-ratio buckets, when they are on.
    pub fn bucket_step(&self) -> Option<u32> {
        self.bucket.then_some(self.bucket_step)
    }

    /// These settings with those a resumed run may change reset: they do not change what is
    /// trained (how long it runs, how often it saves, how many checkpoints it keeps, the device,
    /// the memory layout, validation, the formats exported at the end), or they set how fast it
    /// moves, which a run that diverged resumes with changed (learning rate, its schedule and
    /// warm-up, gradient clipping).
    pub fn trajectory(&self) -> Self {
        let defaults = Self::default();
        Self {
            learning_rate: defaults.learning_rate,
            lr_schedule: defaults.lr_schedule,
            lr_warmup_steps: defaults.lr_warmup_steps,
            max_grad_norm: defaults.max_grad_norm,
            steps: 0,
            checkpoint_every: 0,
            keep_checkpoints: 0,
            device: DeviceChoice::Auto,
            channels_last: defaults.channels_last,
            validation_every: 0,
            validation_prompts: Vec::new(),
            validation_images: defaults.validation_images,
            validation_seed: defaults.validation_seed,
            validation_scheduler: defaults.validation_scheduler,
            validation_steps: defaults.validation_steps,
            validation_guidance: defaults.validation_guidance,
            export: Vec::new(),
            ..self.clone()
        }
    }
}

/// What one training run computes: its `[train]` settings and its tuning method, built. A run
/// with another learning rate, seed or step count is a plain field update of a clone (the method
/// is shared, not rebuilt).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    #[serde(default)]
    pub train: TrainConfig,
    pub method: MethodSettings,
}

impl RunConfig {
    /// `method` with the default training settings.
    pub fn new(method: MethodSettings) -> Self {
        Self {
            train: TrainConfig::default(),
            method,
        }
    }

    /// The registered method `name` with its default settings and the default training settings.
    pub fn for_method(name: &str) -> Result<Self> {
        Ok(Self::new(MethodSettings::defaults(name)?))
    }

    /// Checks every setting (the method's were checked when it was built).
    pub fn validate(&self) -> Result<()> {
        self.train.validate()?;
        crate::peft::export::check_exports(self.method.method(), &self.train.export)
            .map_err(|e| SettingsError::invalid("train.export", format!("{e:#}")).into())
    }

    /// Reads a run config that a run recorded (`run.toml`, a checkpoint's state): the method is
    /// built, but the values are not checked again, so that a run recorded under an older rule
    /// (`checkpoint_every = 0`) can still be compared with when it resumes. Settings a user
    /// gives go through [`crate::settings`], which checks them all.
    pub fn from_toml(text: &str) -> Result<Self> {
        Ok(toml::from_str(text)?)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading run config {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("run config {}", path.display()))
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }
}

/// [`SettingsError::Invalid`] for `train.NAME`.
fn invalid(name: &str, reason: impl std::fmt::Display) -> anyhow::Error {
    SettingsError::invalid(format!("train.{name}"), reason).into()
}
