//! A comparison's settings (its run file, TOML): which model and data, the training settings
//! every method shares, the methods with their own settings, how images are sampled and how they
//! are scored. Presets (presets/*.toml) are run files. [`crate::settings::compare`] reads a run
//! file with its `--set` overrides into a [`CompareConfig`]; this module holds the typed result
//! and writes it back (`compare.toml`) in the run file's layout.
use super::tiny_vae::TinyVaeTraining;
use crate::data::synthetic::{Domain, SyntheticSpec};
use crate::error::SettingsError;
use crate::eval::classifier::ClassifierSettings;
use crate::model::tiny::TinyUnetShape;
use crate::schedulers::config::PredictionType;
use crate::schedulers::SchedulerKind;
use crate::train::config::{RunConfig, TrainConfig};
use anyhow::{Context, Result};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use std::path::{Path, PathBuf};

/// A whole comparison, resolved: every method's run holds its own training settings (`[train]`
/// with the method's overrides) and its built method.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CompareConfig {
    /// Names the run in the report and the default output folder (`runs/compare-NAME`).
    pub name: String,
    pub model: ModelSection,
    pub data: DataSection,
    /// Present: before the comparison, the model is fully fine-tuned on the synthetic *source*
    /// domain to make the base model every method starts from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pretrain: Option<Pretrain>,
    /// The training settings shared by every method (see `difftune train`).
    pub train: TrainConfig,
    /// The methods compared, in report order.
    pub methods: Vec<MethodEntry>,
    /// How many training runs per method, how each method's learning rate is chosen, and the
    /// timing pass.
    pub study: StudySection,
    pub sample: SampleSection,
    pub eval: EvalSection,
}

/// `[pretrain]`: the run that makes the base model.
#[derive(Debug, Clone, PartialEq)]
pub struct Pretrain {
    /// Its training settings: `[train]` with the overrides.
    pub train: TrainConfig,
    /// The keys of `[pretrain]` as written (what `compare.toml` writes back).
    pub overrides: toml::Table,
}

impl Serialize for Pretrain {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.overrides.serialize(serializer)
    }
}

/// One compared method (a `[[methods]]` entry).
#[derive(Debug, Clone, PartialEq)]
pub struct MethodEntry {
    /// Name in the report; default the study's name for the method.
    pub label: Option<String>,
    /// What its training run computes: `[train]` with its overrides, and the method.
    pub run: RunConfig,
    /// The entry's `train` overrides as written (what `compare.toml` writes back).
    pub train_overrides: toml::Table,
    /// Learning rates to choose this method's from (replacing `study.lr_search.candidates`).
    pub lr_candidates: Option<Vec<f64>>,
    /// In a run-parallel study under a launcher (`[study] parallel = "run"`), how many ranks
    /// each training run of this method is data-parallel over (a c10d sub-group: see
    /// [`super::teams`]). Default: the node's ranks for full fine-tuning of a large U-Net on
    /// GPUs, else 1 ([`super::teams::default_width`]).
    pub ranks: Option<usize>,
}

impl MethodEntry {
    /// The tuning method's registered name (also the row's name).
    pub fn name(&self) -> &'static str {
        self.run.method.name()
    }

    pub fn label(&self) -> String {
        self.label
            .clone()
            .unwrap_or_else(|| study_label(self.name()))
    }

    /// The learning rates this method's is chosen from under `search`: its own list, else the
    /// study's; empty when it trains at its configured rate.
    pub fn lr_candidates<'a>(&'a self, search: &'a LrSearch) -> &'a [f64] {
        self.lr_candidates.as_deref().unwrap_or(&search.candidates)
    }
}

/// `[study]`: the training runs per method, how each method's learning rate is chosen, and how
/// its step is timed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StudySection {
    /// Training runs per method. Run `r` trains from the same base model on the same data with
    /// seed `train.seed + r` (run 0 is the one-run study's run; run `r` is what `--set
    /// train.seed=SEED+r` trains as run 0). Every run is sampled and scored; Table 1 gives the mean
    /// over runs. Default 1.
    pub runs: usize,
    pub lr_search: LrSearch,
    pub timing: TimingSettings,
    /// How the ranks of a launcher (torchrun, srun) share the study. Default `data`.
    pub parallel: Parallelism,
}

