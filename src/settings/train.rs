//! `difftune train`'s settings: a run file (`--config`), the method named by `--method`, the
//! `--set` pairs and the flags for the common settings, merged once into a checked
//! [`RunConfig`].
use super::{merge_tables, parse_set_pairs, read_table, take_table, SettingsError};
use crate::peft::MethodSettings;
use crate::train::config::{RunConfig, TrainConfig};
use anyhow::Result;
use std::path::Path;

/// Where a training run's settings come from; later sources win: the run file, then `--set`,
/// then the flags.
#[derive(Debug, Default)]
pub struct TrainSources<'a> {
    /// A run file: a `[train]` table and a `[method]` table (its `name` and settings).
    pub config: Option<&'a Path>,
    /// The method's name, when the command line gives it (it must agree with the run file's).
    pub method: Option<&'a str>,
    /// `train.KEY=VALUE`, `method.KEY=VALUE`, or a bare `KEY=VALUE`: into `[train]` when KEY is a
    /// training setting, else into `[method]` (a bare `name` renames the method).
    pub set: &'a [String],
    pub flags: TrainFlags,
}

/// The flags of `difftune train` that set a `[train]` value.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TrainFlags {
    pub steps: Option<usize>,
    pub batch_size: Option<usize>,
    pub learning_rate: Option<f64>,
    pub seed: Option<u64>,
    /// Set: `gradient_checkpointing = true`.
    pub gradient_checkpointing: bool,
    /// Set: `channels_last = true`.
    pub channels_last: bool,
}

impl TrainFlags {
    fn apply(&self, train: &mut TrainConfig) {
        train.steps = self.steps.unwrap_or(train.steps);
        train.batch_size = self.batch_size.unwrap_or(train.batch_size);
        train.learning_rate = self.learning_rate.unwrap_or(train.learning_rate);
        train.seed = self.seed.unwrap_or(train.seed);
        train.gradient_checkpointing |= self.gradient_checkpointing;
        train.channels_last |= self.channels_last;
    }
}

/// The run's settings from `sources`, checked (the method built) and with their warnings
/// printed. Errors are [`SettingsError`]s.
pub fn run_config(sources: &TrainSources) -> Result<RunConfig> {
    let mut file = match sources.config {
        Some(path) => read_table(path)?,
        None => toml::Table::new(),
    };
    let mut train = take_table(&mut file, "train")?;
    let mut method = take_table(&mut file, "method")?;
    if let Some(section) = file.keys().next() {
        return Err(SettingsError::invalid(
            section.as_str(),
            "unknown section of a run config (it has [train] and [method])",
        )
        .into());
    }
    name_method(&mut method, sources.method)?;
    route_overrides(parse_set_pairs(sources.set)?, &mut train, &mut method);
    let mut train: TrainConfig = toml::Value::Table(train)
        .try_into()
        .map_err(|e: toml::de::Error| SettingsError::invalid("train", e.message()))?;
    sources.flags.apply(&mut train);
    let name = match method.remove("name") {
        Some(toml::Value::String(name)) => name,
        other => {
            return Err(SettingsError::invalid(
                "method.name",
                format!("must be a method name, got {other:?}"),
            )
            .into())
        }
    };
    let config = RunConfig {
        train,
        method: MethodSettings::new(&name, method)?,
    };
    config.validate()?;
    super::warn("train", &config.train.warnings());
    Ok(config)
}

/// Sets the method's name from the command line, which must agree with the run file's.
fn name_method(method: &mut toml::Table, given: Option<&str>) -> Result<()> {
    let named = method.get("name").and_then(toml::Value::as_str);
    match (given, named) {
        (Some(m), Some(named)) if m != named => Err(SettingsError::invalid(
            "--method",
            format!("{m} contradicts the config's [method] name = \"{named}\""),
        )
        .into()),
        (Some(m), _) => {
            method.insert("name".into(), toml::Value::String(m.to_string()));
            Ok(())
        }
        (None, Some(_)) => Ok(()),
        (None, None) => Err(SettingsError::invalid(
            "method",
            "name the tuning method with --method or [method] name in --config",
        )
        .into()),
    }
}

