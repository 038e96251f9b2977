//! LoRA adapters in the file formats of other tools, both ways:
//! - peft: a folder with `adapter_model.safetensors` (keys `base_model.model.<path>.lora_A.weight`,
//!   `.lora_B.weight`, DoRA's `.lora_magnitude_vector`) and `adapter_config.json` (`r`,
//!   `lora_alpha`, `rank_pattern`, `alpha_pattern`, `use_rslora`, `use_dora`, ...);
//! - diffusers: `pytorch_lora_weights.safetensors` with `unet.<path>.lora_A.weight`/`lora_B` keys,
//!   alpha from diffusers' `lora_adapter_metadata` header or `<path>.alpha` scalars if present, else
//!   alpha = rank (scale 1); on export the scale is folded into B so every diffusers version loads it;
//! - kohya (sd-scripts, A1111, ComfyUI): `lora_unet_<path with . replaced by _>.lora_down.weight`
//!   (A), `.lora_up.weight` (B) and `.alpha` (a scalar). The path is the layer's as sd-scripts
//!   names it: in the diffusers layout for SD 1.x/2.x (sd-scripts trains those on diffusers'
//!   U-Net: `lora_unet_down_blocks_0_attentions_0_...`), in the LDM layout for SDXL (sd-scripts
//!   trains SDXL on Stability's U-Net: `lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q`).
//!   A1111, ComfyUI and diffusers read both layouts for every family, and so does difftune: the
//!   `_`-joined names are mapped back through the U-Net's own layer names and their LDM names.
//!   DoRA has no kohya form here.
//!
//! The LoRA writers here are registered with LoRA in [`super::METHODS`]; [`super::export`] writes
//! an adapter with them (and refuses the formats a method cannot go to).
//!
//! Text-encoder LoRA weights (kohya's `lora_te_`, `lora_te1_`, `lora_te2_`; diffusers'
//! `text_encoder.`, `text_encoder_2.`) are refused rather than dropped: difftune adapts only the
//! U-Net, and ignoring part of a LoRA would silently give another model.
use super::export::{kohya_names, KohyaLayout, PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS};
use super::file::{sidecar_path, AdapterFile, AdapterMeta, FORMAT};
use super::lora::{lora_a_name, lora_b_name, magnitude_name, Lora};
use super::pattern::no_match_error;
use super::{Identity, Registered, Tuned, TuningMethod};
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::weights::{read_all, read_metadata, save_tensors};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{nn, Kind, Tensor};

const DIFFUSERS_WEIGHTS: &str = "pytorch_lora_weights.safetensors";
const DIFFUSERS_PREFIX: &str = "unet.";

/// One adapted layer, format-neutral.
#[derive(Debug)]
struct LoraLayer {
    path: String,
    a: Tensor,
    b: Tensor,
    magnitude: Option<Tensor>,
    alpha: f64,
}

impl LoraLayer {
    fn rank(&self) -> i64 {
        self.a.size()[0]
    }
}

fn most_common<T: Ord + Copy>(values: impl Iterator<Item = T>) -> Option<T> {
    let mut counts: BTreeMap<T, usize> = BTreeMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|(v, _)| v)
}

/// The layers' ranks and alphas as one global value each plus exact-path overrides.
struct Summary {
    rank: i64,
    alpha: f64,
    rank_pattern: BTreeMap<String, i64>,
    alpha_pattern: BTreeMap<String, f64>,
}

fn summarise(layers: &[LoraLayer]) -> Summary {
    let rank = most_common(layers.iter().map(LoraLayer::rank)).unwrap_or(1);
    let alpha = f64::from_bits(
        most_common(layers.iter().map(|l| l.alpha.to_bits())).unwrap_or(1f64.to_bits()),
    );
    Summary {
        rank,
        alpha,
        rank_pattern: layers
            .iter()
            .filter(|l| l.rank() != rank)
            .map(|l| (l.path.clone(), l.rank()))
            .collect(),
        alpha_pattern: layers
            .iter()
            .filter(|l| l.alpha != alpha)
            .map(|l| (l.path.clone(), l.alpha))
            .collect(),
    }
}