impl Default for StudySection {
    fn default() -> Self {
        Self {
            runs: 1,
            lr_search: LrSearch::default(),
            timing: TimingSettings::default(),
            parallel: Parallelism::Data,
        }
    }
}

/// How the ranks of a launcher share a study (`[study] parallel`); without a launcher either is
/// one process.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Parallelism {
    /// Every stage on every rank: each training run data-parallel over all ranks, the samples
    /// and features shared out (see [`super::runner`]).
    Data,
    /// Each rank does whole units on its own device, as one of the cooperating invocations on
    /// the folder (see [`super::ranks`]).
    Run,
}

/// `[study.lr_search]`: each method's learning rate chosen on held-out training data. A
/// validation split (`validation_per_class` images of each class, drawn with `seed`) is carved
/// from the target's training images; each candidate trains on the rest (for `steps` steps),
/// samples the validation classes' prompts and is scored on the validation images; the lowest
/// score wins, and the method's final runs train with it on all the training images. The test
/// split is never read for the choice. Without candidates every method trains at its own
/// configured rate (the study's fixed-rate protocol).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LrSearch {
    /// Learning rates every method chooses from (a method's `lr_candidates` replaces them).
    /// Default none.
    pub candidates: Vec<f64>,
    /// Optimizer steps of each candidate's run; 0: the method's `train.steps`. Default 0.
    pub steps: usize,
    /// Training images per class held out to score the candidates on. Default 8.
    pub validation_per_class: usize,
    /// Images each candidate samples per validation class; 0: as many as are held out. Default 0.
    pub samples_per_class: usize,
    /// The score the choice minimises: `kid` (unbiased at any set size) or `fid` (biased and
    /// noisy on small sets, the more so the more feature dimensions). Default `kid`.
    pub score: SelectionScore,
    /// Seeds which images are held out. Default 0.
    pub seed: u64,
}

impl Default for LrSearch {
    fn default() -> Self {
        Self {
            candidates: Vec::new(),
            steps: 0,
            validation_per_class: 8,
            samples_per_class: 0,
            score: SelectionScore::Kid,
            seed: 0,
        }
    }
}

impl LrSearch {
    /// Images each candidate samples per validation class.
    pub fn samples_per_class(&self) -> usize {
        match self.samples_per_class {
            0 => self.validation_per_class,
            n => n,
        }
    }
}

/// Which validation score a learning rate is chosen by.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SelectionScore {
    Kid,
    Fid,
}

/// `[study.timing]`: the timing pass. Every method's training step (the trainer's own, on the base
/// model, at the study's batch and resolution, on random latents) is timed in one process, the
/// methods taking turns: each round times every method (`warmup` untimed steps, then `steps`
/// timed ones), starting one method later than the round before. Table 2's time is each method's
/// median ratio over rounds to full fine-tuning's step time in the same round, so that load which
/// changes between rounds does not move it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TimingSettings {
    /// Rounds; 0 skips the timing pass (Table 2 then divides median step times of the runs).
    /// Default 5.
    pub rounds: usize,
    /// Timed steps per method per round. Default 10.
    pub steps: usize,
    /// Untimed steps before them. Default 3.
    pub warmup: usize,
    /// Bootstrap resamples of the ratios' 95% intervals (the steps resampled within each
    /// round). Default 1000.
    pub bootstrap: usize,
}

impl Default for TimingSettings {
    fn default() -> Self {
        Self {
            rounds: 5,
            steps: 10,
            warmup: 3,
            bootstrap: 1000,
        }
    }
}

/// Written as the run file has it: `name`, `label`, the method's `settings`, `train` overrides.
impl Serialize for MethodEntry {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("name", self.name())?;
        if let Some(label) = &self.label {
            map.serialize_entry("label", label)?;
        }
        map.serialize_entry("settings", self.run.method.written())?;
        map.serialize_entry("train", &self.train_overrides)?;
        if let Some(candidates) = &self.lr_candidates {
            map.serialize_entry("lr_candidates", candidates)?;
        }
        if let Some(ranks) = self.ranks {
            map.serialize_entry("ranks", &ranks)?;
        }
        map.end()
    }
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
            &crate::data::synthetic::captions(),
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

