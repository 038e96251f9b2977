//! The latent cache: every training image encoded once by the VAE (the latent distribution's mean
//! and log-variance, unscaled) at its bucket's size (and mirrored, when flips are cached), and
//! every caption variant a sample can train on (see [`super::captions`]) once by the text
//! encoder, so training runs the U-Net alone.
//!
//! Layout: `manifest.json` ([`Manifest`]), `prompts.safetensors` (`embeddings`
//! `[prompts, seq, dim]`; for SDXL both encoders' penultimate states concatenated, and `pooled`
//! `[prompts, projection_dim]`, the second encoder's pooled projection) and
//! `latents-NNNNN.safetensors` shards ([`Shard`]). An SDXL cache records each sample's size and
//! crop conditions ([`CachedSample::size`]), computed where its image is resized and cropped.
//! The manifest is keyed by the VAE and text-encoder(s') fingerprints, the preprocessing settings and the dataset's
//! identity (sample ids, file sizes, captions) and records each file's SHA-256. A cache whose key
//! differs is stale and rebuilt; a file whose checksum differs or that cannot be read is damaged
//! and re-encoded; neither is ever used as it is. Changed caption options re-encode the prompts
//! only. Every file is written atomically and the manifest is updated after each shard, so an
//! interrupted build (or a strict-mode failure) keeps the shards already written and the next
//! build continues from them.
mod encode;
mod manifest;
mod prompts;
mod ranks;
mod reader;

pub use manifest::{
    CacheFile, CacheKey, CachedSample, Manifest, Shard, SkippedImage, MANIFEST_FILE,
};
pub use reader::LatentCache;

use super::buckets::{buckets, Bucket};
use super::captions::CaptionOptions;
use super::images::{DecodeOptions, ResizeFilter};
use super::{Dataset, DatasetOptions, PromptTemplate, Split};
use crate::dist::ProcessGroup;
use crate::model::family::ModelFamily;
use crate::model::source::ModelFiles;
use crate::model::weights::save_tensors;
use crate::util::fs::{sha256_file, write_json};
use crate::util::progress::Progress;
use anyhow::{bail, ensure, Context, Result};
use encode::ShardEncoder;
use manifest::FORMAT_VERSION;
use prompts::{encode_prompt_share, CaptionTable};
use ranks::{merge_rank_part, rank_part_file, remove_rank_parts};
use std::path::Path;
use tch::Device;

const PROMPTS_FILE: &str = "prompts.safetensors";
/// The prompt file's hidden states `[prompts, seq, dim]` (SDXL: both encoders' concatenated).
const EMBEDDINGS: &str = "embeddings";
/// SDXL: the prompt file's pooled embeddings `[prompts, projection_dim]`.
const POOLED: &str = "pooled";

/// What to cache and how.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub split: Split,
    /// Side of the square images, and the pixel budget (its square) of the buckets.
    pub resolution: u32,
    pub resize_filter: ResizeFilter,
    pub prompt_template: PromptTemplate,
    pub limit_per_class: Option<usize>,
    /// Which caption variants are encoded (and how training draws them).
    pub captions: CaptionOptions,
    /// Aspect-ratio buckets with this step (see [`super::buckets`]); none: square images.
    pub bucket_step: Option<u32>,
    /// Cache each image's mirror image's latents too, for random flips.
    pub flip: bool,
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
            captions: CaptionOptions::default(),
            bucket_step: None,
            flip: false,
            batch_size: 8,
            shard_size: 1024,
            strict: false,
            decode: DecodeOptions::default(),
            device: Device::Cpu,
        }
    }
}

impl CacheSettings {
    /// The sizes images are cached at.
    pub fn buckets(&self) -> Result<Vec<Bucket>> {
        match self.bucket_step {
            None => Ok(vec![Bucket::square(self.resolution)]),
            Some(step) => buckets(self.resolution, step),
        }
    }

    /// The settings that rebuild the cache `manifest` describes: what it holds as the manifest
    /// records it, encoded as `encoding` encodes (images per VAE forward, strictness, pixel
    /// limit, device).
    pub fn from_manifest(manifest: &Manifest, encoding: &CacheSettings) -> Result<Self> {
        Ok(Self {
            split: manifest.key.split,
            resolution: manifest.key.resolution,
            resize_filter: manifest.key.resize_filter,
            prompt_template: PromptTemplate::new(&manifest.prompt_template)?,
            limit_per_class: manifest.limit_per_class,
            captions: manifest.captions.clone(),
            bucket_step: manifest.key.bucket_step,
            flip: manifest.key.flip,
            shard_size: manifest.key.shard_size,
            decode: DecodeOptions {
                exif_orientation: manifest.key.exif_orientation,
                ..encoding.decode
            },
            ..encoding.clone()
        })
    }

