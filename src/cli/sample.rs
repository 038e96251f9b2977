use super::dist_check::DistArgs;
use super::interrupt::{FirstSignal, Interrupt};
use super::launch;
use crate::error::SettingsError;
use crate::model::pipeline::load_scheduler_config;
use crate::model::source::ModelFiles;
use crate::sample::grid::{grid_columns, image_grid};
use crate::sample::png::{read_png_rgb, write_png};
use crate::sample::{generate, per_image_latents, GenerateOptions, SdModels};
use crate::schedulers::SchedulerKind;
use crate::util::device::DeviceChoice;
use crate::util::progress::Progress;
use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};
use std::ops::Range;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

/// Generates images: `OUT/00000.png`, `OUT/00001.png`, ... (the generation parameters in PNG text
/// chunks) and `OUT/grid.png`. Image i is drawn from seed `SEED + i` alone, so it is the same
/// whatever the number of images in the run. Under a launcher (torchrun, srun) each rank renders
/// a contiguous share of whole batches, so every image is denoised in the same batch, with the
/// same bytes, as in one process.
#[derive(Args, Debug)]
pub struct SampleArgs {
    /// A diffusers Stable Diffusion folder (SD v1.x, v2.x or SDXL), a hub id or a single file.
    #[arg(long)]
    pub model: String,
    /// Weight variant of the model (e.g. fp16).
    #[arg(long)]
    pub variant: Option<String>,
    /// An adapter file to apply to the U-Net (difftune, peft, diffusers or kohya format).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The prompt.
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    pub prompt: Option<String>,
    /// A text file with one prompt per line (blank lines are skipped).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Images generated for each prompt.
    #[arg(long, default_value_t = 1)]
    pub images_per_prompt: usize,
    /// The negative prompt (default: the empty prompt).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Seed of the first image; image i uses SEED + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Classifier-free guidance scale (at most 1: no guidance).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    #[arg(long, default_value = "pndm", value_parser = scheduler_parser())]
    pub scheduler: SchedulerKind,
    /// Images denoised together.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Image width (default: the U-Net's sample_size times the VAE's downsampling factor, e.g.
    /// 512 for SD v1.x, 768 for SD 2.x-768); a multiple of that factor.
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height (default as for --width).
    #[arg(long)]
    pub height: Option<usize>,
    #[arg(long)]
    pub out: PathBuf,
    /// cpu, cuda, cuda:N, or auto (cuda when available).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Precision of the model's weights. Under fp16 a VAE whose config sets `force_upcast`
    /// (SD's and SDXL's) stays in fp32, as in diffusers; latents stay in fp32.
    #[arg(long, value_enum, default_value_t = WeightDtype::Fp32)]
    pub dtype: WeightDtype,
    #[command(flatten)]
    pub dist: DistArgs,
}

/// `--dtype` of `sample`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    Fp32,
    Fp16,
    Bf16,
}

impl WeightDtype {
    fn kind(self) -> Kind {
        match self {
            WeightDtype::Fp32 => Kind::Float,
            WeightDtype::Fp16 => Kind::Half,
            WeightDtype::Bf16 => Kind::BFloat16,
        }
    }
}

/// The scheduler names, listed in `--help`.
fn scheduler_parser() -> impl clap::builder::TypedValueParser<Value = SchedulerKind> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(SchedulerKind::ALL.map(SchedulerKind::name))
        .try_map(|name| name.parse::<SchedulerKind>())
}

fn prompt_list(args: &SampleArgs) -> Result<Vec<String>> {
    let prompts = match (&args.prompt, &args.prompts) {
        (Some(prompt), _) => vec![prompt.clone()],
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading prompts from {}", path.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        (None, None) => bail!("give --prompt or --prompts"),
    };
    if prompts.is_empty() {
        return Err(SettingsError::invalid("--prompts", "the prompts file has no prompts").into());
    }
    if args.images_per_prompt == 0 {
        return Err(SettingsError::invalid("--images-per-prompt", "must be at least 1").into());
    }
    Ok(prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), args.images_per_prompt))
        .collect())
}

pub fn run(args: SampleArgs) -> Result<()> {
    let prompts = prompt_list(&args)?;
    let files = check_inputs(&args)?;
    Interrupt::install(
        "sample",
        FirstSignal::Exit("the images are written once all are generated: none of this run's are"),
    )?;
    let (group, device) = launch::join(&args.dist, args.device.resolve()?)?;
    // euler_ancestral draws its step noise from one generator through the whole run, so a rank
    // cannot reproduce the noise a single process gives its share.
    ensure!(
        !(group.is_distributed() && args.scheduler == SchedulerKind::EulerAncestral),
        "euler_ancestral cannot be split across ranks with the single-process images (its noise \
         comes from one generator through the whole run): use another scheduler or one process"
    );
    let batches = group.shard_range(prompts.len().div_ceil(args.batch));
    let share = (batches.start * args.batch).min(prompts.len())
        ..(batches.end * args.batch).min(prompts.len());
    if !share.is_empty() {
        render(&args, &files, &prompts, share, device, group.is_main())?;
    }
    group.barrier()?;
    if group.is_main() {
        let images = (0..prompts.len())
            .map(|i| read_png_rgb(&args.out.join(image_name(i))))
            .collect::<Result<Vec<_>>>()?;
        let grid = image_grid(&Tensor::stack(&images, 0), grid_columns(prompts.len()))?;
        write_png(&args.out.join("grid.png"), &grid, &[])?;
        println!(
            "wrote {} images and grid.png to {}",
            prompts.len(),
            args.out.display()
        );
    }
    group.shutdown()
}

