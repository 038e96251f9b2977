//! `difftune compare`'s settings: a run file or preset with the `--set` pairs merged in, once,
//! then resolved into a checked [`CompareConfig`]: every method's run gets `[train]` with the
//! method's own `train` overrides and its built method, and `[pretrain]` its training settings.
use super::{merge_tables, parse_set_pairs, read_table, SettingsError};
use crate::compare::config::{
    CompareConfig, DataSection, EvalSection, MethodEntry, ModelSection, Parallelism, Pretrain,
    SampleSection, StudySection,
};
use crate::compare::presets::preset_text;
use crate::peft::MethodSettings;
use crate::train::config::{RunConfig, TrainConfig};
use anyhow::{Context, Result};
use serde::Deserialize;
use std::path::Path;

/// A run file as written: the training tables still tables, to be merged per method.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompareFile {
    name: String,
    #[serde(default)]
    model: ModelSection,
    #[serde(default)]
    data: DataSection,
    pretrain: Option<toml::Table>,
    #[serde(default)]
    train: toml::Table,
    methods: Vec<MethodFileEntry>,
    #[serde(default)]
    study: StudySection,
    #[serde(default)]
    sample: SampleSection,
    #[serde(default)]
    eval: EvalSection,
}

/// A `[[methods]]` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MethodFileEntry {
    name: String,
    label: Option<String>,
    #[serde(default)]
    settings: toml::Table,
    #[serde(default)]
    train: toml::Table,
    lr_candidates: Option<Vec<f64>>,
    ranks: Option<usize>,
}

/// The comparison in the run file at `path`, with the `set` pairs (`train.steps=5`,
/// `sample.per_class=2`; `methods.NAME.KEY` reaches the entry of method NAME). Errors are
/// [`SettingsError`]s.
pub fn load(path: &Path, set: &[String]) -> Result<CompareConfig> {
    resolve(read_table(path)?, set).with_context(|| format!("run file {}", path.display()))
}

/// The comparison of preset `name` (see [`crate::compare::presets`]), with the `set` pairs.
pub fn preset(name: &str, set: &[String]) -> Result<CompareConfig> {
    compare_config(preset_text(name)?, set).with_context(|| format!("preset `{name}`"))
}

/// The comparison in the run file text `text`, with the `set` pairs.
pub fn compare_config(text: &str, set: &[String]) -> Result<CompareConfig> {
    let table = text
        .parse()
        .map_err(|e: toml::de::Error| SettingsError::invalid("run file", e.to_string().trim()))?;
    resolve(table, set)
}

/// Merges `set` into the run file's `table`, types it and checks it.
fn resolve(mut table: toml::Table, set: &[String]) -> Result<CompareConfig> {
    let mut pairs = parse_set_pairs(set)?;
    if let Some(by_method) = pairs.remove("methods") {
        merge_method_overrides(&mut table, by_method)?;
    }
    merge_tables(&mut table, pairs);
    let file: CompareFile = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| SettingsError::invalid("run file", e.message()))?;
    let config = CompareConfig {
        train: train_config(file.train.clone(), "train")?,
        pretrain: match file.pretrain {
            Some(overrides) => Some(Pretrain {
                train: overlaid(&file.train, &overrides, "pretrain")?,
                overrides,
            }),
            None => None,
        },
        methods: file
            .methods
            .into_iter()
            .map(|entry| method_entry(entry, &file.train))
            .collect::<Result<_>>()?,
        name: file.name,
        model: file.model,
        data: file.data,
        study: file.study,
        sample: file.sample,
        eval: file.eval,
    };
    config.validate()?;
    let mut warnings: Vec<String> = config
        .runs()
        .flat_map(|(_, train)| train.warnings())
        .collect();
    warnings.dedup();
    if config.study.parallel == Parallelism::Data {
        let teamed = config.methods.iter().filter(|m| m.ranks.is_some());
        warnings.extend(teamed.map(|m| {
            format!(
                "methods.{}.ranks applies to a run-parallel study (study.parallel = \"run\"); \
                 with \"data\" every run is data-parallel over all ranks",
                m.name()
            )
        }));
    }
    super::warn("compare", &warnings);
    Ok(config)
}

/// Merges `methods.NAME.KEY=VALUE` pairs into the `[[methods]]` entry of method NAME.
fn merge_method_overrides(table: &mut toml::Table, by_method: toml::Value) -> Result<()> {
    let toml::Value::Table(by_method) = by_method else {
        return Err(SettingsError::invalid("--set methods", "use methods.NAME.KEY=VALUE").into());
    };
    let entries = table
        .get_mut("methods")
        .and_then(|m| m.as_array_mut())
        .ok_or_else(|| SettingsError::invalid("methods", "the run file lists no methods"))?;
    for (name, value) in by_method {
        let toml::Value::Table(value) = value else {
            let use_keys = format!("use methods.{name}.KEY=VALUE");
            return Err(SettingsError::invalid(format!("--set methods.{name}"), use_keys).into());
        };
        let entry = entries
            .iter_mut()
            .filter_map(|m| m.as_table_mut())
            .find(|m| m.get("name").and_then(|n| n.as_str()) == Some(name.as_str()))
            .ok_or_else(|| {
                let reason = format!("no method `{name}` in the run file");
                SettingsError::invalid(format!("--set methods.{name}"), reason)
            })?;
        merge_tables(entry, value);
    }
    Ok(())
}

