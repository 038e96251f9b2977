//! Training checkpoints: `checkpoints/step-NNNNNNNN/` holding the trainable weights
//! (`trainable.safetensors`), the optimizer state (`optimizer.safetensors`) and `state.json`
//! (step, seed, data position, method, base model, the run config). Each is written to a temp
//! folder and renamed into place, so a kill leaves either the whole checkpoint or none; only the
//! last few are kept.
use crate::model::weights::{read_all, save_tensors};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

const PREFIX: &str = "step-";
const TEMP_PREFIX: &str = ".tmp-";
const STATE_FILE: &str = "state.json";
const TRAINABLE_FILE: &str = "trainable.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// What `state.json` records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointState {
    /// Optimizer steps done.
    pub step: usize,
    /// Training samples consumed: the data position within the seeded epoch order.
    pub samples_seen: usize,
    pub epoch: usize,
    pub seed: u64,
    pub method: String,
    /// Fingerprint of the base U-Net (see `ModelFiles::unet_identity`).
    pub base_unet: String,
    /// The run config as TOML.
    pub config: String,
    /// Ranks of the data-parallel run that wrote it (1 for a single process).
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

/// A checkpoint folder on disk.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: CheckpointState,
}

impl Checkpoint {
    pub fn trainable(&self) -> Result<BTreeMap<String, Tensor>> {
        read_all(&self.dir.join(TRAINABLE_FILE))
    }

    pub fn optimizer(&self) -> Result<BTreeMap<String, Tensor>> {
        read_all(&self.dir.join(OPTIMIZER_FILE))
    }

    fn open(dir: &Path) -> Result<Self> {
        Ok(Self {
            dir: dir.to_path_buf(),
            state: crate::util::fs::read_json(&dir.join(STATE_FILE))?,
        })
    }
}

fn step_of(name: &str) -> Option<usize> {
    name.strip_prefix(PREFIX)?.parse().ok()
}

/// Checkpoint folders under `root`, oldest first.
fn list(root: &Path) -> Result<Vec<(usize, PathBuf)>> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let entry = entry?;
        if let Some(step) = entry.file_name().to_str().and_then(step_of) {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The checkpoint with the most steps under `root`, if any.
pub fn latest(root: &Path) -> Result<Option<Checkpoint>> {
    match list(root)?.pop() {
        Some((_, dir)) => {
            Ok(Some(Checkpoint::open(&dir).with_context(|| {
                format!("checkpoint {}", dir.display())
            })?))
        }
        None => Ok(None),
    }
}

/// Sets aside every checkpoint under `root` at `step` or later, renaming `step-N` to
/// `step-N.nonfinite` (kept for inspection; resume and pruning skip it): their weights gave a
/// non-finite loss or gradient. Returns the folders set aside and the newest checkpoint left.
pub fn set_aside_from(root: &Path, step: usize) -> Result<(Vec<PathBuf>, Option<Checkpoint>)> {
    let mut set_aside = Vec::new();
    for (_, dir) in list(root)?.into_iter().filter(|(s, _)| *s >= step) {
        let mut name = dir.file_name().unwrap_or_default().to_os_string();
        name.push(".nonfinite");
        let to = dir.with_file_name(name);
        if to.exists() {
            std::fs::remove_dir_all(&to).with_context(|| format!("replacing {}", to.display()))?;
        }
        std::fs::rename(&dir, &to)
            .with_context(|| format!("renaming {} to {}", dir.display(), to.display()))?;
        set_aside.push(to);
    }
    Ok((set_aside, latest(root)?))
}

/// Writes a checkpoint under `root` and deletes all but the newest `keep`.
pub fn save(
    root: &Path,
    state: &CheckpointState,
    trainable: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    // Temp folders of a run killed while saving.
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    let final_dir = root.join(format!("{PREFIX}{:08}", state.step));
    let temp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempdir_in(root)
        .with_context(|| format!("creating a temp folder in {}", root.display()))?;
    save_tensors(&temp.path().join(TRAINABLE_FILE), trainable, None)?;
    save_tensors(&temp.path().join(OPTIMIZER_FILE), optimizer, None)?;
    crate::util::fs::write_json(&temp.path().join(STATE_FILE), state)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)
            .with_context(|| format!("replacing {}", final_dir.display()))?;
    }
    let temp = temp.keep();
    std::fs::rename(&temp, &final_dir)
        .with_context(|| format!("renaming {} to {}", temp.display(), final_dir.display()))?;
    let all = list(root)?;
    if all.len() > keep {
        for (_, dir) in &all[..all.len() - keep] {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("removing old checkpoint {}", dir.display()))?;
        }
    }
    Ok(final_dir)
}

/// Errors unless `checkpoint` was written by a run that computes what `current` computes.
pub fn ensure_compatible(checkpoint: &CheckpointState, current: &CheckpointState) -> Result<()> {
    if checkpoint.method != current.method {
        bail!(
            "the checkpoint trained method `{}`, this run asks for `{}`: use another --out or the same method",
            checkpoint.method,
            current.method
        );
    }
    if checkpoint.base_unet != current.base_unet {
        bail!("the checkpoint was trained from a different base U-Net (fingerprint differs): use the same --model");
    }
    let parse = |text: &str| super::config::RunConfig::from_toml(text);
    let (old, new) = (parse(&checkpoint.config)?, parse(&current.config)?);
    if old.method != new.method {
        bail!(
            "the checkpoint's method settings differ from this run's:\n  checkpoint: {}\n  this run:   {}",
            toml::to_string(&old.method)?.trim().replace('\n', ", "),
            toml::to_string(&new.method)?.trim().replace('\n', ", ")
        );
    }
    let (a, b) = (old.train.trajectory(), new.train.trajectory());
    if a != b {
        let (a, b) = (toml::Table::try_from(a)?, toml::Table::try_from(b)?);
        let differing: Vec<String> = a
            .iter()
            .filter(|(k, v)| b.get(*k) != Some(*v))
            .map(|(k, v)| {
                format!(
                    "{k} = {v} (now {})",
                    b.get(k).map(|v| v.to_string()).unwrap_or_default()
                )
            })
            .collect();
        bail!(
            "the checkpoint's training settings differ from this run's, so it would not continue the same run: {}",
            differing.join(", ")
        );
    }
    Ok(())
}
