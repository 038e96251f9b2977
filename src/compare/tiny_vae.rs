//! Turning the built-in tiny model's random VAE into a working image codec before a comparison
//! uses it. With random weights the decoder maps every latent to nearly the same texture, so no
//! U-Net, however well tuned, could move the generated images towards a domain and FID could not
//! tell the methods apart. A few hundred steps of autoencoder training fix that: reconstruction
//! error plus a small KL term, as Stable Diffusion's VAE was trained (without its perceptual and
//! adversarial terms). The latent scaling factor is then set to one over the latents' standard
//! deviation, the rule that gave Stable Diffusion its 0.18215.
use crate::data::images::{load_batch, Preprocess};
use crate::data::{Dataset, DatasetOptions, Split};
use crate::model::vae::{load_vae_weights, AutoencoderKL, VaeConfig};
use crate::model::weights::save_tensors;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::util::progress::Progress;
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// How the tiny model's VAE is shaped and trained (`[model.tiny_vae]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TinyVaeTraining {
    /// Downsampling factor, 2, 4 or 8 (SD's): how many pixels a latent covers on a side.
    /// Default 8.
    pub downsampling: u32,
    /// Optimizer steps; 0 keeps the random VAE. Default 300.
    pub steps: usize,
    /// Default 2e-3.
    pub learning_rate: f64,
    /// Default 16.
    pub batch_size: usize,
    /// Weight of the KL term (both terms are means over elements). Default 1e-4.
    pub kl_weight: f64,
    /// Train on random square crops of this side (a multiple of 8; 0: whole images). The codec is
    /// convolutional, so crops teach it the same mapping at a fraction of the cost. Default 32.
    pub crop: u32,
    pub seed: u64,
}

impl Default for TinyVaeTraining {
    fn default() -> Self {
        Self {
            downsampling: crate::model::tiny::SD_VAE_DOWNSAMPLING,
            steps: 300,
            learning_rate: 2e-3,
            batch_size: 16,
            kl_weight: 1e-4,
            crop: 32,
            seed: 0,
        }
    }
}

/// What the training achieved, for the log.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct TinyVaeReport {
    /// Mean squared reconstruction error (images in [-1, 1]) of the training crops over the last
    /// tenth of the steps.
    pub training_mse: f64,
    /// Mean squared error of the whole held-out test images decoded from their latents' means.
    pub test_mse: f64,
    pub scaling_factor: f64,
}

/// Trains the VAE of the diffusers folder `model` in place on the training images of `datasets`
/// at `resolution` px, and rewrites its weights and `scaling_factor`. `progress` draws a bar.
pub fn train_tiny_vae(
    model: &Path,
    datasets: &[&Path],
    resolution: u32,
    settings: &TinyVaeTraining,
    device: Device,
    progress: bool,
) -> Result<TinyVaeReport> {
    if settings.batch_size == 0
        || !(settings.learning_rate.is_finite() && settings.learning_rate > 0.0)
    {
        bail!("model.tiny_vae needs a positive batch_size and learning_rate");
    }
    let side = resolution as i64;
    let crop = match settings.crop {
        0 => side,
        c if c % 8 == 0 => (c as i64).min(side),
        c => bail!("model.tiny_vae.crop {c} is not a multiple of 8"),
    };
    let images = split_images(datasets, Split::Train, resolution, settings.seed)?.to_device(device);
    let config_path = model.join("vae").join("config.json");
    let weights_path = model
        .join("vae")
        .join("diffusion_pytorch_model.safetensors");
    let config = VaeConfig::from_file(&config_path)?;
    let vs = nn::VarStore::new(device);
    let vae = AutoencoderKL::new(vs.root(), &config)?;
    load_vae_weights(&vs, std::slice::from_ref(&weights_path))?;

    let losses = fit(&vae, &vs, &images, crop, settings, progress)?;
    let tail = &losses[losses.len() - (losses.len() / 10).max(1).min(losses.len())..];
    let training_mse = if tail.is_empty() {
        f64::NAN
    } else {
        tail.iter().sum::<f64>() / tail.len() as f64
    };
    let test = split_images(datasets, Split::Test, resolution, settings.seed)?.to_device(device);
    let test_mse = reconstruction_mse(&vae, &test);
    let scaling_factor = 1.0 / latent_std(&vae, &images)?;
    save_vae_weights(&vs, &weights_path)?;
    crate::util::fs::set_json_field(&config_path, "scaling_factor", scaling_factor)?;
    Ok(TinyVaeReport {
        training_mse,
        test_mse,
        scaling_factor,
    })
}

