//! The run configuration: a TOML file with a `[train]` table (these settings) and a `[method]`
//! table (the tuning method's name and its own settings, read by the peft module). Every field has
//! a default; the study's where it states one (10,000 steps, learning rate 1e-5, AdamW, bf16), else
//! the Stable Diffusion fine-tuning example of diffusers' `train_text_to_image.py` README
//! (512 px, batch 1 with 4 accumulation steps, gradient-norm clipping at 1, constant schedule).
use super::ema::EmaSettings;
use super::optim::{AdamWConfig, LrSchedule};
use crate::data::captions::CaptionOptions;
use crate::data::images::{ExifOrientation, ResizeFilter, DEFAULT_MAX_IMAGE_PIXELS};
use crate::peft::formats::AdapterFormat;
use crate::schedulers::SchedulerKind;
use anyhow::{bail, Context, Result};
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
    /// Save a checkpoint every this many optimizer steps; 0 saves only at the end. Default 500.
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
            bail!("train.{name} must be positive");
        }
        if !self.resolution.is_multiple_of(8) {
            bail!(
                "train.resolution {} is not a multiple of 8 (the VAE's downsampling factor)",
                self.resolution
            );
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
                bail!("train.{name} must be a finite, non-negative number, got {v}");
            }
        }
        for (name, v) in [
            ("optimizer.beta1", self.optimizer.beta1),
            ("optimizer.beta2", self.optimizer.beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                bail!("train.{name} must be in [0, 1), got {v}");
            }
        }
        crate::data::PromptTemplate::new(&self.prompt_template).context("train.prompt_template")?;
        self.captions().validate().context("train.caption_*")?;
        if let Some(step) = self.bucket_step() {
            crate::data::buckets::buckets(self.resolution, step).context("train.bucket_step")?;
        }
        if let Some(ema) = &self.ema {
            ema.validate()?;
        }
        Ok(())
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

    /// The step of the aspect-ratio buckets, when they are on.
    pub fn bucket_step(&self) -> Option<u32> {
        self.bucket.then_some(self.bucket_step)
    }

    /// These settings with those a resumed run may change reset: they do not change what is
    /// trained (how long it runs, how often it saves, how many checkpoints it keeps, the device,
    /// the memory layout, validation, the formats exported at the end), or they set how fast it moves, which a run that diverged
    /// resumes with changed (learning rate, its schedule and warm-up, gradient clipping).
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

/// `[train]` settings that a written run file leaves out while they are unset, so that a bare
/// `--set KEY=...` finds them although the table of the current settings lacks them.
const UNSET_TRAIN_KEYS: [&str; 2] = ["ema", "export"];

/// The `[method]` table: `name` picks the tuning method, the other keys are its settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct MethodConfig {
    pub name: String,
    #[serde(flatten)]
    pub settings: toml::Table,
}

/// A whole run configuration file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    #[serde(default)]
    pub train: TrainConfig,
    /// May be left out of the file when the command line names the method.
    #[serde(default)]
    pub method: MethodConfig,
}

impl RunConfig {
    /// Defaults for `method` with no settings of its own.
    pub fn for_method(method: &str) -> Self {
        Self {
            train: TrainConfig::default(),
            method: MethodConfig {
                name: method.to_string(),
                settings: toml::Table::new(),
            },
        }
    }

    pub fn from_toml(text: &str) -> Result<Self> {
        let config: Self = toml::from_str(text)?;
        config.train.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading run config {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("run config {}", path.display()))
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }

    /// Applies `--set key=value` overrides (parsed by [`crate::peft::parse_set_pairs`]).
    /// `train.KEY` and `method.KEY` name their table; a bare key goes to `[train]` when it is a
    /// training setting and to `[method]` otherwise (`method.name` or a bare `name` renames the
    /// method).
    pub fn apply_overrides(&mut self, overrides: toml::Table) -> Result<()> {
        let mut train = toml::Table::try_from(&self.train)?;
        let mut method = self.method.settings.clone();
        method.insert("name".into(), toml::Value::String(self.method.name.clone()));
        for (key, value) in overrides {
            let (target, value) = match (key.as_str(), value) {
                ("train", toml::Value::Table(t)) => (&mut train, t),
                ("method", toml::Value::Table(t)) => (&mut method, t),
                (_, value)
                    if train.contains_key(&key) || UNSET_TRAIN_KEYS.contains(&key.as_str()) =>
                {
                    (&mut train, toml::Table::from_iter([(key, value)]))
                }
                (_, value) => (&mut method, toml::Table::from_iter([(key, value)])),
            };
            crate::peft::merge_tables(target, value);
        }
        self.method = toml::Value::Table(method)
            .try_into()
            .context("applying --set overrides to the [method] settings")?;
        self.train = toml::Value::Table(train)
            .try_into()
            .context("applying --set overrides to the [train] settings")?;
        self.train.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_keys_of_unset_train_settings_go_to_train() {
        let mut config = RunConfig::for_method("lora");
        let pairs = ["export=[\"kohya\"]", "ema.decay=0.99", "rank=8"].map(String::from);
        config
            .apply_overrides(crate::peft::parse_set_pairs(&pairs).unwrap())
            .unwrap();
        assert_eq!(config.train.export, [AdapterFormat::Kohya]);
        assert_eq!(config.train.ema.unwrap().decay, 0.99);
        assert_eq!(config.method.settings["rank"].as_integer(), Some(8));
    }
}
