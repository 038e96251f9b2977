//! Running a comparison: data, base model, one training run per method, samples of the same
//! prompts and seeds from every model, their scores, and the report.
//!
//! Every stage records in `OUT/state/STAGE.json` the settings it is computed from (its key) and,
//! once finished, what it produced. A finished stage whose key is unchanged is reused; a stage
//! whose key changed is redone from scratch; an unfinished one resumes (training from its last
//! checkpoint, sampling from the last image written). So an interrupted comparison picks up where
//! it stopped, and editing, say, the sampling settings redoes only sampling and scoring.
use super::config::{overlay, CompareConfig, MethodEntry, SYNTHETIC_DATA, TINY_MODEL};
use super::grid::{compose, read_rgb, write_png, GridRow};
use super::machine::{git_commit, MachineInfo, PeakMemory};
use super::plots::{fid_vs_params, loss_curves, train_time, LossCurve};
use super::report::{Check, MethodRow, StudyResults, TrainMeasure, BASE_ROW};
use super::score::{Score, Scorer};
use super::tiny_vae::train_tiny_vae;
use crate::data::synthetic::{generate_food101_like, Domain, SyntheticSpec};
use crate::data::{Dataset, DatasetOptions, PromptTemplate, Split};
use crate::model::source::ModelFiles;
use crate::sample::pipeline::{generate, initial_latents, GenerateOptions, SdModels};
use crate::sample::png::to_rgb8;
use crate::train::config::{MethodConfig, RunConfig};
use crate::train::metrics::MetricsLog;
use crate::train::trainer::{ADAPTER_FILE, CHECKPOINTS_DIR, METRICS_FILE};
use crate::util::fs::{write_atomic_str, write_json};
use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Tensor};

/// What every row of the study (the base model and each method) is sampled with.
struct SamplingSettings {
    scheduler: String,
    steps: usize,
    guidance_scale: f64,
    height: u32,
    width: u32,
}

/// Files a comparison writes at the top of its output folder.
pub const RESULTS_JSON: &str = "results.json";
pub const RESULTS_CSV: &str = "results.csv";
pub const REPORT_MD: &str = "report.md";
/// The resolved run file.
pub const CONFIG_FILE: &str = "compare.toml";
/// Where [`WallClock`] keeps the time spent so far.
const WALL_TIME_FILE: &str = "state/wall-time.json";

pub struct CompareOptions {
    pub config: CompareConfig,
    pub out: PathBuf,
    /// Draw training progress bars.
    pub progress: bool,
    /// Set (by a Ctrl-C handler) to stop at the next safe point, keeping all finished work.
    pub interrupt: Arc<AtomicBool>,
}

/// How a call of [`run`] ended.
pub enum Outcome {
    Finished(Box<StudyResults>),
    /// Stopped by the interrupt flag; running again resumes.
    Interrupted,
}

/// The folders of a comparison's output, and the clock of the time spent on it.
struct Layout {
    root: PathBuf,
    clock: WallClock,
}

/// Wall time spent on a comparison over all its invocations, kept in `state/wall-time.json` and
/// saved whenever a stage finishes, so the work of an interrupted invocation still counts.
struct WallClock {
    earlier_seconds: f64,
    invocations: u32,
    started: Instant,
}

#[derive(Serialize, Deserialize)]
struct WallTime {
    seconds: f64,
    invocations: u32,
}

impl WallClock {
    fn start(path: &Path) -> Self {
        let earlier: Option<WallTime> = std::fs::read_to_string(path)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok());
        Self {
            earlier_seconds: earlier.as_ref().map_or(0.0, |w| w.seconds),
            invocations: earlier.map_or(0, |w| w.invocations) + 1,
            started: Instant::now(),
        }
    }

    fn this_invocation(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn total(&self) -> f64 {
        self.earlier_seconds + self.this_invocation()
    }

    fn save(&self, path: &Path) -> Result<()> {
        write_json(
            path,
            &WallTime {
                seconds: self.total(),
                invocations: self.invocations,
            },
        )
    }
}

