//! Encoding the cache's shards: each batch of listed images decoded and preprocessed to its
//! bucket, the images of each bucket encoded by the VAE together (and flipped, when flips are
//! cached), and each shard's latents written to one file.
use super::super::buckets::Bucket;
use super::super::images::{load_bucketed, Crop, ImageTensor, Preprocess};
use super::super::{Dataset, ImageSource};
use super::manifest::{CacheFile, CachedSample, Manifest, Shard, SkippedImage};
use super::{CacheReport, CacheSettings};
use crate::model::vae::AutoencoderKL;
use crate::model::weights::save_tensors;
use crate::util::fs::sha256_file;
use crate::util::progress::Progress;
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// What one shard's file is made of: per bucket, the rows of each tensor, in sample order.
#[derive(Default)]
struct BucketLatents {
    tensors: BTreeMap<(usize, &'static str), Vec<Tensor>>,
}

impl BucketLatents {
    fn push(&mut self, bucket: usize, name: &'static str, rows: Tensor) {
        self.tensors.entry((bucket, name)).or_default().push(rows);
    }

    fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// `(name_WxH, rows)` of every tensor.
    fn named(self, buckets: &[Bucket]) -> Vec<(String, Tensor)> {
        self.tensors
            .into_iter()
            .map(|((b, name), rows)| {
                (
                    format!("{name}_{}", buckets[b].name()),
                    Tensor::cat(&rows, 0),
                )
            })
            .collect()
    }
}

/// Encodes the shards of a build.
pub(super) struct ShardEncoder<'a> {
    pub dataset: &'a Dataset,
    pub settings: &'a CacheSettings,
    pub buckets: &'a [Bucket],
    pub vae: AutoencoderKL,
    pub dir: &'a Path,
    pub progress: Progress,
}

impl ShardEncoder<'_> {
    /// Encodes shard `k` (listing entries `k * shard_size ..`), writes its file and returns its
    /// entry; images that fail to load are added to `manifest.skipped` and `report` (an error in
    /// strict mode).
    pub fn encode(
        &self,
        k: usize,
        manifest: &mut Manifest,
        report: &mut CacheReport,
    ) -> Result<Shard> {
        let shard_size = self.settings.shard_size;
        let first = k * shard_size;
        let count = shard_size.min(self.dataset.len() - first);
        let mut latents = BucketLatents::default();
        let mut samples = Vec::new();
        for start in (first..first + count).step_by(self.settings.batch_size) {
            let end = (start + self.settings.batch_size).min(first + count);
            let kept = self
                .load(start..end, manifest, report)
                .map_err(|e| {
                    // Strict mode: the shards already written stay listed in the manifest.
                    e.context(format!(
                        "strict mode: stopping the cache build ({} shard(s) already written to {} are kept)",
                        manifest.shards.len(),
                        self.dir.display()
                    ))
                })?;
            self.encode_batch(&kept, &mut latents);
            samples.extend(kept.iter().map(|(i, bucket, _)| CachedSample {
                id: self.dataset.samples[*i].id.clone(),
                bucket: *bucket,
                repeats: self.dataset.samples[*i].repeats,
                prompts: Vec::new(),
            }));
            self.progress.inc((end - start) as u64);
        }
        let file = self.write(k, latents)?;
        Ok(Shard {
            file,
            first,
            count,
            samples,
        })
    }

    /// Loads listing entries `range` to their buckets: `(entry, bucket, image)` of those that
    /// loaded; the others are reported as skipped (the first is an error in strict mode).
    fn load(
        &self,
        range: std::ops::Range<usize>,
        manifest: &mut Manifest,
        report: &mut CacheReport,
    ) -> Result<Vec<(usize, usize, ImageTensor)>> {
        let pre = Preprocess {
            resolution: self.settings.resolution,
            filter: self.settings.resize_filter,
            crop: Crop::Center,
            decode: self.settings.decode,
            ..Preprocess::default()
        };
        let samples = &self.dataset.samples[range.clone()];
        let sources: Vec<&ImageSource> = samples.iter().map(|s| &s.image).collect();
        let mut kept = Vec::new();
        for (offset, result) in load_bucketed(&sources, &pre, self.buckets)
            .into_iter()
            .enumerate()
        {
            let sample = &samples[offset];
            match result {
                Ok((bucket, image)) => kept.push((range.start + offset, bucket, image)),
                Err(error) if self.settings.strict => return Err(error),
                Err(error) => {
                    let skipped = SkippedImage {
                        id: sample.id.clone(),
                        path: sample.image.describe(),
                        error: format!("{error:#}"),
                    };
                    self.progress.suspend(|| {
                        eprintln!(
                            "difftune cache: skipping {}: {}",
                            skipped.path, skipped.error
                        )
                    });
                    report.skipped.push(skipped.clone());
                    manifest.skipped.push(skipped);
                }
            }
        }
        Ok(kept)
    }

    /// Encodes the loaded images of each bucket together (and their mirror images, when flips
    /// are cached) into `latents`.
    fn encode_batch(&self, kept: &[(usize, usize, ImageTensor)], latents: &mut BucketLatents) {
        let device = self.settings.device;
        let used: std::collections::BTreeSet<usize> = kept.iter().map(|k| k.1).collect();
        for bucket in used {
            let images: Vec<Tensor> = kept
                .iter()
                .filter(|k| k.1 == bucket)
                .map(|k| k.2.to_tensor())
                .collect();
            let images = Tensor::stack(&images, 0).to_device(device);
            for (flipped, mean, logvar) in [
                (false, "mean", "logvar"),
                (true, "flipped_mean", "flipped_logvar"),
            ] {
                if flipped && !self.settings.flip {
                    continue;
                }
                let input = match flipped {
                    true => images.flip([3]),
                    false => images.shallow_clone(),
                };
                let posterior = tch::no_grad(|| self.vae.encode(&input));
                let cpu = |t: Tensor| t.to_device(Device::Cpu).to_kind(Kind::Float);
                latents.push(bucket, mean, cpu(posterior.mean));
                latents.push(bucket, logvar, cpu(posterior.logvar));
            }
        }
    }

    /// Writes shard `k`'s file (removes it when no image of the shard loaded).
    fn write(&self, k: usize, latents: BucketLatents) -> Result<CacheFile> {
        let file = format!("latents-{k:05}.safetensors");
        let path = self.dir.join(&file);
        if latents.is_empty() {
            let _ = std::fs::remove_file(&path);
            return Ok(CacheFile {
                file,
                sha256: String::new(),
            });
        }
        save_tensors(&path, &latents.named(self.buckets), None)?;
        Ok(CacheFile {
            sha256: sha256_file(&path)?,
            file,
        })
    }
}