/// The layers of a difftune LoRA adapter.
fn layers_of(adapter: &AdapterFile) -> Result<Vec<LoraLayer>> {
    if adapter.meta.method != Lora::NAME {
        bail!(
            "only LoRA adapters can be exported to other tools' LoRA formats (this one is `{}`)",
            adapter.meta.method
        );
    }
    let lora: Lora =
        serde_json::from_value(adapter.meta.settings.clone()).context("LoRA adapter settings")?;
    let mut layers = Vec::new();
    for (name, a) in &adapter.tensors {
        let Some(path) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let b = adapter
            .tensors
            .get(&lora_b_name(path))
            .with_context(|| format!("the adapter has no `{}`", lora_b_name(path)))?;
        let rank = a.size()[0];
        layers.push(LoraLayer {
            path: path.to_string(),
            a: a.shallow_clone(),
            b: b.shallow_clone(),
            magnitude: adapter
                .tensors
                .get(&magnitude_name(path))
                .map(Tensor::shallow_clone),
            alpha: lora.alpha_for(path, rank)?,
        });
    }
    if layers.is_empty() {
        bail!("the LoRA adapter has no layers");
    }
    Ok(layers)
}

/// A difftune LoRA adapter (targets = the layers' exact paths) holding `layers`.
fn adapter_of(layers: Vec<LoraLayer>, source: &Path) -> Result<AdapterFile> {
    if layers.is_empty() {
        bail!("{} has no LoRA layers", source.display());
    }
    let dora = layers[0].magnitude.is_some();
    if let Some(odd) = layers.iter().find(|l| l.magnitude.is_some() != dora) {
        bail!(
            "{}: layer `{}` differs from the others in having a DoRA magnitude",
            source.display(),
            odd.path
        );
    }
    let summary = summarise(&layers);
    let alpha_is_rank = layers.iter().all(|l| l.alpha == l.rank() as f64);
    let lora = Lora {
        rank: summary.rank,
        alpha: (!alpha_is_rank).then_some(summary.alpha),
        targets: layers.iter().map(|l| l.path.clone()).collect(),
        rank_pattern: summary.rank_pattern,
        alpha_pattern: if alpha_is_rank {
            BTreeMap::new()
        } else {
            summary.alpha_pattern
        },
        dora,
    };
    lora.validate()
        .with_context(|| format!("LoRA read from {}", source.display()))?;
    let mut tensors = BTreeMap::new();
    for l in layers {
        tensors.insert(lora_a_name(&l.path), l.a);
        tensors.insert(lora_b_name(&l.path), l.b);
        if let Some(m) = l.magnitude {
            tensors.insert(magnitude_name(&l.path), m);
        }
    }
    Ok(AdapterFile {
        meta: AdapterMeta {
            format: FORMAT.into(),
            method: Lora::NAME.into(),
            settings: lora.settings(),
            base_model: None,
            difftune_version: env!("CARGO_PKG_VERSION").into(),
        },
        tensors,
    })
}

/// A LoRA adapter as a peft adapter folder (the writer [`super::METHODS`] registers for LoRA).
pub(crate) fn write_lora_peft(
    adapter: &AdapterFile,
    _: Option<&UNetConfig>,
    dir: &Path,
) -> Result<()> {
    export_peft(&layers_of(adapter)?, dir)
}

/// A LoRA adapter as a diffusers LoRA folder.
pub(crate) fn write_lora_diffusers(
    adapter: &AdapterFile,
    _: Option<&UNetConfig>,
    dir: &Path,
) -> Result<()> {
    export_diffusers(&layers_of(adapter)?, dir)
}

/// A LoRA adapter as a kohya LoRA file, named as sd-scripts names the layers of `unet`.
pub(crate) fn write_lora_kohya(
    adapter: &AdapterFile,
    unet: Option<&UNetConfig>,
    file: &Path,
) -> Result<()> {
    export_kohya(&layers_of(adapter)?, &KohyaLayout::written_for(unet)?, file)
}

