//! transformers' CLIPTextModel (SD v1.x's text encoder) and CLIPTextModelWithProjection (SDXL's
//! second), configured from their `config.json`, with the parameter names of SD checkpoints
//! (`text_model.…`, `text_projection`).
use super::layers::{LayerNorm, Linear};
use super::visit::{ModuleMut, VisitModules};
use super::weights::{self, LoadOptions};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{nn, Tensor};

/// Tensors that SD checkpoints may carry but the model does not need: older transformers saved the
/// `position_ids` buffer.
pub const IGNORED_CHECKPOINT_TENSORS: &[&str] = &["text_model.embeddings.position_ids"];

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

/// The MLP activations CLIP text encoders use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`, OpenAI CLIP's approximation (SD v1.x).
    QuickGelu,
    /// The exact, erf-based GELU (OpenCLIP models).
    Gelu,
}

impl Activation {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            other => bail!(
                "unsupported hidden_act `{other}` (difftune implements `quick_gelu` and `gelu`)"
            ),
        }
    }

    pub fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Self::QuickGelu => x * (x * 1.702).sigmoid(),
            Self::Gelu => x.gelu("none"),
        }
    }
}

/// The fields of a transformers CLIP text `config.json` that shape the model; defaults are
/// transformers' own.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    #[serde(default)]
    pub eos_token_id: Option<i64>,
    /// The width of `text_projection` (CLIPTextModelWithProjection).
    #[serde(default)]
    pub projection_dim: Option<i64>,
}

/// transformers' CLIPTextConfig default `eos_token_id`, the last id of CLIP's vocabulary.
const DEFAULT_EOS_TOKEN_ID: i64 = 49_407;
/// The `eos_token_id` configs written before transformers PR #24773 carry (SD's and SDXL's): the
/// pooled position is then that of the largest id, which is the end-of-text token in CLIP's
/// vocabulary.
const LEGACY_EOS_TOKEN_ID: i64 = 2;

impl ClipTextConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = crate::util::fs::read_json(path).context("CLIP text config")?;
        config
            .validate()
            .with_context(|| format!("CLIP text config {}", path.display()))?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        Activation::parse(&self.hidden_act)?;
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, value)) = sizes.iter().find(|(_, v)| *v <= 0) {
            bail!("`{name}` must be positive, got {value}");
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            bail!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        Ok(())
    }

    pub fn activation(&self) -> Result<Activation> {
        Activation::parse(&self.hidden_act)
    }
}

#[derive(Debug)]
pub struct ClipTextEmbeddings {
    /// `[vocab_size, hidden]`
    pub token_embedding: Tensor,
    /// `[max_position_embeddings, hidden]`
    pub position_embedding: Tensor,
}

impl ClipTextEmbeddings {
    fn new(vs: nn::Path, c: &ClipTextConfig) -> Self {
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        Self {
            token_embedding: (&vs / "token_embedding").var(
                "weight",
                &[c.vocab_size, c.hidden_size],
                init,
            ),
            position_embedding: (&vs / "position_embedding").var(
                "weight",
                &[c.max_position_embeddings, c.hidden_size],
                init,
            ),
        }
    }

    /// `[batch, seq]` ids -> `[batch, seq, hidden]`; positions count from 0.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        let seq = ids.size()[1];
        let tokens = Tensor::embedding(&self.token_embedding, ids, -1, false, false);
        tokens + self.position_embedding.narrow(0, 0, seq)
    }
}

/// Causal multi-head self-attention with biased q/k/v/out projections.
#[derive(Debug)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub heads: i64,
    pub head_dim: i64,
}

impl ClipAttention {
    fn new(vs: nn::Path, c: &ClipTextConfig) -> Self {
        let dim = c.hidden_size;
        Self {
            q_proj: Linear::new(&vs / "q_proj", dim, dim, true),
            k_proj: Linear::new(&vs / "k_proj", dim, dim, true),
            v_proj: Linear::new(&vs / "v_proj", dim, dim, true),
            out_proj: Linear::new(&vs / "out_proj", dim, dim, true),
            heads: c.num_attention_heads,
            head_dim: dim / c.num_attention_heads,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, dim) = x
            .size3()
            .expect("CLIP attention input must be [batch, seq, hidden]");
        let split_heads = |t: Tensor| t.view([b, n, self.heads, self.head_dim]).transpose(1, 2);
        let out = Tensor::scaled_dot_product_attention::<Tensor>(
            &split_heads(self.q_proj.forward(x)),
            &split_heads(self.k_proj.forward(x)),
            &split_heads(self.v_proj.forward(x)),
            None,
            0.0,
            true,
            (self.head_dim as f64).powf(-0.5),
            false,
        );
        self.out_proj
            .forward(&out.transpose(1, 2).reshape([b, n, dim]))
    }
}

