//! The original Stable Diffusion ("LDM") checkpoint layout of A1111/ComfyUI single files, and its
//! correspondence with our modules' names (identical to diffusers'): `model.diffusion_model.*`
//! (the openaimodel U-Net), `first_stage_model.*` (the VAE), and `cond_stage_model.transformer.*`
//! (transformers' CLIP, SD v1.x) or `cond_stage_model.model.*` (OpenCLIP, SD v2.x); SDXL's
//! (Stability's sgm layout) has its two text encoders under `conditioner.embedders.0.transformer.*`
//! (CLIP) and `conditioner.embedders.1.model.*` (OpenCLIP). The block numbering depends on the
//! architecture, so each table is built from a layout read either from the checkpoint's keys or
//! from a diffusers config.
use super::unet::UNetConfig;
use super::vae::VaeConfig;
use anyhow::{bail, ensure, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use tch::Tensor;

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
pub const SDXL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
pub const SDXL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";
/// OpenCLIP's text projection, `[width, projection_dim]` (applied as `x @ text_projection`):
/// the transpose of transformers' `text_projection.weight`.
pub const OPEN_CLIP_PROJECTION: &str = "text_projection";

/// One LDM name prefix and its diffusers counterpart (both ending in `.`), with renames of the
/// first segments after it (e.g. a resnet's `in_layers.0.` is `norm1.`).
struct Pair {
    ldm: String,
    diffusers: String,
    inner: &'static [(&'static str, &'static str)],
}

const UNET_RESNET: &[(&str, &str)] = &[
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
];
const VAE_RESNET: &[(&str, &str)] = &[("nin_shortcut.", "conv_shortcut.")];
const VAE_ATTENTION: &[(&str, &str)] = &[
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
];

/// A name correspondence built from a list of [`Pair`]s; the longest matching prefix wins.
pub struct NameMap {
    pairs: Vec<Pair>,
}

impl NameMap {
    fn convert(&self, name: &str, to_diffusers: bool) -> Option<String> {
        let side = |p: &Pair| -> (String, String) {
            if to_diffusers {
                (p.ldm.clone(), p.diffusers.clone())
            } else {
                (p.diffusers.clone(), p.ldm.clone())
            }
        };
        let pair = self
            .pairs
            .iter()
            .filter(|p| name.starts_with(&side(p).0))
            .max_by_key(|p| side(p).0.len())?;
        let (from, to) = side(pair);
        let rest = &name[from.len()..];
        for &(ldm, diffusers) in pair.inner {
            let (a, b) = if to_diffusers {
                (ldm, diffusers)
            } else {
                (diffusers, ldm)
            };
            if let Some(tail) = rest.strip_prefix(a) {
                return Some(format!("{to}{b}{tail}"));
            }
        }
        Some(format!("{to}{rest}"))
    }

    /// The diffusers name of an LDM name (without the component prefix).
    pub fn to_diffusers(&self, name: &str) -> Option<String> {
        self.convert(name, true)
    }

    /// The LDM name of a diffusers name.
    pub fn to_ldm(&self, name: &str) -> Option<String> {
        self.convert(name, false)
    }
}

fn pair(ldm: String, diffusers: String, inner: &'static [(&'static str, &'static str)]) -> Pair {
    Pair {
        ldm,
        diffusers,
        inner,
    }
}

/// The shape of an SD U-Net that fixes its LDM block numbering.
#[derive(Debug, Clone, PartialEq)]
pub struct UnetLayout {
    pub layers_per_block: usize,
    /// Per down block (level), whether it has cross-attention.
    pub down_attention: Vec<bool>,
    /// Per up block (deepest first), whether it has cross-attention.
    pub up_attention: Vec<bool>,
    /// Whether the U-Net has SDXL's added embedding (`label_emb.0` in LDM files).
    pub added_embedding: bool,
}

impl UnetLayout {
    pub fn from_config(c: &UNetConfig) -> Self {
        let attn = |t: &String| t.starts_with("CrossAttn");
        Self {
            layers_per_block: c.layers_per_block as usize,
            down_attention: c.down_block_types.iter().map(attn).collect(),
            up_attention: c.up_block_types.iter().map(attn).collect(),
            added_embedding: c.addition_embed_type.is_some(),
        }
    }

    /// Reads the layout from LDM U-Net names (without `model.diffusion_model.`): levels are
    /// separated by downsamplers (`input_blocks.K.0.op`).
    pub fn from_ldm_names(names: &BTreeSet<String>) -> Result<Self> {
        let index = |prefix: &str| -> BTreeSet<usize> {
            names
                .iter()
                .filter_map(|n| n.strip_prefix(prefix)?.split('.').next()?.parse().ok())
                .collect()
        };
        let inputs = index("input_blocks.");
        let last = *inputs
            .iter()
            .max()
            .context("no input_blocks in the U-Net")?;
        let downsamplers: Vec<usize> = inputs
            .iter()
            .copied()
            .filter(|k| names.contains(&format!("input_blocks.{k}.0.op.weight")))
            .collect();
        let levels = downsamplers.len() + 1;
        // input_blocks: conv_in, then per level `layers` resnets and (but the last) a downsampler.
        let layers = (last + 1 - 1 - downsamplers.len()) / levels;
        ensure!(
            layers >= 1 && 1 + levels * layers + downsamplers.len() == last + 1,
            "the U-Net's input_blocks (0..={last}) do not form {levels} levels of equal depth"
        );
        let has_attention = |block: &str, k: usize| {
            let p = format!("{block}.{k}.1.");
            names
                .iter()
                .any(|n| n.starts_with(&p) && !n.starts_with(&format!("{p}conv.")))
        };
        let down_attention = (0..levels)
            .map(|i| has_attention("input_blocks", 1 + i * (layers + 1)))
            .collect();
        let up_attention = (0..levels)
            .map(|i| has_attention("output_blocks", i * (layers + 1)))
            .collect();
        Ok(Self {
            layers_per_block: layers,
            down_attention,
            up_attention,
            added_embedding: names.iter().any(|n| n.starts_with("label_emb.")),
        })
    }

    /// Reads the layout from our (diffusers) U-Net names: the down blocks' resnets, which
    /// blocks have attentions, and whether there is an `add_embedding`.
    pub fn from_diffusers_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let names: Vec<&str> = names.into_iter().collect();
        let index = |prefix: &str| -> BTreeSet<usize> {
            names
                .iter()
                .filter_map(|n| n.strip_prefix(prefix)?.split('.').next()?.parse().ok())
                .collect()
        };
        let levels = index("down_blocks.").len();
        let layers = index("down_blocks.0.resnets.").len();
        ensure!(
            levels >= 1 && layers >= 1,
            "the U-Net has no down_blocks.*.resnets.*"
        );
        let has = |prefix: String| names.iter().any(|n| n.starts_with(&prefix));
        Ok(Self {
            layers_per_block: layers,
            down_attention: (0..levels)
                .map(|i| has(format!("down_blocks.{i}.attentions.")))
                .collect(),
            up_attention: (0..levels)
                .map(|i| has(format!("up_blocks.{i}.attentions.")))
                .collect(),
            added_embedding: has("add_embedding.".to_string()),
        })
    }

    pub fn levels(&self) -> usize {
        self.down_attention.len()
    }

    /// The correspondence of every block of this layout.
    pub fn names(&self) -> NameMap {
        let (n, l) = (self.levels(), self.layers_per_block);
        let plain = |a: &str, b: &str| pair(a.into(), b.into(), &[]);
        let mut pairs = vec![
            plain("time_embed.0.", "time_embedding.linear_1."),
            plain("time_embed.2.", "time_embedding.linear_2."),
            plain("input_blocks.0.0.", "conv_in."),
            plain("out.0.", "conv_norm_out."),
            plain("out.2.", "conv_out."),
            pair(
                "middle_block.0.".into(),
                "mid_block.resnets.0.".into(),
                UNET_RESNET,
            ),
            plain("middle_block.1.", "mid_block.attentions.0."),
            pair(
                "middle_block.2.".into(),
                "mid_block.resnets.1.".into(),
                UNET_RESNET,
            ),
        ];
        if self.added_embedding {
            pairs.push(plain("label_emb.0.0.", "add_embedding.linear_1."));
            pairs.push(plain("label_emb.0.2.", "add_embedding.linear_2."));
        }
        for i in 0..n {
            for j in 0..l {
                let k = 1 + i * (l + 1) + j;
                pairs.push(pair(
                    format!("input_blocks.{k}.0."),
                    format!("down_blocks.{i}.resnets.{j}."),
                    UNET_RESNET,
                ));
                if self.down_attention[i] {
                    pairs.push(pair(
                        format!("input_blocks.{k}.1."),
                        format!("down_blocks.{i}.attentions.{j}."),
                        &[],
                    ));
                }
            }
            if i + 1 < n {
                pairs.push(pair(
                    format!("input_blocks.{}.0.op.", (i + 1) * (l + 1)),
                    format!("down_blocks.{i}.downsamplers.0.conv."),
                    &[],
                ));
            }
            for j in 0..=l {
                let k = i * (l + 1) + j;
                pairs.push(pair(
                    format!("output_blocks.{k}.0."),
                    format!("up_blocks.{i}.resnets.{j}."),
                    UNET_RESNET,
                ));
                if self.up_attention[i] {
                    pairs.push(pair(
                        format!("output_blocks.{k}.1."),
                        format!("up_blocks.{i}.attentions.{j}."),
                        &[],
                    ));
                }
            }
            if i + 1 < n {
                let slot = if self.up_attention[i] { 2 } else { 1 };
                pairs.push(pair(
                    format!("output_blocks.{}.{slot}.conv.", i * (l + 1) + l),
                    format!("up_blocks.{i}.upsamplers.0.conv."),
                    &[],
                ));
            }
        }
        NameMap { pairs }
    }
}

