//! diffusers' UNet2DConditionModel for the SD 1.x / 2.x and SDXL families, configured from its
//! `config.json`.
use super::checkpoint::Scope;
use super::conditioning::TextConditioning;
use super::layers::{Conv2d, GroupNorm, Linear};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use super::transformer::{Transformer2DModel, TransformerConfig};
use super::visit::{ModuleMut, VisitModules};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{nn, Kind, Tensor};

/// A config value that diffusers accepts either once for all blocks or per block.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(i64),
    Each(Vec<i64>),
}

impl PerBlock {
    fn expand(&self, name: &str, blocks: usize) -> Result<Vec<i64>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; blocks]),
            PerBlock::Each(v) if v.len() == blocks => Ok(v.clone()),
            PerBlock::Each(v) => bail!(
                "unet config: `{name}` has {} entries for {blocks} blocks",
                v.len()
            ),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_groups() -> i64 {
    32
}
fn default_eps() -> f64 {
    1e-5
}
fn default_one() -> PerBlock {
    PerBlock::One(1)
}
fn default_padding() -> i64 {
    1
}
fn default_scale() -> f64 {
    1.0
}
fn default_act() -> String {
    "silu".into()
}
fn default_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

/// A down or up block of the U-Net: with cross-attention transformers after its resnets
/// (diffusers' `CrossAttn*Block2D`) or resnets only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    CrossAttn,
    Plain,
}

impl BlockKind {
    /// The kinds of the diffusers block type names `types`, given the names of each kind.
    fn read(types: &[String], side: &str, kinds: &[(&str, BlockKind)]) -> Result<Vec<Self>> {
        types
            .iter()
            .map(|t| match kinds.iter().find(|(name, _)| name == t) {
                Some(&(_, kind)) => Ok(kind),
                None => {
                    let names: Vec<&str> = kinds.iter().map(|(name, _)| *name).collect();
                    bail!(
                        "unknown {side} block type `{t}` (supported: {})",
                        names.join(", ")
                    )
                }
            })
            .collect()
    }
}

