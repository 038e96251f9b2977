//! LoKr (LyCORIS; Edalati et al. 2022, KronA): the weight update is a Kronecker product,
//! `dW = (alpha / r) W1 (x) W2`, with `W1` `[a, c]` and `W2` `[b, d]` for a layer of `a b` outputs
//! and `c d` inputs (each split by LyCORIS' `factorization`, as near the square root as
//! `decompose_factor` allows). Computed as HF peft 0.21.2 computes it (`LoKrConfig`: `r`,
//! `alpha`, `rank_pattern`, `alpha_pattern`, `decompose_both`, `decompose_factor`,
//! `use_effective_conv2d`, default init), so peft's files load unchanged:
//! - `W2` is full when r >= max(b, d) / 2, else `W2a W2b` of rank r (for convolutions with
//!   `effective_conv2d`, the Tucker form of LoHa; else `[b, d*k*k]`);
//! - `W1` is full unless `decompose_both` and r < max(a, c) / 2, then `W1a W1b`;
//! - `W1` (or `W1a`) starts at zero, the rest Kaiming-uniform: the model starts as the base;
//! - the scale is alpha / r even when both factors are full (peft's rule; LyCORIS files store
//!   such layers with the scale folded in, see [`super::lycoris`]).
//!
//! peft's rank and module dropouts are not offered.
//!
//! Count on SD v1.4, study placement, r = 8: 34,448 (to_q of width 320: `W1` 16x16 plus `W2` as
//! 20x8 and 8x20 factors, 576).
use super::layer_update::{
    self, kaiming_uniform, plan_each, LayerPlan, ParamSpec, Planned, Update, WeightUpdate,
};
use super::loha::tucker_weight;
use super::targets::{pattern_value, select_patterned, validate_ranked, LayerTarget};
use super::{Registered, TuningMethod};
use crate::model::unet::UNet2DConditionModel;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::{nn, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Lokr {
    /// Rank of the factors that are decomposed. Default 8 (peft's).
    pub rank: i64,
    /// The update is scaled by `alpha / rank`. Default 8 (peft's).
    pub alpha: f64,
    /// Globs over the diffusers paths of the Linear and Conv2d layers to adapt. Default: the
    /// study's placement, `*.attn2.to_q` and `*.attn2.to_k`.
    pub targets: Vec<String>,
    /// Per-layer rank overrides, glob -> rank.
    pub rank_pattern: BTreeMap<String, i64>,
    /// Per-layer alpha overrides, glob -> alpha.
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Decompose the left factor `W1` too (when the rank is small enough). Default false.
    pub decompose_both: bool,
    /// The size `factorization` aims at for one factor of each dimension; unset: near the
    /// square root (peft's -1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decompose_factor: Option<i64>,
    /// The Tucker form for `W2` of convolutions with kernels above 1x1. Default false.
    pub effective_conv2d: bool,
}

impl Default for Lokr {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 8.0,
            targets: vec!["*.attn2.to_q".into(), "*.attn2.to_k".into()],
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            decompose_both: false,
            decompose_factor: None,
            effective_conv2d: false,
        }
    }
}

