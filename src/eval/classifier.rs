//! A content score that needs no downloaded weights: a small convolutional classifier trained on
//! labelled images to say two things of each image, which class (which dish) it shows and which
//! domain (source or target style) it is in. Applied to a set of generated images with their
//! prompted classes it gives the share drawn as the prompted dish ("is each dish kept?") and the
//! share in the target domain ("was the target's look learned?"), which FID on random Inception
//! features, weighing colour over shape, cannot tell apart.
//!
//! The network: three 3x3 convolutions (16, 32, 64 channels, ReLU, the first two followed by 2x2
//! max-pooling), global average pooling and one linear layer whose outputs are the class logits
//! followed by the two domain logits; trained with Adam on the sum of both cross-entropies, on
//! images resized to a fixed side, half of each batch blurred (halved and enlarged again) so that
//! it also reads the softer images a small VAE decodes. Seeded: the same images and settings give
//! the same weights.
use crate::data::images::DecodeOptions;
use crate::data::ImageSource;
use crate::model::weights::{read_all, save_tensors};
use anyhow::{bail, ensure, Context, Result};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// The two domains a [`ContentClassifier`] tells apart.
pub const DOMAINS: i64 = 2;
/// The domain label of target-style images (source style is 0).
pub const TARGET_DOMAIN: i64 = 1;

/// How the classifier is trained.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClassifierSettings {
    /// Adam steps. Default 400.
    pub steps: usize,
    /// Images per step. Default 64.
    pub batch_size: usize,
    /// Default 2e-3.
    pub learning_rate: f64,
    /// Side the images are resized to. Default 32.
    pub image_size: u32,
    /// Seeds the initial weights, the batches and the blurring. Default 0.
    pub seed: u64,
}

impl Default for ClassifierSettings {
    fn default() -> Self {
        Self {
            steps: 400,
            batch_size: 64,
            learning_rate: 2e-3,
            image_size: 32,
            seed: 0,
        }
    }
}

impl ClassifierSettings {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.steps > 0 && self.batch_size > 0 && self.image_size >= 8,
            "steps and batch_size must be positive and image_size at least 8"
        );
        ensure!(
            self.learning_rate.is_finite() && self.learning_rate > 0.0,
            "learning_rate must be a positive number, got {}",
            self.learning_rate
        );
        Ok(())
    }
}

/// Labelled images to train or test on: `[N, 3, S, S]` in [0, 1] with each image's class and
/// domain.
pub struct LabelledImages {
    pub images: Tensor,
    pub classes: Tensor,
    pub domains: Tensor,
}

impl LabelledImages {
    /// Decodes `items` (an image, its class index and its domain) at `size` x `size`.
    pub fn load(items: &[(ImageSource, i64, i64)], size: u32) -> Result<Self> {
        ensure!(!items.is_empty(), "no labelled images to load");
        let images = items
            .iter()
            .map(|(source, _, _)| {
                let image = crate::eval::images::load_image(source, &DecodeOptions::PILLOW_OPEN)?;
                Ok(resize(&image.unsqueeze(0), size))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            images: Tensor::cat(&images, 0),
            classes: Tensor::from_slice(&items.iter().map(|i| i.1).collect::<Vec<_>>()),
            domains: Tensor::from_slice(&items.iter().map(|i| i.2).collect::<Vec<_>>()),
        })
    }

    pub fn len(&self) -> usize {
        self.images.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `[N, 3, H, W]` images resized (bilinear) to `size` x `size`.
fn resize(images: &Tensor, size: u32) -> Tensor {
    let size = size as i64;
    match images.size()[2..] == [size, size] {
        true => images.shallow_clone(),
        false => images.upsample_bilinear2d([size, size], false, None, None),
    }
}

/// A trained classifier of class and domain.
pub struct ContentClassifier {
    vs: nn::VarStore,
    net: nn::Sequential,
    classes: i64,
    image_size: u32,
}

/// What a classifier says of a set of images: how many show the class they were meant to, and
/// how many are in the target domain.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ContentScore {
    /// Share of images classified as their intended class.
    pub class_accuracy: f64,
    /// Share of images classified as target-domain.
    pub target_share: f64,
}

impl ContentClassifier {
    fn build(classes: i64, image_size: u32, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let conv = |name: &str, i: i64, o: i64| {
            let config = nn::ConvConfig {
                padding: 1,
                ..Default::default()
            };
            nn::conv2d(&root / name, i, o, 3, config)
        };
        let net = nn::seq()
            .add(conv("conv1", 3, 16))
            .add_fn(|x| x.relu().max_pool2d_default(2))
            .add(conv("conv2", 16, 32))
            .add_fn(|x| x.relu().max_pool2d_default(2))
            .add(conv("conv3", 32, 64))
            .add_fn(|x| x.relu().mean_dim([2i64, 3].as_slice(), false, Kind::Float))
            .add(nn::linear(
                &root / "head",
                64,
                classes + DOMAINS,
                Default::default(),
            ));
        Self {
            vs,
            net,
            classes,
            image_size,
        }
    }

