//! diffusers' AutoencoderKL (the Stable Diffusion VAE), configured from its `vae/config.json`.
//! Images in `[-1, 1]` are encoded to a diagonal Gaussian over latents 8x smaller (for SD's
//! four blocks); latents are decoded back to images. Scaling latents by `scaling_factor` for the
//! U-Net is left to callers, as in diffusers.
use super::attention::Attention;
use super::layers::{Conv2d, GroupNorm};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use super::weights::{load_into, LoadOptions};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{nn, Tensor};

/// diffusers hard-codes this epsilon for every group norm of the VAE.
const NORM_EPS: f64 = 1e-6;

fn default_three() -> i64 {
    3
}
fn default_four() -> i64 {
    4
}
fn default_one() -> i64 {
    1
}
fn default_channels() -> Vec<i64> {
    vec![64]
}
fn default_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn default_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn default_act() -> String {
    "silu".into()
}
fn default_groups() -> i64 {
    32
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

/// The fields of a diffusers `vae/config.json`, with diffusers' defaults. `sample_size` only
/// matters to diffusers' tiling, so it is not read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_three")]
    pub in_channels: i64,
    #[serde(default = "default_three")]
    pub out_channels: i64,
    #[serde(default = "default_four")]
    pub latent_channels: i64,
    #[serde(default = "default_channels")]
    pub block_out_channels: Vec<i64>,
    #[serde(default = "default_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_one")]
    pub layers_per_block: i64,
    #[serde(default = "default_act")]
    pub act_fn: String,
    #[serde(default = "default_groups")]
    pub norm_num_groups: i64,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    /// Read only to refuse it: latents would have to be shifted as well as scaled.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Read only to refuse them: per-channel latent statistics replace the scaling factor.
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    /// The VAE overflows in float16 (SD v1.x's and SDXL's do): pipelines running in float16 keep
    /// it in float32, as diffusers' `needs_upcasting` does.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
}

impl VaeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        super::read_config(path, "VAE config", Self::validate)
    }

    /// Refuses configs for architectures this VAE does not implement, instead of building a
    /// silently different model.
    pub fn validate(&self) -> Result<()> {
        super::check_block_lists(
            self.block_out_channels.len(),
            self.down_block_types.len(),
            self.up_block_types.len(),
        )?;
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            bail!("unknown down block type `{t}` (supported: DownEncoderBlock2D)");
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            bail!("unknown up block type `{t}` (supported: UpDecoderBlock2D)");
        }
        if self.act_fn != "silu" {
            bail!("unsupported act_fn `{}` (supported: silu)", self.act_fn);
        }
        if let Some(shift) = self.shift_factor {
            bail!("shift_factor {shift} is not supported (only SD 1.x/2.x-style VAEs, scaled but not shifted)");
        }
        if self.latents_mean.is_some() || self.latents_std.is_some() {
            bail!("latents_mean/latents_std are not supported (only SD 1.x/2.x-style VAEs)");
        }
        if self.layers_per_block < 1 {
            bail!(
                "layers_per_block must be at least 1, got {}",
                self.layers_per_block
            );
        }
        for (name, value) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("norm_num_groups", self.norm_num_groups),
        ] {
            if value < 1 {
                bail!("{name} must be positive, got {value}");
            }
        }
        for &c in &self.block_out_channels {
            if c < 1 || c % self.norm_num_groups != 0 {
                bail!(
                    "block width {c} is not a positive multiple of norm_num_groups {}",
                    self.norm_num_groups
                );
            }
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            bail!(
                "scaling_factor must be positive, got {}",
                self.scaling_factor
            );
        }
        Ok(())
    }

    /// The precision a pipeline running in `kind` keeps this VAE in: f32 under float16 when the
    /// config forces the upcast (diffusers' `needs_upcasting`), else `kind`.
    pub fn pipeline_kind(&self, kind: tch::Kind) -> tch::Kind {
        if kind == tch::Kind::Half && self.force_upcast {
            tch::Kind::Float
        } else {
            kind
        }
    }

    fn resnet(&self, in_channels: i64, out_channels: i64) -> ResnetConfig {
        ResnetConfig {
            in_channels,
            out_channels,
            temb_channels: None,
            groups: self.norm_num_groups,
            eps: NORM_EPS,
            output_scale_factor: 1.0,
        }
    }
}

/// The mid block's single-head self-attention over all pixels, with its own group norm and a
/// residual connection (diffusers' `Attention` with `residual_connection=True`).
#[derive(Debug)]
pub struct SpatialSelfAttention {
    pub group_norm: GroupNorm,
    pub attention: Attention,
}