/// The VAE's levels and resnets per encoder level, which fix its LDM numbering.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeLayout {
    pub levels: usize,
    pub layers_per_block: usize,
}

impl VaeLayout {
    pub fn from_config(c: &VaeConfig) -> Self {
        Self {
            levels: c.block_out_channels.len(),
            layers_per_block: c.layers_per_block as usize,
        }
    }

    /// From LDM VAE names (without `first_stage_model.`).
    pub fn from_ldm_names(names: &BTreeSet<String>) -> Result<Self> {
        let count = |prefix: &str| -> usize {
            names
                .iter()
                .filter_map(|n| {
                    n.strip_prefix(prefix)?
                        .split('.')
                        .next()?
                        .parse::<usize>()
                        .ok()
                })
                .max()
                .map_or(0, |m| m + 1)
        };
        let layout = Self {
            levels: count("encoder.down."),
            layers_per_block: count("encoder.down.0.block."),
        };
        ensure!(
            layout.levels >= 1 && layout.layers_per_block >= 1,
            "the VAE has no encoder.down.*.block.* tensors"
        );
        Ok(layout)
    }

    pub fn names(&self) -> NameMap {
        let (n, l) = (self.levels, self.layers_per_block);
        let same = |name: &str| pair(name.into(), name.into(), &[]);
        let mut pairs = vec![same("quant_conv."), same("post_quant_conv.")];
        for side in ["encoder", "decoder"] {
            pairs.push(same(&format!("{side}.conv_in.")));
            pairs.push(same(&format!("{side}.conv_out.")));
            for (j, ldm) in ["mid.block_1.", "mid.block_2."].iter().enumerate() {
                pairs.push(pair(
                    format!("{side}.{ldm}"),
                    format!("{side}.mid_block.resnets.{j}."),
                    VAE_RESNET,
                ));
            }
            pairs.push(pair(
                format!("{side}.mid.attn_1."),
                format!("{side}.mid_block.attentions.0."),
                VAE_ATTENTION,
            ));
            pairs.push(pair(
                format!("{side}.norm_out."),
                format!("{side}.conv_norm_out."),
                &[],
            ));
        }
        for i in 0..n {
            for j in 0..l {
                pairs.push(pair(
                    format!("encoder.down.{i}.block.{j}."),
                    format!("encoder.down_blocks.{i}.resnets.{j}."),
                    VAE_RESNET,
                ));
            }
            // The decoder's LDM levels count from the narrowest, diffusers' from the widest.
            for j in 0..=l {
                pairs.push(pair(
                    format!("decoder.up.{}.block.{j}.", n - 1 - i),
                    format!("decoder.up_blocks.{i}.resnets.{j}."),
                    VAE_RESNET,
                ));
            }
            if i + 1 < n {
                pairs.push(pair(
                    format!("encoder.down.{i}.downsample."),
                    format!("encoder.down_blocks.{i}.downsamplers.0."),
                    &[],
                ));
                pairs.push(pair(
                    format!("decoder.up.{}.upsample.", n - 1 - i),
                    format!("decoder.up_blocks.{i}.upsamplers.0."),
                    &[],
                ));
            }
        }
        NameMap { pairs }
    }
}