    /// Checks the values (every build does, first).
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.batch_size > 0 && self.shard_size > 0,
            "cache batch and shard sizes must be positive"
        );
        ensure!(
            self.resolution.is_multiple_of(8) && self.resolution > 0,
            "resolution {} is not a positive multiple of 8",
            self.resolution
        );
        self.buckets()?;
        self.captions.validate()
    }
}

/// The latent cache a training run reads, built or reused, as this process's rank of `group`
/// (see [`build_in`]: the manifest is complete once rank 0 returns); returns its folder. `data`
/// is either a cache folder — rebuilt from its recorded dataset with its own settings when that
/// dataset is still there, else used as it is (it was made with the model's VAE and text
/// encoder or the reader refuses it) — or a dataset, cached in `dir` with `settings`. Either way
/// the build encodes as `settings` says (batch, strictness, pixel limit, device).
pub fn prepare(
    model: &ModelFiles,
    data: &Path,
    dir: &Path,
    settings: &CacheSettings,
    group: &ProcessGroup,
) -> Result<std::path::PathBuf> {
    if !data.join(MANIFEST_FILE).is_file() {
        build_in(model, data, settings, dir, group)?;
        return Ok(dir.to_path_buf());
    }
    let manifest = Manifest::read(data)?;
    if manifest.dataset_path.is_dir() {
        let recorded = CacheSettings::from_manifest(&manifest, settings)?;
        build_in(model, &manifest.dataset_path, &recorded, data, group)?;
    }
    Ok(data.to_path_buf())
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

/// One build: its inputs and what it has done so far.
struct Build<'a> {
    model: &'a ModelFiles,
    settings: &'a CacheSettings,
    dir: &'a Path,
    group: &'a ProcessGroup,
    dataset: Dataset,
    captions: CaptionTable,
    manifest: Manifest,
    report: CacheReport,
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
    let mut build = Build::new(model, dataset_path, settings, dir, group)?;
    // Another process building this cache is waited for; what it built is then reused. Rank 0
    // holds the lock for its whole group (the other ranks would wait on their own rank 0).
    let _lock = match group.is_main() {
        true => Some(crate::util::lock::DirLock::acquire_waiting(dir, "cache")?),
        false => None,
    };
    build.start()?;
    build.encode_prompts()?;
    build.encode_shards()?;
    build.finish()
}

/// Lists the dataset to cache; an empty split is an error.
fn open_dataset(dataset_path: &Path, settings: &CacheSettings) -> Result<Dataset> {
    let options = DatasetOptions {
        split: settings.split,
        limit_per_class: settings.limit_per_class,
        prompt: settings.prompt_template.clone(),
        ..DatasetOptions::default()
    };
    let dataset = Dataset::open(dataset_path, &options)?;
    if let Some(first) = dataset.skipped.first().filter(|_| settings.strict) {
        bail!(
            "strict mode: {} in the dataset is {}",
            first.path.display(),
            first.reason
        );
    }
    if dataset.is_empty() {
        bail!(
            "the {} split of {} has no images",
            settings.split,
            dataset_path.display()
        );
    }
    Ok(dataset)
}

impl<'a> Build<'a> {
    /// A build of `dataset_path`'s cache in `dir`, nothing done yet.
    fn new(
        model: &'a ModelFiles,
        dataset_path: &Path,
        settings: &'a CacheSettings,
        dir: &'a Path,
        group: &'a ProcessGroup,
    ) -> Result<Self> {
        settings.validate()?;
        let dataset = open_dataset(dataset_path, settings)?;
        let captions = CaptionTable::new(&dataset, &settings.captions);
        let manifest = Manifest {
            version: FORMAT_VERSION,
            key: CacheKey::new(model, &dataset, settings)?,
            dataset_path: dataset_path.to_path_buf(),
            prompt_template: settings.prompt_template.as_str().to_string(),
            limit_per_class: settings.limit_per_class,
            buckets: settings.buckets()?,
            captions: settings.captions.clone(),
            prompts: captions.prompts.clone(),
            dropped_prompt: captions.dropped,
            prompt_embeddings: None,
            shards: Vec::new(),
            skipped: Vec::new(),
            complete: false,
        };
        Ok(Self {
            model,
            settings,
            dir,
            group,
            dataset,
            captions,
            manifest,
            report: CacheReport::default(),
        })
    }

