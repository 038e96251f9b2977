//! LoHa (LyCORIS; Hyeon-Woo et al. 2022, FedPara): the weight update is the Hadamard product of two
//! low-rank products, `dW = (alpha / r) (W1a W1b) * (W2a W2b)`, so rank r reaches an update of rank
//! up to r^2 with twice LoRA's parameters. Computed as HF peft 0.21.2 computes it (`LoHaConfig`:
//! `r`, `alpha`, `rank_pattern`, `alpha_pattern`, `use_effective_conv2d`), with its initialisation
//! (W1a, W1b, W2a Kaiming-uniform, W2b zero: the model starts as the base), so peft's files load
//! unchanged. Convolutions use the flattened `[out, in*k*k]` weight, or with `effective_conv2d`
//! (k > 1 only) FedPara's Tucker form `dW = (t1 x W1a x W1b) * (t2 x W2a x W2b)`. peft's
//! rank and module dropouts are not offered (training-time noise the study does not use).
//!
//! Count on SD v1.4, study placement: 2 r (in + out) per layer, 99,456 r (795,648 at the
//! default r = 8).
use super::layer_update::{
    self, kaiming_uniform, plan_each, LayerPlan, ParamSpec, Planned, Update, WeightUpdate,
};
use super::targets::{pattern_value, select_patterned, validate_ranked, LayerTarget};
use super::{Registered, TuningMethod};
use crate::model::unet::UNet2DConditionModel;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::{nn, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Loha {
    /// Rank of each of the two products. Default 8 (peft's).
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
    /// FedPara's Tucker form for convolutions with kernels above 1x1. Default false.
    pub effective_conv2d: bool,
}

impl Default for Loha {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 8.0,
            targets: vec!["*.attn2.to_q".into(), "*.attn2.to_k".into()],
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            effective_conv2d: false,
        }
    }
}

/// The layer at `path`'s tensor called `part` (`hada_w1_a`, ...), as peft names it.
pub fn loha_name(path: &str, part: &str) -> String {
    format!("{path}.{part}")
}

/// The tensors of one LoHa layer, in [`LayerPlan::params`] order.
pub const LOHA_PARTS: [&str; 6] = [
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
];

#[derive(Debug)]
struct LohaLayer {
    path: String,
    shape: Vec<i64>,
    rank: i64,
    scale: f64,
    /// The Tucker form (convolutions above 1x1 with `effective_conv2d`).
    tucker: bool,
}

impl LayerPlan for LohaLayer {
    fn params(&self) -> Vec<ParamSpec> {
        let (r, out) = (self.rank, self.shape[0]);
        let shapes: Vec<Vec<i64>> = if self.tucker {
            let (inputs, k) = (self.shape[1], self.shape[2]);
            vec![
                vec![r, out],
                vec![r, inputs],
                vec![r, out],
                vec![r, inputs],
                vec![r, r, k, k],
                vec![r, r, k, k],
            ]
        } else {
            let fan_in: i64 = self.shape[1..].iter().product();
            vec![vec![out, r], vec![r, fan_in], vec![out, r], vec![r, fan_in]]
        };
        shapes
            .into_iter()
            .zip(LOHA_PARTS)
            .map(|(shape, part)| ParamSpec {
                name: loha_name(&self.path, part),
                init: if part == "hada_w2_b" {
                    nn::Init::Const(0.0)
                } else {
                    kaiming_uniform(&shape)
                },
                shape,
            })
            .collect()
    }

    fn update(&self, tensors: Vec<Tensor>) -> Box<dyn WeightUpdate> {
        let mut it = tensors.into_iter();
        let mut next = || it.next().expect("a LoHa layer has four or six tensors");
        let (w1a, w1b, w2a, w2b) = (next(), next(), next(), next());
        let tucker = self.tucker.then(|| (next(), next()));
        Box::new(Hadamard {
            w1: (w1a, w1b),
            w2: (w2a, w2b),
            tucker,
            scale: self.scale,
        })
    }
}

#[derive(Debug)]
struct Hadamard {
    w1: (Tensor, Tensor),
    w2: (Tensor, Tensor),
    /// `t1`, `t2` of the Tucker form.
    tucker: Option<(Tensor, Tensor)>,
    scale: f64,
}

/// LyCORIS' Tucker rebuild (as peft's `make_weight_cp`): `[out, in, k, k]` from `t` `[r, r, k, k]`,
/// `a` `[r, out]` and `b` `[r, in]`.
pub(crate) fn tucker_weight(t: &Tensor, a: &Tensor, b: &Tensor) -> Tensor {
    Tensor::einsum("i j k l, j r, i p -> p r k l", &[t, b, a], None::<&[i64]>)
}

impl WeightUpdate for Hadamard {
    fn update(&self, base_weight: &Tensor) -> Update {
        let (f1, f2) = match &self.tucker {
            Some((t1, t2)) => (
                tucker_weight(t1, &self.w1.0, &self.w1.1),
                tucker_weight(t2, &self.w2.0, &self.w2.1),
            ),
            None => (self.w1.0.matmul(&self.w1.1), self.w2.0.matmul(&self.w2.1)),
        };
        Update::Add((f1 * f2 * self.scale).reshape(base_weight.size()))
    }
}

impl Loha {
    /// The rank of the layer at `path`.
    pub fn rank_for(&self, path: &str) -> Result<i64> {
        pattern_value(&self.rank_pattern, path, self.rank, "rank_pattern")
    }

    /// The alpha of the layer at `path`.
    pub fn alpha_for(&self, path: &str) -> Result<f64> {
        pattern_value(&self.alpha_pattern, path, self.alpha, "alpha_pattern")
    }

    fn plan(&self, target: &LayerTarget) -> Result<LohaLayer> {
        let rank = self.rank_for(&target.path)?;
        Ok(LohaLayer {
            path: target.path.clone(),
            shape: target.shape.clone(),
            rank,
            scale: self.alpha_for(&target.path)? / rank as f64,
            tucker: self.effective_conv2d && target.kernel() > 1,
        })
    }

    fn planned(&self, unet: &mut UNet2DConditionModel) -> Result<Vec<Planned>> {
        let patterns = self.rank_pattern.keys().chain(self.alpha_pattern.keys());
        let layers = select_patterned(unet, &self.targets, patterns, "LoHa")?;
        plan_each(layers, |t| self.plan(t))
    }
}

impl Registered for Loha {
    const NAME: &'static str = "loha";
    const LABEL: &'static str = "LoHa";
}

impl TuningMethod for Loha {
    fn validate(&self) -> Result<()> {
        validate_ranked(
            &self.targets,
            std::iter::once(("rank", self.rank))
                .chain(self.rank_pattern.values().map(|&r| ("rank_pattern", r))),
            std::iter::once(self.alpha).chain(self.alpha_pattern.values().copied()),
        )
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
        layer_update::merge(&self.planned(unet)?, tensors, "the LoHa adapter")
    }
}
