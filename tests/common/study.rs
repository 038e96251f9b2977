//! A study's run file written into a test folder, and the `difftune compare` command line that
//! runs it.
use difftune::compare::CompareConfig;
use std::path::{Path, PathBuf};

/// Writes `config` as `DIR/study.toml`; its path.
pub fn write_config(dir: &Path, config: &CompareConfig) -> PathBuf {
    let path = dir.join("study.toml");
    std::fs::write(&path, config.to_toml().unwrap()).unwrap();
    path
}

/// `compare --config CONFIG --out OUT EXTRA...`.
pub fn compare_args(config: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    ["compare", "--config", config.to_str().unwrap()]
        .into_iter()
        .chain(["--out", out.to_str().unwrap()])
        .chain(extra.iter().copied())
        .map(String::from)
        .collect()
}
