//! The resumable stage engine of a comparison, and the layout of its output folder.
//!
//! Every stage records in `OUT/state/STAGE.json` the settings it is computed from (its key) and,
//! once finished, what it produced. A finished stage whose key is unchanged is reused; a stage
//! whose key changed is redone from scratch; an unfinished one resumes (training from its last
//! checkpoint, sampling from the last image written).
use super::claim::{deferring, Claims, UnitHeld};
use crate::data::synthetic::Domain;
use crate::util::fs::write_json;
use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where [`WallClock`] keeps the time spent so far.
const WALL_TIME_FILE: &str = "state/wall-time.json";

/// The run that pre-trains the base model on the source domain (`runs/pretrain`).
pub const PRETRAIN_RUN: &str = "pretrain";

/// One stage of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage<'a> {
    /// Generating a synthetic domain.
    Data(Domain),
    /// Writing (and training the VAE of) the tiny model.
    TinyModel,
    /// Merging the pre-training run into the base model.
    BaseModel,
    /// One training run: a method's, or [`PRETRAIN_RUN`].
    Run(&'a str),
    /// A learning-rate candidate's run that diverged: its record is the step.
    Diverged(&'a str),
    /// Sampling one row of the study (the base model or a method).
    Samples(&'a str),
    /// Scoring one row's samples.
    Score(&'a str),
    /// Holding out the validation images of the learning-rate search.
    ValidationSplit,
    /// Timing every method's training step, interleaved.
    Timing,
    /// Training the content classifier.
    Classifier,
}

impl fmt::Display for Stage<'_> {
    /// The stage's name, which is also its state file's name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage::Data(Domain::Source) => write!(f, "data-source"),
            Stage::Data(Domain::Target) => write!(f, "data-target"),
            Stage::TinyModel => write!(f, "model-tiny"),
            Stage::BaseModel => write!(f, "model-base"),
            Stage::Run(name) => write!(f, "run-{name}"),
            Stage::Diverged(name) => write!(f, "diverged-{name}"),
            Stage::Samples(row) => write!(f, "samples-{row}"),
            Stage::Score(row) => write!(f, "score-{row}"),
            Stage::ValidationSplit => write!(f, "data-validation-split"),
            Stage::Timing => write!(f, "timing"),
            Stage::Classifier => write!(f, "classifier"),
        }
    }
}

/// The folders of a comparison's output, the clock of the time spent on it, and the locks of
/// the stages this process is doing (see [`super::claim`]).
pub struct Layout {
    pub root: PathBuf,
    pub clock: WallClock,
    claims: Claims,
}

impl Layout {
    /// The output folder `root`, created when missing; starts the clock.
    pub fn create(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        Ok(Self {
            root: root.to_path_buf(),
            clock: WallClock::start(&root.join(WALL_TIME_FILE)),
            claims: Claims::in_folder(root),
        })
    }