/// A JSON number, integral when the value is (peft declares `lora_alpha` an int).
fn json_number(x: f64) -> serde_json::Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        serde_json::json!(x as i64)
    } else {
        serde_json::json!(x)
    }
}

fn export_peft(layers: &[LoraLayer], dir: &Path) -> Result<()> {
    let mut tensors = Vec::new();
    for l in layers {
        tensors.push((
            format!("{PEFT_PREFIX}{}", lora_a_name(&l.path)),
            l.a.shallow_clone(),
        ));
        tensors.push((
            format!("{PEFT_PREFIX}{}", lora_b_name(&l.path)),
            l.b.shallow_clone(),
        ));
        if let Some(m) = &l.magnitude {
            tensors.push((
                format!("{PEFT_PREFIX}{}", magnitude_name(&l.path)),
                m.shallow_clone(),
            ));
        }
    }
    let summary = summarise(layers);
    let alpha_pattern: serde_json::Map<String, serde_json::Value> = summary
        .alpha_pattern
        .iter()
        .map(|(k, &v)| (k.clone(), json_number(v)))
        .collect();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "r": summary.rank,
        "lora_alpha": json_number(summary.alpha),
        "target_modules": layers.iter().map(|l| l.path.clone()).collect::<Vec<_>>(),
        "rank_pattern": summary.rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": layers[0].magnitude.is_some(),
        "use_rslora": false,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": false,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "task_type": null,
        "base_model_name_or_path": null,
        "revision": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "auto_mapping": {
            "base_model_class": "UNet2DConditionModel",
            "parent_library": "diffusers.models.unets.unet_2d_condition"
        },
    });
    save_tensors(
        &dir.join(PEFT_WEIGHTS),
        &tensors,
        Some(HashMap::from([("format".into(), "pt".into())])),
    )?;
    crate::util::fs::write_json(&dir.join(PEFT_CONFIG), &config)
}

fn export_diffusers(layers: &[LoraLayer], dir: &Path) -> Result<()> {
    let mut tensors = Vec::new();
    for l in layers {
        // diffusers takes alpha = rank when the file gives none: fold alpha / rank into B.
        let b = &l.b * (l.alpha / l.rank() as f64);
        tensors.push((
            format!("{DIFFUSERS_PREFIX}{}", lora_a_name(&l.path)),
            l.a.shallow_clone(),
        ));
        tensors.push((format!("{DIFFUSERS_PREFIX}{}", lora_b_name(&l.path)), b));
        if let Some(m) = &l.magnitude {
            tensors.push((
                format!("{DIFFUSERS_PREFIX}{}", magnitude_name(&l.path)),
                m.shallow_clone(),
            ));
        }
    }
    save_tensors(
        &dir.join(DIFFUSERS_WEIGHTS),
        &tensors,
        Some(HashMap::from([("format".into(), "pt".into())])),
    )
}

fn export_kohya(layers: &[LoraLayer], layout: &KohyaLayout, file: &Path) -> Result<()> {
    let mut tensors = Vec::new();
    for l in layers {
        if l.magnitude.is_some() {
            bail!("DoRA adapters have no kohya form here; export them as peft or diffusers");
        }
        let stem = layout.name(&l.path)?;
        tensors.push((format!("{stem}.lora_down.weight"), l.a.shallow_clone()));
        tensors.push((format!("{stem}.lora_up.weight"), l.b.shallow_clone()));
        tensors.push((
            format!("{stem}.alpha"),
            Tensor::scalar_tensor(l.alpha, (Kind::Float, tch::Device::Cpu)),
        ));
    }
    save_tensors(file, &tensors, None)
}

/// The parts of a peft `LoraConfig` that change what a LoRA computes.
#[derive(Debug, Deserialize)]
struct PeftConfig {
    #[serde(default = "lora_type")]
    peft_type: String,
    lora_alpha: f64,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    lora_bias: bool,
    #[serde(default = "no_bias")]
    bias: String,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
}

fn lora_type() -> String {
    "LORA".into()
}
fn no_bias() -> String {
    "none".into()
}

