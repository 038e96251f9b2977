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
use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// How the tiny model's VAE is trained (`[model.tiny_vae]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TinyVaeTraining {
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
    /// Mean squared reconstruction error (images in [-1, 1]) over the last tenth of the steps.
    pub reconstruction_mse: f64,
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
    let images = training_images(datasets, resolution, settings.seed)?.to_device(device);
    let n = images.size()[0] as usize;
    let side = resolution as i64;
    let crop = match settings.crop {
        0 => side,
        c if c % 8 == 0 => (c as i64).min(side),
        c => bail!("model.tiny_vae.crop {c} is not a multiple of 8"),
    };
    let config_path = model.join("vae").join("config.json");
    let weights_path = model
        .join("vae")
        .join("diffusion_pytorch_model.safetensors");
    let mut config = VaeConfig::from_file(&config_path)?;
    let vs = nn::VarStore::new(device);
    let vae = AutoencoderKL::new(vs.root(), &config)?;
    load_vae_weights(&vs, std::slice::from_ref(&weights_path))?;
    let params: Vec<Tensor> = vs.trainable_variables();
    let mut optimizer = AdamW::new(
        params,
        AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
    )?;

    let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
    let mut order: Vec<i64> = Vec::new();
    let mut recent = Vec::new();
    let bar = if progress {
        indicatif::ProgressBar::new(settings.steps as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "tiny VAE {bar:30} {pos}/{len} mse {msg} {per_sec} ETA {eta}",
        )
        .expect("valid template"),
    );
    for step in 0..settings.steps {
        if order.len() < settings.batch_size {
            let mut epoch: Vec<i64> = (0..n as i64).collect();
            epoch.shuffle(&mut rng);
            order.extend(epoch);
        }
        let batch: Vec<i64> = order.drain(..settings.batch_size.min(n)).collect();
        let mut x = images.index_select(0, &Tensor::from_slice(&batch).to_device(device));
        if crop < side {
            let (top, left) = (
                rng.random_range(0..=side - crop),
                rng.random_range(0..=side - crop),
            );
            x = x.narrow(2, top, crop).narrow(3, left, crop);
        }
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
        recent.push(mse.double_value(&[]));
        bar.set_message(format!("{:.4}", recent[step]));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let tail = &recent[recent.len() - (recent.len() / 10).max(1).min(recent.len())..];
    let reconstruction_mse = if tail.is_empty() {
        f64::NAN
    } else {
        tail.iter().sum::<f64>() / tail.len() as f64
    };

    let latent_std = tch::no_grad(|| {
        let latents: Vec<Tensor> = images
            .split(64, 0)
            .iter()
            .map(|x| vae.encode(x).sample())
            .collect();
        Tensor::cat(&latents, 0).std(true).double_value(&[])
    });
    if !(latent_std.is_finite() && latent_std > 0.0) {
        bail!("the trained tiny VAE's latents have standard deviation {latent_std}");
    }
    config.scaling_factor = 1.0 / latent_std;
    let mut tensors: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.to_device(Device::Cpu)))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    save_tensors(
        &weights_path,
        &tensors,
        Some([("format".to_string(), "pt".to_string())].into()),
    )?;
    crate::util::fs::set_json_field(&config_path, "scaling_factor", config.scaling_factor)?;
    Ok(TinyVaeReport {
        reconstruction_mse,
        scaling_factor: config.scaling_factor,
    })
}

/// Every training image of `datasets`, `[n, 3, resolution, resolution]` in [-1, 1].
fn training_images(datasets: &[&Path], resolution: u32, seed: u64) -> Result<Tensor> {
    let mut parts = Vec::new();
    for path in datasets {
        let dataset = Dataset::open(
            path,
            &DatasetOptions {
                split: Split::Train,
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
