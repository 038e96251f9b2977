//! Single-file Stable Diffusion checkpoints (A1111/ComfyUI `.safetensors`, original `.ckpt`), in
//! and out. A single file is converted once into a diffusers folder in difftune's cache (keyed by
//! the file's fingerprint and the options), so every command that takes `--model` reads it through
//! the same path as a diffusers folder. SD v1.x and v2.x are recognised from their keys and shapes
//! and get built-in configs and the shipped CLIP tokenizer; nothing is downloaded.
//!
//! A model spec is `FILE[#option,...]`, options: `ema` (use the `model_ema.*` U-Net weights),
//! `epsilon` / `v_prediction` (override the detected prediction type), `config=DIR` (take the
//! configs and tokenizer from a diffusers folder, as diffusers' `from_single_file(config=...)`,
//! for architectures other than SD v1.x/v2.x).
use super::clip::ClipTextConfig;
use super::clip_vocab::{write_tokenizer_folder, Padding};
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
            Family::V1 => PredictionType::Epsilon,
            // SD 2.x's 512-pixel base model is the one trained for 110,000 steps on epsilon.
            Family::V2 if checkpoint.global_step == Some(110_000) => PredictionType::Epsilon,
            Family::V2 => PredictionType::VPrediction,
        });
        match &self.config {
            Some(dir) => copy_configs(dir, out)?,
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
        // model_index.json last: its presence marks a complete folder.
        write_json(&out.join("model_index.json"), &super::tiny::model_index())
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

/// The SD generations difftune knows from their keys and shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// OpenAI CLIP ViT-L/14 text encoder, 768-wide cross-attention.
    V1,
    /// OpenCLIP ViT-H/14 text encoder, 1024-wide cross-attention.
    V2,
}

fn shape(tensors: &BTreeMap<String, Tensor>, name: &str) -> Option<Vec<i64>> {
    tensors.get(name).map(Tensor::size)
}

/// Tells SD v1.x from v2.x, and refuses what is neither with a message saying what it is.
pub fn detect(tensors: &BTreeMap<String, Tensor>) -> Result<Family> {
    let has = |prefix: &str| tensors.keys().any(|k| k.starts_with(prefix));
    if has("conditioner.embedders.") {
        bail!("this is an SDXL checkpoint (conditioner.embedders.*); difftune supports SD v1.x and v2.x");
    }
    if has("model.diffusion_model.label_emb.") {
        bail!("this U-Net is class-conditioned (model.diffusion_model.label_emb.*: SDXL or SD 2.x unCLIP); difftune supports SD v1.x and v2.x text-to-image models");
    }
    let conv_in = format!("{}input_blocks.0.0.weight", ldm::UNET_PREFIX);
    let Some(conv_in_shape) = shape(tensors, &conv_in) else {
        bail!(
            "not an SD v1.x/v2.x checkpoint: no `{conv_in}` (a full model has model.diffusion_model.*, first_stage_model.* and cond_stage_model.*; is this a LoRA, a VAE or a U-Net alone?)"
        );
    };
    match conv_in_shape.get(1) {
        Some(4) => {}
        Some(9) => bail!("this is an inpainting checkpoint (`{conv_in}` has shape {conv_in_shape:?}: 9 input channels); difftune fine-tunes text-to-image models with 4"),
        _ => bail!("`{conv_in}` has shape {conv_in_shape:?}; SD v1.x/v2.x text-to-image U-Nets take 4 latent channels (this may be a depth, pix2pix or other conditioned model)"),
    }
    match (has(ldm::CLIP_PREFIX), has(ldm::OPEN_CLIP_PREFIX)) {
        (true, false) => Ok(Family::V1),
        (false, true) => Ok(Family::V2),
        _ => bail!(
            "expected one text encoder, {}* (SD v1.x) or {}* (SD v2.x)",
            ldm::CLIP_PREFIX,
            ldm::OPEN_CLIP_PREFIX
        ),
    }
}

/// The built-in configs fit SD v1.x's 768-wide and v2.x's 1024-wide cross-attention only.
fn check_builtin(tensors: &BTreeMap<String, Tensor>, family: Family) -> Result<()> {
    let (name, width) = tensors
        .iter()
        .find(|(k, _)| k.starts_with(ldm::UNET_PREFIX) && k.ends_with("attn2.to_k.weight"))
        .map(|(k, t)| (k.clone(), t.size()))
        .context(
            "the U-Net has no cross-attention (no model.diffusion_model.*.attn2.to_k.weight)",
        )?;
    let expected = match family {
        Family::V1 => 768,
        Family::V2 => 1024,
    };
    ensure!(
        width.get(1) == Some(&expected),
        "not SD v1.x (CLIP text encoder, cross-attention [*, 768]) or v2.x (OpenCLIP, [*, 1024]): \
         `{name}` has shape {width:?} with the {family:?} text-encoder layout; pass the model's \
         diffusers configs with `#config=DIR`"
    );
    Ok(())
}

