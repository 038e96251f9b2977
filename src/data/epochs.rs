//! What each epoch trains on: every cached sample `repeats` times (kohya's `N_name` folders), in a
//! seeded order, each appearance with its caption (one of the cached variants, or the empty prompt
//! by dropout) and, with random flip, the flipped latent or not.
//!
//! Every draw is a function of (seed, epoch): the order is a permutation drawn from ChaCha8
//! stream `epoch` of `seed`, and the caption and flip of each appearance (in listing order) from
//! stream `epoch` of a second generator, so turning captions or flips on leaves the order as it
//! was. With more than one aspect-ratio bucket in use, the order is drawn per bucket and cut into
//! chunks of one global batch (the last chunk of a bucket filled up from that bucket's start),
//! and the chunks are shuffled: every forward pass of every rank reads one bucket, and an epoch is
//! a whole number of global batches.
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Which caption an appearance trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptionChoice {
    /// The empty prompt (caption dropout).
    Dropped,
    /// The sample's cached caption variant `k` (0 is the caption as written).
    Variant(usize),
}

/// One appearance of a cached sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draw {
    pub sample: usize,
    pub caption: CaptionChoice,
    pub flipped: bool,
}

/// What the order needs to know of a cached sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanSample {
    pub bucket: usize,
    pub repeats: usize,
    /// Cached caption variants.
    pub variants: usize,
}

/// The seeded epochs of a run.
#[derive(Debug, Clone)]
pub struct EpochPlan {
    pub samples: Vec<PlanSample>,
    pub seed: u64,
    pub dropout: f64,
    pub flip: bool,
    /// Samples per global forward pass (ranks × batch size).
    pub global_batch: usize,
}

/// Salt of the caption and flip generator's seed, so it differs from the order's.
const CHOICE_SALT: u64 = 0x6361_7074_696f_6e73;

impl EpochPlan {
    fn bucketed(&self) -> bool {
        self.samples
            .iter()
            .any(|s| s.bucket != self.samples[0].bucket)
    }

    /// Appearances per epoch.
    pub fn len(&self) -> usize {
        let appearances = self.appearances_per_bucket();
        match self.bucketed() {
            false => appearances.iter().sum(),
            true => appearances
                .iter()
                .map(|n| n.div_ceil(self.global_batch) * self.global_batch)
                .sum(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn appearances_per_bucket(&self) -> Vec<usize> {
        let buckets = self.samples.iter().map(|s| s.bucket + 1).max().unwrap_or(0);
        let mut counts = vec![0; buckets];
        for s in &self.samples {
            counts[s.bucket] += s.repeats;
        }
        counts
    }

    /// Epoch `epoch`'s appearances, in training order.
    pub fn epoch(&self, epoch: u64) -> Vec<Draw> {
        let draws = self.choices(epoch);
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(epoch);
        let mut order: Vec<usize> = (0..draws.len()).collect();
        if !self.bucketed() {
            order.shuffle(&mut rng);
        } else {
            order = self.bucket_chunks(&draws, &mut rng);
        }
        order.into_iter().map(|i| draws[i]).collect()
    }

    /// Every appearance (samples in order, each `repeats` times) with its caption and flip.
    fn choices(&self, epoch: u64) -> Vec<Draw> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ CHOICE_SALT);
        rng.set_stream(epoch);
        let mut out = Vec::new();
        for (sample, s) in self.samples.iter().enumerate() {
            for _ in 0..s.repeats {
                // Every draw is always made, so one setting does not shift the others' draws.
                let dropped = rng.random_bool(self.dropout.clamp(0.0, 1.0));
                let variant = rng.random_range(0..s.variants.max(1));
                let flipped = rng.random_bool(0.5) && self.flip;
                let caption = match dropped {
                    true => CaptionChoice::Dropped,
                    false => CaptionChoice::Variant(variant),
                };
                out.push(Draw {
                    sample,
                    caption,
                    flipped,
                });
            }
        }
        out
    }

    /// Positions of `draws` shuffled within each bucket, cut into global batches (the last one
    /// filled from the bucket's start), the batches shuffled.
    fn bucket_chunks(&self, draws: &[Draw], rng: &mut ChaCha8Rng) -> Vec<usize> {
        let g = self.global_batch;
        let mut chunks: Vec<Vec<usize>> = Vec::new();
        for bucket in 0..self.appearances_per_bucket().len() {
            let mut members: Vec<usize> = (0..draws.len())
                .filter(|&i| self.samples[draws[i].sample].bucket == bucket)
                .collect();
            if members.is_empty() {
                continue;
            }
            members.shuffle(rng);
            let padded = members.len().div_ceil(g) * g;
            let filled: Vec<usize> = members.iter().cycle().take(padded).copied().collect();
            chunks.extend(filled.chunks(g).map(<[usize]>::to_vec));
        }
        chunks.shuffle(rng);
        chunks.concat()
    }
}