/// The fields of a diffusers `unet/config.json` that the SD 1.x/2.x and SDXL architectures use.
/// Options that select architectures we do not implement are read so they can be refused with a
/// clear error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UNetConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub block_out_channels: Vec<i64>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_mid")]
    pub mid_block_type: Option<String>,
    pub layers_per_block: i64,
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: i64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "default_groups")]
    pub norm_num_groups: i64,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: i64,
    #[serde(default = "default_one")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "default_padding")]
    pub downsample_padding: i64,
    #[serde(default = "default_scale")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "default_act")]
    pub act_fn: String,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// SDXL: the width each size/crop number is embedded at (`text_time`).
    #[serde(default)]
    pub addition_time_embed_dim: Option<i64>,
    /// SDXL: the width of the added embedding's input, pooled text plus embedded time ids.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<i64>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    #[serde(default)]
    pub sample_size: Option<i64>,
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        super::read_config(path, "U-Net config", Self::validate)
    }

    /// Refuses configs for architectures this U-Net does not implement, instead of building a
    /// silently different model.
    pub fn validate(&self) -> Result<()> {
        super::check_block_lists(
            self.block_out_channels.len(),
            self.down_block_types.len(),
            self.up_block_types.len(),
        )?;
        self.down_block_kinds()?;
        self.up_block_kinds()?;
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => bail!("unknown mid block type {other:?} (supported: UNetMidBlock2DCrossAttn)"),
        }
        if self.act_fn != "silu" {
            bail!("unsupported act_fn `{}` (supported: silu)", self.act_fn);
        }
        if let Some(t) = &self.class_embed_type {
            bail!("class_embed_type `{t}` is not supported");
        }
        self.added_embedding()?;
        if !matches!(
            self.resnet_time_scale_shift.as_deref(),
            None | Some("default")
        ) {
            bail!(
                "resnet_time_scale_shift {:?} is not supported",
                self.resnet_time_scale_shift
            );
        }
        if !matches!(
            &self.only_cross_attention,
            serde_json::Value::Null | serde_json::Value::Bool(false)
        ) {
            bail!("only_cross_attention is not supported");
        }
        self.heads()?;
        self.transformer_layers_per_block.expand(
            "transformer_layers_per_block",
            self.block_out_channels.len(),
        )?;
        for (&c, &h) in self.block_out_channels.iter().zip(&self.heads()?) {
            if h <= 0 || c % h != 0 {
                bail!("block width {c} is not divisible by its {h} attention heads");
            }
            if c % self.norm_num_groups != 0 {
                bail!(
                    "block width {c} is not divisible by norm_num_groups {}",
                    self.norm_num_groups
                );
            }
        }
        Ok(())
    }

    /// Heads per block. diffusers' SD configs store the head *count* in `attention_head_dim`
    /// (a historical misnomer) unless `num_attention_heads` is given.
    pub fn heads(&self) -> Result<Vec<i64>> {
        let n = self.block_out_channels.len();
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .expand("attention_head_dim", n)
    }

    /// The added embedding of `addition_embed_type`, if any.
    pub fn added_embedding(&self) -> Result<Option<AddedEmbedding>> {
        match self.addition_embed_type.as_deref() {
            None => Ok(None),
            Some("text_time") => {
                let (Some(time_dim), Some(input_dim)) = (
                    self.addition_time_embed_dim,
                    self.projection_class_embeddings_input_dim,
                ) else {
                    bail!("addition_embed_type `text_time` needs addition_time_embed_dim and projection_class_embeddings_input_dim");
                };
                if time_dim <= 0 || time_dim % 2 != 0 || input_dim <= TIME_IDS * time_dim {
                    bail!(
                        "text_time embedding: addition_time_embed_dim {time_dim} must be even and positive, and projection_class_embeddings_input_dim {input_dim} larger than {TIME_IDS} of them (the pooled text embedding takes the rest)"
                    );
                }
                Ok(Some(AddedEmbedding::TextTime {
                    time_dim,
                    input_dim,
                }))
            }
            Some(other) => bail!(
                "addition_embed_type `{other}` is not supported (supported: text_time, as SDXL)"
            ),
        }
    }

    /// What each down block is, from `down_block_types`.
    pub fn down_block_kinds(&self) -> Result<Vec<BlockKind>> {
        let kinds = [
            ("CrossAttnDownBlock2D", BlockKind::CrossAttn),
            ("DownBlock2D", BlockKind::Plain),
        ];
        BlockKind::read(&self.down_block_types, "down", &kinds)
    }

    /// What each up block is, from `up_block_types`.
    pub fn up_block_kinds(&self) -> Result<Vec<BlockKind>> {
        let kinds = [
            ("CrossAttnUpBlock2D", BlockKind::CrossAttn),
            ("UpBlock2D", BlockKind::Plain),
        ];
        BlockKind::read(&self.up_block_types, "up", &kinds)
    }

    /// Channel widths of the transformer blocks, in model order (down, mid, up), one per block.
    pub fn transformer_block_widths(&self) -> Vec<i64> {
        let layers = self
            .transformer_layers_per_block
            .expand(
                "transformer_layers_per_block",
                self.block_out_channels.len(),
            )
            .unwrap_or_default();
        let mut widths = Vec::new();
        let down = self.down_block_kinds().unwrap_or_default();
        for (i, kind) in down.into_iter().enumerate() {
            if kind == BlockKind::CrossAttn {
                let per = self.layers_per_block * layers[i];
                widths.extend(std::iter::repeat_n(
                    self.block_out_channels[i],
                    per as usize,
                ));
            }
        }
        let last = self.block_out_channels.len() - 1;
        widths.extend(std::iter::repeat_n(
            self.block_out_channels[last],
            layers[last] as usize,
        ));
        let up = self.up_block_kinds().unwrap_or_default();
        for (i, kind) in up.into_iter().enumerate() {
            let block = last - i;
            if kind == BlockKind::CrossAttn {
                let per = (self.layers_per_block + 1) * layers[block];
                widths.extend(std::iter::repeat_n(
                    self.block_out_channels[block],
                    per as usize,
                ));
            }
        }
        widths
    }
}

/// The size and crop numbers of SDXL's added conditions (diffusers' `add_time_ids`).
pub const TIME_IDS: i64 = 6;

/// An embedding added to the timestep embedding (diffusers' `addition_embed_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddedEmbedding {
    /// SDXL's: the pooled text embedding and [`TIME_IDS`] numbers, each embedded sinusoidally at
    /// `time_dim`, concatenated (`input_dim` wide) into a [`TimestepEmbedding`] MLP.
    TextTime { time_dim: i64, input_dim: i64 },
}

impl AddedEmbedding {
    /// The width of the pooled text embedding it takes.
    pub fn text_embeds_dim(self) -> i64 {
        match self {
            AddedEmbedding::TextTime {
                time_dim,
                input_dim,
            } => input_dim - TIME_IDS * time_dim,
        }
    }
}

