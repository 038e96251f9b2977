//! Training checkpoints: `checkpoints/step-NNNNNNNN/` holding the trainable weights
//! (`trainable.safetensors`), the optimizer state (`optimizer.safetensors`), `state.json` (step,
//! seed, data position, method, base model, the run config) and `SHA256SUMS`, the checksum of each
//! of those three in `sha256sum`'s format (`sha256sum -c SHA256SUMS` checks one by hand). A
//! checkpoint is written to a temp folder and renamed into place (replacing one of the same step in
//! one exchange), so a kill leaves either the whole checkpoint or none; only the last few are kept.
//!
//! Resuming trusts only a checkpoint whose files all match their checksums: the newest such one is
//! used, and newer ones that fail are moved aside (`rejected-step-NNNNNNNN`) with a message naming
//! each and why. A checkpoint without `SHA256SUMS` (written before checkpoints carried checksums)
//! is refused the same way; writing its `SHA256SUMS` by hand vouches for it.
use crate::error::CheckpointError;
use crate::model::weights::{read_all, save_tensors};
use crate::util::fs::{
    read_json, replace_dir, sha256_file, sync_dir, write_atomic_str, write_json,
};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

const PREFIX: &str = "step-";
const TEMP_PREFIX: &str = ".tmp-";
const REJECTED_PREFIX: &str = "rejected-";
const STATE_FILE: &str = "state.json";
const TRAINABLE_FILE: &str = "trainable.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const CHECKSUMS_FILE: &str = "SHA256SUMS";
/// The files `SHA256SUMS` covers: all of a checkpoint's others.
const CHECKED_FILES: [&str; 3] = [TRAINABLE_FILE, OPTIMIZER_FILE, STATE_FILE];

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

/// A checkpoint folder on disk whose files matched their checksums when it was opened.
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

    /// Opens the checkpoint in `dir`, or says why it cannot be trusted.
    pub fn open_verified(dir: &Path) -> Result<Self> {
        verify_checksums(dir)?;
        let state: CheckpointState = read_json(&dir.join(STATE_FILE))?;
        let named = dir.file_name().and_then(|n| n.to_str()).and_then(step_of);
        ensure!(
            named == Some(state.step),
            "its {STATE_FILE} records step {}, not the step its folder is named after",
            state.step
        );
        Ok(Self {
            dir: dir.to_path_buf(),
            state,
        })
    }
}

/// Checks every file of the checkpoint in `dir` against its `SHA256SUMS`.
fn verify_checksums(dir: &Path) -> Result<()> {
    let sums = dir.join(CHECKSUMS_FILE);
    if !sums.is_file() {
        return Err(CheckpointError::Unverified {
            dir: dir.to_path_buf(),
            files: CHECKED_FILES.join(" "),
        }
        .into());
    }
    let text =
        std::fs::read_to_string(&sums).with_context(|| format!("reading {}", sums.display()))?;
    // `HASH  NAME` (or `HASH *NAME`, sha256sum's binary mode).
    let recorded: BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(hash, name)| (name.trim_start_matches([' ', '*']), hash))
        .collect();
    for name in CHECKED_FILES {
        let expected = recorded
            .get(name)
            .with_context(|| format!("its {CHECKSUMS_FILE} has no checksum of {name}"))?;
        let actual = sha256_file(&dir.join(name))?;
        if actual != *expected {
            return Err(CheckpointError::Damaged { file: name.into() }.into());
        }
    }
    Ok(())
}

/// Records the checksum of each of a checkpoint's files in its `SHA256SUMS`.
fn write_checksums(dir: &Path) -> Result<()> {
    let mut text = String::new();
    for name in CHECKED_FILES {
        text += &format!("{}  {name}\n", sha256_file(&dir.join(name))?);
    }
    write_atomic_str(&dir.join(CHECKSUMS_FILE), &text)
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

/// Whether `root` holds any checkpoint folder, verified or not.
pub fn any(root: &Path) -> Result<bool> {
    Ok(!list(root)?.is_empty())
}

/// A checkpoint folder that failed verification, and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub dir: PathBuf,
    pub reason: String,
}

/// The checkpoints under a folder as resuming sees them: the newest one that verifies, and the
/// newer ones that did not (newest first).
#[derive(Debug)]
pub struct Scan {
    pub newest: Option<Checkpoint>,
    pub rejected: Vec<Rejected>,
}

/// Verifies the checkpoints under `root` from the newest down, up to the first that is intact.
/// Reads only.
pub fn scan(root: &Path) -> Result<Scan> {
    let mut rejected = Vec::new();
    for (_, dir) in list(root)?.into_iter().rev() {
        match Checkpoint::open_verified(&dir) {
            Ok(found) => {
                return Ok(Scan {
                    newest: Some(found),
                    rejected,
                })
            }
            Err(e) => rejected.push(Rejected {
                dir,
                reason: format!("{e:#}"),
            }),
        }
    }
    Ok(Scan {
        newest: None,
        rejected,
    })
}

/// The newest checkpoint under `root` whose files verify, if any.
pub fn latest(root: &Path) -> Result<Option<Checkpoint>> {
    Ok(scan(root)?.newest)
}

