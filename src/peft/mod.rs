//! The tuning methods (which U-Net parameters are trained, and which are added), behind one trait.
//!
//! A method is built from its settings ([`MethodSettings`]), then [`TuningMethod::apply`]
//! attaches its modules to a U-Net through the model's extension hooks and returns the named tensors
//! to train. Everything else (counting, saving, loading, merging) is generic over those tensors.
//! Adding a method is one new file and one line in [`METHODS`].
//!
//! Training with a method:
//! ```text
//! let method = MethodSettings::parse("lora", "rank = 8")?;   // as a run file's [method] table
//! freeze(&unet_vs);
//! let tuned = Tuned::attach(method.build(), &mut unet, &unet_vs, seed)?; // its new parameters live in `tuned`
//! // ... optimise `tuned.trained` ...
//! file::save_adapter(path, tuned.method.as_ref(), &tuned.trained, &base_identity)?;
//! ```
//! and later `formats::load_adapter(path, &mut unet, &unet_vs, &base_identity)`
//! (difftune, peft, diffusers or kohya files), or `merge::merge_adapter` to bake it in.
use crate::error::SettingsError;
use crate::model::unet::UNet2DConditionModel;
use crate::model::visit::{ModuleMut, VisitModules};
use crate::model::weights::NamedTensors;
use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use tch::{nn, Tensor};

pub mod adapter;
pub mod bitfit;
pub mod difffit;
pub mod export;
pub mod file;
pub mod formats;
pub mod full;
pub mod init;
mod layer_update;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod lycoris;
pub mod merge;
pub mod oft;
pub mod pattern;
pub mod prefix;
mod settings;
pub mod svdiff;
mod targets;
mod tuned;

pub use init::InitSeed;
pub use settings::MethodSettings;
pub use tuned::Tuned;

/// What a method type declares once: its name and label. Its settings are the type itself (a
/// serde struct whose `Default` is the documented default), so a method round-trips through them.
pub trait Registered: Serialize + DeserializeOwned {
    /// The name it is registered under (`lora`, `bitfit`, ...).
    const NAME: &'static str;
    /// Its name in the study's tables ("LoRA", "Prefix-tuning", ...).
    const LABEL: &'static str;
}

/// A method's identity, derived from [`Registered`] for every method type.
pub trait Identity {
    /// The name it is registered under.
    fn name(&self) -> &'static str;

    /// Its settings, as stored in adapter files; [`method_from_json`] rebuilds it from them.
    fn settings(&self) -> serde_json::Value;
}

impl<M: Registered> Identity for M {
    fn name(&self) -> &'static str {
        M::NAME
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("method settings serialise")
    }
}

/// One way of choosing what is trained.
pub trait TuningMethod: Identity + std::fmt::Debug + Send + Sync {
    /// Checks the settings' values (called when the method is built from settings).
    fn validate(&self) -> Result<()> {
        Ok(())
    }

    /// Attaches the method to `unet` and returns the tensors to train, by stable name: existing
    /// U-Net variables under their U-Net names (made trainable here), new parameters created under
    /// `params` (a VarStore the caller owns) with random values drawn through `init` only. The
    /// caller freezes every U-Net variable beforehand.
    fn apply(
        &self,
        unet: &mut UNet2DConditionModel,
        unet_vs: &nn::VarStore,
        params: nn::Path,
        init: &InitSeed,
    ) -> Result<Vec<(String, Tensor)>>;

    /// The settings and tensors an adapter file stores for `trained`. Methods whose training-time
    /// parametrisation differs from their inference form fold it here.
    fn export(
        &self,
        trained: &[(String, Tensor)],
    ) -> Result<(serde_json::Value, Vec<(String, Tensor)>)> {
        Ok((
            self.settings(),
            trained
                .iter()
                .map(|(n, t)| (n.clone(), t.detach()))
                .collect(),
        ))
    }

    /// Whether it trains every weight of the U-Net (full fine-tuning), whose optimizer state is
    /// then the model's size several times over.
    fn trains_every_weight(&self) -> bool {
        false
    }

    /// Why this method, with these settings, cannot be written in `format` although its
    /// registration has a writer for it (DoRA has no kohya form); `None` when it can.
    fn export_refusal(&self, _format: export::AdapterFormat) -> Option<&'static str> {
        None
    }

    /// Folds an adapter's tensors into the weights of a plain (not yet adapted) base U-Net, so the
    /// result needs no extension at inference.
    fn merge(
        &self,
        _unet: &mut UNet2DConditionModel,
        _unet_vs: &nn::VarStore,
        _tensors: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        bail!(
            "method `{}` cannot be merged into the base weights: it adds computation that no U-Net weight can express; \
             load the adapter file at inference instead",
            self.name()
        )
    }
}

