//! Scoring generated images against a reference split with FID and KID (pytorch-fid's
//! InceptionV3). The reference's features are computed once per comparison and cached. Under a
//! launcher every rank extracts the features of a share of whole batches (bitwise the features
//! one process computes) and rank 0 gathers them and computes the scores.
use super::config::{EvalSection, FeatureWeights};
use super::report::{Difference, Metric, Uncertainty};
use crate::data::images::{decode_rgb, Alpha, DecodeOptions};
use crate::data::Dataset;
use crate::dist::ProcessGroup;
use crate::eval::bootstrap::difference;
use crate::eval::{default_weights_path, Bootstrap, Estimate, FidModel};
use crate::model::weights::{read_all, save_tensors};
use anyhow::{bail, Context, Result};
use faer::Mat;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

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
            write_random_inception(&path, eval.random_seed)?;
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
            true => read_cached_features(cache, key)?,
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
        let features = self.features_of_dataset(dataset, group)?;
        if !group.is_main() {
            return Ok(None);
        }
        let tensor = matrix_to_tensor(&features);
        let meta = [("key".to_string(), key.to_string())].into();
        save_tensors(cache, &[("features".to_string(), tensor)], Some(meta))?;
        Ok(Some(Reference { features }))
    }

    /// Features of a dataset's images, decoded as pytorch-fid decodes them (RGB, [0, 1]) and each
    /// resized to the network's input in its own forward pass batch. Each rank of `group`
    /// extracts a contiguous share of the decode chunks (the same batches as one process);
    /// every rank gets all the rows.
    fn features_of_dataset(&self, dataset: &Dataset, group: &ProcessGroup) -> Result<Mat<f64>> {
        let chunks: Vec<_> = dataset.samples.chunks(DECODE_CHUNK).collect();
        let mut rows: Vec<Mat<f64>> = vec![Mat::zeros(0, self.model.dims())];
        for chunk in &chunks[group.shard_range(chunks.len())] {
            let images: Vec<Tensor> = chunk
                .iter()
                .map(|s| -> Result<Tensor> {
                    let rgb = decode_rgb(&s.image, Alpha::Drop, &DecodeOptions::PILLOW_OPEN)?;
                    let (w, h) = rgb.dimensions();
                    let nchw = Tensor::from_slice(rgb.as_raw())
                        .view([1, h as i64, w as i64, 3])
                        .permute([0, 3, 1, 2]);
                    // The network's own resize (bilinear, no antialiasing) to its 299 px input,
                    // done here so differently sized images can share a batch; resizing 299 px
                    // to 299 px again inside the model is the identity.
                    Ok(nchw.upsample_bilinear2d(
                        [INCEPTION_INPUT, INCEPTION_INPUT],
                        false,
                        None,
                        None,
                    ))
                })
                .collect::<Result<_>>()?;
            rows.push(self.model.features_of_tensor(&Tensor::cat(&images, 0))?);
        }
        // The collective runs on the model's device: the CPU under Gloo, this rank's GPU under NCCL.
        let share = matrix_to_tensor(&stack_rows(&rows)).to_device(self.model.device());
        tensor_to_matrix(&group.all_gather_rows(&share)?)
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
        let features = self
            .model
            .features_of_images_sharded(paths, group, |_, _| {})?;
        let Some(reference) = reference.filter(|_| group.is_main()) else {
            return Ok(None);
        };
        let (reference, generated) = (reference.features.as_ref(), features.as_ref());
        let fid = self.bootstrap.fid(reference, generated)?;
        let (subsets, kid) = self.bootstrap.kid(
            reference,
            generated,
            self.kid_subsets,
            self.kid_subset_size,
            self.seed,
        )?;
        Ok(Some(Score {
            fid,
            kid,
            kid_subset_std: subsets.std,
            images: paths.len(),
        }))
    }

    /// The bootstrap's settings, for the report.
    pub fn bootstrap(&self) -> Bootstrap {
        self.bootstrap
    }
}

/// Side of the FID Inception's input.
const INCEPTION_INPUT: i64 = 299;
/// Images decoded at a time for the reference features.
const DECODE_CHUNK: usize = 50;

fn read_cached_features(path: &Path, key: &str) -> Result<Option<Mat<f64>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let meta = crate::model::weights::read_metadata(path)?;
    if meta.get("key").map(String::as_str) != Some(key) {
        return Ok(None);
    }
    let tensors = read_all(path)?;
    let features = tensors
        .get("features")
        .with_context(|| format!("{} has no `features`", path.display()))?;
    Ok(Some(tensor_to_matrix(features)?))
}

fn matrix_to_tensor(m: &Mat<f64>) -> Tensor {
    let values: Vec<f64> = (0..m.nrows())
        .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)]))
        .collect();
    Tensor::from_slice(&values).view([m.nrows() as i64, m.ncols() as i64])
}

fn tensor_to_matrix(t: &Tensor) -> Result<Mat<f64>> {
    let (rows, cols) = t.size2().context("cached features must be a matrix")?;
    let values = Vec::<f64>::try_from(t.to_kind(Kind::Double).contiguous().view([-1]))?;
    Ok(Mat::from_fn(rows as usize, cols as usize, |i, j| {
        values[i * cols as usize + j]
    }))
}

fn stack_rows(parts: &[Mat<f64>]) -> Mat<f64> {
    let cols = parts.first().map_or(0, |m| m.ncols());
    let rows: usize = parts.iter().map(|m| m.nrows()).sum();
    let mut out = Mat::zeros(rows, cols);
    let mut at = 0;
    for part in parts {
        for i in 0..part.nrows() {
            for j in 0..cols {
                out[(at + i, j)] = part[(i, j)];
            }
        }
        at += part.nrows();
    }
    out
}

/// Writes a seeded random initialisation of the FID InceptionV3: every convolution He-uniform
/// (variance 2 / fan-in, which keeps activations at unit scale through the ReLUs), batch norms
/// the identity. Each tensor draws from its own stream, so values do not depend on listing order.
pub fn write_random_inception(path: &Path, seed: u64) -> Result<()> {
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = crate::eval::inception::InceptionV3::new(vs.root());
    let mut tensors: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (index, (name, tensor)) in tensors.iter_mut().enumerate() {
        if !name.ends_with("conv.weight") {
            continue;
        }
        let size = tensor.size();
        let fan_in: i64 = size[1..].iter().product();
        let bound = (6.0 / fan_in as f64).sqrt() as f32;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(index as u64);
        let values: Vec<f32> = (0..tensor.numel())
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        *tensor = Tensor::from_slice(&values).view(size.as_slice());
    }
    save_tensors(path, &tensors, None)
        .with_context(|| format!("writing random Inception weights {}", path.display()))
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
