//! Scoring generated images against a reference split with FID, KID and precision and recall
//! (pytorch-fid's InceptionV3), and with the content classifier where there is one. The features
//! come from [`FidModel::features`], shared among the ranks (bitwise the features one process
//! computes); the reference's are computed once per comparison and cached, and rank 0 computes
//! the scores from the two feature matrices. A row with several training runs is summarised by
//! the hierarchical bootstrap over its runs ([`summarise`]), and rows are compared by run
//! ([`differences`]).
use super::config::{EvalSection, FeatureWeights};
use super::report::{Difference, Metric, Uncertainty};
use crate::data::{Dataset, ImageSource};
use crate::dist::ProcessGroup;
use crate::eval::bootstrap::{over_runs, paired_over_runs, RunDraws};
use crate::eval::classifier::{ContentClassifier, ContentScore};
use crate::eval::features::{read_features, save_features};
use crate::eval::images::image_files;
use crate::eval::inception::write_random_weights;
use crate::eval::precision_recall::{knn_radii, precision_recall_with, PrecisionRecall};
use crate::eval::{default_weights_path, Bootstrap, Estimate, FidModel};
use anyhow::{bail, Context, Result};
use faer::Mat;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Device;

/// Which Inception weights the scores use, and why: chosen (and, for the random ones, written)
/// once, by rank 0 of a data-parallel comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScorerWeights {
    path: PathBuf,
    description: String,
    identity: String,
}

impl ScorerWeights {
    /// The weights `eval` asks for; a random initialisation is written to `work_dir` first
    /// (FidModel loads weights from a file).
    pub fn choose(eval: &EvalSection, work_dir: &Path) -> Result<Self> {
        let explicit = eval.weights.as_ref().map(PathBuf::from);
        let real = explicit.clone().unwrap_or_else(default_weights_path);
        let use_real = match eval.feature_weights {
            FeatureWeights::PytorchFid => {
                crate::eval::resolve_weights(explicit.as_deref())?;
                true
            }
            FeatureWeights::Random => false,
            FeatureWeights::Auto => real.is_file(),
        };
        let dims = eval.dims;
        if use_real {
            let description = format!(
                "pytorch-fid's InceptionV3 weights (pt_inception-2015-12-05) from {}, {dims}-d features: \
                 the standard FID, comparable with published values computed on as many images",
                real.display()
            );
            return Ok(Self {
                identity: format!("pytorch-fid:{}:{dims}", real.display()),
                path: real,
                description,
            });
        }
        let path = work_dir.join(format!(
            "inception-random-seed{}.safetensors",
            eval.random_seed
        ));
        if !path.is_file() {
            write_random_weights(&path, eval.random_seed)?;
        }
        let why = match eval.feature_weights {
            FeatureWeights::Random => "the run file asks for it".to_string(),
            _ => format!(
                "pytorch-fid's weights were not found at {} and nothing is downloaded here",
                real.display()
            ),
        };
        let description = format!(
            "a deterministic random initialisation (seed {}) of pytorch-fid's InceptionV3 \
             (He-uniform convolutions, identity batch norms), {dims}-d features, because {why}. \
             Random-feature FID still ranks how close two image distributions are, but its values \
             are not comparable with published FIDs",
            eval.random_seed
        );
        Ok(Self {
            path,
            description,
            identity: format!("random:{}:{dims}", eval.random_seed),
        })
    }
}

/// The Inception network the scores are computed with, and how it was chosen.
pub struct Scorer {
    model: FidModel,
    /// For the report: which weights, and why.
    pub description: String,
    /// Changes whenever the features would: weights and width.
    pub identity: String,
    kid_subsets: usize,
    kid_subset_size: usize,
    seed: u64,
    bootstrap: Bootstrap,
    /// Neighbourhood size of precision and recall.
    k: usize,
}

/// FID and KID of one set of generated images, each with its bootstrap uncertainty.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Score {
    pub fid: Estimate,
    pub kid: Estimate,
    /// Standard deviation of KID over its random subsets (torch-fidelity's `kid_std`).
    pub kid_subset_std: f64,
    pub images: usize,
    /// Precision and recall; `None` when a set has no more images than the neighbourhood size.
    pub precision_recall: Option<PrecisionRecall>,
    /// The content classifier's reading, where the study has one.
    pub content: Option<ContentScore>,
}