impl SpatialSelfAttention {
    pub fn new(vs: nn::Path, channels: i64, groups: i64) -> Self {
        Self {
            group_norm: GroupNorm::new(&vs / "group_norm", groups, channels, NORM_EPS),
            attention: Attention::new(vs, channels, channels, 1, channels, true),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("VAE attention input must be [b, c, h, w]");
        let tokens = self.group_norm.forward(x).flatten(2, 3).transpose(1, 2);
        let out = self.attention.forward(&tokens, None);
        out.transpose(1, 2).reshape([b, c, h, w]) + x
    }
}

/// UNetMidBlock2D without time embedding: resnet, (attention), resnet.
#[derive(Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attention: Option<SpatialSelfAttention>,
}

impl MidBlock {
    fn new(vs: nn::Path, cfg: &VaeConfig, channels: i64) -> Self {
        Self {
            resnets: (0..2)
                .map(|j| ResnetBlock2D::new(&vs / "resnets" / j, &cfg.resnet(channels, channels)))
                .collect(),
            attention: cfg.mid_block_add_attention.then(|| {
                SpatialSelfAttention::new(&vs / "attentions" / 0, channels, cfg.norm_num_groups)
            }),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.resnets[0].forward(x, None);
        if let Some(attention) = &self.attention {
            h = attention.forward(&h);
        }
        self.resnets[1].forward(&h, None)
    }
}

/// DownEncoderBlock2D: resnets, then (except in the last block) a stride-2 convolution.
#[derive(Debug)]
pub struct DownEncoderBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsampler: Option<Downsample2D>,
}

/// UpDecoderBlock2D: resnets, then (except in the last block) 2x upsampling.
#[derive(Debug)]
pub struct UpDecoderBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsampler: Option<Upsample2D>,
}

/// Maps images `[b, in_channels, H, W]` to the Gaussian's parameters `[b, 2 * latent_channels, h, w]`.
#[derive(Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownEncoderBlock>,
    pub mid_block: MidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Encoder {
    fn new(vs: nn::Path, cfg: &VaeConfig) -> Self {
        let channels = &cfg.block_out_channels;
        let n = channels.len();
        let mut down_blocks = Vec::with_capacity(n);
        let mut in_ch = channels[0];
        for (i, &out_ch) in channels.iter().enumerate() {
            let bvs = &vs / "down_blocks" / i;
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { in_ch } else { out_ch };
                    ResnetBlock2D::new(&bvs / "resnets" / j, &cfg.resnet(cin, out_ch))
                })
                .collect();
            // Padding 0: the VAE pads right/bottom itself before its stride-2 convolution.
            let downsampler =
                (i + 1 < n).then(|| Downsample2D::new(&bvs / "downsamplers" / 0, out_ch, 0));
            down_blocks.push(DownEncoderBlock {
                resnets,
                downsampler,
            });
            in_ch = out_ch;
        }
        let last = channels[n - 1];
        Self {
            conv_in: Conv2d::new(&vs / "conv_in", cfg.in_channels, channels[0], 3, 1, 1),
            down_blocks,
            mid_block: MidBlock::new(&vs / "mid_block", cfg, last),
            conv_norm_out: GroupNorm::new(
                &vs / "conv_norm_out",
                cfg.norm_num_groups,
                last,
                NORM_EPS,
            ),
            conv_out: Conv2d::new(&vs / "conv_out", last, 2 * cfg.latent_channels, 3, 1, 1),
        }
    }

    fn forward(&self, images: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(images);
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                h = resnet.forward(&h, None);
            }
            if let Some(down) = &block.downsampler {
                h = down.forward(&h);
            }
        }
        h = self.mid_block.forward(&h);
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h).silu())
    }
}

/// Maps latents `[b, latent_channels, h, w]` to images `[b, out_channels, H, W]`.
#[derive(Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpDecoderBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Decoder {
    fn new(vs: nn::Path, cfg: &VaeConfig) -> Self {
        // The decoder mirrors the encoder: widest block first, one extra resnet per block.
        let reversed: Vec<i64> = cfg.block_out_channels.iter().rev().copied().collect();
        let n = reversed.len();
        let mut up_blocks = Vec::with_capacity(n);
        let mut in_ch = reversed[0];
        for (i, &out_ch) in reversed.iter().enumerate() {
            let bvs = &vs / "up_blocks" / i;
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let cin = if j == 0 { in_ch } else { out_ch };
                    ResnetBlock2D::new(&bvs / "resnets" / j, &cfg.resnet(cin, out_ch))
                })
                .collect();
            let upsampler = (i + 1 < n).then(|| Upsample2D::new(&bvs / "upsamplers" / 0, out_ch));
            up_blocks.push(UpDecoderBlock { resnets, upsampler });
            in_ch = out_ch;
        }
        let first = cfg.block_out_channels[0];
        Self {
            conv_in: Conv2d::new(&vs / "conv_in", cfg.latent_channels, reversed[0], 3, 1, 1),
            mid_block: MidBlock::new(&vs / "mid_block", cfg, reversed[0]),
            up_blocks,
            conv_norm_out: GroupNorm::new(
                &vs / "conv_norm_out",
                cfg.norm_num_groups,
                first,
                NORM_EPS,
            ),
            conv_out: Conv2d::new(&vs / "conv_out", first, cfg.out_channels, 3, 1, 1),
        }
    }

    fn forward(&self, latents: &Tensor) -> Tensor {
        let mut h = self.mid_block.forward(&self.conv_in.forward(latents));
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                h = resnet.forward(&h, None);
            }
            if let Some(up) = &block.upsampler {
                h = up.forward(&h, None);
            }
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h).silu())
    }
}

