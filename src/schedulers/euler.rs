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
    schedule: NoiseSchedule,
    prediction_type: PredictionType,
    timestep_spacing: TimestepSpacing,
    steps_offset: i64,
    final_sigmas_type: FinalSigmas,
    timesteps: Vec<f64>,
    /// One per timestep plus the final one, f32 as diffusers keeps them.
    sigmas: Vec<f32>,
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
        let schedule = NoiseSchedule::from_config(config)?;
        let sigmas = training_sigmas_descending(&schedule);
        Ok(Self {
            schedule,
            prediction_type: config.prediction_type(),
            timestep_spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset(),
            final_sigmas_type: config.final_sigmas_type.unwrap_or(FinalSigmas::Zero),
            timesteps: Vec::new(),
            sigmas,
        })
    }

    /// The noise level of each step, then the final one (`timesteps().len() + 1` values).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let (timesteps, mut sigmas) = interpolated_sigmas(
            &self.schedule,
            self.timestep_spacing,
            self.steps_offset,
            num_inference_steps,
        )?;
        sigmas.push(match self.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => self.schedule.sigma_min(),
        });
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
        let sigma = self.sigmas[step_index];
        let sample = upcast(sample);
        let pred_x0 = predicted_x0(self.prediction_type, &upcast(model_output), &sample, sigma);
        let derivative = (&sample - pred_x0) / sigma as f64;
        let dt = self.sigmas[step_index + 1] - sigma;
        Ok((sample + derivative * dt as f64).to_kind(model_output.kind()))
    }
}

/// `sqrt((1 - ᾱ) / ᾱ)` from the last training timestep to the first, then 0 (the tables diffusers'
/// sigma schedulers hold before `set_timesteps`).
pub(crate) fn training_sigmas_descending(schedule: &NoiseSchedule) -> Vec<f32> {
    let mut sigmas = schedule.sigmas().to_vec();
    sigmas.reverse();
    sigmas.push(0.0);
    sigmas
}

/// The Euler schedulers' float timesteps for `num_inference_steps` and the sigma linearly
/// interpolated at each (without the final sigma), as diffusers computes them.
pub(crate) fn interpolated_sigmas(
    schedule: &NoiseSchedule,
    spacing: TimestepSpacing,
    steps_offset: i64,
    num_inference_steps: usize,
) -> Result<(Vec<f64>, Vec<f32>)> {
    let train = schedule.num_train_timesteps();
    check_num_steps(num_inference_steps, train)?;
    let n = num_inference_steps;
    let timesteps: Vec<f32> = match spacing {
        TimestepSpacing::Linspace => numpy::linspace(0.0, (train - 1) as f64, n)
            .iter()
            .rev()
            .map(|&t| t as f32)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio) as f32 + steps_offset as f32)
                .collect()
        }
        TimestepSpacing::Trailing => numpy::arange(train as f64, 0.0, -(train as f64 / n as f64))
            .iter()
            .map(|t| t.round_ties_even() as f32 - 1.0)
            .collect(),
    };
    let table = schedule.sigmas();
    let sigmas = timesteps
        .iter()
        .map(|&t| numpy::interp(t as f64, table) as f32)
        .collect();
    Ok((timesteps.iter().map(|&t| t as f64).collect(), sigmas))
}

/// The initial noise scale: the largest sigma, or for `leading` spacing (whose first timestep is
/// not the last training one) the scale `sqrt(sigma² + 1)` of a sample at that sigma.
pub(crate) fn init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
        TimestepSpacing::Leading => sqrt(max * max + 1.0) as f64,
    }
}

/// `sample / sqrt(sigma² + 1)`: the U-Net input for a sample at noise level `sigma`.
pub(crate) fn scale_to_unit_variance(sample: &Tensor, sigma: f32) -> Tensor {
    sample / sqrt(sigma * sigma + 1.0) as f64
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