/// The reference images' features, and their manifold's k-NN radii (none for a set no larger
/// than the neighbourhood).
pub struct Reference {
    pub features: Mat<f64>,
    pub radii: Option<Vec<f64>>,
}

/// What the content classifier scores a set with: the classifier, and each image's intended
/// class.
pub struct Content<'a> {
    pub classifier: &'a ContentClassifier,
    pub intended: &'a [i64],
}

impl Scorer {
    /// Loads the Inception `weights` onto `device`, with `eval`'s settings.
    pub fn new(eval: &EvalSection, device: Device, weights: ScorerWeights) -> Result<Self> {
        let ScorerWeights {
            path: weights,
            description,
            identity,
        } = weights;
        let model = FidModel::load(&weights, device, eval.dims)?.with_batch_size(eval.batch_size);
        Ok(Self {
            model,
            description,
            identity,
            kid_subsets: eval.kid_subsets,
            kid_subset_size: eval.kid_subset_size,
            seed: eval.random_seed,
            bootstrap: Bootstrap {
                resamples: eval.bootstrap,
                seed: eval.bootstrap_seed,
            },
            k: eval.precision_recall_k,
        })
    }

    /// The reference features of every image of `dataset`, cached in `cache` (safetensors,
    /// recomputed when `key` changes): on rank 0 of `group`, which alone reads and writes the
    /// cache; every rank extracts its share when it is computed. `None` on the other ranks.
    pub fn reference(
        &self,
        dataset: &Dataset,
        cache: &Path,
        key: &str,
        group: &ProcessGroup,
    ) -> Result<Option<Reference>> {
        let cached = match group.is_main() {
            true => read_features(cache, key)?,
            false => None,
        };
        // Only rank 0 can say yes: this is its answer, on every rank.
        if group.any(cached.is_some())? {
            return cached.map(|f| self.with_radii(f)).transpose();
        }
        if dataset.is_empty() {
            bail!(
                "the reference split of {} has no images",
                dataset.root.display()
            );
        }
        let images: Vec<ImageSource> = dataset.samples.iter().map(|s| s.image.clone()).collect();
        let features = self.model.features(&images, group, |_, _| {})?;
        if !group.is_main() {
            return Ok(None);
        }
        save_features(cache, &features, key)?;
        self.with_radii(features).map(Some)
    }

    fn with_radii(&self, features: Mat<f64>) -> Result<Reference> {
        let radii = match features.nrows() > self.k {
            true => Some(knn_radii(features.as_ref(), self.k)?),
            false => None,
        };
        Ok(Reference { features, radii })
    }

    /// FID and KID of the images at `paths` against `reference`, with their bootstrap
    /// uncertainties (the same draws for every set of as many images, so rows are paired), their
    /// precision and recall, and their `content` score. Every rank of `group` extracts the
    /// features of its share of the images; rank 0, which alone has the `reference`, gets the
    /// score, the others `None`.
    pub fn score(
        &self,
        reference: Option<&Reference>,
        paths: &[PathBuf],
        group: &ProcessGroup,
        content: Option<Content>,
    ) -> Result<Option<Score>> {
        let images = image_files(paths);
        let generated = self.model.features(&images, group, |_, _| {})?;
        let Some(reference) = reference.filter(|_| group.is_main()) else {
            return Ok(None);
        };
        let mut score = self.score_features(reference, &generated)?;
        if let Some(content) = content {
            score.content = Some(content.classifier.score(&images, content.intended)?);
        }
        Ok(Some(score))
    }

    /// FID, KID, precision and recall of the `generated` features against the `reference`
    /// (rows are images).
    fn score_features(&self, reference: &Reference, generated: &Mat<f64>) -> Result<Score> {
        let precision_recall = match &reference.radii {
            Some(radii) if generated.nrows() > self.k => Some(precision_recall_with(
                reference.features.as_ref(),
                radii,
                generated.as_ref(),
                self.k,
            )?),
            _ => None,
        };
        let (reference, generated) = (reference.features.as_ref(), generated.as_ref());
        let fid = self.bootstrap.fid(reference, generated)?;
        let (subsets, kid) = self.bootstrap.kid(
            reference,
            generated,
            self.kid_subsets,
            self.kid_subset_size,
            self.seed,
        )?;
        Ok(Score {
            fid,
            kid,
            kid_subset_std: subsets.std,
            images: generated.nrows(),
            precision_recall,
            content: None,
        })
    }

