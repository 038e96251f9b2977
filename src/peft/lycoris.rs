//! LoHa, LoKr and OFT adapters in other tools' files, both ways:
//! - peft (0.21.2): a folder with `adapter_model.safetensors` (keys `base_model.model.<path>.<part>`,
//!   the parts named as difftune names them: `hada_w1_a`, ..., `lokr_w1`, ..., `oft_R.weight`) and
//!   `adapter_config.json` (`peft_type` LOHA, LOKR or OFT with its settings). peft's
//!   `rank_pattern`/`alpha_pattern` keys are regexes matched at the end of a path; literal
//!   suffixes are read, and difftune writes one exact path per overridden layer.
//! - LyCORIS/kohya (what kohya's sd-scripts write and A1111 and ComfyUI load), LoHa and LoKr:
//!   `lora_unet_<path with . as _>.<part>` with the same tensors, and `.alpha` (a scalar). Those
//!   loaders scale LoHa by alpha / r (r = `hada_w1_b`'s rows) and LoKr by alpha / r only when a
//!   factor is decomposed (r = `lokr_w1_b`'s or else `lokr_w2_b`'s rows), by 1 otherwise: a LoKr
//!   layer whose factors are both full is written with its scale folded into `lokr_w1`.
//!   OFT has no such form here (LyCORIS's OFT is another parametrisation).
use super::export::{kohya_names, KohyaLayout, PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS};
use super::file::{AdapterFile, AdapterMeta, FORMAT};
use super::loha::{Loha, LOHA_PARTS};
use super::lokr::Lokr;
use super::oft::{CayleyForm, Oft, OftBlocks};
use super::{method_from_json, Registered};
use crate::model::unet::UNetConfig;
use crate::model::weights::{read_all, save_tensors};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{nn, Kind, Tensor};

const LOKR_PARTS: [&str; 7] = [
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
];
const OFT_PART: &str = "oft_R.weight";

/// The methods these files hold, by peft type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Loha,
    Lokr,
    Oft,
}

impl Family {
    fn of_peft_type(peft_type: &str) -> Option<Self> {
        match peft_type {
            "LOHA" => Some(Self::Loha),
            "LOKR" => Some(Self::Lokr),
            "OFT" => Some(Self::Oft),
            _ => None,
        }
    }

    fn of_method(name: &str) -> Option<Self> {
        match name {
            Loha::NAME => Some(Self::Loha),
            Lokr::NAME => Some(Self::Lokr),
            Oft::NAME => Some(Self::Oft),
            _ => None,
        }
    }

    fn parts(self) -> &'static [&'static str] {
        match self {
            Self::Loha => &LOHA_PARTS,
            Self::Lokr => &LOKR_PARTS,
            Self::Oft => &[OFT_PART],
        }
    }

    fn method(self) -> &'static str {
        match self {
            Self::Loha => Loha::NAME,
            Self::Lokr => Lokr::NAME,
            Self::Oft => Oft::NAME,
        }
    }
}

/// Splits `<path>.<part>` for one of `parts`.
fn split_part<'a>(name: &'a str, parts: &[&str]) -> Option<(&'a str, &'a str)> {
    parts.iter().find_map(|part| {
        name.strip_suffix(part)
            .and_then(|stem| stem.strip_suffix('.'))
            .map(|path| (path, &name[path.len() + 1..]))
    })
}

/// The layers of `tensors` (difftune names), each with its parts.
fn layers(
    tensors: &BTreeMap<String, Tensor>,
    kind: Family,
) -> Result<BTreeMap<String, BTreeMap<String, Tensor>>> {
    let mut layers: BTreeMap<String, BTreeMap<String, Tensor>> = BTreeMap::new();
    for (name, t) in tensors {
        let Some((path, part)) = split_part(name, kind.parts()) else {
            bail!("tensor `{name}` is not part of a {} layer", kind.method());
        };
        layers
            .entry(path.to_string())
            .or_default()
            .insert(part.to_string(), t.shallow_clone());
    }
    if layers.is_empty() {
        bail!("no {} layers", kind.method());
    }
    Ok(layers)
}

/// The most frequent of `values` (the smallest on ties).
fn most_common(values: impl Iterator<Item = i64>) -> Option<i64> {
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|(v, _)| v)
}

/// A JSON number, integral when the value is (peft declares ranks and alphas ints).
fn json_number(x: f64) -> serde_json::Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        serde_json::json!(x as i64)
    } else {
        serde_json::json!(x)
    }
}

