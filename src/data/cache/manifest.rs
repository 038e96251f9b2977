//! The cache's manifest: its key (what the cached values depend on), its files with their
//! checksums, and the shards' samples; the identities that make up the key; and the reuse of the
//! valid part of an earlier cache.
use super::super::buckets::Bucket;
use super::super::captions::CaptionOptions;
use super::super::images::{Crop, ExifOrientation, ResizeFilter};
use super::super::{Dataset, ImageSource, Split};
use super::{CacheReport, CacheSettings};
use crate::model::conditioning::SizeConditions;
use crate::model::files::ComponentFiles;
use crate::model::source::{fingerprint, ModelFiles};
use crate::model::weights::MappedSafetensors;
use crate::util::fs::{hex, sha256_file, write_json};
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "manifest.json";
/// 2: latents per bucket (and flipped), several captions per sample, repeats.
pub(super) const FORMAT_VERSION: u32 = 2;

/// Everything the cached latents depend on. Any difference makes a cache stale.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheKey {
    /// Fingerprint of the VAE's config and weights.
    pub vae: String,
    /// Fingerprint of the text encoder's config and weights and the tokenizer's files.
    pub text_encoder: String,
    /// SDXL: the same of the second text encoder and its tokenizer (absent for SD 1.x/2.x, whose
    /// keys are as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder_2: Option<String>,
    pub resolution: u32,
    pub resize_filter: ResizeFilter,
    pub crop: Crop,
    pub split: Split,
    pub shard_size: usize,
    /// SHA-256 over every listed sample's id, encoded size and caption.
    pub dataset: String,
    pub samples: usize,
    pub jpeg_decoder: String,
    pub exif_orientation: ExifOrientation,
    /// The step of the aspect-ratio buckets; none: every image square at `resolution`.
    pub bucket_step: Option<u32>,
    /// Whether each image's flipped latent is cached too.
    pub flip: bool,
}

impl CacheKey {
    pub(super) fn new(
        model: &ModelFiles,
        dataset: &Dataset,
        settings: &CacheSettings,
    ) -> Result<Self> {
        Ok(Self {
            vae: vae_identity(model)?,
            text_encoder: text_identity(&model.text_encoder, &model.tokenizer_dir)?,
            text_encoder_2: model
                .text_encoder_2
                .as_ref()
                .map(|second| text_identity(&second.encoder, &second.tokenizer_dir))
                .transpose()?,
            resolution: settings.resolution,
            resize_filter: settings.resize_filter,
            crop: Crop::Center,
            split: settings.split,
            shard_size: settings.shard_size,
            dataset: dataset_identity(dataset),
            samples: dataset.len(),
            jpeg_decoder: super::super::images::JPEG_DECODER.into(),
            exif_orientation: settings.decode.exif_orientation,
            bucket_step: settings.bucket_step,
            flip: settings.flip,
        })
    }

    /// Names the parts that differ, for the "stale cache" message.
    pub(super) fn differences(&self, other: &CacheKey) -> Vec<&'static str> {
        let checks = [
            ("VAE", self.vae != other.vae),
            (
                "text encoder / tokenizer",
                self.text_encoder != other.text_encoder,
            ),
            (
                "second text encoder / tokenizer",
                self.text_encoder_2 != other.text_encoder_2,
            ),
            ("resolution", self.resolution != other.resolution),
            ("resize filter", self.resize_filter != other.resize_filter),
            ("crop", self.crop != other.crop),
            ("split", self.split != other.split),
            ("shard size", self.shard_size != other.shard_size),
            ("JPEG decoder", self.jpeg_decoder != other.jpeg_decoder),
            (
                "EXIF orientation",
                self.exif_orientation != other.exif_orientation,
            ),
            (
                "dataset contents",
                self.dataset != other.dataset || self.samples != other.samples,
            ),
            ("buckets", self.bucket_step != other.bucket_step),
            ("flip", self.flip != other.flip),
        ];
        checks
            .into_iter()
            .filter(|(_, differs)| *differs)
            .map(|(name, _)| name)
            .collect()
    }
}

/// A file of the cache with its checksum.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheFile {
    pub file: String,
    pub sha256: String,
}

/// A shard: the encoded images among listing entries `first..first + count`. Its file holds
/// `mean_WxH` and `logvar_WxH` (`[rows, 4, H/8, W/8]`, f32) for each bucket `WxH` its samples
/// use, rows in sample order, and `flipped_mean_WxH`/`flipped_logvar_WxH` when flips are cached.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Shard {
    #[serde(flatten)]
    pub file: CacheFile,
    pub first: usize,
    pub count: usize,
    /// Cached samples, in listing order (skipped images are absent).
    pub samples: Vec<CachedSample>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CachedSample {
    pub id: String,
    /// Index into the manifest's `buckets`.
    pub bucket: usize,
    /// Appearances per epoch.
    pub repeats: usize,
    /// Indices into the manifest's `prompts` of the sample's caption variants (the caption as
    /// written first).
    pub prompts: Vec<usize>,
    /// SDXL: the image's micro-conditioning as cached (its flipped latent's is
    /// [`mirrored`](crate::data::images::mirrored)); absent in SD 1.x/2.x caches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<SizeConditions>,
}