impl Layout {
    fn data(&self, domain: &str) -> PathBuf {
        self.root.join("data").join(domain)
    }
    fn model(&self, name: &str) -> PathBuf {
        self.root.join("model").join(name)
    }
    fn run(&self, name: &str) -> PathBuf {
        self.root.join("runs").join(name)
    }
    fn cache(&self, domain: &str) -> PathBuf {
        self.root.join("cache").join(domain)
    }
    fn samples(&self, row: &str) -> PathBuf {
        self.root.join("samples").join(row)
    }
    fn eval(&self) -> PathBuf {
        self.root.join("eval")
    }
    fn state(&self, stage: &str) -> PathBuf {
        self.root.join("state").join(format!("{stage}.json"))
    }
}

/// What `state/STAGE.json` holds.
#[derive(Debug, Serialize, Deserialize)]
struct StageState {
    key: Value,
    finished: bool,
    /// What the finished stage produced (null for stages that only write files).
    #[serde(default)]
    record: Value,
}

/// Whether a stage is done. Not done: the stage's folder is cleared when it holds work for other
/// settings (or of unknown origin), and the key is recorded so that the work it starts now can
/// be resumed.
fn enter_stage<T: DeserializeOwned>(
    layout: &Layout,
    stage: &str,
    dir: Option<&Path>,
    key: &Value,
) -> Result<Option<T>> {
    let path = layout.state(stage);
    let state: Option<StageState> = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).ok(),
        Err(_) => None,
    };
    let same_key = state.as_ref().is_some_and(|s| &s.key == key);
    if same_key {
        if let Some(state) = state.filter(|s| s.finished) {
            let record = serde_json::from_value(state.record)
                .with_context(|| format!("reading {}", path.display()))?;
            return Ok(Some(record));
        }
    } else if let Some(dir) = dir.filter(|d| d.exists()) {
        eprintln!("compare: {stage}: settings changed, redoing it");
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    write_json(
        &path,
        &StageState {
            key: key.clone(),
            finished: false,
            record: Value::Null,
        },
    )?;
    Ok(None)
}

fn finish_stage<T: Serialize>(layout: &Layout, stage: &str, key: &Value, record: &T) -> Result<()> {
    write_json(
        &layout.state(stage),
        &StageState {
            key: key.clone(),
            finished: true,
            record: serde_json::to_value(record)?,
        },
    )?;
    layout.clock.save(&layout.root.join(WALL_TIME_FILE))
}

/// A finished training run, as recorded in its stage state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunRecord {
    adapter: PathBuf,
    trainable_params: u64,
    train: TrainMeasure,
}

/// A method's finished run with the stage key it was trained under.
struct TrainedRun<'a> {
    method: &'a MethodEntry,
    key: Value,
    record: RunRecord,
}

/// A finished sampling of one row.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SampleRecord {
    seconds: f64,
    images: usize,
}

/// One image to generate: the same list for every row.
#[derive(Debug, Clone, Serialize)]
struct SampleItem {
    class: usize,
    prompt: String,
    seed: u64,
    /// Relative to the row's folder.
    file: String,
}

