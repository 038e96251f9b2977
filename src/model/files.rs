//! The files of a diffusers Stable Diffusion model, once found (see [`super::source`] for how a
//! folder, hub id or single file is resolved to them), and the fingerprints that identify them.
use super::clip::ClipTextConfig;
use super::family::ModelFamily;
use super::unet::UNetConfig;
use crate::error::SettingsError;
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::PathBuf;

/// One model component: its config and its weight files (several when sharded).
#[derive(Debug, Clone)]
pub struct ComponentFiles {
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
}

/// A text encoder and its tokenizer folder (SDXL's second: `text_encoder_2/`, `tokenizer_2/`).
#[derive(Debug, Clone)]
pub struct TextEncoderFiles {
    pub encoder: ComponentFiles,
    /// Folder holding `vocab.json` and `merges.txt`.
    pub tokenizer_dir: PathBuf,
}

/// The files of a diffusers Stable Diffusion model.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user named: a folder or a hub id.
    pub spec: String,
    pub unet: ComponentFiles,
    pub vae: ComponentFiles,
    pub text_encoder: ComponentFiles,
    /// Folder holding `vocab.json` and `merges.txt`.
    pub tokenizer_dir: PathBuf,
    /// SDXL's second text encoder and tokenizer.
    pub text_encoder_2: Option<TextEncoderFiles>,
    pub scheduler_config: PathBuf,
    /// The pipeline's `model_index.json`, when the source has one (it holds pipeline options
    /// such as SDXL's `force_zeros_for_empty_prompt`).
    pub model_index: Option<PathBuf>,
}

impl ModelFiles {
    /// Reads every component's config and the header of every weight file (each tensor's name,
    /// type, shape and offsets), not their data: a damaged or truncated file, or one whose
    /// offsets lie, is refused in milliseconds rather than after the work that loads it. Errors
    /// are [`SettingsError`]s for the model.
    pub fn check(&self) -> Result<()> {
        let check = || -> Result<()> {
            self.family()?;
            super::vae::VaeConfig::from_file(&self.vae.config)?;
            crate::schedulers::SchedulerConfig::load(&self.scheduler_config)?;
            let second = self.text_encoder_2.as_ref().map(|t| &t.encoder);
            if let Some(second) = second {
                ClipTextConfig::from_file(&second.config)?;
            }
            let weights = [&self.unet, &self.vae, &self.text_encoder]
                .into_iter()
                .chain(second)
                .flat_map(|c| &c.weights);
            for path in weights {
                super::weights::MappedSafetensors::open(path)?;
            }
            Ok(())
        };
        check().map_err(|e| SettingsError::invalid(format!("model {}", self.spec), e).into())
    }

    /// The generation of the model, from its U-Net and text encoder configs; a second text
    /// encoder must be there exactly for SDXL.
    pub fn family(&self) -> Result<ModelFamily> {
        let unet = UNetConfig::from_file(&self.unet.config)?;
        let text = ClipTextConfig::from_file(&self.text_encoder.config)?;
        let family = ModelFamily::of_configs(&unet, &text)?;
        family
            .check_text_encoders(self.text_encoder_2.is_some())
            .with_context(|| self.spec.clone())?;
        Ok(family)
    }

    /// A boolean option of the pipeline's `model_index.json`, `default` when absent.
    pub fn pipeline_flag(&self, name: &str, default: bool) -> Result<bool> {
        let Some(path) = &self.model_index else {
            return Ok(default);
        };
        let index: serde_json::Value = crate::util::fs::read_json(path)?;
        Ok(index.get(name).and_then(|v| v.as_bool()).unwrap_or(default))
    }

    /// The U-Net's parameter count, from its weight files' headers.
    pub fn unet_parameter_count(&self) -> Result<u64> {
        let mut count = 0;
        for path in &self.unet.weights {
            let file = super::weights::MappedSafetensors::open(path)?;
            let tensors = file.tensors();
            count += tensors
                .iter()
                .map(|(_, view)| view.shape().iter().product::<usize>() as u64)
                .sum::<u64>();
        }
        Ok(count)
    }

    /// A fingerprint of the base U-Net (its config and weights), recorded with adapters and
    /// checkpoints so they are never applied to a different base.
    pub fn unet_identity(&self) -> Result<String> {
        fingerprint(std::iter::once(&self.unet.config).chain(&self.unet.weights))
    }
}

/// SHA-256 over each file's size, its first and last MiB (for safetensors, the first MiB holds the
/// header with every tensor's name, shape and offset) — cheap even for multi-GB weights.
pub fn fingerprint<'a>(files: impl IntoIterator<Item = &'a PathBuf>) -> Result<String> {
    const CHUNK: u64 = 1 << 20;
    let mut hasher = Sha256::new();
    for path in files {
        let mut f =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = f.metadata()?.len();
        hasher.update(len.to_le_bytes());
        let mut buf = Vec::new();
        (&mut f).take(CHUNK).read_to_end(&mut buf)?;
        if len > 2 * CHUNK {
            use std::io::Seek;
            f.seek(std::io::SeekFrom::Start(len - CHUNK))?;
            f.take(CHUNK).read_to_end(&mut buf)?;
        } else {
            f.read_to_end(&mut buf)?;
        }
        hasher.update(&buf);
    }
    Ok(crate::util::fs::hex(&hasher.finalize()))
}
