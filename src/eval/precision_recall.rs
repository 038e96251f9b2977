//! Precision and recall of a generated image set against a reference set (Kynkäänniemi et al.
//! 2019, *Improved Precision and Recall Metric for Assessing Generative Models*), on the same
//! Inception features as FID. Each set's manifold is estimated as the union of balls around its
//! feature vectors, each ball's radius the distance to that vector's k-th nearest neighbour in its
//! own set (k = 3 in the paper). Precision is the share of generated vectors inside the reference
//! manifold (are the images realistic?), recall the share of reference vectors inside the
//! generated manifold (is the variety covered?). A vector lies inside when its distance to some
//! ball's centre is at most that ball's radius, as in the paper's reference code.
//!
//! FID and KID fold both into one number; these two say which one a method lacks.
use anyhow::{bail, Result};
use faer::{Mat, MatRef};
use serde::{Deserialize, Serialize};

/// The paper's neighbourhood size.
pub const DEFAULT_K: usize = 3;

/// Rows per block of the pairwise distances (a block is `BLOCK x n` distances in memory).
const BLOCK: usize = 1024;

/// Precision and recall of one generated set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrecisionRecall {
    pub precision: f64,
    pub recall: f64,
}

/// Each row's distance to its `k`-th nearest other row of `features` (rows are images): the
/// radii of a set's manifold estimate.
pub fn knn_radii(features: MatRef<'_, f64>, k: usize) -> Result<Vec<f64>> {
    let n = features.nrows();
    if k == 0 {
        bail!("precision and recall need k of at least 1");
    }
    if n <= k {
        bail!("a manifold with k = {k} needs more than {k} images, got {n}");
    }
    if !features.is_all_finite() {
        bail!("the Inception features contain NaN or infinite values");
    }
    let mut radii = Vec::with_capacity(n);
    for_each_block(features, features, |_, block| {
        for row in block {
            let mut distances = row.clone();
            // The row's own distance (0) is the first of the k + 1 smallest.
            let (_, kth, _) = distances.select_nth_unstable_by(k, f64::total_cmp);
            radii.push(*kth);
        }
    });
    Ok(radii)
}

/// The share of `points`' rows inside the manifold of `centres` with `radii`: within a radius of
/// some centre.
pub fn share_inside(centres: MatRef<'_, f64>, radii: &[f64], points: MatRef<'_, f64>) -> f64 {
    if points.nrows() == 0 {
        return 0.0;
    }
    let mut inside = vec![false; points.nrows()];
    for_each_block(centres, points, |first, block| {
        for (i, row) in block.iter().enumerate() {
            let radius = radii[first + i];
            for (j, &d) in row.iter().enumerate() {
                inside[j] |= d <= radius;
            }
        }
    });
    inside.iter().filter(|&&b| b).count() as f64 / points.nrows() as f64
}

/// Precision and recall of `generated` against `reference` (rows are images) with `k`-NN radii.
pub fn precision_recall(
    reference: MatRef<'_, f64>,
    generated: MatRef<'_, f64>,
    k: usize,
) -> Result<PrecisionRecall> {
    precision_recall_with(reference, &knn_radii(reference, k)?, generated, k)
}

/// [`precision_recall`] with the reference's radii computed once (they cost a pass over all
/// pairs of reference images).
pub fn precision_recall_with(
    reference: MatRef<'_, f64>,
    reference_radii: &[f64],
    generated: MatRef<'_, f64>,
    k: usize,
) -> Result<PrecisionRecall> {
    if reference.ncols() != generated.ncols() {
        bail!(
            "precision and recall of features with different dimensions ({} and {})",
            reference.ncols(),
            generated.ncols()
        );
    }
    if reference_radii.len() != reference.nrows() {
        bail!(
            "{} radii for {} reference images",
            reference_radii.len(),
            reference.nrows()
        );
    }
    let generated_radii = knn_radii(generated, k)?;
    Ok(PrecisionRecall {
        precision: share_inside(reference, reference_radii, generated),
        recall: share_inside(generated, &generated_radii, reference),
    })
}

/// Calls `f(first_row, distances)` for blocks of `a`'s rows, `distances[i][j]` the Euclidean
/// distance between row `first_row + i` of `a` and row `j` of `b`.
fn for_each_block(a: MatRef<'_, f64>, b: MatRef<'_, f64>, mut f: impl FnMut(usize, &[Vec<f64>])) {
    let b_norms: Vec<f64> = (0..b.nrows()).map(|j| b.row(j).squared_norm_l2()).collect();
    let mut first = 0;
    while first < a.nrows() {
        let rows = BLOCK.min(a.nrows() - first);
        let block = a.subrows(first, rows);
        let gram: Mat<f64> = block * b.transpose();
        let distances: Vec<Vec<f64>> = (0..rows)
            .map(|i| {
                let a_norm = block.row(i).squared_norm_l2();
                (0..b.nrows())
                    .map(|j| (a_norm + b_norms[j] - 2.0 * gram[(i, j)]).max(0.0).sqrt())
                    .collect()
            })
            .collect();
        f(first, &distances);
        first += rows;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(rows: &[[f64; 2]]) -> Mat<f64> {
        Mat::from_fn(rows.len(), 2, |i, j| rows[i][j])
    }

    /// Against prdc 0.2's `compute_prdc` (tools/make_precision_recall_fixtures.py): the same
    /// shares, exactly (they are counts over at most 100 vectors).
    #[test]
    fn matches_the_reference_implementation() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/precision_recall/cases.json");
        let fixture: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let matrix = |rows: &serde_json::Value| {
            let rows: Vec<Vec<f64>> = serde_json::from_value(rows.clone()).unwrap();
            Mat::from_fn(rows.len(), rows[0].len(), |i, j| rows[i][j])
        };
        let cases = fixture["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 4);
        for case in cases {
            let (reference, generated) = (matrix(&case["reference"]), matrix(&case["generated"]));
            let k = case["k"].as_u64().unwrap() as usize;
            let pr = precision_recall(reference.as_ref(), generated.as_ref(), k).unwrap();
            let name = &case["name"];
            assert_eq!(pr.precision, case["precision"].as_f64().unwrap(), "{name}");
            assert_eq!(pr.recall, case["recall"].as_f64().unwrap(), "{name}");
        }
    }

    #[test]
    fn a_set_against_itself_is_fully_precise_and_covered() {
        let a = points(&[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]]);
        let pr = precision_recall(a.as_ref(), a.as_ref(), 2).unwrap();
        assert_eq!((pr.precision, pr.recall), (1.0, 1.0));
    }

    #[test]
    fn a_far_cluster_is_neither_precise_nor_covering() {
        let reference = points(&[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]);
        // Two generated points near the reference, two far away.
        let generated = points(&[[0.1, 0.1], [0.9, 0.9], [10.0, 10.0], [11.0, 10.0]]);
        let pr = precision_recall(reference.as_ref(), generated.as_ref(), 1).unwrap();
        assert_eq!(pr.precision, 0.5);
        // The generated near points' radius-1 balls (distance to their nearest other generated
        // point: about 1.13) reach every reference corner.
        assert_eq!(pr.recall, 1.0);
        assert!(precision_recall(reference.as_ref(), generated.as_ref(), 4).is_err());
    }
}
