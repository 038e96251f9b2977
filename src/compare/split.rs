//! The learning-rate search's validation split: `validation_per_class` of the target's training
//! images of each class, drawn with the search's seed, held out. It is written as a dataset
//! folder in the Food101 layout (`data/target-validation`) whose training split is the rest of
//! the training images and whose test split is the held-out ones, each image a link to the
//! original file (or, for a parquet dataset, its bytes): the candidates train on the first and
//! are scored against the second, and the target's test split is never read. The final runs train
//! on all the training images, as a run without a search does.
use super::config::LrSearch;
use super::prepare::PreparedData;
use super::stage::Stage;
use super::Study;
use crate::data::{Dataset, DatasetOptions, ImageSource, Sample};
use crate::util::fs::{write_atomic, write_atomic_str};
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::path::Path;

impl Study<'_> {
    /// The validation split of `target` (written once per setting; see the module documentation).
    pub(super) fn prepare_validation_split(&self, target: &PreparedData) -> Result<PreparedData> {
        let search = &self.config.study.lr_search;
        let dir = self.layout.root.join("data").join("target-validation");
        let key = json!({
            "data": target.key,
            "validation_per_class": search.validation_per_class,
            "seed": search.seed,
        });
        let stage = Stage::ValidationSplit;
        self.on_main(|| {
            if self
                .layout
                .enter::<Value>(stage, Some(&dir), &key)?
                .is_none()
            {
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)
                        .with_context(|| format!("removing {}", dir.display()))?;
                }
                eprintln!(
                    "compare: holding out {} training images per class to choose learning rates on",
                    search.validation_per_class
                );
                write_validation_split(&target.path, &dir, search)?;
                self.layout.finish(stage, &key, &Value::Null)?;
            }
            Ok(())
        })?;
        Ok(PreparedData {
            path: dir,
            key: key.to_string(),
            description: format!(
                "{} validation images per class held out from the training images of {}",
                search.validation_per_class, target.description
            ),
        })
    }
}

/// Which training samples of each class are held out: per class (in listing order), a seeded
/// shuffle's first `per_class`. Returns, per sample, whether it is held out.
pub fn held_out(
    samples: &[Sample],
    classes: usize,
    per_class: usize,
    seed: u64,
) -> Result<Vec<bool>> {
    let mut by_class = vec![Vec::new(); classes];
    for (i, sample) in samples.iter().enumerate() {
        let Some(label) = sample.label else {
            bail!(
                "training image {} has no class: the validation split is drawn per class",
                sample.id
            );
        };
        by_class[label].push(i);
    }
    let mut held = vec![false; samples.len()];
    for (class, members) in by_class.iter_mut().enumerate() {
        if members.len() <= per_class {
            bail!(
                "class {class} has {} training images: holding out {per_class} \
                 (study.lr_search.validation_per_class) leaves none to train on",
                members.len()
            );
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(class as u64);
        members.shuffle(&mut rng);
        for &i in &members[..per_class] {
            held[i] = true;
        }
    }
    Ok(held)
}

/// Writes the split of the training images of `data` into `out` (see the module documentation).
fn write_validation_split(data: &Path, out: &Path, search: &LrSearch) -> Result<()> {
    let train = Dataset::open(data, &DatasetOptions::default())?;
    if train.classes.is_empty() {
        bail!(
            "{} has no classes: the learning-rate search holds out images per class",
            data.display()
        );
    }
    let held = held_out(
        &train.samples,
        train.classes.len(),
        search.validation_per_class,
        search.seed,
    )?;
    let (mut fit, mut validation) = (String::new(), String::new());
    for (i, (sample, held)) in train.samples.iter().zip(held).enumerate() {
        let class = &train.classes[sample.label.unwrap_or_default()];
        let entry = format!("{}/{i:08}", class.name);
        let file = out.join("images").join(format!("{entry}.jpg"));
        link_or_write(&sample.image, &file)?;
        let listing = if held { &mut validation } else { &mut fit };
        listing.push_str(&entry);
        listing.push('\n');
    }
    let lines = |f: &dyn Fn(&crate::data::Class) -> &str| -> String {
        train
            .classes
            .iter()
            .map(|c| format!("{}\n", f(c)))
            .collect()
    };
    let meta = out.join("meta");
    write_atomic_str(&meta.join("classes.txt"), &lines(&|c| &c.name))?;
    write_atomic_str(&meta.join("labels.txt"), &lines(&|c| &c.label))?;
    write_atomic_str(&meta.join("test.txt"), &validation)?;
    // Written last: the folder is a Food101 dataset once its train listing exists.
    write_atomic_str(&meta.join("train.txt"), &fit)
}

/// `file` as a link to the image's file, or holding its bytes when it has none.
fn link_or_write(image: &ImageSource, file: &Path) -> Result<()> {
    match image {
        ImageSource::File(path) => {
            let target = path
                .canonicalize()
                .with_context(|| format!("resolving {}", path.display()))?;
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            std::os::unix::fs::symlink(&target, file)
                .with_context(|| format!("linking {} to {}", file.display(), target.display()))
        }
        ImageSource::Encoded { bytes, .. } => write_atomic(file, &bytes[..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(labels: &[usize]) -> Vec<Sample> {
        labels
            .iter()
            .enumerate()
            .map(|(i, &label)| Sample {
                image: ImageSource::File(format!("{i}.jpg").into()),
                caption: String::new(),
                label: Some(label),
                id: i.to_string(),
                repeats: 1,
            })
            .collect()
    }

    #[test]
    fn each_class_holds_out_as_many_seeded() {
        let listing = samples(&[0, 0, 0, 1, 1, 1, 1, 0]);
        let held = held_out(&listing, 2, 2, 0).unwrap();
        let per_class = |c| {
            listing
                .iter()
                .zip(&held)
                .filter(|(s, &h)| h && s.label == Some(c))
                .count()
        };
        assert_eq!((per_class(0), per_class(1)), (2, 2));
        assert_eq!(held, held_out(&listing, 2, 2, 0).unwrap());
        let others: Vec<_> = (1..20)
            .map(|seed| held_out(&listing, 2, 2, seed).unwrap())
            .collect();
        assert!(
            others.iter().any(|o| *o != held),
            "the seed draws the split"
        );
        let err = held_out(&listing, 2, 4, 0).unwrap_err().to_string();
        assert!(err.contains("leaves none to train on"), "{err}");
    }
}
