//! The DDPM forward (noising) process: the beta schedule, `alphas_cumprod`, and the training-side
//! operations built on it, computed exactly as diffusers' `DDPMScheduler` and `compute_snr` do.
use super::config::{BetaSchedule, SchedulerConfig};
use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

/// `alphas_cumprod` of a beta schedule: the fraction of signal variance left at each timestep.
pub struct NoiseSchedule {
    /// f32 on the CPU, `[num_train_timesteps]`, as diffusers computes it (f32 cumprod).
    alphas_cumprod: Tensor,
    /// The same values, for the samplers' scalar arithmetic (diffusers does it on f32 scalars).
    values: Vec<f32>,
    /// Karras sigmas `sqrt((1 - ᾱ) / ᾱ)` per training timestep, f32. Computed with libtorch's
    /// vectorised kernels like diffusers' table: their sqrt is not always correctly rounded, and
    /// scalar f32 arithmetic differs in the last bit for ~20% of the entries.
    sigmas: Vec<f32>,
}

impl NoiseSchedule {
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        let num_train_timesteps = config.num_train_timesteps();
        ensure!(
            num_train_timesteps > 0,
            "scheduler config: num_train_timesteps must be positive"
        );
        let n = num_train_timesteps as i64;
        let opts = (Kind::Float, Device::Cpu);
        let betas = if let Some(betas) = &config.trained_betas {
            ensure!(
                betas.len() == num_train_timesteps,
                "scheduler config: trained_betas has {} values but num_train_timesteps is {num_train_timesteps}",
                betas.len()
            );
            Tensor::from_slice(&betas.iter().map(|&b| b as f32).collect::<Vec<f32>>())
        } else {
            let start = config.beta_start.unwrap_or(0.0001);
            let end = config.beta_end.unwrap_or(0.02);
            match config.beta_schedule.unwrap_or(BetaSchedule::Linear) {
                BetaSchedule::Linear => Tensor::linspace(start, end, n, opts),
                BetaSchedule::ScaledLinear => {
                    Tensor::linspace(start.sqrt(), end.sqrt(), n, opts).square()
                }
                BetaSchedule::SquaredcosCapV2 => {
                    Tensor::from_slice(&cosine_betas(num_train_timesteps))
                }
            }
        };
        let alphas_cumprod = (1.0f64 - betas).cumprod(0, Kind::Float);
        let values = Vec::<f32>::try_from(&alphas_cumprod)?;
        if let Some(t) = values.iter().position(|a| !(*a > 0.0 && *a <= 1.0)) {
            bail!("scheduler config: the beta schedule gives alphas_cumprod[{t}] = {}, outside (0, 1]", values[t]);
        }
        let sigmas = ((1.0f64 - &alphas_cumprod) / &alphas_cumprod).sqrt();
        let sigmas = Vec::<f32>::try_from(&sigmas)?;
        Ok(Self {
            alphas_cumprod,
            values,
            sigmas,
        })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.values.len()
    }

    /// f32 `[num_train_timesteps]` on the CPU.
    pub fn alphas_cumprod(&self) -> &Tensor {
        &self.alphas_cumprod
    }

    /// `alphas_cumprod[t]`, or an error naming `t` when it is outside the training range.
    pub(crate) fn alpha_cumprod_at(&self, t: i64) -> Result<f32> {
        usize::try_from(t)
            .ok()
            .and_then(|i| self.values.get(i).copied())
            .with_context(|| {
                format!(
                    "timestep {t} is outside the {} training timesteps",
                    self.values.len()
                )
            })
    }

    /// Karras sigmas for every training timestep (see the field).
    pub(crate) fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The sigma of timestep 0 as diffusers computes it for `final_sigmas_type: sigma_min`, on
    /// scalars.
    pub(crate) fn sigma_min(&self) -> f32 {
        let alpha = self.values[0];
        super::torch_f32::sqrt((1.0 - alpha) / alpha)
    }

    /// q(x_t | x_0): `sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise`, per batch element. `timesteps` is int64
    /// `[b]` with values in `[0, num_train_timesteps)` (an out-of-range value is an error on the CPU
    /// and a device-side assert on CUDA).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        ensure!(
            x0.size() == noise.size(),
            "add_noise: x0 {:?} and noise {:?} differ in shape",
            x0.size(),
            noise.size()
        );
        let (sqrt_alpha, sqrt_one_minus_alpha) = self.coefficients(x0, timesteps)?;
        Ok(sqrt_alpha * x0 + sqrt_one_minus_alpha * noise)
    }

    /// The v-prediction target `sqrt(ᾱ_t) noise - sqrt(1 - ᾱ_t) x0` (diffusers' `get_velocity`).
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        ensure!(
            x0.size() == noise.size(),
            "velocity: x0 {:?} and noise {:?} differ in shape",
            x0.size(),
            noise.size()
        );
        let (sqrt_alpha, sqrt_one_minus_alpha) = self.coefficients(x0, timesteps)?;
        Ok(sqrt_alpha * noise - sqrt_one_minus_alpha * x0)
    }

    /// Signal-to-noise ratio `ᾱ_t / (1 - ᾱ_t)` per timestep, f32 `[b]` on the timesteps' device,
    /// for min-SNR loss weighting (diffusers' `training_utils.compute_snr`).
    pub fn snr(&self, timesteps: &Tensor) -> Result<Tensor> {
        check_timesteps(timesteps, None)?;
        let device = timesteps.device();
        let alphas_cumprod = self.alphas_cumprod.to_device(device);
        let sqrt_alpha = alphas_cumprod.sqrt().f_index_select(0, timesteps)?;
        let sqrt_one_minus_alpha = (1.0f64 - &alphas_cumprod)
            .sqrt()
            .f_index_select(0, timesteps)?;
        Ok((sqrt_alpha / sqrt_one_minus_alpha).square())
    }

    /// `sqrt(ᾱ_t)` and `sqrt(1 - ᾱ_t)` shaped `[b, 1, ...]` to broadcast over `like`, in its kind.
    fn coefficients(&self, like: &Tensor, timesteps: &Tensor) -> Result<(Tensor, Tensor)> {
        check_timesteps(timesteps, Some(like))?;
        let alphas_cumprod = self
            .alphas_cumprod
            .to_device(like.device())
            .to_kind(like.kind());
        let alpha = alphas_cumprod.f_index_select(0, &timesteps.to_device(like.device()))?;
        let mut shape = vec![-1i64];
        shape.resize(like.dim(), 1);
        Ok((
            alpha.sqrt().reshape(&shape),
            (1.0f64 - &alpha).sqrt().reshape(&shape),
        ))
    }
}

fn check_timesteps(timesteps: &Tensor, batch_of: Option<&Tensor>) -> Result<()> {
    ensure!(
        timesteps.kind() == Kind::Int64 && timesteps.dim() == 1,
        "timesteps must be int64 [batch], got {:?} {:?}",
        timesteps.kind(),
        timesteps.size()
    );
    if let Some(x) = batch_of {
        ensure!(
            x.dim() >= 1 && x.size()[0] == timesteps.size()[0],
            "{} timesteps for a batch of shape {:?}",
            timesteps.size()[0],
            x.size()
        );
    }
    Ok(())
}

/// The Glide cosine schedule (diffusers' `betas_for_alpha_bar`, cosine transform, max_beta 0.999),
/// computed in f64 like diffusers' Python floats.
fn cosine_betas(num_train_timesteps: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    let n = num_train_timesteps as f64;
    (0..num_train_timesteps)
        .map(|i| {
            let (t1, t2) = (i as f64 / n, (i + 1) as f64 / n);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}