#[derive(Debug)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub activation: Activation,
}

impl ClipMlp {
    fn new(vs: nn::Path, c: &ClipTextConfig, activation: Activation) -> Self {
        Self {
            fc1: Linear::new(&vs / "fc1", c.hidden_size, c.intermediate_size, true),
            fc2: Linear::new(&vs / "fc2", c.intermediate_size, c.hidden_size, true),
            activation,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2
            .forward(&self.activation.forward(&self.fc1.forward(x)))
    }
}

/// Pre-norm transformer layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn new(vs: nn::Path, c: &ClipTextConfig, activation: Activation) -> Self {
        Self {
            self_attn: ClipAttention::new(&vs / "self_attn", c),
            layer_norm1: LayerNorm::new(&vs / "layer_norm1", c.hidden_size, c.layer_norm_eps),
            mlp: ClipMlp::new(&vs / "mlp", c, activation),
            layer_norm2: LayerNorm::new(&vs / "layer_norm2", c.hidden_size, c.layer_norm_eps),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.self_attn.forward(&self.layer_norm1.forward(x));
        &x + self.mlp.forward(&self.layer_norm2.forward(&x))
    }
}

#[derive(Debug)]
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    pub embeddings: ClipTextEmbeddings,
    pub layers: Vec<ClipEncoderLayer>,
    pub final_layer_norm: LayerNorm,
    /// CLIPTextModelWithProjection's `text_projection` (no bias), applied to the pooled output.
    pub text_projection: Option<Linear>,
}

impl ClipTextModel {
    /// Creates the variables under `vs / "text_model"`; pass the VarStore's root to get the
    /// checkpoint names.
    pub fn new(vs: nn::Path, cfg: &ClipTextConfig) -> Result<Self> {
        Self::build(&vs, cfg)
    }

