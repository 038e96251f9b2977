//! kohya sd-scripts' captioned image folders, as OneTrainer and SimpleTuner read them too: each
//! `image.ext` has its caption in `image.txt` (or `image.caption`) beside it; images directly in
//! the root, or in `N_name` sub-folders whose images repeat N times per epoch. An image without a
//! caption file is captioned with its folder's name (the `name` of `N_name`), and the listing says
//! how many were. The caption options (dropout, tag shuffling) are in [`super::captions`], the
//! seeded epochs with their repeats in [`super::epochs`].
use super::{
    Dataset, DatasetOptions, ImageSource, Layout, PerClassLimit, Sample, SkipReason, SkippedEntry,
};
use crate::util::fs::sorted_entries;
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp"];
/// Image formats found in training folders that difftune does not decode: such files are
/// listed as skipped rather than passed over like captions or kohya's `.npz` latents.
const UNSUPPORTED_IMAGE_EXTENSIONS: &[&str] =
    &["gif", "bmp", "tif", "tiff", "avif", "heic", "heif", "jxl"];
const CAPTION_EXTENSIONS: &[&str] = &["txt", "caption"];

/// One image of the folder.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub image: PathBuf,
    /// The caption file's text (trimmed), or the fallback caption.
    pub caption: String,
    /// Times the image appears per epoch (the `N` of its `N_name` folder; 1 in the root).
    pub repeats: usize,
    /// Whether the caption is the folder-name fallback.
    pub fallback: bool,
}

/// A listed kohya folder.
#[derive(Debug, Clone)]
pub struct KohyaFolder {
    pub root: PathBuf,
    pub items: Vec<Item>,
    /// Entries of the root and its `N_name` folders that are not listed, and why: folders other
    /// than `N_name` ones, unreadable entries (symlink loops, broken links), image formats
    /// difftune does not decode.
    pub skipped: Vec<SkippedEntry>,
}

fn extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
}

fn is_image(path: &Path) -> bool {
    extension(path).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

/// What an entry of the root or of an `N_name` folder is to the listing.
enum Entry {
    Image(PathBuf),
    RepeatFolder {
        path: PathBuf,
        repeats: usize,
    },
    /// Captions, kohya's cached latents, notes: not part of the listing, not worth a word.
    Other,
    Skipped(SkippedEntry),
}

impl Entry {
    /// Classifies `path`; folders are repeat folders only `in_root`.
    fn of(path: PathBuf, in_root: bool) -> Self {
        let skipped = |reason| {
            Entry::Skipped(SkippedEntry {
                path: path.clone(),
                reason,
            })
        };
        // Follows symlinks: a link to an image is an image; a loop or a dangling link fails.
        let kind = match std::fs::metadata(&path) {
            Ok(meta) => meta.file_type(),
            Err(e) => return skipped(SkipReason::Unreadable(e.to_string())),
        };
        let ext = extension(&path).unwrap_or_default();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if kind.is_dir() {
            return match repeat_folder(name).filter(|_| in_root) {
                Some((repeats, _)) => Entry::RepeatFolder {
                    path: path.clone(),
                    repeats,
                },
                None => skipped(SkipReason::Folder),
            };
        }
        if UNSUPPORTED_IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            return skipped(SkipReason::UnsupportedFormat(ext));
        }
        match (IMAGE_EXTENSIONS.contains(&ext.as_str()), kind.is_file()) {
            (true, true) => Entry::Image(path),
            (true, false) => skipped(SkipReason::NotAFile),
            (false, _) => Entry::Other,
        }
    }
}

/// `N_name` -> `(N, name)`.
fn repeat_folder(name: &str) -> Option<(usize, &str)> {
    let (n, rest) = name.split_once('_')?;
    let n: usize = n.parse().ok()?;
    (n > 0 && !rest.is_empty()).then_some((n, rest))
}

/// Whether `path` looks like a kohya folder: images with caption files, or `N_name` folders.
pub fn is_kohya_folder(path: &Path) -> bool {
    let Ok(entries) = sorted_entries(path) else {
        return false;
    };
    entries.iter().any(|p| {
        (p.is_dir()
            && p.file_name()
                .and_then(|n| n.to_str())
                .and_then(repeat_folder)
                .is_some())
            || (is_image(p) && caption_file(p).is_some())
    })
}

