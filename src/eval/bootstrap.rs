//! Uncertainty of FID and KID by the bootstrap: both feature sets are resampled with replacement
//! (to their own sizes) from a seeded generator, the score is recomputed on every resample, and the
//! spread of those scores is the uncertainty of the score computed on the sets themselves.
//!
//! A resampled set holds duplicates (about 37% of its rows), which inflates both FID and KID, so
//! the resampled values are used only for their spread: the reported interval is the 2.5–97.5
//! percentile range of the resampled scores shifted so that their mean sits on the full-set value.
//!
//! The draws depend only on the two set sizes, the number of resamples and the seed. Scores of
//! several generated sets of the same size against the same reference therefore use the same
//! draws, position for position, which pairs them: the spread of the difference of two such scores
//! over the resamples is the uncertainty of the difference, with the reference's own noise
//! cancelled ([`difference`]).
//!
//! Several training runs per method add a level above the images: [`over_runs`] is the
//! hierarchical bootstrap of a method's mean over its runs (the runs resampled with replacement,
//! then each drawn run's image-level resample), so its interval covers the run-to-run spread as
//! well as the finite image sets; [`paired_over_runs`] resamples the same run indices for both
//! methods of a difference (runs are paired by index: run r of every method trains with the same
//! seed).
use super::{frechet_distance, kid, Kid, Statistics};
use anyhow::{bail, Result};
use faer::{Mat, MatRef};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Resamples when nothing else is asked for.
pub const DEFAULT_RESAMPLES: usize = 100;

/// How the resamples are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bootstrap {
    pub resamples: usize,
    pub seed: u64,
}

/// A score with its bootstrap uncertainty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// The score of the sets themselves.
    pub value: f64,
    /// Standard deviation of the resampled scores.
    pub std: f64,
    /// The 95% interval: percentiles of the resampled scores, recentred on `value`.
    pub low: f64,
    pub high: f64,
    /// Every resampled score, in draw order (for paired differences).
    pub resamples: Vec<f64>,
}

/// The index draws of every resample: rows of the reference set and of the generated set.
struct Draws {
    reference: Vec<Vec<usize>>,
    generated: Vec<Vec<usize>>,
}

impl Bootstrap {
    fn draws(&self, n_reference: usize, n_generated: usize) -> Result<Draws> {
        if self.resamples < 2 {
            bail!(
                "the bootstrap needs at least 2 resamples, got {}",
                self.resamples
            );
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let mut reference = Vec::with_capacity(self.resamples);
        let mut generated = Vec::with_capacity(self.resamples);
        for _ in 0..self.resamples {
            reference.push(draw(&mut rng, n_reference));
            generated.push(draw(&mut rng, n_generated));
        }
        Ok(Draws {
            reference,
            generated,
        })
    }

    /// FID of `generated` against `reference` (feature rows), with its uncertainty.
    pub fn fid(&self, reference: MatRef<'_, f64>, generated: MatRef<'_, f64>) -> Result<Estimate> {
        let value = frechet_distance(
            &Statistics::from_features(reference)?,
            &Statistics::from_features(generated)?,
        )?;
        self.estimate(value, reference, generated, |r, g| {
            frechet_distance(
                &Statistics::from_features(r.as_ref())?,
                &Statistics::from_features(g.as_ref())?,
            )
        })
    }

    /// KID as [`kid`] computes it (with `subsets` of `subset_size` drawn with `subset_seed`) of
    /// `generated` against `reference`, and its uncertainty. Resample `i` draws its subsets with
    /// seed `subset_seed + 1 + i`.
    pub fn kid(
        &self,
        reference: MatRef<'_, f64>,
        generated: MatRef<'_, f64>,
        subsets: usize,
        subset_size: usize,
        subset_seed: u64,
    ) -> Result<(Kid, Estimate)> {
        let full = kid(generated, reference, subsets, subset_size, subset_seed)?;
        let estimate = self.estimate_indexed(full.mean, reference, generated, |i, r, g| {
            let seed = subset_seed.wrapping_add(1 + i as u64);
            Ok(kid(g.as_ref(), r.as_ref(), subsets, subset_size, seed)?.mean)
        })?;
        Ok((full, estimate))
    }

    fn estimate(
        &self,
        value: f64,
        reference: MatRef<'_, f64>,
        generated: MatRef<'_, f64>,
        score: impl Fn(&Mat<f64>, &Mat<f64>) -> Result<f64> + Sync,
    ) -> Result<Estimate> {
        self.estimate_indexed(value, reference, generated, |_, r, g| score(r, g))
    }

    fn estimate_indexed(
        &self,
        value: f64,
        reference: MatRef<'_, f64>,
        generated: MatRef<'_, f64>,
        score: impl Fn(usize, &Mat<f64>, &Mat<f64>) -> Result<f64> + Sync,
    ) -> Result<Estimate> {
        let draws = self.draws(reference.nrows(), generated.nrows())?;
        // Each resample is independent and collected in draw order, so the thread count does not
        // change the result.
        let resamples: Vec<f64> = (0..self.resamples)
            .into_par_iter()
            .map(|i| {
                score(
                    i,
                    &rows(reference, &draws.reference[i]),
                    &rows(generated, &draws.generated[i]),
                )
            })
            .collect::<Result<_>>()?;
        Ok(Estimate::from_resamples(value, resamples))
    }
}

impl Estimate {
    fn from_resamples(value: f64, resamples: Vec<f64>) -> Self {
        let (mean, std) = mean_std(&resamples);
        let shift = value - mean;
        let (low, high) = crate::util::stats::interval_95(&resamples);
        Self {
            value,
            std,
            low: low + shift,
            high: high + shift,
            resamples,
        }
    }
}

/// The difference `a - b` of two estimates made with the same draws, and its uncertainty.
pub fn difference(a: &Estimate, b: &Estimate) -> Result<Estimate> {
    if a.resamples.len() != b.resamples.len() {
        bail!(
            "paired differences need the same resamples ({} and {})",
            a.resamples.len(),
            b.resamples.len()
        );
    }
    let resamples = a.resamples.iter().zip(&b.resamples).map(|(x, y)| x - y);
    Ok(Estimate::from_resamples(
        a.value - b.value,
        resamples.collect(),
    ))
}

impl Estimate {
    /// Whether the 95% interval holds zero: the sign of the value is not established.
    pub fn includes_zero(&self) -> bool {
        self.low <= 0.0 && self.high >= 0.0
    }
}

impl Estimate {
    /// A score known without image-level uncertainty (one that is not bootstrapped over images),
    /// as `resamples` copies of itself, so that it takes part in [`over_runs`] with its run-to-run
    /// spread alone.
    pub fn exact(value: f64, resamples: usize) -> Self {
        Self::from_resamples(value, vec![value; resamples])
    }
}

/// The run indices of every hierarchical resample: `resamples` draws of `runs` indices with
/// replacement, from their own stream of the bootstrap's seed. The same draws serve every method,
/// which pairs them by run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunDraws {
    runs: usize,
    indices: Vec<Vec<usize>>,
}