/// diffusers' `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    fn new(vs: nn::Path, input_dim: i64, dim: i64) -> Self {
        Self {
            linear_1: Linear::new(&vs / "linear_1", input_dim, dim, true),
            linear_2: Linear::new(&vs / "linear_2", dim, dim, true),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(x).silu())
    }
}

impl VisitModules for TimestepEmbedding {
    fn visit_modules(&mut self, f: &mut dyn FnMut(ModuleMut<'_>)) {
        self.linear_1.visit_modules(f);
        self.linear_2.visit_modules(f);
    }
}

/// CrossAttnDownBlock2D (with `attentions`) or DownBlock2D (without).
#[derive(Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsampler: Option<Downsample2D>,
}

/// CrossAttnUpBlock2D (with `attentions`) or UpBlock2D (without).
#[derive(Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsampler: Option<Upsample2D>,
}

#[derive(Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

#[derive(Debug)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    /// SDXL's `add_embedding`, with what it takes.
    pub add_embedding: Option<(AddedEmbedding, TimestepEmbedding)>,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    /// Recompute each resnet and transformer block in the backward pass of
    /// [`UNet2DConditionModel::forward_in`] instead of keeping its activations.
    pub gradient_checkpointing: bool,
}

/// What every block of one U-Net is built from: its config resolved per block (heads,
/// transformer depth) and the time-embedding width its resnets take.
struct BlockBuilder<'a> {
    config: &'a UNetConfig,
    heads: Vec<i64>,
    transformer_layers: Vec<i64>,
    temb: i64,
}

impl<'a> BlockBuilder<'a> {
    fn new(config: &'a UNetConfig) -> Result<Self> {
        let n = config.block_out_channels.len();
        Ok(Self {
            config,
            heads: config.heads()?,
            transformer_layers: config
                .transformer_layers_per_block
                .expand("transformer_layers_per_block", n)?,
            temb: config.block_out_channels[0] * 4,
        })
    }

    fn resnet(&self, vs: nn::Path, cin: i64, cout: i64, scale: f64) -> ResnetBlock2D {
        let rc = ResnetConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: Some(self.temb),
            groups: self.config.norm_num_groups,
            eps: self.config.norm_eps,
            output_scale_factor: scale,
        };
        ResnetBlock2D::new(vs, &rc)
    }

    /// The transformer of a block at depth `level` (0 = the highest resolution).
    fn transformer(&self, vs: nn::Path, ch: i64, level: usize) -> Transformer2DModel {
        let c = self.config;
        let tc = TransformerConfig {
            channels: ch,
            heads: self.heads[level],
            head_dim: ch / self.heads[level],
            layers: self.transformer_layers[level],
            context_dim: c.cross_attention_dim,
            groups: c.norm_num_groups,
            linear_projection: c.use_linear_projection,
        };
        Transformer2DModel::new(vs, &tc)
    }

    fn down_block(&self, vs: nn::Path, i: usize, kind: BlockKind, in_ch: i64) -> DownBlock {
        let c = self.config;
        let out_ch = c.block_out_channels[i];
        let resnets = (0..c.layers_per_block)
            .map(|j| {
                let cin = if j == 0 { in_ch } else { out_ch };
                self.resnet(&vs / "resnets" / j, cin, out_ch, 1.0)
            })
            .collect();
        let attentions = if kind == BlockKind::CrossAttn {
            (0..c.layers_per_block)
                .map(|j| self.transformer(&vs / "attentions" / j, out_ch, i))
                .collect()
        } else {
            Vec::new()
        };
        let downsampler = (i + 1 < c.block_out_channels.len())
            .then(|| Downsample2D::new(&vs / "downsamplers" / 0, out_ch, c.downsample_padding));
        DownBlock {
            resnets,
            attentions,
            downsampler,
        }
    }

    fn mid_block(&self, vs: nn::Path) -> MidBlock {
        let c = self.config;
        let level = c.block_out_channels.len() - 1;
        let ch = c.block_out_channels[level];
        let scale = c.mid_block_scale_factor;
        MidBlock {
            resnets: (0..2)
                .map(|j| self.resnet(&vs / "resnets" / j, ch, ch, scale))
                .collect(),
            attentions: vec![self.transformer(&vs / "attentions" / 0, ch, level)],
        }
    }

    /// Up block `i` (0 = the lowest resolution), whose first resnet takes `prev_out` channels
    /// from the block below it.
    fn up_block(&self, vs: nn::Path, i: usize, kind: BlockKind, prev_out: i64) -> UpBlock {
        let c = self.config;
        let n = c.block_out_channels.len();
        let channels_at = |level: usize| c.block_out_channels[n - 1 - level];
        let (out_ch, in_ch) = (channels_at(i), channels_at((i + 1).min(n - 1)));
        let layers = c.layers_per_block + 1;
        let resnets = (0..layers)
            .map(|j| {
                let skip = if j == layers - 1 { in_ch } else { out_ch };
                let cin = if j == 0 { prev_out } else { out_ch };
                self.resnet(&vs / "resnets" / j, cin + skip, out_ch, 1.0)
            })
            .collect();
        let attentions = if kind == BlockKind::CrossAttn {
            (0..layers)
                .map(|j| self.transformer(&vs / "attentions" / j, out_ch, n - 1 - i))
                .collect()
        } else {
            Vec::new()
        };
        let upsampler = (i + 1 < n).then(|| Upsample2D::new(&vs / "upsamplers" / 0, out_ch));
        UpBlock {
            resnets,
            attentions,
            upsampler,
        }
    }
}

