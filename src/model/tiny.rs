//! A built-in tiny model with Stable Diffusion v1's architecture and file layout: a U-Net of two
//! narrow levels (by default; see [`TinyUnetShape`]), a VAE with SD's 8x downsampling (or 2x/4x:
//! fewer levels) to 4 latent channels, a two-layer CLIP text encoder and a CLIP-format BPE
//! tokenizer whose vocabulary is generated here, all with seeded random weights, written as a
//! diffusers folder. Every command loads it through the same path as a real model,
//! and it trains and samples in seconds on a CPU.
use super::clip::{ClipTextConfig, ClipTextModel};
use super::unet::{UNet2DConditionModel, UNetConfig};
use super::vae::{AutoencoderKL, VaeConfig};
use crate::util::fs::{write_atomic_str, write_json};
use anyhow::{bail, Result};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use tch::{nn, Device, Tensor};

const DIFFUSERS_VERSION: &str = "0.42.1";
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";
/// CLIP's context length, kept so prompts are shaped as for SD.
const MAX_LENGTH: i64 = 77;

/// SD's VAE downsampling factor, the tiny model's default.
pub const SD_VAE_DOWNSAMPLING: u32 = 8;
/// The side of the images the tiny model is made for unless told otherwise. The U-Net's
/// `sample_size` is the image side over the VAE's downsampling factor, so sampling defaults to it.
pub const DEFAULT_IMAGE_SIZE: u32 = 64;

/// The tiny U-Net's size (`[model.tiny_unet]` in a run file): SD v1's block types on fewer, narrower
/// levels.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TinyUnetShape {
    /// Channels of each level, from the top; every level but the last has cross-attention, as in
    /// SD. Multiples of 32 (the group norm's group count). Default `[32, 64]`.
    pub block_out_channels: Vec<i64>,
    /// Resnets (and attention blocks) per level. Default 1.
    pub layers_per_block: i64,
}

impl Default for TinyUnetShape {
    fn default() -> Self {
        Self {
            block_out_channels: vec![32, 64],
            layers_per_block: 1,
        }
    }
}

impl TinyUnetShape {
    fn validate(&self) -> Result<()> {
        let channels = &self.block_out_channels;
        if channels.len() < 2 || channels.iter().any(|&c| c <= 0 || c % 32 != 0) {
            bail!("the tiny U-Net needs at least two levels of channels that are positive multiples of 32, not {channels:?}");
        }
        if self.layers_per_block < 1 {
            bail!(
                "the tiny U-Net needs at least one layer per block, not {}",
                self.layers_per_block
            );
        }
        Ok(())
    }
}

/// The tiny U-Net's config for SD's 8x VAE.
pub fn unet_config() -> serde_json::Value {
    unet_config_for(
        DEFAULT_IMAGE_SIZE,
        SD_VAE_DOWNSAMPLING,
        &TinyUnetShape::default(),
    )
}

/// The tiny U-Net's config of size `shape` for `image_size` px images through a VAE downsampling
/// by `downsampling`.
fn unet_config_for(image_size: u32, downsampling: u32, shape: &TinyUnetShape) -> serde_json::Value {
    let levels = shape.block_out_channels.len();
    let mut down_blocks = vec!["CrossAttnDownBlock2D"; levels - 1];
    down_blocks.push("DownBlock2D");
    let mut up_blocks = vec!["CrossAttnUpBlock2D"; levels - 1];
    up_blocks.insert(0, "UpBlock2D");
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "attention_head_dim": 4,
        "block_out_channels": shape.block_out_channels,
        "center_input_sample": false,
        "cross_attention_dim": 32,
        "down_block_types": down_blocks,
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": shape.layers_per_block,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": image_size / downsampling,
        "up_block_types": up_blocks
    })
}

/// The tiny VAE's config for `image_size` px images, downsampling by `downsampling` (2, 4 or 8):
/// one level per factor of two plus the full-resolution one, as diffusers counts them
/// (`2^(levels-1)`).
pub fn vae_config_for(image_size: u32, downsampling: u32) -> Result<serde_json::Value> {
    if !matches!(downsampling, 2 | 4 | 8) {
        bail!("the tiny VAE downsamples by 2, 4 or 8, not {downsampling}");
    }
    let levels = downsampling.trailing_zeros() as usize + 1;
    let widths = &[16, 32, 32, 32][..levels];
    Ok(json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": widths,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "out_channels": 3,
        "sample_size": image_size,
        "scaling_factor": 0.18215,
        "up_block_types": vec!["UpDecoderBlock2D"; levels]
    }))
}

