//! The run file of a comparison (TOML): which model and data, the training settings every method
//! shares, the methods with their own settings, how images are sampled and how they are scored.
//! Presets (presets/*.toml) are run files; `--set key=value` overrides any setting.
use super::tiny_vae::TinyVaeTraining;
use crate::data::synthetic::{Domain, SyntheticSpec};
use crate::model::tiny::TinyUnetShape;
use crate::schedulers::config::PredictionType;
use crate::schedulers::SchedulerKind;
use crate::train::config::TrainConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A whole run file. Every section but `methods` has defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CompareConfig {
    /// Names the run in the report and the default output folder (`runs/compare-NAME`).
    pub name: String,
    #[serde(default)]
    pub model: ModelSection,
    #[serde(default)]
    pub data: DataSection,
    /// Present: before the comparison, the model is fully fine-tuned on the synthetic *source*
    /// domain to make the base model every method starts from (keys override `[train]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrain: Option<toml::Table>,
    /// The training settings shared by every method (see `difftune train`).
    #[serde(default)]
    pub train: TrainConfig,
    /// The methods compared, in report order.
    pub methods: Vec<MethodEntry>,
    #[serde(default)]
    pub sample: SampleSection,
    #[serde(default)]
    pub eval: EvalSection,
}

/// Where the base model comes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// `tiny` (the built-in tiny model, created here) or a diffusers folder / hub id. `--model`
    /// overrides it. Default `tiny`.
    pub source: ModelSource,
    /// Seed of the tiny model's random weights. Default 0.
    pub tiny_seed: u64,
    /// How the tiny model's VAE is made a working codec (see [`TinyVaeTraining`]).
    pub tiny_vae: TinyVaeTraining,
    /// The tiny model's U-Net size (see [`TinyUnetShape`]).
    pub tiny_unet: TinyUnetShape,
    /// What the tiny model's U-Net is trained to predict (written into its scheduler config, so
    /// training and sampling agree). Default `epsilon`, as SD v1.
    pub tiny_prediction_type: PredictionType,
}

impl ModelSection {
    /// Writes the tiny model this section describes at `dir`, native to `image_size` px images
    /// (the run's training resolution, so that sampling the models a run writes, by `difftune
    /// sample` or diffusers, defaults to the size they were trained at).
    pub fn write_tiny_model(&self, dir: &Path, image_size: u32) -> Result<()> {
        crate::model::tiny::write_tiny_model_with(
            dir,
            self.tiny_seed,
            image_size,
            self.tiny_vae.downsampling,
            &self.tiny_unet,
        )
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            source: ModelSource::Tiny,
            tiny_seed: 0,
            tiny_vae: TinyVaeTraining::default(),
            tiny_unet: TinyUnetShape::default(),
            tiny_prediction_type: PredictionType::Epsilon,
        }
    }
}

/// `model.source`: the built-in tiny model (`tiny`) or a diffusers folder / hub id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum ModelSource {
    Tiny,
    Pretrained(String),
}

impl From<String> for ModelSource {
    fn from(text: String) -> Self {
        match text.as_str() {
            "tiny" => Self::Tiny,
            _ => Self::Pretrained(text),
        }
    }
}

impl From<ModelSource> for String {
    fn from(source: ModelSource) -> Self {
        match source {
            ModelSource::Tiny => "tiny".into(),
            ModelSource::Pretrained(spec) => spec,
        }
    }
}

/// `data.source`: generated data (`synthetic`) or a dataset folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum DataSource {
    Synthetic,
    Folder(PathBuf),
}

impl From<String> for DataSource {
    fn from(text: String) -> Self {
        match text.as_str() {
            "synthetic" => Self::Synthetic,
            _ => Self::Folder(text.into()),
        }
    }
}

impl From<DataSource> for String {
    fn from(source: DataSource) -> Self {
        match source {
            DataSource::Synthetic => "synthetic".into(),
            DataSource::Folder(path) => path.display().to_string(),
        }
    }
}

/// What the methods are fine-tuned on and scored against.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// `synthetic` (a procedural Food101-like target domain, and a source domain for `[pretrain]`,
    /// generated here) or a dataset folder in the Food101 layout, an image folder or parquet.
    /// `--data` overrides it. Default `synthetic`.
    pub source: DataSource,
    pub synthetic: SyntheticSettings,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            source: DataSource::Synthetic,
            synthetic: SyntheticSettings::default(),
        }
    }
}

