//! Loading a Stable Diffusion model's components from its [`ModelFiles`] onto a device.
use super::clip::ClipTextModel;
use super::source::ModelFiles;
use super::tokenizer::ClipTokenizer;
use super::unet::{UNet2DConditionModel, UNetConfig};
use super::vae::{load_vae_weights, AutoencoderKL, VaeConfig};
use super::weights::{load_into, LoadOptions};
use crate::schedulers::SchedulerConfig;
use anyhow::{Context, Result};
use tch::{nn, Device, Kind};

/// The U-Net and the VarStore holding its weights (tuning methods need both).
pub fn load_unet(
    files: &ModelFiles,
    device: Device,
) -> Result<(nn::VarStore, UNet2DConditionModel)> {
    let config = UNetConfig::from_file(&files.unet.config)?;
    let vs = nn::VarStore::new(device);
    let unet = UNet2DConditionModel::new(vs.root(), &config)?;
    load_into(&vs, &files.unet.weights, &LoadOptions::default())
        .with_context(|| format!("loading the U-Net of {}", files.spec))?;
    Ok((vs, unet))
}

/// The VAE, frozen.
pub fn load_vae(files: &ModelFiles, device: Device) -> Result<AutoencoderKL> {
    load_vae_in(files, device, Kind::Float)
}

/// The VAE, frozen, in the precision a pipeline running in `kind` keeps it in (see
/// [`VaeConfig::pipeline_kind`]).
pub fn load_vae_in(files: &ModelFiles, device: Device, kind: Kind) -> Result<AutoencoderKL> {
    let config = VaeConfig::from_file(&files.vae.config)?;
    let mut vs = nn::VarStore::new(device);
    let vae = AutoencoderKL::new(vs.root(), &config)?;
    load_vae_weights(&vs, &files.vae.weights)
        .with_context(|| format!("loading the VAE of {}", files.spec))?;
    vs.freeze();
    let kind = config.pipeline_kind(kind);
    if kind != Kind::Float {
        vs.set_kind(kind);
    }
    Ok(vae)
}

/// The text encoder, frozen.
pub fn load_text_encoder(files: &ModelFiles, device: Device) -> Result<ClipTextModel> {
    let config = super::clip::ClipTextConfig::from_file(&files.text_encoder.config)?;
    let mut vs = nn::VarStore::new(device);
    let encoder = ClipTextModel::new(vs.root(), &config)?;
    ClipTextModel::load_weights(&vs, &files.text_encoder.weights)
        .with_context(|| format!("loading the text encoder of {}", files.spec))?;
    vs.freeze();
    Ok(encoder)
}

pub fn load_tokenizer(files: &ModelFiles) -> Result<ClipTokenizer> {
    ClipTokenizer::from_dir(&files.tokenizer_dir)
}

pub fn load_scheduler_config(files: &ModelFiles) -> Result<SchedulerConfig> {
    SchedulerConfig::load(&files.scheduler_config)
}
