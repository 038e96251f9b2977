//! The Fréchet distance between two Gaussians, the FID of pytorch-fid's
//! `calculate_frechet_distance`:
//!
//!   d² = ||mu1 - mu2||² + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)).
//!
//! pytorch-fid takes a general matrix square root of the non-symmetric S1 S2 (scipy's `sqrtm`),
//! which can come out complex and needs an epsilon retry when the product is singular. The trace
//! only needs the eigenvalues: S1 S2 is similar to the symmetric positive semi-definite
//! S1^½ S2 S1^½, so tr(sqrt(S1 S2)) is the sum of the square roots of that matrix's eigenvalues,
//! computed here with two symmetric eigendecompositions (faer), always real.
use super::stats::Statistics;
use anyhow::{anyhow, bail, Result};
use faer::{Mat, MatRef, Side};

/// Eigenvalues of a covariance-like matrix below zero by at most this fraction of its largest
/// eigenvalue are rounding noise and are clamped to zero. A float64 sample covariance shows
/// ~1e-16 of it; one stored in float32 ~1e-7. Anything more negative means the matrix is not a
/// covariance and is an error, where pytorch-fid would get a complex square root.
pub const NEGATIVE_EIGENVALUE_TOLERANCE: f64 = 1e-6;

/// FID between two feature distributions' statistics.
pub fn frechet_distance(a: &Statistics, b: &Statistics) -> Result<f64> {
    if a.dims() != b.dims() || a.sigma.nrows() != b.sigma.nrows() {
        bail!(
            "the two statistics have different dimensions ({} and {})",
            a.dims(),
            b.dims()
        );
    }
    for (stats, name) in [(a, "first"), (b, "second")] {
        if !stats.mu.iter().all(|v| v.is_finite()) || !stats.sigma.is_all_finite() {
            bail!("the {name} statistics contain NaN or infinite values");
        }
        check_symmetric(stats.sigma.as_ref(), name)?;
    }
    let mean_term: f64 = a.mu.iter().zip(&b.mu).map(|(x, y)| (x - y) * (x - y)).sum();
    let traces = trace(a.sigma.as_ref()) + trace(b.sigma.as_ref());
    let fid = mean_term + traces - 2.0 * trace_sqrt_product(a.sigma.as_ref(), b.sigma.as_ref())?;
    if !fid.is_finite() {
        bail!("the Fréchet distance came out as {fid}");
    }
    Ok(fid)
}

/// tr(sqrt(S1 S2)) for symmetric positive semi-definite S1, S2: the sum of the square roots of
/// the eigenvalues of S1^½ S2 S1^½.
pub fn trace_sqrt_product(s1: MatRef<'_, f64>, s2: MatRef<'_, f64>) -> Result<f64> {
    let (vectors, values) = psd_eigen(s1, "the first covariance")?;
    let n = values.len();
    let scaled = Mat::from_fn(n, n, |i, j| vectors[(i, j)] * values[j].sqrt());
    let s1_half = &scaled * vectors.transpose();
    let product = &s1_half * s2 * &s1_half;
    let (_, values) = psd_eigen(product.as_ref(), "S1^1/2 S2 S1^1/2 (the second covariance)")?;
    Ok(values.iter().map(|v| v.sqrt()).sum())
}

/// A warning when `n` samples cannot give a full-rank covariance of `dims` features.
pub fn small_sample_warning(n: usize, dims: usize) -> Option<String> {
    (n < dims).then(|| {
        format!(
            "only {n} images for {dims}-dimensional features: the covariance is rank-deficient and FID is strongly \
             biased at this N (compare FIDs only at equal N, or use more images / smaller --dims)"
        )
    })
}

fn trace(m: MatRef<'_, f64>) -> f64 {
    (0..m.nrows()).map(|i| m[(i, i)]).sum()
}

fn check_symmetric(m: MatRef<'_, f64>, name: &str) -> Result<()> {
    let n = m.nrows();
    if m.ncols() != n {
        bail!("the {name} covariance is not square ({}x{})", n, m.ncols());
    }
    let largest = (0..n)
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .map(|(i, j)| m[(i, j)].abs())
        .fold(0.0, f64::max);
    let asymmetry = (0..n)
        .flat_map(|i| (0..i).map(move |j| (i, j)))
        .map(|(i, j)| (m[(i, j)] - m[(j, i)]).abs())
        .fold(0.0, f64::max);
    if asymmetry > NEGATIVE_EIGENVALUE_TOLERANCE * largest {
        bail!("the {name} covariance is not symmetric (asymmetry {asymmetry:e}, largest entry {largest:e})");
    }
    Ok(())
}

/// Eigenvectors (columns) and eigenvalues of a symmetric positive semi-definite matrix (its lower
/// triangle is read), with rounding-noise negative eigenvalues clamped to zero.
fn psd_eigen(m: MatRef<'_, f64>, what: &str) -> Result<(Mat<f64>, Vec<f64>)> {
    let eigen = m
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| anyhow!("eigendecomposition of {what} failed: {e:?}"))?;
    let raw: Vec<f64> = eigen.S().column_vector().iter().copied().collect();
    let largest = raw.iter().fold(0.0_f64, |acc, v| acc.max(v.abs()));
    let mut values = Vec::with_capacity(raw.len());
    for v in raw {
        if !v.is_finite() || v < -NEGATIVE_EIGENVALUE_TOLERANCE * largest {
            bail!("{what} is not positive semi-definite: eigenvalue {v:e} (largest {largest:e})");
        }
        values.push(v.max(0.0));
    }
    Ok((eigen.U().to_owned(), values))
}
