//! What a training run reads from its latent cache (which [`crate::data::cache::prepare`] builds or
//! reuses): the seeded order of its samples in each epoch, and the batch of each forward pass.
//!
//! Every random draw is a function of (seed, position): what epoch `e` trains on (order, repeats,
//! caption variants, flips, one bucket per global batch) is drawn from (seed, `e`) by
//! [`crate::data::epochs`], and torch's generator is re-seeded from (seed, global sample
//! position) before each sample's latent sample, noise and timestep are drawn. A run resumed from
//! a checkpoint therefore repeats the uninterrupted run bit for bit (on the same device and thread
//! count), and a data-parallel run draws for each sample what one process with the whole global
//! batch draws: forward pass `f` covers global positions `f * G .. (f + 1) * G` (`G` = world ×
//! batch) and rank `r` takes `f * G + r * batch ..` of them.
use super::step::{Objective, StepInputs};
use crate::data::cache::LatentCache;
use crate::data::epochs::{Draw, EpochPlan};
use crate::model::conditioning::TextConditioning;
use anyhow::{ensure, Result};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The seed of the sample at global position `index` of a run seeded with `seed` (SplitMix64 of
/// both).
pub fn sample_seed(seed: u64, index: u64) -> i64 {
    let mut z = seed
        ^ index
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as i64 & i64::MAX
}

/// The seeded epochs of the cached samples (see [`crate::data::epochs`]), the current one kept.
struct DataOrder {
    plan: EpochPlan,
    epoch: usize,
    draws: Vec<Draw>,
}

impl DataOrder {
    fn new(plan: EpochPlan) -> Self {
        Self {
            draws: plan.epoch(0),
            plan,
            epoch: 0,
        }
    }

    /// What overall position `position` trains on (epochs back to back).
    fn draw(&mut self, position: usize) -> Draw {
        let epoch = position / self.draws.len();
        if epoch != self.epoch {
            self.draws = self.plan.epoch(epoch as u64);
            self.epoch = epoch;
        }
        self.draws[position % self.draws.len()]
    }
}

/// The cached latent distributions and captions of one forward pass, as read from the cache (on
/// the CPU, before any random draw): what a background prefetcher would hand over.
pub struct CachedBatch {
    /// The global position of each sample (its seed is derived from this).
    pub positions: Vec<usize>,
    mean: Tensor,
    logvar: Tensor,
    conditioning: TextConditioning,
}

impl CachedBatch {
    /// The batch in pinned (page-locked) host memory, whose copy to a CUDA device does not block
    /// the host (CUDA builds only: pinning needs the CUDA host allocator).
    pub fn pinned(self) -> Self {
        let pin = |t: Tensor| t.pin_memory(Device::Cuda(0));
        Self {
            positions: self.positions,
            mean: pin(self.mean),
            logvar: pin(self.logvar),
            conditioning: self.conditioning.map(|t| pin(t.shallow_clone())),
        }
    }
}

/// The latent cache of a run and the seeded order in which it is read.
pub struct Batches {
    cache: LatentCache,
    order: DataOrder,
    seed: u64,
    batch_size: usize,
    /// This process's rank and the number of ranks (its share of each global batch).
    rank: usize,
    world_size: usize,
    /// The VAE's latent scaling factor.
    scaling: f64,
}

impl Batches {
    /// Opens the cache in `dir`; each forward pass reads `batch_size` samples on each of
    /// `world_size` ranks, this one being `rank`.
    pub fn open(
        dir: &Path,
        seed: u64,
        (batch_size, rank, world_size): (usize, usize, usize),
        scaling: f64,
    ) -> Result<Self> {
        let cache = LatentCache::open(dir)?;
        ensure!(
            !cache.is_empty(),
            "the cache in {} holds no samples",
            dir.display()
        );
        ensure!(
            batch_size <= cache.len(),
            "batch_size {batch_size} is larger than the {} samples of the cache in {}: a batch would \
             hold a sample twice; lower the batch size",
            cache.len(),
            dir.display()
        );
        let plan = EpochPlan {
            samples: cache.plan_samples(),
            seed,
            dropout: cache.manifest.captions.dropout,
            flip: cache.manifest.key.flip,
            global_batch: batch_size * world_size,
        };
        Ok(Self {
            order: DataOrder::new(plan),
            cache,
            seed,
            batch_size,
            rank,
            world_size,
            scaling,
        })
    }

    pub fn cache(&self) -> &LatentCache {
        &self.cache
    }

    /// Samples per epoch: each cached sample its repeats times, and with buckets, each
    /// bucket's filled up to whole global batches.
    pub fn len(&self) -> usize {
        self.order.draws.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.draws.is_empty()
    }

    /// Reads this rank's share of the cached samples of global forward pass `forward_index`.
    pub fn read(&mut self, forward_index: usize) -> Result<CachedBatch> {
        let first = (forward_index * self.world_size + self.rank) * self.batch_size;
        let positions: Vec<usize> = (first..first + self.batch_size).collect();
        let draws: Vec<Draw> = positions.iter().map(|&p| self.order.draw(p)).collect();
        let (mean, logvar, conditioning) = self.cache.read(&draws)?;
        Ok(CachedBatch {
            positions,
            mean,
            logvar,
            conditioning,
        })
    }

    /// Draws `batch`'s latents, noise and timesteps on `device`, each sample's from torch's
    /// generator seeded by (seed, its global position).
    pub fn seeded_inputs(
        &self,
        batch: CachedBatch,
        objective: &Objective,
        device: Device,
    ) -> Result<StepInputs> {
        // Non-blocking: from pinned memory (see [`CachedBatch::pinned`]) the copy runs in order on
        // the device's stream without stalling the host; otherwise it is an ordinary copy.
        let to_device = |t: &Tensor| t.to_device_(device, t.kind(), true, false);
        let (mean, logvar) = (to_device(&batch.mean), to_device(&batch.logvar));
        let std = (logvar * 0.5).exp();
        let (mut latents, mut noise, mut timesteps) = (Vec::new(), Vec::new(), Vec::new());
        for (i, &position) in batch.positions.iter().enumerate() {
            tch::manual_seed(sample_seed(self.seed, position as u64));
            let (mean, std) = (mean.narrow(0, i as i64, 1), std.narrow(0, i as i64, 1));
            let latent = (&mean + std * mean.randn_like()) * self.scaling;
            let (n, t) = objective.draw(&latent)?;
            latents.push(latent);
            noise.push(n);
            timesteps.push(t);
        }
        Ok(StepInputs {
            latents: Tensor::cat(&latents, 0),
            conditioning: batch
                .conditioning
                .map(|t| to_device(t).to_kind(Kind::Float)),
            noise: Tensor::cat(&noise, 0),
            timesteps: Tensor::cat(&timesteps, 0),
        })
    }
}
