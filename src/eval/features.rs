//! Inception features of images, computed as pytorch-fid's `get_activations` computes them: the
//! FID InceptionV3 with the ported TensorFlow weights, each image resized to 299x299 inside the
//! pipeline, one feature row (float64) per image. [`FidModel::features`] is the one extraction
//! path, for image folders (`fid`) and datasets (`compare`'s reference) alike, shared among the
//! ranks of a process group; every score (FID, KID, their bootstrap) takes the feature matrix it
//! returns, and [`save_features`] / [`read_features`] keep such a matrix on disk.
use super::images::{image_files, load_image};
use super::inception::{preprocess, FeatureDims, InceptionV3};
use crate::data::images::DecodeOptions;
use crate::data::ImageSource;
use crate::dist::ProcessGroup;
use crate::model::weights::{read_all, read_metadata, save_tensors};
use anyhow::{anyhow, bail, Context, Result};
use faer::Mat;
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Where pytorch-fid downloads its weights from (a PyTorch pickle; convert it once with
/// tools/convert_inception.py).
pub const WEIGHTS_URL: &str =
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth";
/// The converted weights' file name in difftune's cache folder.
pub const WEIGHTS_FILE_NAME: &str = "pt_inception-2015-12-05-6726825d.safetensors";
/// Images per forward pass unless set otherwise (pytorch-fid's default).
pub const DEFAULT_BATCH_SIZE: usize = 50;

/// The converted FID Inception weights in the cache folder.
pub fn default_weights_path() -> PathBuf {
    crate::util::fs::cache_dir().join(WEIGHTS_FILE_NAME)
}

/// `explicit` if given, else the cache path; either way it must exist, and when it does not the
/// error says how to get it.
pub fn resolve_weights(explicit: Option<&Path>) -> Result<PathBuf> {
    let path = explicit
        .map(Path::to_path_buf)
        .unwrap_or_else(default_weights_path);
    if !path.is_file() {
        bail!(
            "FID Inception weights not found at {}.\n\
             Download pytorch-fid's weights from\n  {WEIGHTS_URL}\n\
             and convert them to safetensors with\n  \
             source tools/setup.sh && python tools/convert_inception.py pt_inception-2015-12-05-6726825d.pth\n\
             which writes {} (or pass --weights FILE).",
            path.display(),
            default_weights_path().display()
        );
    }
    if is_torch_pickle(&path)? {
        bail!(
            "{} is a PyTorch pickle, not safetensors: convert it once with `source tools/setup.sh && python tools/convert_inception.py {}` and pass the .safetensors file it writes",
            path.display(),
            path.display()
        );
    }
    Ok(path)
}

/// A PyTorch `torch.save` file: a zip archive (`PK`) or a legacy pickle (protocol opcode 0x80).
fn is_torch_pickle(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 2];
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let read = file
        .read(&mut magic)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(read == 2 && (magic == *b"PK" || magic[0] == 0x80))
}

/// The FID Inception network with its weights, ready to turn images into feature rows.
pub struct FidModel {
    inception: InceptionV3,
    dims: FeatureDims,
    device: Device,
    batch_size: usize,
    /// How image files are decoded: as pytorch-fid's Pillow does, unless the pixel limit is set.
    decode: DecodeOptions,
}

impl FidModel {
    /// Loads the converted `pt_inception-2015-12-05-6726825d` weights (safetensors) onto `device`,
    /// for features of width `dims` (64, 192, 768 or 2048), with the BatchNorms folded into the
    /// convolutions.
    pub fn load(weights: &Path, device: Device, dims: usize) -> Result<Self> {
        let dims = FeatureDims::from_dims(dims)?;
        let mut inception = InceptionV3::load(weights, device)?;
        tch::no_grad(|| inception.fold_batch_norm());
        Ok(Self {
            inception,
            dims,
            device,
            batch_size: DEFAULT_BATCH_SIZE,
            decode: DecodeOptions::PILLOW_OPEN,
        })
    }

    /// Image files with more pixels are refused (an error naming the file) before decoding.
    pub fn with_max_image_pixels(mut self, max_pixels: u64) -> Self {
        self.decode.max_pixels = max_pixels;
        self
    }

    /// Images per forward pass (memory/speed only: features do not depend on it).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    pub fn dims(&self) -> usize {
        self.dims.dims()
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Features `[N, dims]` of a batch of same-size images `[N, 3, H, W]` with values in [0, 1]
    /// (any float kind, any device), e.g. samples straight from the VAE decoder.
    pub fn features_of_tensor(&self, images: &Tensor) -> Result<Mat<f64>> {
        let size = images.size();
        if size.len() != 4 || size[1] != 3 {
            bail!("FID features need images of shape [N, 3, H, W], got {size:?}");
        }
        let rows: Vec<Tensor> = tch::no_grad(|| {
            images
                .split(self.batch_size as i64, 0)
                .iter()
                .map(|batch| {
                    self.run(preprocess(
                        &batch.to_device(self.device).to_kind(Kind::Float),
                    ))
                })
                .collect()
        });
        match rows.is_empty() {
            true => Ok(Mat::zeros(0, self.dims())),
            false => tensor_to_matrix(&Tensor::cat(&rows, 0)),
        }
    }

