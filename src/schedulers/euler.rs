//! Euler's method on the probability-flow ODE in Karras' sigma parametrisation (arXiv:2206.00364,
//! Algorithm 2 without churn): diffusers' `EulerDiscreteScheduler`. Samples live at scale
//! `sqrt(1 + sigma²)`; the U-Net sees them scaled back and gets the (possibly fractional)
//! timestep the sigma was interpolated at.
use super::config::{FinalSigmas, PredictionType, SchedulerConfig, TimestepSpacing};
use super::ddpm::NoiseSchedule;
use super::torch_f32::sqrt;
use super::{check_num_steps, check_step_index, numpy, upcast, Scheduler};
use anyhow::Result;
use tch::Tensor;

pub struct EulerDiscreteScheduler {
    prediction_type: PredictionType,
    final_sigmas_type: FinalSigmas,
    steps: SigmaSteps,
}

impl EulerDiscreteScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config.ensure_unsupported_at_defaults(
            "euler",
            &[
                "interpolation_type",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "timestep_type",
                "rescale_betas_zero_snr",
            ],
        )?;
        Ok(Self {
            prediction_type: config.prediction_type(),
            final_sigmas_type: config.final_sigmas_type.unwrap_or(FinalSigmas::Zero),
            steps: SigmaSteps::new(config)?,
        })
    }

    /// The noise level of each step, then the final one (`timesteps().len() + 1` values).
    pub fn sigmas(&self) -> &[f32] {
        &self.steps.sigmas
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.steps.set(num_inference_steps, self.final_sigmas_type)
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
        let (sigma, sigma_next) = self.steps.sigma_pair(step_index)?;
        let sample = upcast(sample);
        let pred_x0 = predicted_x0(self.prediction_type, &upcast(model_output), &sample, sigma);
        let derivative = (&sample - pred_x0) / sigma as f64;
        let dt = sigma_next - sigma;
        Ok((sample + derivative * dt as f64).to_kind(model_output.kind()))
    }
}

/// What both Euler schedulers step along: the timesteps of a run and the sigma interpolated at
/// each, with the spacing that chose them.
pub(crate) struct SigmaSteps {
    schedule: NoiseSchedule,
    spacing: TimestepSpacing,
    steps_offset: i64,
    pub(super) timesteps: Vec<f64>,
    /// One per timestep plus the final one, f32 as diffusers keeps them.
    pub(super) sigmas: Vec<f32>,
}

impl SigmaSteps {
    pub(crate) fn new(config: &SchedulerConfig) -> Result<Self> {
        let schedule = NoiseSchedule::from_config(config)?;
        let sigmas = training_sigmas_descending(&schedule);
        Ok(Self {
            schedule,
            spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset(),
            timesteps: Vec::new(),
            sigmas,
        })
    }

    /// Prepares `num_inference_steps` steps ending at the `last` sigma.
    pub(crate) fn set(&mut self, num_inference_steps: usize, last: FinalSigmas) -> Result<()> {
        let (timesteps, mut sigmas) = interpolated_sigmas(
            &self.schedule,
            self.spacing,
            self.steps_offset,
            num_inference_steps,
        )?;
        sigmas.push(match last {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => self.schedule.sigma_min(),
        });
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        Ok(())
    }

    /// The initial noise scale: the largest sigma, or for `leading` spacing (whose first
    /// timestep is not the last training one) the scale `sqrt(sigma² + 1)` of a sample at that
    /// sigma.
    pub(crate) fn init_noise_sigma(&self) -> f64 {
        let max = self
            .sigmas
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        match self.spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
            TimestepSpacing::Leading => sqrt(max * max + 1.0) as f64,
        }
    }

    /// `sample / sqrt(sigma² + 1)`: the U-Net input for a sample at step `step_index`'s sigma.
    pub(crate) fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let (sigma, _) = self.sigma_pair(step_index)?;
        Ok(sample / sqrt(sigma * sigma + 1.0) as f64)
    }

    /// The sigmas of step `step_index` and of the step after it.
    pub(crate) fn sigma_pair(&self, step_index: usize) -> Result<(f32, f32)> {
        check_step_index(step_index, self.timesteps.len())?;
        Ok((self.sigmas[step_index], self.sigmas[step_index + 1]))
    }
}

/// `sqrt((1 - ᾱ) / ᾱ)` from the last training timestep to the first, then 0 (the tables diffusers'
/// sigma schedulers hold before `set_timesteps`).
fn training_sigmas_descending(schedule: &NoiseSchedule) -> Vec<f32> {
    let mut sigmas = schedule.sigmas().to_vec();
    sigmas.reverse();
    sigmas.push(0.0);
    sigmas
}

/// The Euler schedulers' float timesteps for `num_inference_steps` and the sigma linearly
/// interpolated at each (without the final sigma), as diffusers computes them.
fn interpolated_sigmas(
    schedule: &NoiseSchedule,
    spacing: TimestepSpacing,
    steps_offset: i64,
    num_inference_steps: usize,
) -> Result<(Vec<f64>, Vec<f32>)> {
    let train = schedule.num_train_timesteps();
    check_num_steps(num_inference_steps, train)?;
    let n = num_inference_steps;
    // f32, as diffusers keeps them.
    let timesteps: Vec<f32> = super::spacing::descending(spacing, train, n, steps_offset)
        .into_iter()
        .map(|t| t as f32)
        .collect();
    let table = schedule.sigmas();
    let sigmas = timesteps
        .iter()
        .map(|&t| numpy::interp(t as f64, table) as f32)
        .collect();
    Ok((timesteps.iter().map(|&t| t as f64).collect(), sigmas))
}

/// The denoised estimate from the model output at noise level `sigma`.
pub(crate) fn predicted_x0(
    prediction_type: PredictionType,
    output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Tensor {
    match prediction_type {
        PredictionType::Epsilon => sample - output * sigma as f64,
        // c_out * v + c_skip * sample
        PredictionType::VPrediction => {
            let variance = sigma * sigma + 1.0;
            output * (-sigma / sqrt(variance)) as f64 + sample / variance as f64
        }
    }
}
