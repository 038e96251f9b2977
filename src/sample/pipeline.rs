//! Text-to-image generation as diffusers' `StableDiffusionPipeline.__call__` does it: prompt
//! embeddings, classifier-free guidance with the unconditional and conditional halves in one U-Net
//! batch (`[uncond, cond]`), the scheduler's denoising loop, and the VAE decode to `[0, 1]` images.
use crate::model::clip::ClipTextModel;
use crate::model::pipeline::{load_text_encoder, load_tokenizer, load_unet, load_vae};
use crate::model::source::ModelFiles;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::{AutoencoderKL, VaeConfig};
use crate::peft::formats::load_adapter;
use crate::peft::Tuned;
use crate::schedulers::Scheduler;
use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::sync::Mutex;
use tch::{nn, Device, Kind, Tensor};

/// A model's latent space as diffusers derives it from the VAE config: `latent_channels`, and
/// the image-to-latent downsampling factor `2 ** (len(block_out_channels) - 1)` (8 for SD).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentGeometry {
    pub channels: i64,
    pub scale_factor: i64,
}

impl LatentGeometry {
    pub fn of_vae(config: &VaeConfig) -> Self {
        Self {
            channels: config.latent_channels,
            scale_factor: 1 << (config.block_out_channels.len().max(1) - 1),
        }
    }

    /// `[n, channels, height / factor, width / factor]`; sizes that are not positive multiples of
    /// the factor are an error naming it.
    pub fn latent_shape(&self, n: usize, height: usize, width: usize) -> Result<[i64; 4]> {
        let factor = self.scale_factor;
        ensure!(
            height > 0
                && width > 0
                && height as i64 % factor == 0
                && width as i64 % factor == 0,
            "image size {width}x{height} must be a positive multiple of {factor} (this model's VAE downsamples by {factor})"
        );
        Ok([
            n as i64,
            self.channels,
            height as i64 / factor,
            width as i64 / factor,
        ])
    }
}

/// The components a text-to-image run needs, on one device.
pub struct SdModels {
    /// The U-Net's variables, for applying an adapter or swapping in tuned weights.
    pub unet_vars: nn::VarStore,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub text_encoder: ClipTextModel,
    pub tokenizer: ClipTokenizer,
    /// The method of an applied adapter file, with the parameters it added to the U-Net.
    pub tuning: Option<Tuned>,
}

impl SdModels {
    /// Loads every component of the model `files` onto `device` (f32).
    pub fn load(files: &ModelFiles, device: Device) -> Result<Self> {
        let (unet_vars, unet) = load_unet(files, device)?;
        Ok(Self {
            unet_vars,
            unet,
            vae: load_vae(files, device)?,
            text_encoder: load_text_encoder(files, device)?,
            tokenizer: load_tokenizer(files)?,
            tuning: None,
        })
    }

    /// Applies the adapter file at `path` (any format [`load_adapter`] reads) to the U-Net,
    /// checking that it was trained on `files`' U-Net. Returns the adapter's method name.
    pub fn apply_adapter(&mut self, path: &Path, files: &ModelFiles) -> Result<&'static str> {
        let tuned = load_adapter(
            path,
            &mut self.unet,
            &self.unet_vars,
            &files.unet_identity()?,
        )?;
        let name = tuned.method.name();
        self.tuning = Some(tuned);
        Ok(name)
    }

    pub fn device(&self) -> Device {
        self.unet_vars.device()
    }

    pub fn geometry(&self) -> LatentGeometry {
        LatentGeometry::of_vae(&self.vae.config)
    }

    /// diffusers' default image side: the U-Net's `sample_size` (64 when the config has none, as
    /// in SD v1) times the VAE's factor: 512 for SD v1.x, 768 for SD 2.x-768.
    pub fn default_size(&self) -> usize {
        (self.unet.config.sample_size.unwrap_or(64) * self.geometry().scale_factor) as usize
    }

    /// `[n, seq, hidden]` text-encoder embeddings of `prompts` (padded to the tokenizer's length).
    pub fn encode_prompts<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Tensor> {
        let ids = self.tokenizer.input_ids(prompts)?.to_device(self.device());
        Ok(tch::no_grad(|| self.text_encoder.forward(&ids)))
    }
}

/// How [`generate`] samples.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub steps: usize,
    /// Classifier-free guidance scale; at or below 1 the unconditional pass is skipped (as
    /// diffusers' `do_classifier_free_guidance` is `guidance_scale > 1`).
    pub guidance_scale: f64,
    /// Prompt of the unconditional half; `None` is the empty prompt.
    pub negative_prompt: Option<String>,
    /// Images denoised together (the U-Net sees twice this many with guidance).
    pub batch_size: usize,
}

