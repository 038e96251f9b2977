//! Single-file Stable Diffusion checkpoints (A1111/ComfyUI `.safetensors`, original `.ckpt`), in
//! and out. A single file is converted once into a diffusers folder in difftune's cache (keyed by
//! the file's fingerprint and the options), so every command that takes `--model` reads it through
//! the same path as a diffusers folder. SD v1.x, v2.x and SDXL (base) are recognised from their
//! keys and shapes and get built-in configs (SDXL's are presets/configs/sdxl-base) and the shipped
//! CLIP tokenizer; nothing is downloaded.
//!
//! A model spec is `FILE[#option,...]`, options: `ema` (use the `model_ema.*` U-Net weights),
//! `epsilon` / `v_prediction` (override the detected prediction type), `config=DIR` (take the
//! configs and tokenizer from a diffusers folder, as diffusers' `from_single_file(config=...)`,
//! for architectures other than the built-in ones).
use super::clip_vocab::{write_tokenizer_folder, Padding};
use super::family::ModelFamily;
use super::files::{fingerprint, ModelFiles};
use super::ldm::{self, UnetLayout, VaeLayout};
use super::unet::UNetConfig;
use super::vae::VaeConfig;
use super::weights::{read_all, save_tensors, write_safetensors};
use crate::schedulers::PredictionType;
use crate::util::fs::write_json;
use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Bumped when the conversion changes, so cached folders are rebuilt.
const CONVERSION_VERSION: &str = "1";

/// A single-file model and how to read it.
#[derive(Debug, Clone, Default)]
pub struct SingleFileSpec {
    pub path: PathBuf,
    pub ema: bool,
    pub prediction: Option<PredictionType>,
    pub config: Option<PathBuf>,
}

impl SingleFileSpec {
    /// `Some` when `spec` (before any `#options`) names an existing file.
    pub fn parse(spec: &str) -> Result<Option<Self>> {
        let (path, options) = match spec.rsplit_once('#') {
            Some((p, o)) if Path::new(p).is_file() => (p, Some(o)),
            _ => (spec, None),
        };
        if !Path::new(path).is_file() {
            return Ok(None);
        }
        let mut parsed = Self {
            path: PathBuf::from(path),
            ..Self::default()
        };
        for option in options.into_iter().flat_map(|o| o.split(',')) {
            match option {
                "ema" => parsed.ema = true,
                "epsilon" => parsed.prediction = Some(PredictionType::Epsilon),
                "v_prediction" => parsed.prediction = Some(PredictionType::VPrediction),
                o if o.starts_with("config=") => parsed.config = Some(PathBuf::from(&o[7..])),
                "" => {}
                o => bail!(
                    "unknown single-file option `{o}` in `{spec}` (options: ema, epsilon, v_prediction, config=DIR)"
                ),
            }
        }
        Ok(Some(parsed))
    }

    /// The diffusers folder in difftune's cache that holds this file converted, made on first use.
    pub fn cached_folder(&self) -> Result<PathBuf> {
        let mut key = format!(
            "{CONVERSION_VERSION}|{}|{}|{:?}",
            fingerprint([&self.path])?,
            self.ema,
            self.prediction
        );
        if let Some(dir) = &self.config {
            let files: Vec<PathBuf> = CONFIG_FILES.iter().map(|f| dir.join(f)).collect();
            let present: Vec<&PathBuf> = files.iter().filter(|f| f.is_file()).collect();
            key.push_str(&fingerprint(present)?);
        }
        let digest = sha256_hex(key.as_bytes());
        let root = crate::util::fs::cache_dir().join("single-file");
        let dir = root.join(&digest[..32]);
        if dir.join("model_index.json").is_file() {
            return Ok(dir);
        }
        let partial = root.join(format!("{}.partial-{}", &digest[..32], std::process::id()));
        if partial.exists() {
            std::fs::remove_dir_all(&partial)?;
        }
        eprintln!(
            "converting {} to a diffusers folder in {} (once)",
            self.path.display(),
            dir.display()
        );
        self.convert_to_folder(&partial)?;
        match std::fs::rename(&partial, &dir) {
            Ok(()) => Ok(dir),
            // Another process finished the same conversion first.
            Err(_) if dir.join("model_index.json").is_file() => {
                std::fs::remove_dir_all(&partial)?;
                Ok(dir)
            }
            Err(e) => {
                Err(e).with_context(|| format!("moving the converted model to {}", dir.display()))
            }
        }
    }

