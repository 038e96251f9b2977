//! PNDM (arXiv:2202.09778) in its PLMS form (`skip_prk_steps`, as Stable Diffusion ships it):
//! diffusers' `PNDMScheduler`. A linear multistep method over the model outputs of up to the 4
//! previous steps; its warm-up revisits the first timestep once (a second-order step), which is
//! why the schedule repeats one timestep.
use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::ddpm::NoiseSchedule;
use super::torch_f32::sqrt;
use super::{check_num_steps, check_step_index, spacing, upcast, Scheduler};
use anyhow::{bail, ensure, Context, Result};
use tch::Tensor;

pub struct PndmScheduler {
    schedule: NoiseSchedule,
    final_alpha_cumprod: f32,
    prediction_type: PredictionType,
    timestep_spacing: TimestepSpacing,
    steps_offset: i64,
    step_stride: i64,
    timesteps: Vec<f64>,
    /// Model outputs of the latest steps, oldest first (diffusers' `ets`, at most 4).
    history: Vec<Tensor>,
    /// The sample of the first step, which the warm-up's second step restarts from.
    first_sample: Option<Tensor>,
    /// Steps taken since `set_timesteps`.
    counter: usize,
}

impl PndmScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        ensure!(
            config.skip_prk_steps == Some(true),
            "scheduler `pndm`: only the PLMS form (`skip_prk_steps: true`, as in Stable Diffusion's config) is \
             implemented; the config leaves the Runge-Kutta warm-up on"
        );
        let schedule = NoiseSchedule::from_config(config)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            schedule.alpha_cumprod_at(0)?
        };
        Ok(Self {
            schedule,
            final_alpha_cumprod,
            prediction_type: config.prediction_type(),
            timestep_spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Leading),
            steps_offset: config.steps_offset(),
            step_stride: 0,
            timesteps: Vec::new(),
            history: Vec::new(),
            first_sample: None,
            counter: 0,
        })
    }

    /// Formula (9) of the PNDM paper: the sample at `prev_t` from the one at `t` and a noise
    /// estimate.
    fn prev_sample(
        &self,
        sample: &Tensor,
        t: i64,
        prev_t: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let alpha = self.schedule.alpha_cumprod_at(t)?;
        let alpha_prev = if prev_t >= 0 {
            self.schedule.alpha_cumprod_at(prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        let beta = 1.0 - alpha;
        let beta_prev = 1.0 - alpha_prev;
        let epsilon = match self.prediction_type {
            PredictionType::Epsilon => model_output.shallow_clone(),
            PredictionType::VPrediction => {
                model_output * sqrt(alpha) as f64 + sample * sqrt(beta) as f64
            }
        };
        let sample_coeff = sqrt(alpha_prev / alpha);
        let epsilon_denom = alpha * sqrt(beta_prev) + sqrt(alpha * beta * alpha_prev);
        Ok(sample * sample_coeff as f64
            - epsilon * (alpha_prev - alpha) as f64 / epsilon_denom as f64)
    }
}

impl Scheduler for PndmScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let train = self.schedule.num_train_timesteps();
        check_num_steps(num_inference_steps, train)?;
        let n = num_inference_steps;
        // Built ascending, then reversed with the second sampling timestep repeated for the warm-up.
        let mut ascending =
            spacing::integral_descending(self.timestep_spacing, train, n, self.steps_offset);
        ascending.reverse();
        let len = ascending.len();
        let mut timesteps = ascending[..len - 1].to_vec();
        if len >= 2 {
            timesteps.push(ascending[len - 2]);
        }
        timesteps.push(ascending[len - 1]);
        timesteps.reverse();
        self.timesteps = timesteps;
        self.step_stride = (train / n) as i64;
        self.history.clear();
        self.first_sample = None;
        self.counter = 0;
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
        let output = upcast(model_output);
        let mut sample = upcast(sample);
        let mut t = self.timesteps[step_index] as i64;
        let mut prev_t = t - self.step_stride;
        if self.counter == 1 {
            // The warm-up's second evaluation: step again from the first sample, from its
            // timestep, averaging both outputs (the repeated timestep is the target).
            prev_t = t;
            t += self.step_stride;
        } else {
            let keep_from = self.history.len().saturating_sub(3);
            self.history.drain(..keep_from);
            self.history.push(output.shallow_clone());
        }
        let h = &self.history;
        let combined = match (h.len(), self.counter) {
            (1, 0) => {
                self.first_sample = Some(sample.shallow_clone());
                output
            }
            (1, 1) => {
                sample = self
                    .first_sample
                    .take()
                    .context("PNDM: the warm-up lost its first sample")?;
                (output + &h[0]) / 2.0
            }
            (2, _) => (&h[1] * 3.0 - &h[0]) / 2.0,
            (3, _) => (&h[2] * 23.0 - &h[1] * 16.0 + &h[0] * 5.0) / 12.0,
            (4, _) => (&h[3] * 55.0 - &h[2] * 59.0 + &h[1] * 37.0 - &h[0] * 9.0) * (1.0 / 24.0),
            (len, counter) => {
                bail!("PNDM: inconsistent history ({len} outputs after {counter} steps)")
            }
        };
        let prev_sample = self.prev_sample(&sample, t, prev_t, &combined)?;
        self.counter += 1;
        Ok(prev_sample.to_kind(model_output.kind()))
    }
}
