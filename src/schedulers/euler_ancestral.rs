//! Ancestral Euler sampling (k-diffusion's `sample_euler_ancestral`, eta = 1): diffusers'
//! `EulerAncestralDiscreteScheduler`. Each step goes down to `sigma_down` deterministically and
//! adds fresh noise of scale `sigma_up`.
//!
//! The noise comes from torch's global CPU generator (seed it with `tch::manual_seed`), drawn
//! with `randn` of the model output's shape and kind, once per step including the last, and then
//! moved to the sample's device. That is what diffusers draws with a CPU generator (or on the CPU
//! without one), so a run seeded like diffusers' reproduces it exactly, provided nothing else
//! draws from the generator in between.
use super::config::{FinalSigmas, PredictionType, SchedulerConfig};
use super::euler::{predicted_x0, SigmaSteps};
use super::torch_f32::sqrt;
use super::{upcast, Scheduler};
use anyhow::Result;
use tch::{Device, Tensor};

pub struct EulerAncestralDiscreteScheduler {
    prediction_type: PredictionType,
    steps: SigmaSteps,
}

impl EulerAncestralDiscreteScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config.ensure_unsupported_at_defaults("euler_ancestral", &["rescale_betas_zero_snr"])?;
        Ok(Self {
            prediction_type: config.prediction_type(),
            steps: SigmaSteps::new(config)?,
        })
    }

    /// The noise level of each step, then the final 0 (`timesteps().len() + 1` values).
    pub fn sigmas(&self) -> &[f32] {
        &self.steps.sigmas
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.steps.set(num_inference_steps, FinalSigmas::Zero)
    }

    fn timesteps(&self) -> &[f64] {
        &self.steps.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.steps.init_noise_sigma()
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        self.steps.scale_model_input(sample, step_index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let (sigma_from, sigma_to) = self.steps.sigma_pair(step_index)?;
        let sample = upcast(sample);
        let pred_x0 = predicted_x0(
            self.prediction_type,
            &upcast(model_output),
            &sample,
            sigma_from,
        );
        let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
        let sigma_up = sqrt(to2 * (from2 - to2) / from2);
        let sigma_down = sqrt(to2 - sigma_up * sigma_up);
        let derivative = (&sample - pred_x0) / sigma_from as f64;
        let dt = sigma_down - sigma_from;
        let prev_sample = sample + derivative * dt as f64;
        let noise = Tensor::randn(model_output.size(), (model_output.kind(), Device::Cpu))
            .to_device(model_output.device());
        Ok((prev_sample + noise * sigma_up as f64).to_kind(model_output.kind()))
    }
}
