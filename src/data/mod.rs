//! Training and evaluation data: dataset listings (Food101's ETH layout, Hugging Face parquet, an
//! image folder with `metadata.jsonl`), image decoding and preprocessing, and a generator of
//! small synthetic datasets in the Food101 layout.
//!
//! Listing a dataset is cheap: it reads metadata only (for parquet, the raw encoded image bytes
//! too, which live nowhere else) and never decodes an image. Decoding happens per batch in
//! [`images`].
use anyhow::{bail, Context, Result};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

pub mod buckets;
pub mod cache;
pub mod captions;
pub mod epochs;
pub mod food101;
pub mod image_folder;
pub mod images;
pub mod jpeg;
pub mod kohya;
pub mod parquet;
pub mod prompts;
pub mod synthetic;

pub use prompts::PromptTemplate;

/// Where a sample's encoded image (JPEG, PNG, WebP) lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    File(PathBuf),
    /// Encoded bytes held in memory (from a parquet file); `origin` names where they came from,
    /// for error messages.
    Encoded {
        bytes: Arc<[u8]>,
        origin: String,
    },
}

impl ImageSource {
    /// The file path, or the origin of in-memory bytes, for messages.
    pub fn describe(&self) -> String {
        match self {
            ImageSource::File(path) => path.display().to_string(),
            ImageSource::Encoded { origin, .. } => origin.clone(),
        }
    }

    /// The encoded bytes.
    pub fn read(&self) -> Result<Cow<'_, [u8]>> {
        match self {
            ImageSource::File(path) => {
                let bytes =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                Ok(Cow::Owned(bytes))
            }
            ImageSource::Encoded { bytes, .. } => Ok(Cow::Borrowed(bytes)),
        }
    }
}

/// One training or evaluation example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub image: ImageSource,
    pub caption: String,
    /// Index into [`Dataset::classes`], where the dataset has classes.
    pub label: Option<usize>,
    /// Stable identifier, unique within the split (Food101: `apple_pie/1005649`).
    pub id: String,
    /// Appearances per training epoch (a kohya `N_name` folder's `N`; 1 elsewhere).
    pub repeats: usize,
}

/// A class of a labelled dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class {
    /// Machine name, as in Food101's `classes.txt` (`apple_pie`).
    pub name: String,
    /// Human label used in prompts (`apple pie`); see [`prompts::human_label`].
    pub label: String,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Split {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            _ => bail!("unknown split {s:?} (expected \"train\" or \"test\")"),
        }
    }
}

/// The on-disk layouts [`Dataset::open`] recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The ETH archive: `meta/{classes,labels,train,test}.txt` and `images/<class>/<id>.jpg`.
    Food101,
    /// Hugging Face parquet shards with `image` and `label` columns.
    Parquet,
    /// An image folder with `metadata.jsonl` (`file_name`, caption column), as diffusers uses.
    ImageFolder,
    /// kohya sd-scripts' folders: `image.ext` + `image.txt`/`.caption`, `N_name` repeat folders.
    Kohya,
}

impl Layout {
    /// The layout of the dataset at `path` and the folder it was found in, from the names of its
    /// files alone (no image is read), so that a command can refuse a folder that holds no
    /// dataset before it does any work:
    /// - `meta/train.txt` and `meta/classes.txt` (in `path` or `path/food-101`): Food101 ETH;
    /// - `metadata.jsonl` (in `path`, or `path/train` and `path/test`): image folder;
    /// - `*.parquet` files (in `path`, or up to two levels below): Hugging Face parquet;
    /// - images with `.txt`/`.caption` files or `N_name` folders: kohya.
    pub fn detect(path: &Path) -> Result<(Self, PathBuf)> {
        if !path.is_dir() {
            bail!("dataset path {} is not a directory", path.display());
        }
        if let Some(root) = food101::find_root(path) {
            Ok((Self::Food101, root))
        } else if image_folder::is_image_folder(path) {
            Ok((Self::ImageFolder, path.to_path_buf()))
        } else if parquet::has_parquet_files(path)? {
            Ok((Self::Parquet, path.to_path_buf()))
        } else if kohya::is_kohya_folder(path) {
            Ok((Self::Kohya, path.to_path_buf()))
        } else {
            bail!(
                "{} matches no dataset layout: expected meta/train.txt + meta/classes.txt (Food101), \
                 metadata.jsonl (image folder), *.parquet files (Hugging Face) or images with .txt \
                 captions / N_name folders (kohya)",
                path.display()
            )
        }
    }
}

