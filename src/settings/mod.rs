//! The settings layer: where a command's settings are read, merged and checked, once, before any
//! work. A run file (or preset) is read as a TOML table, the command line's `--set KEY=VALUE`
//! pairs are merged into it, and the result is typed — the tuning method built — and checked
//! completely: [`train::run_config`] gives `difftune train` its [`crate::train::RunConfig`],
//! [`compare::compare_config`] gives `difftune compare` its [`crate::compare::CompareConfig`],
//! whose every method carries its own resolved run. The commands, `train` and `compare` consume
//! those typed values and never merge settings again.
//!
//! Before a command touches its data or writes anything it also checks its inputs: the model's
//! configs and weight headers ([`check_model`]) and an adapter file's header and method settings
//! ([`check_adapter`]). Every refusal is a [`SettingsError`] (see [`crate::error`]).
pub mod compare;
pub mod train;

pub use crate::error::SettingsError;

use crate::model::source::ModelFiles;
use crate::model::weights::MappedSafetensors;
use anyhow::Result;
use std::path::Path;

/// Parses command-line `key=value` pairs into a TOML table. Keys may be dotted (`a.b=1`); a value
/// is read as TOML when it is valid TOML (`8`, `true`, `["*.to_q"]`), else as a plain string.
pub fn parse_set_pairs(pairs: &[String]) -> Result<toml::Table> {
    let mut table = toml::Table::new();
    for pair in pairs {
        let refused = |reason: &str| SettingsError::invalid(format!("--set {pair}"), reason);
        let Some((key, value)) = pair.split_once('=') else {
            return Err(refused("not a key=value pair").into());
        };
        let (key, value) = (key.trim(), value.trim());
        let parsed = toml::from_str::<toml::Table>(&format!("{key} = {value}")).or_else(|_| {
            let quoted = toml::Value::String(value.to_string());
            toml::from_str::<toml::Table>(&format!("{key} = {quoted}"))
                .map_err(|_| refused(&format!("`{key}` is not a valid key")))
        })?;
        merge_tables(&mut table, parsed);
    }
    Ok(table)
}

/// Overlays `over` onto `base`, recursing into tables (later values win).
pub fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// The TOML file at `path` as a table; an unreadable file or bad TOML is a [`SettingsError`].
pub fn read_table(path: &Path) -> Result<toml::Table> {
    let what = || path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| SettingsError::invalid(what(), e))?;
    Ok(text
        .parse()
        .map_err(|e: toml::de::Error| SettingsError::invalid(what(), e.to_string().trim()))?)
}

/// Removes table `name` from `table` (an empty one when absent); another kind of value there is
/// a [`SettingsError`].
fn take_table(table: &mut toml::Table, name: &str) -> Result<toml::Table> {
    match table.remove(name) {
        None => Ok(toml::Table::new()),
        Some(toml::Value::Table(t)) => Ok(t),
        Some(other) => Err(SettingsError::invalid(
            name,
            format!("must be a table, got {}", other.type_str()),
        )
        .into()),
    }
}

/// The model `spec` names (a diffusers folder, hub id or single file; `variant` picks e.g. the
/// fp16 weight files), with its configs and weight headers checked (see [`ModelFiles::check`]).
pub fn check_model(spec: &str, variant: Option<&str>) -> Result<ModelFiles> {
    let files = ModelFiles::resolve(spec, variant)?;
    files.check()?;
    Ok(files)
}

/// Checks an adapter file in any format `sample`, `merge` and `export` read, without reading its
/// tensors: that it exists, its safetensors headers, and for a difftune adapter its sidecar and
/// the method its settings build. Errors are [`SettingsError`]s for the adapter.
pub fn check_adapter(path: &Path) -> Result<()> {
    let what = || format!("adapter {}", path.display());
    if !path.exists() {
        return Err(SettingsError::invalid(what(), "does not exist").into());
    }
    let check = || -> Result<()> {
        let sidecar = crate::peft::file::sidecar_path(path);
        if path.is_file() && sidecar.is_file() {
            crate::peft::file::AdapterMeta::read(path)?.method()?;
        }
        let mut weights = vec![path.to_path_buf()];
        if path.is_dir() {
            weights.clear();
            for entry in std::fs::read_dir(path)? {
                let file = entry?.path();
                if file.extension().is_some_and(|e| e == "safetensors") {
                    weights.push(file);
                }
            }
        }
        for file in weights {
            MappedSafetensors::open(&file)?;
        }
        Ok(())
    };
    check().map_err(|e| match e.downcast::<SettingsError>() {
        Ok(typed) => typed.into(),
        Err(e) => SettingsError::invalid(what(), e).into(),
    })
}

/// Prints each warning of `command`'s settings on stderr.
pub fn warn(command: &str, warnings: &[String]) {
    for warning in warnings {
        eprintln!("difftune {command}: warning: {warning}");
    }
}