/// Runs (or resumes) a comparison. See the module documentation.
pub fn run(opts: &CompareOptions) -> Result<Outcome> {
    let config = &opts.config;
    config.validate()?;
    let layout = Layout {
        root: opts.out.clone(),
        clock: WallClock::start(&opts.out.join(WALL_TIME_FILE)),
    };
    std::fs::create_dir_all(&layout.root)
        .with_context(|| format!("creating {}", layout.root.display()))?;
    let settings_toml = config.to_toml()?;
    write_atomic_str(&layout.root.join(CONFIG_FILE), &settings_toml)?;
    let device = config.train.device.resolve()?;
    let interrupted = || opts.interrupt.load(Ordering::SeqCst);

    let target = prepare_dataset(config, &layout, Domain::Target)?;
    let source = match config.pretrain {
        Some(_) => Some(prepare_dataset(config, &layout, Domain::Source)?),
        None => None,
    };
    let Some(base) = prepare_base_model(config, &layout, opts, &target, source.as_ref())? else {
        return Ok(Outcome::Interrupted);
    };
    let base_files = ModelFiles::resolve(&base, None)?;
    let base_identity = base_files.unet_identity()?;
    let unet_params = count_unet_parameters(&base_files)?;

    let mut runs = Vec::new();
    for (i, method) in config.methods.iter().enumerate() {
        eprintln!(
            "compare: [{}/{}] {}",
            i + 1,
            config.methods.len(),
            method.label()
        );
        let run_config = RunConfig {
            train: method.train_config(&config.train)?,
            method: MethodConfig {
                name: method.name.clone(),
                settings: method.settings.clone(),
            },
        };
        let key =
            json!({ "base": base_identity, "data": target.key, "run": run_config.to_toml()? });
        let Some(record) = train_stage(
            &layout,
            &format!("run-{}", method.name),
            &base,
            &target,
            run_config,
            &key,
            device,
            opts,
        )?
        else {
            return Ok(Outcome::Interrupted);
        };
        runs.push(TrainedRun {
            method,
            key,
            record,
        });
    }

    let classes = Dataset::open(
        &target.path,
        &DatasetOptions {
            split: Split::Test,
            ..Default::default()
        },
    )?;
    let plan = sample_plan(config, &classes)?;
    let sampling = SamplingSettings {
        scheduler: config.sample.scheduler.clone(),
        steps: config.sample.steps,
        guidance_scale: config.sample.guidance_scale,
        height: config.sample_resolution(),
        width: config.sample_resolution(),
    };
    let sample_key = json!({
        "base": base_identity,
        "sample": config.sample,
        "resolution": config.sample_resolution(),
        "plan": plan,
    });
    // The study's rows: the base model, then each method's run.
    let mut rows: Vec<(String, String, Option<&TrainedRun>)> = vec![(
        BASE_ROW.to_string(),
        "No fine-tuning (base model)".to_string(),
        None,
    )];
    rows.extend(
        runs.iter()
            .map(|r| (r.method.name.clone(), r.method.label(), Some(r))),
    );
    let mut sampled = Vec::new();
    for (row, label, run) in &rows {
        let key = json!({ "samples": sample_key, "run": run.map(|r| &r.key) });
        let adapter = run.map(|r| r.record.adapter.as_path());
        eprintln!("compare: sampling {} images with {label}", plan.len());
        let Some(record) = sample_stage(
            &layout,
            row,
            &base_files,
            &base_identity,
            adapter,
            &plan,
            &sampling,
            config,
            &key,
            device,
            opts,
        )?
        else {
            return Ok(Outcome::Interrupted);
        };
        sampled.push((key, record));
    }
    if interrupted() {
        return Ok(Outcome::Interrupted);
    }

    eprintln!("compare: scoring");
    let scorer = Scorer::new(&config.eval, device, &layout.eval())?;
    let reference_key = format!("{}|{}|test|{}", scorer.identity, target.key, classes.len());
    let reference = scorer.reference(
        &classes,
        &layout.eval().join("reference-features.safetensors"),
        &reference_key,
    )?;
    let mut results_rows = Vec::new();
    for ((row, label, run), (sample_key, sample_record)) in rows.iter().zip(&sampled) {
        let key = json!({
            "samples": sample_key,
            "scorer": scorer.identity,
            "reference": reference_key,
            "kid": [config.eval.kid_subsets, config.eval.kid_subset_size, config.eval.random_seed],
        });
        let score: Score = match enter_stage(&layout, &format!("score-{row}"), None, &key)? {
            Some(score) => score,
            None => {
                let dir = layout.samples(row);
                let paths: Vec<PathBuf> = plan.iter().map(|item| dir.join(&item.file)).collect();
                let score = scorer
                    .score(&reference, &paths)
                    .with_context(|| format!("scoring {label}"))?;
                finish_stage(&layout, &format!("score-{row}"), &key, &score)?;
                score
            }
        };
        results_rows.push(MethodRow {
            method: row.clone(),
            label: label.clone(),
            fid: score.fid,
            kid_mean: score.kid_mean,
            kid_std: score.kid_std,
            images: score.images,
            trainable_params: run.map(|r| r.record.trainable_params),
            unet_params,
            train: run.map(|r| r.record.train.clone()),
            sample_seconds: sample_record.seconds,
        });
    }

    let mut checks = StudyResults::improvement_checks(&results_rows, &config.eval.must_improve);
    checks.push(Check {
        statement: "every FID and KID is a finite number".into(),
        passed: results_rows
            .iter()
            .all(|r| r.fid.is_finite() && r.kid_mean.is_finite()),
    });
    let results = StudyResults {
        name: config.name.clone(),
        git_commit: git_commit(Path::new(env!("CARGO_MANIFEST_DIR"))),
        machine: MachineInfo::detect(device),
        fid_features: scorer.description.clone(),
        reference: format!(
            "test split of {} ({} images)",
            target.description,
            classes.len()
        ),
        rows: results_rows,
        checks,
        wall_seconds: layout.clock.total(),
        invocations: layout.clock.invocations,
        invocation_seconds: layout.clock.this_invocation(),
        settings_toml,
    };
    write_outputs(&layout, config, &results, &runs, &plan, &classes)?;
    layout.clock.save(&layout.root.join(WALL_TIME_FILE))?;
    Ok(Outcome::Finished(Box::new(results)))
}

