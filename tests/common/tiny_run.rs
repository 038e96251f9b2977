//! The built-in tiny model and a synthetic Food101-layout dataset in a temp folder, with the
//! settings of a short CPU training run on them: the fixture of the training tests.
// Each test binary that includes this module uses a part of it.
#![allow(dead_code)]

use difftune::data::cache::CacheSettings;
use difftune::data::synthetic::{generate_food101_like, SyntheticSpec};
use difftune::model::source::ModelFiles;
use difftune::train::config::{DeviceChoice, RunConfig};
use difftune::train::{Resume, TrainOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

/// Training re-seeds torch's process-wide generator before every forward pass; tests running in
/// parallel threads would draw from it in between, so they take turns.
static TORCH_RNG: Mutex<()> = Mutex::new(());

/// Takes the turn; also sets one intra-op thread: on a shared 2-core machine, OpenMP's spinning
/// threads make the tiny model's steps up to 20x slower.
pub fn serial() -> MutexGuard<'static, ()> {
    let guard = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    tch::set_num_threads(1);
    guard
}

/// A run of `config` from `model` on `data` into `root/out`, caching into `root/cache`, as a test
/// runs it: from scratch, not interrupted, without progress bars.
pub fn train_options(
    model: &Path,
    data: &Path,
    root: &Path,
    config: RunConfig,
    out: &str,
) -> TrainOptions {
    TrainOptions {
        model: model.display().to_string(),
        data: data.to_path_buf(),
        cache: Some(root.join("cache")),
        out: root.join(out),
        config,
        resume: Resume::No,
        strict: false,
        stop_after: None,
        interrupt: Arc::new(AtomicBool::new(false)),
        progress: false,
    }
}

/// Images of the synthetic datasets, and the training resolution.
pub const RESOLUTION: u32 = 64;

pub struct TinyRun {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub model: PathBuf,
    pub data: PathBuf,
}

impl TinyRun {
    /// The tiny model (seed 0) and a dataset of `classes` classes with `train_per_class` training
    /// images and one test image each.
    pub fn new(classes: usize, train_per_class: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let model = root.join("model");
        difftune::model::tiny::write_tiny_model(&model, 0, &difftune::data::synthetic::captions())
            .unwrap();
        let data = root.join("data");
        let spec = SyntheticSpec {
            classes,
            train_per_class,
            test_per_class: 1,
            resolution: RESOLUTION,
            ..Default::default()
        };
        generate_food101_like(&data, &spec).unwrap();
        Self {
            _dir: dir,
            root,
            model,
            data,
        }
    }

    /// `steps` steps of `method` on the CPU at batch 4 without accumulation, with a checkpoint
    /// at the end only.
    pub fn config(&self, method: &str, steps: usize, lr: f64) -> RunConfig {
        let mut config = RunConfig::for_method(method).unwrap();
        let t = &mut config.train;
        t.steps = steps;
        t.batch_size = 4;
        t.gradient_accumulation_steps = 1;
        t.learning_rate = lr;
        t.resolution = RESOLUTION;
        t.checkpoint_every = steps;
        t.device = DeviceChoice::Cpu;
        config
    }

    /// A run of `config` into `out` (under the fixture's folder), caching into `cache/`.
    pub fn options(&self, config: RunConfig, out: &str) -> TrainOptions {
        train_options(&self.model, &self.data, &self.root, config, out)
    }

    /// `difftune train` on this fixture with the config in `config_file`, into `out`: one
    /// intra-op thread, stderr piped.
    pub fn cli(&self, config_file: &Path, out: &str) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_difftune"));
        command
            .arg("train")
            .args(["--model", self.model.to_str().unwrap()])
            .args(["--data", self.data.to_str().unwrap()])
            .args(["--cache", self.root.join("cache").to_str().unwrap()])
            .args(["--config", config_file.to_str().unwrap()])
            .args(["--out", self.root.join(out).to_str().unwrap()])
            .env("OMP_NUM_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    pub fn cache_settings(&self) -> CacheSettings {
        CacheSettings {
            resolution: RESOLUTION,
            shard_size: 8,
            batch_size: 4,
            ..CacheSettings::default()
        }
    }

    pub fn files(&self) -> ModelFiles {
        ModelFiles::resolve(&self.model.display().to_string(), None).unwrap()
    }
}