    /// Features `[N, dims]` of `images` (files, or a dataset's samples; any sizes), in the order
    /// given, decoded as pytorch-fid decodes them (RGB, no EXIF rotation, unless the pixel limit is
    /// set otherwise). Shared among the ranks of `group`: each rank runs a contiguous share of
    /// whole batches (so every image runs in the same batch as in one process, and its features
    /// are bitwise the same), then every rank gets all the rows in the original order.
    /// `progress(done, share)` counts this rank's images. An unreadable image is an error naming
    /// it.
    pub fn features(
        &self,
        images: &[ImageSource],
        group: &ProcessGroup,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Mat<f64>> {
        let batches = images.len().div_ceil(self.batch_size);
        let share = group.shard_range(batches);
        let first = (share.start * self.batch_size).min(images.len());
        let end = (share.end * self.batch_size).min(images.len());
        let rows = self.feature_rows(&images[first..end], |done| progress(done, end - first))?;
        if !group.is_distributed() {
            return tensor_to_matrix(&rows);
        }
        // The collective runs on the model's device: the CPU under Gloo, this rank's GPU under NCCL.
        tensor_to_matrix(&group.all_gather_rows(&rows.to_device(self.device))?)
    }

    /// [`Self::features`] of image files, in one process.
    pub fn features_of_images(&self, paths: &[PathBuf]) -> Result<Mat<f64>> {
        self.features(&image_files(paths), &ProcessGroup::single(), |_, _| {})
    }

    /// The features of `images` as one float64 CPU tensor `[N, dims]`, calling
    /// `progress(images_done)` after each batch. The next batch is decoded (in parallel) while
    /// the network runs on the current one.
    fn feature_rows(
        &self,
        images: &[ImageSource],
        mut progress: impl FnMut(usize),
    ) -> Result<Tensor> {
        let batches: Vec<&[ImageSource]> = images.chunks(self.batch_size).collect();
        let options = self.decode;
        let decode = move |batch: &[ImageSource]| -> Result<Vec<Tensor>> {
            batch.par_iter().map(|p| load_image(p, &options)).collect()
        };
        let rows = std::thread::scope(|scope| -> Result<Vec<Tensor>> {
            let mut rows = Vec::with_capacity(batches.len());
            let mut pending = batches
                .first()
                .map(|&batch| scope.spawn(move || decode(batch)));
            let mut done = 0;
            for index in 0..batches.len() {
                let decoded = pending
                    .take()
                    .expect("a decode is pending for every batch")
                    .join()
                    .map_err(|_| anyhow!("image decoding panicked"))??;
                pending = batches
                    .get(index + 1)
                    .map(|&batch| scope.spawn(move || decode(batch)));
                rows.push(tch::no_grad(|| self.features_of_decoded(&decoded)));
                done += decoded.len();
                progress(done);
            }
            Ok(rows)
        })?;
        if rows.is_empty() {
            return Ok(Tensor::zeros(
                [0, self.dims() as i64],
                (Kind::Double, Device::Cpu),
            ));
        }
        Ok(Tensor::cat(&rows, 0)
            .to_device(Device::Cpu)
            .to_kind(Kind::Double))
    }

    /// Features of decoded `[3, H, W]` images of possibly different sizes: each is resized on the
    /// device (as pytorch-fid resizes inside the model), then they run as one batch.
    fn features_of_decoded(&self, images: &[Tensor]) -> Tensor {
        let inputs: Vec<Tensor> = images
            .iter()
            .map(|image| preprocess(&image.to_device(self.device).unsqueeze(0)))
            .collect();
        self.run(Tensor::cat(&inputs, 0))
    }

    /// The network on preprocessed `[N, 3, 299, 299]` inputs. On the CPU the input goes
    /// channels-last, which oneDNN's convolutions run on without reordering every layer's
    /// activations (and which they then keep through the network).
    fn run(&self, inputs: Tensor) -> Tensor {
        let inputs = match self.device {
            Device::Cpu => inputs
                .permute([0, 2, 3, 1])
                .contiguous()
                .permute([0, 3, 1, 2]),
            _ => inputs,
        };
        self.inception.features(&inputs, self.dims)
    }
}

/// Saves `features` (float64 `features` `[N, dims]`, rows are images) to `path` atomically, with
/// `key` (what they were computed from) in its metadata.
pub fn save_features(path: &Path, features: &Mat<f64>, key: &str) -> Result<()> {
    let values: Vec<f64> = (0..features.nrows())
        .flat_map(|i| (0..features.ncols()).map(move |j| features[(i, j)]))
        .collect();
    let tensor =
        Tensor::from_slice(&values).view([features.nrows() as i64, features.ncols() as i64]);
    let meta = [("key".to_string(), key.to_string())].into();
    save_tensors(path, &[("features".to_string(), tensor)], Some(meta))
}

/// The features [`save_features`] saved at `path`; `None` when there is no file or it was saved
/// under another key.
pub fn read_features(path: &Path, key: &str) -> Result<Option<Mat<f64>>> {
    if !path.is_file() {
        return Ok(None);
    }
    if read_metadata(path)?.get("key").map(String::as_str) != Some(key) {
        return Ok(None);
    }
    let features = read_all(path)?
        .remove("features")
        .with_context(|| format!("{} has no `features`", path.display()))?;
    tensor_to_matrix(&features).map(Some)
}

/// A `[N, dims]` tensor (any float kind, any device) as a float64 matrix (rows are images).
fn tensor_to_matrix(rows: &Tensor) -> Result<Mat<f64>> {
    let (n, dims) = rows.size2().context("features must be a matrix")?;
    let (n, dims) = (n as usize, dims as usize);
    let all = rows
        .to_device(Device::Cpu)
        .to_kind(Kind::Double)
        .contiguous();
    let values = Vec::<f64>::try_from(all.view([-1]))?;
    Ok(Mat::from_fn(n, dims, |i, j| values[i * dims + j]))
}