    /// Rank 0 takes over the valid part of an earlier cache and writes the manifest; the other
    /// ranks read it. A whole earlier cache stays marked complete while it is checked and
    /// written again: processes that read it without the lock (another group's run, which
    /// built it and went on) must never see it incomplete.
    fn start(&mut self) -> Result<()> {
        if self.group.is_main() {
            if let Some(previous) = self.previous() {
                let was_complete = previous.complete;
                let dataset = &self.dataset;
                self.manifest
                    .reuse(previous, self.dir, dataset, &mut self.report);
                self.manifest.complete =
                    was_complete && self.report.discarded.is_empty() && self.all_listed();
            }
            for message in &self.report.discarded {
                eprintln!("difftune cache: {message}");
            }
            self.add_listing_skips();
            remove_rank_parts(self.dir)?;
            self.manifest.write(self.dir)?;
        }
        self.group
            .barrier()
            .context("waiting for rank 0 to check the earlier cache")?;
        if !self.group.is_main() {
            self.manifest = Manifest::read(self.dir)?;
        }
        Ok(())
    }

    /// Whether the manifest lists the prompts' embeddings and every shard of the dataset.
    fn all_listed(&self) -> bool {
        let shards = self.dataset.len().div_ceil(self.settings.shard_size);
        self.manifest.prompt_embeddings.is_some() && self.manifest.shards.len() == shards
    }

    /// Lists the entries the dataset's listing left out with the skipped images, and says so.
    fn add_listing_skips(&mut self) {
        for entry in &self.dataset.skipped {
            let path = entry.path.display().to_string();
            let id = entry
                .path
                .strip_prefix(&self.dataset.root)
                .unwrap_or(&entry.path);
            let skipped = SkippedImage {
                id: id.display().to_string(),
                path: path.clone(),
                error: entry.reason.to_string(),
            };
            eprintln!("difftune cache: skipping {path}: {}", skipped.error);
            self.report.skipped.push(skipped.clone());
            self.manifest.skipped.push(skipped);
        }
    }

    /// The earlier manifest in the folder when its key is this build's.
    fn previous(&mut self) -> Option<Manifest> {
        let dir = self.dir;
        match Manifest::read(dir) {
            Ok(m) if m.key == self.manifest.key => Some(m),
            Ok(m) => {
                self.report.discarded.push(format!(
                    "cache in {} is stale ({} changed): rebuilding",
                    dir.display(),
                    m.key.differences(&self.manifest.key).join(", ")
                ));
                None
            }
            Err(e) if dir.join(MANIFEST_FILE).exists() => {
                self.report
                    .discarded
                    .push(format!("cache manifest unreadable ({e:#}): rebuilding"));
                None
            }
            Err(_) => None,
        }
    }

    /// Encodes the prompts unless an intact file of them was reused; rank 0 writes it.
    fn encode_prompts(&mut self) -> Result<()> {
        if self.manifest.prompt_embeddings.is_some() {
            return Ok(());
        }
        let (settings, group) = (self.settings, self.group);
        let embeddings =
            encode_prompt_share(self.model, &self.manifest.prompts, settings.device, group)?;
        if group.is_main() {
            let path = self.dir.join(PROMPTS_FILE);
            let mut tensors = vec![(EMBEDDINGS.to_string(), embeddings.context)];
            tensors.extend(embeddings.pooled.map(|p| (POOLED.to_string(), p)));
            save_tensors(&path, &tensors, None)?;
            self.manifest.prompt_embeddings = Some(CacheFile {
                file: PROMPTS_FILE.into(),
                sha256: sha256_file(&path)?,
            });
            self.report.written_files += 1;
        }
        Ok(())
    }

