//! Text-to-image generation as diffusers' `StableDiffusionPipeline.__call__` (and, for SDXL,
//! `StableDiffusionXLPipeline.__call__`) does it: prompt embeddings, classifier-free guidance with
//! the unconditional and conditional halves in one U-Net batch (`[uncond, cond]`), the
//! scheduler's denoising loop, and the VAE decode to `[0, 1]` images.
use crate::model::conditioning::{SizeConditions, TextConditioning};
use crate::model::family::ModelFamily;
use crate::model::pipeline::{load_unet, load_vae_in};
use crate::model::prompt::{PromptEmbeddings, PromptEncoder};
use crate::model::source::ModelFiles;
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
    pub prompts: PromptEncoder,
    /// SDXL's pipeline option (`model_index.json`): without a negative prompt the unconditional
    /// half of guidance gets zero embeddings instead of the empty prompt's.
    pub force_zeros_for_empty_prompt: bool,
    /// The method of an applied adapter file, with the parameters it added to the U-Net.
    pub tuning: Option<Tuned>,
}

impl SdModels {
    /// Loads every component of the model `files` onto `device` (f32).
    pub fn load(files: &ModelFiles, device: Device) -> Result<Self> {
        Self::load_in(files, device, Kind::Float)
    }

    /// Loads every component with its weights in `kind` (f32, f16 or bf16), except a VAE whose
    /// config forces float32 under float16 (SD's and SDXL's do: they overflow). Latents and the
    /// scheduler's arithmetic stay in f32.
    pub fn load_in(files: &ModelFiles, device: Device, kind: Kind) -> Result<Self> {
        let (mut unet_vars, unet) = load_unet(files, device)?;
        if kind != Kind::Float {
            unet_vars.set_kind(kind);
        }
        Self::around_in(files, unet_vars, unet, kind)
    }

    /// A pipeline around a U-Net already loaded (e.g. the one being trained), with `files`' VAE
    /// and text encoders on the U-Net's device, in f32.
    pub fn around(
        files: &ModelFiles,
        unet_vars: nn::VarStore,
        unet: UNet2DConditionModel,
    ) -> Result<Self> {
        Self::around_in(files, unet_vars, unet, Kind::Float)
    }

    fn around_in(
        files: &ModelFiles,
        unet_vars: nn::VarStore,
        unet: UNet2DConditionModel,
        kind: Kind,
    ) -> Result<Self> {
        let device = unet_vars.device();
        let prompts = PromptEncoder::load(files, device, kind)?;
        if let Some(added) = unet.config.added_embedding()? {
            let (expected, got) = (added.text_embeds_dim(), prompts.pooled_dim());
            ensure!(
                got == Some(expected),
                "{}: the U-Net's added embedding takes a {expected}-wide pooled text embedding, the text encoders give {got:?}",
                files.spec
            );
        }
        let force_zeros = match files.family()? {
            ModelFamily::Sdxl => files.pipeline_flag("force_zeros_for_empty_prompt", true)?,
            ModelFamily::Sd1 | ModelFamily::Sd2 => false,
        };
        Ok(Self {
            unet_vars,
            unet,
            vae: load_vae_in(files, device, kind)?,
            prompts,
            force_zeros_for_empty_prompt: force_zeros,
            tuning: None,
        })
    }

    /// Applies the adapter file at `path` (any format [`load_adapter`] reads) to the U-Net,
    /// checking that it was trained on `files`' U-Net. Returns the adapter's method name.
    pub fn apply_adapter(&mut self, path: &Path, files: &ModelFiles) -> Result<&'static str> {
        let mut tuned = load_adapter(
            path,
            &mut self.unet,
            &self.unet_vars,
            &files.unet_identity()?,
        )?;
        // The parameters it added compute with the U-Net's, in the U-Net's precision.
        let kind = self.unet_kind();
        if kind != Kind::Float {
            tuned.params.set_kind(kind);
        }
        let name = tuned.method.name();
        self.tuning = Some(tuned);
        Ok(name)
    }

    pub fn device(&self) -> Device {
        self.unet_vars.device()
    }

    /// The precision of the U-Net's weights.
    pub fn unet_kind(&self) -> Kind {
        self.unet.conv_in.weight.kind()
    }

    pub fn geometry(&self) -> LatentGeometry {
        LatentGeometry::of_vae(&self.vae.config)
    }

    /// diffusers' default image side: the U-Net's `sample_size` (64 when the config has none, as
    /// in SD v1) times the VAE's factor: 512 for SD v1.x, 768 for SD 2.x-768, 1024 for SDXL.
    pub fn default_size(&self) -> usize {
        (self.unet.config.sample_size.unwrap_or(64) * self.geometry().scale_factor) as usize
    }

    /// The embeddings of `prompts` (padded to the tokenizers' length).
    pub fn encode_prompts<S: AsRef<str>>(&self, prompts: &[S]) -> Result<PromptEmbeddings> {
        self.prompts.encode(prompts)
    }

    /// The unconditional half of guidance for `cond`'s prompts: the negative prompt's
    /// embeddings (`negative`, encoded once), or zeros where the pipeline forces them.
    fn unconditional(
        &self,
        negative: Option<&PromptEmbeddings>,
        cond: &PromptEmbeddings,
        sizes: &SizeConditions,
    ) -> TextConditioning {
        match negative {
            Some(negative) => negative.conditioning(sizes).expand(cond.context.size()[0]),
            None => cond.zeros_like().conditioning(sizes),
        }
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
    let factor = models.geometry().scale_factor;
    let sizes = SizeConditions::uncropped(shape[2] * factor, shape[3] * factor);
    // diffusers encodes the empty prompt unless the pipeline forces zeros for it.
    let negative = match (&opts.negative_prompt, models.force_zeros_for_empty_prompt) {
        _ if !guided => None,
        (None, true) => None,
        (negative, _) => Some(models.encode_prompts(&[negative.as_deref().unwrap_or("")])?),
    };
    let mut images = Vec::new();
    for (chunk, prompts) in prompts.chunks(opts.batch_size).enumerate() {
        let start = (chunk * opts.batch_size) as i64;
        let count = prompts.len() as i64;
        let cond = models.encode_prompts(prompts)?;
        let conditioning = if guided {
            let uncond = models.unconditional(negative.as_ref(), &cond, &sizes);
            TextConditioning::cat(&[&uncond, &cond.conditioning(&sizes)])?
        } else {
            cond.conditioning(&sizes)
        };
        let latents = init_latents
            .narrow(0, start, count)
            .to_device(device)
            .to_kind(Kind::Float);
        let latents = denoise(models, scheduler, &conditioning, latents, opts, on_step)
            .with_context(|| format!("denoising images {start}..{}", start + count))?;
        let decoded = tch::no_grad(|| models.vae.decode_scaled(&latents));
        images.push(
            (decoded.to_kind(Kind::Float) / 2.0 + 0.5)
                .clamp(0.0, 1.0)
                .to_device(Device::Cpu),
        );
    }
    Ok(Tensor::cat(&images, 0))
}

/// The scheduler loop for one batch; `conditioning` holds `[uncond, cond]` when guided.
fn denoise(
    models: &SdModels,
    scheduler: &mut dyn Scheduler,
    conditioning: &TextConditioning,
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
        let input = scheduler
            .scale_model_input(&input, i)?
            .to_kind(models.unet_kind());
        let timestep = Tensor::from(t as f32).to_device(input.device());
        let noise_pred = tch::no_grad(|| models.unet.forward(&input, &timestep, conditioning));
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
