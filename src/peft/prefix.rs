//! Prefix-tuning (Li & Liang 2021) on the U-Net's attention layers: `length` learned key and value
//! vectors per layer, in the projected space (`[length, inner_dim]` each, so every head gets its own
//! `[length, head_dim]` slice). The study's placement is the cross-attention (`attn2`).
//!
//! Keeping the output unchanged at initialisation: prefixes joined into the attention's softmax
//! (the original form) always change it, since any finite key takes some of the attention mass.
//! By default the prefix is therefore attended with a softmax of its own and the result added to the
//! attention output (`attention = "side"`, the zero-init-attention idea of LLaMA-Adapter, and the
//! decomposition of He et al. 2022 with the mixing weight learned through the values); the value
//! prefixes start at zero and the keys random, exactly as LoRA's B and A, so the output starts
//! unchanged and the values get gradients at once. `attention = "joint"` gives Li & Liang's original
//! form, keys and values random, which changes the output from the start.
//!
//! With `reparam_hidden`, the prefixes are produced during training by Li & Liang's
//! reparameterisation: a shared embedding `[length, hidden]` through a `hidden -> hidden` layer and
//! tanh, then per-layer `hidden -> inner_dim` projections for keys and values. Adapter files store the
//! plain prefixes it produces, and settings without `reparam_hidden`.
use super::pattern::{glob_matches, no_match_error};
use super::{fill_slot, install_by_path, nested, Identity, Registered, TuningMethod};
use crate::model::attention::KvExtension;
use crate::model::unet::UNet2DConditionModel;
use crate::model::visit::{ModuleMut, VisitModules};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::{nn, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefixAttention {
    /// Own softmax over the prefix, added to the attention output; output unchanged at init.
    Side,
    /// Prefix prepended to the keys and values of the one softmax (Li & Liang's original form).
    Joint,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Prefix {
    /// Number of key and value vectors per attention layer. Default 10.
    pub length: i64,
    /// Width of the reparameterisation MLP used during training; unset (default): the prefixes
    /// are trained directly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reparam_hidden: Option<i64>,
    /// How the prefix is attended. Default `side`.
    pub attention: PrefixAttention,
    /// Globs over the diffusers paths of the attention layers to extend. Default `*.attn2`.
    pub targets: Vec<String>,
}

impl Default for Prefix {
    fn default() -> Self {
        Self {
            length: 10,
            reparam_hidden: None,
            attention: PrefixAttention::Side,
            targets: vec!["*.attn2".into()],
        }
    }
}

pub fn key_name(attention: &str) -> String {
    format!("{attention}.prefix_key")
}
pub fn value_name(attention: &str) -> String {
    format!("{attention}.prefix_value")
}
/// Prefix-tuning's initial prefixes and reparametrisation embedding: N(0, 1).
const STANDARD_NORMAL: nn::Init = nn::Init::Randn {
    mean: 0.0,
    stdev: 1.0,
};
const EMBEDDING: &str = "prefix_reparam.embedding";
const HIDDEN_WEIGHT: &str = "prefix_reparam.hidden.weight";
const HIDDEN_BIAS: &str = "prefix_reparam.hidden.bias";
fn reparam_name(attention: &str, part: &str) -> String {
    format!("{attention}.prefix_reparam.{part}")
}

/// Where a layer's prefixes come from.
#[derive(Debug)]
enum Source {
    Direct {
        key: Tensor,
        value: Tensor,
    },
    /// Li & Liang's MLP: `tanh(E W_h^T + b_h)` (shared), then per-layer key and value projections.
    Reparam {
        embedding: Tensor,
        hidden: (Tensor, Tensor),
        key: (Tensor, Tensor),
        value: (Tensor, Tensor),
    },
}

impl Source {
    /// `([length, inner], [length, inner])`
    fn prefixes(&self) -> (Tensor, Tensor) {
        match self {
            Source::Direct { key, value } => (key.shallow_clone(), value.shallow_clone()),
            Source::Reparam {
                embedding,
                hidden,
                key,
                value,
            } => {
                let h = embedding.linear(&hidden.0, Some(&hidden.1)).tanh();
                (
                    h.linear(&key.0, Some(&key.1)),
                    h.linear(&value.0, Some(&value.1)),
                )
            }
        }
    }
}

#[derive(Debug)]
struct PrefixKv {
    source: Source,
    attention: PrefixAttention,
}

impl KvExtension for PrefixKv {
    fn extend(&self, key: Tensor, value: Tensor) -> (Tensor, Tensor) {
        if self.attention != PrefixAttention::Joint {
            return (key, value);
        }
        let (prefix_key, prefix_value) = self.source.prefixes();
        let batched = |p: Tensor, like: &Tensor| {
            p.to_kind(like.kind())
                .unsqueeze(0)
                .expand([like.size()[0], -1, -1], false)
        };
        let key = Tensor::cat(&[batched(prefix_key, &key), key], 1);
        let value = Tensor::cat(&[batched(prefix_value, &value), value], 1);
        (key, value)
    }

    fn side_kv(&self) -> Option<(Tensor, Tensor)> {
        (self.attention == PrefixAttention::Side).then(|| self.source.prefixes())
    }
}

impl Prefix {
    /// A layer's own key and value prefixes; the value starts at zero in side attention, so the
    /// tuned U-Net starts as the base.
    fn direct_source(
        &self,
        module: &nn::Path,
        path: &str,
        inner: i64,
        init: &super::InitSeed,
        trained: &mut Vec<(String, Tensor)>,
    ) -> Source {
        let dims = [self.length, inner];
        let key = init.var(module, "prefix_key", &dims, STANDARD_NORMAL);
        let value = match self.attention {
            PrefixAttention::Side => module.zeros("prefix_value", &dims),
            _ => init.var(module, "prefix_value", &dims, STANDARD_NORMAL),
        };
        trained.push((key_name(path), key.shallow_clone()));
        trained.push((value_name(path), value.shallow_clone()));
        Source::Direct { key, value }
    }

    /// The selected attention layers' paths and inner widths, in model order.
    fn targets(&self, unet: &mut UNet2DConditionModel) -> Result<Vec<(String, i64)>> {
        let mut layers = Vec::new();
        unet.visit_modules(&mut |m| {
            if let ModuleMut::Attention(a) = m {
                layers.push((a.path.clone(), a.inner_dim()));
            }
        });
        let paths: Vec<String> = layers.iter().map(|(p, _)| p.clone()).collect();
        for glob in &self.targets {
            if !paths.iter().any(|p| glob_matches(glob, p)) {
                return Err(no_match_error("prefix target", glob, &paths));
            }
        }
        layers.retain(|(path, _)| self.targets.iter().any(|glob| glob_matches(glob, path)));
        Ok(layers)
    }
}

/// The reparameterisation's shared part: the prefix embedding and the hidden layer.
struct SharedReparam {
    embedding: Tensor,
    hidden: (Tensor, Tensor),
    width: i64,
}

impl SharedReparam {
    fn new(
        params: &nn::Path,
        init: &super::InitSeed,
        length: i64,
        width: i64,
        trained: &mut Vec<(String, Tensor)>,
    ) -> Self {
        let root = nested(params, "prefix_reparam");
        let embedding = init.var(&root, "embedding", &[length, width], STANDARD_NORMAL);
        let hidden = nested(params, "prefix_reparam.hidden");
        let uniform = linear_init(width);
        let weight = init.var(&hidden, "weight", &[width, width], uniform);
        let bias = init.var(&hidden, "bias", &[width], uniform);
        trained.push((EMBEDDING.to_string(), embedding.shallow_clone()));
        trained.push((HIDDEN_WEIGHT.to_string(), weight.shallow_clone()));
        trained.push((HIDDEN_BIAS.to_string(), bias.shallow_clone()));
        Self {
            embedding,
            hidden: (weight, bias),
            width,
        }
    }

    /// A layer's key and value projections of the shared hidden layer (the value's at zero when
    /// `zero_value`).
    fn source(
        &self,
        module: &nn::Path,
        path: &str,
        inner: i64,
        zero_value: bool,
        init: &super::InitSeed,
        trained: &mut Vec<(String, Tensor)>,
    ) -> Source {
        let mut projection = |part: &str, zero: bool| {
            let p = module / "prefix_reparam" / part;
            let draw = match zero {
                true => nn::Init::Const(0.0),
                false => linear_init(self.width),
            };
            let weight = init.var(&p, "weight", &[inner, self.width], draw);
            let bias = init.var(&p, "bias", &[inner], draw);
            let name = |t: &str| reparam_name(path, &format!("{part}.{t}"));
            trained.push((name("weight"), weight.shallow_clone()));
            trained.push((name("bias"), bias.shallow_clone()));
            (weight, bias)
        };
        let key = projection("key", false);
        let value = projection("value", zero_value);
        Source::Reparam {
            embedding: self.embedding.shallow_clone(),
            hidden: (self.hidden.0.shallow_clone(), self.hidden.1.shallow_clone()),
            key,
            value,
        }
    }
}

/// torch.nn.Linear's default initialisation for `fan_in` inputs.
fn linear_init(fan_in: i64) -> nn::Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    nn::Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

impl Registered for Prefix {
    const NAME: &'static str = "prefix";
    const LABEL: &'static str = "Prefix-tuning";
}

impl TuningMethod for Prefix {
    fn validate(&self) -> Result<()> {
        if self.length < 1 {
            bail!("length {} must be at least 1", self.length);
        }
        if let Some(h) = self.reparam_hidden.filter(|&h| h < 1) {
            bail!("reparam_hidden {h} must be at least 1");
        }
        if self.targets.is_empty() {
            bail!("`targets` is empty: name at least one attention layer pattern");
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
        let mut trained = Vec::new();
        let shared = self
            .reparam_hidden
            .map(|width| SharedReparam::new(&params, init, self.length, width, &mut trained));
        let mut sources: BTreeMap<String, Source> = BTreeMap::new();
        for (path, inner) in self.targets(unet)? {
            let module = nested(&params, &path);
            let source = match &shared {
                None => self.direct_source(&module, &path, inner, init, &mut trained),
                Some(shared) => {
                    let zero_value = self.attention == PrefixAttention::Side;
                    shared.source(&module, &path, inner, zero_value, init, &mut trained)
                }
            };
            sources.insert(path, source);
        }
        install_by_path(
            unet,
            sources,
            |path| format!("attention `{path}` already has a key/value extension"),
            |m, source| match m {
                ModuleMut::Attention(a) => {
                    let attention = self.attention;
                    fill_slot(
                        &mut a.kv_extension,
                        Box::new(PrefixKv { source, attention }),
                    )
                }
                _ => true,
            },
        )?;
        Ok(trained)
    }

    /// Folds the reparameterisation MLP into the plain prefixes it produces.
    fn export(
        &self,
        trained: &[(String, Tensor)],
    ) -> Result<(serde_json::Value, Vec<(String, Tensor)>)> {
        if self.reparam_hidden.is_none() {
            return Ok((
                self.settings(),
                trained
                    .iter()
                    .map(|(n, t)| (n.clone(), t.detach()))
                    .collect(),
            ));
        }
        let named: BTreeMap<&str, &Tensor> = trained.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let get = |name: &str| -> Result<Tensor> {
            named
                .get(name)
                .map(|t| t.detach())
                .with_context(|| format!("trained prefix tensors lack `{name}`"))
        };
        let attentions: Vec<&str> = trained
            .iter()
            .filter_map(|(n, _)| n.strip_suffix(".prefix_reparam.key.weight"))
            .collect();
        let mut folded = Vec::new();
        tch::no_grad(|| -> Result<()> {
            for path in attentions {
                let source = Source::Reparam {
                    embedding: get(EMBEDDING)?,
                    hidden: (get(HIDDEN_WEIGHT)?, get(HIDDEN_BIAS)?),
                    key: (
                        get(&reparam_name(path, "key.weight"))?,
                        get(&reparam_name(path, "key.bias"))?,
                    ),
                    value: (
                        get(&reparam_name(path, "value.weight"))?,
                        get(&reparam_name(path, "value.bias"))?,
                    ),
                };
                let (key, value) = source.prefixes();
                folded.push((key_name(path), key));
                folded.push((value_name(path), value));
            }
            Ok(())
        })?;
        let plain = Prefix {
            reparam_hidden: None,
            ..self.clone()
        };
        Ok((plain.settings(), folded))
    }
}