    /// What the scores are computed with, for the stage keys: a new setting of any redoes them.
    pub fn key(&self) -> serde_json::Value {
        serde_json::json!({
            "scorer": self.identity,
            "kid": [self.kid_subsets, self.kid_subset_size, self.seed],
            "bootstrap": self.bootstrap,
            "precision_recall_k": self.k,
        })
    }

    /// The bootstrap's settings, for the report.
    pub fn bootstrap(&self) -> Bootstrap {
        self.bootstrap
    }
}

/// A row of the study with the scores of its sets: one per training run (the base row: one).
pub struct RowScores<'a> {
    pub id: &'a str,
    pub runs: Vec<&'a Score>,
}

/// A row's scores summarised over its runs by the hierarchical bootstrap (see
/// [`crate::eval::bootstrap::over_runs`]); precision, recall and the content score, which are not
/// bootstrapped over images, carry their run-to-run spread alone.
pub struct RowSummary {
    pub fid: Estimate,
    pub kid: Estimate,
    pub precision: Option<Estimate>,
    pub recall: Option<Estimate>,
    pub class_accuracy: Option<Estimate>,
    pub target_share: Option<Estimate>,
}

/// The estimates of `metric` of each of `runs`.
fn estimates(runs: &[&Score], metric: Metric) -> Vec<Estimate> {
    runs.iter()
        .map(|s| match metric {
            Metric::Fid => s.fid.clone(),
            Metric::Kid => s.kid.clone(),
        })
        .collect()
}

/// `row`'s summary over its runs.
pub fn summarise(runs: &[&Score], draws: &RunDraws) -> Result<RowSummary> {
    let resamples = runs.first().map_or(0, |s| s.fid.resamples.len());
    let over = |values: Vec<Estimate>| -> Result<Estimate> {
        over_runs(&values.iter().collect::<Vec<_>>(), draws)
    };
    let exact = |value: &dyn Fn(&Score) -> Option<f64>| -> Result<Option<Estimate>> {
        let values: Option<Vec<Estimate>> = runs
            .iter()
            .map(|s| value(s).map(|v| Estimate::exact(v, resamples)))
            .collect();
        values.map(over).transpose()
    };
    Ok(RowSummary {
        fid: over(estimates(runs, Metric::Fid))?,
        kid: over(estimates(runs, Metric::Kid))?,
        precision: exact(&|s| s.precision_recall.map(|p| p.precision))?,
        recall: exact(&|s| s.precision_recall.map(|p| p.recall))?,
        class_accuracy: exact(&|s| s.content.map(|c| c.class_accuracy))?,
        target_share: exact(&|s| s.content.map(|c| c.target_share))?,
    })
}

/// The paired differences the report judges: every method against the base row (`method −
/// base`), then the methods ranked by mean FID, each against the next better one (`worse −
/// better`); FID and KID for each pair, each the mean over runs of run `r` against run `r`, with
/// the hierarchical bootstrap's uncertainty. `rows` start with the base row.
pub fn differences(rows: &[RowScores], draws: &RunDraws) -> Result<Vec<Difference>> {
    let Some((base, methods)) = rows.split_first() else {
        return Ok(Vec::new());
    };
    let mean_fid = |row: &RowScores| {
        row.runs.iter().map(|s| s.fid.value).sum::<f64>() / row.runs.len().max(1) as f64
    };
    let mut ranked: Vec<&RowScores> = methods.iter().collect();
    ranked.sort_by(|a, b| mean_fid(b).total_cmp(&mean_fid(a)));
    let against_base = methods.iter().map(|m| (m, base));
    let neighbours = ranked.windows(2).map(|w| (w[0], w[1]));
    let mut out = Vec::new();
    for (first, second) in against_base.chain(neighbours) {
        for metric in [Metric::Fid, Metric::Kid] {
            let (a, b) = (
                estimates(&first.runs, metric),
                estimates(&second.runs, metric),
            );
            let d = paired_over_runs(
                &a.iter().collect::<Vec<_>>(),
                &b.iter().collect::<Vec<_>>(),
                draws,
            )
            .with_context(|| format!("{metric:?} of {} against {}", first.id, second.id))?;
            out.push(Difference {
                metric,
                first: first.id.to_string(),
                second: second.id.to_string(),
                value: d.value,
                uncertainty: Uncertainty::from(&d),
            });
        }
    }
    Ok(out)
}