    /// The output folder `root` as the other ranks of a data-parallel comparison see it: rank 0
    /// creates it, keeps the clock and writes the stage states.
    pub fn open(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            clock: WallClock::start(&root.join(WALL_TIME_FILE)),
            claims: Claims::none(),
        }
    }

    /// The same folder for another group of ranks that this process is part of (a team of a
    /// run-parallel study: see [`super::teams`]): its rank 0 (`claims`) claims for it.
    pub fn for_group(&self, claims: bool) -> Self {
        Self {
            root: self.root.clone(),
            clock: self.clock.clone(),
            claims: match claims {
                true => Claims::in_folder(&self.root),
                false => Claims::none(),
            },
        }
    }

    pub fn data(&self, domain: Domain) -> PathBuf {
        self.root.join("data").join(domain_name(domain))
    }
    pub fn model(&self, name: &str) -> PathBuf {
        self.root.join("model").join(name)
    }
    pub fn run(&self, name: &str) -> PathBuf {
        self.root.join("runs").join(name)
    }
    pub fn cache(&self, domain: &str) -> PathBuf {
        self.root.join("cache").join(domain)
    }
    pub fn samples(&self, row: &str) -> PathBuf {
        self.root.join("samples").join(row)
    }
    pub fn eval(&self) -> PathBuf {
        self.root.join("eval")
    }
    /// The timing pass's folder (its rounds so far, while it runs).
    pub fn timing(&self) -> PathBuf {
        self.root.join("timing")
    }
    fn state(&self, stage: Stage) -> PathBuf {
        self.root.join("state").join(format!("{stage}.json"))
    }

    /// Saves the wall time spent so far.
    pub fn save_clock(&self) -> Result<()> {
        self.clock.save(&self.root.join(WALL_TIME_FILE))
    }

    /// The record of `stage` when it is done. Not done: `dir` (the stage's folder) is cleared
    /// when it holds work for other settings (or of unknown origin), and the key is recorded so
    /// that the work it starts now can be resumed. The stage is claimed first (and, when not
    /// done, kept claimed until [`Layout::finish`]): when another process holds it, this waits
    /// for it, or fails with [`super::claim::UnitHeld`] inside [`super::claim::deferring`].
    pub fn enter<T: DeserializeOwned>(
        &self,
        stage: Stage,
        dir: Option<&Path>,
        key: &Value,
    ) -> Result<Option<T>> {
        let unit = stage.to_string();
        self.claims.claim(&unit)?;
        let done = self.enter_claimed(stage, dir, key);
        if !matches!(done, Ok(None)) {
            self.claims.release(&unit);
        }
        done
    }

    /// Claims `stage` unless another process holds it (then `false`), without entering it.
    pub fn try_claim(&self, stage: Stage) -> Result<bool> {
        match deferring(|| self.claims.claim(&stage.to_string())).0 {
            Ok(()) => Ok(true),
            Err(e) if e.is::<UnitHeld>() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives back the claim of `stage`, if held.
    pub fn release(&self, stage: Stage) {
        self.claims.release(&stage.to_string());
    }

    fn enter_claimed<T: DeserializeOwned>(
        &self,
        stage: Stage,
        dir: Option<&Path>,
        key: &Value,
    ) -> Result<Option<T>> {
        let path = self.state(stage);
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

    /// The record of `stage` when it is finished under `key`, without recording anything.
    pub fn recorded<T: DeserializeOwned>(&self, stage: Stage, key: &Value) -> Result<Option<T>> {
        let path = self.state(stage);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(None);
        };
        match serde_json::from_str::<StageState>(&text) {
            Ok(state) if state.finished && &state.key == key => Ok(Some(
                serde_json::from_value(state.record)
                    .with_context(|| format!("reading {}", path.display()))?,
            )),
            _ => Ok(None),
        }
    }

    /// Starts `stage` over (claiming it again): clears its folder `dir` and records it as
    /// unfinished under `key`.
    pub fn reset(&self, stage: Stage, dir: &Path, key: &Value) -> Result<()> {
        self.claims.claim(&stage.to_string())?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        write_json(
            &self.state(stage),
            &StageState {
                key: key.clone(),
                finished: false,
                record: Value::Null,
            },
        )
    }

    /// Records `stage` as finished with `record`, and gives back its claim (a diverged run's
    /// record ends its run's stage too).
    pub fn finish<T: Serialize>(&self, stage: Stage, key: &Value, record: &T) -> Result<()> {
        write_json(
            &self.state(stage),
            &StageState {
                key: key.clone(),
                finished: true,
                record: serde_json::to_value(record)?,
            },
        )?;
        self.claims.release(&stage.to_string());
        if let Stage::Diverged(run) = stage {
            self.claims.release(&Stage::Run(run).to_string());
        }
        self.save_clock()
    }
}

/// The folder name of a synthetic domain.
pub fn domain_name(domain: Domain) -> &'static str {
    match domain {
        Domain::Source => "source",
        Domain::Target => "target",
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

/// Wall time spent on a comparison over all its invocations, kept in `state/wall-time.json` and
/// saved whenever a stage finishes, so the work of an interrupted invocation still counts.
#[derive(Clone)]
pub struct WallClock {
    earlier_seconds: f64,
    pub invocations: u32,
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

    pub fn this_invocation(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn total(&self) -> f64 {
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