/// LyCORIS' (and peft's) `factorization`: `dimension` as `(m, n)`, `m <= n`, `m n = dimension`;
/// `m = factor` when it divides, else the divisor pair nearest the square root with `m <= factor`.
pub fn factorization(dimension: i64, factor: Option<i64>) -> (i64, i64) {
    if let Some(f) = factor.filter(|&f| f > 0 && dimension % f == 0) {
        return (f, dimension / f);
    }
    let factor = factor.unwrap_or(dimension);
    let (mut m, mut n) = (1, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while dimension % new_m != 0 {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > factor {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    (m.min(n), m.max(n))
}

/// One Kronecker factor's parametrisation.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Factor {
    Full,
    LowRank,
    Tucker,
}

#[derive(Debug)]
struct LokrLayer {
    path: String,
    /// Output split `(a, b)`, input split `(c, d)`.
    out_split: (i64, i64),
    in_split: (i64, i64),
    kernel: Option<i64>,
    rank: i64,
    scale: f64,
    w1: Factor,
    w2: Factor,
}

impl LayerPlan for LokrLayer {
    fn params(&self) -> Vec<ParamSpec> {
        let ((a, b), (c, d), r) = (self.out_split, self.in_split, self.rank);
        let spec = |part: &str, shape: Vec<i64>, zero: bool| ParamSpec {
            name: format!("{}.{part}", self.path),
            init: if zero {
                nn::Init::Const(0.0)
            } else {
                kaiming_uniform(&shape)
            },
            shape,
        };
        let mut specs = match self.w1 {
            Factor::Full => vec![spec("lokr_w1", vec![a, c], true)],
            _ => vec![
                spec("lokr_w1_a", vec![a, r], true),
                spec("lokr_w1_b", vec![r, c], false),
            ],
        };
        let k = self.kernel;
        specs.extend(match (self.w2, k) {
            (Factor::Full, None) => vec![spec("lokr_w2", vec![b, d], false)],
            (Factor::Full, Some(k)) => vec![spec("lokr_w2", vec![b, d, k, k], false)],
            (Factor::LowRank, _) => vec![
                spec("lokr_w2_a", vec![b, r], false),
                spec("lokr_w2_b", vec![r, d * k.unwrap_or(1).pow(2)], false),
            ],
            (Factor::Tucker, k) => {
                let k = k.expect("the Tucker form is for convolutions");
                vec![
                    spec("lokr_w2_a", vec![r, b], false),
                    spec("lokr_w2_b", vec![r, d], false),
                    spec("lokr_t2", vec![r, r, k, k], false),
                ]
            }
        });
        specs
    }

    fn update(&self, tensors: Vec<Tensor>) -> Box<dyn WeightUpdate> {
        let mut it = tensors.into_iter();
        let mut next = || it.next().expect("a LoKr layer's tensors");
        let w1 = match self.w1 {
            Factor::Full => Parts::Full(next()),
            _ => Parts::LowRank(next(), next()),
        };
        let w2 = match self.w2 {
            Factor::Full => Parts::Full(next()),
            Factor::LowRank => Parts::LowRank(next(), next()),
            Factor::Tucker => {
                let (a, b) = (next(), next());
                Parts::Tucker(a, b, next())
            }
        };
        Box::new(Kronecker {
            w1,
            w2,
            scale: self.scale,
        })
    }
}

#[derive(Debug)]
enum Parts {
    Full(Tensor),
    LowRank(Tensor, Tensor),
    /// `a` `[r, b]`, `b` `[r, d]`, `t` `[r, r, k, k]`.
    Tucker(Tensor, Tensor, Tensor),
}

impl Parts {
    fn matrix(&self) -> Tensor {
        match self {
            Parts::Full(w) => w.shallow_clone(),
            Parts::LowRank(a, b) => a.matmul(b),
            Parts::Tucker(a, b, t) => tucker_weight(t, a, b),
        }
    }
}

#[derive(Debug)]
struct Kronecker {
    w1: Parts,
    w2: Parts,
    scale: f64,
}

impl WeightUpdate for Kronecker {
    fn update(&self, base_weight: &Tensor) -> Update {
        let (w1, w2) = (self.w1.matrix(), self.w2.matrix());
        let w1 = if w2.dim() == 4 {
            w1.unsqueeze(2).unsqueeze(2)
        } else {
            w1
        };
        Update::Add((w1.kron(&w2.contiguous()) * self.scale).reshape(base_weight.size()))
    }
}

impl Lokr {
    /// The rank of the layer at `path`.
    pub fn rank_for(&self, path: &str) -> Result<i64> {
        pattern_value(&self.rank_pattern, path, self.rank, "rank_pattern")
    }

    /// The alpha of the layer at `path`.
    pub fn alpha_for(&self, path: &str) -> Result<f64> {
        pattern_value(&self.alpha_pattern, path, self.alpha, "alpha_pattern")
    }

    fn plan(&self, target: &LayerTarget) -> Result<LokrLayer> {
        let rank = self.rank_for(&target.path)?;
        let alpha = self.alpha_for(&target.path)?;
        let out_split = factorization(target.outputs(), self.decompose_factor);
        let in_split = factorization(target.inputs(), self.decompose_factor);
        // peft compares the integer rank with a true division.
        let small = |x: i64, y: i64| (rank as f64) < x.max(y) as f64 / 2.0;
        let w1 = if self.decompose_both && small(out_split.0, in_split.0) {
            Factor::LowRank
        } else {
            Factor::Full
        };
        let w2 = match (small(out_split.1, in_split.1), target.is_conv()) {
            (false, _) => Factor::Full,
            (true, true) if self.effective_conv2d && target.kernel() > 1 => Factor::Tucker,
            (true, _) => Factor::LowRank,
        };
        Ok(LokrLayer {
            path: target.path.clone(),
            out_split,
            in_split,
            kernel: target.is_conv().then(|| target.kernel()),
            rank,
            scale: alpha / rank as f64,
            w1,
            w2,
        })
    }

    fn planned(&self, unet: &mut UNet2DConditionModel) -> Result<Vec<Planned>> {
        let patterns = self.rank_pattern.keys().chain(self.alpha_pattern.keys());
        let layers = select_patterned(unet, &self.targets, patterns, "LoKr")?;
        plan_each(layers, |t| self.plan(t))
    }
}

impl Registered for Lokr {
    const NAME: &'static str = "lokr";
    const LABEL: &'static str = "LoKr";
}

impl TuningMethod for Lokr {
    fn validate(&self) -> Result<()> {
        validate_ranked(
            &self.targets,
            std::iter::once(("rank", self.rank))
                .chain(self.rank_pattern.values().map(|&r| ("rank_pattern", r))),
            std::iter::once(self.alpha).chain(self.alpha_pattern.values().copied()),
        )?;
        if let Some(f) = self.decompose_factor.filter(|&f| f < 1) {
            bail!("decompose_factor {f} must be at least 1 (leave it unset for the square root)");
        }
        Ok(())
    }

    fn apply(
        &self,
        unet: &mut UNet2DConditionModel,
        _unet_vs: &nn::VarStore,
        params: nn::Path,
        init: &super::InitSeed,
    ) -> Result<Vec<(String, Tensor)>> {
        let planned = self.planned(unet)?;
        layer_update::attach(unet, planned, &params, init)
    }

    fn merge(
        &self,
        unet: &mut UNet2DConditionModel,
        _unet_vs: &nn::VarStore,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        layer_update::merge(&self.planned(unet)?, tensors, "the LoKr adapter")
    }
}

#[cfg(test)]
mod tests {
    use super::factorization;

    #[test]
    fn factorization_matches_peft_s_examples() {
        // peft's docstring: 256 -> (16, 16), 128 -> (8, 16), 127 -> (1, 127), 128 with 4 -> (4, 32).
        assert_eq!(factorization(256, None), (16, 16));
        assert_eq!(factorization(128, None), (8, 16));
        assert_eq!(factorization(127, None), (1, 127));
        assert_eq!(factorization(128, Some(4)), (4, 32));
        assert_eq!(factorization(320, None), (16, 20));
        assert_eq!(factorization(768, None), (24, 32));
    }
}
