//! File helpers: crash-safe writes (everything difftune writes goes to a temp file in the same
//! directory and is renamed into place, so a kill or a full disk never leaves a half-written output),
//! JSON I/O, hashes, and difftune's cache folder.
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically, creating parent directories.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_streamed(path, |out| Ok(out.write_all(bytes)?)).map(|_| ())
}

/// Writes `path` atomically from what `write` streams into `out` (buffered), creating parent
/// directories: nothing of the file is held in memory beyond the buffer. Returns the SHA-256 of
/// the bytes written, hex, computed as they pass (a checksum of the file without reading it back).
pub fn write_atomic_streamed(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(TEMP_FILE_PREFIX)
        .tempfile_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    let mut out = HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, tmp.as_file()));
    write(&mut out).with_context(|| format!("writing {}", path.display()))?;
    let digest = out
        .finish()
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(digest)
}

/// A writer that hashes (SHA-256) what passes through it.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: sha2::Sha256,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        use sha2::Digest;
        Self {
            inner,
            hasher: sha2::Sha256::new(),
        }
    }

    /// Flushes the inner writer; the hex digest of everything written.
    fn finish(mut self) -> std::io::Result<String> {
        use sha2::Digest;
        self.inner.flush()?;
        Ok(hex(&self.hasher.finalize()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.write(bytes)?;
        self.hasher.update(&bytes[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// `write_atomic` for text.
pub fn write_atomic_str(path: &Path, text: &str) -> Result<()> {
    write_atomic(path, text.as_bytes())
}

/// Serialises `value` as pretty JSON and writes it atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    write_atomic_str(path, &(text + "\n"))
}

/// Reads and parses the JSON file `path`.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Sets one top-level field of the JSON object in `path` (a config file), keeping the others.
pub fn set_json_field<T: serde::Serialize>(path: &Path, field: &str, value: T) -> Result<()> {
    let mut json: serde_json::Value = read_json(path)?;
    json[field] = serde_json::to_value(value)?;
    write_json(path, &json)
}

/// The name prefix of [`write_atomic`]'s temp files.
pub const TEMP_FILE_PREFIX: &str = ".difftune-tmp-";

/// Removes the temp files that [`write_atomic`] calls killed mid-write left in `dir` (not in its
/// subfolders); returns how many. Only safe for a folder no other process is writing into, such
/// as one whose [`crate::util::lock::DirLock`] the caller holds.
pub fn remove_leftover_temps(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let leftover = entry
            .file_name()
            .to_string_lossy()
            .starts_with(TEMP_FILE_PREFIX)
            && entry.file_type()?.is_file();
        if leftover {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// SHA-256 of a file's bytes, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut file, &mut buffer)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buffer[..n]);
    }
}

/// difftune's cache folder: `$DIFFTUNE_CACHE`, else `$XDG_CACHE_HOME/difftune`, else
/// `~/.cache/difftune` (the same rule as scripts/env.sh).
pub fn cache_dir() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("DIFFTUNE_CACHE") {
        return dir;
    }
    let base = var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|home| home.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("difftune")
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Flushes `dir`'s entries (a rename into it) to disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Moves the folder `from` to `to`, replacing a folder already at `to` in one step: the two are
/// exchanged (Linux `renameat2(RENAME_EXCHANGE)`) and the old one, now at `from`, is removed, so
/// `to` is never missing or half-written. Where the file system cannot exchange, the old folder is
/// first moved aside to `from` + `-replaced` (a kill between the two renames leaves `to` missing,
/// never mixed; the old folder then sits beside `from`, under its temp name).
pub fn replace_dir(from: &Path, to: &Path) -> Result<()> {
    let context = || format!("renaming {} to {}", from.display(), to.display());
    if !to.exists() {
        return std::fs::rename(from, to).with_context(context);
    }
    let old = match exchange(from, to) {
        Ok(()) => from.to_path_buf(),
        Err(_) => {
            let mut aside = from.as_os_str().to_owned();
            aside.push("-replaced");
            let aside = std::path::PathBuf::from(aside);
            std::fs::rename(to, &aside).with_context(context)?;
            std::fs::rename(from, to).with_context(context)?;
            aside
        }
    };
    std::fs::remove_dir_all(&old)
        .with_context(|| format!("removing the replaced folder, now at {}", old.display()))
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    Ok(renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE)?)
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Refuses an output folder that exists and holds anything (`hint` says what to do instead), so
/// that writing into it cannot mix with or overwrite what is there.
pub fn ensure_absent_or_empty(dir: &Path, hint: &str) -> Result<()> {
    if dir.exists()
        && std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        anyhow::bail!("{} already exists and is not empty; {hint}", dir.display());
    }
    Ok(())
}

/// The entries of `dir` (not recursive), sorted by path.
pub fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    entries.sort();
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_dir_swaps_in_the_new_folder_and_removes_the_old() {
        let root = tempfile::tempdir().unwrap();
        let (new, target) = (root.path().join(".new"), root.path().join("target"));
        for (dir, text) in [(&new, "new"), (&target, "old")] {
            std::fs::create_dir(dir).unwrap();
            std::fs::write(dir.join("file"), text).unwrap();
        }
        std::fs::write(target.join("only-old"), "").unwrap();
        replace_dir(&new, &target).unwrap();
        assert_eq!(std::fs::read_to_string(target.join("file")).unwrap(), "new");
        assert!(!target.join("only-old").exists() && !new.exists());
        let fresh = root.path().join("fresh");
        std::fs::create_dir(&new).unwrap();
        replace_dir(&new, &fresh).unwrap();
        assert!(fresh.is_dir() && !new.exists());
    }
}