/// An image that could not be loaded, with its file (or parquet row) and the error.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SkippedImage {
    pub id: String,
    pub path: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub version: u32,
    pub key: CacheKey,
    /// The dataset folder, so a stale cache named directly can be rebuilt.
    pub dataset_path: PathBuf,
    pub prompt_template: String,
    pub limit_per_class: Option<usize>,
    /// The sizes images are cached at (one square size without buckets).
    pub buckets: Vec<Bucket>,
    /// How captions vary in training; the prompts below hold every variant.
    pub captions: CaptionOptions,
    pub prompts: Vec<String>,
    /// Index of the empty prompt in `prompts` when caption dropout is on.
    pub dropped_prompt: Option<usize>,
    pub prompt_embeddings: Option<CacheFile>,
    pub shards: Vec<Shard>,
    pub skipped: Vec<SkippedImage>,
    /// All shards written.
    pub complete: bool,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let manifest: Self = crate::util::fs::read_json(&path)?;
        ensure!(
            manifest.version == FORMAT_VERSION,
            "{} has cache format {}, this difftune writes {FORMAT_VERSION}: build the cache again \
             (`difftune cache`, or train on the dataset folder)",
            path.display(),
            manifest.version
        );
        Ok(manifest)
    }

    pub(super) fn write(&self, dir: &Path) -> Result<()> {
        write_json(&dir.join(MANIFEST_FILE), self)
    }

    /// Cached samples over all shards.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.samples.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes over from `previous` (a manifest with this key) the prompt embeddings when its
    /// prompts are these, and every shard whose file is intact, with the skipped images of
    /// those shards.
    pub(super) fn reuse(
        &mut self,
        previous: Manifest,
        dir: &Path,
        dataset: &Dataset,
        report: &mut CacheReport,
    ) {
        if let Some(file) = previous
            .prompt_embeddings
            .filter(|_| previous.prompts == self.prompts)
        {
            match verify(dir, &file) {
                Ok(()) => {
                    self.prompt_embeddings = Some(file);
                    report.reused_files += 1;
                }
                Err(e) => report
                    .discarded
                    .push(format!("{e:#}: re-encoding the prompts")),
            }
        }
        let shard_size = self.key.shard_size;
        let mut kept: BTreeMap<usize, Shard> = BTreeMap::new();
        for shard in previous.shards {
            let check = match shard.samples.is_empty() {
                true => Ok(()),
                false => verify(dir, &shard.file),
            };
            match check {
                Ok(()) => {
                    report.reused_files += 1;
                    kept.insert(shard.first / shard_size, shard);
                }
                Err(e) => report.discarded.push(format!("{e:#}: re-encoding it")),
            }
        }
        let listing: BTreeMap<&str, usize> = dataset
            .samples
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        self.skipped = previous
            .skipped
            .into_iter()
            .filter(|s| {
                listing
                    .get(s.id.as_str())
                    .is_some_and(|i| kept.contains_key(&(i / shard_size)))
            })
            .collect();
        self.shards = kept.into_values().collect();
    }
}

/// Whether `file` in `dir` is present with its recorded checksum.
pub(super) fn verify(dir: &Path, file: &CacheFile) -> Result<()> {
    let path = dir.join(&file.file);
    let actual = sha256_file(&path)?;
    ensure!(
        actual == file.sha256,
        "{} is damaged (checksum mismatch)",
        path.display()
    );
    MappedSafetensors::open(&path)?;
    Ok(())
}

fn text_identity(encoder: &ComponentFiles, tokenizer_dir: &Path) -> Result<String> {
    let mut paths = vec![encoder.config.clone()];
    paths.extend(encoder.weights.iter().cloned());
    for name in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let p = tokenizer_dir.join(name);
        if p.is_file() {
            paths.push(p);
        }
    }
    fingerprint(&paths)
}

fn vae_identity(files: &ModelFiles) -> Result<String> {
    fingerprint(std::iter::once(&files.vae.config).chain(&files.vae.weights))
}

fn encoded_size(source: &ImageSource) -> u64 {
    match source {
        ImageSource::File(path) => std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        ImageSource::Encoded { bytes, .. } => bytes.len() as u64,
    }
}

fn dataset_identity(dataset: &Dataset) -> String {
    let mut hasher = Sha256::new();
    for sample in &dataset.samples {
        for part in [
            sample.id.as_bytes(),
            &encoded_size(&sample.image).to_le_bytes(),
            sample.caption.as_bytes(),
        ] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
    }
    hex(&hasher.finalize())
}