/// The three models' tensors under our (diffusers) names.
pub struct Components {
    pub unet: BTreeMap<String, Tensor>,
    pub vae: BTreeMap<String, Tensor>,
    pub text_encoder: BTreeMap<String, Tensor>,
}

/// Tensors the LDM file carries that no model needs: the diffusion schedule's buffers, the EMA's
/// bookkeeping, older transformers' position ids.
fn ignored(name: &str) -> bool {
    !(name.starts_with(ldm::UNET_PREFIX)
        || name.starts_with(ldm::VAE_PREFIX)
        || name.starts_with("cond_stage_model."))
        || name.ends_with("embeddings.position_ids")
        || name.starts_with("first_stage_model.loss.")
}

/// Splits an LDM state dict into the three models under our names. `ema` takes the U-Net from the
/// `model_ema.*` copies (whose names are the U-Net's without dots).
pub fn split(
    mut tensors: BTreeMap<String, Tensor>,
    ema: bool,
    family: Family,
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
    let text_ldm = match family {
        Family::V1 => take(ldm::CLIP_PREFIX),
        Family::V2 => take(ldm::OPEN_CLIP_PREFIX),
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
        bail!(
            "unexpected tensor `{name}` (not part of an SD v1.x/v2.x U-Net, VAE or text encoder)"
        );
    }
    Ok(Components {
        unet: convert_unet(unet_ldm)?,
        vae: convert_vae(vae_ldm)?,
        text_encoder: match family {
            Family::V1 => text_ldm
                .into_iter()
                .filter(|(k, _)| !ignored_text(k))
                .map(|(k, t)| (ldm::clip_to_diffusers(&k), t))
                .collect(),
            Family::V2 => {
                let blocks = text_ldm
                    .keys()
                    .filter_map(|k| {
                        k.strip_prefix("transformer.resblocks.")?
                            .split('.')
                            .next()?
                            .parse::<usize>()
                            .ok()
                    })
                    .max()
                    .map_or(0, |m| m + 1);
                ldm::open_clip_to_diffusers(text_ldm, blocks.saturating_sub(1))?
            }
        },
    })
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
];

/// Copies a diffusers folder's configs and tokenizer (not its weights).
fn copy_configs(dir: &Path, out: &Path) -> Result<()> {
    for file in CONFIG_FILES {
        let from = dir.join(file);
        if !from.is_file() {
            let optional = file.starts_with("tokenizer/")
                && !file.ends_with("vocab.json")
                && !file.ends_with("merges.txt");
            ensure!(
                optional,
                "the config folder {} has no {file}",
                dir.display()
            );
            continue;
        }
        let to = out.join(file);
        std::fs::create_dir_all(to.parent().expect("has a parent"))?;
        std::fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(())
}

/// The configs of the SD v1.x / v2.x hub models (stable-diffusion-v1-5, stable-diffusion-2-1).
fn write_builtin_configs(family: Family, prediction: PredictionType, out: &Path) -> Result<()> {
    let v2 = family == Family::V2;
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

/// Writes `files` as one LDM-layout `.safetensors` (U-Net, VAE, text encoder), with `unet`
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
    let read = |paths: &[PathBuf]| -> Result<BTreeMap<String, Tensor>> {
        let mut all = BTreeMap::new();
        for p in paths {
            all.extend(read_all(p)?);
        }
        Ok(all)
    };
    let unet = match unet {
        Some(u) => u,
        None => read(&files.unet.weights)?,
    };
    let unet_config = UNetConfig::from_file(&files.unet.config)?;
    let vae_config = VaeConfig::from_file(&files.vae.config)?;
    let text_config = ClipTextConfig::from_file(&files.text_encoder.config)?;
    let mut ldm_tensors: Vec<(String, Tensor)> = Vec::new();
    let unet_map = UnetLayout::from_config(&unet_config).names();
    for (name, t) in &unet {
        let ldm_name = unet_map
            .to_ldm(name)
            .with_context(|| format!("U-Net tensor `{name}` has no LDM name"))?;
        ldm_tensors.push((format!("{}{ldm_name}", ldm::UNET_PREFIX), t.shallow_clone()));
    }
    let vae_map = VaeLayout::from_config(&vae_config).names();
    for (name, t) in read(&files.vae.weights)? {
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
    let text: BTreeMap<String, Tensor> = read(&files.text_encoder.weights)?
        .into_iter()
        .map(|(k, t)| (ldm::clip_to_diffusers(&k), t))
        .filter(|(k, _)| !ignored_text(k))
        .collect();
    if text_config.hidden_act == "gelu" && text_config.hidden_size == 1024 {
        for (name, t) in ldm::diffusers_to_open_clip(&text)? {
            ldm_tensors.push((format!("{}{name}", ldm::OPEN_CLIP_PREFIX), t));
        }
    } else {
        for (name, t) in text {
            ldm_tensors.push((format!("{}{name}", ldm::CLIP_PREFIX), t));
        }
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
