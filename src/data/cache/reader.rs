//! Reading a complete cache in training: shards memory-mapped, prompt embeddings in memory, each
//! batch gathered from one bucket's rows.
use super::super::epochs::{CaptionChoice, Draw, PlanSample};
use super::manifest::{verify, CachedSample, Manifest};
use crate::data::images::mirrored;
use crate::model::conditioning::{AddedConditions, TextConditioning};
use crate::model::unet::UNetConfig;
use crate::model::weights::MappedSafetensors;
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// Where a cached sample's latents are.
struct Entry {
    shard: usize,
    /// Row in its shard's tensors of its bucket.
    row: usize,
    sample: CachedSample,
}

/// An opened, verified cache for training.
pub struct LatentCache {
    pub manifest: Manifest,
    shards: Vec<MappedSafetensors>,
    /// In manifest order.
    entries: Vec<Entry>,
    /// `[channels, height, width]` of each bucket's latents.
    shapes: BTreeMap<usize, Vec<usize>>,
    embeddings: Tensor,
    /// SDXL: the pooled embedding of each prompt.
    pooled: Option<Tensor>,
}

/// The name of a tensor of a shard file: `[flipped_]{mean,logvar}_WxH`.
fn tensor_name(manifest: &Manifest, kind: &str, bucket: usize, flipped: bool) -> String {
    let prefix = if flipped { "flipped_" } else { "" };
    format!("{prefix}{kind}_{}", manifest.buckets[bucket].name())
}