    fn build(vs: &nn::Path, cfg: &ClipTextConfig) -> Result<Self> {
        cfg.validate()?;
        let activation = cfg.activation()?;
        let vs = vs / "text_model";
        let layers_vs = &vs / "encoder" / "layers";
        Ok(Self {
            config: cfg.clone(),
            embeddings: ClipTextEmbeddings::new(&vs / "embeddings", cfg),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| ClipEncoderLayer::new(&layers_vs / i, cfg, activation))
                .collect(),
            final_layer_norm: LayerNorm::new(
                &vs / "final_layer_norm",
                cfg.hidden_size,
                cfg.layer_norm_eps,
            ),
            text_projection: None,
        })
    }

    /// transformers' CLIPTextModelWithProjection: the text model and `text_projection`
    /// (`hidden_size` -> `projection_dim`, which the config must give), on the root of `vs`.
    pub fn new_with_projection(vs: nn::Path, cfg: &ClipTextConfig) -> Result<Self> {
        let Some(dim) = cfg.projection_dim.filter(|&d| d > 0) else {
            bail!(
                "a CLIP text model with projection needs a positive `projection_dim` in its config"
            );
        };
        let mut model = Self::build(&vs, cfg)?;
        model.text_projection = Some(Linear::new(
            &vs / "text_projection",
            cfg.hidden_size,
            dim,
            false,
        ));
        Ok(model)
    }

    /// Loads SD text-encoder safetensors into `vs` (built with [`ClipTextModel::new`] on its root),
    /// strictly except for [`IGNORED_CHECKPOINT_TENSORS`].
    pub fn load_weights(vs: &nn::VarStore, files: &[PathBuf]) -> Result<()> {
        weights::load_into(
            vs,
            files,
            &LoadOptions {
                ignore_extra: IGNORED_CHECKPOINT_TENSORS,
                // transformers 5's save_pretrained drops the `text_model.` prefix that SD
                // checkpoints on the hub carry; accept both.
                rename: Some(&|name: &str| {
                    if name.starts_with("text_model.") || name.starts_with("text_projection.") {
                        name.to_string()
                    } else {
                        format!("text_model.{name}")
                    }
                }),
            },
        )
    }

    /// transformers' `hidden_states[num_layers]`: the embeddings followed by the first `num_layers`
    /// encoder layers, without the final layer norm.
    pub fn hidden_states_after(&self, ids: &Tensor, num_layers: usize) -> Result<Tensor> {
        if num_layers > self.layers.len() {
            bail!(
                "the CLIP text encoder has {} layers, asked for the output of {num_layers}",
                self.layers.len()
            );
        }
        let (_, seq) = ids.size2().context("CLIP input ids must be [batch, seq]")?;
        if seq > self.config.max_position_embeddings {
            bail!(
                "{seq} tokens exceed the text encoder's {} positions",
                self.config.max_position_embeddings
            );
        }
        let x = self.embeddings.forward(ids);
        Ok(self.layers[..num_layers]
            .iter()
            .fold(x, |x, layer| layer.forward(&x)))
    }

    /// The prompt embedding with diffusers' `clip_skip`: the final layer norm applied to the output
    /// of the last-but-`clip_skip` layer (0: transformers' `last_hidden_state`).
    pub fn forward_clip_skip(&self, ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let Some(num_layers) = self.layers.len().checked_sub(clip_skip) else {
            bail!(
                "clip_skip {clip_skip} exceeds the text encoder's {} layers",
                self.layers.len()
            );
        };
        Ok(self
            .final_layer_norm
            .forward(&self.hidden_states_after(ids, num_layers)?))
    }

    /// transformers' `hidden_states[num_layers]` and the pooled output of one pass: the final
    /// layer norm's output at each row's end-of-text position, through `text_projection` when
    /// the model has one (CLIPTextModelWithProjection's `text_embeds`).
    pub fn hidden_and_pooled(&self, ids: &Tensor, num_layers: usize) -> Result<(Tensor, Tensor)> {
        let hidden = self.hidden_states_after(ids, num_layers)?;
        let last = self.layers[num_layers..]
            .iter()
            .fold(hidden.shallow_clone(), |x, layer| layer.forward(&x));
        let last = self.final_layer_norm.forward(&last);
        let rows = Tensor::arange(ids.size()[0], (tch::Kind::Int64, last.device()));
        let pooled = last.index(&[Some(rows), Some(self.pooled_positions(ids))]);
        let pooled = match &self.text_projection {
            Some(projection) => projection.forward(&pooled),
            None => pooled,
        };
        Ok((hidden, pooled))
    }

    /// The position of each row's end-of-text token, as transformers finds it: the largest id
    /// under the legacy `eos_token_id` 2, else the first `eos_token_id`.
    fn pooled_positions(&self, ids: &Tensor) -> Tensor {
        let eos = self.config.eos_token_id.unwrap_or(DEFAULT_EOS_TOKEN_ID);
        let ids = ids.to_device(self.final_layer_norm.weight.device());
        if eos == LEGACY_EOS_TOKEN_ID {
            ids.argmax(-1, false)
        } else {
            ids.eq(eos).to_kind(tch::Kind::Int).argmax(-1, false)
        }
    }

    /// `[batch, seq]` int64 ids (seq <= max_position_embeddings, as the tokenizer makes them) ->
    /// `last_hidden_state` `[batch, seq, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        self.forward_clip_skip(ids, 0)
            .expect("CLIP input ids must be [batch, seq <= max_position_embeddings]")
    }
}

impl VisitModules for ClipTextModel {
    fn visit_modules(&mut self, f: &mut dyn FnMut(ModuleMut<'_>)) {
        for layer in &mut self.layers {
            let attn = &mut layer.self_attn;
            for linear in [
                &mut attn.q_proj,
                &mut attn.k_proj,
                &mut attn.v_proj,
                &mut attn.out_proj,
            ] {
                linear.visit_modules(f);
            }
            layer.mlp.fc1.visit_modules(f);
            layer.mlp.fc2.visit_modules(f);
        }
        self.text_projection.visit_modules(f);
    }
}
