//! Caption options, as kohya sd-scripts has them: dropout to the empty prompt, and shuffling of
//! comma-separated tags with the first K kept in place.
//!
//! Training reads caption embeddings from the latent cache, so every caption a sample can train
//! on is encoded up front: its caption as written, plus `variants - 1` shuffles of its tags
//! (seeded by the sample's id, so a cache is the same whatever the training seed), plus the empty
//! prompt when dropout is on. Which of them an appearance of the sample trains on is drawn per
//! (seed, epoch, appearance) by [`super::epochs`].
use anyhow::{ensure, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionOptions {
    /// Probability of training on the empty prompt instead of the caption.
    pub dropout: f64,
    /// Shuffle the comma-separated tags.
    pub shuffle: bool,
    /// Tags at the front kept in place when shuffling (kohya's `keep_tokens`).
    pub keep_first: usize,
    /// Captions cached per sample when shuffling: the one as written and `variants - 1` shuffles.
    pub variants: usize,
}

impl Default for CaptionOptions {
    fn default() -> Self {
        Self {
            dropout: 0.0,
            shuffle: false,
            keep_first: 0,
            variants: 4,
        }
    }
}

impl CaptionOptions {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (0.0..=1.0).contains(&self.dropout),
            "caption dropout must be in [0, 1], got {}",
            self.dropout
        );
        ensure!(self.variants > 0, "caption variants must be positive");
        Ok(())
    }

    /// The captions cached for a sample `id` captioned `caption`: the caption as written, then
    /// (when shuffling) `variants - 1` seeded shuffles of its tags after the first `keep_first`.
    pub fn variants(&self, caption: &str, id: &str) -> Vec<String> {
        let mut out = vec![caption.to_string()];
        if !self.shuffle {
            return out;
        }
        let mut rng = ChaCha8Rng::from_seed(Sha256::digest(id.as_bytes()).into());
        let mut tags: Vec<&str> = caption
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        let keep = self.keep_first.min(tags.len());
        for _ in 1..self.variants {
            tags[keep..].shuffle(&mut rng);
            out.push(tags.join(", "));
        }
        out
    }
}
