//! The latent cache: every training image encoded once by the VAE (the latent distribution's mean
//! and log-variance, unscaled) and every distinct caption once by the text encoder, so training
//! runs the U-Net alone.
//!
//! Layout: `manifest.json`, `prompts.safetensors` (`embeddings` `[prompts, seq, dim]`) and
//! `latents-NNNNN.safetensors` shards (`mean`, `logvar` `[rows, 4, h, w]`, f32). The manifest is
//! keyed by the VAE and text-encoder fingerprints, the preprocessing settings and the dataset's
//! identity (sample ids, file sizes, captions) and records each file's SHA-256. A cache whose key
//! differs is stale and rebuilt; a file whose checksum differs or that cannot be read is damaged
//! and re-encoded; neither is ever used as it is. Every file is written atomically and the
//! manifest is updated after each shard, so an interrupted build (or a strict-mode failure) keeps
//! the shards already written and the next build continues from them.
use super::images::{
    load_batch, Crop, DecodeOptions, ExifOrientation, Preprocess, ResizeFilter, JPEG_DECODER,
};
use super::{Dataset, DatasetOptions, ImageSource, PromptTemplate, Split};
use crate::dist::ProcessGroup;
use crate::model::source::{fingerprint, ModelFiles};
use crate::model::weights::{save_tensors, MappedSafetensors};
use crate::util::fs::{hex, sha256_file, write_json};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub const MANIFEST_FILE: &str = "manifest.json";
const PROMPTS_FILE: &str = "prompts.safetensors";
const FORMAT_VERSION: u32 = 1;

/// What to cache and how.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub split: Split,
    pub resolution: u32,
    pub resize_filter: ResizeFilter,
    pub prompt_template: PromptTemplate,
    pub limit_per_class: Option<usize>,
    /// Images per VAE forward.
    pub batch_size: usize,
    /// Samples of the listing per shard file.
    pub shard_size: usize,
    /// Fail on the first image that cannot be loaded instead of skipping it.
    pub strict: bool,
    /// EXIF orientation and the pixel limit (larger images are skipped, or fail in strict mode).
    pub decode: DecodeOptions,
    pub device: Device,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            split: Split::Train,
            resolution: 512,
            resize_filter: ResizeFilter::Bilinear,
            prompt_template: PromptTemplate::default(),
            limit_per_class: None,
            batch_size: 8,
            shard_size: 1024,
            strict: false,
            decode: DecodeOptions::default(),
            device: Device::Cpu,
        }
    }
}

/// Everything the cached values depend on. Any difference makes a cache stale.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheKey {
    /// Fingerprint of the VAE's config and weights.
    pub vae: String,
    /// Fingerprint of the text encoder's config and weights and the tokenizer's files.
    pub text_encoder: String,
    pub resolution: u32,
    pub resize_filter: ResizeFilter,
    pub crop: Crop,
    pub split: Split,
    pub shard_size: usize,
    /// SHA-256 over every listed sample's id, encoded size and caption.
    pub dataset: String,
    pub samples: usize,
    /// Caches from before these were recorded used the `image` crate's JPEG decoder and applied
    /// EXIF orientation.
    #[serde(default = "legacy_jpeg_decoder")]
    pub jpeg_decoder: String,
    #[serde(default = "legacy_exif_orientation")]
    pub exif_orientation: ExifOrientation,
}

fn legacy_jpeg_decoder() -> String {
    "image-rs".into()
}

fn legacy_exif_orientation() -> ExifOrientation {
    ExifOrientation::Apply
}

impl CacheKey {
    /// Names the parts that differ, for the "stale cache" message.
    fn differences(&self, other: &CacheKey) -> Vec<&'static str> {
        let mut out = Vec::new();
        let checks = [
            ("VAE", self.vae != other.vae),
            (
                "text encoder / tokenizer",
                self.text_encoder != other.text_encoder,
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
        ];
        for (name, differs) in checks {
            if differs {
                out.push(name);
            }
        }
        out
    }
}

