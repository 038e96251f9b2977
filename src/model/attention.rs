//! diffusers' `Attention` (to_q/to_k/to_v/to_out.0), computed with torch's fused
//! scaled_dot_product_attention. Used by the U-Net's transformer blocks and the VAE's mid block.
use super::layers::Linear;
use tch::{nn, Tensor};

/// Something a tuning method attaches to an `Attention` to change its keys and values after
/// projection (prefix-tuning prepends learned vectors). Tensors are `[batch, seq, inner_dim]`.
pub trait KvExtension: Send + std::fmt::Debug {
    fn extend(&self, key: Tensor, value: Tensor) -> (Tensor, Tensor);
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
        let out = Tensor::scaled_dot_product_attention::<Tensor>(
            &self.split_heads(&query),
            &self.split_heads(&key),
            &self.split_heads(&value),
            None,
            0.0,
            false,
            (self.head_dim as f64).powf(-0.5),
            false,
        );
        let out = out.transpose(1, 2).reshape([b, n, self.inner_dim()]);
        self.to_out.forward(&out)
    }
}