/// A `[[methods]]` entry resolved against the shared `[train]` table.
fn method_entry(entry: MethodFileEntry, shared: &toml::Table) -> Result<MethodEntry> {
    let where_ = format!("methods.{}.train", entry.name);
    Ok(MethodEntry {
        label: entry.label,
        run: RunConfig {
            train: overlaid(shared, &entry.train, &where_)?,
            method: MethodSettings::new(&entry.name, entry.settings)?,
        },
        train_overrides: entry.train,
        lr_candidates: entry.lr_candidates,
        ranks: entry.ranks,
    })
}

/// The training settings of `shared` with `overrides` merged in.
fn overlaid(shared: &toml::Table, overrides: &toml::Table, what: &str) -> Result<TrainConfig> {
    let mut table = shared.clone();
    merge_tables(&mut table, overrides.clone());
    train_config(table, what)
}

fn train_config(table: toml::Table, what: &str) -> Result<TrainConfig> {
    Ok(toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| SettingsError::invalid(what, e.message()))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::config::{DataSource, ModelSource};
    use crate::compare::presets::PRESETS;

    const MINIMAL: &str = r#"
        name = "mini"
        [train]
        steps = 20
        [[methods]]
        name = "lora"
        settings = { rank = 2 }
        train = { learning_rate = 1e-3 }
        [[methods]]
        name = "bitfit"
    "#;

    #[test]
    fn a_minimal_run_file_takes_the_defaults() {
        let c = compare_config(MINIMAL, &[]).unwrap();
        assert_eq!(c.model.source, ModelSource::Tiny);
        assert_eq!(c.data.source, DataSource::Synthetic);
        assert_eq!(c.sample.steps, 50);
        assert_eq!(c.eval.dims, 2048);
        assert_eq!(c.methods[0].label(), "LoRA");
        assert_eq!(c.methods[0].run.train.learning_rate, 1e-3);
        assert_eq!(c.methods[0].run.train.steps, 20);
        assert_eq!(c.methods[1].run.train, c.train);
        assert_eq!(c.sample_resolution(), c.train.resolution);
    }

    #[test]
    fn the_run_file_round_trips() {
        let c = compare_config(MINIMAL, &[]).unwrap();
        assert_eq!(compare_config(&c.to_toml().unwrap(), &[]).unwrap(), c);
        let mut tiny = preset("tiny", &[]).unwrap();
        assert!(tiny.pretrain.is_some());
        assert_eq!(compare_config(&tiny.to_toml().unwrap(), &[]).unwrap(), tiny);
        // A run with another learning rate is a field update.
        let run = &mut tiny.methods[0].run;
        run.train.learning_rate = 0.5;
        assert_eq!(run.train.learning_rate, 0.5);
    }

    #[test]
    fn study_parallel_is_data_unless_run_is_chosen_and_nothing_else() {
        use crate::compare::config::Parallelism;
        let c = compare_config(MINIMAL, &[]).unwrap();
        assert_eq!(c.study.parallel, Parallelism::Data);
        let c = compare_config(MINIMAL, &["study.parallel=\"run\"".into()]).unwrap();
        assert_eq!(c.study.parallel, Parallelism::Run);
        let err = compare_config(MINIMAL, &["study.parallel=\"batch\"".into()]).unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("unknown variant `batch`, expected `data` or `run`"),
            "{err}"
        );
    }

    #[test]
    fn a_method_s_ranks_round_trip_and_zero_is_refused() {
        let set = ["methods.lora.ranks=2".to_string()];
        let c = compare_config(MINIMAL, &set).unwrap();
        assert_eq!((c.methods[0].ranks, c.methods[1].ranks), (Some(2), None));
        assert_eq!(compare_config(&c.to_toml().unwrap(), &[]).unwrap(), c);
        let err = compare_config(MINIMAL, &["methods.bitfit.ranks=0".into()]).unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("methods.bitfit.ranks: must be at least 1"),
            "{err}"
        );
    }

    /// A method run's stage key is its run config's TOML: the method's settings as written,
    /// `name` first, as before the settings were typed (so finished comparisons are reused).
    #[test]
    fn a_method_run_writes_its_settings_as_given() {
        let c = compare_config(MINIMAL, &[]).unwrap();
        let text = c.methods[0].run.to_toml().unwrap();
        assert!(
            text.ends_with("[method]\nname = \"lora\"\nrank = 2\n"),
            "{text}"
        );
    }

    #[test]
    fn overrides_reach_sections_methods_and_every_run() {
        let c = compare_config(
            MINIMAL,
            &[
                "train.steps=7".into(),
                "sample.per_class=2".into(),
                "methods.lora.settings.rank=8".into(),
                "methods.bitfit.train.seed=3".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.steps, 7);
        assert!(c.methods.iter().all(|m| m.run.train.steps == 7));
        assert_eq!(c.methods[1].run.train.seed, 3);
        assert_eq!(c.sample.per_class, 2);
        assert_eq!(c.methods[0].run.method.method().settings()["rank"], 8);
        let err = compare_config(MINIMAL, &["methods.dora.settings.rank=8".into()]).unwrap_err();
        let typed = err.downcast_ref::<SettingsError>();
        assert_eq!(
            typed.map(SettingsError::setting),
            Some("--set methods.dora")
        );
    }

    #[test]
    fn bad_run_files_are_refused_by_setting() {
        let cases = [
            (MINIMAL.replace("\"bitfit\"", "\"lora\""), "methods"),
            (MINIMAL.replace("\"bitfit\"", "\"dreambooth\""), "method"),
            (MINIMAL.replace("rank = 2", "rank = 2, colour = 1"), "lora"),
            (
                MINIMAL.replace("learning_rate = 1e-3", "learning_rate = -1.0"),
                "train.learning_rate",
            ),
            (
                MINIMAL.replace("learning_rate = 1e-3", "learnig_rate = 1.0"),
                "methods.lora.train",
            ),
            (format!("{MINIMAL}\n[eval]\ndims = 100"), "eval.dims"),
            (
                format!("{MINIMAL}\n[eval]\nbootstrap = 1"),
                "eval.bootstrap",
            ),
            (
                format!("{MINIMAL}\n[eval]\nmust_improve = [\"full\"]"),
                "eval.must_improve",
            ),
            (format!("{MINIMAL}\n[sample]\nsteps = 0"), "sample.steps"),
            (
                format!("{MINIMAL}\n[data]\nsource = \"/x\"\n[pretrain]\nsteps = 3"),
                "pretrain",
            ),
            (
                format!("{MINIMAL}\n[pretrain]\ncheckpoint_every = 0"),
                "train.checkpoint_every",
            ),
            ("name = \"x\"\nmethods = []".to_string(), "methods"),
            (format!("{MINIMAL}\n[sampel]\nsteps = 2"), "run file"),
        ];
        for (text, setting) in cases {
            let err = compare_config(&text, &[]).unwrap_err();
            let typed = err.downcast_ref::<SettingsError>();
            assert_eq!(typed.map(SettingsError::setting), Some(setting), "{err:#}");
        }
    }

    #[test]
    fn every_preset_parses_and_names_itself() {
        for (name, _) in PRESETS {
            assert_eq!(preset(name, &[]).unwrap().name, name);
        }
        let err = preset("sd15", &[]).unwrap_err();
        assert!(err.downcast_ref::<SettingsError>().is_some(), "{err:#}");
    }

    /// tiny-all is the tiny preset with every registered method.
    #[test]
    fn tiny_all_names_every_method_and_otherwise_is_tiny() {
        let (tiny, all) = (
            preset("tiny", &[]).unwrap(),
            preset("tiny-all", &[]).unwrap(),
        );
        let names: Vec<&str> = all.methods.iter().map(|m| m.name()).collect();
        assert_eq!(names, crate::peft::method_names().collect::<Vec<_>>());
        assert_eq!(all.methods[..tiny.methods.len()], tiny.methods[..]);
        assert_eq!(
            (all.train, all.pretrain, all.eval.must_improve),
            (tiny.train, tiny.pretrain, tiny.eval.must_improve)
        );
    }

    #[test]
    fn the_study_preset_has_the_study_settings() {
        let c = preset("sd14-food101", &[]).unwrap();
        assert_eq!(
            (c.train.steps, c.train.learning_rate, c.train.resolution),
            (10_000, 1e-5, 512)
        );
        let names: Vec<&str> = c.methods.iter().map(|m| m.name()).collect();
        assert_eq!(names, ["full", "adapter", "lora", "prefix", "bitfit"]);
        assert!(c.pretrain.is_none());
    }

    /// The study on SDXL: the five methods at 1024 px in buckets, each parameter-efficient one at
    /// its own rate, Euler sampling at SDXL's pipeline defaults.
    #[test]
    fn the_sdxl_preset_has_the_sdxl_settings() {
        let c = preset("sdxl-food101", &[]).unwrap();
        let t = &c.train;
        assert_eq!((t.steps, t.resolution, t.batch_size), (10_000, 1024, 4));
        assert!(t.bucket && t.gradient_checkpointing && !t.random_flip);
        let rates: Vec<(&str, f64)> = c
            .methods
            .iter()
            .map(|m| (m.name(), m.run.train.learning_rate))
            .collect();
        assert_eq!(
            rates,
            [
                ("full", 1e-6),
                ("adapter", 1e-4),
                ("lora", 1e-4),
                ("prefix", 1e-4),
                ("bitfit", 1e-4)
            ]
        );
        let s = &c.sample;
        assert_eq!(
            (s.scheduler.to_string().as_str(), s.steps, s.guidance_scale),
            ("euler", 50, 5.0)
        );
    }
}
