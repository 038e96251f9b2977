//! DiffFit (Xie et al. 2023, "DiffFit: Unlocking Transferability of Large Diffusion Models via
//! Simple Parameter-Efficient Fine-Tuning"): train the bias terms and the normalisation layers,
//! and a learned scale `gamma` per residual branch, initialised to 1, multiplying the branch's
//! output before the residual add. Following the paper (no reference library), generalised from
//! DiT to the U-Net:
//! - DiT's blocks carry `gamma1`, `gamma2` (vectors of the block's width) on the attention and MLP
//!   branches. The U-Net's residual units are its transformer blocks (three branches: self-attention,
//!   cross-attention, feed-forward) and its resnet blocks (one branch): each branch gets a
//!   `gamma` of its width (`scales = "all"`; `"transformer_blocks"` keeps DiT's placement, the
//!   transformer blocks only). Each branch ends in a Linear or Conv2d layer (`to_out.0`,
//!   `ff.net.2`, `conv2`), so the scale is that layer's per-channel output scale: no model hook.
//! - Every bias of the U-Net and every GroupNorm/LayerNorm weight (their biases are biases) is
//!   trained. DiT's class-condition embedding has no counterpart in a text-conditioned U-Net
//!   (the conditioning is the frozen text encoder's), so nothing is trained for it.
//!
//! At init the model is the base model exactly (`gamma = 1` multiplies bit for bit). Merging folds
//! each scale into its layer (`W' = gamma W`, `b' = gamma b`, exact since the branch ends in that
//! linear layer) and writes the biases and norms.
//!
//! Count on SD v1.4: 501,444 (biases and norms 443,844, scales 57,600; 481,284 with the
//! transformer blocks' scales only), 0.058% of the U-Net; the paper trains 0.83M of DiT-XL/2's
//! 675M (0.12%), a model without resnets and with a class embedding.
use super::layer_update::{self, LayerPlan, ParamSpec, Planned, Update, WeightUpdate};
use super::targets::select_layers;
use super::{check_tensor_shapes, own_variables, Registered, TuningMethod};
use crate::model::unet::UNet2DConditionModel;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::{nn, Tensor};

/// Which residual branches get a learned scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScalePlacement {
    /// Every branch: the transformer blocks' three and each resnet's.
    All,
    /// The transformer blocks' branches only (DiT's placement, which has no resnets).
    TransformerBlocks,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiffFit {
    /// Default `all`.
    pub scales: ScalePlacement,
}

impl Default for DiffFit {
    fn default() -> Self {
        Self {
            scales: ScalePlacement::All,
        }
    }
}

/// The last layer of each transformer-block branch, and of each resnet branch.
const TRANSFORMER_BRANCH_ENDS: [(&str, &str); 3] = [
    (".attn1.to_out.0", ".attn1"),
    (".attn2.to_out.0", ".attn2"),
    (".ff.net.2", ".ff"),
];
const RESNET_BRANCH_END: (&str, &str) = (".conv2", "");

/// The scale of the branch that the layer at `path` ends: `<branch>.gamma`.
pub fn gamma_name(path: &str) -> Option<String> {
    TRANSFORMER_BRANCH_ENDS
        .iter()
        .filter(|_| path.contains(".transformer_blocks."))
        .chain(std::iter::once(&RESNET_BRANCH_END).filter(|_| path.contains(".resnets.")))
        .find_map(|(end, branch)| {
            path.strip_suffix(end)
                .map(|stem| format!("{stem}{branch}.gamma"))
        })
}

/// Whether the U-Net variable `name` is one DiffFit trains: a bias or a norm's weight.
fn trains_own(name: &str) -> bool {
    let mut parts = name.rsplit('.');
    match (parts.next(), parts.next()) {
        (Some("bias"), _) => true,
        (Some("weight"), Some(module)) => module.contains("norm"),
        _ => false,
    }
}

#[derive(Debug)]
struct ScaleLayer {
    name: String,
    channels: i64,
}

impl LayerPlan for ScaleLayer {
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec {
            name: self.name.clone(),
            shape: vec![self.channels],
            init: nn::Init::Const(1.0),
        }]
    }

    fn update(&self, tensors: Vec<Tensor>) -> Box<dyn WeightUpdate> {
        let [gamma] = <[Tensor; 1]>::try_from(tensors).expect("a branch has one scale");
        Box::new(BranchScale(gamma))
    }
}

#[derive(Debug)]
struct BranchScale(Tensor);

impl WeightUpdate for BranchScale {
    fn update(&self, _base_weight: &Tensor) -> Update {
        Update::ScaleOutput(self.0.shallow_clone())
    }
}

impl DiffFit {
    fn scale_globs(&self) -> Vec<String> {
        let mut globs: Vec<String> = TRANSFORMER_BRANCH_ENDS
            .iter()
            .map(|(end, _)| format!("*.transformer_blocks.*{end}"))
            .collect();
        if self.scales == ScalePlacement::All {
            globs.push(format!("*.resnets.*{}", RESNET_BRANCH_END.0));
        }
        globs
    }

    fn planned(&self, unet: &mut UNet2DConditionModel) -> Result<Vec<Planned>> {
        let layers = select_layers(unet, &self.scale_globs(), "DiffFit branch")?;
        layers
            .into_iter()
            .map(|t| {
                let name = gamma_name(&t.path)
                    .with_context(|| format!("layer `{}` ends no known branch", t.path))?;
                let plan = ScaleLayer {
                    name,
                    channels: t.outputs(),
                };
                Ok((t, Box::new(plan) as Box<dyn LayerPlan>))
            })
            .collect()
    }
}

impl Registered for DiffFit {
    const NAME: &'static str = "difffit";
    const LABEL: &'static str = "DiffFit";
}

impl TuningMethod for DiffFit {
    fn apply(
        &self,
        unet: &mut UNet2DConditionModel,
        unet_vs: &nn::VarStore,
        params: nn::Path,
        init: &super::InitSeed,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut trained = own_variables(unet_vs, trains_own);
        if trained.is_empty() {
            bail!("the U-Net has no biases or norms to train");
        }
        let planned = self.planned(unet)?;
        trained.extend(layer_update::attach(unet, planned, &params, init)?);
        Ok(trained)
    }

    /// Writes the biases and norms, then folds each scale into the layer that ends its branch.
    fn merge(
        &self,
        unet: &mut UNet2DConditionModel,
        unet_vs: &nn::VarStore,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let planned = self.planned(unet)?;
        let own: Vec<(String, Tensor)> = unet_vs
            .variables()
            .into_iter()
            .filter(|(name, _)| trains_own(name))
            .collect();
        let mut expected: Vec<(String, Vec<i64>)> =
            own.iter().map(|(n, t)| (n.clone(), t.size())).collect();
        expected.extend(layer_update::expected_tensors(&planned));
        check_tensor_shapes(&expected, tensors, "the DiffFit adapter")?;
        tch::no_grad(|| {
            for (name, t) in &own {
                let src = tensors[name].to_device(t.device()).to_kind(t.kind());
                t.shallow_clone().copy_(&src);
            }
        });
        let scales: BTreeMap<String, Tensor> = layer_update::expected_tensors(&planned)
            .into_iter()
            .map(|(name, _)| {
                let t = tensors[&name].shallow_clone();
                (name, t)
            })
            .collect();
        layer_update::merge(&planned, &scales, "the DiffFit adapter")
    }
}