/// A dataset ready to train on or score against.
struct PreparedData {
    path: PathBuf,
    /// Identifies its content for the stage keys.
    key: String,
    /// For the report.
    description: String,
}

/// The synthetic domain `domain` (generated once), or the dataset folder the run file names.
fn prepare_dataset(
    config: &CompareConfig,
    layout: &Layout,
    domain: Domain,
) -> Result<PreparedData> {
    if config.data.source != SYNTHETIC_DATA {
        let path = PathBuf::from(&config.data.source);
        if !path.is_dir() {
            bail!("dataset folder {} does not exist: pass --data DIR (Food101 in the ETH layout or as parquet)", path.display());
        }
        let path = path
            .canonicalize()
            .with_context(|| format!("resolving {}", path.display()))?;
        return Ok(PreparedData {
            key: path.display().to_string(),
            description: path.display().to_string(),
            path,
        });
    }
    let s = &config.data.synthetic;
    let spec = SyntheticSpec {
        classes: s.classes,
        train_per_class: s.train_per_class,
        test_per_class: s.test_per_class,
        resolution: s.resolution,
        domain,
        seed: s.seed,
        ..SyntheticSpec::default()
    };
    let name = match domain {
        Domain::Source => "source",
        Domain::Target => "target",
    };
    let dir = layout.data(name);
    let key = serde_json::to_value(&spec)?;
    let stage = format!("data-{name}");
    if enter_stage::<Value>(layout, &stage, Some(&dir), &key)?.is_none() {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        eprintln!("compare: generating the synthetic {name} domain");
        generate_food101_like(&dir, &spec)?;
        finish_stage(layout, &stage, &key, &Value::Null)?;
    }
    Ok(PreparedData {
        path: dir,
        key: key.to_string(),
        description: format!("the synthetic {name} domain"),
    })
}