/// A method in [`METHODS`]: its name, label, how to build it from settings, and its writers of
/// other tools' formats ([`export::export`]).
pub struct Registration {
    pub name: &'static str,
    pub label: &'static str,
    build: fn(serde_json::Value) -> Result<Box<dyn TuningMethod>>,
    writers: &'static [(export::AdapterFormat, export::ExportFn)],
}

const fn register<M: Registered + TuningMethod + 'static>() -> Registration {
    Registration {
        name: M::NAME,
        label: M::LABEL,
        build: build::<M>,
        writers: &[],
    }
}

impl Registration {
    /// This registration with `writers`: how its adapters are written in other tools' formats.
    const fn writing(self, writers: &'static [(export::AdapterFormat, export::ExportFn)]) -> Self {
        Self { writers, ..self }
    }
}

use export::AdapterFormat::{Diffusers, Kohya, Peft};

/// Every method, in the study's order.
pub const METHODS: &[Registration] = &[
    register::<full::Full>(),
    register::<adapter::Adapter>(),
    register::<lora::Lora>().writing(&[
        (Kohya, formats::write_lora_kohya),
        (Diffusers, formats::write_lora_diffusers),
        (Peft, formats::write_lora_peft),
    ]),
    register::<prefix::Prefix>(),
    register::<bitfit::BitFit>(),
    register::<loha::Loha>()
        .writing(&[(Kohya, lycoris::export_kohya), (Peft, lycoris::export_peft)]),
    register::<lokr::Lokr>()
        .writing(&[(Kohya, lycoris::export_kohya), (Peft, lycoris::export_peft)]),
    register::<oft::Oft>().writing(&[(Peft, lycoris::export_peft)]),
    register::<difffit::DiffFit>(),
    register::<svdiff::SvDiff>(),
];

fn build<M: TuningMethod + DeserializeOwned + 'static>(
    settings: serde_json::Value,
) -> Result<Box<dyn TuningMethod>> {
    let method: M = serde_json::from_value(settings)?;
    method.validate()?;
    Ok(Box::new(method))
}

pub fn method_names() -> impl Iterator<Item = &'static str> {
    METHODS.iter().map(|m| m.name)
}

/// The registered method called `name`.
pub fn registration(name: &str) -> Option<&'static Registration> {
    METHODS.iter().find(|m| m.name == name)
}

/// Builds a method from its JSON settings (missing keys take their defaults; unknown keys are an
/// error). Errors are [`SettingsError`]s.
pub fn method_from_json(name: &str, settings: &serde_json::Value) -> Result<Box<dyn TuningMethod>> {
    let Some(Registration { build, .. }) = registration(name) else {
        return Err(SettingsError::UnknownMethod {
            name: name.to_string(),
            known: method_names().collect::<Vec<_>>().join(", "),
        }
        .into());
    };
    let settings = match settings {
        serde_json::Value::Null => serde_json::json!({}),
        s => s.clone(),
    };
    build(settings).map_err(|e| {
        SettingsError::Method {
            method: name.to_string(),
            reason: format!("{e:#}"),
        }
        .into()
    })
}

/// Stops gradients for every variable of `vs`.
pub fn freeze(vs: &nn::VarStore) {
    freeze_named(&vs.variables().into_iter().collect::<Vec<_>>());
}

/// Stops gradients for each of `tensors`.
pub(crate) fn freeze_named(tensors: &[(String, Tensor)]) {
    for (_, t) in tensors {
        let _ = t.set_requires_grad(false);
    }
}

/// Whether any module of `unet` carries a tuning extension.
pub fn has_extensions(unet: &mut UNet2DConditionModel) -> bool {
    let mut found = false;
    unet.visit_modules(&mut |m| {
        found |= match m {
            ModuleMut::Linear(l) => l.extension.is_some(),
            ModuleMut::Conv2d(c) => c.extension.is_some(),
            ModuleMut::Attention(a) => a.kv_extension.is_some(),
            ModuleMut::TransformerBlock(b) => !b.extensions.is_empty(),
        }
    });
    found
}

/// Removes every tuning extension from `unet`.
pub fn clear_extensions(unet: &mut UNet2DConditionModel) {
    unet.visit_modules(&mut |m| match m {
        ModuleMut::Linear(l) => l.extension = None,
        ModuleMut::Conv2d(c) => c.extension = None,
        ModuleMut::Attention(a) => a.kv_extension = None,
        ModuleMut::TransformerBlock(b) => b.extensions.clear(),
    });
}