/// Generates one image per prompt from `init_latents` `[n, c, h, w]` (unit-variance noise, e.g.
/// from [`initial_latents`]; scaled here by the scheduler's `init_noise_sigma`). Returns f32
/// images in `[0, 1]`, `[n, 3, f*h, f*w]` for the VAE's factor f, on the CPU. `on_step` is called after every U-Net
/// evaluation (`steps` times per batch), for progress reporting.
pub fn generate(
    models: &SdModels,
    scheduler: &mut dyn Scheduler,
    prompts: &[String],
    init_latents: &Tensor,
    opts: &GenerateOptions,
    on_step: &mut dyn FnMut(),
) -> Result<Tensor> {
    let n = prompts.len() as i64;
    let shape = init_latents.size();
    let channels = models.geometry().channels;
    ensure!(
        shape.len() == 4 && shape[0] == n && shape[1] == channels,
        "initial latents must be [{n}, {channels}, h, w] for {n} prompts, got {shape:?}"
    );
    ensure!(opts.batch_size > 0, "the batch size must be at least 1");
    ensure!(opts.steps > 0, "the number of steps must be at least 1");
    let device = models.device();
    let guided = opts.guidance_scale > 1.0;
    let negative = models.encode_prompts(&[opts.negative_prompt.as_deref().unwrap_or("")])?;
    let mut images = Vec::new();
    for (chunk, prompts) in prompts.chunks(opts.batch_size).enumerate() {
        let start = (chunk * opts.batch_size) as i64;
        let count = prompts.len() as i64;
        let cond = models.encode_prompts(prompts)?;
        let context = if guided {
            Tensor::cat(&[negative.expand([count, -1, -1], false), cond], 0)
        } else {
            cond
        };
        let latents = init_latents
            .narrow(0, start, count)
            .to_device(device)
            .to_kind(Kind::Float);
        let latents = denoise(models, scheduler, &context, latents, opts, on_step)
            .with_context(|| format!("denoising images {start}..{}", start + count))?;
        let decoded = tch::no_grad(|| models.vae.decode_scaled(&latents));
        images.push((decoded / 2.0 + 0.5).clamp(0.0, 1.0).to_device(Device::Cpu));
    }
    Ok(Tensor::cat(&images, 0))
}

/// The scheduler loop for one batch; `context` holds `[uncond, cond]` embeddings when guided.
fn denoise(
    models: &SdModels,
    scheduler: &mut dyn Scheduler,
    context: &Tensor,
    latents: Tensor,
    opts: &GenerateOptions,
    on_step: &mut dyn FnMut(),
) -> Result<Tensor> {
    let guided = opts.guidance_scale > 1.0;
    scheduler.set_timesteps(opts.steps)?;
    let mut latents = latents * scheduler.init_noise_sigma();
    let timesteps = scheduler.timesteps().to_vec();
    for (i, &t) in timesteps.iter().enumerate() {
        let input = if guided {
            Tensor::cat(&[&latents, &latents], 0)
        } else {
            latents.shallow_clone()
        };
        let input = scheduler.scale_model_input(&input, i)?;
        let timestep = Tensor::from(t as f32).to_device(input.device());
        let noise_pred = tch::no_grad(|| models.unet.forward(&input, &timestep, context));
        let noise_pred = if guided {
            let halves = noise_pred.chunk(2, 0);
            let (uncond, cond) = (&halves[0], &halves[1]);
            uncond + (cond - uncond) * opts.guidance_scale
        } else {
            noise_pred
        };
        latents = tch::no_grad(|| scheduler.step(&noise_pred, i, &latents))?;
        on_step();
    }
    Ok(latents)
}

/// libtorch's default CPU generator is process-wide: seeding and drawing must not interleave with
/// another thread's. (Other users of that generator, such as building a model with random initial
/// weights, must not run concurrently with [`initial_latents`] either.)
static CPU_GENERATOR: Mutex<()> = Mutex::new(());

/// The initial noise diffusers draws for `n` images of `height` x `width` pixels with
/// `generator=torch.Generator("cpu").manual_seed(seed)`: `randn((n, c, height/f, width/f))` on
/// the CPU for the model's latent `geometry`, then moved to `device`. Reseeds libtorch's global
/// CPU generator (which the ancestral schedulers then draw from), as `torch.manual_seed` would.
pub fn initial_latents(
    seed: u64,
    n: usize,
    height: usize,
    width: usize,
    geometry: LatentGeometry,
    device: Device,
) -> Result<Tensor> {
    let shape = geometry.latent_shape(n, height, width)?;
    let seed = i64::try_from(seed).context("the seed must be below 2^63")?;
    let _guard = CPU_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    Ok(Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_device(device))
}

/// Initial noise where image `i` is drawn from seed `first_seed + i` alone (diffusers with a list
/// of generators), so an image does not depend on how many others share its run or batch.
pub fn per_image_latents(
    first_seed: u64,
    n: usize,
    height: usize,
    width: usize,
    geometry: LatentGeometry,
    device: Device,
) -> Result<Tensor> {
    ensure!(n > 0, "no images to draw latents for");
    let latents = (0..n as u64)
        .map(|i| {
            let seed = first_seed
                .checked_add(i)
                .context("seed + image index overflows u64")?;
            initial_latents(seed, 1, height, width, geometry, device)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&latents, 0))
}
