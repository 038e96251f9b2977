//! The Stable Diffusion model stack, with parameter names identical to diffusers/transformers.
pub mod attention;
pub mod checkpoint;
pub mod clip;
pub mod clip_vocab;
pub mod conditioning;
pub mod family;
pub mod files;
pub mod layers;
pub mod ldm;
pub mod memory_format;
pub mod pipeline;
pub mod prompt;
pub mod resnet;
pub mod sdpa;
pub mod single_file;
pub mod source;
pub mod tiny;
pub mod tokenizer;
pub mod torch_file;
pub mod transformer;
pub mod unet;
pub mod vae;
pub mod visit;
pub mod weights;

use anyhow::{bail, Context, Result};
use std::path::Path;

/// Reads a diffusers model config (`what` names it in errors) and refuses architectures this
/// crate does not implement, instead of building a silently different model.
pub(crate) fn read_config<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &str,
    validate: impl FnOnce(&T) -> Result<()>,
) -> Result<T> {
    let config: T = crate::util::fs::read_json(path).with_context(|| what.to_string())?;
    validate(&config).with_context(|| format!("{what} {}", path.display()))?;
    Ok(config)
}

/// The U-Net's and the VAE's shape rule: one down and one up block per entry of
/// `block_out_channels`, at least one.
pub(crate) fn check_block_lists(block_out: usize, down: usize, up: usize) -> Result<()> {
    if block_out == 0 || down != block_out || up != block_out {
        bail!(
            "block_out_channels ({block_out}), down_block_types ({down}) and up_block_types ({up}) must have the same, non-zero length"
        );
    }
    Ok(())
}
