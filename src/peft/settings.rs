//! A run's tuning method as its settings hold it: built (so checked) when the settings are read,
//! and written back as it was given.
use super::{method_from_json, TuningMethod};
use crate::error::SettingsError;
use anyhow::Result;
use serde::de::Error as _;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::sync::Arc;

/// A tuning method built from its settings (a `[method]` table: `name` and the method's own
/// keys). Building checks every setting, so a value of this type is a method that can run.
///
/// The table as given is kept too and is what serialises (`name` first, then the given keys, as
/// run.toml and compare.toml have always written them): a run's files, and the comparison's stage
/// keys made from them, stay the same whatever the method's defaults. Two values are equal when
/// they build the same method (`rank = 4` written out equals the default rank 4). Cloning shares
/// the built method.
#[derive(Clone, Debug)]
pub struct MethodSettings {
    method: Arc<dyn TuningMethod>,
    written: toml::Table,
}

impl MethodSettings {
    /// Builds method `name` from `settings` (its own keys, without `name`). Errors are
    /// [`SettingsError`]s.
    pub fn new(name: &str, settings: toml::Table) -> Result<Self> {
        let json = serde_json::to_value(&settings).map_err(|e| SettingsError::Method {
            method: name.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            method: Arc::from(method_from_json(name, &json)?),
            written: settings,
        })
    }

    /// Method `name` with every setting at its default.
    pub fn defaults(name: &str) -> Result<Self> {
        Self::new(name, toml::Table::new())
    }

    /// Method `name` with the settings of the TOML table `text` (`rank = 8`).
    pub fn parse(name: &str, text: &str) -> Result<Self> {
        let settings = text.parse().map_err(|e| SettingsError::Method {
            method: name.to_string(),
            reason: format!("{e}"),
        })?;
        Self::new(name, settings)
    }

    /// The name the method is registered under.
    pub fn name(&self) -> &'static str {
        self.method.name()
    }

    /// The built method.
    pub fn method(&self) -> &dyn TuningMethod {
        self.method.as_ref()
    }

    /// A method of its own for a run to attach (one built from the same settings).
    pub fn build(&self) -> Box<dyn TuningMethod> {
        method_from_json(self.name(), &self.method.settings())
            .expect("a method's own settings build it again")
    }

    /// The settings as given (without `name`).
    pub fn written(&self) -> &toml::Table {
        &self.written
    }

    /// Builds the method a `[method]` table names (its `name` key and settings).
    fn from_table(mut table: toml::Table) -> Result<Self> {
        let name = match table.remove("name") {
            Some(toml::Value::String(name)) => name,
            Some(other) => {
                return Err(SettingsError::invalid(
                    "method.name",
                    format!("must be a method name, got {other}"),
                )
                .into())
            }
            None => {
                return Err(
                    SettingsError::invalid("method", "names no method (`name = ...`)").into(),
                )
            }
        };
        Self::new(&name, table)
    }
}

impl PartialEq for MethodSettings {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name() && self.method.settings() == other.method.settings()
    }
}

impl Serialize for MethodSettings {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.written.len() + 1))?;
        map.serialize_entry("name", self.name())?;
        for (key, value) in &self.written {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for MethodSettings {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let table = toml::Table::deserialize(deserializer)?;
        Self::from_table(table).map_err(|e| D::Error::custom(format!("{e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_kept_as_given_and_compared_by_what_they_build() {
        let lora = MethodSettings::parse("lora", "rank = 4\nalpha = 8").unwrap();
        assert_eq!(lora.name(), "lora");
        assert_eq!(lora.method().settings()["alpha"], 8.0);
        // Written back as given: the integer stays an integer, no default is added.
        let text = toml::to_string(&lora).unwrap();
        assert_eq!(text, "name = \"lora\"\nalpha = 8\nrank = 4\n");
        let back: MethodSettings = toml::from_str(&text).unwrap();
        assert_eq!(back.written(), lora.written());
        // The default rank written out builds the same method as none written.
        let alpha_only = MethodSettings::parse("lora", "alpha = 8.0").unwrap();
        assert_eq!(alpha_only, lora);
        assert_ne!(MethodSettings::defaults("lora").unwrap(), lora);
        assert_eq!(lora.build().settings(), lora.method().settings());

        for (name, text, setting) in [
            ("lora", "rnak = 8", "lora"),
            ("lora", "rank = 0", "lora"),
            ("lorax", "", "method"),
            ("lora", "rank = ", "lora"),
        ] {
            let err = MethodSettings::parse(name, text).unwrap_err();
            let typed = err.downcast_ref::<SettingsError>();
            assert_eq!(typed.map(SettingsError::setting), Some(setting), "{err:#}");
        }
        let err = toml::from_str::<MethodSettings>("rank = 4").unwrap_err();
        assert!(err.to_string().contains("names no method"), "{err}");
    }
}