impl PeftConfig {
    fn check(&self) -> Result<()> {
        if self.peft_type != "LORA" {
            bail!("peft_type `{}` is not LORA", self.peft_type);
        }
        if self.fan_in_fan_out {
            bail!("fan_in_fan_out adapters (for Conv1D layers) do not apply to the U-Net");
        }
        if self.lora_bias || self.bias != "none" {
            bail!(
                "adapters that train biases (bias `{}`, lora_bias {}) are not supported",
                self.bias,
                self.lora_bias
            );
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            bail!(
                "adapters with modules_to_save (fully trained copies of layers) are not supported"
            );
        }
        Ok(())
    }

    /// The layer's alpha as difftune scales it (`alpha / rank`): peft's `alpha_pattern` keys are
    /// regexes matched at the end of the path, read here as literal suffixes; rsLoRA's
    /// `alpha / sqrt(rank)` becomes alpha * sqrt(rank).
    fn alpha_for(&self, path: &str, rank: i64) -> Result<f64> {
        let mut alpha = self.lora_alpha;
        for (key, &value) in &self.alpha_pattern {
            if key.chars().any(|c| "*+?()[]{}|^$\\".contains(c)) {
                bail!("alpha_pattern key `{key}` is a regex; only literal module-name suffixes are supported");
            }
            if path == key || path.ends_with(&format!(".{key}")) {
                alpha = value;
                break;
            }
        }
        Ok(if self.use_rslora {
            alpha * (rank as f64).sqrt()
        } else {
            alpha
        })
    }
}

/// Groups `<path>.<part>` tensors by layer. `parts` maps each accepted suffix to a slot:
/// 0 = A, 1 = B, 2 = DoRA magnitude, 3 = alpha scalar.
fn group_layers(
    tensors: BTreeMap<String, Tensor>,
    source: &Path,
    mut layer_path: impl FnMut(&str) -> Result<Option<String>>,
    parts: &[(&str, usize)],
) -> Result<BTreeMap<String, [Option<Tensor>; 4]>> {
    let mut layers: BTreeMap<String, [Option<Tensor>; 4]> = BTreeMap::new();
    for (key, t) in tensors {
        let Some((suffix, slot)) = parts.iter().find(|(s, _)| key.ends_with(s)) else {
            bail!(
                "{}: tensor `{key}` is not part of a LoRA layer (LyCORIS or another adapter type?)",
                source.display()
            );
        };
        let stem = &key[..key.len() - suffix.len()];
        let Some(path) = layer_path(stem)? else {
            continue;
        };
        layers.entry(path).or_default()[*slot] = Some(t);
    }
    Ok(layers)
}

/// Builds the layers from grouped tensors, alpha from `alpha_for(path, rank, alpha scalar)`.
fn finish_layers(
    grouped: BTreeMap<String, [Option<Tensor>; 4]>,
    source: &Path,
    alpha_for: impl Fn(&str, i64, Option<&Tensor>) -> Result<f64>,
) -> Result<Vec<LoraLayer>> {
    let mut layers = Vec::new();
    for (path, [a, b, magnitude, alpha]) in grouped {
        let (Some(a), Some(b)) = (a, b) else {
            bail!(
                "{}: layer `{path}` lacks its down (A) or up (B) matrix",
                source.display()
            );
        };
        if b.size().get(1) != Some(&a.size()[0]) {
            bail!(
                "{}: layer `{path}` has A {:?} and B {:?} of different ranks",
                source.display(),
                a.size(),
                b.size()
            );
        }
        let alpha = alpha_for(&path, a.size()[0], alpha.as_ref())?;
        let to_f32 = |t: Tensor| t.to_kind(Kind::Float);
        layers.push(LoraLayer {
            path,
            a: to_f32(a),
            b: to_f32(b),
            magnitude: magnitude.map(to_f32),
            alpha,
        });
    }
    Ok(layers)
}

/// The value of a one-element tensor (alphas are stored as `[]` or `[1]`).
fn scalar(t: &Tensor) -> f64 {
    t.reshape([-1]).double_value(&[0])
}