/// The model every method starts from: the run file's model, or the tiny model pre-trained on
/// the synthetic source domain when `[pretrain]` is given. `None` when interrupted.
fn prepare_base_model(
    config: &CompareConfig,
    layout: &Layout,
    opts: &CompareOptions,
    target: &PreparedData,
    source: Option<&PreparedData>,
) -> Result<Option<String>> {
    let initial = if config.model.source == TINY_MODEL {
        let dir = layout.model("tiny");
        let datasets: Vec<&PreparedData> = std::iter::once(target).chain(source).collect();
        let key = json!({
            "tiny_seed": config.model.tiny_seed,
            "tiny_vae": config.model.tiny_vae,
            "tiny_prediction_type": config.model.tiny_prediction_type,
            "resolution": config.train.resolution,
            "data": datasets.iter().map(|d| &d.key).collect::<Vec<_>>(),
        });
        if enter_stage::<Value>(layout, "model-tiny", Some(&dir), &key)?.is_none() {
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing {}", dir.display()))?;
            }
            crate::model::tiny::write_tiny_model(&dir, config.model.tiny_seed)?;
            // Training and sampling both read what the U-Net predicts from here.
            crate::util::fs::set_json_field(
                &dir.join("scheduler").join("scheduler_config.json"),
                "prediction_type",
                config.model.tiny_prediction_type,
            )?;
            if config.model.tiny_vae.steps > 0 {
                eprintln!(
                    "compare: training the tiny model's VAE ({} steps)",
                    config.model.tiny_vae.steps
                );
                let paths: Vec<&Path> = datasets.iter().map(|d| d.path.as_path()).collect();
                let device = config.train.device.resolve()?;
                let report = train_tiny_vae(
                    &dir,
                    &paths,
                    config.train.resolution,
                    &config.model.tiny_vae,
                    device,
                    opts.progress,
                )?;
                eprintln!(
                    "compare: tiny VAE reconstruction MSE {:.4}, scaling factor {:.4}",
                    report.reconstruction_mse, report.scaling_factor
                );
            }
            finish_stage(layout, "model-tiny", &key, &Value::Null)?;
        }
        dir.display().to_string()
    } else {
        config.model.source.clone()
    };
    let (Some(pretrain), Some(source)) = (&config.pretrain, source) else {
        return Ok(Some(initial));
    };
    let initial_files = ModelFiles::resolve(&initial, None)?;
    let run_config = RunConfig {
        train: overlay(&config.train, pretrain)?,
        method: MethodConfig {
            name: "full".into(),
            settings: toml::Table::new(),
        },
    };
    let key = json!({ "base": initial_files.unet_identity()?, "data": source.key, "run": run_config.to_toml()? });
    eprintln!("compare: pre-training the base model on the source domain");
    let device = run_config.train.device.resolve()?;
    let Some(record) = train_stage(
        layout,
        "run-pretrain",
        &initial,
        source,
        run_config,
        &key,
        device,
        opts,
    )?
    else {
        return Ok(None);
    };
    let base = layout.model("base");
    if enter_stage::<Value>(layout, "model-base", Some(&base), &key)?.is_none() {
        merge_into_model(&initial_files, &record.adapter, &base)?;
        finish_stage(layout, "model-base", &key, &Value::Null)?;
    }
    Ok(Some(base.display().to_string()))
}

/// Writes a copy of the model folder of `files` with `adapter` merged into its U-Net.
fn merge_into_model(files: &ModelFiles, adapter: &Path, out: &Path) -> Result<()> {
    let from = Path::new(&files.spec);
    copy_tree(from, out, &|rel: &Path| {
        rel.starts_with("unet") && rel.extension().is_some_and(|e| e == "safetensors")
    })?;
    let (unet_vs, mut unet) = crate::model::pipeline::load_unet(files, Device::Cpu)?;
    let adapter = crate::peft::file::AdapterFile::load(adapter)?;
    crate::peft::merge::merge_adapter(&mut unet, &unet_vs, &adapter, &files.unet_identity()?)?;
    crate::peft::merge::save_unet(
        &unet_vs,
        &out.join("unet").join("diffusion_pytorch_model.safetensors"),
    )
}