impl LatentCache {
    /// Opens a complete cache, verifying every file's checksum and every tensor's shape.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        ensure!(
            manifest.complete,
            "the cache in {} is incomplete (its build was interrupted)",
            dir.display()
        );
        let (embeddings, pooled) = read_embeddings(dir, &manifest)?;
        let mut cache = Self {
            manifest,
            shards: Vec::new(),
            entries: Vec::new(),
            shapes: BTreeMap::new(),
            embeddings,
            pooled,
        };
        let shards = cache.manifest.shards.clone();
        for shard in shards.iter().filter(|s| !s.samples.is_empty()) {
            verify(dir, &shard.file)?;
            let mapped = MappedSafetensors::open(&dir.join(&shard.file.file))?;
            let mut rows: BTreeMap<usize, usize> = BTreeMap::new();
            for sample in &shard.samples {
                cache.check_sample(sample)?;
                let row = rows.entry(sample.bucket).or_default();
                cache.entries.push(Entry {
                    shard: cache.shards.len(),
                    row: *row,
                    sample: sample.clone(),
                });
                *row += 1;
            }
            for (bucket, count) in rows {
                cache.check_tensors(&mapped, &shard.file.file, bucket, count)?;
            }
            cache.shards.push(mapped);
        }
        Ok(cache)
    }

    fn check_sample(&self, sample: &CachedSample) -> Result<()> {
        let prompts = self.manifest.prompts.len();
        ensure!(
            sample.bucket < self.manifest.buckets.len()
                && !sample.prompts.is_empty()
                && sample.prompts.iter().all(|&p| p < prompts),
            "the cache manifest's entry for {} names a bucket or prompt it does not have",
            sample.id
        );
        ensure!(
            sample.size.is_some() == self.pooled.is_some(),
            "the cache manifest's entry for {} {} size and crop conditions, its prompts {} pooled \
             embeddings: build the cache again",
            sample.id,
            if sample.size.is_some() {
                "has"
            } else {
                "lacks"
            },
            if self.pooled.is_some() {
                "have"
            } else {
                "lack"
            },
        );
        Ok(())
    }

    /// Checks that `file` holds `count` f32 rows of `bucket` in each of its tensors, of one
    /// shape over all shards.
    fn check_tensors(
        &mut self,
        mapped: &MappedSafetensors,
        file: &str,
        bucket: usize,
        count: usize,
    ) -> Result<()> {
        let flips: &[bool] = match self.manifest.key.flip {
            true => &[false, true],
            false => &[false],
        };
        for &flipped in flips {
            for kind in ["mean", "logvar"] {
                let name = tensor_name(&self.manifest, kind, bucket, flipped);
                let view = mapped
                    .tensors()
                    .tensor(&name)
                    .with_context(|| format!("{file}: no `{name}`"))?;
                let shape = view.shape();
                let expected = self
                    .shapes
                    .entry(bucket)
                    .or_insert_with(|| shape[1..].to_vec());
                ensure!(
                    shape.len() == 4
                        && shape[0] == count
                        && shape[1..] == expected[..]
                        && view.dtype() == safetensors::Dtype::F32,
                    "{file}: `{name}` is {:?} {shape:?}, expected F32 with {count} rows of {expected:?}",
                    view.dtype(),
                );
            }
        }
        Ok(())
    }

    /// Checks that a U-Net of `config` takes this cache's conditioning: its context width and,
    /// exactly for SDXL's added embedding, pooled embeddings of its width (a cache of another
    /// model family, used without its dataset, is refused here rather than mid-step).
    pub fn check_fits(&self, config: &UNetConfig) -> Result<()> {
        let width = self.embeddings.size().last().copied().unwrap_or(0);
        ensure!(
            width == config.cross_attention_dim,
            "the cache's prompt embeddings are {width} wide, the U-Net cross-attends to {}: the \
             cache was made with another model's text encoder",
            config.cross_attention_dim
        );
        let pooled = self.pooled.as_ref().map(|p| p.size()[1]);
        let expected = config.added_embedding()?.map(|a| a.text_embeds_dim());
        ensure!(
            pooled == expected,
            "the cache holds {} pooled text embeddings, the U-Net's added embedding takes {}: \
             the cache was made for another model family",
            pooled.map_or("no".to_string(), |w| format!("{w}-wide")),
            expected.map_or("none".to_string(), |w| format!("{w}-wide ones")),
        );
        Ok(())
    }

    /// Cached samples.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What the epochs need of each cached sample.
    pub fn plan_samples(&self) -> Vec<PlanSample> {
        self.entries
            .iter()
            .map(|e| PlanSample {
                bucket: e.sample.bucket,
                repeats: e.sample.repeats,
                variants: e.sample.prompts.len(),
            })
            .collect()
    }

    /// The cached sample `index`.
    pub fn sample(&self, index: usize) -> Option<&CachedSample> {
        self.entries.get(index).map(|e| &e.sample)
    }

    /// [`LatentCache::read`] of samples `indices`, unflipped, each with its caption as written.
    pub fn batch(&self, indices: &[usize]) -> Result<(Tensor, Tensor, TextConditioning)> {
        let draws: Vec<Draw> = indices
            .iter()
            .map(|&sample| Draw {
                sample,
                caption: CaptionChoice::Variant(0),
                flipped: false,
            })
            .collect();
        self.read(&draws)
    }

    /// Posterior mean and log-variance `[b, c, h, w]` and the U-Net's conditioning of `draws`
    /// (all of one bucket), on the CPU: the caption embeddings `[b, seq, dim]` and, from an SDXL
    /// cache, the pooled embeddings and each image's size and crop conditions (a flipped
    /// latent's crop [`mirrored`]).
    pub fn read(&self, draws: &[Draw]) -> Result<(Tensor, Tensor, TextConditioning)> {
        let entries = draws
            .iter()
            .map(|d| {
                self.entries
                    .get(d.sample)
                    .with_context(|| format!("cached sample {} out of range", d.sample))
            })
            .collect::<Result<Vec<&Entry>>>()?;
        let Some(bucket) = entries.first().map(|e| e.sample.bucket) else {
            bail!("an empty batch");
        };
        ensure!(
            entries.iter().all(|e| e.sample.bucket == bucket),
            "a batch mixes aspect-ratio buckets"
        );
        let shape = &self.shapes[&bucket];
        let row_len: usize = shape.iter().product();
        let mut dims = vec![draws.len() as i64];
        dims.extend(shape.iter().map(|&d| d as i64));
        let gather = |kind: &str| -> Result<Tensor> {
            let mut bytes = Vec::with_capacity(draws.len() * row_len * 4);
            for (draw, entry) in draws.iter().zip(&entries) {
                let name = tensor_name(&self.manifest, kind, bucket, draw.flipped);
                let view = self.shards[entry.shard].tensors().tensor(&name)?;
                let row = entry.row;
                bytes.extend_from_slice(&view.data()[row * row_len * 4..(row + 1) * row_len * 4]);
            }
            Ok(Tensor::f_from_data_size(&bytes, &dims, Kind::Float)?)
        };
        let prompt_ids = draws
            .iter()
            .zip(&entries)
            .map(|(draw, entry)| self.prompt_of(draw.caption, &entry.sample))
            .collect::<Result<Vec<i64>>>()?;
        let prompt_ids = Tensor::from_slice(&prompt_ids);
        let added = match &self.pooled {
            None => None,
            Some(pooled) => Some(AddedConditions {
                text_embeds: pooled.index_select(0, &prompt_ids),
                time_ids: time_ids(draws, &entries)?,
            }),
        };
        let conditioning = TextConditioning {
            context: self.embeddings.index_select(0, &prompt_ids),
            added,
        };
        Ok((gather("mean")?, gather("logvar")?, conditioning))
    }

    fn prompt_of(&self, caption: CaptionChoice, sample: &CachedSample) -> Result<i64> {
        let index = match caption {
            CaptionChoice::Dropped => self
                .manifest
                .dropped_prompt
                .context("caption dropout with a cache that has no empty prompt")?,
            CaptionChoice::Variant(k) => *sample
                .prompts
                .get(k)
                .with_context(|| format!("{} has no caption variant {k}", sample.id))?,
        };
        Ok(index as i64)
    }
}

