//! The training objective and the single training step (forward, loss, backward), shared by the
//! training loop and the `bench` command: DDPM noising with the model's scheduler, epsilon or v
//! targets, optional min-SNR-γ weighting and noise offset, as diffusers' `train_text_to_image.py`.
use super::config::{PredictionTarget, TrainConfig};
use crate::model::conditioning::TextConditioning;
use crate::model::unet::UNet2DConditionModel;
use crate::peft::{MethodSettings, Tuned};
use crate::schedulers::{NoiseSchedule, PredictionType, SchedulerConfig};
use anyhow::{ensure, Result};
use tch::{nn, Kind, Tensor};

/// Attaches `method` to `unet`, freezes every U-Net weight and makes exactly the method's
/// tensors trainable; the method's new tensors are initialised from `seed`.
pub fn attach_method(
    unet: &mut UNet2DConditionModel,
    unet_vs: &mut nn::VarStore,
    method: &MethodSettings,
    seed: u64,
) -> Result<Tuned> {
    unet_vs.freeze();
    let tuned = Tuned::attach(method.build(), unet, unet_vs, seed)?;
    ensure!(
        !tuned.trained.is_empty(),
        "method `{}` made nothing trainable",
        method.name()
    );
    for (_, t) in &tuned.trained {
        let _ = t.set_requires_grad(true);
    }
    Ok(tuned)
}

/// Lays the model out for training once the method is attached, and returns the tensors the
/// optimizer trains: the frozen weights stored in bf16 when the step runs under `autocast`, every
/// 4-D weight (the U-Net's and the method's) channels-last when `channels_last`. Call it before
/// [`AdamW::new`](super::optim::AdamW::new), whose flat buffer keeps each tensor's layout as it
/// finds it.
pub fn lay_out_for_training(
    unet_vs: &nn::VarStore,
    tuned: &Tuned,
    autocast: bool,
    channels_last: bool,
) -> Vec<Tensor> {
    let tensors: Vec<Tensor> = tuned
        .trained
        .iter()
        .map(|(_, t)| t.shallow_clone())
        .collect();
    if autocast {
        super::precision::freeze_to_bf16(unet_vs, &tensors);
    }
    if channels_last {
        crate::model::memory_format::to_channels_last(unet_vs);
        crate::model::memory_format::to_channels_last(&tuned.params);
    }
    tensors
}

/// What the U-Net is trained on, given clean latents.
pub struct Objective {
    pub schedule: NoiseSchedule,
    pub prediction: PredictionType,
    /// Min-SNR-γ weighting when set.
    pub snr_gamma: Option<f64>,
    pub noise_offset: f64,
}

impl Objective {
    pub fn new(scheduler: &SchedulerConfig, train: &TrainConfig) -> Result<Self> {
        let prediction = match train.prediction_type {
            PredictionTarget::Scheduler => {
                scheduler.prediction_type.unwrap_or(PredictionType::Epsilon)
            }
            PredictionTarget::Epsilon => PredictionType::Epsilon,
            PredictionTarget::VPrediction => PredictionType::VPrediction,
        };
        Ok(Self {
            schedule: NoiseSchedule::from_config(scheduler)?,
            prediction,
            snr_gamma: (train.snr_gamma > 0.0).then_some(train.snr_gamma),
            noise_offset: train.noise_offset,
        })
    }

    /// Draws the noise (with its offset) and the timesteps for `latents` `[b, c, h, w]` from
    /// torch's global generator (callers seed it).
    pub fn draw(&self, latents: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, c, _, _) = latents.size4()?;
        let device = latents.device();
        let mut noise = latents.randn_like();
        if self.noise_offset > 0.0 {
            noise += Tensor::randn([b, c, 1, 1], (Kind::Float, device)) * self.noise_offset;
        }
        let steps = self.schedule.num_train_timesteps() as i64;
        let timesteps = Tensor::randint(steps, [b], (Kind::Int64, device));
        Ok((noise, timesteps))
    }
}

/// One forward pass's inputs, on the training device, with every random draw already made.
pub struct StepInputs {
    /// Clean latents, already scaled by the VAE's scaling factor: `[b, 4, h, w]` f32.
    pub latents: Tensor,
    /// The text encoders' hidden states `[b, seq, cross_attention_dim]` f32 and, for SDXL, the
    /// pooled embeddings and each sample's size and crop conditions.
    pub conditioning: TextConditioning,
    /// The noise added to the latents (see [`Objective::draw`]).
    pub noise: Tensor,
    /// One diffusion timestep per sample `[b]` i64.
    pub timesteps: Tensor,
}

impl StepInputs {
    /// These inputs with the latents and the noise laid out channels-last (the same values; the
    /// noised latents, elementwise from both, follow), for a U-Net whose weights are.
    pub fn into_channels_last(self) -> Self {
        use crate::model::memory_format::channels_last;
        Self {
            latents: channels_last(&self.latents),
            noise: channels_last(&self.noise),
            ..self
        }
    }
}

/// Runs the U-Net on the noised latents — under bf16 autocast when `autocast` — and returns the
/// loss (an f32 scalar) after back-propagating `loss * loss_scale` (`1 / accumulation steps`).
pub fn forward_backward(
    unet: &UNet2DConditionModel,
    objective: &Objective,
    inputs: &StepInputs,
    autocast: bool,
    loss_scale: f64,
) -> Result<Tensor> {
    let latents = &inputs.latents;
    ensure!(
        latents.dim() == 4,
        "training latents must be [b, c, h, w], got {:?}",
        latents.size()
    );
    let device = latents.device();
    let (noise, timesteps) = (&inputs.noise, &inputs.timesteps);
    let noisy = objective.schedule.add_noise(latents, noise, timesteps)?;
    let target = match objective.prediction {
        PredictionType::Epsilon => noise.shallow_clone(),
        PredictionType::VPrediction => objective.schedule.velocity(latents, noise, timesteps)?,
    };
    // Checkpointed blocks (with `unet.gradient_checkpointing`) run again in the backward pass.
    crate::model::checkpoint::scope(|scope| {
        let prediction = if autocast {
            super::precision::bf16_autocast(device, || {
                unet.forward_in(Some(scope), &noisy, timesteps, &inputs.conditioning)
            })
        } else {
            unet.forward_in(Some(scope), &noisy, timesteps, &inputs.conditioning)
        };
        let error = (prediction.to_kind(Kind::Float) - target).square();
        let loss = match objective.snr_gamma {
            None => error.mean(Kind::Float),
            Some(gamma) => {
                let snr = objective.schedule.snr(timesteps)?;
                let clipped = snr.clamp_max(gamma);
                let weights = match objective.prediction {
                    PredictionType::Epsilon => clipped / &snr,
                    PredictionType::VPrediction => clipped / (snr + 1.0),
                };
                (error.mean_dim([1i64, 2, 3].as_slice(), false, Kind::Float) * weights)
                    .mean(Kind::Float)
            }
        };
        (&loss * loss_scale).backward();
        Ok(loss.detach())
    })
}