fn import_peft(dir: &Path) -> Result<AdapterFile> {
    if let Some(adapter) = super::lycoris::import_peft(dir)? {
        return Ok(adapter);
    }
    let config_path = dir.join(PEFT_CONFIG);
    let config: PeftConfig = crate::util::fs::read_json(&config_path).context("peft config")?;
    config
        .check()
        .with_context(|| format!("peft config {}", config_path.display()))?;
    let weights = dir.join(PEFT_WEIGHTS);
    let parts = [
        (".lora_A.weight", 0),
        (".lora_B.weight", 1),
        (".lora_magnitude_vector", 2),
    ];
    let grouped = group_layers(
        read_all(&weights)?,
        &weights,
        |stem| {
            Ok(Some(
                stem.strip_prefix(PEFT_PREFIX).unwrap_or(stem).to_string(),
            ))
        },
        &parts,
    )?;
    let layers = finish_layers(grouped, &weights, |path, rank, _| {
        config.alpha_for(path, rank)
    })?;
    adapter_of(layers, &weights)
}

fn import_diffusers(file: &Path) -> Result<AdapterFile> {
    let metadata = read_metadata(file)?;
    let config: Option<PeftConfig> = match metadata.get("lora_adapter_metadata") {
        None => None,
        Some(raw) => {
            let packed: serde_json::Map<String, serde_json::Value> = serde_json::from_str(raw)
                .with_context(|| format!("{}: parsing lora_adapter_metadata", file.display()))?;
            let unet: serde_json::Map<String, serde_json::Value> = packed
                .into_iter()
                .filter_map(|(k, v)| k.strip_prefix(DIFFUSERS_PREFIX).map(|k| (k.to_string(), v)))
                .collect();
            let config: PeftConfig = serde_json::from_value(unet.into()).with_context(|| {
                format!(
                    "{}: the U-Net part of lora_adapter_metadata",
                    file.display()
                )
            })?;
            config
                .check()
                .with_context(|| format!("{}: lora_adapter_metadata", file.display()))?;
            Some(config)
        }
    };
    let parts = [
        (".lora_A.weight", 0),
        (".lora_B.weight", 1),
        (".lora_magnitude_vector", 2),
        (".alpha", 3),
    ];
    let grouped = group_layers(
        read_all(file)?,
        file,
        |stem| match stem.strip_prefix(DIFFUSERS_PREFIX) {
            Some(path) => Ok(Some(path.to_string())),
            None if text_encoder_of(stem).is_some() => {
                bail!(
                    "{} has LoRA weights for {} (`{stem}`); difftune adapts only the U-Net",
                    file.display(),
                    text_encoder_of(stem).expect("matched")
                )
            }
            None => bail!(
                "{}: tensor `{stem}` is neither `unet.` nor `text_encoder.` prefixed",
                file.display()
            ),
        },
        &parts,
    )?;
    let layers = finish_layers(grouped, file, |path, rank, alpha| match (&config, alpha) {
        (Some(config), _) => config.alpha_for(path, rank),
        (None, Some(alpha)) => Ok(scalar(alpha)),
        (None, None) => Ok(rank as f64),
    })?;
    adapter_of(layers, file)
}

/// Which text encoder a kohya or diffusers LoRA key adapts, if it adapts one.
fn text_encoder_of(stem: &str) -> Option<&'static str> {
    [
        ("lora_te1_", "the first text encoder"),
        ("lora_te2_", "the second text encoder"),
        ("lora_te_", "the text encoder"),
        ("text_encoder_2.", "the second text encoder"),
        ("text_encoder.", "the text encoder"),
    ]
    .into_iter()
    .find(|(prefix, _)| stem.starts_with(prefix))
    .map(|(_, which)| which)
}

