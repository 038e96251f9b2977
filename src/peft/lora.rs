//! LoRA (Hu et al. 2021) and its DoRA variant (Liu et al. 2024), on any Linear or Conv2d chosen by
//! module-path globs, computed as HF peft computes them so peft adapters load unchanged.
//!
//! A layer `y = W x + b` becomes `y = W x + b + (alpha / r) B A x` with `A` `[r, in]` (Kaiming-uniform,
//! a = sqrt(5), as peft) and `B` `[out, r]` zero, so training starts from the base model. Conv2d
//! layers get `A` as a convolution with the layer's kernel, stride and padding and `B` as a 1x1
//! convolution. DoRA re-derives the weight as `m * (W + s B A) / ||W + s B A||` (norm per output
//! channel, treated as a constant in the backward pass as peft does), with the magnitude `m`
//! initialised to `||W||` so it also starts from the base model.
use super::export::AdapterFormat;
use super::targets::{pattern_value, select_patterned, validate_ranked};
use super::{check_tensor_shapes, fill_slot, install_by_path, nested, Registered, TuningMethod};
use crate::model::layers::{Conv2d, Conv2dExtension, Linear, LinearExtension};
use crate::model::unet::UNet2DConditionModel;
use crate::model::visit::ModuleMut;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::{nn, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Lora {
    /// Rank of every adapted layer, unless `rank_pattern` says otherwise. Default 4.
    pub rank: i64,
    /// The update is scaled by `alpha / rank`. Default: unset, meaning alpha = the layer's rank
    /// (scale 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// Globs over the diffusers paths of the Linear and Conv2d layers to adapt; each must match at
    /// least one layer. Default: the study's placement, cross-attention query and key
    /// (`*.attn2.to_q`, `*.attn2.to_k`).
    pub targets: Vec<String>,
    /// Per-layer rank overrides, glob -> rank (a layer may match only one distinct rank).
    pub rank_pattern: BTreeMap<String, i64>,
    /// Per-layer alpha overrides, glob -> alpha.
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Train DoRA's magnitude vector on top of the low-rank direction update. Default false.
    pub dora: bool,
}

impl Default for Lora {
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: None,
            targets: vec!["*.attn2.to_q".into(), "*.attn2.to_k".into()],
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            dora: false,
        }
    }
}

/// Parameter names of one adapted layer, as peft names them (minus peft's `base_model.model.`).
pub fn lora_a_name(path: &str) -> String {
    format!("{path}.lora_A.weight")
}
pub fn lora_b_name(path: &str) -> String {
    format!("{path}.lora_B.weight")
}
pub fn magnitude_name(path: &str) -> String {
    format!("{path}.lora_magnitude_vector")
}

/// One layer the settings select, with its resolved rank and scale.
#[derive(Debug)]
struct Target {
    path: String,
    rank: i64,
    scale: f64,
    /// The base weight, `[out, in]` or `[out, in, k, k]`.
    weight: Tensor,
    weight_shape: Vec<i64>,
}

impl Target {
    fn is_conv(&self) -> bool {
        self.weight_shape.len() == 4
    }

    fn a_shape(&self) -> Vec<i64> {
        let mut shape = self.weight_shape.clone();
        shape[0] = self.rank;
        shape
    }

    fn b_shape(&self) -> Vec<i64> {
        let mut shape = vec![self.weight_shape[0], self.rank];
        if self.is_conv() {
            shape.extend([1, 1]);
        }
        shape
    }

    /// peft keeps the Conv2d magnitude as `[1, out, 1, 1]`.
    fn magnitude_shape(&self) -> Vec<i64> {
        if self.is_conv() {
            vec![1, self.weight_shape[0], 1, 1]
        } else {
            vec![self.weight_shape[0]]
        }
    }

    fn expected(&self, dora: bool) -> Vec<(String, Vec<i64>)> {
        let mut names = vec![
            (lora_a_name(&self.path), self.a_shape()),
            (lora_b_name(&self.path), self.b_shape()),
        ];
        if dora {
            names.push((magnitude_name(&self.path), self.magnitude_shape()));
        }
        names
    }
}