/// A difftune adapter of `method` with `settings` and `tensors`, imported (no base identity).
fn imported(
    method: &str,
    settings: serde_json::Value,
    tensors: BTreeMap<String, Tensor>,
) -> Result<AdapterFile> {
    method_from_json(method, &settings)?;
    Ok(AdapterFile {
        meta: AdapterMeta {
            format: FORMAT.into(),
            method: method.into(),
            settings,
            base_model: None,
            difftune_version: env!("CARGO_PKG_VERSION").into(),
        },
        tensors: tensors
            .into_iter()
            .map(|(n, t)| (n, t.to_kind(Kind::Float)))
            .collect(),
    })
}

/// The settings of a peft LoHa, LoKr or OFT `adapter_config.json` that change what it computes.
#[derive(Debug, Deserialize)]
struct PeftConfig {
    peft_type: String,
    #[serde(default)]
    r: i64,
    #[serde(default)]
    alpha: f64,
    #[serde(default)]
    rank_pattern: BTreeMap<String, i64>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    use_effective_conv2d: bool,
    #[serde(default)]
    decompose_both: bool,
    #[serde(default)]
    decompose_factor: Option<i64>,
    #[serde(default)]
    oft_block_size: i64,
    #[serde(default)]
    coft: bool,
    #[serde(default)]
    eps: Option<f64>,
    #[serde(default)]
    block_share: bool,
    #[serde(default)]
    use_cayley_neumann: Option<bool>,
    #[serde(default)]
    num_cayley_neumann_terms: Option<i64>,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
}