/// The study's name for a method (its registered label).
pub fn study_label(method: &str) -> String {
    crate::peft::registration(method)
        .map_or(method, |m| m.label)
        .to_string()
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
    /// Steps at which every final run is also sampled and scored (from its checkpoint there), for
    /// FID along the budget; the end is always scored. Default none.
    pub at_steps: Vec<usize>,
    /// Neighbourhood size of precision and recall (Kynkäänniemi et al. 2019). Default 3.
    pub precision_recall_k: usize,
    /// `[eval.classifier]`, for synthetic data: a small classifier of dish and domain trained on
    /// both synthetic domains, whose content score (share drawn as the prompted dish, share in
    /// the target domain) every sample set gets. Default off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classifier: Option<ClassifierSettings>,
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
            at_steps: Vec::new(),
            precision_recall_k: crate::eval::precision_recall::DEFAULT_K,
            classifier: None,
        }
    }
}

impl CompareConfig {
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }

    /// Checks every setting (each method's were checked when it was built); errors are
    /// [`SettingsError`]s naming the setting.
    pub fn validate(&self) -> Result<()> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(
                "name",
                format!(
                    "{:?} must be non-empty letters, digits, `-`, `_` or `.`",
                    self.name
                ),
            ));
        }
        self.train.validate()?;
        self.validate_methods()?;
        if let Some(pretrain) = &self.pretrain {
            if self.data.source != DataSource::Synthetic {
                return Err(invalid(
                    "pretrain",
                    "trains on the synthetic source domain, so it needs data.source = \"synthetic\"",
                ));
            }
            pretrain.train.validate().context("[pretrain]")?;
        }
        self.sample.validate()?;
        self.eval.validate()?;
        self.validate_study()?;
        for m in &self.eval.must_improve {
            if !self.methods.iter().any(|entry| entry.name() == m) {
                return Err(invalid(
                    "eval.must_improve",
                    format!("names `{m}`, which is not among the methods"),
                ));
            }
        }
        Ok(())
    }

    fn validate_methods(&self) -> Result<()> {
        if self.methods.is_empty() {
            return Err(invalid("methods", "[[methods]] lists no method to compare"));
        }
        for (i, m) in self.methods.iter().enumerate() {
            if self.methods[..i].iter().any(|o| o.name() == m.name()) {
                return Err(invalid(
                    "methods",
                    format!("method `{}` is listed twice", m.name()),
                ));
            }
            m.run
                .validate()
                .with_context(|| format!("the run of method `{}` (its `train` table)", m.name()))?;
            if m.ranks == Some(0) {
                let setting = format!("methods.{}.ranks", m.name());
                return Err(invalid(&setting, "must be at least 1"));
            }
        }
        Ok(())
    }

    /// Checks `[study]`, the learning-rate candidates, `eval.at_steps` against every method's
    /// budget and that the content classifier has synthetic data to learn from.
    fn validate_study(&self) -> Result<()> {
        let study = &self.study;
        if study.runs == 0 {
            return Err(invalid("study.runs", "must be at least 1"));
        }
        let search = &study.lr_search;
        for m in &self.methods {
            let candidates = m.lr_candidates(search);
            let setting = match &m.lr_candidates {
                Some(_) => format!("methods.{}.lr_candidates", m.name()),
                None => "study.lr_search.candidates".to_string(),
            };
            if let Some(bad) = candidates.iter().find(|c| !(c.is_finite() && **c > 0.0)) {
                return Err(invalid(
                    &setting,
                    format!("{bad} is not a positive learning rate"),
                ));
            }
            if (1..candidates.len()).any(|i| candidates[..i].contains(&candidates[i])) {
                return Err(invalid(&setting, "lists a learning rate twice"));
            }
            let steps = m.run.train.steps;
            let eval = &self.eval;
            if let Some(bad) = eval.at_steps.iter().find(|s| **s == 0 || **s >= steps) {
                return Err(invalid(
                    "eval.at_steps",
                    format!(
                        "step {bad} is not inside method `{}`'s {steps} steps (the end is always scored)",
                        m.name()
                    ),
                ));
            }
        }
        if self
            .methods
            .iter()
            .any(|m| !m.lr_candidates(search).is_empty())
            && search.validation_per_class == 0
        {
            return Err(invalid(
                "study.lr_search.validation_per_class",
                "must be at least 1 to score the candidates on",
            ));
        }
        if !self.eval.at_steps.windows(2).all(|w| w[0] < w[1]) {
            return Err(invalid("eval.at_steps", "must be increasing"));
        }
        let timing = &study.timing;
        if timing.rounds > 0 && (timing.steps == 0 || timing.bootstrap < 2) {
            return Err(invalid(
                "study.timing",
                "steps must be positive and bootstrap at least 2 when rounds is",
            ));
        }
        if let Some(classifier) = &self.eval.classifier {
            if self.data.source != DataSource::Synthetic {
                return Err(invalid(
                    "eval.classifier",
                    "learns the synthetic domains, so it needs data.source = \"synthetic\"",
                ));
            }
            classifier
                .validate()
                .map_err(|e| invalid("eval.classifier", e))?;
        }
        Ok(())
    }

    /// Whether some method chooses its learning rate on the validation split.
    pub fn searches_learning_rates(&self) -> bool {
        let search = &self.study.lr_search;
        self.methods
            .iter()
            .any(|m| !m.lr_candidates(search).is_empty())
    }

    /// The training runs the comparison makes, by run name: each method's, and the
    /// pre-training run's.
    pub fn runs(&self) -> impl Iterator<Item = (&str, &TrainConfig)> {
        let methods = self.methods.iter().map(|m| (m.name(), &m.run.train));
        let pretrain = self
            .pretrain
            .iter()
            .map(|p| (super::stage::PRETRAIN_RUN, &p.train));
        methods.chain(pretrain)
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

impl SampleSection {
    fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("per_class", self.per_class),
            ("steps", self.steps),
            ("batch_size", self.batch_size),
        ] {
            if v == 0 {
                return Err(invalid(&format!("sample.{name}"), "must be positive"));
            }
        }
        if !(self.guidance_scale.is_finite() && self.guidance_scale >= 0.0) {
            return Err(invalid(
                "sample.guidance_scale",
                format!(
                    "must be a finite, non-negative number, got {}",
                    self.guidance_scale
                ),
            ));
        }
        if self.resolution.is_some_and(|r| r == 0 || r % 8 != 0) {
            return Err(invalid(
                "sample.resolution",
                "must be a positive multiple of 8",
            ));
        }
        if let Some(t) = &self.prompt_template {
            crate::data::PromptTemplate::new(t)
                .map_err(|e| invalid("sample.prompt_template", e))?;
        }
        Ok(())
    }
}

impl EvalSection {
    fn validate(&self) -> Result<()> {
        if ![64, 192, 768, 2048].contains(&self.dims) {
            return Err(invalid(
                "eval.dims",
                format!("must be 64, 192, 768 or 2048, got {}", self.dims),
            ));
        }
        if self.kid_subsets == 0 || self.kid_subset_size < 2 || self.batch_size == 0 {
            return Err(invalid(
                "eval",
                "eval.kid_subsets and eval.batch_size must be positive and eval.kid_subset_size at least 2",
            ));
        }
        if self.bootstrap < 2 {
            return Err(invalid(
                "eval.bootstrap",
                format!("must be at least 2 resamples, got {}", self.bootstrap),
            ));
        }
        if self.precision_recall_k == 0 {
            return Err(invalid("eval.precision_recall_k", "must be at least 1"));
        }
        Ok(())
    }
}

/// [`SettingsError::Invalid`] for `setting`.
fn invalid(setting: &str, reason: impl std::fmt::Display) -> anyhow::Error {
    SettingsError::invalid(setting, reason).into()
}
