//! Cooperating invocations on one study folder: several `difftune compare --out DIR` processes
//! (a job array, a second terminal, the workers of `--jobs`) share out the study's units with no
//! coordinator. Each process takes part in the folder with a shared lock on its lock file
//! ([`FolderUse`]); each unit (a stage: see [`super::stage`]) is done under its own lock in
//! `DIR/locks/STAGE/` ([`Claims`], taken when the stage is entered and given back when it is
//! finished), so a process skips the units others hold ([`UnitHeld`], see
//! [`super::units::serial`]) and reuses the records of those they finished. A process killed
//! mid-unit leaves its lock free with its record in it: the next one to claim the unit says so,
//! takes it over and resumes it from its checkpoint. The report is written by the last process to
//! leave the folder, once.
//!
//! The lock files are the OS's (`flock`), so this holds on one machine and on shared file systems
//! that support `flock` across machines (NFSv4, Lustre and GPFS do; check yours).
use crate::util::fs::write_atomic_str;
use crate::util::lock::{open_lock_file, read_holder, DirLock};
use anyhow::{bail, Context, Result};
use std::cell::Cell;
use std::collections::HashMap;
use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The folder of the units' locks in a study folder.
pub const LOCKS_DIR: &str = "locks";
/// The lock taken briefly to join or leave a study folder, so that the check "am I alone" and
/// what follows from it are one step.
const ADMISSION: &str = "admission";
/// What the unit and admission locks record as their holder's command.
const COMMAND: &str = "compare";

/// A unit another process is doing now: come back to it later.
#[derive(Debug, thiserror::Error)]
#[error("{unit} is being done by another process")]
pub struct UnitHeld {
    pub unit: String,
    /// The folder of its lock.
    pub lock: PathBuf,
}

impl UnitHeld {
    /// Whether its holder has let it go (finished it, or ended).
    pub fn is_free(&self) -> bool {
        let Ok(file) = open_lock_file(&self.lock) else {
            return false;
        };
        // A shared lock is refused only while the holder's exclusive one is held; closing the
        // file gives it back.
        file.try_lock_shared().is_ok()
    }
}

thread_local! {
    /// Whether a held unit is skipped ([`UnitHeld`]) rather than waited for: set by
    /// [`super::units::serial`] around each unit, which the stages it runs cannot be told
    /// through their arguments (they are called the same way in and out of a wave).
    static DEFERRING: Cell<bool> = const { Cell::new(false) };
}

thread_local! {
    /// The first unit claimed inside [`deferring`]: the unit it ran, for the progress lines.
    static FIRST_CLAIMED: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs `unit` with held units skipped (an error [`UnitHeld`]) rather than waited for; with its
/// result, the name of the first unit it claimed.
pub fn deferring<T>(unit: impl FnOnce() -> T) -> (T, Option<String>) {
    let before = DEFERRING.replace(true);
    FIRST_CLAIMED.set(None);
    let result = unit();
    DEFERRING.set(before);
    (result, FIRST_CLAIMED.take())
}

/// The unit locks this process holds in a study folder.
pub struct Claims {
    /// `DIR/locks`; `None` where another rank of this process's group claims for it.
    dir: Option<PathBuf>,
    held: Mutex<HashMap<String, DirLock>>,
}

impl Claims {
    pub fn in_folder(root: &Path) -> Self {
        Self {
            dir: Some(root.join(LOCKS_DIR)),
            held: Mutex::default(),
        }
    }

    /// No claims: the ranks other than 0 of a data-parallel comparison, which do what rank 0
    /// decided.
    pub fn none() -> Self {
        Self {
            dir: None,
            held: Mutex::default(),
        }
    }

    /// Takes the lock of `unit` (kept until [`Claims::release`] or the end of the process). When
    /// another process holds it: [`UnitHeld`] inside [`deferring`], otherwise waits for it.
    pub fn claim(&self, unit: &str) -> Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let mut held = self.held.lock().expect("unit claims poisoned");
        if held.contains_key(unit) {
            return Ok(());
        }
        let path = dir.join(unit);
        let lock = match DirLock::try_acquire(&path, COMMAND)? {
            Some(lock) => lock,
            None if DEFERRING.get() => {
                return Err(UnitHeld {
                    unit: unit.to_string(),
                    lock: path,
                }
                .into())
            }
            None => DirLock::acquire_waiting(&path, COMMAND)?,
        };
        held.insert(unit.to_string(), lock);
        FIRST_CLAIMED.with_borrow_mut(|first| {
            first.get_or_insert_with(|| unit.to_string());
        });
        Ok(())
    }

    /// Gives back the lock of `unit`, if held.
    pub fn release(&self, unit: &str) {
        self.held.lock().expect("unit claims poisoned").remove(unit);
    }
}

/// How this process uses a study folder.
pub enum FolderUse {
    /// Alone (the rank 0 of a data-parallel comparison): an exclusive lock.
    Exclusive(DirLock),
    /// Among cooperating invocations: a shared lock on the folder's lock file.
    Cooperating(File),
}