impl UNet2DConditionModel {
    pub fn new(vs: nn::Path, config: &UNetConfig) -> Result<Self> {
        config.validate()?;
        let c = config;
        let blocks = BlockBuilder::new(c)?;
        let ch0 = c.block_out_channels[0];
        let temb = blocks.temb;
        // Built in diffusers' order: with random initialisation the order fixes the weights.
        let conv_in = Conv2d::new(&vs / "conv_in", c.in_channels, ch0, 3, 1, 1);
        let time_embedding = TimestepEmbedding::new(&vs / "time_embedding", ch0, temb);
        let add_embedding = c.added_embedding()?.map(|added| {
            let AddedEmbedding::TextTime { input_dim, .. } = added;
            let mlp = TimestepEmbedding::new(&vs / "add_embedding", input_dim, temb);
            (added, mlp)
        });
        let mut down_blocks = Vec::new();
        let mut out_ch = ch0;
        for (i, kind) in c.down_block_kinds()?.into_iter().enumerate() {
            down_blocks.push(blocks.down_block(&vs / "down_blocks" / i, i, kind, out_ch));
            out_ch = c.block_out_channels[i];
        }
        let mid_block = blocks.mid_block(&vs / "mid_block");
        let mut up_blocks = Vec::new();
        let mut prev_out = out_ch;
        for (i, kind) in c.up_block_kinds()?.into_iter().enumerate() {
            up_blocks.push(blocks.up_block(&vs / "up_blocks" / i, i, kind, prev_out));
            prev_out = c.block_out_channels[c.block_out_channels.len() - 1 - i];
        }
        Ok(Self {
            config: config.clone(),
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                &vs / "conv_norm_out",
                c.norm_num_groups,
                ch0,
                c.norm_eps,
            ),
            conv_out: Conv2d::new(&vs / "conv_out", ch0, c.out_channels, 3, 1, 1),
            gradient_checkpointing: false,
        })
    }

    /// Sinusoidal features of `values` `[n]` at width `dim`, as diffusers' `Timesteps` computes
    /// them: `[n, dim]` f32.
    fn sinusoidal_features(&self, values: &Tensor, dim: i64) -> Tensor {
        let half = dim / 2;
        let shift = self.config.freq_shift as f64;
        let exponent = Tensor::arange(half, (Kind::Float, values.device()))
            * (-(10000f64).ln() / (half as f64 - shift));
        let args = values.to_kind(Kind::Float).unsqueeze(1) * exponent.exp().unsqueeze(0);
        let (sin, cos) = (args.sin(), args.cos());
        if self.config.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], -1)
        } else {
            Tensor::cat(&[sin, cos], -1)
        }
    }

    /// Predicts noise (or v) for `sample` `[b, in_ch, h, w]` at `timesteps` (a scalar or `[b]`),
    /// conditioned on `conditioning`: a [`TextConditioning`], or for SD 1.x/2.x U-Nets the context
    /// `[b, seq, cross_attention_dim]` alone.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        conditioning: impl Into<TextConditioning>,
    ) -> Tensor {
        self.forward_in(None, sample, timesteps, conditioning)
    }

    /// The timestep embedding, plus the added embedding of SDXL's conditions: `[b, temb]`.
    fn embedding(&self, timesteps: &Tensor, conditioning: &TextConditioning, kind: Kind) -> Tensor {
        let t_feat = self
            .sinusoidal_features(timesteps, self.config.block_out_channels[0])
            .to_kind(kind);
        let temb = self.time_embedding.forward(&t_feat);
        match (&self.add_embedding, &conditioning.added) {
            (None, None) => temb,
            (Some((added, mlp)), Some(conditions)) => {
                let AddedEmbedding::TextTime { time_dim, .. } = *added;
                let batch = conditions.text_embeds.size()[0];
                let time_embeds = self
                    .sinusoidal_features(&conditions.time_ids.flatten(0, -1), time_dim)
                    .reshape([batch, -1]);
                let kind = temb.kind();
                let input = Tensor::cat(
                    &[conditions.text_embeds.to_kind(kind), time_embeds.to_kind(kind)],
                    -1,
                );
                temb + mlp.forward(&input)
            }
            (Some(_), None) => panic!(
                "this U-Net has a text_time added embedding (SDXL): its conditioning needs the pooled text embedding and the time ids"
            ),
            (None, Some(_)) => panic!(
                "added conditions (pooled text embedding, time ids) given to a U-Net without an added embedding"
            ),
        }
    }

    /// [`UNet2DConditionModel::forward`]; with `gradient_checkpointing` set, every resnet and
    /// transformer block is checkpointed in `scope` (the backward pass must run inside it too).
    pub fn forward_in<'env>(
        &'env self,
        scope: Option<&Scope<'_, 'env>>,
        sample: &Tensor,
        timesteps: &Tensor,
        conditioning: impl Into<TextConditioning>,
    ) -> Tensor {
        let conditioning = conditioning.into();
        let context = &conditioning.context;
        let scope = scope.filter(|_| self.gradient_checkpointing);
        let batch = sample.size()[0];
        let timesteps = if timesteps.dim() == 0 {
            timesteps.expand([batch], false)
        } else {
            timesteps.shallow_clone()
        };
        let temb = self.embedding(&timesteps, &conditioning, sample.kind());

        let sample = if self.config.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample.shallow_clone()
        };
        let mut h = self.conv_in.forward(&sample);
        let mut skips = vec![h.shallow_clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                h = resnet.forward_in(scope, &h, &temb);
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward_in(scope, &h, context);
                }
                skips.push(h.shallow_clone());
            }
            if let Some(down) = &block.downsampler {
                h = down.forward(&h);
                skips.push(h.shallow_clone());
            }
        }

        h = self.mid_block.resnets[0].forward_in(scope, &h, &temb);
        for (attn, resnet) in self
            .mid_block
            .attentions
            .iter()
            .zip(&self.mid_block.resnets[1..])
        {
            h = resnet.forward_in(scope, &attn.forward_in(scope, &h, context), &temb);
        }

        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("skip connections run out");
                h = resnet.forward_in(scope, &Tensor::cat(&[&h, &skip], 1), &temb);
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward_in(scope, &h, context);
                }
            }
            if let Some(up) = &block.upsampler {
                // Match the next skip's size so inputs that are not a multiple of the total
                // downsampling factor work as in diffusers.
                let size = skips.last().map(|s| {
                    let sz = s.size();
                    (sz[2], sz[3])
                });
                h = up.forward(&h, size);
            }
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h).silu())
    }
}

impl VisitModules for UNet2DConditionModel {
    fn visit_modules(&mut self, f: &mut dyn FnMut(ModuleMut<'_>)) {
        self.conv_in.visit_modules(f);
        self.time_embedding.visit_modules(f);
        if let Some((_, mlp)) = &mut self.add_embedding {
            mlp.visit_modules(f);
        }
        for b in &mut self.down_blocks {
            for j in 0..b.resnets.len() {
                b.resnets[j].visit_modules(f);
                if let Some(a) = b.attentions.get_mut(j) {
                    a.visit_modules(f);
                }
            }
            b.downsampler.visit_modules(f);
        }
        self.mid_block.resnets[0].visit_modules(f);
        self.mid_block.attentions.visit_modules(f);
        self.mid_block.resnets[1].visit_modules(f);
        for b in &mut self.up_blocks {
            for j in 0..b.resnets.len() {
                b.resnets[j].visit_modules(f);
                if let Some(a) = b.attentions.get_mut(j) {
                    a.visit_modules(f);
                }
            }
            b.upsampler.visit_modules(f);
        }
        self.conv_out.visit_modules(f);
    }
}