/// Copies the files under `from` to `to` (atomically each), except those `skip` names.
fn copy_tree(from: &Path, to: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<()> {
    let mut pending = vec![from.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            let rel = path.strip_prefix(from)?.to_path_buf();
            if path.is_dir() {
                pending.push(path);
            } else if !skip(&rel) {
                let bytes =
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                crate::util::fs::write_atomic(&to.join(&rel), &bytes)?;
            }
        }
    }
    Ok(())
}

/// Parameters of the U-Net of `files`, from its weight files' headers.
fn count_unet_parameters(files: &ModelFiles) -> Result<u64> {
    let mut total = 0u64;
    for path in &files.unet.weights {
        let mapped = crate::model::weights::MappedSafetensors::open(path)?;
        for (_, view) in mapped.tensors().tensors() {
            total += view.shape().iter().product::<usize>() as u64;
        }
    }
    Ok(total)
}

/// Trains (or resumes, or reuses) one run; measures its cost. `None` when interrupted.
#[allow(clippy::too_many_arguments)]
fn train_stage(
    layout: &Layout,
    stage: &str,
    model: &str,
    data: &PreparedData,
    run_config: RunConfig,
    key: &Value,
    device: Device,
    opts: &CompareOptions,
) -> Result<Option<RunRecord>> {
    let name = stage.trim_start_matches("run-");
    let dir = layout.run(name);
    if let Some(record) = enter_stage::<RunRecord>(layout, stage, Some(&dir), key)? {
        eprintln!("compare: reusing the finished run in {}", dir.display());
        return Ok(Some(record));
    }
    let domain = if data.path.starts_with(&layout.root) {
        data.path.file_name()
    } else {
        None
    };
    let cache = layout.cache(
        &domain
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_else(|| "data".into()),
    );
    let probe = PeakMemory::start(device);
    let summary = crate::train::train(&crate::train::TrainOptions {
        model: model.to_string(),
        data: data.path.clone(),
        cache: Some(cache),
        out: dir.clone(),
        config: run_config,
        resume: dir.join(CHECKPOINTS_DIR).is_dir(),
        strict: false,
        stop_after: None,
        interrupt: opts.interrupt.clone(),
        progress: opts.progress,
    })
    .with_context(|| format!("training run {}", dir.display()))?;
    let (memory_kind, peak_memory_bytes) = probe.finish();
    if !summary.finished {
        return Ok(None);
    }
    let metrics = MetricsLog::read(&dir.join(METRICS_FILE))?;
    let mut step_times: Vec<f64> = metrics.iter().map(|m| m.step_time_s).collect();
    let total_seconds = step_times.iter().sum();
    let tail = (metrics.len() / 10).max(1).min(metrics.len());
    let final_loss = (!metrics.is_empty()).then(|| {
        metrics[metrics.len() - tail..]
            .iter()
            .map(|m| m.loss)
            .sum::<f64>()
            / tail as f64
    });
    let record = RunRecord {
        adapter: summary.adapter.unwrap_or_else(|| dir.join(ADAPTER_FILE)),
        trainable_params: summary.trainable_parameters as u64,
        train: TrainMeasure {
            steps: summary.step,
            total_seconds,
            median_step_seconds: crate::util::stats::median(&mut step_times),
            peak_memory_bytes,
            memory_kind,
            final_loss,
        },
    };
    finish_stage(layout, stage, key, &record)?;
    Ok(Some(record))
}

/// The images every row generates: `per_class` seeds for each sampled class.
fn sample_plan(config: &CompareConfig, test: &Dataset) -> Result<Vec<SampleItem>> {
    if test.classes.is_empty() {
        bail!(
            "{} has no classes: prompts are made from class labels",
            test.root.display()
        );
    }
    let template = PromptTemplate::new(config.prompt_template())?;
    let count = match config.sample.classes {
        0 => test.classes.len(),
        n => n.min(test.classes.len()),
    };
    let mut plan = Vec::new();
    for (class, c) in test.classes.iter().take(count).enumerate() {
        for i in 0..config.sample.per_class as u64 {
            let seed = config.sample.seed + i;
            plan.push(SampleItem {
                class,
                prompt: template.render(&c.label),
                seed,
                file: format!("{}/{seed}.png", c.name),
            });
        }
    }
    Ok(plan)
}

