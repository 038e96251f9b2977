//! OFT (Qiu et al. 2023, orthogonal fine-tuning, designed on Stable Diffusion): each adapted layer's
//! weight is rotated, `W' = W R^T`, by a block-diagonal orthogonal `R` acting on the layer's
//! inputs (Linear: `in`; Conv2d: the `in*k*k` filter entries), so the angles between neurons are
//! kept. Each block is the Cayley transform of a skew-symmetric matrix built from the trained
//! upper triangle (zero at init: `R = I`, the base model). Computed as HF peft 0.21.2 computes it
//! (`OFTConfig`: `oft_block_size` or `r`, each adjusted to the nearest divisor of the layer's
//! inputs as peft does; `block_share`; `coft` with `eps`; `use_cayley_neumann` with
//! `num_cayley_neumann_terms`), so peft's files load unchanged:
//! - the Cayley-Neumann series as peft truncates it, `I + 2Q + 2Q^2 + ... + Q^n`, or the exact
//!   `(I - Q)(I + Q)^-1`;
//! - COFT projects each block's skew matrix onto the Frobenius ball of radius `eps / sqrt(blocks)`
//!   before every use, writing the projection back into the trained tensor (peft's projected
//!   gradient descent).
//!
//! Where peft differs from its own merge: peft 0.21.2 applies OFT to convolutions above 1x1 by
//! rotating unfolded input patches and folding them back, which sums overlapping patches (the
//! output changes at init); its merge rotates the filters, which is the paper's OFT. difftune
//! always rotates the weight, so a peft OFT on such convolutions matches peft's merged model.
//! Linear and 1x1 layers match peft unmerged and merged. peft's module dropout is not offered.
//!
//! Count on SD v1.4, study placement, block size 32: 496 per block of 32 inputs, 383,904.
use super::layer_update::{self, LayerPlan, ParamSpec, Planned, Update, WeightUpdate};
use super::targets::{select_layers, LayerTarget};
use super::{Registered, TuningMethod};
use crate::model::unet::UNet2DConditionModel;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::{nn, Kind, Tensor};

/// How the blocks of `R` are sized: one is given, the other follows from the layer's inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OftBlocks {
    /// Inputs per block (peft's `oft_block_size`).
    Size(i64),
    /// Blocks per layer (peft's `r`).
    Count(i64),
}

/// How the skew-symmetric matrices become rotations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CayleyForm {
    /// `(I - Q)(I + Q)^-1`, exact (a matrix inverse per block per step).
    Exact,
    /// peft's truncated Neumann series (`use_cayley_neumann`, its default).
    Neumann,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Oft {
    /// Block size or count. Default `{ size = 32 }` (peft's).
    pub blocks: OftBlocks,
    /// Globs over the diffusers paths of the Linear and Conv2d layers to adapt. Default: the
    /// study's placement, `*.attn2.to_q` and `*.attn2.to_k`.
    pub targets: Vec<String>,
    /// One rotation shared by all blocks of a layer. Default false.
    pub block_share: bool,
    /// Constrained OFT: each block's skew matrix is kept within `eps` of zero. Default false.
    pub coft: bool,
    /// COFT's radius. Default 6e-5 (peft's).
    pub eps: f64,
    /// Default `neumann` (peft's).
    pub cayley: CayleyForm,
    /// Terms of the Neumann series. Default 5 (peft's).
    pub neumann_terms: i64,
}

impl Default for Oft {
    fn default() -> Self {
        Self {
            blocks: OftBlocks::Size(32),
            targets: vec!["*.attn2.to_q".into(), "*.attn2.to_k".into()],
            block_share: false,
            coft: false,
            eps: 6e-5,
            cayley: CayleyForm::Neumann,
            neumann_terms: 5,
        }
    }
}

/// The trained tensor of the layer at `path`, as peft names it.
pub fn oft_name(path: &str) -> String {
    format!("{path}.oft_R.weight")
}

/// peft's `adjust_oft_parameters`: the divisor of `inputs` nearest `wanted` (the lower on ties).
pub fn nearest_divisor(inputs: i64, wanted: i64) -> i64 {
    if wanted >= inputs {
        return inputs;
    }
    let mut higher = wanted;
    while higher <= inputs && inputs % higher != 0 {
        higher += 1;
    }
    let mut lower = wanted;
    while lower > 1 && inputs % lower != 0 {
        lower -= 1;
    }
    if wanted - lower <= higher - wanted {
        lower
    } else {
        higher
    }
}

#[derive(Debug, Clone)]
struct Rotation {
    /// Blocks per layer and inputs per block.
    blocks: i64,
    size: i64,
    shared: bool,
    coft: Option<f64>,
    cayley: CayleyForm,
    terms: i64,
}

#[derive(Debug)]
struct OftLayer {
    path: String,
    rotation: Rotation,
}

impl LayerPlan for OftLayer {
    fn params(&self) -> Vec<ParamSpec> {
        let r = &self.rotation;
        vec![ParamSpec {
            name: oft_name(&self.path),
            shape: vec![
                if r.shared { 1 } else { r.blocks },
                r.size * (r.size - 1) / 2,
            ],
            init: nn::Init::Const(0.0),
        }]
    }

    fn update(&self, tensors: Vec<Tensor>) -> Box<dyn WeightUpdate> {
        let [q] = <[Tensor; 1]>::try_from(tensors).expect("an OFT layer has one tensor");
        Box::new(Rotated {
            q,
            rotation: self.rotation.clone(),
        })
    }
}

#[derive(Debug)]
struct Rotated {
    /// The upper triangles of the blocks' skew matrices, `[blocks or 1, size (size - 1) / 2]`.
    q: Tensor,
    rotation: Rotation,
}

