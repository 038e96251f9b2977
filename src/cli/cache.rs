use super::dist_check::DistArgs;
use super::interrupt::{FirstSignal, Interrupt};
use crate::data::cache::{build_in, CacheSettings};
use crate::data::captions::CaptionOptions;
use crate::data::images::{DecodeOptions, ExifOrientation, ResizeFilter, DEFAULT_MAX_IMAGE_PIXELS};
use crate::data::{PromptTemplate, Split};
use crate::error::SettingsError;
use crate::util::device::DeviceChoice;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct CacheArgs {
    /// Diffusers model folder or hub id whose VAE and text encoder encode the data.
    #[arg(long)]
    pub model: String,
    /// Dataset folder (Food101 layout, Hugging Face parquet, image folder with metadata.jsonl, or
    /// kohya-style captioned images).
    #[arg(long)]
    pub data: PathBuf,
    /// Cache folder to create or update.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 512)]
    pub resolution: u32,
    #[arg(long, default_value = "train")]
    pub split: Split,
    /// Keep at most this many images per class.
    #[arg(long)]
    pub limit_per_class: Option<usize>,
    /// Caption template for labelled datasets.
    #[arg(long, default_value = crate::data::prompts::DEFAULT_TEMPLATE)]
    pub prompt_template: String,
    /// Resize filter: bilinear, bicubic or lanczos3.
    #[arg(long, default_value = "bilinear")]
    pub resize_filter: ResizeFilter,
    /// Images per VAE forward.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Fail on the first unreadable image instead of skipping it.
    #[arg(long)]
    pub strict: bool,
    /// EXIF orientation: apply (rotate as the tag says) or ignore (the stored pixels, as
    /// Pillow's Image.open gives them).
    #[arg(long, default_value = "apply")]
    pub exif_orientation: ExifOrientation,
    /// Images with more pixels are skipped (an error with --strict) before decoding; the default
    /// is Pillow's decompression-bomb limit.
    #[arg(long, default_value_t = DEFAULT_MAX_IMAGE_PIXELS)]
    pub max_image_pixels: u64,
    /// Probability of training an image on the empty prompt (the empty prompt is cached too).
    #[arg(long, default_value_t = 0.0)]
    pub caption_dropout_rate: f64,
    /// Cache shuffles of each caption's comma-separated tags.
    #[arg(long)]
    pub shuffle_caption: bool,
    /// Tags at the front kept in place when shuffling.
    #[arg(long, default_value_t = 0)]
    pub keep_tokens: usize,
    /// Captions cached per image when shuffling (the written one and N-1 shuffles).
    #[arg(long, default_value_t = 4)]
    pub caption_variants: usize,
    /// Aspect-ratio buckets with this side step (64 for SD); without it every image is square.
    #[arg(long)]
    pub bucket_step: Option<u32>,
    /// Cache each image's mirror image too, for random flips in training.
    #[arg(long)]
    pub random_flip: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Images of the listing per shard file (the unit of work of each rank of a multi-process
    /// build).
    #[arg(long, default_value_t = 1024)]
    pub shard_size: usize,
    #[command(flatten)]
    pub dist: DistArgs,
}

pub fn run(args: CacheArgs) -> Result<()> {
    // Every setting, the model and the data's layout are checked before any rank starts or
    // anything is written.
    let device = args.device.resolve()?;
    let settings = cache_settings(&args, device)?;
    settings
        .validate()
        .map_err(|e| SettingsError::invalid("cache", e))?;
    let files = crate::settings::check_model(&args.model, None)?;
    crate::data::Layout::detect(&args.data)
        .map_err(|e| SettingsError::invalid("--data", format!("{e:#}")))?;
    Interrupt::install(
        "cache",
        FirstSignal::Exit("the shard files already written are kept: the same command continues"),
    )?;
    // Under torchrun or SLURM: this process encodes its share of a multi-process build.
    let (group, device) = super::launch::join(&args.dist, device)?;
    let settings = CacheSettings { device, ..settings };
    let (manifest, report) = build_in(&files, &args.data, &settings, &args.out, &group)?;
    let main = group.is_main();
    group.shutdown()?;
    if !main {
        return Ok(());
    }
    println!(
        "{}: {} samples, {} prompts ({} file(s) encoded, {} reused, {} dataset entries skipped: see \"skipped\" in manifest.json)",
        args.out.display(),
        manifest.len(),
        manifest.prompts.len(),
        report.written_files,
        report.reused_files,
        manifest.skipped.len()
    );
    Ok(())
}

/// The cache the flags describe, encoded on `device`.
fn cache_settings(args: &CacheArgs, device: tch::Device) -> Result<CacheSettings> {
    let prompt_template = PromptTemplate::new(&args.prompt_template)
        .map_err(|e| SettingsError::invalid("--prompt-template", e))?;
    Ok(CacheSettings {
        split: args.split,
        resolution: args.resolution,
        resize_filter: args.resize_filter,
        prompt_template,
        limit_per_class: args.limit_per_class,
        captions: CaptionOptions {
            dropout: args.caption_dropout_rate,
            shuffle: args.shuffle_caption,
            keep_first: args.keep_tokens,
            variants: args.caption_variants,
        },
        bucket_step: args.bucket_step,
        flip: args.random_flip,
        batch_size: args.batch_size,
        strict: args.strict,
        decode: DecodeOptions {
            exif_orientation: args.exif_orientation,
            max_pixels: args.max_image_pixels,
        },
        shard_size: args.shard_size,
        device,
    })
}
