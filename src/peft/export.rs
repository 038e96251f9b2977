//! Writing an adapter in another tool's file format: which formats there are and which tools load
//! each ([`AdapterFormat`]), the names those files use, and [`export`]. Each method's writers are
//! registered with it in [`super::METHODS`] (LoRA's in [`super::formats`], LoHa's, LoKr's and
//! OFT's in [`super::lycoris`]); a method whose settings rule out a format it has a writer for
//! says so ([`super::TuningMethod::export_refusal`], e.g. DoRA has no kohya form).
use super::file::AdapterFile;
use super::{registration, TuningMethod};
use crate::model::ldm::{NameMap, UnetLayout};
use crate::model::unet::UNetConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::nn;

/// A peft adapter folder's weights and config, and the prefix of its tensors' names.
pub(crate) const PEFT_WEIGHTS: &str = "adapter_model.safetensors";
pub(crate) const PEFT_CONFIG: &str = "adapter_config.json";
pub(crate) const PEFT_PREFIX: &str = "base_model.model.";
const KOHYA_PREFIX: &str = "lora_unet_";

/// A U-Net layer's name in kohya's (and LyCORIS's) files: `lora_unet_` + its path with `_` for `.`.
fn kohya_name(path: &str) -> String {
    format!("{KOHYA_PREFIX}{}", path.replace('.', "_"))
}

/// The layer path a kohya file names a layer by.
pub(crate) enum KohyaLayout {
    /// Our (diffusers') path, as sd-scripts writes SD 1.x/2.x LoRAs.
    Diffusers,
    /// The LDM path, as sd-scripts writes SDXL LoRAs.
    Ldm(NameMap),
}

impl KohyaLayout {
    /// The layout sd-scripts writes for the U-Net configured by `unet`: LDM for SDXL's (the one
    /// with the `text_time` added embedding). Without a config, the diffusers layout, which
    /// A1111, ComfyUI and diffusers read for every family too.
    pub(crate) fn written_for(unet: Option<&UNetConfig>) -> Result<Self> {
        match unet {
            Some(unet) if unet.added_embedding()?.is_some() => {
                Ok(Self::Ldm(UnetLayout::from_config(unet).names()))
            }
            _ => Ok(Self::Diffusers),
        }
    }

    /// The kohya name of the layer at (diffusers) `path`.
    pub(crate) fn name(&self, path: &str) -> Result<String> {
        match self {
            Self::Diffusers => Ok(kohya_name(path)),
            Self::Ldm(map) => ldm_path(map, path)
                .map(|ldm| kohya_name(&ldm))
                .with_context(|| format!("layer `{path}` has no LDM name")),
        }
    }
}

/// The LDM path of the layer at (diffusers) `path`: the map works on parameter names.
fn ldm_path(map: &NameMap, path: &str) -> Option<String> {
    let ldm = map.to_ldm(&format!("{path}.weight"))?;
    ldm.strip_suffix(".weight").map(str::to_string)
}

/// Other tools' adapter file formats, and the tools that load each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterFormat {
    /// sd-scripts' LoRA file: ComfyUI's and A1111's LoRA loaders.
    Kohya,
    /// diffusers' `pytorch_lora_weights.safetensors`: `pipe.load_lora_weights(FOLDER)`.
    Diffusers,
    /// A peft adapter folder: `PeftModel.from_pretrained(unet, FOLDER)`.
    Peft,
}

impl AdapterFormat {
    pub const ALL: [Self; 3] = [Self::Kohya, Self::Diffusers, Self::Peft];

    pub fn name(self) -> &'static str {
        match self {
            Self::Kohya => "kohya",
            Self::Diffusers => "diffusers",
            Self::Peft => "peft",
        }
    }

    /// Whether it is written as one file (a `.safetensors`) rather than a folder.
    pub fn is_file(self) -> bool {
        self == Self::Kohya
    }

    /// Where a run writes it beside its adapter file `adapter` (`OUT/adapter.safetensors`):
    /// `OUT/adapter-kohya.safetensors`, `OUT/adapter-diffusers/`, `OUT/adapter-peft/`.
    pub fn beside(self, adapter: &Path) -> PathBuf {
        let stem = adapter.file_stem().unwrap_or_default().to_string_lossy();
        let name = match self.is_file() {
            true => format!("{stem}-{}.safetensors", self.name()),
            false => format!("{stem}-{}", self.name()),
        };
        adapter.with_file_name(name)
    }
}