/// `[b, 6]` f32 time ids of `draws`: each cached image's size and crop conditions.
fn time_ids(draws: &[Draw], entries: &[&Entry]) -> Result<Tensor> {
    let mut values = Vec::with_capacity(draws.len() * 6);
    for (draw, entry) in draws.iter().zip(entries) {
        let size = entry
            .sample
            .size
            .with_context(|| format!("{} has no size conditions", entry.sample.id))?;
        let size = match draw.flipped {
            true => mirrored(&size),
            false => size,
        };
        values.extend(size.values());
    }
    Ok(Tensor::from_slice(&values).view([draws.len() as i64, 6]))
}

/// The prompt embeddings `[prompts, seq, dim]` of a cache and, in an SDXL cache, the pooled
/// embeddings `[prompts, projection_dim]`, verified.
fn read_embeddings(dir: &Path, manifest: &Manifest) -> Result<(Tensor, Option<Tensor>)> {
    let file = manifest
        .prompt_embeddings
        .as_ref()
        .context("the cache has no prompt embeddings")?;
    verify(dir, file)?;
    let mut tensors = crate::model::weights::read_all(&dir.join(&file.file))?;
    let embeddings = tensors
        .remove(super::EMBEDDINGS)
        .with_context(|| format!("{} has no `{}`", file.file, super::EMBEDDINGS))?;
    let pooled = tensors.remove(super::POOLED);
    let prompts = manifest.prompts.len() as i64;
    for (name, rows) in std::iter::once((super::EMBEDDINGS, &embeddings))
        .chain(pooled.as_ref().map(|p| (super::POOLED, p)))
    {
        ensure!(
            rows.size()[0] == prompts,
            "{} holds {} prompt `{name}` rows for {prompts} prompts",
            file.file,
            rows.size()[0],
        );
    }
    Ok((embeddings, pooled))
}