    /// Trains a classifier of `classes` classes on `data` (on the CPU).
    pub fn train(
        data: &LabelledImages,
        classes: usize,
        settings: &ClassifierSettings,
    ) -> Result<Self> {
        settings.validate()?;
        ensure!(classes > 0, "a classifier needs at least one class");
        tch::manual_seed(settings.seed as i64);
        let model = Self::build(classes as i64, settings.image_size, Device::Cpu);
        let images = resize(&data.images, settings.image_size);
        let mut optimizer = nn::Adam::default().build(&model.vs, settings.learning_rate)?;
        let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
        let n = data.len();
        for _ in 0..settings.steps {
            let picked: Vec<i64> = (0..settings.batch_size)
                .map(|_| rng.random_range(0..n) as i64)
                .collect();
            let index = Tensor::from_slice(&picked);
            let blur = Tensor::from_slice(
                &(0..picked.len())
                    .map(|_| rng.random_bool(0.5) as u8 as f32)
                    .collect::<Vec<_>>(),
            )
            .view([-1, 1, 1, 1]);
            let batch = images.index_select(0, &index);
            let blurred = soften(&batch);
            let batch = &batch * (&blur * -1.0 + 1.0) + blurred * &blur;
            let logits = model.logits(&batch);
            let loss = logits
                .narrow(1, 0, model.classes)
                .cross_entropy_for_logits(&data.classes.index_select(0, &index))
                + logits
                    .narrow(1, model.classes, DOMAINS)
                    .cross_entropy_for_logits(&data.domains.index_select(0, &index));
            optimizer.backward_step(&loss);
        }
        Ok(model)
    }

    fn logits(&self, images: &Tensor) -> Tensor {
        self.net.forward(&((images - 0.5) / 0.5))
    }

    /// The predicted class and domain of every image of `images` (`[N, 3, H, W]` in [0, 1]).
    pub fn predict(&self, images: &Tensor) -> (Vec<i64>, Vec<i64>) {
        let logits = tch::no_grad(|| self.logits(&resize(images, self.image_size)));
        let argmax = |t: Tensor| Vec::<i64>::try_from(t.argmax(1, false)).unwrap_or_default();
        (
            argmax(logits.narrow(1, 0, self.classes)),
            argmax(logits.narrow(1, self.classes, DOMAINS)),
        )
    }

    /// How `images` (decoded as for FID), each meant to show class `intended[i]`, are classified.
    pub fn score(&self, images: &[ImageSource], intended: &[i64]) -> Result<ContentScore> {
        ensure!(
            images.len() == intended.len() && !images.is_empty(),
            "a content score needs one intended class per image"
        );
        let items: Vec<(ImageSource, i64, i64)> = images
            .iter()
            .zip(intended)
            .map(|(image, &class)| (image.clone(), class, 0))
            .collect();
        let data = LabelledImages::load(&items, self.image_size)?;
        Ok(self.score_loaded(&data.images, intended, None).0)
    }

    /// The content score of loaded `images` and, when their `domains` are known, the accuracy
    /// of the domain prediction.
    pub fn score_loaded(
        &self,
        images: &Tensor,
        intended: &[i64],
        domains: Option<&[i64]>,
    ) -> (ContentScore, Option<f64>) {
        let (classes, predicted_domains) = self.predict(images);
        let share = |hits: usize| hits as f64 / intended.len() as f64;
        let correct = classes.iter().zip(intended).filter(|(a, b)| a == b).count();
        let target = predicted_domains
            .iter()
            .filter(|&&d| d == TARGET_DOMAIN)
            .count();
        let domain_accuracy = domains.map(|truth| {
            share(
                predicted_domains
                    .iter()
                    .zip(truth)
                    .filter(|(a, b)| a == b)
                    .count(),
            )
        });
        let score = ContentScore {
            class_accuracy: share(correct),
            target_share: share(target),
        };
        (score, domain_accuracy)
    }

    /// Saves the weights (safetensors) with the class count and image size in the metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(name, t)| (name, t.detach()))
            .collect();
        let meta = [
            ("classes".to_string(), self.classes.to_string()),
            ("image_size".to_string(), self.image_size.to_string()),
        ];
        save_tensors(path, &tensors, Some(meta.into()))
    }

    /// Loads a classifier [`Self::save`] wrote.
    pub fn load(path: &Path) -> Result<Self> {
        let meta = crate::model::weights::read_metadata(path)?;
        let number = |key: &str| -> Result<i64> {
            meta.get(key)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{} has no `{key}` in its metadata", path.display()))
        };
        let model = Self::build(
            number("classes")?,
            number("image_size")? as u32,
            Device::Cpu,
        );
        let weights = read_all(path)?;
        let mut vars = model.vs.variables();
        if vars.len() != weights.len() {
            bail!(
                "{} holds other weights than the classifier's",
                path.display()
            );
        }
        tch::no_grad(|| -> Result<()> {
            for (name, value) in &weights {
                let var = vars
                    .get_mut(name)
                    .with_context(|| format!("{}: unexpected tensor {name}", path.display()))?;
                var.copy_(value);
            }
            Ok(())
        })?;
        Ok(model)
    }
}

/// `images` halved and enlarged again: the softness of a small VAE's decoding.
fn soften(images: &Tensor) -> Tensor {
    let size = images.size();
    let (h, w) = (size[2], size[3]);
    images
        .upsample_bilinear2d([(h / 2).max(1), (w / 2).max(1)], false, None, None)
        .upsample_bilinear2d([h, w], false, None, None)
}