/// The generated datasets' shape (both domains use the same).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticSettings {
    pub classes: usize,
    pub train_per_class: usize,
    pub test_per_class: usize,
    pub resolution: u32,
    pub seed: u64,
}

impl SyntheticSettings {
    /// What the generator draws for `domain` with these settings.
    pub fn spec(&self, domain: Domain) -> SyntheticSpec {
        SyntheticSpec {
            classes: self.classes,
            train_per_class: self.train_per_class,
            test_per_class: self.test_per_class,
            resolution: self.resolution,
            domain,
            seed: self.seed,
            ..SyntheticSpec::default()
        }
    }
}

impl Default for SyntheticSettings {
    fn default() -> Self {
        Self {
            classes: 6,
            train_per_class: 40,
            test_per_class: 20,
            resolution: 64,
            seed: 0,
        }
    }
}

/// One compared method.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MethodEntry {
    /// The tuning method: a registered name (`full`, `lora`, `loha`, `svdiff`, ...).
    pub name: String,
    /// Name in the report; default the study's name for the method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The method's own settings (as `[method]` in `difftune train`).
    #[serde(default)]
    pub settings: toml::Table,
    /// Overrides of the shared `[train]` settings for this method only.
    #[serde(default)]
    pub train: toml::Table,
}

impl MethodEntry {
    pub fn label(&self) -> String {
        self.label
            .clone()
            .unwrap_or_else(|| study_label(&self.name))
    }

    /// The method's training settings: `[train]` with its overrides.
    pub fn train_config(&self, shared: &TrainConfig) -> Result<TrainConfig> {
        overlay(shared, &self.train)
            .with_context(|| format!("train overrides of method `{}`", self.name))
    }
}

/// The study's name for a method (its registered label).
pub fn study_label(method: &str) -> String {
    crate::peft::registration(method)
        .map_or(method, |m| m.label)
        .to_string()
}

/// `base` with the keys of `overrides` replacing its own.
pub fn overlay(base: &TrainConfig, overrides: &toml::Table) -> Result<TrainConfig> {
    let mut table = toml::Table::try_from(base)?;
    crate::peft::merge_tables(&mut table, overrides.clone());
    let config: TrainConfig = table.try_into()?;
    config.validate()?;
    Ok(config)
}

/// The images generated with every method: `per_class` seeds for each class's prompt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SampleSection {
    /// Prompt of each class; `{label}` is the class's human label. Default: `[train]`'s template.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_template: Option<String>,
    /// Sample the first this many classes (in the dataset's order); 0 means all. Default 0.
    pub classes: usize,
    /// Images per class; image `i` of every class uses seed `seed + i`. Default 10.
    pub per_class: usize,
    pub seed: u64,
    /// `ddim`, `pndm`, `euler`, ... (see `difftune sample`). Default `pndm`, SD v1.4's own.
    pub scheduler: SchedulerKind,
    pub steps: usize,
    pub guidance_scale: f64,
    /// Image side; default `[train]`'s resolution.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolution: Option<u32>,
    /// Images per U-Net forward (times two with guidance). Default 8.
    pub batch_size: usize,
    /// Sample grids show this many classes and seeds per class. Defaults 6 and 4.
    pub grid_classes: usize,
    pub grid_seeds: usize,
}

impl Default for SampleSection {
    fn default() -> Self {
        Self {
            prompt_template: None,
            classes: 0,
            per_class: 10,
            seed: 1000,
            scheduler: SchedulerKind::Pndm,
            steps: 50,
            guidance_scale: 7.5,
            resolution: None,
            batch_size: 8,
            grid_classes: 6,
            grid_seeds: 4,
        }
    }
}