/// A file of the cache with its checksum.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheFile {
    pub file: String,
    pub sha256: String,
}

/// A shard: the encoded images among listing entries `first..first + count`.
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
    /// Index into the manifest's `prompts`.
    pub prompt: usize,
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
    /// `[channels, height, width]` of each latent.
    pub latent_shape: Vec<i64>,
    pub prompts: Vec<String>,
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
            "{} has cache format {}, this difftune writes {FORMAT_VERSION}",
            path.display(),
            manifest.version
        );
        Ok(manifest)
    }

    fn write(&self, dir: &Path) -> Result<()> {
        write_json(&dir.join(MANIFEST_FILE), self)
    }

    /// Cached samples over all shards.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.samples.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What [`build`] did.
#[derive(Debug, Clone, Default)]
pub struct CacheReport {
    /// Shards (and the prompt file) reused as they were.
    pub reused_files: usize,
    /// Shards (and the prompt file) encoded by this call.
    pub written_files: usize,
    /// Why earlier cache contents were not used (stale key, damaged files).
    pub discarded: Vec<String>,
    pub skipped: Vec<SkippedImage>,
    pub samples: usize,
}

/// Whether `file` in `dir` is present with its recorded checksum.
fn verify(dir: &Path, file: &CacheFile) -> Result<()> {
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

fn text_identity(files: &ModelFiles) -> Result<String> {
    let mut paths = vec![files.text_encoder.config.clone()];
    paths.extend(files.text_encoder.weights.iter().cloned());
    for name in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let p = files.tokenizer_dir.join(name);
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

fn shard_file_name(index: usize) -> String {
    format!("latents-{index:05}.safetensors")
}

/// Builds the cache of `dataset_path` for `model` in `dir`, reusing whatever valid part of an
/// earlier cache matches; returns the manifest. Images that cannot be loaded are reported on
/// stderr with their path and skipped (an error in strict mode, after saving the shards done).
/// The folder is locked while it is built: another process building it is waited for.
pub fn build(
    model: &ModelFiles,
    dataset_path: &Path,
    settings: &CacheSettings,
    dir: &Path,
) -> Result<(Manifest, CacheReport)> {
    build_in(model, dataset_path, settings, dir, &ProcessGroup::single())
}

/// [`build`] as this process's rank of `group`: rank 0 checks the earlier cache and writes the
/// manifest; every rank encodes its share of the whole 64-prompt chunks (gathered to rank 0,
/// which writes the embeddings) and of the shards still to encode, each whole shard in the
/// batches one process uses, so the files equal a single-process build's. A rank other than 0
/// lists its shards in `manifest.rank-N.json`, which rank 0 merges after a barrier. The
/// returned manifest is complete on rank 0 only. An interrupted multi-rank build keeps the
/// shards rank 0 listed; the others are encoded again.
pub fn build_in(
    model: &ModelFiles,
    dataset_path: &Path,
    settings: &CacheSettings,
    dir: &Path,
    group: &ProcessGroup,
) -> Result<(Manifest, CacheReport)> {
    ensure!(
        settings.batch_size > 0 && settings.shard_size > 0,
        "cache batch and shard sizes must be positive"
    );
    ensure!(
        settings.resolution.is_multiple_of(8) && settings.resolution > 0,
        "resolution {} is not a positive multiple of 8",
        settings.resolution
    );
    let options = DatasetOptions {
        split: settings.split,
        limit_per_class: settings.limit_per_class,
        prompt: settings.prompt_template.clone(),
        ..DatasetOptions::default()
    };
    let dataset = Dataset::open(dataset_path, &options)?;
    if dataset.is_empty() {
        bail!(
            "the {} split of {} has no images",
            settings.split,
            dataset_path.display()
        );
    }
    let key = CacheKey {
        vae: vae_identity(model)?,
        text_encoder: text_identity(model)?,
        resolution: settings.resolution,
        resize_filter: settings.resize_filter,
        crop: Crop::Center,
        split: settings.split,
        shard_size: settings.shard_size,
        dataset: dataset_identity(&dataset),
        samples: dataset.len(),
        jpeg_decoder: JPEG_DECODER.into(),
        exif_orientation: settings.decode.exif_orientation,
    };
    // Another process building this cache is waited for; what it built is then reused. Rank 0
    // holds the lock for its whole group (the other ranks would wait on their own rank 0).
    let _lock = match group.is_main() {
        true => Some(crate::util::lock::DirLock::acquire_waiting(dir, "cache")?),
        false => None,
    };
    let mut report = CacheReport::default();

    let mut prompts: Vec<String> = Vec::new();
    let mut prompt_index: BTreeMap<&str, usize> = BTreeMap::new();
    let sample_prompts: Vec<usize> = dataset
        .samples
        .iter()
        .map(|s| {
            *prompt_index.entry(s.caption.as_str()).or_insert_with(|| {
                prompts.push(s.caption.clone());
                prompts.len() - 1
            })
        })
        .collect();

    let previous = match Manifest::read(dir) {
        _ if !group.is_main() => None,
        Ok(m) if m.key == key => Some(m),
        Ok(m) => {
            report.discarded.push(format!(
                "cache in {} is stale ({} changed): rebuilding",
                dir.display(),
                m.key.differences(&key).join(", ")
            ));
            None
        }
        Err(e) if dir.join(MANIFEST_FILE).exists() => {
            report
                .discarded
                .push(format!("cache manifest unreadable ({e:#}): rebuilding"));
            None
        }
        Err(_) => None,
    };
    let mut manifest = Manifest {
        version: FORMAT_VERSION,
        key,
        dataset_path: dataset_path.to_path_buf(),
        prompt_template: settings.prompt_template.as_str().to_string(),
        limit_per_class: settings.limit_per_class,
        latent_shape: Vec::new(),
        prompts,
        prompt_embeddings: None,
        shards: Vec::new(),
        skipped: Vec::new(),
        complete: false,
    };
    let mut kept: BTreeMap<usize, Shard> = BTreeMap::new();
    if let Some(prev) = previous {
        if let Some(file) = prev
            .prompt_embeddings
            .filter(|_| prev.prompts == manifest.prompts)
        {
            match verify(dir, &file) {
                Ok(()) => {
                    manifest.prompt_embeddings = Some(file);
                    report.reused_files += 1;
                }
                Err(e) => report
                    .discarded
                    .push(format!("{e:#}: re-encoding the prompts")),
            }
        }
        manifest.latent_shape = prev.latent_shape;
        for shard in prev.shards {
            let check = if shard.samples.is_empty() {
                Ok(())
            } else {
                verify(dir, &shard.file)
            };
            match check {
                Ok(()) => {
                    report.reused_files += 1;
                    kept.insert(shard.first / settings.shard_size, shard);
                }
                Err(e) => report.discarded.push(format!("{e:#}: re-encoding it")),
            }
        }
        manifest.skipped = prev
            .skipped
            .into_iter()
            .filter(|s| {
                dataset
                    .samples
                    .iter()
                    .position(|d| d.id == s.id)
                    .is_some_and(|i| kept.contains_key(&(i / settings.shard_size)))
            })
            .collect();
    }
    for message in &report.discarded {
        eprintln!("difftune cache: {message}");
    }
    if group.is_main() {
        manifest.shards = kept.values().cloned().collect();
        remove_rank_parts(dir)?;
        manifest.write(dir)?;
    }
    group
        .barrier()
        .context("waiting for rank 0 to check the earlier cache")?;
    if !group.is_main() {
        manifest = Manifest::read(dir)?;
    }

    if manifest.prompt_embeddings.is_none() {
        let embeddings = encode_prompt_share(model, &manifest.prompts, settings.device, group)?;
        if group.is_main() {
            let path = dir.join(PROMPTS_FILE);
            save_tensors(&path, &[("embeddings".to_string(), embeddings)], None)?;
            manifest.prompt_embeddings = Some(CacheFile {
                file: PROMPTS_FILE.into(),
                sha256: sha256_file(&path)?,
            });
            report.written_files += 1;
        }
    }

    let shard_count = dataset.len().div_ceil(settings.shard_size);
    let listed: Vec<usize> = manifest
        .shards
        .iter()
        .map(|s| s.first / settings.shard_size)
        .collect();
    let todo: Vec<usize> = (0..shard_count).filter(|k| !listed.contains(k)).collect();
    let todo = group.shard(&todo).to_vec();
    let manifest_file = match group.is_main() {
        true => MANIFEST_FILE.to_string(),
        false => rank_part_file(group.rank()),
    };
    write_json(&dir.join(&manifest_file), &manifest)?;
    if !todo.is_empty() {
        let vae = crate::model::pipeline::load_vae(model, settings.device)?;
        let progress = indicatif::ProgressBar::new(
            (todo.len() * settings.shard_size).min(dataset.len()) as u64,
        )
        .with_style(
            indicatif::ProgressStyle::with_template(
                "encoding {bar:30} {pos}/{len} images {per_sec} ETA {eta}",
            )
            .expect("valid template"),
        );
        if !group.is_main() {
            progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        for k in todo {
            let first = k * settings.shard_size;
            let count = settings.shard_size.min(dataset.len() - first);
            let pre = Preprocess {
                resolution: settings.resolution,
                filter: settings.resize_filter,
                crop: Crop::Center,
                decode: settings.decode,
                ..Preprocess::default()
            };
            let mut means = Vec::new();
            let mut logvars = Vec::new();
            let mut samples = Vec::new();
            for start in (first..first + count).step_by(settings.batch_size) {
                let end = (start + settings.batch_size).min(first + count);
                let sources: Vec<&ImageSource> = dataset.samples[start..end]
                    .iter()
                    .map(|s| &s.image)
                    .collect();
                let batch = match load_batch(&sources, &pre, 0, settings.strict) {
                    Ok(batch) => batch,
                    Err(e) => {
                        // Strict mode: the shards already written stay listed in the manifest.
                        return Err(e.context(format!(
                            "strict mode: stopping the cache build ({} shard(s) already written to {} are kept)",
                            manifest.shards.len(),
                            dir.display()
                        )));
                    }
                };
                for failure in &batch.failures {
                    let sample = &dataset.samples[start + failure.index];
                    let skipped = SkippedImage {
                        id: sample.id.clone(),
                        path: sample.image.describe(),
                        error: format!("{:#}", failure.error),
                    };
                    progress.suspend(|| {
                        eprintln!(
                            "difftune cache: skipping {}: {}",
                            skipped.path, skipped.error
                        )
                    });
                    report.skipped.push(skipped.clone());
                    manifest.skipped.push(skipped);
                }
                if !batch.kept.is_empty() {
                    let posterior =
                        tch::no_grad(|| vae.encode(&batch.images.to_device(settings.device)));
                    means.push(posterior.mean.to_device(Device::Cpu).to_kind(Kind::Float));
                    logvars.push(posterior.logvar.to_device(Device::Cpu).to_kind(Kind::Float));
                    samples.extend(batch.kept.iter().map(|&i| CachedSample {
                        id: dataset.samples[start + i].id.clone(),
                        prompt: sample_prompts[start + i],
                    }));
                }
                progress.inc((end - start) as u64);
            }
            let file = shard_file_name(k);
            let path = dir.join(&file);
            if means.is_empty() {
                let _ = std::fs::remove_file(&path);
            } else {
                let mean = Tensor::cat(&means, 0);
                manifest.latent_shape = mean.size()[1..].to_vec();
                let tensors = [
                    ("mean".to_string(), mean),
                    ("logvar".to_string(), Tensor::cat(&logvars, 0)),
                ];
                save_tensors(&path, &tensors, None)?;
            }
            let sha256 = if means.is_empty() {
                String::new()
            } else {
                sha256_file(&path)?
            };
            manifest.shards.push(Shard {
                file: CacheFile { file, sha256 },
                first,
                count,
                samples,
            });
            manifest.shards.sort_by_key(|s| s.first);
            write_json(&dir.join(&manifest_file), &manifest)?;
            report.written_files += 1;
        }
        progress.finish_and_clear();
    }
    group
        .barrier()
        .context("waiting for every rank's shards of the cache")?;
    if !group.is_main() {
        return Ok((manifest, report));
    }
    for rank in 1..group.world_size() {
        report.written_files += merge_rank_part(&mut manifest, dir, rank)?;
    }
    manifest.complete = true;
    manifest.write(dir)?;
    remove_rank_parts(dir)?;
    report.samples = manifest.len();
    if report.samples == 0 {
        bail!(
            "no image of {} could be loaded (see the skipped images above)",
            dataset_path.display()
        );
    }
    Ok((manifest, report))
}

/// The manifest of the shards rank `rank` (not 0) encoded in a multi-rank build.
fn rank_part_file(rank: usize) -> String {
    format!("manifest.rank-{rank}.json")
}

/// Removes the rank manifests of a multi-rank build.
fn remove_rank_parts(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("manifest.rank-") && name.ends_with(".json") {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Adds the shards (and their skipped images) that rank `rank` listed in its manifest to
/// `manifest`; returns how many it added.
fn merge_rank_part(manifest: &mut Manifest, dir: &Path, rank: usize) -> Result<usize> {
    let path = dir.join(rank_part_file(rank));
    let part: Manifest = crate::util::fs::read_json(&path)
        .with_context(|| format!("reading rank {rank}'s shards"))?;
    let known: Vec<usize> = manifest.shards.iter().map(|s| s.first).collect();
    let new: Vec<Shard> = part
        .shards
        .into_iter()
        .filter(|s| !known.contains(&s.first))
        .collect();
    let ids: Vec<&str> = manifest.skipped.iter().map(|s| s.id.as_str()).collect();
    let skipped: Vec<SkippedImage> = part
        .skipped
        .into_iter()
        .filter(|s| !ids.contains(&s.id.as_str()))
        .collect();
    manifest.skipped.extend(skipped);
    if manifest.latent_shape.is_empty() {
        manifest.latent_shape = part.latent_shape;
    }
    let added = new.len();
    manifest.shards.extend(new);
    manifest.shards.sort_by_key(|s| s.first);
    Ok(added)
}

/// Every rank encodes its share of the whole 64-prompt chunks; the embeddings of all prompts
/// are gathered in order (on `device`, the group's) and returned on the CPU.
fn encode_prompt_share(
    model: &ModelFiles,
    prompts: &[String],
    device: Device,
    group: &ProcessGroup,
) -> Result<Tensor> {
    let chunks = group.shard_range(prompts.len().div_ceil(PROMPT_CHUNK));
    let (start, end) = (chunks.start * PROMPT_CHUNK, chunks.end * PROMPT_CHUNK);
    let mine = &prompts[start.min(prompts.len())..end.min(prompts.len())];
    if !group.is_distributed() {
        return encode_prompts(model, mine, device);
    }
    // A rank without a chunk still hands over rows of the right shape: none of one prompt's.
    let embeddings = match mine.is_empty() {
        true => encode_prompts(model, &prompts[..1], device)?.narrow(0, 0, 0),
        false => encode_prompts(model, mine, device)?,
    };
    let all = group
        .all_gather_rows(&embeddings.to_device(device))
        .context("gathering the prompt embeddings")?;
    Ok(all.to_device(Device::Cpu))
}

/// Prompts per text-encoder forward.
const PROMPT_CHUNK: usize = 64;

/// `[prompts, seq, dim]` text-encoder hidden states of `prompts`, on the CPU.
fn encode_prompts(model: &ModelFiles, prompts: &[String], device: Device) -> Result<Tensor> {
    let tokenizer = crate::model::tokenizer::ClipTokenizer::from_dir(&model.tokenizer_dir)?;
    let encoder = crate::model::pipeline::load_text_encoder(model, device)?;
    let mut out = Vec::new();
    for chunk in prompts.chunks(PROMPT_CHUNK) {
        let ids = tokenizer.input_ids(chunk)?.to_device(device);
        out.push(
            tch::no_grad(|| encoder.forward(&ids))
                .to_device(Device::Cpu)
                .to_kind(Kind::Float),
        );
    }
    Ok(Tensor::cat(&out, 0))
}

/// An opened, verified cache for training: shards memory-mapped, prompt embeddings in memory.
pub struct LatentCache {
    pub manifest: Manifest,
    shards: Vec<MappedSafetensors>,
    /// (shard, row) of each cached sample, in manifest order.
    rows: Vec<(usize, usize)>,
    prompts: Vec<usize>,
    embeddings: Tensor,
}

impl LatentCache {
    /// Opens a complete cache, verifying every file's checksum.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        ensure!(
            manifest.complete,
            "the cache in {} is incomplete (its build was interrupted)",
            dir.display()
        );
        let prompts_file = manifest
            .prompt_embeddings
            .as_ref()
            .context("the cache has no prompt embeddings")?;
        verify(dir, prompts_file)?;
        let embeddings = crate::model::weights::read_all(&dir.join(&prompts_file.file))?
            .remove("embeddings")
            .with_context(|| format!("{} has no `embeddings`", prompts_file.file))?;
        ensure!(
            embeddings.size()[0] == manifest.prompts.len() as i64,
            "{} holds {} prompt embeddings for {} prompts",
            prompts_file.file,
            embeddings.size()[0],
            manifest.prompts.len()
        );
        let mut shards = Vec::new();
        let mut rows = Vec::new();
        let mut prompts = Vec::new();
        for shard in manifest.shards.iter().filter(|s| !s.samples.is_empty()) {
            verify(dir, &shard.file)?;
            let mapped = MappedSafetensors::open(&dir.join(&shard.file.file))?;
            for name in ["mean", "logvar"] {
                let view = mapped
                    .tensors()
                    .tensor(name)
                    .with_context(|| format!("{}: no `{name}`", shard.file.file))?;
                let mut expected = vec![shard.samples.len()];
                expected.extend(manifest.latent_shape.iter().map(|&d| d as usize));
                ensure!(
                    view.shape() == expected.as_slice() && view.dtype() == safetensors::Dtype::F32,
                    "{}: `{name}` is {:?} {:?}, expected F32 {expected:?}",
                    shard.file.file,
                    view.dtype(),
                    view.shape()
                );
            }
            for (row, sample) in shard.samples.iter().enumerate() {
                rows.push((shards.len(), row));
                prompts.push(sample.prompt);
            }
            shards.push(mapped);
        }
        Ok(Self {
            manifest,
            shards,
            rows,
            prompts,
            embeddings,
        })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Posterior mean and log-variance `[b, c, h, w]` and the caption embeddings `[b, seq, dim]`
    /// of cached samples `indices`, on the CPU.
    pub fn batch(&self, indices: &[usize]) -> Result<(Tensor, Tensor, Tensor)> {
        let shape = &self.manifest.latent_shape;
        let row_len: usize = shape.iter().product::<i64>() as usize;
        let mut dims = vec![indices.len() as i64];
        dims.extend(shape);
        let gather = |name: &str| -> Result<Tensor> {
            let mut bytes = Vec::with_capacity(indices.len() * row_len * 4);
            for &i in indices {
                let &(shard, row) = self
                    .rows
                    .get(i)
                    .with_context(|| format!("cached sample {i} out of range"))?;
                let st = self.shards[shard].tensors();
                let view = st.tensor(name)?;
                bytes.extend_from_slice(&view.data()[row * row_len * 4..(row + 1) * row_len * 4]);
            }
            Ok(Tensor::f_from_data_size(&bytes, &dims, Kind::Float)?)
        };
        let mean = gather("mean")?;
        let logvar = gather("logvar")?;
        let prompt_ids: Vec<i64> = indices.iter().map(|&i| self.prompts[i] as i64).collect();
        let context = self
            .embeddings
            .index_select(0, &Tensor::from_slice(&prompt_ids));
        Ok((mean, logvar, context))
    }
}
