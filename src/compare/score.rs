//! Scoring generated images against a reference split with FID and KID (pytorch-fid's
//! InceptionV3). The features come from [`FidModel::features`], shared among the ranks (bitwise
//! the features one process computes); the reference's are computed once per comparison and
//! cached, and rank 0 computes the scores from the two feature matrices.
use super::config::{EvalSection, FeatureWeights};
use super::report::{Difference, Metric, Uncertainty};
use crate::data::{Dataset, ImageSource};
use crate::dist::ProcessGroup;
use crate::eval::bootstrap::difference;
use crate::eval::features::{read_features, save_features};
use crate::eval::images::image_files;
use crate::eval::inception::write_random_weights;
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
}

/// FID and KID of one set of generated images, each with its bootstrap uncertainty.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Score {
    pub fid: Estimate,
    pub kid: Estimate,
    /// Standard deviation of KID over its random subsets (torch-fidelity's `kid_std`).
    pub kid_subset_std: f64,
    pub images: usize,
}

/// The reference images' features.
pub struct Reference {
    pub features: Mat<f64>,
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
            return Ok(cached.map(|features| Reference { features }));
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
        Ok(Some(Reference { features }))
    }

    /// FID and KID of the images at `paths` against `reference`, with their bootstrap
    /// uncertainties (the same draws for every set of as many images, so rows are paired). Every
    /// rank of `group` extracts the features of its share of the images; rank 0, which alone has
    /// the `reference`, gets the score, the others `None`.
    pub fn score(
        &self,
        reference: Option<&Reference>,
        paths: &[PathBuf],
        group: &ProcessGroup,
    ) -> Result<Option<Score>> {
        let generated = self.model.features(&image_files(paths), group, |_, _| {})?;
        match reference.filter(|_| group.is_main()) {
            Some(reference) => self
                .score_features(&reference.features, &generated)
                .map(Some),
            None => Ok(None),
        }
    }

    /// FID and KID of the `generated` features against the `reference` ones (rows are images).
    fn score_features(&self, reference: &Mat<f64>, generated: &Mat<f64>) -> Result<Score> {
        let (reference, generated) = (reference.as_ref(), generated.as_ref());
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
        })
    }

    /// The bootstrap's settings, for the report.
    pub fn bootstrap(&self) -> Bootstrap {
        self.bootstrap
    }
}

/// The paired differences the report judges: every method against the base row (`method −
/// base`), then the methods ranked by FID, each against the next better one (`worse − better`);
/// FID and KID for each pair. `scores` are `(row id, score)`, the base row first.
pub fn differences(scores: &[(String, Score)]) -> Result<Vec<Difference>> {
    let Some(((base, _), methods)) = scores.split_first() else {
        return Ok(Vec::new());
    };
    let mut ranked: Vec<&(String, Score)> = methods.iter().collect();
    ranked.sort_by(|a, b| b.1.fid.value.total_cmp(&a.1.fid.value));
    let find = |id: &str| scores.iter().find(|(name, _)| name == id).map(|(_, s)| s);
    let against_base = methods.iter().map(|(id, _)| (id.as_str(), base.as_str()));
    let neighbours = ranked
        .windows(2)
        .map(|w| (w[0].0.as_str(), w[1].0.as_str()));
    let mut out = Vec::new();
    for (first, second) in against_base.chain(neighbours) {
        let (Some(a), Some(b)) = (find(first), find(second)) else {
            continue;
        };
        for (metric, x, y) in [(Metric::Fid, &a.fid, &b.fid), (Metric::Kid, &a.kid, &b.kid)] {
            let d = difference(x, y)
                .with_context(|| format!("{metric:?} of {first} against {second}"))?;
            out.push(Difference {
                metric,
                first: first.to_string(),
                second: second.to_string(),
                value: d.value,
                uncertainty: Uncertainty::from(&d),
            });
        }
    }
    Ok(out)
}