    /// Encodes this rank's share of the shards not yet listed, recording each in this rank's
    /// manifest as it is written.
    fn encode_shards(&mut self) -> Result<()> {
        let shard_size = self.settings.shard_size;
        let shard_count = self.dataset.len().div_ceil(shard_size);
        let listed: Vec<usize> = self
            .manifest
            .shards
            .iter()
            .map(|s| s.first / shard_size)
            .collect();
        let todo: Vec<usize> = (0..shard_count).filter(|k| !listed.contains(k)).collect();
        let todo = self.group.shard(&todo).to_vec();
        let manifest_file = match self.group.is_main() {
            true => MANIFEST_FILE.to_string(),
            false => rank_part_file(self.group.rank()),
        };
        write_json(&self.dir.join(&manifest_file), &self.manifest)?;
        if todo.is_empty() {
            return Ok(());
        }
        let buckets = self.manifest.buckets.clone();
        let encoder = ShardEncoder {
            dataset: &self.dataset,
            settings: self.settings,
            buckets: &buckets,
            vae: crate::model::pipeline::load_vae(self.model, self.settings.device)?,
            micro_conditioning: self.model.family()? == ModelFamily::Sdxl,
            dir: self.dir,
            progress: Progress::new(
                "cache",
                (todo.len() * shard_size).min(self.dataset.len()) as u64,
                "images",
                self.group.is_main(),
            ),
        };
        for k in todo {
            let shard = encoder.encode(k, &mut self.manifest, &mut self.report)?;
            self.manifest.shards.push(shard);
            self.manifest.shards.sort_by_key(|s| s.first);
            write_json(&self.dir.join(&manifest_file), &self.manifest)?;
            self.report.written_files += 1;
        }
        encoder.progress.finish_and_clear();
        Ok(())
    }

    /// After every rank's shards: rank 0 merges the other ranks' manifests, sets each sample's
    /// captions and repeats, and marks the manifest complete.
    fn finish(mut self) -> Result<(Manifest, CacheReport)> {
        self.group
            .barrier()
            .context("waiting for every rank's shards of the cache")?;
        if !self.group.is_main() {
            return Ok((self.manifest, self.report));
        }
        for rank in 1..self.group.world_size() {
            self.report.written_files += merge_rank_part(&mut self.manifest, self.dir, rank)?;
        }
        self.captions.assign(&mut self.manifest, &self.dataset);
        self.manifest.complete = true;
        self.manifest.write(self.dir)?;
        remove_rank_parts(self.dir)?;
        self.report.samples = self.manifest.len();
        if self.report.samples == 0 {
            bail!(
                "no image of {} could be loaded (see the skipped images above)",
                self.manifest.dataset_path.display()
            );
        }
        Ok((self.manifest, self.report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic::{captions, generate_food101_like, Domain, SyntheticSpec};

    /// Another process's check of a whole cache (its rank 0 took the lock after this one's run
    /// built the cache and went on to read it without the lock) never marks it incomplete; a
    /// cache that lacks a shard is marked incomplete until it is whole again.
    #[test]
    fn a_whole_cache_stays_complete_while_another_process_checks_it() {
        let root = tempfile::tempdir().unwrap();
        let (model, data, cache) = (
            root.path().join("model"),
            root.path().join("data"),
            root.path().join("cache"),
        );
        crate::model::tiny::write_tiny_model(&model, 0, &captions()).unwrap();
        let spec = SyntheticSpec {
            classes: 2,
            train_per_class: 3,
            test_per_class: 1,
            resolution: 32,
            domain: Domain::Target,
            seed: 0,
            jpeg_quality: 90,
        };
        generate_food101_like(&data, &spec).unwrap();
        let files = ModelFiles::resolve(model.to_str().unwrap(), None).unwrap();
        let settings = CacheSettings {
            resolution: 32,
            shard_size: 4,
            ..CacheSettings::default()
        };
        let (built, _) = build(&files, &data, &settings, &cache).unwrap();
        assert_eq!((built.shards.len(), built.complete), (2, true));

        let group = ProcessGroup::single();
        let mut again = Build::new(&files, &data, &settings, &cache, &group).unwrap();
        again.start().unwrap();
        assert!(Manifest::read(&cache).unwrap().complete);

        std::fs::remove_file(cache.join(&built.shards[1].file.file)).unwrap();
        let mut repair = Build::new(&files, &data, &settings, &cache, &group).unwrap();
        repair.start().unwrap();
        assert!(!Manifest::read(&cache).unwrap().complete);
        repair.encode_prompts().unwrap();
        repair.encode_shards().unwrap();
        assert!(repair.finish().unwrap().0.complete);
    }
}
