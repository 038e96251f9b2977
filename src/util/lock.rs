//! Exclusive locks on the folders difftune writes (a run folder for `train` and `compare`, a cache
//! folder while it is built), so two processes never write one folder at once.
//!
//! The lock is the OS's (`File::try_lock`, `flock` on Linux) on `FOLDER/.difftune.lock`: the OS
//! releases it when its process ends however it ends, so a `kill -9` never leaves a folder locked.
//! The file records the holder's PID and command for the message of whoever is refused; a
//! record still there when the lock is free is what a killed holder left, and is taken over.
//! Taking the lock also removes the temp files that writes killed midway left in the folder (only
//! the holder writes there, so none of them belongs to a live writer).
use anyhow::{bail, Context, Result};
use std::fmt;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

/// The lock file's name in a locked folder.
pub const LOCK_FILE: &str = ".difftune.lock";

/// Who holds (or last held) a folder's lock, as its lock file records it.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    pub pid: u32,
    /// What it does there: `train`, `compare`, `cache`.
    pub command: String,
}

impl Holder {
    fn parse(text: &str) -> Option<Self> {
        let (pid, command) = text.trim().split_once(' ')?;
        Some(Self {
            pid: pid.parse().ok()?,
            command: command.to_string(),
        })
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "difftune {} (PID {})", self.command, self.pid)
    }
}

/// An exclusive lock on a folder, held until the value is dropped (or the process ends).
#[derive(Debug)]
pub struct DirLock {
    file: File,
}

impl DirLock {
    /// Locks `dir` (created when missing) for `command`, or fails naming the process holding it.
    pub fn acquire(dir: &Path, command: &str) -> Result<Self> {
        Self::lock(dir, command, false)
    }

    /// Locks `dir` for `command`, first waiting (and saying so) while another process holds it.
    pub fn acquire_waiting(dir: &Path, command: &str) -> Result<Self> {
        Self::lock(dir, command, true)
    }

    /// Locks `dir` for `command` when no other process holds it: `None` when one does.
    pub fn try_acquire(dir: &Path, command: &str) -> Result<Option<Self>> {
        let file = open_lock_file(dir)?;
        match file.try_lock() {
            Ok(()) => Self::hold(dir, command, file).map(Some),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("locking {}", dir.join(LOCK_FILE).display()))
            }
        }
    }

    fn lock(dir: &Path, command: &str, wait: bool) -> Result<Self> {
        let mut file = open_lock_file(dir)?;
        let path = dir.join(LOCK_FILE);
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = read_holder(&mut file);
                refuse_or_announce(dir, command, holder.as_ref(), wait)?;
                file.lock()
                    .with_context(|| format!("locking {}", path.display()))?;
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
        Self::hold(dir, command, file)
    }

    /// Records this process as the holder of the lock `file` has just taken on `dir` (saying so
    /// when it takes over what a killed holder left) and removes the temp files left there.
    fn hold(dir: &Path, command: &str, mut file: File) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        if let Some(stale) = read_holder(&mut file) {
            eprintln!(
                "difftune: {} was left locked by {stale}, which is no longer running; taking it over",
                dir.display()
            );
        }
        let record = format!("{} {command}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(record.as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
        crate::util::fs::remove_leftover_temps(dir)?;
        Ok(Self { file })
    }
}

impl Drop for DirLock {
    /// Clears the record (a record left behind marks a holder that was killed); closing the file
    /// releases the lock.
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
    }
}

/// The lock file of `dir` (both created when missing), open for reading and writing.
pub(crate) fn open_lock_file(dir: &Path) -> Result<File> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(LOCK_FILE);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))
}

/// The holder recorded in a lock file, if any.
pub(crate) fn read_holder(file: &mut File) -> Option<Holder> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    Holder::parse(&text)
}

/// The error for a folder another process holds, or (when `wait`) the note that this one waits.
fn refuse_or_announce(
    dir: &Path,
    command: &str,
    holder: Option<&Holder>,
    wait: bool,
) -> Result<()> {
    let who = match holder {
        Some(h) if h.pid == std::process::id() => bail!(
            "{} is already in use by this process ({}): `{command}` needs a folder of its own",
            dir.display(),
            h.command
        ),
        Some(h) => h.to_string(),
        None => "another difftune process".to_string(),
    };
    if !wait {
        bail!(
            "{} is in use by {who}: wait for it to end or stop it, or choose another folder",
            dir.display()
        );
    }
    eprintln!(
        "difftune {command}: waiting for {who}, which is using {}",
        dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_a_released_one_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path(), "train").unwrap();
        let err = DirLock::acquire(dir.path(), "compare")
            .unwrap_err()
            .to_string();
        let pid = std::process::id();
        assert!(err.contains("this process (train)"), "{err}");
        assert_eq!(
            read_holder(&mut File::open(dir.path().join(LOCK_FILE)).unwrap()),
            Some(Holder {
                pid,
                command: "train".into()
            })
        );
        drop(first);
        let text = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert!(text.is_empty(), "{text}");
        DirLock::acquire(dir.path(), "compare").unwrap();
    }

    #[test]
    fn a_record_without_a_lock_is_taken_over_and_leftover_temps_removed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOCK_FILE), "4194304 train\n").unwrap();
        let temp = dir.path().join(".difftune-tmp-abc123");
        std::fs::write(&temp, "half a metrics.jsonl").unwrap();
        let _lock = DirLock::acquire(dir.path(), "cache").unwrap();
        let text = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(text, format!("{} cache\n", std::process::id()));
        assert!(!temp.exists());
    }
}