fn text_encoder_config(vocab_size: usize, bos_id: usize, eos_id: usize) -> serde_json::Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "hidden_act": "quick_gelu",
        "hidden_size": 32,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": MAX_LENGTH,
        "model_type": "clip_text_model",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": eos_id,
        "projection_dim": 32,
        "vocab_size": vocab_size
    })
}

/// The scheduler config of CompVis/stable-diffusion-v1-4.
pub fn scheduler_config() -> serde_json::Value {
    json!({
        "_class_name": "PNDMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "trained_betas": null,
        "clip_sample": false
    })
}

/// A diffusers `model_index.json` for an SD v1.x pipeline folder (no safety checker).
pub(crate) fn model_index() -> serde_json::Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    })
}

/// GPT-2/CLIP's byte-to-symbol table, in CLIP's vocabulary order: the printable bytes stand for
/// themselves, the others are shifted to code points from 256 on.
pub(crate) fn byte_symbols() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut symbols: Vec<char> = (0..256u32)
        .filter(|&b| printable(b))
        .filter_map(char::from_u32)
        .collect();
    let mut shifted = 0;
    for b in 0..256u32 {
        if !printable(b) {
            symbols.extend(char::from_u32(256 + shifted));
            shifted += 1;
        }
    }
    symbols
}

/// The words of `captions` (runs of ASCII letters), which get whole-word tokens.
fn caption_words(captions: &[String]) -> BTreeSet<String> {
    captions
        .iter()
        .flat_map(|caption| {
            caption
                .split(|c: char| !c.is_ascii_alphabetic())
                .filter(|w| !w.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A CLIP-format vocabulary (`vocab.json` as token -> id) and merge list: the 256 byte symbols,
/// their end-of-word forms, one token per merge (building each word of `captions` left to right,
/// in sorted order, so the vocabulary does not depend on the captions' order), and the two
/// special tokens last, as in CLIP's own files.
pub fn tokenizer_files(captions: &[String]) -> (BTreeMap<String, usize>, Vec<(String, String)>) {
    let symbols = byte_symbols();
    let mut tokens: Vec<String> = symbols.iter().map(char::to_string).collect();
    tokens.extend(symbols.iter().map(|s| format!("{s}{END_OF_WORD}")));
    let mut merges: Vec<(String, String)> = Vec::new();
    let mut known: BTreeSet<String> = tokens.iter().cloned().collect();
    for word in caption_words(captions) {
        let chars: Vec<char> = word.chars().collect();
        let Some((&last, init)) = chars.split_last() else {
            continue;
        };
        let mut parts: Vec<String> = init.iter().map(char::to_string).collect();
        parts.push(format!("{last}{END_OF_WORD}"));
        let mut current = parts[0].clone();
        for part in &parts[1..] {
            let merged = format!("{current}{part}");
            if known.insert(merged.clone()) {
                merges.push((current.clone(), part.clone()));
                tokens.push(merged.clone());
            }
            current = merged;
        }
    }
    tokens.push(BOS.into());
    tokens.push(EOS.into());
    let vocab = tokens
        .into_iter()
        .enumerate()
        .map(|(id, token)| (token, id))
        .collect();
    (vocab, merges)
}

/// Builds a model on the CPU with seeded random weights and saves its variables.
fn save_random<M>(path: &Path, build: impl FnOnce(nn::Path) -> Result<M>) -> Result<()> {
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = build(vs.root())?;
    let mut tensors: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    super::weights::save_tensors(
        path,
        &tensors,
        Some([("format".to_string(), "pt".to_string())].into()),
    )
}

/// Writes the tiny model with SD's 8x VAE as a diffusers folder at `out` (which must be absent
/// or empty), its tokenizer spelling the words of `captions` as whole words (e.g.
/// [`crate::data::synthetic::captions`]).
pub fn write_tiny_model(out: &Path, seed: u64, captions: &[String]) -> Result<()> {
    write_tiny_model_with(
        out,
        seed,
        DEFAULT_IMAGE_SIZE,
        SD_VAE_DOWNSAMPLING,
        &TinyUnetShape::default(),
        captions,
    )
}

/// Writes the tiny model for `image_size` px images (its native size: what sampling defaults to),
/// with a VAE downsampling by `vae_downsampling` (2, 4 or 8) and a U-Net of size `unet` for its
/// latents, as a diffusers folder at `out` (which must be absent or empty); its tokenizer spells
/// the words of `captions` as whole words (see [`tokenizer_files`]).
pub fn write_tiny_model_with(
    out: &Path,
    seed: u64,
    image_size: u32,
    vae_downsampling: u32,
    unet: &TinyUnetShape,
    captions: &[String],
) -> Result<()> {
    unet.validate()?;
    // First: it refuses a factor other than 2, 4 or 8, which the size is then checked against.
    let vae_config = vae_config_for(image_size, vae_downsampling)?;
    if image_size == 0 || !image_size.is_multiple_of(vae_downsampling) {
        bail!("the tiny model's image size {image_size} is not a positive multiple of its VAE's downsampling factor {vae_downsampling}");
    }
    let unet_config = unet_config_for(image_size, vae_downsampling, unet);
    crate::util::fs::ensure_absent_or_empty(out, "choose another --out")?;
    let (vocab, merges) = tokenizer_files(captions);
    let (bos_id, eos_id) = (vocab[BOS], vocab[EOS]);
    let text_config = text_encoder_config(vocab.len(), bos_id, eos_id);

    let tok = out.join("tokenizer");
    write_json(&tok.join("vocab.json"), &vocab)?;
    let merges_text: String = std::iter::once("#version: 0.2\n".to_string())
        .chain(merges.iter().map(|(a, b)| format!("{a} {b}\n")))
        .collect();
    write_atomic_str(&tok.join("merges.txt"), &merges_text)?;
    let specials =
        json!({ "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS });
    write_json(&tok.join("special_tokens_map.json"), &specials)?;
    let mut tokenizer_config = specials.clone();
    tokenizer_config["model_max_length"] = json!(MAX_LENGTH);
    tokenizer_config["tokenizer_class"] = json!("CLIPTokenizer");
    tokenizer_config["do_lower_case"] = json!(true);
    write_json(&tok.join("tokenizer_config.json"), &tokenizer_config)?;

    write_json(&out.join("model_index.json"), &model_index())?;
    write_json(
        &out.join("scheduler/scheduler_config.json"),
        &scheduler_config(),
    )?;
    write_json(&out.join("unet/config.json"), &unet_config)?;
    write_json(&out.join("vae/config.json"), &vae_config)?;
    write_json(&out.join("text_encoder/config.json"), &text_config)?;

    // One seed per component, so each is the same whatever the others are.
    tch::manual_seed(seed as i64);
    let unet: UNetConfig = serde_json::from_value(unet_config)?;
    save_random(
        &out.join("unet/diffusion_pytorch_model.safetensors"),
        |vs| UNet2DConditionModel::new(vs, &unet),
    )?;
    tch::manual_seed(seed.wrapping_add(1) as i64);
    let vae: VaeConfig = serde_json::from_value(vae_config)?;
    save_random(&out.join("vae/diffusion_pytorch_model.safetensors"), |vs| {
        AutoencoderKL::new(vs, &vae)
    })?;
    tch::manual_seed(seed.wrapping_add(2) as i64);
    let text: ClipTextConfig = serde_json::from_value(text_config)?;
    save_random(&out.join("text_encoder/model.safetensors"), |vs| {
        ClipTextModel::new(vs, &text)
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn unet_shapes_and_image_sizes_build_and_bad_ones_are_refused() {
        let shape = TinyUnetShape {
            block_out_channels: vec![32, 64, 64],
            layers_per_block: 2,
        };
        shape.validate().unwrap();
        let config: UNetConfig = serde_json::from_value(unet_config_for(32, 4, &shape)).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let unet = UNet2DConditionModel::new(vs.root(), &config).unwrap();
        let latents = Tensor::zeros([1, 4, 8, 8], (Kind::Float, Device::Cpu));
        let context = Tensor::zeros([1, MAX_LENGTH, 32], (Kind::Float, Device::Cpu));
        let output = tch::no_grad(|| unet.forward(&latents, &Tensor::from(10.0), &context));
        assert_eq!(output.size(), [1, 4, 8, 8]);

        let refused = |block_out_channels: Vec<i64>, layers_per_block| {
            TinyUnetShape {
                block_out_channels,
                layers_per_block,
            }
            .validate()
            .is_err()
        };
        assert!(refused(vec![32], 1), "one level");
        assert!(refused(vec![32, 48], 1), "not a multiple of 32");
        assert!(refused(vec![0, 64], 1), "no channels");
        assert!(refused(vec![32, 64], 0), "no layers");
        assert!(!refused(vec![32, 64], 1));

        let out = tempfile::tempdir().unwrap();
        let unet = TinyUnetShape::default();
        let err = write_tiny_model_with(out.path(), 0, 30, 4, &unet, &[]).unwrap_err();
        assert!(err.to_string().contains("not a positive multiple"), "{err}");
    }
}