fn import_kohya(file: &Path, unet_vs: &nn::VarStore) -> Result<AdapterFile> {
    let by_kohya = kohya_names(unet_vs)?;
    let kohya_names: Vec<String> = by_kohya.keys().cloned().collect();
    let parts = [
        (".lora_down.weight", 0),
        (".lora_up.weight", 1),
        (".alpha", 3),
        (".dora_scale", 2),
    ];
    let grouped = group_layers(
        read_all(file)?,
        file,
        |stem| {
            if let Some(which) = text_encoder_of(stem) {
                bail!(
                    "{} has LoRA weights for {which} (`{stem}`); difftune adapts only the U-Net",
                    file.display()
                );
            }
            match by_kohya.get(stem) {
                Some(path) => Ok(Some(path.clone())),
                None => Err(no_match_error("kohya layer", stem, &kohya_names)
                    .context(format!("reading {}", file.display()))),
            }
        },
        &parts,
    )?;
    if grouped.values().any(|slots| slots[2].is_some()) {
        bail!(
            "{}: kohya DoRA (`dora_scale`) is not supported",
            file.display()
        );
    }
    let layers = finish_layers(grouped, file, |_, rank, alpha| {
        Ok(alpha.map_or(rank as f64, scalar))
    })?;
    adapter_of(layers, file)
}

/// Loads the adapter file at `path` (any format [`read_adapter`] reads) onto `unet`, checking
/// that it was trained on `base_model`: the one way an adapter file is applied.
pub fn load_adapter(
    path: &Path,
    unet: &mut UNet2DConditionModel,
    unet_vs: &nn::VarStore,
    base_model: &str,
) -> Result<Tuned> {
    read_adapter(path, unet_vs)
        .and_then(|adapter| adapter.attach(unet, unet_vs, base_model))
        .with_context(|| format!("loading adapter {}", path.display()))
}

/// Reads an adapter in any format difftune knows: a difftune adapter (a `.safetensors` with its
/// `.json` sidecar), a peft adapter folder (or its `adapter_model.safetensors`), a diffusers LoRA
/// (its folder or `pytorch_lora_weights.safetensors`, or any file with `unet.` keys) or a kohya
/// LoRA file (`lora_unet_` keys; mapped through the layer names of `unet_vs`). Imported
/// adapters record no base model.
pub fn read_adapter(path: &Path, unet_vs: &nn::VarStore) -> Result<AdapterFile> {
    if !path.exists() {
        bail!("adapter {} does not exist", path.display());
    }
    if path.is_dir() {
        if path.join(PEFT_WEIGHTS).is_file() {
            return import_peft(path);
        }
        if path.join(DIFFUSERS_WEIGHTS).is_file() {
            return import_diffusers(&path.join(DIFFUSERS_WEIGHTS));
        }
        bail!(
            "{} holds neither a peft adapter ({PEFT_WEIGHTS} + {PEFT_CONFIG}) nor a diffusers LoRA ({DIFFUSERS_WEIGHTS})",
            path.display()
        );
    }
    if sidecar_path(path).is_file() {
        return AdapterFile::load(path);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    if path.file_name().is_some_and(|n| n == PEFT_WEIGHTS) && dir.join(PEFT_CONFIG).is_file() {
        return import_peft(dir);
    }
    let names: Vec<String> = crate::model::weights::MappedSafetensors::open(path)?
        .tensors()
        .names()
        .into_iter()
        .map(str::to_string)
        .collect();
    if names
        .iter()
        .any(|n| n.starts_with("lora_unet_") || n.starts_with("lora_te"))
    {
        if super::lycoris::is_lycoris(&names) {
            return super::lycoris::import_kohya(path, unet_vs);
        }
        return import_kohya(path, unet_vs);
    }
    if names
        .iter()
        .any(|n| n.starts_with(DIFFUSERS_PREFIX) || n.starts_with("text_encoder"))
    {
        return import_diffusers(path);
    }
    bail!(
        "{}: not a known adapter: no difftune sidecar {}, and keys like `{}` are none of peft ({PEFT_PREFIX}...), \
         diffusers (unet....) or kohya (lora_unet_...)",
        path.display(),
        sidecar_path(path).display(),
        names.first().map(String::as_str).unwrap_or("")
    )
}