fn caption_file(image: &Path) -> Option<PathBuf> {
    CAPTION_EXTENSIONS
        .iter()
        .map(|ext| image.with_extension(ext))
        .find(|p| p.is_file())
}

/// Reads a caption file, reporting a file that is not UTF-8 by its path.
fn read_caption(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "caption file {} is not UTF-8 (invalid byte at offset {}); re-save it as UTF-8",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    Ok(text.trim().to_string())
}

impl KohyaFolder {
    /// Lists the root's images (repeats 1) and each `N_name` folder's images (repeats N), in
    /// sorted order, and the entries left out.
    pub fn open(root: &Path) -> Result<Self> {
        let root_name = root
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("images")
            .to_string();
        let mut folder = Self {
            root: root.to_path_buf(),
            items: Vec::new(),
            skipped: Vec::new(),
        };
        let mut repeat_folders = Vec::new();
        for entry in sorted_entries(root)? {
            match Entry::of(entry, true) {
                Entry::RepeatFolder { path, repeats } => repeat_folders.push((path, repeats)),
                entry => folder.add(entry, 1, &root_name)?,
            }
        }
        for (dir, repeats) in repeat_folders {
            let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let concept = repeat_folder(name).map_or("", |(_, c)| c).replace('_', " ");
            for entry in sorted_entries(&dir)? {
                folder.add(Entry::of(entry, false), repeats, &concept)?;
            }
        }
        ensure!(
            !folder.items.is_empty(),
            "{} has no images (.jpg, .jpeg, .png, .webp) in it or in N_name folders",
            root.display()
        );
        Ok(folder)
    }

    /// Adds an image (with its caption, or `fallback`) or a skipped entry of a folder whose
    /// images repeat `repeats` times.
    fn add(&mut self, entry: Entry, repeats: usize, fallback: &str) -> Result<()> {
        match entry {
            Entry::Image(image) => {
                let (caption, is_fallback) = match caption_file(&image) {
                    Some(path) => (read_caption(&path)?, false),
                    None => (fallback.to_string(), true),
                };
                self.items.push(Item {
                    image,
                    caption,
                    repeats,
                    fallback: is_fallback,
                });
            }
            Entry::Skipped(skipped) => self.skipped.push(skipped),
            Entry::RepeatFolder { .. } | Entry::Other => {}
        }
        Ok(())
    }

    /// How many images use the folder-name fallback caption.
    pub fn fallback_count(&self) -> usize {
        self.items.iter().filter(|i| i.fallback).count()
    }

    /// The images as a [`Dataset`] (one sample per image with its repeats, its caption as written).
    pub fn to_dataset(&self, opts: &DatasetOptions) -> Dataset {
        let mut limit = PerClassLimit::new(opts.limit_per_class);
        let samples = self
            .items
            .iter()
            .take_while(|_| limit.admit(None))
            .map(|item| Sample {
                image: ImageSource::File(item.image.clone()),
                caption: item.caption.clone(),
                label: None,
                id: item
                    .image
                    .strip_prefix(&self.root)
                    .unwrap_or(&item.image)
                    .display()
                    .to_string(),
                repeats: item.repeats,
            })
            .collect();
        Dataset {
            layout: Layout::Kohya,
            root: self.root.clone(),
            split: opts.split,
            classes: Vec::new(),
            samples,
            skipped: self.skipped.clone(),
        }
    }
}

/// Lists a kohya folder as a [`Dataset`] (train split only), saying how many images had no caption.
pub fn load(path: &Path, opts: &DatasetOptions) -> Result<Dataset> {
    if opts.split != super::Split::Train {
        bail!("a kohya folder has only a train split");
    }
    let folder = KohyaFolder::open(path)?;
    let missing = folder.fallback_count();
    if missing > 0 {
        eprintln!(
            "{missing} of {} images in {} have no .txt/.caption file; they are captioned with their folder's name",
            folder.items.len(),
            path.display()
        );
    }
    Ok(folder.to_dataset(opts))
}