impl std::str::FromStr for AdapterFormat {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| format!("unknown adapter format `{name}` (kohya, diffusers or peft)"))
    }
}

impl std::fmt::Display for AdapterFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Writes an adapter in one format at a path (a file or a folder, as the format is).
pub type ExportFn = fn(&AdapterFile, Option<&UNetConfig>, &Path) -> Result<()>;

/// The formats `method`, with its settings, can be written in: those its registration has a writer
/// for, less those its settings rule out.
pub fn export_formats(method: &dyn TuningMethod) -> Vec<AdapterFormat> {
    writers(method.name())
        .iter()
        .map(|(format, _)| *format)
        .filter(|format| method.export_refusal(*format).is_none())
        .collect()
}

/// The writers registered for the method called `name`.
fn writers(name: &str) -> &'static [(AdapterFormat, ExportFn)] {
    registration(name).map_or(&[], |r| r.writers)
}

/// Refuses a format `method` cannot be written in, saying why and naming those it can go to.
pub fn check_exports(method: &dyn TuningMethod, formats: &[AdapterFormat]) -> Result<()> {
    let can = export_formats(method);
    if let Some(format) = formats.iter().find(|f| !can.contains(f)) {
        let names: Vec<&str> = can.iter().map(|f| f.name()).collect();
        let to = match names.is_empty() {
            true => "none of them: keep difftune's adapter file (difftune sample --adapter), or bake it into \
                     the U-Net with difftune merge where the method allows"
                .to_string(),
            false => names.join(", "),
        };
        let why = method
            .export_refusal(*format)
            .map(|reason| format!(" ({reason})"))
            .unwrap_or_default();
        bail!(
            "a `{}` adapter with these settings ({}) cannot be written as {format}{why}; the formats it can go to: {to}",
            method.name(),
            method.settings()
        );
    }
    Ok(())
}

/// Writes the difftune adapter `adapter` in `format` at `out` (a `.safetensors` file for kohya,
/// a folder for diffusers and peft), after checking that its method can go to that format.
pub fn export(
    adapter: &AdapterFile,
    format: AdapterFormat,
    unet: Option<&UNetConfig>,
    out: &Path,
) -> Result<()> {
    let method = adapter.method()?;
    check_exports(method.as_ref(), &[format])?;
    let (_, write) = writers(method.name())
        .iter()
        .find(|(f, _)| *f == format)
        .expect("checked above");
    let written = match format.is_file() {
        true if out.extension().is_none_or(|e| e != "safetensors") => Err(anyhow::anyhow!(
            "a {format} adapter is one file: name it NAME.safetensors"
        )),
        true => write(adapter, unet, out),
        // A folder is written whole or not at all: beside it, then swapped into place.
        false => write_folder(out, |dir| write(adapter, unet, dir)),
    };
    written.with_context(|| {
        format!(
            "exporting the `{}` adapter as {format} to {}",
            adapter.meta.method,
            out.display()
        )
    })
}

/// Writes the folder `out` with `write` into a temp folder beside it, then puts it in place of
/// whatever folder is at `out` in one step ([`crate::util::fs::replace_dir`]).
fn write_folder(out: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let temp = tempfile::Builder::new()
        .prefix(crate::util::fs::TEMP_FILE_PREFIX)
        .tempdir_in(parent)
        .with_context(|| format!("creating a temp folder in {}", parent.display()))?;
    write(temp.path())?;
    crate::util::fs::replace_dir(&temp.keep(), out)
}

/// Every kohya name of the U-Net's layers (in the diffusers and the LDM layout) and the layer
/// it names.
pub(crate) fn kohya_names(unet_vs: &nn::VarStore) -> Result<HashMap<String, String>> {
    let variables = unet_vs.variables();
    let ldm = UnetLayout::from_diffusers_names(variables.keys().map(String::as_str))?.names();
    let mut by_kohya: HashMap<String, String> = HashMap::new();
    for path in variables.keys().filter_map(|n| n.strip_suffix(".weight")) {
        let names =
            std::iter::once(kohya_name(path)).chain(ldm_path(&ldm, path).map(|p| kohya_name(&p)));
        for name in names {
            if let Some(other) = by_kohya.insert(name, path.to_string()) {
                if other != path {
                    bail!("layers `{other}` and `{path}` have the same kohya name");
                }
            }
        }
    }
    Ok(by_kohya)
}
