//! An image folder as Hugging Face's `imagefolder` loader (and so diffusers' training scripts)
//! reads it: images plus a `metadata.jsonl` whose lines are JSON objects with `file_name`
//! (relative to the file) and a caption column (`text` by default).
//!
//! Splits: `train/metadata.jsonl` and `test/metadata.jsonl` when those folders exist; otherwise a
//! top-level `metadata.jsonl` is the train split and there is no test split. Samples are
//! unlabelled and keep the order of the metadata lines.
use super::{Dataset, DatasetOptions, ImageSource, Layout, PerClassLimit, Sample, Split};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub const METADATA_FILE: &str = "metadata.jsonl";

pub fn is_image_folder(path: &Path) -> bool {
    path.join(METADATA_FILE).is_file() || path.join("train").join(METADATA_FILE).is_file()
}

/// The folder whose `metadata.jsonl` lists `split`.
fn split_dir(path: &Path, split: Split) -> Result<PathBuf> {
    let dir = path.join(split.name());
    if dir.join(METADATA_FILE).is_file() {
        Ok(dir)
    } else if split == Split::Train && path.join(METADATA_FILE).is_file() {
        Ok(path.to_path_buf())
    } else {
        bail!(
            "image folder {} has no {split} split (expected {})",
            path.display(),
            dir.join(METADATA_FILE).display()
        )
    }
}

pub fn load(path: &Path, opts: &DatasetOptions) -> Result<Dataset> {
    let dir = split_dir(path, opts.split)?;
    let metadata_path = dir.join(METADATA_FILE);
    let text = std::fs::read_to_string(&metadata_path)
        .with_context(|| format!("reading {}", metadata_path.display()))?;
    let column = opts.caption_column.as_str();
    let mut limit = PerClassLimit::new(opts.limit_per_class);
    let mut samples = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = || format!("{}:{}", metadata_path.display(), i + 1);
        let record: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: invalid JSON", at()))?;
        let field = |name: &str| -> Result<String> {
            match record.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(other) => bail!("{}: {name:?} is {other}, expected a string", at()),
                None => bail!("{}: no {name:?} field", at()),
            }
        };
        let file_name = field("file_name")?;
        let caption = field(column)?;
        if !limit.admit(None) {
            break;
        }
        samples.push(Sample {
            image: ImageSource::File(dir.join(&file_name)),
            caption,
            label: None,
            id: file_name,
            repeats: 1,
        });
    }
    Ok(Dataset {
        layout: Layout::ImageFolder,
        root: path.to_path_buf(),
        split: opts.split,
        classes: Vec::new(),
        samples,
        skipped: Vec::new(),
    })
}