/// The VAE's mid-block attention projections are 1x1 convolutions in LDM files and linear layers
/// in ours.
pub fn is_vae_attention_projection(diffusers_name: &str) -> bool {
    diffusers_name.contains("mid_block.attentions.0.to_") && diffusers_name.ends_with(".weight")
}

/// `cond_stage_model.transformer.…` names: `text_model.…`, or without it in older files.
pub fn clip_to_diffusers(name: &str) -> String {
    if name.starts_with("text_model.") {
        name.to_string()
    } else {
        format!("text_model.{name}")
    }
}

/// Converts OpenCLIP text-tower tensors (names without `cond_stage_model.model.`) to our CLIP
/// text model's, keeping the first `layers` residual blocks (SD v2.x uses the penultimate layer's
/// output, so the last block is unused and diffusers drops it).
pub fn open_clip_to_diffusers(
    tensors: BTreeMap<String, Tensor>,
    layers: usize,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (name, t) in tensors {
        if let Some(rest) = name.strip_prefix("transformer.resblocks.") {
            let (index, rest) = rest.split_once('.').context("bad resblock name")?;
            let i: usize = index
                .parse()
                .with_context(|| format!("bad resblock `{name}`"))?;
            if i >= layers {
                continue;
            }
            let layer = format!("text_model.encoder.layers.{i}.");
            if let Some(kind) = rest.strip_prefix("attn.in_proj_") {
                let parts = t.chunk(3, 0);
                ensure!(
                    parts.len() == 3 && t.size()[0] % 3 == 0,
                    "`{name}` with shape {:?} does not split into q, k, v",
                    t.size()
                );
                for (p, part) in ["q", "k", "v"].iter().zip(parts) {
                    out.insert(
                        format!("{layer}self_attn.{p}_proj.{kind}"),
                        part.contiguous(),
                    );
                }
                continue;
            }
            let renamed = [
                ("ln_1.", "layer_norm1."),
                ("ln_2.", "layer_norm2."),
                ("attn.out_proj.", "self_attn.out_proj."),
                ("mlp.c_fc.", "mlp.fc1."),
                ("mlp.c_proj.", "mlp.fc2."),
            ]
            .iter()
            .find_map(|(a, b)| rest.strip_prefix(a).map(|tail| format!("{b}{tail}")))
            .with_context(|| format!("unknown OpenCLIP tensor `{OPEN_CLIP_PREFIX}{name}`"))?;
            out.insert(format!("{layer}{renamed}"), t);
            continue;
        }
        let renamed = match name.as_str() {
            "token_embedding.weight" => "text_model.embeddings.token_embedding.weight".into(),
            "positional_embedding" => "text_model.embeddings.position_embedding.weight".into(),
            n if n.starts_with("ln_final.") => {
                format!("text_model.final_layer_norm.{}", &n["ln_final.".len()..])
            }
            // The image-text projection and temperature are not part of the text encoder.
            "text_projection" | "logit_scale" | "attn_mask" => continue,
            _ => bail!("unknown OpenCLIP tensor `{OPEN_CLIP_PREFIX}{name}`"),
        };
        out.insert(renamed, t);
    }
    Ok(out)
}

