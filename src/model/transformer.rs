//! diffusers' Transformer2DModel and BasicTransformerBlock (self-attention, cross-attention, GEGLU
//! feed-forward), with the block's "sites" where tuning methods can attach side modules.
use super::attention::Attention;
use super::checkpoint::Scope;
use super::layers::{Conv2d, GroupNorm, LayerNorm, Linear};
use tch::{nn, Tensor};

/// The points in a transformer block where a side module reads its input or adds its output
/// (the design space of Xiang et al. 2023). `*In` is the (normalised) input of a sub-layer,
/// `*Out` the sub-layer's output before the residual add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockSite {
    Attn1In,
    Attn1Out,
    Attn2In,
    Attn2Out,
    FfIn,
    FfOut,
}

impl BlockSite {
    pub const ALL: [BlockSite; 6] = [
        BlockSite::Attn1In,
        BlockSite::Attn1Out,
        BlockSite::Attn2In,
        BlockSite::Attn2Out,
        BlockSite::FfIn,
        BlockSite::FfOut,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BlockSite::Attn1In => "attn1_in",
            BlockSite::Attn1Out => "attn1_out",
            BlockSite::Attn2In => "attn2_in",
            BlockSite::Attn2Out => "attn2_out",
            BlockSite::FfIn => "ff_in",
            BlockSite::FfOut => "ff_out",
        }
    }
}

/// A side module attached to a transformer block: it reads the stream at `input_site` and its output
/// is added to the stream at `output_site` (which must not come before the input site).
pub trait BlockExtension: Send + std::fmt::Debug {
    fn input_site(&self) -> BlockSite;
    fn output_site(&self) -> BlockSite;
    fn forward(&self, x: &Tensor) -> Tensor;
}

/// GEGLU feed-forward: `net.0.proj` doubles the width into value and gate, `net.2` projects back.
#[derive(Debug)]
pub struct FeedForward {
    pub proj_in: Linear,
    pub proj_out: Linear,
}

impl FeedForward {
    pub fn new(vs: nn::Path, dim: i64, mult: i64) -> Self {
        let inner = dim * mult;
        Self {
            proj_in: Linear::new(&vs / "net" / 0 / "proj", dim, inner * 2, true),
            proj_out: Linear::new(&vs / "net" / 2, inner, dim, true),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.proj_in.forward(x).chunk(2, -1);
        self.proj_out.forward(&(&h[0] * h[1].gelu("none")))
    }
}

#[derive(Debug)]
pub struct BasicTransformerBlock {
    pub path: String,
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
    pub extensions: Vec<Box<dyn BlockExtension>>,
}

impl BasicTransformerBlock {
    pub fn new(vs: nn::Path, dim: i64, heads: i64, head_dim: i64, context_dim: i64) -> Self {
        Self {
            path: super::layers::path_name(&vs),
            norm1: LayerNorm::new(&vs / "norm1", dim, 1e-5),
            attn1: Attention::new(&vs / "attn1", dim, dim, heads, head_dim, false),
            norm2: LayerNorm::new(&vs / "norm2", dim, 1e-5),
            attn2: Attention::new(&vs / "attn2", dim, context_dim, heads, head_dim, false),
            norm3: LayerNorm::new(&vs / "norm3", dim, 1e-5),
            ff: FeedForward::new(&vs / "ff", dim, 4),
            extensions: Vec::new(),
        }
    }

