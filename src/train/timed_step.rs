//! One tuning method's training step set up to be run again and again: the method attached to a
//! U-Net, the optimizer over its tensors and one batch of random latent-shaped inputs. The step
//! is the trainer's own (`forward_backward` and the flat AdamW update), so timing it times what a
//! run spends per step: `difftune bench` times one method after another, `compare`'s timing pass
//! interleaves them.
use super::optim::{AdamW, AdamWConfig};
use super::step::{attach_method, forward_backward, lay_out_for_training, Objective, StepInputs};
use crate::model::conditioning::{AddedConditions, SizeConditions, TextConditioning};
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::peft::{MethodSettings, Tuned};
use anyhow::Result;
use tch::{nn, Device, Kind, Tensor};

/// Learning rate of the timed steps (its value does not change the work done).
const LEARNING_RATE: f64 = 1e-5;

/// The inputs of a timed step and how it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepShape {
    pub batch: i64,
    /// Side of the square images, in pixels (SDXL's size conditions).
    pub resolution: i64,
    /// Side of the square latents.
    pub latent: i64,
    /// Length of the text context the U-Net cross-attends to.
    pub context_tokens: i64,
    /// bf16 autocast with frozen weights in bf16, as the trainer runs on CUDA.
    pub autocast: bool,
    /// The U-Net's convolution weights and the latents channels-last (NHWC).
    pub channels_last: bool,
    /// torch's fused AdamW kernel ([`AdamW::use_fused`]).
    pub fused_adamw: bool,
}

/// A method's training step, ready to run.
pub struct TimedStep {
    objective: Objective,
    unet: UNet2DConditionModel,
    /// The U-Net's and the method's variables, kept alive while the step runs.
    _vars: (nn::VarStore, Tuned),
    optimizer: AdamW,
    inputs: StepInputs,
    autocast: bool,
    device: Device,
    /// Parameters the method trains.
    pub trainable_params: i64,
}

impl TimedStep {
    /// `method` attached to `unet` (whose weights `unet_vs` holds; its new tensors initialised
    /// from seed 0), laid out as the trainer lays it out, with inputs of `shape` drawn from
    /// torch's global generator (callers seed it) and the noise and timesteps of `objective`.
    pub fn new(
        mut unet_vs: nn::VarStore,
        mut unet: UNet2DConditionModel,
        method: &MethodSettings,
        objective: Objective,
        shape: &StepShape,
    ) -> Result<Self> {
        let device = unet_vs.device();
        let tuned = attach_method(&mut unet, &mut unet_vs, method, 0)?;
        let tensors = lay_out_for_training(&unet_vs, &tuned, shape.autocast, shape.channels_last);
        let trainable_params = tensors.iter().map(|t| t.numel() as i64).sum();
        let mut optimizer = AdamW::new(tensors, AdamWConfig::default())?;
        if shape.fused_adamw {
            optimizer.use_fused()?;
        }
        let inputs = random_inputs(&unet, &objective, shape, device)?;
        Ok(Self {
            objective,
            unet,
            _vars: (unet_vs, tuned),
            optimizer,
            inputs,
            autocast: shape.autocast,
            device,
            trainable_params,
        })
    }

    /// One optimizer step: zeroed gradients, forward, loss, backward and the update (waited for on
    /// CUDA, so that timing it times all of it).
    pub fn step(&mut self) -> Result<()> {
        self.optimizer.zero_grad();
        let _loss = forward_backward(
            &self.unet,
            &self.objective,
            &self.inputs,
            self.autocast,
            1.0,
        )?;
        self.optimizer.step(LEARNING_RATE, Some(1.0))?;
        if let Device::Cuda(index) = self.device {
            tch::Cuda::synchronize(index as i64);
        }
        Ok(())
    }
}

/// Random text context of `shape` for a U-Net configured by `config` and, for SDXL's, random
/// pooled embeddings with the size conditions of an uncropped image.
fn random_conditioning(
    config: &UNetConfig,
    shape: &StepShape,
    device: Device,
) -> Result<TextConditioning> {
    let context = Tensor::randn(
        [
            shape.batch,
            shape.context_tokens,
            config.cross_attention_dim,
        ],
        (Kind::Float, device),
    );
    let added = config.added_embedding()?.map(|added| AddedConditions {
        text_embeds: Tensor::randn(
            [shape.batch, added.text_embeds_dim()],
            (Kind::Float, device),
        ),
        time_ids: SizeConditions::uncropped(shape.resolution, shape.resolution)
            .time_ids(shape.batch, device),
    });
    Ok(TextConditioning { context, added })
}

/// Random latents and text conditioning of `shape` for `unet`, with the objective's noise and
/// timesteps.
fn random_inputs(
    unet: &UNet2DConditionModel,
    objective: &Objective,
    shape: &StepShape,
    device: Device,
) -> Result<StepInputs> {
    let config = &unet.config;
    let latents = Tensor::randn(
        [shape.batch, config.in_channels, shape.latent, shape.latent],
        (Kind::Float, device),
    );
    let (noise, timesteps) = objective.draw(&latents)?;
    let inputs = StepInputs {
        latents,
        conditioning: random_conditioning(config, shape, device)?,
        noise,
        timesteps,
    };
    Ok(match shape.channels_last {
        true => inputs.into_channels_last(),
        false => inputs,
    })
}