/// While held, this process is the one writing the study's report (the last to leave).
pub struct ReportTurn {
    _admission: Option<DirLock>,
    _folder: Option<FolderUse>,
}

impl FolderUse {
    /// Takes part in the study in `out` (created when missing) with the resolved run file
    /// `settings_toml`, which is written to `out/config_file` when no other process is there.
    /// Refused while another process uses the folder with a different run file, or while another
    /// command (`train`) holds it. `cooperate: false` takes the folder alone, as today's
    /// data-parallel comparison does.
    pub fn enter(
        out: &Path,
        config_file: &str,
        settings_toml: &str,
        cooperate: bool,
    ) -> Result<Self> {
        if !cooperate {
            let lock = DirLock::acquire(out, COMMAND)?;
            write_atomic_str(&out.join(config_file), settings_toml)?;
            return Ok(Self::Exclusive(lock));
        }
        let _admission = DirLock::acquire_waiting(&admission_dir(out), COMMAND)?;
        let mut file = open_lock_file(out)?;
        match file.try_lock() {
            Ok(()) => {
                // Alone: what a killed writer left is nobody's, and the run file may change.
                file.set_len(0)
                    .with_context(|| format!("clearing the lock record in {}", out.display()))?;
                crate::util::fs::remove_leftover_temps(out)?;
                write_atomic_str(&out.join(config_file), settings_toml)?;
                file.lock_shared()
                    .with_context(|| format!("sharing the lock of {}", out.display()))?;
            }
            Err(TryLockError::WouldBlock) => match file.try_lock_shared() {
                Ok(()) => same_run_file(out, config_file, settings_toml)?,
                Err(TryLockError::WouldBlock) => {
                    let who = read_holder(&mut file)
                        .map_or("another difftune process".to_string(), |h| h.to_string());
                    bail!(
                        "{} is in use by {who}: wait for it to end or stop it, or choose another folder",
                        out.display()
                    )
                }
                Err(TryLockError::Error(e)) => return Err(e).context("locking the study folder"),
            },
            Err(TryLockError::Error(e)) => return Err(e).context("locking the study folder"),
        }
        Ok(Self::Cooperating(file))
    }

    /// Leaves the folder with every unit done: the turn to write the report when this process is
    /// the last one there (always, alone), `None` when another is still there (it writes it).
    pub fn leave(self, out: &Path) -> Result<Option<ReportTurn>> {
        let file = match self {
            Self::Exclusive(_) => {
                return Ok(Some(ReportTurn {
                    _admission: None,
                    _folder: Some(self),
                }))
            }
            Self::Cooperating(file) => file,
        };
        let admission = DirLock::acquire_waiting(&admission_dir(out), COMMAND)?;
        file.unlock()
            .with_context(|| format!("unlocking {}", out.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(ReportTurn {
                _admission: Some(admission),
                _folder: Some(Self::Cooperating(file)),
            })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(e).context("locking the study folder"),
        }
    }
}

fn admission_dir(out: &Path) -> PathBuf {
    out.join(LOCKS_DIR).join(ADMISSION)
}

/// Refuses to join the processes in `out` with another run file than theirs.
fn same_run_file(out: &Path, config_file: &str, settings_toml: &str) -> Result<()> {
    let path = out.join(config_file);
    let theirs = std::fs::read_to_string(&path).unwrap_or_default();
    if theirs != settings_toml {
        bail!(
            "{} is in use by other difftune compare processes with another run file ({}): \
             run the same run file and settings there, wait for them to end, or choose another folder",
            out.display(),
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_unit_is_skipped_when_deferring_and_free_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = Claims::in_folder(dir.path());
        first.claim("run-lora").unwrap();
        // A second holder in this process stands for another process (flock is per open file).
        let second = Claims::in_folder(dir.path());
        let err = deferring(|| second.claim("run-lora")).0.unwrap_err();
        let held = err.downcast_ref::<UnitHeld>().unwrap();
        assert_eq!(held.unit, "run-lora");
        assert!(!held.is_free());
        second.claim("run-full").unwrap();
        first.release("run-lora");
        assert!(held.is_free());
        let (claimed, first) = deferring(|| second.claim("run-lora"));
        claimed.unwrap();
        assert_eq!(first.as_deref(), Some("run-lora"));
    }

    #[test]
    fn a_second_invocation_joins_with_the_same_run_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("study");
        let first = FolderUse::enter(&out, "compare.toml", "a = 1\n", true).unwrap();
        let err = FolderUse::enter(&out, "compare.toml", "a = 2\n", true)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("another run file"), "{err}");
        let second = FolderUse::enter(&out, "compare.toml", "a = 1\n", true).unwrap();
        assert!(DirLock::acquire(&out, "train").is_err());
        assert!(first.leave(&out).unwrap().is_none());
        let turn = second.leave(&out).unwrap();
        assert!(turn.is_some());
        drop(turn);
        // Alone again, the run file may change.
        FolderUse::enter(&out, "compare.toml", "a = 2\n", true).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("compare.toml")).unwrap(),
            "a = 2\n"
        );
    }
}
