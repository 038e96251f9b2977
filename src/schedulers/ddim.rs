//! DDIM (arXiv:2010.02502), deterministic (eta = 0): diffusers' `DDIMScheduler`.
use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::ddpm::NoiseSchedule;
use super::torch_f32::sqrt;
use super::{check_num_steps, check_step_index, spacing, upcast, Scheduler};
use anyhow::Result;
use tch::Tensor;

pub struct DdimScheduler {
    schedule: NoiseSchedule,
    /// ᾱ used for the step past t = 0.
    final_alpha_cumprod: f32,
    prediction_type: PredictionType,
    /// Clamp range for the predicted x0 (`clip_sample`).
    clip_sample_range: Option<f64>,
    timestep_spacing: TimestepSpacing,
    steps_offset: i64,
    /// Distance to the previous timestep, `num_train_timesteps / num_inference_steps`.
    step_stride: i64,
    timesteps: Vec<f64>,
}

impl DdimScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config
            .ensure_unsupported_at_defaults("ddim", &["thresholding", "rescale_betas_zero_snr"])?;
        let schedule = NoiseSchedule::from_config(config)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            schedule.alpha_cumprod_at(0)?
        };
        let clip_sample_range = config
            .clip_sample
            .unwrap_or(true)
            .then(|| config.clip_sample_range.unwrap_or(1.0));
        Ok(Self {
            schedule,
            final_alpha_cumprod,
            prediction_type: config.prediction_type(),
            clip_sample_range,
            timestep_spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Leading),
            steps_offset: config.steps_offset(),
            step_stride: 0,
            timesteps: Vec::new(),
        })
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let train = self.schedule.num_train_timesteps();
        check_num_steps(num_inference_steps, train)?;
        let n = num_inference_steps;
        self.timesteps =
            spacing::integral_descending(self.timestep_spacing, train, n, self.steps_offset);
        self.step_stride = (train / n) as i64;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        let t = self.timesteps[step_index] as i64;
        let prev_t = t - self.step_stride;
        let alpha = self.schedule.alpha_cumprod_at(t)?;
        let alpha_prev = if prev_t >= 0 {
            self.schedule.alpha_cumprod_at(prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        let beta = 1.0 - alpha;
        let (sample, output) = (upcast(sample), upcast(model_output));

        let (pred_x0, pred_epsilon) = match self.prediction_type {
            PredictionType::Epsilon => (
                (&sample - &output * sqrt(beta) as f64) / sqrt(alpha) as f64,
                output,
            ),
            PredictionType::VPrediction => (
                &sample * sqrt(alpha) as f64 - &output * sqrt(beta) as f64,
                &output * sqrt(alpha) as f64 + &sample * sqrt(beta) as f64,
            ),
        };
        let pred_x0 = match self.clip_sample_range {
            Some(range) => pred_x0.clamp(-range, range),
            None => pred_x0,
        };
        // eta = 0: no added noise, the whole remaining variance points along the predicted noise.
        let direction = pred_epsilon * sqrt(1.0 - alpha_prev) as f64;
        let prev_sample = pred_x0 * sqrt(alpha_prev) as f64 + direction;
        Ok(prev_sample.to_kind(model_output.kind()))
    }
}
