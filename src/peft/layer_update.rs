//! Methods that change a Linear or Conv2d layer through a function of a few trained tensors
//! (LoHa, LoKr, OFT and SVDiff re-derive its weight, DiffFit scales its output). Each describes a
//! layer once, as a [`LayerPlan`]: the tensors it trains and the [`WeightUpdate`] they define.
//! Attaching (an extension that applies the update in every forward pass) and merging (the update
//! applied once to the stored weight) both follow from that one description, so they agree.
use super::targets::LayerTarget;
use super::{check_tensor_shapes, fill_slot, install_by_path, nested, InitSeed};
use crate::model::layers::{Conv2d, Conv2dExtension, Linear, LinearExtension};
use crate::model::unet::UNet2DConditionModel;
use crate::model::visit::ModuleMut;
use anyhow::Result;
use std::collections::BTreeMap;
use tch::{nn, Kind, Tensor};

/// What a layer computes in place of its base weight `W` (tensors in f32, shaped like `W`).
pub(crate) enum Update {
    /// `W + delta`.
    Add(Tensor),
    /// Another weight (OFT's rotated `W`).
    Replace(Tensor),
    /// The layer's whole output (bias included) scaled per output channel: `[out]`.
    ScaleOutput(Tensor),
}

/// A layer's update as a function of its base weight (a frozen U-Net variable, possibly bf16).
pub(crate) trait WeightUpdate: Send + std::fmt::Debug {
    fn update(&self, base_weight: &Tensor) -> Update;
}

/// One tensor a layer trains: its full name (as in adapter files), shape and initial values.
pub(crate) struct ParamSpec {
    pub name: String,
    pub shape: Vec<i64>,
    pub init: nn::Init,
}

/// How a method changes one layer: the tensors it trains and the update they define.
pub(crate) trait LayerPlan {
    fn params(&self) -> Vec<ParamSpec>;
    /// The update, given the tensors of [`LayerPlan::params`] in that order.
    fn update(&self, tensors: Vec<Tensor>) -> Box<dyn WeightUpdate>;
}

/// A target layer with its plan.
pub(crate) type Planned = (LayerTarget, Box<dyn LayerPlan>);

/// nn.init.kaiming_uniform_ with a = sqrt(5), as peft initialises its factors: uniform within
/// 1 / sqrt(fan_in), fan_in being every dimension after the first.
pub(crate) fn kaiming_uniform(shape: &[i64]) -> nn::Init {
    let fan_in: i64 = shape[1..].iter().product();
    let bound = 1.0 / (fan_in as f64).sqrt();
    nn::Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// A new variable called `name` (dotted) under `params`, seeded by `init`.
fn new_var(params: &nn::Path, init: &InitSeed, spec: &ParamSpec) -> Tensor {
    let (module, leaf) = spec
        .name
        .rsplit_once('.')
        .expect("names carry a layer path");
    init.var(&nested(params, module), leaf, &spec.shape, spec.init)
}

/// Creates every planned tensor under `params` and installs the layers' extensions; returns the
/// tensors to train, by name.
pub(crate) fn attach(
    unet: &mut UNet2DConditionModel,
    planned: Vec<Planned>,
    params: &nn::Path,
    init: &InitSeed,
) -> Result<Vec<(String, Tensor)>> {
    let mut trained = Vec::new();
    let mut extensions = BTreeMap::new();
    for (target, plan) in planned {
        let tensors: Vec<Tensor> = plan
            .params()
            .iter()
            .map(|spec| {
                let t = new_var(params, init, spec);
                trained.push((spec.name.clone(), t.shallow_clone()));
                t
            })
            .collect();
        extensions.insert(target.path, Updated(plan.update(tensors)));
    }
    install_by_path(
        unet,
        extensions,
        |path| format!("layer `{path}` already has an extension"),
        |m, ext| match m {
            ModuleMut::Linear(l) => fill_slot(&mut l.extension, Box::new(ext)),
            ModuleMut::Conv2d(c) => fill_slot(&mut c.extension, Box::new(ext)),
            _ => true,
        },
    )?;
    Ok(trained)
}

/// The tensors `planned` needs, by name and shape.
pub(crate) fn expected_tensors(planned: &[Planned]) -> Vec<(String, Vec<i64>)> {
    planned
        .iter()
        .flat_map(|(_, plan)| plan.params().into_iter().map(|s| (s.name, s.shape)))
        .collect()
}

/// Writes each planned update, computed from `tensors` (checked by name and shape), into the
/// base weights (and, for output scales, biases) of the targets.
pub(crate) fn merge(
    planned: &[Planned],
    tensors: &BTreeMap<String, Tensor>,
    source: &str,
) -> Result<()> {
    check_tensor_shapes(&expected_tensors(planned), tensors, source)?;
    tch::no_grad(|| {
        for (target, plan) in planned {
            let weight = &target.weight;
            let loaded = plan
                .params()
                .iter()
                .map(|s| {
                    tensors[&s.name]
                        .to_device(weight.device())
                        .to_kind(Kind::Float)
                })
                .collect();
            let base = weight.to_kind(Kind::Float);
            let (merged, bias_scale) = match plan.update(loaded).update(&base) {
                Update::Add(delta) => (base + delta, None),
                Update::Replace(w) => (w, None),
                Update::ScaleOutput(scale) => {
                    let mut shape = vec![1; target.shape.len()];
                    shape[0] = -1;
                    (base * scale.reshape(&shape), Some(scale))
                }
            };
            weight.shallow_clone().copy_(&merged.to_kind(weight.kind()));
            if let (Some(bias), Some(scale)) = (&target.bias, bias_scale) {
                let scaled = bias.to_kind(Kind::Float) * scale;
                bias.shallow_clone().copy_(&scaled.to_kind(bias.kind()));
            }
        }
    });
    Ok(())
}

/// The extension a [`WeightUpdate`] becomes on its layer.
#[derive(Debug)]
struct Updated(Box<dyn WeightUpdate>);

impl LinearExtension for Updated {
    fn forward(&self, base: &Linear, x: &Tensor) -> Tensor {
        let k = x.kind();
        match self.0.update(&base.weight) {
            Update::Add(delta) => {
                base.base_forward(x) + x.linear::<Tensor>(&delta.to_kind(k), None)
            }
            Update::Replace(w) => x.linear(&w.to_kind(k), base.bias.as_ref()),
            Update::ScaleOutput(scale) => {
                let out = base.base_forward(x);
                let scale = scale.to_kind(out.kind());
                out * scale
            }
        }
    }
}

impl Conv2dExtension for Updated {
    fn forward(&self, base: &Conv2d, x: &Tensor) -> Tensor {
        let k = x.kind();
        match self.0.update(&base.weight) {
            Update::Add(delta) => base.base_forward(x) + base.conv_with(x, &delta.to_kind(k), None),
            Update::Replace(w) => base.conv_with(x, &w.to_kind(k), base.bias.as_ref()),
            Update::ScaleOutput(scale) => {
                let out = base.base_forward(x);
                let scale = scale.to_kind(out.kind()).reshape([1, -1, 1, 1]);
                out * scale
            }
        }
    }
}