/// `W + scale * B A`, for Linear (`[out, in]`) and Conv2d (`[out, in, k, k]`) weights alike.
fn adapted_weight(weight: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Tensor {
    let (out, rank) = (b.size()[0], b.size()[1]);
    let delta = b
        .reshape([out, rank])
        .matmul(&a.reshape([rank, -1]))
        .reshape(weight.size());
    weight + delta * scale
}

/// L2 norm of each output channel's weights: `[out]`.
fn channel_norm(weight: &Tensor) -> Tensor {
    weight.flatten(1, -1).norm_scalaropt_dim(2, [1], false)
}

/// DoRA's per-output-channel factor `m / ||W + s B A||`, shaped `[out]`, the norm a constant.
fn dora_factor(weight: &Tensor, a: &Tensor, b: &Tensor, scale: f64, magnitude: &Tensor) -> Tensor {
    let norm = tch::no_grad(|| channel_norm(&adapted_weight(weight, a, b, scale)));
    magnitude.reshape([-1]) / norm
}

#[derive(Debug)]
struct LoraLinear {
    a: Tensor,
    b: Tensor,
    scale: f64,
    magnitude: Option<Tensor>,
}

impl LinearExtension for LoraLinear {
    fn forward(&self, base: &Linear, x: &Tensor) -> Tensor {
        let (a, b) = (self.a.to_kind(x.kind()), self.b.to_kind(x.kind()));
        let update = x.linear::<Tensor>(&a, None).linear::<Tensor>(&b, None) * self.scale;
        let Some(magnitude) = &self.magnitude else {
            return base.base_forward(x) + update;
        };
        let weight = base.weight.to_kind(x.kind());
        let factor = dora_factor(&weight, &a, &b, self.scale, &magnitude.to_kind(x.kind()));
        let out = (x.linear::<Tensor>(&weight, None) + update) * factor;
        match &base.bias {
            Some(bias) => out + bias,
            None => out,
        }
    }
}

#[derive(Debug)]
struct LoraConv2d {
    a: Tensor,
    b: Tensor,
    scale: f64,
    magnitude: Option<Tensor>,
}

impl Conv2dExtension for LoraConv2d {
    fn forward(&self, base: &Conv2d, x: &Tensor) -> Tensor {
        let (a, b) = (self.a.to_kind(x.kind()), self.b.to_kind(x.kind()));
        let update =
            base.conv_with(x, &a, None)
                .conv2d::<Tensor>(&b, None, [1, 1], [0, 0], [1, 1], 1)
                * self.scale;
        let Some(magnitude) = &self.magnitude else {
            return base.base_forward(x) + update;
        };
        let weight = base.weight.to_kind(x.kind());
        let factor = dora_factor(&weight, &a, &b, self.scale, &magnitude.to_kind(x.kind()));
        let out = (base.conv_with(x, &weight, None) + update) * factor.reshape([1, -1, 1, 1]);
        match &base.bias {
            Some(bias) => out + bias.reshape([1, -1, 1, 1]),
            None => out,
        }
    }
}

impl Lora {
    /// The rank of the layer at `path`.
    pub fn rank_for(&self, path: &str) -> Result<i64> {
        pattern_value(&self.rank_pattern, path, self.rank, "rank_pattern")
    }

    /// The alpha of the layer at `path`, whose rank is `rank`.
    pub fn alpha_for(&self, path: &str, rank: i64) -> Result<f64> {
        let default = self.alpha.unwrap_or(rank as f64);
        pattern_value(&self.alpha_pattern, path, default, "alpha_pattern")
    }

    /// Resolves the targets against the U-Net's Linear and Conv2d layers, in model order.
    fn targets(&self, unet: &mut UNet2DConditionModel) -> Result<Vec<Target>> {
        let patterns = self.rank_pattern.keys().chain(self.alpha_pattern.keys());
        let layers = select_patterned(unet, &self.targets, patterns, "LoRA")?;
        let mut targets = Vec::new();
        for layer in layers {
            let rank = self.rank_for(&layer.path)?;
            let scale = self.alpha_for(&layer.path, rank)? / rank as f64;
            ensure_rank_fits(&layer.path, rank, &layer.shape)?;
            targets.push(Target {
                path: layer.path,
                rank,
                scale,
                weight: layer.weight,
                weight_shape: layer.shape,
            });
        }
        Ok(targets)
    }
}

/// Errors when `rank` exceeds what the layer at `path` (weight `[out, in]` or `[out, in, k, k]`)
/// can hold: `B·A` has rank at most min(out, in·k·k), so more adds parameters, never capacity.
fn ensure_rank_fits(path: &str, rank: i64, weight_shape: &[i64]) -> Result<()> {
    let (outputs, inputs) = (weight_shape[0], weight_shape[1..].iter().product::<i64>());
    if rank > outputs.min(inputs) {
        bail!(
            "LoRA rank {rank} is larger than layer `{path}` ({outputs} outputs, {inputs} inputs) can use: \
             its update has rank at most {}; lower `rank`, or give this layer a smaller one with `rank_pattern`",
            outputs.min(inputs)
        );
    }
    Ok(())
}

/// The extension of one layer, before it is attached.
enum Attachment {
    Linear(LoraLinear),
    Conv2d(LoraConv2d),
}

impl Registered for Lora {
    const NAME: &'static str = "lora";
    const LABEL: &'static str = "LoRA";
}

impl TuningMethod for Lora {
    fn validate(&self) -> Result<()> {
        validate_ranked(
            &self.targets,
            std::iter::once(("rank", self.rank))
                .chain(self.rank_pattern.values().map(|&r| ("rank_pattern", r))),
            self.alpha
                .iter()
                .chain(self.alpha_pattern.values())
                .copied(),
        )
    }

    /// kohya's LoRA files (ComfyUI, A1111) have no magnitude vector.
    fn export_refusal(&self, format: AdapterFormat) -> Option<&'static str> {
        (self.dora && format == AdapterFormat::Kohya).then_some("DoRA has no kohya form")
    }

    fn apply(
        &self,
        unet: &mut UNet2DConditionModel,
        _unet_vs: &nn::VarStore,
        params: nn::Path,
        init: &super::InitSeed,
    ) -> Result<Vec<(String, Tensor)>> {
        let targets = self.targets(unet)?;
        let mut trained = Vec::new();
        let mut attachments: BTreeMap<String, Attachment> = BTreeMap::new();
        for t in &targets {
            let module = nested(&params, &t.path);
            // Kaiming-uniform with a = sqrt(5) (peft's init of A): bound = 1 / sqrt(fan_in).
            let fan_in: i64 = t.a_shape()[1..].iter().product();
            let bound = 1.0 / (fan_in as f64).sqrt();
            let a = init.var(
                &(&module / "lora_A"),
                "weight",
                &t.a_shape(),
                nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            );
            let b = (&module / "lora_B").var("weight", &t.b_shape(), nn::Init::Const(0.0));
            trained.push((lora_a_name(&t.path), a.shallow_clone()));
            trained.push((lora_b_name(&t.path), b.shallow_clone()));
            let magnitude = self.dora.then(|| {
                let norm = tch::no_grad(|| channel_norm(&t.weight.to_kind(a.kind())));
                let m =
                    module.var_copy("lora_magnitude_vector", &norm.reshape(t.magnitude_shape()));
                trained.push((magnitude_name(&t.path), m.shallow_clone()));
                m
            });
            let attachment = if t.is_conv() {
                Attachment::Conv2d(LoraConv2d {
                    a,
                    b,
                    scale: t.scale,
                    magnitude,
                })
            } else {
                Attachment::Linear(LoraLinear {
                    a,
                    b,
                    scale: t.scale,
                    magnitude,
                })
            };
            attachments.insert(t.path.clone(), attachment);
        }
        install_by_path(
            unet,
            attachments,
            |path| format!("layer `{path}` already has an extension"),
            |m, attachment| match (m, attachment) {
                (ModuleMut::Linear(l), Attachment::Linear(ext)) => {
                    fill_slot(&mut l.extension, Box::new(ext))
                }
                (ModuleMut::Conv2d(c), Attachment::Conv2d(ext)) => {
                    fill_slot(&mut c.extension, Box::new(ext))
                }
                _ => true,
            },
        )?;
        Ok(trained)
    }

    fn merge(
        &self,
        unet: &mut UNet2DConditionModel,
        _unet_vs: &nn::VarStore,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let targets = self.targets(unet)?;
        let expected: Vec<(String, Vec<i64>)> =
            targets.iter().flat_map(|t| t.expected(self.dora)).collect();
        check_tensor_shapes(&expected, tensors, "the LoRA adapter")?;
        tch::no_grad(|| {
            for t in &targets {
                let base = t.weight.to_kind(tch::Kind::Float);
                let load =
                    |name: String| tensors[&name].to_device(base.device()).to_kind(base.kind());
                let (a, b) = (load(lora_a_name(&t.path)), load(lora_b_name(&t.path)));
                let adapted = adapted_weight(&base, &a, &b, t.scale);
                let merged = if self.dora {
                    let factor =
                        load(magnitude_name(&t.path)).reshape([-1]) / channel_norm(&adapted);
                    let mut shape = vec![1; t.weight_shape.len()];
                    shape[0] = -1;
                    adapted * factor.reshape(shape)
                } else {
                    adapted
                };
                t.weight
                    .shallow_clone()
                    .copy_(&merged.to_kind(t.weight.kind()));
            }
        });
        Ok(())
    }
}