/// The checkpoint a resumed run continues from: the newest under `root` whose files verify
/// (`None` when there is no checkpoint). Newer ones that fail are moved aside, so that the resumed
/// run's own checkpoints are never pruned in their favour, and each is named on stderr with why.
/// When checkpoints exist but none verifies, the error names them all and nothing is moved.
pub fn resume_point(root: &Path) -> Result<Option<Checkpoint>> {
    let Scan { newest, rejected } = scan(root)?;
    let Some(newest) = newest else {
        if rejected.is_empty() {
            return Ok(None);
        }
        return Err(CheckpointError::NoneTrusted {
            root: root.to_path_buf(),
            rejected: rejected.into_iter().map(|r| (r.dir, r.reason)).collect(),
        }
        .into());
    };
    for skipped in &rejected {
        let aside = set_aside(&skipped.dir)?;
        eprintln!(
            "difftune: skipped checkpoint {} ({}); moved it to {}",
            skipped.dir.display(),
            skipped.reason,
            aside.display()
        );
    }
    if !rejected.is_empty() {
        eprintln!("difftune: resuming from {}", newest.dir.display());
    }
    Ok(Some(newest))
}

/// Renames a rejected checkpoint folder `step-N` to `rejected-step-N` (with a number after it
/// when that name is taken), out of the checkpoints resuming and pruning see.
fn set_aside(dir: &Path) -> Result<PathBuf> {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let mut aside = dir.with_file_name(format!("{REJECTED_PREFIX}{name}"));
    for n in 2.. {
        if !aside.exists() {
            break;
        }
        aside = dir.with_file_name(format!("{REJECTED_PREFIX}{name}-{n}"));
    }
    std::fs::rename(dir, &aside)
        .with_context(|| format!("moving {} to {}", dir.display(), aside.display()))?;
    Ok(aside)
}

/// Removes the temp folders of saves killed midway.
fn remove_temp_folders(root: &Path) -> Result<()> {
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    Ok(())
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

/// Writes a checkpoint under `root` (replacing one of the same step) and deletes all but the
/// newest `keep`.
pub fn save(
    root: &Path,
    state: &CheckpointState,
    trainable: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    remove_temp_folders(root)?;
    let final_dir = root.join(format!("{PREFIX}{:08}", state.step));
    let temp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempdir_in(root)
        .with_context(|| format!("creating a temp folder in {}", root.display()))?;
    let write = || -> Result<()> {
        save_tensors(&temp.path().join(TRAINABLE_FILE), trainable, None)?;
        save_tensors(&temp.path().join(OPTIMIZER_FILE), optimizer, None)?;
        write_json(&temp.path().join(STATE_FILE), state)?;
        write_checksums(temp.path())
    };
    write().with_context(|| format!("saving checkpoint {}", final_dir.display()))?;
    replace_dir(&temp.keep(), &final_dir)?;
    sync_dir(root)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: usize) -> CheckpointState {
        CheckpointState {
            step,
            samples_seen: step * 4,
            epoch: 0,
            seed: 0,
            method: "bitfit".into(),
            base_unet: "unet".into(),
            config: String::new(),
            world_size: 1,
        }
    }

    fn save_values(root: &Path, step: usize, value: f64) -> PathBuf {
        let weights = [("w".to_string(), Tensor::from_slice(&[value as f32; 3]))];
        save(root, &state(step), &weights, &[], 2).unwrap()
    }

    #[test]
    fn a_checkpoint_saved_again_at_its_step_is_replaced_whole() {
        let root = tempfile::tempdir().unwrap();
        save_values(root.path(), 3, 1.0);
        let dir = save_values(root.path(), 3, 2.0);
        let found = latest(root.path()).unwrap().unwrap();
        assert_eq!(found.dir, dir);
        let w = &found.trainable().unwrap()["w"];
        assert_eq!(w.double_value(&[0]), 2.0);
        let names: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["step-00000003"]);
    }

    #[test]
    fn checksums_cover_every_file_and_name_what_failed() {
        let root = tempfile::tempdir().unwrap();
        let dir = save_values(root.path(), 1, 1.0);
        let sums = std::fs::read_to_string(dir.join(CHECKSUMS_FILE)).unwrap();
        assert_eq!(sums.lines().count(), CHECKED_FILES.len(), "{sums}");
        assert!(Checkpoint::open_verified(&dir).is_ok());
        // sha256sum's binary-mode lines (`HASH *NAME`) are read too.
        std::fs::write(dir.join(CHECKSUMS_FILE), sums.replace("  ", " *")).unwrap();
        assert!(Checkpoint::open_verified(&dir).is_ok());

        std::fs::write(dir.join(OPTIMIZER_FILE), b"").unwrap();
        let err = format!("{:#}", Checkpoint::open_verified(&dir).unwrap_err());
        assert!(
            err.contains("optimizer.safetensors does not match its checksum"),
            "{err}"
        );
        std::fs::remove_file(dir.join(CHECKSUMS_FILE)).unwrap();
        let err = format!("{:#}", Checkpoint::open_verified(&dir).unwrap_err());
        assert!(err.contains("no SHA256SUMS"), "{err}");
    }

    #[test]
    fn a_checkpoint_renamed_to_another_step_is_not_trusted() {
        let root = tempfile::tempdir().unwrap();
        let dir = save_values(root.path(), 1, 1.0);
        let moved = root.path().join("step-00000005");
        std::fs::rename(&dir, &moved).unwrap();
        let err = format!("{:#}", Checkpoint::open_verified(&moved).unwrap_err());
        assert!(err.contains("records step 1"), "{err}");
    }
}