/// How to list a dataset.
#[derive(Debug, Clone)]
pub struct DatasetOptions {
    pub split: Split,
    /// Keep at most this many samples per class (the first ones in listing order); datasets
    /// without classes keep the first this many samples.
    pub limit_per_class: Option<usize>,
    /// Captions of class-labelled datasets (Food101, parquet).
    pub prompt: PromptTemplate,
    /// Caption column of `metadata.jsonl` (diffusers' `--caption_column`).
    pub caption_column: String,
    /// Class names file (one per line) for parquet datasets whose schema does not embed them.
    pub classes_file: Option<PathBuf>,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        Self {
            split: Split::Train,
            limit_per_class: None,
            prompt: PromptTemplate::default(),
            caption_column: "text".to_string(),
            classes_file: None,
        }
    }
}

/// An entry of a dataset folder that its listing leaves out, and why. Caches list these with the
/// images that failed to decode, so nothing in a dataset folder is left out without a word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedEntry {
    pub path: PathBuf,
    pub reason: SkipReason,
}

/// Why a [`SkippedEntry`] was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// A folder where the layout reads images (or, in a kohya root, `N_name` folders).
    Folder,
    /// Its metadata could not be read: a symlink loop, a dangling link, no permission.
    Unreadable(String),
    /// An image format difftune does not decode (its lower-case extension).
    UnsupportedFormat(String),
    /// Named as an image but not a regular file (a FIFO, a socket, a device).
    NotAFile,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Folder => f.write_str(
                "a folder, not an image (images are read from the dataset folder and its N_name folders)",
            ),
            Self::Unreadable(error) => write!(f, "unreadable ({error})"),
            Self::UnsupportedFormat(ext) => write!(
                f,
                "a .{ext} image, a format difftune does not read (convert it to .png, .jpg or .webp)"
            ),
            Self::NotAFile => f.write_str("not a regular file"),
        }
    }
}

/// The listing of one split of a dataset, in a deterministic order.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub layout: Layout,
    /// The directory the layout was found in.
    pub root: PathBuf,
    pub split: Split,
    /// Empty for datasets without classes.
    pub classes: Vec<Class>,
    pub samples: Vec<Sample>,
    /// Entries of the folder the listing left out (kohya folders; the other layouts name their
    /// images in metadata, and an unusable one is skipped when it fails to decode).
    pub skipped: Vec<SkippedEntry>,
}

impl Dataset {
    /// Lists a dataset, detecting its layout ([`Layout::detect`]).
    pub fn open(path: &Path, opts: &DatasetOptions) -> Result<Self> {
        let (layout, root) = Layout::detect(path)?;
        let dataset = match layout {
            Layout::Food101 => food101::load(&root, opts),
            Layout::ImageFolder => image_folder::load(&root, opts),
            Layout::Parquet => parquet::load(&root, opts),
            Layout::Kohya => kohya::load(&root, opts),
        };
        dataset.with_context(|| format!("loading the {} split of {}", opts.split, path.display()))
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Number of samples per class (index = class index).
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for label in self.samples.iter().filter_map(|s| s.label) {
            counts[label] += 1;
        }
        counts
    }
}

/// Admits the first `limit` samples of each label (unlabelled samples count as one group), so
/// loaders can skip the rest before reading their data.
pub(crate) struct PerClassLimit {
    limit: Option<usize>,
    seen: std::collections::HashMap<Option<usize>, usize>,
}

impl PerClassLimit {
    pub(crate) fn new(limit: Option<usize>) -> Self {
        Self {
            limit,
            seen: Default::default(),
        }
    }

    pub(crate) fn admit(&mut self, label: Option<usize>) -> bool {
        let Some(limit) = self.limit else { return true };
        let n = self.seen.entry(label).or_insert(0);
        if *n < limit {
            *n += 1;
            true
        } else {
            false
        }
    }
}
