//! Baking an adapter into the base U-Net's weights, so the result loads as a plain U-Net anywhere
//! (diffusers key names). Works for methods that only change existing weights' values (LoRA, DoRA,
//! BitFit, full); prefix-tuning and adapters add computation and are refused.
use super::file::AdapterFile;
use crate::model::unet::UNet2DConditionModel;
use crate::model::weights::save_tensors;
use anyhow::{Context, Result};
use std::path::Path;
use tch::{nn, Tensor};

/// Folds `adapter` into the weights of the plain base `unet` (identity `base_model`, checked
/// against the one the adapter records).
pub fn merge_adapter(
    unet: &mut UNet2DConditionModel,
    unet_vs: &nn::VarStore,
    adapter: &AdapterFile,
    base_model: &str,
) -> Result<()> {
    adapter.check_base(base_model)?;
    let method = adapter.method()?;
    method.merge(unet, unet_vs, &adapter.tensors)
}

/// Writes every U-Net variable under its diffusers name, as `diffusion_pytorch_model.safetensors`
/// is laid out.
pub fn save_unet(unet_vs: &nn::VarStore, path: &Path) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = unet_vs.variables().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    save_tensors(
        path,
        &tensors,
        Some([("format".to_string(), "pt".to_string())].into()),
    )
    .with_context(|| format!("saving the merged U-Net to {}", path.display()))
}
