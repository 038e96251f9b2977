//! Kernel Inception Distance (Bińkowski et al. 2018) as torch-fidelity and clean-fid compute it:
//! the unbiased estimate of the squared MMD with the cubic polynomial kernel
//! k(x, y) = (x·y / d + 1)³, averaged over random subsets of both feature sets.
use anyhow::{bail, Result};
use faer::{Mat, MatRef};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// torch-fidelity's defaults.
pub const DEFAULT_SUBSETS: usize = 100;
pub const DEFAULT_SUBSET_SIZE: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Kid {
    /// Mean of the per-subset MMD² estimates.
    pub mean: f64,
    /// Their standard deviation (population, as torch-fidelity's `np.std`).
    pub std: f64,
    /// The subset size used: `min(subset_size, n_a, n_b)`.
    pub subset_size: usize,
}

/// KID between feature rows `a` `[n_a, d]` and `b` `[n_b, d]`: `subsets` draws of
/// `min(subset_size, n_a, n_b)` rows from each, without replacement, from a generator seeded with
/// `seed`. When that size is both whole sets every draw is the same, so it is computed once
/// (std 0).
pub fn kid(
    a: MatRef<'_, f64>,
    b: MatRef<'_, f64>,
    subsets: usize,
    subset_size: usize,
    seed: u64,
) -> Result<Kid> {
    if a.ncols() != b.ncols() {
        bail!(
            "KID of features with different dimensions ({} and {})",
            a.ncols(),
            b.ncols()
        );
    }
    if subsets == 0 {
        bail!("KID needs at least one subset");
    }
    let m = subset_size.min(a.nrows()).min(b.nrows());
    if m < 2 {
        bail!(
            "KID needs at least 2 images per set (got {} and {})",
            a.nrows(),
            b.nrows()
        );
    }
    if !a.is_all_finite() || !b.is_all_finite() {
        bail!("the Inception features contain NaN or infinite values");
    }
    let estimates: Vec<f64> = if m == a.nrows() && m == b.nrows() {
        vec![polynomial_mmd2_unbiased(a, b)]
    } else {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..subsets)
            .map(|_| {
                let x = rows(
                    a,
                    &rand::seq::index::sample(&mut rng, a.nrows(), m).into_vec(),
                );
                let y = rows(
                    b,
                    &rand::seq::index::sample(&mut rng, b.nrows(), m).into_vec(),
                );
                polynomial_mmd2_unbiased(x.as_ref(), y.as_ref())
            })
            .collect()
    };
    let count = estimates.len() as f64;
    let mean = estimates.iter().sum::<f64>() / count;
    let std = (estimates
        .iter()
        .map(|e| (e - mean) * (e - mean))
        .sum::<f64>()
        / count)
        .sqrt();
    if !mean.is_finite() || !std.is_finite() {
        bail!("KID came out as {mean} ± {std}");
    }
    Ok(Kid {
        mean,
        std,
        subset_size: m,
    })
}

/// The unbiased MMD² of two equal-size samples with k(x, y) = (x·y / d + 1)³: the kernel means
/// within each sample leave out the diagonal (m(m-1) pairs); the cross term keeps all m² pairs.
fn polynomial_mmd2_unbiased(x: MatRef<'_, f64>, y: MatRef<'_, f64>) -> f64 {
    let m = x.nrows() as f64;
    let d = x.ncols() as f64;
    let kernel_sum = |k: Mat<f64>, skip_diagonal: bool| -> f64 {
        let mut sum = 0.0;
        for j in 0..k.ncols() {
            for i in 0..k.nrows() {
                if !(skip_diagonal && i == j) {
                    sum += (k[(i, j)] / d + 1.0).powi(3);
                }
            }
        }
        sum
    };
    let within = kernel_sum(x * x.transpose(), true) + kernel_sum(y * y.transpose(), true);
    let cross = kernel_sum(x * y.transpose(), false);
    within / (m * (m - 1.0)) - 2.0 * cross / (m * m)
}

fn rows(features: MatRef<'_, f64>, indices: &[usize]) -> Mat<f64> {
    Mat::from_fn(indices.len(), features.ncols(), |i, j| {
        features[(indices[i], j)]
    })
}
