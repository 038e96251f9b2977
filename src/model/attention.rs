//! diffusers' `Attention` (to_q/to_k/to_v/to_out.0), computed with torch's fused
//! scaled_dot_product_attention. Used by the U-Net's transformer blocks and the VAE's mid block.
use super::layers::Linear;
use tch::{nn, Tensor};

/// Something a tuning method attaches to an `Attention` to change its keys and values after
/// projection (prefix-tuning). Tensors are `[batch, seq, inner_dim]`.
pub trait KvExtension: Send + std::fmt::Debug {
    /// The keys and values the softmax runs over (prefix-tuning in its original form prepends
    /// learned vectors here).
    fn extend(&self, key: Tensor, value: Tensor) -> (Tensor, Tensor) {
        (key, value)
    }

    /// Extra keys and values `[seq, inner_dim]` attended with a softmax of their own; the result is
    /// added to the attention output before `to_out`. Unlike keys joined into the main softmax, a
    /// branch whose values are zero leaves the output unchanged.
    fn side_kv(&self) -> Option<(Tensor, Tensor)> {
        None
    }
}

#[derive(Debug)]
pub struct Attention {
    pub path: String,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: i64,
    pub head_dim: i64,
    pub kv_extension: Option<Box<dyn KvExtension>>,
}

impl Attention {
    /// `context_dim` is the width of what keys and values are computed from (the query's own width
    /// for self-attention). diffusers' U-Net attention has no q/k/v biases; the VAE's has them.
    pub fn new(
        vs: nn::Path,
        query_dim: i64,
        context_dim: i64,
        heads: i64,
        head_dim: i64,
        qkv_bias: bool,
    ) -> Self {
        let inner = heads * head_dim;
        Self {
            path: super::layers::path_name(&vs),
            to_q: Linear::new(&vs / "to_q", query_dim, inner, qkv_bias),
            to_k: Linear::new(&vs / "to_k", context_dim, inner, qkv_bias),
            to_v: Linear::new(&vs / "to_v", context_dim, inner, qkv_bias),
            to_out: Linear::new(&vs / "to_out" / 0, inner, query_dim, true),
            heads,
            head_dim,
            kv_extension: None,
        }
    }

    pub fn inner_dim(&self) -> i64 {
        self.heads * self.head_dim
    }

    /// `[batch, seq, dim] -> [batch, heads, seq, head_dim]`
    fn split_heads(&self, x: &Tensor) -> Tensor {
        let (b, s, _) = x
            .size3()
            .expect("attention input must be [batch, seq, dim]");
        x.view([b, s, self.heads, self.head_dim]).transpose(1, 2)
    }

    /// `x`: `[batch, seq, query_dim]`; `context`: `[batch, ctx_seq, context_dim]` for cross-attention.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Tensor {
        let (b, n, _) = x
            .size3()
            .expect("attention input must be [batch, seq, dim]");
        let context = context.unwrap_or(x);
        let query = self.to_q.forward(x);
        let mut key = self.to_k.forward(context);
        let mut value = self.to_v.forward(context);
        if let Some(ext) = &self.kv_extension {
            (key, value) = ext.extend(key, value);
        }
        let query = self.split_heads(&query);
        let attend = |key: &Tensor, value: &Tensor| {
            Tensor::scaled_dot_product_attention::<Tensor>(
                &query,
                &self.split_heads(key),
                &self.split_heads(value),
                None,
                0.0,
                false,
                (self.head_dim as f64).powf(-0.5),
                false,
            )
        };
        let out = attend(&key, &value);
        // Not `+=`: fused attention kernels keep their output for the backward pass.
        let out = match self.kv_extension.as_ref().and_then(|e| e.side_kv()) {
            Some((side_key, side_value)) => {
                let batched = |t: Tensor| t.to_kind(query.kind()).unsqueeze(0).expand([b, -1, -1], false);
                out + attend(&batched(side_key), &batched(side_value))
            }
            None => out,
        };
        let out = out.transpose(1, 2).reshape([b, n, self.inner_dim()]);
        self.to_out.forward(&out)
    }
}