/// Puts each of `pending` (keyed by module path) into its module with `install`, which returns
/// false when the module's slot is already taken; errors naming the first such module, as
/// `what` (e.g. "layer `PATH` already has an extension").
pub(crate) fn install_by_path<A>(
    unet: &mut UNet2DConditionModel,
    mut pending: BTreeMap<String, A>,
    what: impl Fn(&str) -> String,
    mut install: impl FnMut(ModuleMut<'_>, A) -> bool,
) -> Result<()> {
    let mut taken = Vec::new();
    unet.visit_modules(&mut |m| {
        if let Some(attachment) = pending.remove(m.path()) {
            let path = m.path().to_string();
            if !install(m, attachment) {
                taken.push(path);
            }
        }
    });
    match taken.first() {
        Some(path) => bail!("{} (is another method applied to it?)", what(path)),
        None => Ok(()),
    }
}

/// Fills an empty extension `slot` with `extension`; false when it is taken.
pub(crate) fn fill_slot<T: ?Sized>(slot: &mut Option<Box<T>>, extension: Box<T>) -> bool {
    if slot.is_some() {
        return false;
    }
    *slot = Some(extension);
    true
}

/// How many parameters `method` trains on `unet`. Applies it with a throwaway parameter store,
/// then leaves the U-Net as it was found: frozen and without extensions.
pub fn trainable_parameter_count(
    method: &dyn TuningMethod,
    unet: &mut UNet2DConditionModel,
    unet_vs: &nn::VarStore,
) -> Result<i64> {
    if has_extensions(unet) {
        bail!("counting needs a U-Net without tuning extensions (is a method already applied?)");
    }
    freeze(unet_vs);
    let params = nn::VarStore::new(unet_vs.device());
    let trained = method.apply(
        unet,
        unet_vs,
        params.root(),
        &InitSeed::new(0, method.name()),
    );
    clear_extensions(unet);
    freeze(unet_vs);
    Ok(trained?.iter().map(|(_, t)| t.numel() as i64).sum())
}

/// The sub-path of `root` for a dotted diffusers module path (tch paths cannot contain dots), so
/// new parameters are stored under the name of the module they belong to.
pub(crate) fn nested<'a>(root: &nn::Path<'a>, dotted: &str) -> nn::Path<'a> {
    let mut parts = dotted.split('.');
    let first = root / parts.next().unwrap_or_default();
    parts.fold(first, |path, part| &path / part)
}

/// Checks that `tensors` holds exactly the tensors named in `expected`, each with its shape.
pub(crate) fn check_tensor_shapes(
    expected: &[(String, Vec<i64>)],
    tensors: &impl NamedTensors,
    source: &str,
) -> Result<()> {
    let shapes = tensors.shapes();
    for (name, shape) in expected {
        let Some(found) = shapes.get(name) else {
            bail!("{source} has no tensor `{name}`, which the method with these settings needs");
        };
        if found != shape {
            bail!(
                "tensor `{name}` in {source} has shape {found:?} but the method with these settings expects {shape:?} \
                 (an adapter for another rank, length or base model?)"
            );
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let extra: Vec<String> = shapes
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .map(|k| format!("`{k}`"))
        .collect();
    if !extra.is_empty() {
        bail!(
            "{source} has {} tensor(s) the method with these settings does not use: {}{}",
            extra.len(),
            extra[..extra.len().min(8)].join(", "),
            if extra.len() > 8 { ", ..." } else { "" }
        );
    }
    Ok(())
}

/// The U-Net's own variables whose names `keep` selects, by name and made trainable: what a
/// method that trains existing weights (full fine-tuning, BitFit) returns from `apply`.
pub(crate) fn own_variables(
    unet_vs: &nn::VarStore,
    keep: impl Fn(&str) -> bool,
) -> Vec<(String, Tensor)> {
    let mut trained: Vec<(String, Tensor)> = unet_vs
        .variables()
        .into_iter()
        .filter(|(name, _)| keep(name))
        .collect();
    trained.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, t) in &trained {
        let _ = t.set_requires_grad(true);
    }
    trained
}

/// Writes `tensors` into the U-Net variables `method` trains (a method of [`own_variables`]),
/// leaving them frozen: merging such a method is copying its tensors in.
pub(crate) fn merge_own_variables(
    method: &dyn TuningMethod,
    unet: &mut UNet2DConditionModel,
    unet_vs: &nn::VarStore,
    tensors: &BTreeMap<String, Tensor>,
    source: &str,
) -> Result<()> {
    let scratch = nn::VarStore::new(unet_vs.device());
    let trained = method.apply(
        unet,
        unet_vs,
        scratch.root(),
        &InitSeed::new(0, method.name()),
    )?;
    freeze_named(&trained);
    copy_named(&trained, tensors, source)
}

/// Copies `tensors` into the trained tensors of the same names, after checking names and shapes;
/// a file's tensors are read one at a time.
pub(crate) fn copy_named(
    trained: &[(String, Tensor)],
    tensors: &impl NamedTensors,
    source: &str,
) -> Result<()> {
    let expected: Vec<(String, Vec<i64>)> =
        trained.iter().map(|(n, t)| (n.clone(), t.size())).collect();
    check_tensor_shapes(&expected, tensors, source)?;
    tch::no_grad(|| {
        for (name, t) in trained {
            tensors
                .read_into(name, &mut t.shallow_clone())
                .with_context(|| format!("copying tensor `{name}` from {source}"))?;
        }
        Ok(())
    })
}
