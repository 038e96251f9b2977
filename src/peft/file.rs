//! Adapter files: the trained tensors of any method as safetensors (`adapter.safetensors`), with a
//! JSON sidecar (`adapter.json`) naming the method, its settings, the base U-Net they were trained
//! on and the difftune version. Loading rebuilds the method from its settings, applies it and
//! copies the tensors in by name, with exact shape checks.
use super::{copy_named, method_from_json, Tuned, TuningMethod};
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::weights::{read_all, save_tensors};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn, Tensor};

/// The sidecar's `format` value, telling difftune adapter sidecars from other JSON files.
pub const FORMAT: &str = "difftune-adapter";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterMeta {
    pub format: String,
    pub method: String,
    pub settings: serde_json::Value,
    /// Identity of the base U-Net ([`crate::model::source::ModelFiles::unet_identity`], or
    /// [`random_init_identity`]); `None` for adapters imported from other tools, which record none.
    pub base_model: Option<String>,
    pub difftune_version: String,
}

impl AdapterMeta {
    /// Reads the sidecar of the difftune adapter `path` (not its tensors).
    pub fn read(path: &Path) -> Result<Self> {
        let sidecar = sidecar_path(path);
        let meta: Self = crate::util::fs::read_json(&sidecar)
            .with_context(|| format!("the sidecar of the difftune adapter {}", path.display()))?;
        if meta.format != FORMAT {
            bail!(
                "{} is not a difftune adapter sidecar (format `{}`, expected `{FORMAT}`)",
                sidecar.display(),
                meta.format
            );
        }
        Ok(meta)
    }

    /// The method the adapter was trained with, built from its settings.
    pub fn method(&self) -> Result<Box<dyn TuningMethod>> {
        method_from_json(&self.method, &self.settings)
    }
}

#[derive(Debug)]
pub struct AdapterFile {
    pub meta: AdapterMeta,
    /// By the names the method's `apply` returns.
    pub tensors: BTreeMap<String, Tensor>,
}

/// `adapter.safetensors` -> `adapter.json`.
pub fn sidecar_path(path: &Path) -> PathBuf {
    path.with_extension("json")
}

/// The base identity of a U-Net built from `config` with random weights (no weight files to
/// fingerprint): a hash of the config.
pub fn random_init_identity(config: &UNetConfig) -> String {
    let json = serde_json::to_string(config).expect("U-Net config serialises");
    let digest = Sha256::digest(json.as_bytes());
    format!(
        "random-init:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

impl AdapterFile {
    /// The adapter for `trained` (as returned by `method.apply`, after training). Tensors are
    /// detached views, not copies: save it before training goes on.
    pub fn from_trained(
        method: &dyn TuningMethod,
        trained: &[(String, Tensor)],
        base_model: Option<String>,
    ) -> Result<Self> {
        let (settings, tensors) = method.export(trained)?;
        Ok(Self {
            meta: AdapterMeta {
                format: FORMAT.into(),
                method: method.name().into(),
                settings,
                base_model,
                difftune_version: env!("CARGO_PKG_VERSION").into(),
            },
            tensors: tensors.into_iter().collect(),
        })
    }

    /// Writes the tensors to `path` and the sidecar next to it, each atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        save_tensors(path, &tensors, None)
            .with_context(|| format!("saving adapter {}", path.display()))?;
        crate::util::fs::write_json(&sidecar_path(path), &self.meta)
    }

    /// Reads a difftune adapter (`path` and its sidecar).
    pub fn load(path: &Path) -> Result<Self> {
        Ok(Self {
            meta: AdapterMeta::read(path)?,
            tensors: read_all(path)?,
        })
    }

    /// The method the adapter was trained with.
    pub fn method(&self) -> Result<Box<dyn TuningMethod>> {
        self.meta.method()
    }

    /// Refuses a base U-Net other than the one the adapter was trained on.
    pub fn check_base(&self, base_model: &str) -> Result<()> {
        match &self.meta.base_model {
            Some(trained_on) if trained_on != base_model => bail!(
                "the adapter was trained on another base U-Net (identity {trained_on}) than this one ({base_model}); \
                 load it with the model it was trained on"
            ),
            _ => Ok(()),
        }
    }

    /// Attaches the file's method to `unet` and loads its tensors, after checking that it was
    /// trained on `base_model`. Training can go on from the result.
    pub fn attach(
        &self,
        unet: &mut UNet2DConditionModel,
        unet_vs: &nn::VarStore,
        base_model: &str,
    ) -> Result<Tuned> {
        self.check_base(base_model)?;
        // The seed does not matter: every new tensor is overwritten from the file.
        let tuned = Tuned::attach(self.method()?, unet, unet_vs, 0)?;
        copy_named(
            &tuned.trained,
            &self.tensors,
            &format!("the `{}` adapter", self.meta.method),
        )?;
        Ok(tuned)
    }
}

/// Saves the trained tensors of `method` as a difftune adapter at `path` (plus its sidecar).
pub fn save_adapter(
    path: &Path,
    method: &dyn TuningMethod,
    trained: &[(String, Tensor)],
    base_model: &str,
) -> Result<()> {
    AdapterFile::from_trained(method, trained, Some(base_model.to_string()))?.save(path)
}