/// The value peft's `pattern` (key -> value) gives the layer at `path`: the first key that equals
/// the path or ends it after a dot. Regex keys are refused rather than misread.
fn peft_pattern<T: Copy>(pattern: &BTreeMap<String, T>, path: &str) -> Result<Option<T>> {
    for (key, &value) in pattern {
        if key.chars().any(|c| "*+?()[]{}|^$\\".contains(c)) {
            bail!(
                "pattern key `{key}` is a regex; only literal module-name suffixes are supported"
            );
        }
        if path == key || path.ends_with(&format!(".{key}")) {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

impl PeftConfig {
    fn check(&self) -> Result<()> {
        if self.fan_in_fan_out {
            bail!("fan_in_fan_out adapters (for Conv1D layers) do not apply to the U-Net");
        }
        if self.bias.as_deref().is_some_and(|b| b != "none") {
            bail!(
                "adapters that train biases (bias `{:?}`) are not supported",
                self.bias
            );
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            bail!(
                "adapters with modules_to_save (fully trained copies of layers) are not supported"
            );
        }
        Ok(())
    }

    /// Per-layer values as difftune settings: a global value and exact-path overrides.
    fn overrides<T: Copy + PartialEq + serde::Serialize>(
        per_layer: &[(String, T)],
        global: T,
    ) -> serde_json::Value {
        let map: serde_json::Map<String, serde_json::Value> = per_layer
            .iter()
            .filter(|(_, v)| *v != global)
            .map(|(p, v)| (p.clone(), serde_json::json!(v)))
            .collect();
        map.into()
    }

    fn alphas(&self, paths: &[String]) -> Result<Vec<(String, f64)>> {
        paths
            .iter()
            .map(|p| {
                Ok((
                    p.clone(),
                    peft_pattern(&self.alpha_pattern, p)?.unwrap_or(self.alpha),
                ))
            })
            .collect()
    }

    fn settings(
        &self,
        kind: Family,
        layers: &BTreeMap<String, BTreeMap<String, Tensor>>,
    ) -> Result<serde_json::Value> {
        let paths: Vec<String> = layers.keys().cloned().collect();
        Ok(match kind {
            Family::Loha => {
                let ranks: Vec<(String, i64)> = layers
                    .iter()
                    .map(|(p, parts)| {
                        let w1b = parts
                            .get("hada_w1_b")
                            .with_context(|| format!("layer `{p}` has no hada_w1_b"))?;
                        Ok((p.clone(), w1b.size()[0]))
                    })
                    .collect::<Result<_>>()?;
                let rank = most_common(ranks.iter().map(|(_, r)| *r)).unwrap_or(self.r);
                serde_json::json!({
                    "rank": rank,
                    "alpha": self.alpha,
                    "targets": paths,
                    "rank_pattern": Self::overrides(&ranks, rank),
                    "alpha_pattern": Self::overrides(&self.alphas(&paths)?, self.alpha),
                    "effective_conv2d": self.use_effective_conv2d,
                })
            }
            Family::Lokr => {
                let ranks: Vec<(String, i64)> = paths
                    .iter()
                    .map(|p| {
                        Ok((
                            p.clone(),
                            peft_pattern(&self.rank_pattern, p)?.unwrap_or(self.r),
                        ))
                    })
                    .collect::<Result<_>>()?;
                let mut settings = serde_json::json!({
                    "rank": self.r,
                    "alpha": self.alpha,
                    "targets": paths,
                    "rank_pattern": Self::overrides(&ranks, self.r),
                    "alpha_pattern": Self::overrides(&self.alphas(&paths)?, self.alpha),
                    "decompose_both": self.decompose_both,
                    "effective_conv2d": self.use_effective_conv2d,
                });
                if let Some(f) = self.decompose_factor.filter(|&f| f > 0) {
                    settings["decompose_factor"] = f.into();
                }
                settings
            }
            Family::Oft => {
                let blocks = if self.r != 0 {
                    OftBlocks::Count(self.r)
                } else {
                    OftBlocks::Size(self.oft_block_size)
                };
                let defaults = Oft::default();
                serde_json::to_value(Oft {
                    blocks,
                    targets: paths,
                    block_share: self.block_share,
                    coft: self.coft,
                    eps: self.eps.unwrap_or(defaults.eps),
                    cayley: if self.use_cayley_neumann.unwrap_or(true) {
                        CayleyForm::Neumann
                    } else {
                        CayleyForm::Exact
                    },
                    neumann_terms: self
                        .num_cayley_neumann_terms
                        .unwrap_or(defaults.neumann_terms),
                })?
            }
        })
    }
}

/// Reads a peft adapter folder holding a LoHa, LoKr or OFT; `None` for other peft types.
pub fn import_peft(dir: &Path) -> Result<Option<AdapterFile>> {
    let config_path = dir.join(PEFT_CONFIG);
    let config: PeftConfig = crate::util::fs::read_json(&config_path).context("peft config")?;
    let Some(kind) = Family::of_peft_type(&config.peft_type) else {
        return Ok(None);
    };
    let weights = dir.join(PEFT_WEIGHTS);
    let read = || -> Result<AdapterFile> {
        config.check()?;
        let tensors: BTreeMap<String, Tensor> = read_all(&weights)?
            .into_iter()
            .map(|(k, t)| (k.strip_prefix(PEFT_PREFIX).unwrap_or(&k).to_string(), t))
            .collect();
        let settings = config.settings(kind, &layers(&tensors, kind)?)?;
        imported(kind.method(), settings, tensors)
    };
    read()
        .with_context(|| format!("peft {} adapter {}", config.peft_type, dir.display()))
        .map(Some)
}

/// The per-layer rank and alpha a LoHa or LoKr adapter's settings give each of its layers.
fn ranks_and_alphas(
    adapter: &AdapterFile,
    kind: Family,
    paths: &[String],
) -> Result<Vec<(i64, f64)>> {
    paths
        .iter()
        .map(|p| match kind {
            Family::Loha => {
                let m: Loha = serde_json::from_value(adapter.meta.settings.clone())?;
                Ok((m.rank_for(p)?, m.alpha_for(p)?))
            }
            Family::Lokr => {
                let m: Lokr = serde_json::from_value(adapter.meta.settings.clone())?;
                Ok((m.rank_for(p)?, m.alpha_for(p)?))
            }
            Family::Oft => bail!("OFT layers have no rank or alpha"),
        })
        .collect()
}

/// The kind of a difftune adapter these formats can hold.
fn kind_of(adapter: &AdapterFile) -> Result<Family> {
    Family::of_method(&adapter.meta.method).with_context(|| {
        format!(
            "only LoHa, LoKr and OFT adapters are written here (this one is `{}`)",
            adapter.meta.method
        )
    })
}

/// The `adapter_config.json` peft 0.21.2 writes for `adapter`.
fn peft_config(adapter: &AdapterFile, kind: Family, paths: &[String]) -> Result<serde_json::Value> {
    let mut config = serde_json::json!({
        "target_modules": paths,
        "peft_version": "0.21.2",
        "init_weights": true,
        "inference_mode": true,
        "module_dropout": 0.0,
        "modules_to_save": null,
        "exclude_modules": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "task_type": null,
        "base_model_name_or_path": null,
        "revision": null,
        "auto_mapping": {
            "base_model_class": "UNet2DConditionModel",
            "parent_library": "diffusers.models.unets.unet_2d_condition"
        },
    });
    let fields = match kind {
        Family::Oft => {
            let oft: Oft = serde_json::from_value(adapter.meta.settings.clone())?;
            let (r, size) = match oft.blocks {
                OftBlocks::Count(n) => (n, 0),
                OftBlocks::Size(n) => (0, n),
            };
            serde_json::json!({
                "peft_type": "OFT", "r": r, "oft_block_size": size, "coft": oft.coft,
                "eps": oft.eps, "block_share": oft.block_share,
                "use_cayley_neumann": oft.cayley == CayleyForm::Neumann,
                "num_cayley_neumann_terms": oft.neumann_terms,
                "bias": "none", "fan_in_fan_out": false,
            })
        }
        Family::Loha | Family::Lokr => {
            let per_layer = ranks_and_alphas(adapter, kind, paths)?;
            let rank = most_common(per_layer.iter().map(|(r, _)| *r)).unwrap_or(1);
            let alpha = f64::from_bits(
                most_common(per_layer.iter().map(|(_, a)| a.to_bits() as i64)).unwrap_or(0) as u64,
            );
            let rank_pattern: serde_json::Map<String, serde_json::Value> = paths
                .iter()
                .zip(&per_layer)
                .filter(|(_, (r, _))| *r != rank)
                .map(|(p, (r, _))| (p.clone(), (*r).into()))
                .collect();
            let alpha_pattern: serde_json::Map<String, serde_json::Value> = paths
                .iter()
                .zip(&per_layer)
                .filter(|(_, (_, a))| *a != alpha)
                .map(|(p, (_, a))| (p.clone(), json_number(*a)))
                .collect();
            let mut fields = serde_json::json!({
                "r": rank, "alpha": json_number(alpha), "rank_pattern": rank_pattern,
                "alpha_pattern": alpha_pattern, "rank_dropout": 0.0,
            });
            if kind == Family::Loha {
                let loha: Loha = serde_json::from_value(adapter.meta.settings.clone())?;
                fields["peft_type"] = "LOHA".into();
                fields["use_effective_conv2d"] = loha.effective_conv2d.into();
            } else {
                let lokr: Lokr = serde_json::from_value(adapter.meta.settings.clone())?;
                fields["peft_type"] = "LOKR".into();
                fields["use_effective_conv2d"] = lokr.effective_conv2d.into();
                fields["decompose_both"] = lokr.decompose_both.into();
                fields["decompose_factor"] = lokr.decompose_factor.unwrap_or(-1).into();
                fields["rank_dropout_scale"] = false.into();
            }
            fields
        }
    };
    for (key, value) in fields.as_object().expect("an object") {
        config[key] = value.clone();
    }
    Ok(config)
}

/// Writes a difftune LoHa, LoKr or OFT adapter as the peft folder `dir`.
pub fn export_peft(adapter: &AdapterFile, _: Option<&UNetConfig>, dir: &Path) -> Result<()> {
    let kind = kind_of(adapter)?;
    let paths: Vec<String> = layers(&adapter.tensors, kind)?.into_keys().collect();
    let config = peft_config(adapter, kind, &paths)?;
    let tensors: Vec<(String, Tensor)> = adapter
        .tensors
        .iter()
        .map(|(n, t)| (format!("{PEFT_PREFIX}{n}"), t.shallow_clone()))
        .collect();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    save_tensors(
        &dir.join(PEFT_WEIGHTS),
        &tensors,
        Some(HashMap::from([("format".into(), "pt".into())])),
    )?;
    crate::util::fs::write_json(&dir.join(PEFT_CONFIG), &config)
}

/// The rank LyCORIS loaders divide alpha by for a LoKr layer: that of its decomposed factor, if any.
fn lokr_loader_rank(parts: &BTreeMap<String, Tensor>) -> Option<i64> {
    parts
        .get("lokr_w1_b")
        .or_else(|| parts.get("lokr_w2_b"))
        .map(|t| t.size()[0])
}

/// Writes a difftune LoHa or LoKr adapter in the LyCORIS/kohya layout (one `.safetensors`).
pub fn export_kohya(adapter: &AdapterFile, unet: Option<&UNetConfig>, file: &Path) -> Result<()> {
    let layout = KohyaLayout::written_for(unet)?;
    let kind = kind_of(adapter)?;
    if kind == Family::Oft {
        bail!("OFT adapters have no LyCORIS/kohya form here; export them as peft");
    }
    let layers = layers(&adapter.tensors, kind)?;
    let paths: Vec<String> = layers.keys().cloned().collect();
    let mut tensors = Vec::new();
    for ((path, parts), (rank, alpha)) in
        layers.iter().zip(ranks_and_alphas(adapter, kind, &paths)?)
    {
        let stem = layout.name(path)?;
        // Loaders scale a LoKr layer without decomposed factors by 1: fold alpha / r in.
        let folded = kind == Family::Lokr && lokr_loader_rank(parts).is_none();
        for (part, t) in parts {
            let t = if folded && part == "lokr_w1" {
                t * (alpha / rank as f64)
            } else {
                t.shallow_clone()
            };
            tensors.push((format!("{stem}.{part}"), t));
        }
        let stored_alpha = if folded { rank as f64 } else { alpha };
        tensors.push((
            format!("{stem}.alpha"),
            Tensor::scalar_tensor(stored_alpha, (Kind::Float, tch::Device::Cpu)),
        ));
    }
    save_tensors(file, &tensors, None)
}

/// Whether tensor names are LyCORIS LoHa or LoKr ones.
pub fn is_lycoris(names: &[String]) -> bool {
    names
        .iter()
        .any(|n| split_part(n, &LOHA_PARTS).is_some() || split_part(n, &LOKR_PARTS).is_some())
}

/// Reads a LyCORIS/kohya LoHa or LoKr file, its layer names mapped through the U-Net's (`unet_vs`).
pub fn import_kohya(file: &Path, unet_vs: &nn::VarStore) -> Result<AdapterFile> {
    let by_kohya = kohya_names(unet_vs)?;
    let read = || -> Result<AdapterFile> {
        let mut alphas: HashMap<String, f64> = HashMap::new();
        let mut tensors = BTreeMap::new();
        for (key, t) in read_all(file)? {
            let (stem, part) = key
                .split_once('.')
                .with_context(|| format!("tensor `{key}`"))?;
            let path = by_kohya
                .get(stem)
                .with_context(|| format!("`{stem}` names no layer of this U-Net"))?;
            if part == "alpha" {
                alphas.insert(path.clone(), t.reshape([-1]).double_value(&[0]));
            } else {
                tensors.insert(format!("{path}.{part}"), t);
            }
        }
        let kind = if tensors.keys().any(|n| split_part(n, &LOKR_PARTS).is_some()) {
            Family::Lokr
        } else {
            Family::Loha
        };
        let layers = layers(&tensors, kind)?;
        let settings = kohya_settings(kind, &layers, &alphas);
        imported(kind.method(), settings, tensors)
    };
    read().with_context(|| format!("LyCORIS file {}", file.display()))
}

/// Settings reproducing the loaders' scales: LoHa alpha / r; LoKr alpha / r with a decomposed
/// factor, else 1 (its rank then set high enough for full factors, alpha equal to it).
fn kohya_settings(
    kind: Family,
    layers: &BTreeMap<String, BTreeMap<String, Tensor>>,
    alphas: &HashMap<String, f64>,
) -> serde_json::Value {
    let mut ranks = Vec::new();
    for (path, parts) in layers {
        let rank = match kind {
            Family::Loha => parts.get("hada_w1_b").map_or(1, |t| t.size()[0]),
            _ => lokr_loader_rank(parts).unwrap_or_else(|| {
                let widest = parts
                    .values()
                    .flat_map(|t| t.size()[..2].to_vec())
                    .max()
                    .unwrap_or(1);
                (widest + 1) / 2
            }),
        };
        let alpha = match (kind, lokr_loader_rank(parts)) {
            (Family::Lokr, None) => rank as f64,
            _ => alphas.get(path).copied().unwrap_or(rank as f64),
        };
        ranks.push((path.clone(), rank, alpha));
    }
    let rank = most_common(ranks.iter().map(|(_, r, _)| *r)).unwrap_or(1);
    let alpha = ranks.first().map_or(1.0, |(_, _, a)| *a);
    let rank_pattern: serde_json::Map<String, serde_json::Value> = ranks
        .iter()
        .filter(|(_, r, _)| *r != rank)
        .map(|(p, r, _)| (p.clone(), (*r).into()))
        .collect();
    let alpha_pattern: serde_json::Map<String, serde_json::Value> = ranks
        .iter()
        .filter(|(_, _, a)| *a != alpha)
        .map(|(p, _, a)| (p.clone(), (*a).into()))
        .collect();
    let has = |part: &str| layers.values().any(|parts| parts.contains_key(part));
    let mut settings = serde_json::json!({
        "rank": rank,
        "alpha": alpha,
        "targets": layers.keys().collect::<Vec<_>>(),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    });
    match kind {
        Family::Loha => settings["effective_conv2d"] = has("hada_t1").into(),
        _ => {
            settings["effective_conv2d"] = has("lokr_t2").into();
            settings["decompose_both"] = has("lokr_w1_a").into();
        }
    }
    settings
}
