//! Aspect-ratio buckets, as kohya sd-scripts and SimpleTuner make them: sizes whose sides are
//! multiples of a step and whose area stays within the square resolution's pixel budget, each the
//! largest such size of its height. An image goes to the bucket nearest its aspect ratio (on a log
//! scale, so 2:1 and 1:2 are equally far from 1:1), is resized to cover it and centre-cropped.
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

/// A training size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Bucket {
    pub width: u32,
    pub height: u32,
}

impl Bucket {
    pub fn square(side: u32) -> Self {
        Self {
            width: side,
            height: side,
        }
    }

    /// `ln(width / height)`.
    fn log_aspect(self) -> f64 {
        (f64::from(self.width) / f64::from(self.height)).ln()
    }

    /// `WxH`, as tensor names in the cache use it.
    pub fn name(self) -> String {
        format!("{}x{}", self.width, self.height)
    }
}

/// The buckets for `resolution` (the pixel budget is `resolution²`) and `step`: sides from
/// `resolution / 2` (rounded down to the step, at least one step) to `2 × resolution`, so
/// aspect ratios up to 4:1; sorted from the tallest to the widest. With `resolution` 512 and step
/// 64: 256x1024, 320x768, 384x640, 448x576, 512x512 and their transposes.
pub fn buckets(resolution: u32, step: u32) -> Result<Vec<Bucket>> {
    ensure!(
        step > 0 && step.is_multiple_of(8) && step <= resolution,
        "bucket step {step} must be a positive multiple of 8 no larger than the resolution {resolution}"
    );
    let budget = u64::from(resolution) * u64::from(resolution);
    let min_side = (resolution / 2 / step * step).max(step);
    let max_side = 2 * resolution / step * step;
    // The widest bucket of each height: narrower ones of that height waste budget.
    let mut widest = std::collections::BTreeMap::new();
    for width in (min_side..=max_side).step_by(step as usize) {
        let height = ((budget / u64::from(width)) as u32 / step * step).min(max_side);
        if height >= min_side {
            widest.insert(height, width);
        }
    }
    let mut out: Vec<Bucket> = widest
        .into_iter()
        .map(|(height, width)| Bucket { width, height })
        .collect();
    out.sort_by(|a, b| a.log_aspect().total_cmp(&b.log_aspect()));
    Ok(out)
}

/// The index of the bucket whose aspect ratio is nearest a `width × height` image's (the first
/// of two equally near).
pub fn nearest(buckets: &[Bucket], width: u32, height: u32) -> usize {
    let aspect = (f64::from(width) / f64::from(height)).ln();
    let mut best = 0;
    for (i, bucket) in buckets.iter().enumerate() {
        if (bucket.log_aspect() - aspect).abs() < (buckets[best].log_aspect() - aspect).abs() {
            best = i;
        }
    }
    best
}