impl Rotation {
    /// The flat positions of the strict upper triangle of a block, row by row (torch.triu_indices).
    fn upper(&self, device: tch::Device) -> Tensor {
        let b = self.size;
        let flat: Vec<i64> = (0..b)
            .flat_map(|i| ((i + 1)..b).map(move |j| i * b + j))
            .collect();
        Tensor::from_slice(&flat).to_device(device)
    }

    /// `[n, size, size]` skew-symmetric matrices from their upper triangles `q` `[n, elements]`.
    fn skew(&self, q: &Tensor) -> Tensor {
        let (n, b) = (q.size()[0], self.size);
        let index = self.upper(q.device()).unsqueeze(0).expand([n, -1], false);
        let m = Tensor::zeros([n, b * b], (q.kind(), q.device()))
            .scatter(1, &index, q)
            .reshape([n, b, b]);
        &m - m.transpose(-2, -1)
    }

    /// COFT's projection of `q` onto the ball of radius `eps / sqrt(n)` (in skew-matrix norm).
    fn project(&self, q: &Tensor, eps: f64) -> Tensor {
        let m = self.skew(q);
        let radius = eps / (q.size()[0] as f64).sqrt();
        let norm = m.norm_scalaropt_dim(2, [1, 2], true);
        let scaled = &m * radius / &norm;
        let projected = m.where_self(&norm.le(radius), &scaled);
        let index = self.upper(q.device());
        projected.reshape([q.size()[0], -1]).index_select(1, &index)
    }

    /// The orthogonal blocks `[n, size, size]`.
    fn cayley(&self, q: &Tensor) -> Tensor {
        let skew = self.skew(q);
        let n = skew.size()[0];
        let eye = Tensor::eye(self.size, (q.kind(), q.device()))
            .unsqueeze(0)
            .expand([n, -1, -1], false);
        match self.cayley {
            CayleyForm::Exact => Tensor::linalg_solve(&(&eye + &skew), &(&eye - &skew), false),
            CayleyForm::Neumann => {
                // A copy (the identity is an expanded view): the additions below are in place, as peft's.
                let mut r = eye.contiguous();
                if self.terms > 1 {
                    r += &skew * 2.0;
                }
                if self.terms > 2 {
                    let mut power = skew.bmm(&skew);
                    r += &power * 2.0;
                    for _ in 3..self.terms - 1 {
                        power = power.bmm(&skew);
                        r += &power * 2.0;
                    }
                    r += power.bmm(&skew);
                }
                r
            }
        }
    }
}

impl WeightUpdate for Rotated {
    fn update(&self, base_weight: &Tensor) -> Update {
        let rot = &self.rotation;
        if let Some(eps) = rot.coft {
            tch::no_grad(|| {
                let projected = rot.project(&self.q, eps);
                self.q.shallow_clone().copy_(&projected);
            });
        }
        let mut blocks = rot.cayley(&self.q);
        if rot.shared {
            blocks = blocks.expand([rot.blocks, -1, -1], false);
        }
        let out = base_weight.size()[0];
        let w = base_weight
            .to_kind(Kind::Float)
            .reshape([out, rot.blocks, rot.size]);
        let rotated = Tensor::einsum("orc,rkc->ork", &[&w, &blocks], None::<&[i64]>);
        Update::Replace(rotated.reshape(base_weight.size()))
    }
}

impl Oft {
    fn rotation(&self, target: &LayerTarget) -> Rotation {
        let inputs = target.fan_in();
        let (blocks, size) = match self.blocks {
            OftBlocks::Size(size) => {
                let size = nearest_divisor(inputs, size);
                (inputs / size, size)
            }
            OftBlocks::Count(count) => {
                let count = nearest_divisor(inputs, count);
                (count, inputs / count)
            }
        };
        Rotation {
            blocks,
            size,
            shared: self.block_share,
            coft: self.coft.then_some(self.eps),
            cayley: self.cayley,
            terms: self.neumann_terms,
        }
    }

    fn planned(&self, unet: &mut UNet2DConditionModel) -> Result<Vec<Planned>> {
        let layers = select_layers(unet, &self.targets, "OFT target")?;
        Ok(layers
            .into_iter()
            .map(|t| {
                let plan = OftLayer {
                    path: t.path.clone(),
                    rotation: self.rotation(&t),
                };
                (t, Box::new(plan) as Box<dyn LayerPlan>)
            })
            .collect())
    }
}

impl Registered for Oft {
    const NAME: &'static str = "oft";
    const LABEL: &'static str = "OFT";
}

impl TuningMethod for Oft {
    fn validate(&self) -> Result<()> {
        if self.targets.is_empty() {
            bail!("`targets` is empty: name at least one layer pattern");
        }
        let (OftBlocks::Size(n) | OftBlocks::Count(n)) = self.blocks;
        if n < 1 {
            bail!("blocks: {n} must be at least 1");
        }
        if !self.eps.is_finite() || self.eps <= 0.0 {
            bail!("eps {} must be a finite number above 0", self.eps);
        }
        if self.neumann_terms < 1 {
            bail!("neumann_terms {} must be at least 1", self.neumann_terms);
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
        layer_update::merge(&self.planned(unet)?, tensors, "the OFT adapter")
    }
}

#[cfg(test)]
mod tests {
    use super::nearest_divisor;

    #[test]
    fn block_sizes_are_adjusted_as_peft_adjusts_them() {
        assert_eq!(nearest_divisor(320, 32), 32);
        assert_eq!(nearest_divisor(100, 32), 25);
        assert_eq!(nearest_divisor(48, 10), 8);
        assert_eq!(nearest_divisor(16, 32), 16);
    }
}
