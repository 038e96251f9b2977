//! Choosing the Linear and Conv2d layers a method adapts: globs over their diffusers paths, and
//! per-layer overrides by glob (`rank_pattern`, `alpha_pattern`): what LoRA, LoHa, LoKr, OFT and
//! SVDiff share.
use super::pattern::{glob_matches, no_match_error};
use crate::model::unet::UNet2DConditionModel;
use crate::model::visit::{ModuleMut, VisitModules};
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::fmt::Display;
use tch::Tensor;

/// One Linear or Conv2d layer a method's globs select.
#[derive(Debug)]
pub(crate) struct LayerTarget {
    pub path: String,
    /// The base weight, `[out, in]` or `[out, in, k, k]` (a view of the U-Net's own variable).
    pub weight: Tensor,
    /// The base bias, if the layer has one.
    pub bias: Option<Tensor>,
    pub shape: Vec<i64>,
}

impl LayerTarget {
    pub fn is_conv(&self) -> bool {
        self.shape.len() == 4
    }

    pub fn outputs(&self) -> i64 {
        self.shape[0]
    }

    /// Input channels (without the kernel).
    pub fn inputs(&self) -> i64 {
        self.shape[1]
    }

    /// The kernel's side (1 for Linear layers).
    pub fn kernel(&self) -> i64 {
        self.shape.get(2).copied().unwrap_or(1)
    }

    /// The columns of the weight as a matrix: inputs times kernel area.
    pub fn fan_in(&self) -> i64 {
        self.shape[1..].iter().product()
    }
}

/// The U-Net's Linear and Conv2d layers whose paths match any of `globs`, in model order. Every
/// glob must match some layer (`what` names the setting in the error, e.g. "LoHa target").
pub(crate) fn select_layers(
    unet: &mut UNet2DConditionModel,
    globs: &[String],
    what: &str,
) -> Result<Vec<LayerTarget>> {
    let mut layers: Vec<LayerTarget> = Vec::new();
    let mut push = |path: &str, weight: &Tensor, bias: &Option<Tensor>| {
        layers.push(LayerTarget {
            path: path.to_string(),
            shape: weight.size(),
            weight: weight.shallow_clone(),
            bias: bias.as_ref().map(Tensor::shallow_clone),
        })
    };
    unet.visit_modules(&mut |m| match m {
        ModuleMut::Linear(l) => push(&l.path, &l.weight, &l.bias),
        ModuleMut::Conv2d(c) => push(&c.path, &c.weight, &c.bias),
        _ => {}
    });
    check_patterns_apply(globs, &layers, what)?;
    layers.retain(|l| globs.iter().any(|glob| glob_matches(glob, &l.path)));
    Ok(layers)
}

/// The layers `targets` selects for the method `label` (as [`select_layers`]), after checking
/// that each glob of its per-layer `patterns` (rank_pattern, alpha_pattern) names one of them.
pub(crate) fn select_patterned<'a>(
    unet: &mut UNet2DConditionModel,
    targets: &[String],
    patterns: impl IntoIterator<Item = &'a String>,
    label: &str,
) -> Result<Vec<LayerTarget>> {
    let layers = select_layers(unet, targets, &format!("{label} target"))?;
    check_patterns_apply(patterns, &layers, &format!("{label} rank/alpha"))?;
    Ok(layers)
}

/// The value `patterns` (glob -> value) gives the layer at `path`, else `default`. A layer may
/// match several globs only when they agree; `what` names the setting (`rank_pattern`).
pub(crate) fn pattern_value<T: Copy + PartialEq + Display>(
    patterns: &BTreeMap<String, T>,
    path: &str,
    default: T,
    what: &str,
) -> Result<T> {
    let matched: Vec<(&String, T)> = patterns
        .iter()
        .filter(|(glob, _)| glob_matches(glob, path))
        .map(|(g, &v)| (g, v))
        .collect();
    match matched.as_slice() {
        [] => Ok(default),
        [(_, value), rest @ ..] if rest.iter().all(|(_, v)| v == value) => Ok(*value),
        _ => bail!(
            "layer `{path}` matches {what} entries with different values: {}",
            matched
                .iter()
                .map(|(g, v)| format!("`{g}` = {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Errors when one of `globs` (targets or pattern keys) matches none of `layers`: a glob that
/// applies nowhere is a typo, not a no-op.
fn check_patterns_apply<'a>(
    globs: impl IntoIterator<Item = &'a String>,
    layers: &[LayerTarget],
    what: &str,
) -> Result<()> {
    let targeted: Vec<String> = layers.iter().map(|t| t.path.clone()).collect();
    for glob in globs {
        if !targeted.iter().any(|p| glob_matches(glob, p)) {
            return Err(no_match_error(what, glob, &targeted));
        }
    }
    Ok(())
}

/// Checks the settings every method with targets, ranks and alphas shares.
pub(crate) fn validate_ranked(
    targets: &[String],
    ranks: impl IntoIterator<Item = (&'static str, i64)>,
    alphas: impl IntoIterator<Item = f64>,
) -> Result<()> {
    if targets.is_empty() {
        bail!("`targets` is empty: name at least one layer pattern");
    }
    for (what, rank) in ranks {
        if rank < 1 {
            bail!("{what}: rank {rank} must be at least 1");
        }
    }
    for alpha in alphas {
        if !alpha.is_finite() || alpha <= 0.0 {
            bail!("alpha {alpha} must be a finite number above 0");
        }
    }
    Ok(())
}
