use crate::model::source::ModelFiles;
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::weights::{load_into, LoadOptions};
use crate::peft::formats::read_adapter;
use crate::peft::merge::{merge_adapter, save_unet};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The base model: a diffusers Stable Diffusion folder or a hub id.
    #[arg(long)]
    pub model: String,
    /// Weight variant of the base model (e.g. fp16).
    #[arg(long)]
    pub variant: Option<String>,
    /// The adapter: a difftune adapter (.safetensors with its .json sidecar), a peft adapter
    /// folder, a diffusers LoRA or a kohya LoRA file.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where to write the merged U-Net (diffusers names, f32).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: MergeArgs) -> Result<()> {
    let files = ModelFiles::resolve(&args.model, args.variant.as_deref())?;
    let config = UNetConfig::from_file(&files.unet.config)?;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let mut unet = UNet2DConditionModel::new(vs.root(), &config)?;
    load_into(&vs, &files.unet.weights, &LoadOptions::default())?;
    let adapter = read_adapter(&args.adapter, &vs)?;
    merge_adapter(&mut unet, &vs, &adapter, &files.unet_identity()?)?;
    save_unet(&vs, &args.out)?;
    println!(
        "merged `{}` adapter {} into {}",
        adapter.meta.method,
        args.adapter.display(),
        args.out.display()
    );
    Ok(())
}