/// Generates a row's images (the base model's, or with a method's adapter), skipping those
/// already written. `None` when interrupted.
#[allow(clippy::too_many_arguments)]
fn sample_stage(
    layout: &Layout,
    row: &str,
    base: &ModelFiles,
    base_identity: &str,
    adapter: Option<&Path>,
    plan: &[SampleItem],
    settings: &SamplingSettings,
    config: &CompareConfig,
    key: &Value,
    device: Device,
    opts: &CompareOptions,
) -> Result<Option<SampleRecord>> {
    let dir = layout.samples(row);
    let stage = format!("samples-{row}");
    if let Some(record) = enter_stage::<SampleRecord>(layout, &stage, Some(&dir), key)? {
        return Ok(Some(record));
    }
    let todo: Vec<&SampleItem> = plan
        .iter()
        .filter(|item| !dir.join(&item.file).is_file())
        .collect();
    let started = Instant::now();
    if !todo.is_empty() {
        let mut models = SdModels::load(base, device)?;
        if let Some(adapter) = adapter {
            let params = tch::nn::VarStore::new(device);
            crate::peft::file::load_adapter(
                adapter,
                &mut models.unet,
                &models.unet_vars,
                params.root(),
                base_identity,
            )?;
            models.adapter_vars = Some(params);
        }
        let scheduler_config = crate::model::pipeline::load_scheduler_config(base)?;
        let generate_options = GenerateOptions {
            steps: settings.steps,
            guidance_scale: settings.guidance_scale,
            negative_prompt: None,
            batch_size: config.sample.batch_size,
        };
        let (height, width) = (settings.height as usize, settings.width as usize);
        let geometry = models.geometry();
        for batch in todo.chunks(config.sample.batch_size) {
            if opts.interrupt.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let prompts: Vec<String> = batch.iter().map(|item| item.prompt.clone()).collect();
            let latents = batch
                .iter()
                .map(|item| initial_latents(item.seed, 1, height, width, geometry, device))
                .collect::<Result<Vec<_>>>()?;
            let mut scheduler =
                crate::schedulers::from_name(&settings.scheduler, &scheduler_config)?;
            let images = generate(
                &models,
                scheduler.as_mut(),
                &prompts,
                &Tensor::cat(&latents, 0),
                &generate_options,
                &mut || {},
            )?;
            for (i, item) in batch.iter().enumerate() {
                let (w, h, data) = to_rgb8(&images.get(i as i64))?;
                let image = image::RgbImage::from_raw(w, h, data)
                    .ok_or_else(|| anyhow::anyhow!("image buffer of the wrong size"))?;
                write_png(&image, &dir.join(&item.file))?;
            }
        }
    }
    let record = SampleRecord {
        seconds: started.elapsed().as_secs_f64(),
        images: plan.len(),
    };
    finish_stage(layout, &stage, key, &record)?;
    Ok(Some(record))
}

