//! Text-to-image generation as diffusers' `StableDiffusionPipeline.__call__` does it: prompt
//! embeddings, classifier-free guidance with the unconditional and conditional halves in one U-Net
//! batch (`[uncond, cond]`), the scheduler's denoising loop, and the VAE decode to `[0, 1]` images.
use crate::model::clip::ClipTextModel;
use crate::model::pipeline::{load_text_encoder, load_tokenizer, load_unet, load_vae};
use crate::model::source::ModelFiles;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKL;
use crate::peft::formats::load_adapter;
use crate::peft::Tuned;
use crate::schedulers::Scheduler;
use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::sync::Mutex;
use tch::{nn, Device, Kind, Tensor};

/// Channels of SD's latent space.
const LATENT_CHANNELS: i64 = 4;
/// SD's image-to-latent downsampling factor.
const VAE_SCALE_FACTOR: i64 = 8;

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

/// Generates one image per prompt from `init_latents` `[n, 4, h, w]` (unit-variance noise, e.g.
/// from [`initial_latents`]; scaled here by the scheduler's `init_noise_sigma`). Returns f32
/// images in `[0, 1]`, `[n, 3, 8h, 8w]`, on the CPU. `on_step` is called after every U-Net
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
    ensure!(
        shape.len() == 4 && shape[0] == n && shape[1] == LATENT_CHANNELS,
        "initial latents must be [{n}, {LATENT_CHANNELS}, h, w] for {n} prompts, got {shape:?}"
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
/// `generator=torch.Generator("cpu").manual_seed(seed)`: `randn((n, 4, height/8, width/8))` on
/// the CPU, then moved to `device`. Reseeds libtorch's global CPU generator (which the ancestral
/// schedulers then draw from), as `torch.manual_seed` would.
pub fn initial_latents(
    seed: u64,
    n: usize,
    height: usize,
    width: usize,
    device: Device,
) -> Result<Tensor> {
    ensure!(
        height > 0
            && width > 0
            && height as i64 % VAE_SCALE_FACTOR == 0
            && width as i64 % VAE_SCALE_FACTOR == 0,
        "image size {width}x{height} must be a positive multiple of {VAE_SCALE_FACTOR}"
    );
    let seed = i64::try_from(seed).context("the seed must be below 2^63")?;
    let shape = [
        n as i64,
        LATENT_CHANNELS,
        height as i64 / VAE_SCALE_FACTOR,
        width as i64 / VAE_SCALE_FACTOR,
    ];
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
    device: Device,
) -> Result<Tensor> {
    ensure!(n > 0, "no images to draw latents for");
    let latents = (0..n as u64)
        .map(|i| {
            let seed = first_seed
                .checked_add(i)
                .context("seed + image index overflows u64")?;
            initial_latents(seed, 1, height, width, device)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&latents, 0))
}