impl RunDraws {
    pub fn new(runs: usize, bootstrap: &Bootstrap) -> Result<Self> {
        if runs == 0 {
            bail!("a mean over runs needs at least one run");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(bootstrap.seed);
        // Stream 0 draws the images' indices.
        rng.set_stream(1);
        let indices = (0..bootstrap.resamples)
            .map(|_| draw(&mut rng, runs))
            .collect();
        Ok(Self { runs, indices })
    }

    pub fn runs(&self) -> usize {
        self.runs
    }
}

/// A method's mean over its runs with the hierarchical bootstrap's uncertainty: resample `b` is
/// the mean, over resample `b`'s drawn run indices, of each drawn run's own resample `b`. `runs`
/// holds one estimate per run, all with as many resamples as `draws` has; a single estimate
/// stands for every run (a row without training runs, such as the base model).
pub fn over_runs(runs: &[&Estimate], draws: &RunDraws) -> Result<Estimate> {
    let run = |r: usize| -> &Estimate {
        match runs.len() {
            1 => runs[0],
            _ => runs[r],
        }
    };
    if runs.len() != 1 && runs.len() != draws.runs {
        bail!(
            "{} runs given where the draws have {}",
            runs.len(),
            draws.runs
        );
    }
    if let Some(other) = runs
        .iter()
        .find(|e| e.resamples.len() != draws.indices.len())
    {
        bail!(
            "the hierarchical bootstrap needs {} image-level resamples per run, got {}",
            draws.indices.len(),
            other.resamples.len()
        );
    }
    let value = (0..draws.runs).map(|r| run(r).value).sum::<f64>() / draws.runs as f64;
    let resamples = draws
        .indices
        .iter()
        .enumerate()
        .map(|(b, drawn)| {
            drawn.iter().map(|&r| run(r).resamples[b]).sum::<f64>() / drawn.len() as f64
        })
        .collect();
    Ok(Estimate::from_resamples(value, resamples))
}

/// The mean over runs of `a − b`, run `r` of one against run `r` of the other, with the
/// hierarchical bootstrap's uncertainty (the same run draws for both, and within each run the
/// image-level draws that pair sets of equal size). Either side may be a single estimate (see
/// [`over_runs`]).
pub fn paired_over_runs(a: &[&Estimate], b: &[&Estimate], draws: &RunDraws) -> Result<Estimate> {
    let pick = |side: &[&Estimate], r: usize| side[if side.len() == 1 { 0 } else { r }].clone();
    for side in [a, b] {
        if side.len() != 1 && side.len() != draws.runs {
            bail!(
                "{} runs given where the draws have {}",
                side.len(),
                draws.runs
            );
        }
    }
    let differences = (0..draws.runs)
        .map(|r| difference(&pick(a, r), &pick(b, r)))
        .collect::<Result<Vec<_>>>()?;
    over_runs(&differences.iter().collect::<Vec<_>>(), draws)
}

fn draw(rng: &mut ChaCha8Rng, n: usize) -> Vec<usize> {
    (0..n).map(|_| rng.random_range(0..n)).collect()
}

fn rows(features: MatRef<'_, f64>, indices: &[usize]) -> Mat<f64> {
    Mat::from_fn(indices.len(), features.ncols(), |i, j| {
        features[(indices[i], j)]
    })
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0);
    (mean, variance.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(n: usize, d: usize, shift: f64, seed: u64) -> Mat<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Mat::from_fn(n, d, |_, _| rng.random_range(0.0..1.0) + shift)
    }

