//! Food101 as the ETH archive lays it out:
//!
//! ```text
//! meta/classes.txt   apple_pie            (one class name per line; line order = class index)
//! meta/labels.txt    Apple pie            (human labels, same order; optional here)
//! meta/train.txt     apple_pie/1005649    (one image per line, no extension)
//! meta/test.txt
//! images/apple_pie/1005649.jpg
//! ```
//!
//! Captions come from the prompt template with the class's `labels.txt` entry, lower-cased
//! ("a photo of apple pie, a type of food"); without `labels.txt`, from the class name with
//! underscores as spaces. Samples keep the order of the split file.
use super::prompts::human_label;
use super::{Class, Dataset, DatasetOptions, ImageSource, Layout, PerClassLimit, Sample, Split};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The directory holding `meta/` and `images/`: `path` itself or `path/food-101` (the archive's
/// top folder).
pub fn find_root(path: &Path) -> Option<PathBuf> {
    [path.to_path_buf(), path.join("food-101")]
        .into_iter()
        .find(|root| {
            root.join("meta/classes.txt").is_file() && root.join("meta/train.txt").is_file()
        })
}

/// Non-empty trimmed lines of a text file, with their 1-based line numbers.
fn read_lines(path: &Path) -> Result<Vec<(usize, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim().to_string()))
        .filter(|(_, line)| !line.is_empty())
        .collect())
}

/// A classes file in the format of `meta/classes.txt`: one class name per line.
pub fn read_classes_file(path: &Path) -> Result<Vec<Class>> {
    let names: Vec<String> = read_lines(path)?.into_iter().map(|(_, l)| l).collect();
    if names.is_empty() {
        bail!("{} lists no classes", path.display());
    }
    Ok(names
        .into_iter()
        .map(|name| Class {
            label: human_label(&name),
            name,
        })
        .collect())
}

/// Reads `meta/classes.txt` and, when present, `meta/labels.txt`.
pub fn read_classes(root: &Path) -> Result<Vec<Class>> {
    let classes_path = root.join("meta/classes.txt");
    let names: Vec<String> = read_lines(&classes_path)?
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    if names.is_empty() {
        bail!("{} lists no classes", classes_path.display());
    }
    let labels_path = root.join("meta/labels.txt");
    let labels: Vec<String> = if labels_path.is_file() {
        let labels: Vec<String> = read_lines(&labels_path)?
            .into_iter()
            .map(|(_, l)| l)
            .collect();
        if labels.len() != names.len() {
            bail!(
                "{} has {} labels but {} has {} classes",
                labels_path.display(),
                labels.len(),
                classes_path.display(),
                names.len()
            );
        }
        labels
    } else {
        names.clone()
    };
    Ok(names
        .into_iter()
        .zip(labels)
        .map(|(name, label)| Class {
            label: human_label(&label),
            name,
        })
        .collect())
}

pub fn load(root: &Path, opts: &DatasetOptions) -> Result<Dataset> {
    let classes = read_classes(root)?;
    let index: HashMap<&str, usize> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.as_str(), i))
        .collect();
    let split_path = root.join("meta").join(match opts.split {
        Split::Train => "train.txt",
        Split::Test => "test.txt",
    });
    let mut limit = PerClassLimit::new(opts.limit_per_class);
    let mut samples = Vec::new();
    for (line_no, entry) in read_lines(&split_path)? {
        let Some((class_name, _)) = entry.split_once('/') else {
            bail!(
                "{}:{line_no}: expected <class>/<image id>, found {entry:?}",
                split_path.display()
            );
        };
        let Some(&label) = index.get(class_name) else {
            bail!(
                "{}:{line_no}: class {class_name:?} is not in meta/classes.txt",
                split_path.display()
            );
        };
        if !limit.admit(Some(label)) {
            continue;
        }
        samples.push(Sample {
            image: ImageSource::File(root.join("images").join(format!("{entry}.jpg"))),
            caption: opts.prompt.render(&classes[label].label),
            label: Some(label),
            id: entry,
            repeats: 1,
        });
    }
    Ok(Dataset {
        layout: Layout::Food101,
        root: root.to_path_buf(),
        split: opts.split,
        classes,
        samples,
        skipped: Vec::new(),
    })
}
