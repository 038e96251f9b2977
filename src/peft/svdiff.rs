//! SVDiff (Han et al. 2023, "SVDiff: Compact Parameter Space for Diffusion Fine-Tuning"): train
//! shifts of the weights' singular values. Following the paper (no reference library): every
//! weight matrix of the U-Net by default (a convolution's kernel reshaped to `[out, in*k*k]`),
//! decomposed once as `W = U diag(s) V^T`; the adapted weight is `U diag(ReLU(s + delta)) V^T`,
//! `delta` (one per singular value, `min(out, in*k*k)` per layer) starting at zero.
//!
//! The weight is computed as `W + U diag(ReLU(s + delta) - s) V^T`, the same matrix written as a
//! change of the spectrum: at zero shift the change is exactly zero (`s >= 0`, so
//! `ReLU(s) - s = 0` bit for bit) and the model is exactly the base model, instead of the base
//! up to the SVD's reconstruction rounding (about 1e-7 relative) that `U diag(s) V^T` would give.
//!
//! The decomposition (the paper's "one-time computation") is done when a layer first runs or is
//! merged, from the weight it then holds, and kept: `U` and `V` take about as much memory as the
//! weights they factor. Counting parameters needs no decomposition.
//!
//! Count on SD v1.4, every layer: 222,696 (0.89 MB in f32). The paper reports 1.7 MB for Stable
//! Diffusion, U-Net and text encoder together, without itemising it; the text encoder's weight
//! matrices would add about 56,000 singular values.
use super::layer_update::{self, LayerPlan, ParamSpec, Planned, Update, WeightUpdate};
use super::targets::select_layers;
use super::{Registered, TuningMethod};
use crate::model::unet::UNet2DConditionModel;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::OnceLock;
use tch::{nn, Kind, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SvDiff {
    /// Globs over the diffusers paths of the Linear and Conv2d layers whose spectra are shifted.
    /// Default `*`: every weight matrix, as the paper trains.
    pub targets: Vec<String>,
}

impl Default for SvDiff {
    fn default() -> Self {
        Self {
            targets: vec!["*".into()],
        }
    }
}

/// The trained tensor of the layer at `path`.
pub fn shift_name(path: &str) -> String {
    format!("{path}.spectral_shift")
}

#[derive(Debug)]
struct ShiftLayer {
    path: String,
    singular_values: i64,
}

impl LayerPlan for ShiftLayer {
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec {
            name: shift_name(&self.path),
            shape: vec![self.singular_values],
            init: nn::Init::Const(0.0),
        }]
    }

    fn update(&self, tensors: Vec<Tensor>) -> Box<dyn WeightUpdate> {
        let [delta] = <[Tensor; 1]>::try_from(tensors).expect("an SVDiff layer has one tensor");
        Box::new(SpectralShift {
            delta,
            spectrum: OnceLock::new(),
        })
    }
}

/// `U` `[out, n]`, `s` `[n]` and `V^T` `[n, in*k*k]` of a weight, in f32.
#[derive(Debug)]
struct Spectrum {
    u: Tensor,
    s: Tensor,
    vt: Tensor,
}

impl Spectrum {
    fn of(weight: &Tensor) -> Self {
        tch::no_grad(|| {
            let matrix = weight.to_kind(Kind::Float).reshape([weight.size()[0], -1]);
            let (rows, cols) = (matrix.size()[0], matrix.size()[1]);
            // torch.svd (reduced; linalg_svd's driver argument is CUDA-only). LAPACK decomposes a
            // tall matrix several times faster than the same wide one (576x64: 6.6 ms against
            // 47 ms on two cores), and most convolutions are wide: decompose `W^T = V s U^T`.
            if rows < cols {
                let (v, s, u) = matrix.tr().contiguous().svd(true, true);
                Self { u, s, vt: v.tr() }
            } else {
                let (u, s, v) = matrix.svd(true, true);
                Self { u, s, vt: v.tr() }
            }
        })
    }
}

#[derive(Debug)]
struct SpectralShift {
    delta: Tensor,
    spectrum: OnceLock<Spectrum>,
}

impl WeightUpdate for SpectralShift {
    fn update(&self, base_weight: &Tensor) -> Update {
        let Spectrum { u, s, vt } = self.spectrum.get_or_init(|| Spectrum::of(base_weight));
        let change = (s + &self.delta).relu() - s;
        let delta = (u * change.unsqueeze(0)).matmul(vt);
        // One product per layer instead of the base's plus the change's.
        Update::Replace(base_weight.to_kind(Kind::Float) + delta.reshape(base_weight.size()))
    }
}

impl SvDiff {
    fn planned(&self, unet: &mut UNet2DConditionModel) -> Result<Vec<Planned>> {
        let layers = select_layers(unet, &self.targets, "SVDiff target")?;
        Ok(layers
            .into_iter()
            .map(|t| {
                let plan = ShiftLayer {
                    path: t.path.clone(),
                    singular_values: t.outputs().min(t.fan_in()),
                };
                (t, Box::new(plan) as Box<dyn LayerPlan>)
            })
            .collect())
    }
}

impl Registered for SvDiff {
    const NAME: &'static str = "svdiff";
    const LABEL: &'static str = "SVDiff";
}

impl TuningMethod for SvDiff {
    fn validate(&self) -> Result<()> {
        if self.targets.is_empty() {
            bail!("`targets` is empty: name at least one layer pattern");
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

    /// The shifted spectra give new weights: merging writes them.
    fn merge(
        &self,
        unet: &mut UNet2DConditionModel,
        _unet_vs: &nn::VarStore,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        layer_update::merge(&self.planned(unet)?, tensors, "the SVDiff adapter")
    }
}