    pub fn dim(&self) -> i64 {
        self.norm1.weight.size()[0]
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        if self.extensions.is_empty() {
            // Each sum puts the branch first, as diffusers does: a sum takes its first operand's
            // layout, and the block's input is a transposed view of the image, which would make
            // every later layer norm copy its input (here and in the path below).
            let x = self.attn1.forward(&self.norm1.forward(x), None) + x;
            let x = self.attn2.forward(&self.norm2.forward(&x), Some(context)) + &x;
            return self.ff.forward(&self.norm3.forward(&x)) + &x;
        }
        let mut taps: Vec<Option<Tensor>> = (0..self.extensions.len()).map(|_| None).collect();
        let mut site = |s: BlockSite, mut t: Tensor| -> Tensor {
            for (ext, tap) in self.extensions.iter().zip(taps.iter_mut()) {
                if ext.input_site() == s {
                    *tap = Some(t.shallow_clone());
                }
                if ext.output_site() == s {
                    let input = tap
                        .take()
                        .expect("extension output site precedes its input site");
                    // Not `+=`: when the input site is this site, `t` is also the extension's
                    // input, which autograd saved for the backward pass.
                    #[allow(clippy::assign_op_pattern)]
                    {
                        t = t + ext.forward(&input);
                    }
                }
            }
            t
        };
        let h = site(BlockSite::Attn1In, self.norm1.forward(x));
        let x = site(BlockSite::Attn1Out, self.attn1.forward(&h, None)) + x;
        let h = site(BlockSite::Attn2In, self.norm2.forward(&x));
        let x = site(BlockSite::Attn2Out, self.attn2.forward(&h, Some(context))) + &x;
        let h = site(BlockSite::FfIn, self.norm3.forward(&x));
        site(BlockSite::FfOut, self.ff.forward(&h)) + &x
    }
}

/// Input and output projection around the blocks: 1x1 convolutions (SD 1.x) or linears (SD 2.x).
#[derive(Debug)]
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

#[derive(Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

pub struct TransformerConfig {
    pub channels: i64,
    pub heads: i64,
    pub head_dim: i64,
    pub layers: i64,
    pub context_dim: i64,
    pub groups: i64,
    pub linear_projection: bool,
}

impl Transformer2DModel {
    pub fn new(vs: nn::Path, c: &TransformerConfig) -> Self {
        let inner = c.heads * c.head_dim;
        let projection = |name: &str, cin: i64, cout: i64| {
            if c.linear_projection {
                Projection::Linear(Linear::new(&vs / name, cin, cout, true))
            } else {
                Projection::Conv(Conv2d::new(&vs / name, cin, cout, 1, 1, 0))
            }
        };
        Self {
            norm: GroupNorm::new(&vs / "norm", c.groups, c.channels, 1e-6),
            proj_in: projection("proj_in", c.channels, inner),
            transformer_blocks: (0..c.layers)
                .map(|i| {
                    BasicTransformerBlock::new(
                        &vs / "transformer_blocks" / i,
                        inner,
                        c.heads,
                        c.head_dim,
                        c.context_dim,
                    )
                })
                .collect(),
            proj_out: projection("proj_out", inner, c.channels),
        }
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        self.forward_in(None, x, context)
    }

    /// [`Transformer2DModel::forward`] with each transformer block checkpointed in `scope` when
    /// there is one.
    pub fn forward_in<'env>(
        &'env self,
        scope: Option<&Scope<'_, 'env>>,
        x: &Tensor,
        context: &Tensor,
    ) -> Tensor {
        let (b, _, h, w) = x.size4().expect("transformer input must be [b, c, h, w]");
        let normed = self.norm.forward(x);
        let to_tokens = |t: Tensor| {
            let c = t.size()[1];
            t.permute([0, 2, 3, 1]).reshape([b, h * w, c])
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(&normed)),
            Projection::Linear(lin) => lin.forward(&to_tokens(normed)),
        };
        for block in &self.transformer_blocks {
            tokens = match scope {
                Some(scope) => {
                    scope.checkpoint(&[&tokens, context], |xs| block.forward(&xs[0], &xs[1]))
                }
                None => block.forward(&tokens, context),
            };
        }
        let to_image = |t: Tensor| {
            let c = t.size()[2];
            t.reshape([b, h, w, c]).permute([0, 3, 1, 2])
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(tokens).contiguous()),
            Projection::Linear(lin) => to_image(lin.forward(&tokens)),
        };
        out + x
    }
}