/// Which Inception weights the FID/KID features come from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureWeights {
    /// pytorch-fid's weights (converted to safetensors); an error when they are missing.
    PytorchFid,
    /// A deterministic random initialisation of the same network (no download needed).
    Random,
    /// pytorch-fid's weights when present (`eval.weights` or the cache folder), else random.
    Auto,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    /// Default `pytorch-fid`.
    pub feature_weights: FeatureWeights,
    /// The converted pytorch-fid weights; default the cache folder's copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    /// Seed of the random initialisation (for `random`, or `auto` without weights). Default 0.
    pub random_seed: u64,
    /// Feature width: 64, 192, 768 or 2048 (pytorch-fid's default). Default 2048.
    pub dims: usize,
    /// KID as torch-fidelity computes it: subsets and their size. Defaults 100 and 1000.
    pub kid_subsets: usize,
    pub kid_subset_size: usize,
    /// Images per Inception forward. Default 50.
    pub batch_size: usize,
    /// Bootstrap resamples behind every FID's and KID's uncertainty (the generated and the
    /// reference features resampled with replacement). Default 100.
    pub bootstrap: usize,
    /// Seed of the bootstrap's draws. Default 0.
    pub bootstrap_seed: u64,
    /// Methods whose FID must come out below the base model's; the report checks it.
    pub must_improve: Vec<String>,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            feature_weights: FeatureWeights::PytorchFid,
            weights: None,
            random_seed: 0,
            dims: 2048,
            kid_subsets: 100,
            kid_subset_size: 1000,
            batch_size: 50,
            bootstrap: crate::eval::bootstrap::DEFAULT_RESAMPLES,
            bootstrap_seed: 0,
            must_improve: Vec::new(),
        }
    }
}

impl CompareConfig {
    pub fn from_toml(text: &str) -> Result<Self> {
        let config: Self = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading run file {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("run file {}", path.display()))
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }

    pub fn validate(&self) -> Result<()> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            bail!(
                "name {:?} must be non-empty letters, digits, `-`, `_` or `.`",
                self.name
            );
        }
        self.train.validate().context("[train]")?;
        if self.methods.is_empty() {
            bail!("[[methods]] lists no method to compare");
        }
        for (i, m) in self.methods.iter().enumerate() {
            if self.methods[..i].iter().any(|o| o.name == m.name) {
                bail!("method `{}` is listed twice", m.name);
            }
            if m.name == super::report::BASE_ROW {
                bail!(
                    "`{}` names the no-fine-tuning row and cannot be a method",
                    m.name
                );
            }
            crate::peft::method_from_settings(&m.name, &toml::Value::Table(m.settings.clone()))?;
            m.train_config(&self.train)?;
        }
        if let Some(pretrain) = &self.pretrain {
            if self.data.source != DataSource::Synthetic {
                bail!("[pretrain] trains on the synthetic source domain, so it needs data.source = \"synthetic\"");
            }
            overlay(&self.train, pretrain).context("[pretrain]")?;
        }
        let s = &self.sample;
        for (name, v) in [
            ("per_class", s.per_class),
            ("steps", s.steps),
            ("batch_size", s.batch_size),
        ] {
            if v == 0 {
                bail!("sample.{name} must be positive");
            }
        }
        if !(s.guidance_scale.is_finite() && s.guidance_scale >= 0.0) {
            bail!(
                "sample.guidance_scale must be a finite, non-negative number, got {}",
                s.guidance_scale
            );
        }
        if s.resolution.is_some_and(|r| r == 0 || r % 8 != 0) {
            bail!("sample.resolution must be a positive multiple of 8");
        }
        if let Some(t) = &s.prompt_template {
            crate::data::PromptTemplate::new(t).context("sample.prompt_template")?;
        }
        let e = &self.eval;
        if ![64, 192, 768, 2048].contains(&e.dims) {
            bail!("eval.dims must be 64, 192, 768 or 2048, got {}", e.dims);
        }
        if e.kid_subsets == 0 || e.kid_subset_size < 2 || e.batch_size == 0 {
            bail!("eval.kid_subsets and eval.batch_size must be positive and eval.kid_subset_size at least 2");
        }
        if e.bootstrap < 2 {
            bail!(
                "eval.bootstrap must be at least 2 resamples, got {}",
                e.bootstrap
            );
        }
        for m in &e.must_improve {
            if !self.methods.iter().any(|entry| &entry.name == m) {
                bail!("eval.must_improve names `{m}`, which is not among the methods");
            }
        }
        Ok(())
    }

    /// Applies `key=value` overrides (dotted keys into the run file: `train.steps=5`,
    /// `sample.per_class=2`; `methods.NAME.KEY` reaches the entry of method NAME).
    pub fn apply_overrides(&mut self, overrides: &[String]) -> Result<()> {
        let mut table = toml::Table::try_from(&*self)?;
        let mut pairs = crate::peft::parse_set_pairs(overrides)?;
        if let Some(by_method) = pairs.remove("methods") {
            let toml::Value::Table(by_method) = by_method else {
                bail!("use methods.NAME.KEY=VALUE")
            };
            let entries = table
                .get_mut("methods")
                .and_then(|m| m.as_array_mut())
                .context("the run file has no methods")?;
            for (name, value) in by_method {
                let toml::Value::Table(value) = value else {
                    bail!("use methods.{name}.KEY=VALUE")
                };
                let entry = entries
                    .iter_mut()
                    .filter_map(|m| m.as_table_mut())
                    .find(|m| m.get("name").and_then(|n| n.as_str()) == Some(name.as_str()))
                    .with_context(|| {
                        format!("--set methods.{name}: no method `{name}` in the run file")
                    })?;
                crate::peft::merge_tables(entry, value);
            }
        }
        crate::peft::merge_tables(&mut table, pairs);
        let config: Self = table.try_into().context("applying --set overrides")?;
        config.validate()?;
        *self = config;
        Ok(())
    }

    /// The prompt template samples use.
    pub fn prompt_template(&self) -> &str {
        self.sample
            .prompt_template
            .as_deref()
            .unwrap_or(&self.train.prompt_template)
    }

    /// The side of generated images.
    pub fn sample_resolution(&self) -> u32 {
        self.sample.resolution.unwrap_or(self.train.resolution)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        name = "mini"
        [[methods]]
        name = "lora"
        settings = { rank = 2 }
        train = { learning_rate = 1e-3 }
        [[methods]]
        name = "bitfit"
    "#;

    #[test]
    fn a_minimal_run_file_takes_the_defaults() {
        let c = CompareConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(c.model.source, ModelSource::Tiny);
        assert_eq!(c.data.source, DataSource::Synthetic);
        assert_eq!(c.sample.steps, 50);
        assert_eq!(c.eval.dims, 2048);
        assert_eq!(c.methods[0].label(), "LoRA");
        assert_eq!(
            c.methods[0].train_config(&c.train).unwrap().learning_rate,
            1e-3
        );
        assert_eq!(c.methods[1].train_config(&c.train).unwrap(), c.train);
        assert_eq!(c.sample_resolution(), c.train.resolution);
    }

    #[test]
    fn the_run_file_round_trips() {
        let c = CompareConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(CompareConfig::from_toml(&c.to_toml().unwrap()).unwrap(), c);
    }

    #[test]
    fn overrides_reach_sections_and_methods() {
        let mut c = CompareConfig::from_toml(MINIMAL).unwrap();
        c.apply_overrides(&[
            "train.steps=7".into(),
            "sample.per_class=2".into(),
            "methods.lora.settings.rank=8".into(),
        ])
        .unwrap();
        assert_eq!(c.train.steps, 7);
        assert_eq!(c.sample.per_class, 2);
        assert_eq!(c.methods[0].settings["rank"].as_integer(), Some(8));
        let err = c
            .apply_overrides(&["methods.dora.settings.rank=8".into()])
            .unwrap_err();
        assert!(format!("{err:#}").contains("no method `dora`"), "{err:#}");
    }

    #[test]
    fn bad_run_files_are_refused_with_the_reason() {
        let cases = [
            (MINIMAL.replace("\"bitfit\"", "\"lora\""), "listed twice"),
            (
                MINIMAL.replace("\"bitfit\"", "\"dreambooth\""),
                "unknown tuning method",
            ),
            (
                MINIMAL.replace("rank = 2", "rank = 2, colour = 1"),
                "colour",
            ),
            (format!("{MINIMAL}\n[eval]\ndims = 100"), "eval.dims"),
            (
                format!("{MINIMAL}\n[eval]\nbootstrap = 1"),
                "eval.bootstrap",
            ),
            (
                format!("{MINIMAL}\n[eval]\nmust_improve = [\"full\"]"),
                "must_improve",
            ),
            (format!("{MINIMAL}\n[sample]\nsteps = 0"), "sample.steps"),
            (
                format!("{MINIMAL}\n[data]\nsource = \"/x\"\n[pretrain]\nsteps = 3"),
                "[pretrain]",
            ),
            ("name = \"x\"\nmethods = []".to_string(), "no method"),
        ];
        for (text, needle) in cases {
            let err = CompareConfig::from_toml(&text).unwrap_err();
            assert!(
                format!("{err:#}").contains(needle),
                "expected {needle:?} in {err:#}"
            );
        }
    }
}
