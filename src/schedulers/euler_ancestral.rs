//! Ancestral Euler sampling (k-diffusion's `sample_euler_ancestral`, eta = 1): diffusers'
//! `EulerAncestralDiscreteScheduler`. Each step goes down to `sigma_down` deterministically and
//! adds fresh noise of scale `sigma_up`.
//!
//! The noise comes from torch's global CPU generator (seed it with `tch::manual_seed`), drawn
//! with `randn` of the model output's shape and kind, once per step including the last, and then
//! moved to the sample's device. That is what diffusers draws with a CPU generator (or on the CPU
//! without one), so a run seeded like diffusers' reproduces it exactly, provided nothing else
//! draws from the generator in between.
use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::ddpm::NoiseSchedule;
use super::euler::{
    init_noise_sigma, interpolated_sigmas, predicted_x0, scale_to_unit_variance,
    training_sigmas_descending,
};
use super::torch_f32::sqrt;
use super::{check_step_index, upcast, Scheduler};
use anyhow::Result;
use tch::{Device, Tensor};

pub struct EulerAncestralDiscreteScheduler {
    schedule: NoiseSchedule,
    prediction_type: PredictionType,
    timestep_spacing: TimestepSpacing,
    steps_offset: i64,
    timesteps: Vec<f64>,
    /// One per timestep plus the final 0, f32 as diffusers keeps them.
    sigmas: Vec<f32>,
}

impl EulerAncestralDiscreteScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config.ensure_unsupported_at_defaults("euler_ancestral", &["rescale_betas_zero_snr"])?;
        let schedule = NoiseSchedule::from_config(config)?;
        let sigmas = training_sigmas_descending(&schedule);
        Ok(Self {
            schedule,
            prediction_type: config.prediction_type(),
            timestep_spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset(),
            timesteps: Vec::new(),
            sigmas,
        })
    }

    /// The noise level of each step, then the final 0 (`timesteps().len() + 1` values).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let (timesteps, mut sigmas) = interpolated_sigmas(
            &self.schedule,
            self.timestep_spacing,
            self.steps_offset,
            num_inference_steps,
        )?;
        sigmas.push(0.0);
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        init_noise_sigma(&self.sigmas, self.timestep_spacing)
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        Ok(scale_to_unit_variance(sample, self.sigmas[step_index]))
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        let (sigma_from, sigma_to) = (self.sigmas[step_index], self.sigmas[step_index + 1]);
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