    /// Writes the model as a diffusers folder at `out`, weights in their stored precision.
    pub fn convert_to_folder(&self, out: &Path) -> Result<()> {
        let checkpoint = read_checkpoint(&self.path)?;
        let shown = self.path.display().to_string();
        let family = detect(&checkpoint.tensors).with_context(|| shown.clone())?;
        if self.config.is_none() {
            check_builtin(&checkpoint.tensors, family).with_context(|| shown.clone())?;
        }
        let parts = split(checkpoint.tensors, self.ema, family).with_context(|| shown.clone())?;
        let prediction = self.prediction.unwrap_or(match family {
            ModelFamily::Sd1 | ModelFamily::Sdxl => PredictionType::Epsilon,
            // SD 2.x's 512-pixel base model is the one trained for 110,000 steps on epsilon.
            ModelFamily::Sd2 if checkpoint.global_step == Some(110_000) => PredictionType::Epsilon,
            ModelFamily::Sd2 => PredictionType::VPrediction,
        });
        match &self.config {
            Some(dir) => copy_configs(dir, out, family)?,
            None => write_builtin_configs(family, prediction, out)?,
        }
        if self.prediction.is_some() || self.config.is_none() {
            crate::util::fs::set_json_field(
                &out.join("scheduler/scheduler_config.json"),
                "prediction_type",
                prediction,
            )?;
        }
        let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
        let save = |path: &str, tensors: BTreeMap<String, Tensor>| -> Result<()> {
            let list: Vec<(String, Tensor)> = tensors.into_iter().collect();
            save_tensors(&out.join(path), &list, meta.clone())
        };
        save("unet/diffusion_pytorch_model.safetensors", parts.unet)?;
        save("vae/diffusion_pytorch_model.safetensors", parts.vae)?;
        save("text_encoder/model.safetensors", parts.text_encoder)?;
        if let Some(second) = parts.text_encoder_2 {
            save("text_encoder_2/model.safetensors", second)?;
        }
        // model_index.json last: its presence marks a complete folder.
        let index = match family {
            ModelFamily::Sd1 | ModelFamily::Sd2 => super::tiny::model_index(),
            ModelFamily::Sdxl => sdxl_model_index(),
        };
        write_json(&out.join("model_index.json"), &index)
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The tensors of a single file and, for `.ckpt`, its training step.
pub struct Checkpoint {
    pub tensors: BTreeMap<String, Tensor>,
    pub global_step: Option<i64>,
}

/// Reads a `.safetensors` file, or a `.ckpt`/`.pt`/`.pth` pickle with the restricted reader.
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if ext == "safetensors" {
        return Ok(Checkpoint {
            tensors: read_all(path)?,
            global_step: None,
        });
    }
    if !matches!(ext.as_str(), "ckpt" | "pt" | "pth" | "bin") {
        bail!(
            "{}: a single-file model must be .safetensors or a PyTorch .ckpt/.pt/.pth",
            path.display()
        );
    }
    let value = super::torch_file::load(path)?;
    let global_step = match value.get("global_step") {
        Some(super::torch_file::Value::Int(step)) => Some(*step),
        _ => None,
    };
    Ok(Checkpoint {
        tensors: super::torch_file::read_state_dict_of(&value, path)?,
        global_step,
    })
}

fn shape(tensors: &BTreeMap<String, Tensor>, name: &str) -> Option<Vec<i64>> {
    tensors.get(name).map(Tensor::size)
}

/// Tells SD v1.x, v2.x and SDXL apart, and refuses what is none of them with a message saying
/// what it is.
pub fn detect(tensors: &BTreeMap<String, Tensor>) -> Result<ModelFamily> {
    let has = |prefix: &str| tensors.keys().any(|k| k.starts_with(prefix));
    let sdxl = has("conditioner.embedders.");
    if sdxl && !(has(ldm::SDXL_CLIP_PREFIX) && has(ldm::SDXL_OPEN_CLIP_PREFIX)) {
        if has("conditioner.embedders.0.model.") {
            bail!("this is an SDXL refiner checkpoint (one OpenCLIP text encoder, conditioner.embedders.0.model.*, and aesthetic-score conditioning); difftune supports SDXL base models");
        }
        bail!(
            "an SDXL checkpoint without SDXL base's two text encoders ({}* and {}*)",
            ldm::SDXL_CLIP_PREFIX,
            ldm::SDXL_OPEN_CLIP_PREFIX
        );
    }
    if !sdxl && has("model.diffusion_model.label_emb.") {
        bail!("this U-Net is class-conditioned (model.diffusion_model.label_emb.* without SDXL's text encoders: SD 2.x unCLIP?); difftune supports text-to-image SD v1.x, v2.x and SDXL models");
    }
    let conv_in = format!("{}input_blocks.0.0.weight", ldm::UNET_PREFIX);
    let Some(conv_in_shape) = shape(tensors, &conv_in) else {
        bail!(
            "not an SD v1.x/v2.x/SDXL checkpoint: no `{conv_in}` (a full model has model.diffusion_model.*, first_stage_model.* and its text encoders; is this a LoRA, a VAE or a U-Net alone?)"
        );
    };
    match conv_in_shape.get(1) {
        Some(4) => {}
        Some(9) => bail!("this is an inpainting checkpoint (`{conv_in}` has shape {conv_in_shape:?}: 9 input channels); difftune fine-tunes text-to-image models with 4"),
        _ => bail!("`{conv_in}` has shape {conv_in_shape:?}; SD text-to-image U-Nets take 4 latent channels (this may be a depth, pix2pix or other conditioned model)"),
    }
    if sdxl {
        return Ok(ModelFamily::Sdxl);
    }
    match (has(ldm::CLIP_PREFIX), has(ldm::OPEN_CLIP_PREFIX)) {
        (true, false) => Ok(ModelFamily::Sd1),
        (false, true) => Ok(ModelFamily::Sd2),
        _ => bail!(
            "expected one text encoder, {}* (SD v1.x) or {}* (SD v2.x)",
            ldm::CLIP_PREFIX,
            ldm::OPEN_CLIP_PREFIX
        ),
    }
}

/// The built-in configs fit SD v1.x's 768-wide, v2.x's 1024-wide and SDXL's 2048-wide
/// cross-attention only.
fn check_builtin(tensors: &BTreeMap<String, Tensor>, family: ModelFamily) -> Result<()> {
    let (name, width) = tensors
        .iter()
        .find(|(k, _)| k.starts_with(ldm::UNET_PREFIX) && k.ends_with("attn2.to_k.weight"))
        .map(|(k, t)| (k.clone(), t.size()))
        .context(
            "the U-Net has no cross-attention (no model.diffusion_model.*.attn2.to_k.weight)",
        )?;
    let expected = match family {
        ModelFamily::Sd1 => 768,
        ModelFamily::Sd2 => 1024,
        ModelFamily::Sdxl => 2048,
    };
    ensure!(
        width.get(1) == Some(&expected),
        "not {family} ({expected}-wide cross-attention with its text-encoder layout): `{name}` has \
         shape {width:?}; pass the model's diffusers configs with `#config=DIR`"
    );
    Ok(())
}

/// The models' tensors under our (diffusers) names.
pub struct Components {
    pub unet: BTreeMap<String, Tensor>,
    pub vae: BTreeMap<String, Tensor>,
    pub text_encoder: BTreeMap<String, Tensor>,
    /// SDXL's second text encoder (CLIPTextModelWithProjection).
    pub text_encoder_2: Option<BTreeMap<String, Tensor>>,
}

/// Tensors the LDM file carries that no model needs: the diffusion schedule's buffers, the EMA's
/// bookkeeping, older transformers' position ids.
fn ignored(name: &str) -> bool {
    !(name.starts_with(ldm::UNET_PREFIX)
        || name.starts_with(ldm::VAE_PREFIX)
        || name.starts_with("cond_stage_model.")
        || name.starts_with("conditioner."))
        || name.ends_with("embeddings.position_ids")
        || name.starts_with("first_stage_model.loss.")
}

/// Splits an LDM state dict into the three models under our names. `ema` takes the U-Net from the
/// `model_ema.*` copies (whose names are the U-Net's without dots).
pub fn split(
    mut tensors: BTreeMap<String, Tensor>,
    ema: bool,
    family: ModelFamily,
) -> Result<Components> {
    let mut take = |prefix: &str| -> BTreeMap<String, Tensor> {
        let names: Vec<String> = tensors
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        names
            .into_iter()
            .map(|k| {
                let t = tensors.remove(&k).expect("listed");
                (k[prefix.len()..].to_string(), t)
            })
            .collect()
    };
    let mut unet_ldm = take(ldm::UNET_PREFIX);
    let ema_tensors = take("model_ema.");
    let vae_ldm = take(ldm::VAE_PREFIX);
    let (text_ldm, text_2_ldm) = match family {
        ModelFamily::Sd1 => (take(ldm::CLIP_PREFIX), None),
        ModelFamily::Sd2 => (take(ldm::OPEN_CLIP_PREFIX), None),
        ModelFamily::Sdxl => (
            take(ldm::SDXL_CLIP_PREFIX),
            Some(take(ldm::SDXL_OPEN_CLIP_PREFIX)),
        ),
    };
    if ema {
        ensure!(
            !ema_tensors.is_empty(),
            "`#ema` asks for the EMA weights but the file has no model_ema.* tensors"
        );
        for (name, t) in unet_ldm.iter_mut() {
            let key = format!("diffusion_model{name}").replace('.', "");
            *t = ema_tensors
                .get(&key)
                .with_context(|| {
                    format!(
                        "no EMA copy `model_ema.{key}` of `{}{name}`",
                        ldm::UNET_PREFIX
                    )
                })?
                .shallow_clone();
        }
    }
    if let Some(name) = tensors.keys().find(|k| !ignored(k)) {
        bail!("unexpected tensor `{name}` (not part of an {family} U-Net, VAE or text encoder)");
    }
    Ok(Components {
        unet: convert_unet(unet_ldm)?,
        vae: convert_vae(vae_ldm)?,
        text_encoder: match family {
            ModelFamily::Sd1 | ModelFamily::Sdxl => clip_to_diffusers(text_ldm),
            // SD v2.x uses the penultimate layer's output: diffusers drops the last block.
            ModelFamily::Sd2 => {
                let blocks = open_clip_blocks(&text_ldm);
                ldm::open_clip_to_diffusers(text_ldm, blocks.saturating_sub(1))?
            }
        },
        text_encoder_2: text_2_ldm.map(open_clip_with_projection).transpose()?,
    })
}

/// transformers' CLIP names of `cond_stage_model.transformer.…` tensors (or SDXL's first
/// encoder's), without the position ids older files carry.
fn clip_to_diffusers(tensors: BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    tensors
        .into_iter()
        .filter(|(k, _)| !ignored_text(k))
        .map(|(k, t)| (ldm::clip_to_diffusers(&k), t))
        .collect()
}

/// The number of residual blocks of an OpenCLIP text tower.
fn open_clip_blocks(tensors: &BTreeMap<String, Tensor>) -> usize {
    tensors
        .keys()
        .filter_map(|k| {
            k.strip_prefix("transformer.resblocks.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1)
}

/// SDXL's second text encoder: every block of the OpenCLIP tower, and its projection as
/// CLIPTextModelWithProjection's `text_projection.weight` (the transpose of OpenCLIP's).
fn open_clip_with_projection(
    mut tensors: BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>> {
    let projection = tensors.remove(ldm::OPEN_CLIP_PROJECTION).with_context(|| {
        format!(
            "SDXL's second text encoder has no `{}{}`",
            ldm::SDXL_OPEN_CLIP_PREFIX,
            ldm::OPEN_CLIP_PROJECTION
        )
    })?;
    let blocks = open_clip_blocks(&tensors);
    let mut out = ldm::open_clip_to_diffusers(tensors, blocks)?;
    out.insert(
        "text_projection.weight".into(),
        projection.transpose(0, 1).contiguous(),
    );
    Ok(out)
}

fn convert_unet(tensors: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
    let names: BTreeSet<String> = tensors.keys().cloned().collect();
    let map = UnetLayout::from_ldm_names(&names)?.names();
    tensors
        .into_iter()
        .map(|(k, t)| {
            let name = map
                .to_diffusers(&k)
                .with_context(|| format!("unknown U-Net tensor `{}{k}`", ldm::UNET_PREFIX))?;
            Ok((name, t))
        })
        .collect()
}

fn convert_vae(tensors: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
    let names: BTreeSet<String> = tensors.keys().cloned().collect();
    let map = VaeLayout::from_ldm_names(&names)?.names();
    tensors
        .into_iter()
        .map(|(k, t)| {
            let name = map
                .to_diffusers(&k)
                .with_context(|| format!("unknown VAE tensor `{}{k}`", ldm::VAE_PREFIX))?;
            let t = if ldm::is_vae_attention_projection(&name) && t.dim() == 4 {
                t.flatten(1, 3)
            } else {
                t
            };
            Ok((name, t))
        })
        .collect()
}

const CONFIG_FILES: &[&str] = &[
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "text_encoder_2/config.json",
    "tokenizer_2/vocab.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json",
];

/// Copies a diffusers folder's configs and tokenizers (not its weights): the second text
/// encoder's and tokenizer's only for SDXL, which needs them.
fn copy_configs(dir: &Path, out: &Path, family: ModelFamily) -> Result<()> {
    for file in CONFIG_FILES {
        let second = file.starts_with("text_encoder_2/") || file.starts_with("tokenizer_2/");
        if second && !family.has_second_text_encoder() {
            continue;
        }
        let from = dir.join(file);
        if !from.is_file() {
            let optional = file.starts_with("tokenizer")
                && !file.ends_with("vocab.json")
                && !file.ends_with("merges.txt");
            ensure!(
                optional,
                "the config folder {} has no {file}{}",
                dir.display(),
                if second {
                    " (an SDXL model needs it)"
                } else {
                    ""
                }
            );
            continue;
        }
        let to = out.join(file);
        std::fs::create_dir_all(to.parent().expect("has a parent"))?;
        std::fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(())
}

/// SDXL base 1.0's configs (presets/configs/sdxl-base, its Euler scheduler included).
const SDXL_CONFIGS: [(&str, &str); 5] = [
    (
        "unet/config.json",
        include_str!("../../presets/configs/sdxl-base/unet_config.json"),
    ),
    (
        "vae/config.json",
        include_str!("../../presets/configs/sdxl-base/vae_config.json"),
    ),
    (
        "text_encoder/config.json",
        include_str!("../../presets/configs/sdxl-base/text_encoder_config.json"),
    ),
    (
        "text_encoder_2/config.json",
        include_str!("../../presets/configs/sdxl-base/text_encoder_2_config.json"),
    ),
    (
        "scheduler/scheduler_config.json",
        include_str!("../../presets/configs/sdxl-base/scheduler_config.json"),
    ),
];

/// A diffusers `model_index.json` for an SDXL pipeline folder (no watermarker), with the
/// pipeline's default `force_zeros_for_empty_prompt`.
fn sdxl_model_index() -> serde_json::Value {
    json!({
        "_class_name": "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": true,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    })
}

/// SDXL base's configs and the shipped tokenizer twice: the second pads with `!`, as
/// stable-diffusion-xl-base-1.0's `tokenizer_2` does.
fn write_sdxl_configs(out: &Path) -> Result<()> {
    for (file, text) in SDXL_CONFIGS {
        let config: serde_json::Value =
            serde_json::from_str(text).with_context(|| format!("built-in SDXL {file}"))?;
        write_json(&out.join(file), &config)?;
    }
    write_tokenizer_folder(&out.join("tokenizer"), Padding::EndOfText)?;
    write_tokenizer_folder(&out.join("tokenizer_2"), Padding::Exclamation)
}

/// The configs of the SD v1.x / v2.x hub models (stable-diffusion-v1-5, stable-diffusion-2-1) and
/// of SDXL base 1.0.
fn write_builtin_configs(
    family: ModelFamily,
    prediction: PredictionType,
    out: &Path,
) -> Result<()> {
    if family == ModelFamily::Sdxl {
        return write_sdxl_configs(out);
    }
    let v2 = family == ModelFamily::Sd2;
    let size = if v2 && prediction == PredictionType::VPrediction {
        96
    } else {
        64
    };
    write_json(
        &out.join("unet/config.json"),
        &json!({
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "attention_head_dim": if v2 { json!([5, 10, 20, 20]) } else { json!(8) },
            "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": false,
            "cross_attention_dim": if v2 { 1024 } else { 768 },
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "downsample_padding": 1,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "out_channels": 4,
            "sample_size": size,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "use_linear_projection": v2
        }),
    )?;
    write_json(
        &out.join("vae/config.json"),
        &json!({
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "in_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "out_channels": 3,
            "sample_size": size * 8,
            "scaling_factor": 0.18215,
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
        }),
    )?;
    let (hidden, layers, heads, act) = if v2 {
        (1024, 23, 16, "gelu")
    } else {
        (768, 12, 12, "quick_gelu")
    };
    write_json(
        &out.join("text_encoder/config.json"),
        &json!({
            "architectures": ["CLIPTextModel"],
            "bos_token_id": 0,
            "eos_token_id": 2,
            "hidden_act": act,
            "hidden_size": hidden,
            "intermediate_size": hidden * 4,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77,
            "model_type": "clip_text_model",
            "num_attention_heads": heads,
            "num_hidden_layers": layers,
            "pad_token_id": 1,
            "projection_dim": if v2 { 512 } else { 768 },
            "vocab_size": super::clip_vocab::VOCAB_SIZE
        }),
    )?;
    let mut scheduler = super::tiny::scheduler_config();
    if v2 {
        scheduler["_class_name"] = json!("DDIMScheduler");
    }
    write_json(&out.join("scheduler/scheduler_config.json"), &scheduler)?;
    let padding = if v2 {
        Padding::Exclamation
    } else {
        Padding::EndOfText
    };
    write_tokenizer_folder(&out.join("tokenizer"), padding)
}

/// The precision of a written single file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Each tensor as stored.
    Keep,
    F32,
    F16,
    BF16,
}

impl Precision {
    /// The kind `t` is stored as: floating-point tensors in the chosen precision, others as they are.
    fn stored_kind(self, t: &Tensor) -> Kind {
        match self {
            Precision::F32 if t.is_floating_point() => Kind::Float,
            Precision::F16 if t.is_floating_point() => Kind::Half,
            Precision::BF16 if t.is_floating_point() => Kind::BFloat16,
            _ => t.kind(),
        }
    }
}

/// Writes `files` as one LDM-layout `.safetensors` (U-Net, VAE, text encoders), with `unet`
/// replacing the folder's U-Net weights when given (a merged fine-tune).
pub fn write_single_file(
    files: &ModelFiles,
    unet: Option<BTreeMap<String, Tensor>>,
    out: &Path,
    precision: Precision,
) -> Result<()> {
    ensure!(
        out.extension().is_some_and(|e| e == "safetensors"),
        "{}: single files are written as .safetensors (difftune never writes pickles)",
        out.display()
    );
    let unet = match unet {
        Some(u) => u,
        None => read_weights(&files.unet.weights)?,
    };
    let unet_config = UNetConfig::from_file(&files.unet.config)?;
    let vae_config = VaeConfig::from_file(&files.vae.config)?;
    let mut ldm_tensors: Vec<(String, Tensor)> = Vec::new();
    let unet_map = UnetLayout::from_config(&unet_config).names();
    for (name, t) in &unet {
        let ldm_name = unet_map
            .to_ldm(name)
            .with_context(|| format!("U-Net tensor `{name}` has no LDM name"))?;
        ldm_tensors.push((format!("{}{ldm_name}", ldm::UNET_PREFIX), t.shallow_clone()));
    }
    let vae_map = VaeLayout::from_config(&vae_config).names();
    for (name, t) in read_weights(&files.vae.weights)? {
        let name = super::vae::legacy_attention_key(&name);
        let ldm_name = vae_map
            .to_ldm(&name)
            .with_context(|| format!("VAE tensor `{name}` has no LDM name"))?;
        let t = if ldm::is_vae_attention_projection(&name) && t.dim() == 2 {
            t.unsqueeze(-1).unsqueeze(-1)
        } else {
            t
        };
        ldm_tensors.push((format!("{}{ldm_name}", ldm::VAE_PREFIX), t));
    }
    for (name, t) in text_encoder_tensors(files)? {
        ldm_tensors.push((name, t));
    }
    // Converted to the chosen precision a piece at a time as they are written.
    write_safetensors(
        out,
        &ldm_tensors,
        |t| precision.stored_kind(t),
        Some(HashMap::from([("format".to_string(), "pt".to_string())])),
    )
    .map(|_| ())
}

fn ignored_text(name: &str) -> bool {
    name.ends_with("embeddings.position_ids")
}

/// Every tensor of `files`' weight files.
fn read_weights(paths: &[PathBuf]) -> Result<BTreeMap<String, Tensor>> {
    let mut all = BTreeMap::new();
    for p in paths {
        all.extend(read_all(p)?);
    }
    Ok(all)
}

/// The text encoders' tensors under their LDM names, for the family's layout.
fn text_encoder_tensors(files: &ModelFiles) -> Result<Vec<(String, Tensor)>> {
    let family = files.family()?;
    let text = clip_to_diffusers(read_weights(&files.text_encoder.weights)?);
    let prefixed = |prefix: &str, tensors: BTreeMap<String, Tensor>| {
        tensors
            .into_iter()
            .map(|(name, t)| (format!("{prefix}{name}"), t))
            .collect::<Vec<_>>()
    };
    Ok(match family {
        ModelFamily::Sd1 => prefixed(ldm::CLIP_PREFIX, text),
        ModelFamily::Sd2 => prefixed(ldm::OPEN_CLIP_PREFIX, ldm::diffusers_to_open_clip(&text)?),
        ModelFamily::Sdxl => {
            let second = files.text_encoder_2.as_ref().expect("family checks it");
            let mut tensors = read_weights(&second.encoder.weights)?;
            let projection = tensors
                .remove("text_projection.weight")
                .context("SDXL's second text encoder has no text_projection.weight")?;
            let mut open_clip = ldm::diffusers_to_open_clip(&clip_to_diffusers(tensors))?;
            open_clip.insert(
                ldm::OPEN_CLIP_PROJECTION.into(),
                projection.transpose(0, 1).contiguous(),
            );
            let mut all = prefixed(ldm::SDXL_CLIP_PREFIX, text);
            all.extend(prefixed(ldm::SDXL_OPEN_CLIP_PREFIX, open_clip));
            all
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::clip::ClipTextConfig;
    use crate::model::tokenizer::ClipTokenizer;

    #[test]
    fn builtin_sdxl_configs_are_sdxl_base() {
        let dir = tempfile::tempdir().unwrap();
        write_builtin_configs(ModelFamily::Sdxl, PredictionType::Epsilon, dir.path()).unwrap();
        let unet = UNetConfig::from_file(&dir.path().join("unet/config.json")).unwrap();
        let text = ClipTextConfig::from_file(&dir.path().join("text_encoder/config.json")).unwrap();
        assert_eq!(
            ModelFamily::of_configs(&unet, &text).unwrap(),
            ModelFamily::Sdxl
        );
        assert_eq!(unet.transformer_block_widths().len(), 70);
        let second =
            ClipTextConfig::from_file(&dir.path().join("text_encoder_2/config.json")).unwrap();
        assert_eq!(second.projection_dim, Some(1280));
        let tokenizer = ClipTokenizer::from_dir(&dir.path().join("tokenizer")).unwrap();
        let tokenizer_2 = ClipTokenizer::from_dir(&dir.path().join("tokenizer_2")).unwrap();
        assert_eq!((tokenizer.pad_id(), tokenizer_2.pad_id()), (49_407, 0));
    }
}