fn image_name(index: usize) -> String {
    format!("{index:05}.png")
}

/// Every setting and input, checked before any rank starts or anything is written: the numbers,
/// the model's configs and weight headers, the adapter file, the scheduler with the step count,
/// the image size. Returns the model's files.
fn check_inputs(args: &SampleArgs) -> Result<ModelFiles> {
    if !args.guidance.is_finite() {
        let reason = format!("{} must be a finite number", args.guidance);
        return Err(SettingsError::invalid("--guidance", reason).into());
    }
    if args.batch == 0 {
        return Err(SettingsError::invalid("--batch", "must be at least 1").into());
    }
    let files = crate::settings::check_model(&args.model, args.variant.as_deref())?;
    if let Some(adapter) = &args.adapter {
        crate::settings::check_adapter(adapter)?;
    }
    let scheduler_config = load_scheduler_config(&files)?;
    args.scheduler
        .build(&scheduler_config)
        .and_then(|mut scheduler| scheduler.set_timesteps(args.steps))
        .map_err(|e| SettingsError::invalid("--scheduler and --steps", e))?;
    let vae = crate::model::vae::VaeConfig::from_file(&files.vae.config)?;
    let geometry = crate::sample::LatentGeometry::of_vae(&vae);
    let side = geometry.scale_factor as usize;
    geometry
        .latent_shape(1, args.height.unwrap_or(side), args.width.unwrap_or(side))
        .map_err(|e| SettingsError::invalid("--width and --height", e))?;
    Ok(files)
}

/// Generates and writes images `share` of `prompts` (whole batches), with a progress bar when
/// `show_progress`.
fn render(
    args: &SampleArgs,
    files: &ModelFiles,
    prompts: &[String],
    share: Range<usize>,
    device: Device,
    show_progress: bool,
) -> Result<()> {
    let mut models = SdModels::load_in(files, device, args.dtype.kind())?;
    if let Some(path) = &args.adapter {
        let method = models.apply_adapter(path, files)?;
        if show_progress {
            eprintln!("applied the `{method}` adapter file {}", path.display());
        }
    }
    let mut scheduler = args.scheduler.build(&load_scheduler_config(files)?)?;
    scheduler.set_timesteps(args.steps)?;
    let evaluations = scheduler.timesteps().len() * share.len().div_ceil(args.batch);

    let width = args.width.unwrap_or_else(|| models.default_size());
    let height = args.height.unwrap_or_else(|| models.default_size());
    let first_seed = args
        .seed
        .checked_add(share.start as u64)
        .context("seed + image index overflows u64")?;
    let latents = per_image_latents(
        first_seed,
        share.len(),
        height,
        width,
        models.geometry(),
        device,
    )?;
    let opts = GenerateOptions {
        steps: args.steps,
        guidance_scale: args.guidance,
        negative_prompt: args.negative_prompt.clone(),
        batch_size: args.batch,
    };
    let progress = Progress::new("sample", evaluations as u64, "U-Net steps", show_progress);
    let images = generate(
        &models,
        scheduler.as_mut(),
        &prompts[share.clone()],
        &latents,
        &opts,
        &mut || progress.inc(1),
    )?;
    progress.finish();
    for (row, i) in share.enumerate() {
        let text = png_text(args, &prompts[i], i, width, height);
        write_png(
            &args.out.join(image_name(i)),
            &images.get(row as i64),
            &text,
        )?;
    }
    Ok(())
}

/// The parameters stored in image `index`'s PNG text chunks, enough to render it again.
fn png_text(
    args: &SampleArgs,
    prompt: &str,
    index: usize,
    width: usize,
    height: usize,
) -> Vec<(&'static str, String)> {
    let adapter = args
        .adapter
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let mut text = vec![
        ("prompt", prompt.to_string()),
        ("seed", (args.seed + index as u64).to_string()),
        ("steps", args.steps.to_string()),
        ("guidance", args.guidance.to_string()),
        ("scheduler", args.scheduler.to_string()),
        ("model", args.model.clone()),
        ("adapter", adapter),
        ("width", width.to_string()),
        ("height", height.to_string()),
        (
            "software",
            format!("difftune {}", env!("CARGO_PKG_VERSION")),
        ),
    ];
    if let Some(negative) = &args.negative_prompt {
        text.push(("negative_prompt", negative.clone()));
    }
    if args.dtype != WeightDtype::Fp32 {
        text.push(("dtype", format!("{:?}", args.dtype).to_lowercase()));
    }
    text
}