/// The inverse of [`open_clip_to_diffusers`]: q, k, v are concatenated into `in_proj`.
pub fn diffusers_to_open_clip(
    tensors: &BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (name, t) in tensors {
        let name = name.strip_prefix("text_model.").unwrap_or(name);
        if let Some(rest) = name.strip_prefix("encoder.layers.") {
            let (i, rest) = rest.split_once('.').context("bad layer name")?;
            let block = format!("transformer.resblocks.{i}.");
            if let Some(kind) = rest.strip_prefix("self_attn.q_proj.") {
                let get = |p: &str| {
                    tensors
                        .get(&format!(
                            "text_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}"
                        ))
                        .with_context(|| format!("layer {i} has no {p}_proj.{kind}"))
                };
                let qkv = Tensor::cat(&[get("q")?, get("k")?, get("v")?], 0);
                out.insert(format!("{block}attn.in_proj_{kind}"), qkv);
                continue;
            }
            if rest.starts_with("self_attn.k_proj.") || rest.starts_with("self_attn.v_proj.") {
                continue;
            }
            let renamed = [
                ("layer_norm1.", "ln_1."),
                ("layer_norm2.", "ln_2."),
                ("self_attn.out_proj.", "attn.out_proj."),
                ("mlp.fc1.", "mlp.c_fc."),
                ("mlp.fc2.", "mlp.c_proj."),
            ]
            .iter()
            .find_map(|(a, b)| rest.strip_prefix(a).map(|tail| format!("{b}{tail}")))
            .with_context(|| format!("text encoder tensor `{name}` has no OpenCLIP name"))?;
            out.insert(format!("{block}{renamed}"), t.shallow_clone());
            continue;
        }
        let renamed = match name {
            "embeddings.token_embedding.weight" => "token_embedding.weight".to_string(),
            "embeddings.position_embedding.weight" => "positional_embedding".to_string(),
            n if n.starts_with("final_layer_norm.") => {
                format!("ln_final.{}", &n["final_layer_norm.".len()..])
            }
            "embeddings.position_ids" => continue,
            _ => bail!("text encoder tensor `{name}` has no OpenCLIP name"),
        };
        out.insert(renamed, t.shallow_clone());
    }
    Ok(out)
}