/// Merges `--set` pairs into the run file's tables (see [`TrainSources::set`]).
fn route_overrides(overrides: toml::Table, train: &mut toml::Table, method: &mut toml::Table) {
    for (key, value) in overrides {
        let (target, value) = match (key.as_str(), value) {
            ("train", toml::Value::Table(t)) => (&mut *train, t),
            ("method", toml::Value::Table(t)) => (&mut *method, t),
            (_, value) if TrainConfig::is_setting(&key) => {
                (&mut *train, toml::Table::from_iter([(key, value)]))
            }
            (_, value) => (&mut *method, toml::Table::from_iter([(key, value)])),
        };
        merge_tables(target, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peft::export::AdapterFormat;
    use crate::train::optim::LrSchedule;

    fn settings(file: &str, method: Option<&str>, set: &[&str]) -> Result<RunConfig> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("run.toml");
        std::fs::write(&path, file)?;
        let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        run_config(&TrainSources {
            config: Some(&path),
            method,
            set: &set,
            flags: TrainFlags {
                steps: Some(7),
                ..TrainFlags::default()
            },
        })
    }

    #[test]
    fn file_pairs_and_flags_merge_once_into_typed_settings() {
        let config = settings(
            "[method]\nname = \"lora\"\nrank = 8\n[train]\nsteps = 3\n",
            None,
            &[
                "lr_schedule=cosine",
                "train.learning_rate=1e-4",
                "rank=16",
                "method.alpha=4",
                "optimizer.beta2=0.99",
                "ema.decay=0.9",
                "export=[\"kohya\"]",
            ],
        )
        .unwrap();
        assert_eq!(config.train.lr_schedule, LrSchedule::Cosine);
        assert_eq!(config.train.learning_rate, 1e-4);
        assert_eq!(config.train.optimizer.beta2, 0.99);
        assert_eq!(config.train.ema.map(|e| e.decay), Some(0.9));
        assert_eq!(config.train.export, [AdapterFormat::Kohya]);
        // The flag wins over the file.
        assert_eq!(config.train.steps, 7);
        assert_eq!(config.method.name(), "lora");
        assert_eq!(config.method.method().settings()["rank"], 16);
        assert_eq!(config.method.method().settings()["alpha"], 4.0);
        assert_eq!(
            RunConfig::from_toml(&config.to_toml().unwrap()).unwrap(),
            config
        );
        let renamed = settings("", Some("lora"), &["name=bitfit"]).unwrap();
        assert_eq!(renamed.method.name(), "bitfit");
    }

    /// Each bad setting is a [`SettingsError`] naming it.
    #[test]
    fn bad_settings_are_refused_by_name() {
        let lora = "[method]\nname = \"lora\"\n";
        let cases: [(&str, Option<&str>, &[&str], &str); 12] = [
            (lora, None, &["rnak=8"], "lora"),
            (lora, None, &["rank=0"], "lora"),
            (lora, None, &["rank=-1"], "lora"),
            (lora, None, &["dora=maybe"], "lora"),
            ("", Some("lorax"), &[], "method"),
            ("", Some("adapter"), &["widht=8"], "adapter"),
            ("", Some("prefix"), &["length=0"], "prefix"),
            (lora, Some("bitfit"), &[], "--method"),
            ("", None, &[], "method"),
            ("[train]\nlearning_rat = 1.0\n", Some("lora"), &[], "train"),
            (
                lora,
                None,
                &["checkpoint_every=0"],
                "train.checkpoint_every",
            ),
            (lora, None, &["train.batch_size=0"], "train.batch_size"),
        ];
        for (file, method, set, setting) in cases {
            let err = settings(file, method, set).unwrap_err();
            let typed = err.downcast_ref::<SettingsError>();
            assert_eq!(
                typed.map(SettingsError::setting),
                Some(setting),
                "{set:?}: {err:#}"
            );
        }
        let err = settings(lora, None, &["checkpoint_every=0"]).unwrap_err();
        assert!(
            err.to_string().contains("checkpoint_every = 7"),
            "the message says what to use instead: {err}"
        );
        let err = settings("[train\n", Some("lora"), &[]).unwrap_err();
        assert!(err.downcast_ref::<SettingsError>().is_some(), "{err:#}");
    }
}