/// The mean squared error of `images` decoded from their latents' means (no sampling noise).
pub fn reconstruction_mse(vae: &AutoencoderKL, images: &Tensor) -> f64 {
    tch::no_grad(|| {
        let squared: f64 = images
            .split(64, 0)
            .iter()
            .map(|x| {
                (vae.decode(&vae.encode(x).mean) - x)
                    .square()
                    .sum(Kind::Double)
                    .double_value(&[])
            })
            .sum();
        squared / images.numel() as f64
    })
}

/// The autoencoder training: `settings.steps` AdamW steps on seeded batches of `images`
/// (random `crop`-sided crops when smaller than the images). Returns each step's MSE.
fn fit(
    vae: &AutoencoderKL,
    vs: &nn::VarStore,
    images: &Tensor,
    crop: i64,
    settings: &TinyVaeTraining,
    progress: bool,
) -> Result<Vec<f64>> {
    let mut optimizer = AdamW::new(
        vs.trainable_variables(),
        AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
    )?;
    let mut batches = CropBatches {
        rng: ChaCha8Rng::seed_from_u64(settings.seed),
        order: Vec::new(),
        size: settings.batch_size,
        crop,
    };
    let bar = Progress::new("tiny VAE", settings.steps as u64, "steps", progress);
    let mut losses = Vec::with_capacity(settings.steps);
    for step in 0..settings.steps {
        let x = batches.next(images);
        tch::manual_seed((settings.seed as i64).wrapping_add(step as i64));
        optimizer.zero_grad();
        let posterior = vae.encode(&x);
        let reconstruction = vae.decode(&posterior.sample());
        let mse = (&reconstruction - &x).square().mean(Kind::Float);
        let kl = ((posterior.mean.square() + posterior.logvar.exp() - 1.0 - &posterior.logvar)
            * 0.5)
            .mean(Kind::Float);
        let loss = &mse + kl * settings.kl_weight;
        loss.backward();
        optimizer
            .step(settings.learning_rate, Some(1.0))
            .with_context(|| format!("tiny VAE step {}", step + 1))?;
        losses.push(mse.double_value(&[]));
        bar.set_message(format!("mse {:.4}", losses[step]));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(losses)
}

/// Seeded batches of the training images: shuffled epochs back to back, each image cut to a
/// random `crop`-sided square.
struct CropBatches {
    rng: ChaCha8Rng,
    order: Vec<i64>,
    size: usize,
    crop: i64,
}

impl CropBatches {
    fn next(&mut self, images: &Tensor) -> Tensor {
        let n = images.size()[0];
        if self.order.len() < self.size {
            let mut epoch: Vec<i64> = (0..n).collect();
            epoch.shuffle(&mut self.rng);
            self.order.extend(epoch);
        }
        let batch: Vec<i64> = self.order.drain(..self.size.min(n as usize)).collect();
        let x = images.index_select(0, &Tensor::from_slice(&batch).to_device(images.device()));
        let side = images.size()[2];
        if self.crop >= side {
            return x;
        }
        let (top, left) = (
            self.rng.random_range(0..=side - self.crop),
            self.rng.random_range(0..=side - self.crop),
        );
        x.narrow(2, top, self.crop).narrow(3, left, self.crop)
    }
}

/// The standard deviation of the latents of `images`: one over it is the scaling factor.
fn latent_std(vae: &AutoencoderKL, images: &Tensor) -> Result<f64> {
    let std = tch::no_grad(|| {
        let latents: Vec<Tensor> = images
            .split(64, 0)
            .iter()
            .map(|x| vae.encode(x).sample())
            .collect();
        Tensor::cat(&latents, 0).std(true).double_value(&[])
    });
    if !(std.is_finite() && std > 0.0) {
        bail!("the trained tiny VAE's latents have standard deviation {std}");
    }
    Ok(std)
}

/// Writes the VAE's weights in diffusers' layout.
fn save_vae_weights(vs: &nn::VarStore, path: &Path) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.to_device(Device::Cpu)))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    save_tensors(
        path,
        &tensors,
        Some([("format".to_string(), "pt".to_string())].into()),
    )
}

/// Every image of `split` of `datasets`, `[n, 3, resolution, resolution]` in [-1, 1].
pub fn split_images(
    datasets: &[&Path],
    split: Split,
    resolution: u32,
    seed: u64,
) -> Result<Tensor> {
    let mut parts = Vec::new();
    for path in datasets {
        let dataset = Dataset::open(
            path,
            &DatasetOptions {
                split,
                ..Default::default()
            },
        )?;
        let sources: Vec<_> = dataset.samples.iter().map(|s| &s.image).collect();
        let pre = Preprocess {
            resolution,
            ..Preprocess::default()
        };
        parts.push(load_batch(&sources, &pre, seed, true)?.images);
    }
    if parts.is_empty() {
        bail!("no dataset to train the tiny VAE on");
    }
    Ok(Tensor::cat(&parts, 0).to_kind(Kind::Float))
}
