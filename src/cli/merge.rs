use super::convert::PrecisionArg;
use crate::model::single_file::write_single_file;
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::weights::{load_into, LoadOptions};
use crate::peft::formats::read_adapter;
use crate::peft::merge::{merge_adapter, save_unet};
use anyhow::Result;
use clap::{Args, ValueEnum};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The base model: a diffusers Stable Diffusion folder or a hub id.
    #[arg(long)]
    pub model: String,
    /// Weight variant of the base model (e.g. fp16).
    #[arg(long)]
    pub variant: Option<String>,
    /// The adapter file: difftune's (.safetensors with its .json sidecar), a peft adapter folder,
    /// a diffusers LoRA or a kohya LoRA file.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where to write the merged U-Net (diffusers names, f32), or the single file.
    #[arg(long)]
    pub out: PathBuf,
    /// `unet`: the merged U-Net alone; `single-file`: a complete LDM-layout checkpoint (merged
    /// U-Net, the base's VAE and text encoder) for A1111/ComfyUI, `--out NAME.safetensors`.
    #[arg(long, value_enum, default_value_t = MergeFormat::Unet)]
    pub format: MergeFormat,
    /// Precision of a single file's tensors (the merged U-Net is f32).
    #[arg(long, value_enum, default_value_t = PrecisionArg::Keep)]
    pub precision: PrecisionArg,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeFormat {
    Unet,
    SingleFile,
}

pub fn run(args: MergeArgs) -> Result<()> {
    // The model's and the adapter's headers and settings before the U-Net is loaded.
    let files = crate::settings::check_model(&args.model, args.variant.as_deref())?;
    crate::settings::check_adapter(&args.adapter)?;
    let config = UNetConfig::from_file(&files.unet.config)?;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let mut unet = UNet2DConditionModel::new(vs.root(), &config)?;
    load_into(&vs, &files.unet.weights, &LoadOptions::default())?;
    let adapter = read_adapter(&args.adapter, &vs)?;
    merge_adapter(&mut unet, &vs, &adapter, &files.unet_identity()?)?;
    if args.format == MergeFormat::SingleFile {
        let unet = vs.variables().into_iter().collect();
        write_single_file(&files, Some(unet), &args.out, args.precision.into())?;
    } else {
        save_unet(&vs, &args.out)?;
    }
    println!(
        "merged the `{}` adapter file {} into {}",
        adapter.meta.method,
        args.adapter.display(),
        args.out.display()
    );
    Ok(())
}
