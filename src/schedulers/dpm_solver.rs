//! DPM-Solver++ multistep (arXiv:2211.01095; "DPM++ 2M" at order 2): diffusers'
//! `DPMSolverMultistepScheduler` with `algorithm_type: dpmsolver++`. It integrates the
//! data-prediction ODE in log-SNR time `lambda = log(alpha / sigma)`, reusing the previous step's
//! x0 estimate for the second-order term; the first step, and the last one where diffusers
//! asks for it (`lower_order_final`, `final_sigmas_type: zero`), are first order.
use super::config::{FinalSigmas, PredictionType, SchedulerConfig, TimestepSpacing};
use super::ddpm::NoiseSchedule;
use super::torch_f32::{exp, ln, sqrt};
use super::{check_num_steps, check_step_index, numpy, spacing, upcast, Scheduler};
use anyhow::{bail, ensure, Result};
use tch::Tensor;

/// The second-order update's estimate of the x0 derivative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

pub struct DpmSolverMultistepScheduler {
    schedule: NoiseSchedule,
    prediction_type: PredictionType,
    timestep_spacing: TimestepSpacing,
    steps_offset: i64,
    final_sigmas_type: FinalSigmas,
    solver_order: usize,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    timesteps: Vec<f64>,
    /// One per timestep plus the final one, f32 as diffusers keeps them.
    sigmas: Vec<f32>,
    /// The x0 estimate of the previous step, kept at second order (none on a run's first step,
    /// which is therefore first order: diffusers' `lower_order_nums < 1`).
    previous_x0: Option<Tensor>,
}

impl DpmSolverMultistepScheduler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config.ensure_unsupported_at_defaults(
            "dpmsolver++",
            &[
                "thresholding",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "use_lu_lambdas",
                "use_flow_sigmas",
                "use_dynamic_shifting",
                "variance_type",
                "lambda_min_clipped",
                "rescale_betas_zero_snr",
            ],
        )?;
        // diffusers maps the DEIS and UniPC variants onto these when converting configs.
        match config.algorithm_type.as_deref() {
            None | Some("dpmsolver++") | Some("deis") => {}
            Some(other) => bail!("scheduler `dpmsolver++`: algorithm_type `{other}` is not supported (only dpmsolver++)"),
        }
        let solver_type = match config.solver_type.as_deref() {
            None | Some("midpoint") | Some("logrho") | Some("bh1") | Some("bh2") => {
                SolverType::Midpoint
            }
            Some("heun") => SolverType::Heun,
            Some(other) => bail!("scheduler `dpmsolver++`: unknown solver_type `{other}`"),
        };
        let solver_order = config.solver_order.unwrap_or(2);
        ensure!(
            (1..=2).contains(&solver_order),
            "scheduler `dpmsolver++`: solver_order {solver_order} is not supported (1 or 2)"
        );
        let schedule = NoiseSchedule::from_config(config)?;
        Ok(Self {
            schedule,
            prediction_type: config.prediction_type(),
            timestep_spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset(),
            final_sigmas_type: config.final_sigmas_type.unwrap_or(FinalSigmas::Zero),
            solver_order,
            solver_type,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            previous_x0: None,
        })
    }

    /// The noise level of each step, then the final one (`timesteps().len() + 1` values).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

/// `(alpha_t, sigma_t, lambda_t)` of the VP process at Karras noise level `sigma`, in f32.
fn vp_coefficients(sigma: f32) -> (f32, f32, f32) {
    let alpha = 1.0 / sqrt(sigma * sigma + 1.0);
    let sigma_t = sigma * alpha;
    (alpha, sigma_t, ln(alpha) - ln(sigma_t))
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let train = self.schedule.num_train_timesteps();
        check_num_steps(num_inference_steps, train)?;
        let n = num_inference_steps;
        // With lambda_min_clipped at its default (-inf) nothing is clipped.
        let timesteps = spacing::dpm_descending(self.timestep_spacing, train, n, self.steps_offset);
        let table = self.schedule.sigmas();
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| numpy::interp(t, table) as f32)
            .collect();
        sigmas.push(match self.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => self.schedule.sigma_min(),
        });
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.previous_x0 = None;
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
        let len = self.timesteps.len();
        check_step_index(step_index, len)?;
        let is_last = step_index == len - 1;
        let lower_order_final = is_last
            && (self.euler_at_final
                || (self.lower_order_final && len < 15)
                || self.final_sigmas_type == FinalSigmas::Zero);

        let sample = upcast(sample);
        let output = upcast(model_output);
        let (alpha_s0, sigma_s0, lambda_s0) = vp_coefficients(self.sigmas[step_index]);
        let x0 = match self.prediction_type {
            PredictionType::Epsilon => (&sample - &output * sigma_s0 as f64) / alpha_s0 as f64,
            PredictionType::VPrediction => &sample * alpha_s0 as f64 - &output * sigma_s0 as f64,
        };
        let (alpha_t, sigma_t, lambda_t) = vp_coefficients(self.sigmas[step_index + 1]);
        let h = lambda_t - lambda_s0;
        let x0_coeff = alpha_t * (exp(-h) - 1.0);
        let decay = &sample * (sigma_t / sigma_s0) as f64;

        let prev_sample = match self.previous_x0.take() {
            Some(m1) if step_index >= 1 && !lower_order_final => {
                let (_, _, lambda_s1) = vp_coefficients(self.sigmas[step_index - 1]);
                let r0 = (lambda_s0 - lambda_s1) / h;
                let d1 = (&x0 - m1) * (1.0 / r0) as f64;
                let d1_coeff = match self.solver_type {
                    SolverType::Midpoint => -(0.5 * x0_coeff),
                    SolverType::Heun => alpha_t * ((exp(-h) - 1.0) / h + 1.0),
                };
                decay - &x0 * x0_coeff as f64 + d1 * d1_coeff as f64
            }
            _ => decay - &x0 * x0_coeff as f64,
        };
        if self.solver_order == 2 {
            self.previous_x0 = Some(x0);
        }
        Ok(prev_sample.to_kind(model_output.kind()))
    }
}