/// results.json, results.csv, the plots, the sample grids and report.md.
fn write_outputs(
    layout: &Layout,
    config: &CompareConfig,
    results: &StudyResults,
    runs: &[TrainedRun],
    plan: &[SampleItem],
    test: &Dataset,
) -> Result<()> {
    let root = &layout.root;
    write_json(&root.join(RESULTS_JSON), results)?;
    write_atomic_str(&root.join(RESULTS_CSV), &results.to_csv())?;

    let mut plots = Vec::new();
    fid_vs_params(results, &root.join("plots/fid_vs_params.png"))?;
    plots.push((
        "plots/fid_vs_params.png".to_string(),
        "FID against trainable parameters".to_string(),
    ));
    train_time(results, &root.join("plots/train_time.png"))?;
    plots.push((
        "plots/train_time.png".to_string(),
        "Training time per method".to_string(),
    ));
    let mut curves = Vec::new();
    for TrainedRun { method, record, .. } in runs {
        let metrics = MetricsLog::read(&record.adapter.with_file_name(METRICS_FILE))?;
        let index = results
            .rows
            .iter()
            .position(|r| r.method == method.name)
            .unwrap_or(0);
        curves.push(LossCurve {
            method: method.name.clone(),
            label: method.label(),
            index,
            points: metrics.iter().map(|m| (m.step as f64, m.loss)).collect(),
        });
    }
    loss_curves(&curves, &root.join("plots/loss_curves.png"))?;
    plots.push((
        "plots/loss_curves.png".to_string(),
        "Training loss".to_string(),
    ));

    // Grids: the first `grid_classes` classes and `grid_seeds` seeds of the plan.
    let s = &config.sample;
    let classes: Vec<usize> = {
        let mut c: Vec<usize> = plan.iter().map(|item| item.class).collect();
        c.dedup();
        c.truncate(s.grid_classes.max(1));
        c
    };
    let seeds: Vec<u64> = plan
        .iter()
        .map(|item| item.seed)
        .take(s.per_class.min(s.grid_seeds.max(1)))
        .collect();
    let tile = config.sample_resolution().clamp(96, 256);
    let mut grids = Vec::new();
    let mut comparison = vec![GridRow {
        label: "target (real test image)".into(),
        tiles: real_tiles(test, &classes)?,
    }];
    for row in &results.rows {
        let dir = layout.samples(&row.method);
        let mut rows = Vec::new();
        for &class in &classes {
            let items: Vec<&SampleItem> = plan
                .iter()
                .filter(|item| item.class == class && seeds.contains(&item.seed))
                .collect();
            let tiles = items
                .iter()
                .map(|item| read_rgb(&dir.join(&item.file)))
                .collect::<Result<Vec<_>>>()?;
            rows.push(GridRow {
                label: test.classes[class].label.clone(),
                tiles,
            });
        }
        let titles: Vec<String> = seeds.iter().map(|seed| format!("seed {seed}")).collect();
        let file = format!("grids/{}.png", row.method);
        write_png(&compose(&rows, &titles, tile)?, &root.join(&file))?;
        grids.push((file, format!("{}: seeds side by side", row.label)));
        comparison.push(GridRow {
            label: row.label.clone(),
            tiles: rows
                .iter()
                .filter_map(|r| r.tiles.first().cloned())
                .collect(),
        });
    }
    let titles: Vec<String> = classes
        .iter()
        .map(|&c| test.classes[c].label.clone())
        .collect();
    write_png(
        &compose(&comparison, &titles, tile)?,
        &root.join("grids/comparison.png"),
    )?;
    grids.insert(
        0,
        (
            "grids/comparison.png".to_string(),
            format!("Every method, seed {}", s.seed),
        ),
    );

    let markdown = results.to_markdown(&plots, &grids)?;
    write_atomic_str(&root.join(REPORT_MD), &markdown)
}

/// The first test image of each class, for the comparison grid's top row.
fn real_tiles(test: &Dataset, classes: &[usize]) -> Result<Vec<image::RgbImage>> {
    classes
        .iter()
        .map(|&class| {
            let sample = test
                .samples
                .iter()
                .find(|s| s.label == Some(class))
                .with_context(|| {
                    format!(
                        "the test split has no image of class {}",
                        test.classes[class].name
                    )
                })?;
            let rgb = crate::data::images::decode_rgb(
                &sample.image,
                crate::data::images::Alpha::Drop,
                &crate::data::images::DecodeOptions::default(),
            )?;
            Ok(image::DynamicImage::ImageRgb32F(rgb).to_rgb8())
        })
        .collect()
}
