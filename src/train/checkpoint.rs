//! Training checkpoints: `checkpoints/step-NNNNNNNN/` holding the trainable weights
//! (`trainable.safetensors`), the optimizer state (`optimizer.safetensors`), `state.json` (step,
//! seed, data position, method, base model, the run config) and `SHA256SUMS`, the checksum of each
//! of those three in `sha256sum`'s format (`sha256sum -c SHA256SUMS` checks one by hand). A
//! checkpoint is written to a temp folder and renamed into place (replacing one of the same step in
//! one exchange), so a kill leaves either the whole checkpoint or none. A run keeps its newest
//! few checkpoints and one older *healthy* one ([`Retention`]).
//!
//! Resuming trusts only a checkpoint whose files all match their checksums: the newest such one is
//! used, and newer ones that fail are moved aside (`rejected-step-NNNNNNNN`) with a message naming
//! each and why. A checkpoint without `SHA256SUMS` (written before checkpoints carried checksums)
//! is refused the same way; writing its `SHA256SUMS` by hand vouches for it.
use crate::error::CheckpointError;
use crate::model::weights::{read_all, write_safetensors, SafetensorsFile};
use crate::util::fs::{
    read_json, replace_dir, sha256_file, sync_dir, write_atomic_str, write_atomic_streamed,
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

    /// The trained tensors' file, its tensors read into the run's a piece at a time
    /// ([`crate::model::weights::NamedTensors`]).
    pub fn trainable_file(&self) -> Result<SafetensorsFile> {
        SafetensorsFile::open(&self.dir.join(TRAINABLE_FILE))
    }

    /// The optimizer's (and the EMA's) file, read as [`Checkpoint::trainable_file`].
    pub fn optimizer_file(&self) -> Result<SafetensorsFile> {
        SafetensorsFile::open(&self.dir.join(OPTIMIZER_FILE))
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

/// Records each file's checksum (by name, in [`CHECKED_FILES`]' order) in the `SHA256SUMS` of
/// the checkpoint in `dir`.
fn write_checksums(dir: &Path, digests: &BTreeMap<&str, String>) -> Result<()> {
    let mut text = String::new();
    for name in CHECKED_FILES {
        let digest = digests.get(name).context("every checked file is hashed")?;
        text += &format!("{digest}  {name}\n");
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

/// The folder name of the checkpoint of `step` (`step-00000012`), as `--resume-from` takes it.
pub fn folder_name(step: usize) -> String {
    format!("{PREFIX}{step:08}")
}

/// Reads a checkpoint named as `--resume-from` takes it: its folder name (`step-00000012`), or
/// `step-12`, or the step alone.
pub fn parse_step(name: &str) -> Result<usize, String> {
    name.strip_prefix(PREFIX)
        .unwrap_or(name)
        .parse()
        .map_err(|_| format!("`{name}` names no checkpoint: give its folder name (step-00000012) or its step (12)"))
}

/// Why checkpoints are set aside, and the suffix their folders get (`step-N.SUFFIX`, which
/// resuming and pruning do not see; kept for inspection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetAside {
    /// Their weights gave a non-finite loss or gradient.
    NonFinite,
    /// A run resumed from an older checkpoint, so they are not on its way.
    Abandoned,
}

impl SetAside {
    fn suffix(self) -> &'static str {
        match self {
            SetAside::NonFinite => ".nonfinite",
            SetAside::Abandoned => ".abandoned",
        }
    }
}

/// Sets aside every checkpoint under `root` at `step` or later, renaming `step-N` to
/// `step-N.SUFFIX` (replacing an earlier folder of that name). Returns the folders set aside and
/// the newest checkpoint left.
pub fn set_aside_from(
    root: &Path,
    step: usize,
    why: SetAside,
) -> Result<(Vec<PathBuf>, Option<Checkpoint>)> {
    let mut set_aside = Vec::new();
    for (_, dir) in list(root)?.into_iter().filter(|(s, _)| *s >= step) {
        let mut name = dir.file_name().unwrap_or_default().to_os_string();
        name.push(why.suffix());
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

/// The checkpoint of `step` under `root`, verified, or why it cannot be resumed from (naming the
/// checkpoints there are). Reads only.
pub fn open_step(root: &Path, step: usize) -> Result<Checkpoint> {
    let dir = root.join(folder_name(step));
    if !dir.is_dir() {
        let present: Vec<String> = list(root)?.iter().map(|(s, _)| folder_name(*s)).collect();
        bail!(
            "there is no checkpoint {} in {} (there are: {})",
            folder_name(step),
            root.display(),
            if present.is_empty() {
                "none".to_string()
            } else {
                present.join(", ")
            }
        );
    }
    Checkpoint::open_verified(&dir)
        .with_context(|| format!("checkpoint {} cannot be trusted", dir.display()))
}

/// The checkpoint of `step` under `root`, chosen to resume from (`--resume-from`): verified, and
/// the newer ones set aside as abandoned (each named on stderr), so that the resumed run's
/// checkpoints are the newest and none of the way it leaves is pruned or resumed from later.
pub fn resume_at(root: &Path, step: usize) -> Result<Checkpoint> {
    let found = open_step(root, step)?;
    let (abandoned, _) = set_aside_from(root, step + 1, SetAside::Abandoned)?;
    for dir in abandoned {
        eprintln!(
            "difftune: resuming from {}: set aside the newer checkpoint as {}",
            found.dir.display(),
            dir.display()
        );
    }
    Ok(found)
}

/// The verified checkpoints under `root` older than `step`, newest first (those that do not
/// verify are left out).
pub fn older_than(root: &Path, step: usize) -> Result<Vec<Checkpoint>> {
    Ok(list(root)?
        .into_iter()
        .rev()
        .filter(|(s, _)| *s < step)
        .filter_map(|(_, dir)| Checkpoint::open_verified(&dir).ok())
        .collect())
}

/// Which checkpoints a run keeps: the newest `keep`, and besides them the newest older one that
/// the run trained past for `healthy_span` steps with every loss finite, a *healthy* one kept out
/// of the rotation: damage that a divergence shows only later (it can make every checkpoint of
/// the rotation fail again at any learning rate) leaves it a point to go back to.
///
/// A checkpoint of step `t >= s + span` on disk is the proof for the one of step `s`: a
/// non-finite loss stops a run and sets aside the checkpoints from the weights it was computed
/// on ([`set_aside_from`]), so every step between them had a finite loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub keep: usize,
    /// `None`: no healthy checkpoint is kept.
    pub healthy_span: Option<usize>,
}

impl Retention {
    /// `keep_checkpoints`, and a healthy span of the rotation's length (`keep_checkpoints ×
    /// checkpoint_every` steps; none when checkpoints are saved only at the end).
    pub fn of(train: &super::config::TrainConfig) -> Self {
        let keep = train.keep_checkpoints;
        Self {
            keep,
            healthy_span: (train.checkpoint_every > 0).then(|| keep * train.checkpoint_every),
        }
    }

    /// The healthy checkpoint among `steps` (ascending): the newest one with another at least
    /// `healthy_span` steps after it.
    pub fn healthy(&self, steps: &[usize]) -> Option<usize> {
        let (span, &newest) = (self.healthy_span?, steps.last()?);
        let last_healthy = newest.checked_sub(span)?;
        steps.iter().rev().copied().find(|&s| s <= last_healthy)
    }

    /// The steps kept of `steps` (ascending): the newest `keep` and the healthy one.
    fn kept(&self, steps: &[usize]) -> Vec<usize> {
        let mut kept: Vec<usize> = steps[steps.len().saturating_sub(self.keep)..].to_vec();
        if let Some(healthy) = self.healthy(steps).filter(|h| !kept.contains(h)) {
            kept.insert(0, healthy);
        }
        kept
    }
}

/// Writes a checkpoint under `root` (replacing one of the same step) and deletes those
/// `retention` does not keep.
pub fn save(
    root: &Path,
    state: &CheckpointState,
    trainable: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    retention: Retention,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    remove_temp_folders(root)?;
    let final_dir = root.join(folder_name(state.step));
    let temp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempdir_in(root)
        .with_context(|| format!("creating a temp folder in {}", root.display()))?;
    // Each file is hashed as it is streamed out, not read back.
    let write = || -> Result<()> {
        let dir = temp.path();
        let keep_kind = Tensor::kind;
        let digests = BTreeMap::from([
            (
                TRAINABLE_FILE,
                write_safetensors(&dir.join(TRAINABLE_FILE), trainable, keep_kind, None)?,
            ),
            (
                OPTIMIZER_FILE,
                write_safetensors(&dir.join(OPTIMIZER_FILE), optimizer, keep_kind, None)?,
            ),
            (
                STATE_FILE,
                write_atomic_streamed(&dir.join(STATE_FILE), |out| {
                    serde_json::to_writer_pretty(&mut *out, state)?;
                    Ok(out.write_all(b"\n")?)
                })?,
            ),
        ]);
        write_checksums(dir, &digests)
    };
    write().with_context(|| format!("saving checkpoint {}", final_dir.display()))?;
    replace_dir(&temp.keep(), &final_dir)?;
    sync_dir(root)?;
    let all = list(root)?;
    let steps: Vec<usize> = all.iter().map(|(step, _)| *step).collect();
    let kept = retention.kept(&steps);
    for (_, dir) in all.iter().filter(|(step, _)| !kept.contains(step)) {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("removing old checkpoint {}", dir.display()))?;
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
        let retention = Retention {
            keep: 2,
            healthy_span: None,
        };
        save(root, &state(step), &weights, &[], retention).unwrap()
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

    #[test]
    fn the_newest_checkpoints_and_one_healthy_older_one_are_kept() {
        let retention = Retention {
            keep: 3,
            healthy_span: Some(6),
        };
        // Every 2 steps: the rotation holds 3 checkpoints (6 steps), the healthy one is the
        // newest with one at least 6 steps after it: the one leaving the rotation.
        assert_eq!(retention.kept(&[2, 4, 6]), [2, 4, 6]);
        assert_eq!(retention.kept(&[2, 4, 6, 8]), [2, 4, 6, 8]);
        assert_eq!(retention.kept(&[2, 4, 6, 8, 10]), [4, 6, 8, 10]);
        // An interrupted run's checkpoint (5) crowds the rotation: 2 stays the healthy one.
        assert_eq!(retention.kept(&[2, 4, 5, 6, 8]), [2, 5, 6, 8]);
        assert_eq!(retention.kept(&[2, 5, 6, 8, 10]), [2, 6, 8, 10]);
        assert_eq!(retention.kept(&[2, 6, 8, 10, 12]), [6, 8, 10, 12]);
        let none = Retention {
            keep: 2,
            healthy_span: None,
        };
        assert_eq!(none.kept(&[1, 2, 3]), [2, 3]);
        assert_eq!(none.healthy(&[1, 2, 3]), None);
    }

    #[test]
    fn resuming_at_an_older_checkpoint_sets_the_newer_ones_aside() {
        let root = tempfile::tempdir().unwrap();
        for step in 1..=3 {
            save_values(root.path(), step, step as f64);
        }
        assert_eq!(parse_step("step-00000001"), Ok(1));
        assert_eq!(parse_step("step-1"), Ok(1));
        assert_eq!(parse_step("1"), Ok(1));
        assert!(parse_step("latest").is_err());
        let err = format!("{:#}", resume_at(root.path(), 7).unwrap_err());
        assert!(
            err.contains("no checkpoint step-00000007")
                && err.contains("step-00000002, step-00000003"),
            "{err}"
        );
        let found = resume_at(root.path(), 2).unwrap();
        assert_eq!(found.state.step, 2);
        assert!(root.path().join("step-00000003.abandoned").is_dir());
        assert_eq!(latest(root.path()).unwrap().unwrap().state.step, 2);
        let older: Vec<usize> = older_than(root.path(), 3)
            .unwrap()
            .iter()
            .map(|c| c.state.step)
            .collect();
        assert_eq!(older, [2]);
    }
}