    #[test]
    fn same_seed_same_interval_other_seed_other_draws() {
        let (a, b) = (features(40, 4, 0.0, 1), features(30, 4, 0.3, 2));
        let boot = |seed| Bootstrap {
            resamples: 20,
            seed,
        };
        let first = boot(7).fid(a.as_ref(), b.as_ref()).unwrap();
        assert_eq!(first, boot(7).fid(a.as_ref(), b.as_ref()).unwrap());
        let other = boot(8).fid(a.as_ref(), b.as_ref()).unwrap();
        assert_eq!(first.value, other.value);
        assert_ne!(first.resamples, other.resamples);
        assert!(
            first.low < first.value && first.value < first.high,
            "{first:?}"
        );
    }

    #[test]
    fn a_clear_shift_is_outside_the_paired_uncertainty_and_no_shift_inside() {
        let reference = features(60, 4, 0.0, 1);
        let near = features(60, 4, 0.0, 2);
        let also_near = features(60, 4, 0.0, 3);
        let far = features(60, 4, 0.5, 4);
        let boot = Bootstrap {
            resamples: 50,
            seed: 0,
        };
        let score = |g: &Mat<f64>| boot.fid(reference.as_ref(), g.as_ref()).unwrap();
        let (near, also_near, far) = (score(&near), score(&also_near), score(&far));
        assert!(!difference(&far, &near).unwrap().includes_zero());
        assert!(difference(&also_near, &near).unwrap().includes_zero());
    }

    fn shifted(e: &Estimate, by: f64) -> Estimate {
        Estimate::from_resamples(e.value + by, e.resamples.iter().map(|v| v + by).collect())
    }

    #[test]
    fn identical_runs_give_the_image_level_interval() {
        let boot = Bootstrap {
            resamples: 50,
            seed: 3,
        };
        let reference = features(40, 3, 0.0, 1);
        let run = boot
            .fid(reference.as_ref(), features(40, 3, 0.2, 2).as_ref())
            .unwrap();
        let draws = RunDraws::new(3, &boot).unwrap();
        let mean = over_runs(&[&run, &run, &run], &draws).unwrap();
        assert!((mean.value - run.value).abs() < 1e-12);
        assert!((mean.low - run.low).abs() < 1e-12 && (mean.high - run.high).abs() < 1e-12);
        // One run is the image-level bootstrap itself.
        let one = over_runs(&[&run], &RunDraws::new(1, &boot).unwrap()).unwrap();
        assert_eq!(one, run);
    }

    #[test]
    fn run_spread_widens_the_interval_and_pairing_cancels_a_shared_shift() {
        let boot = Bootstrap {
            resamples: 200,
            seed: 0,
        };
        let reference = features(40, 3, 0.0, 1);
        let base = boot
            .fid(reference.as_ref(), features(40, 3, 0.2, 2).as_ref())
            .unwrap();
        let spread = [shifted(&base, -0.3), base.clone(), shifted(&base, 0.3)];
        let draws = RunDraws::new(3, &boot).unwrap();
        let same = over_runs(&[&base, &base, &base], &draws).unwrap();
        let mean = over_runs(&spread.iter().collect::<Vec<_>>(), &draws).unwrap();
        assert!((mean.value - base.value).abs() < 1e-12);
        assert!(
            mean.high - mean.low > same.high - same.low + 0.2,
            "{mean:?} against {same:?}"
        );
        // Another method whose runs move with these (run r shares its seed) plus 0.05: paired by
        // run, the run spread cancels and the small shift is real; unpaired it would not be.
        let other: Vec<Estimate> = spread.iter().map(|e| shifted(e, 0.05)).collect();
        let d = paired_over_runs(
            &other.iter().collect::<Vec<_>>(),
            &spread.iter().collect::<Vec<_>>(),
            &draws,
        )
        .unwrap();
        assert!(
            (d.value - 0.05).abs() < 1e-12 && !d.includes_zero(),
            "{d:?}"
        );
        let exact = over_runs(&[&Estimate::exact(0.5, 200)], &draws).unwrap();
        assert_eq!((exact.low, exact.high), (0.5, 0.5));
    }
}