/// The encoder's posterior: a Gaussian with diagonal covariance per latent element.
#[derive(Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to `[-30, 20]` as in diffusers, so `exp` stays finite.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits `[b, 2c, h, w]` encoder output into mean and log-variance along channels.
    pub fn from_moments(moments: &Tensor) -> Self {
        let halves = moments.chunk(2, 1);
        Self {
            mean: halves[0].shallow_clone(),
            logvar: halves[1].clamp(-30.0, 20.0),
        }
    }

    pub fn std(&self) -> Tensor {
        (&self.logvar * 0.5).exp()
    }

    /// `mean + std * noise`, with noise from torch's global RNG (as diffusers without a generator).
    pub fn sample(&self) -> Tensor {
        let noise = Tensor::randn(self.mean.size(), (self.mean.kind(), self.mean.device()));
        &self.mean + self.std() * noise
    }

    /// The most likely latent: the mean.
    pub fn mode(&self) -> Tensor {
        self.mean.shallow_clone()
    }
}

#[derive(Debug)]
pub struct AutoencoderKL {
    pub config: VaeConfig,
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    pub fn new(vs: nn::Path, cfg: &VaeConfig) -> Result<Self> {
        cfg.validate()?;
        let latent = cfg.latent_channels;
        Ok(Self {
            config: cfg.clone(),
            encoder: Encoder::new(&vs / "encoder", cfg),
            decoder: Decoder::new(&vs / "decoder", cfg),
            quant_conv: cfg
                .use_quant_conv
                .then(|| Conv2d::new(&vs / "quant_conv", 2 * latent, 2 * latent, 1, 1, 0)),
            post_quant_conv: cfg
                .use_post_quant_conv
                .then(|| Conv2d::new(&vs / "post_quant_conv", latent, latent, 1, 1, 0)),
        })
    }

    /// Encodes images `[b, in_channels, H, W]` with values in `[-1, 1]`.
    pub fn encode(&self, images: &Tensor) -> DiagonalGaussian {
        let moments = self.encoder.forward(images);
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&moments),
            None => moments,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// Decodes unscaled latents `[b, latent_channels, h, w]` to images (nominally in `[-1, 1]`).
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        let latents = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents),
            None => latents.shallow_clone(),
        };
        self.decoder.forward(&latents)
    }

    /// The posterior mean, scaled by `scaling_factor` into the U-Net's latent space.
    pub fn encode_scaled_mean(&self, images: &Tensor) -> Tensor {
        self.encode(images).mean * self.config.scaling_factor
    }

    /// Decodes latents from the U-Net's (scaled) latent space, in the VAE's own precision.
    pub fn decode_scaled(&self, latents: &Tensor) -> Tensor {
        let kind = self.decoder.conv_in.weight.kind();
        self.decode(&(latents / self.config.scaling_factor).to_kind(kind))
    }
}

/// Maps the attention names of checkpoints saved before diffusers 0.14 (`query`, `key`, `value`,
/// `proj_attn`; still what many Hub VAEs contain) to today's, as diffusers does on load.
pub fn legacy_attention_key(name: &str) -> String {
    const RENAMES: [(&str, &str); 4] = [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ];
    if name.contains(".mid_block.attentions.") {
        for (old, new) in RENAMES {
            if name.contains(old) {
                return name.replacen(old, new, 1);
            }
        }
    }
    name.to_string()
}

/// Loads VAE weights strictly (see [`load_into`]), accepting legacy attention names.
pub fn load_vae_weights(vs: &nn::VarStore, files: &[PathBuf]) -> Result<()> {
    load_into(
        vs,
        files,
        &LoadOptions {
            rename: Some(&legacy_attention_key),
            ..Default::default()
        },
    )
}
