//! Noise schedules and samplers, following diffusers 0.42.1's math step for step: the training
//! side ([`NoiseSchedule`]: q-sample, v targets, SNR) and the sampling schedulers behind
//! [`Scheduler`], built by name from a diffusers `scheduler_config.json`.
//!
//! Scalar coefficients are computed in f32 from the f32 tables, as diffusers does with its 0-d
//! float32 tensors (transcendentals through libtorch too, see [`torch_f32`]), and tensor
//! arithmetic runs in the sample's kind upcast to at least f32 (the result has the model output's
//! kind).
pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;
mod numpy;
pub mod pndm;
pub mod spacing;

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

pub use config::{BetaSchedule, FinalSigmas, PredictionType, SchedulerConfig, TimestepSpacing};
pub use ddim::DdimScheduler;
pub use ddpm::NoiseSchedule;
pub use dpm_solver::DpmSolverMultistepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralDiscreteScheduler;
pub use pndm::PndmScheduler;

/// The sampling schedulers, by the names commands and configs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SchedulerKind {
    Ddim,
    Pndm,
    Euler,
    EulerAncestral,
    DpmSolverPlusPlus,
}

impl SchedulerKind {
    pub const ALL: [Self; 5] = [
        Self::Ddim,
        Self::Pndm,
        Self::Euler,
        Self::EulerAncestral,
        Self::DpmSolverPlusPlus,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Pndm => "pndm",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler_ancestral",
            Self::DpmSolverPlusPlus => "dpmsolver++",
        }
    }

    /// Builds the scheduler from a diffusers config, with diffusers' defaults for it where the
    /// config is silent (as `from_config` does).
    pub fn build(self, config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
        Ok(match self {
            Self::Ddim => Box::new(DdimScheduler::new(config)?),
            Self::Pndm => Box::new(PndmScheduler::new(config)?),
            Self::Euler => Box::new(EulerDiscreteScheduler::new(config)?),
            Self::EulerAncestral => Box::new(EulerAncestralDiscreteScheduler::new(config)?),
            Self::DpmSolverPlusPlus => Box::new(DpmSolverMultistepScheduler::new(config)?),
        })
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "unknown scheduler `{name}` (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl TryFrom<String> for SchedulerKind {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        name.parse()
    }
}

impl From<SchedulerKind> for String {
    fn from(kind: SchedulerKind) -> Self {
        kind.name().to_string()
    }
}

/// A sampling scheduler. A denoising loop, as diffusers' pipelines run it:
///
/// ```ignore
/// scheduler.set_timesteps(steps)?;
/// let mut latents = noise * scheduler.init_noise_sigma();
/// for (i, &t) in scheduler.timesteps().to_vec().iter().enumerate() {
///     let input = scheduler.scale_model_input(&latents, i)?;
///     let output = unet.forward(&input, &Tensor::from(t as f32), &context);
///     latents = scheduler.step(&output, i, &latents)?;
/// }
/// ```
///
/// Steps are addressed by their index in [`Scheduler::timesteps`] rather than by timestep value
/// (PNDM repeats a timestep). Multistep schedulers keep a history, so each run must call
/// `set_timesteps` first and then step through consecutive indices; starting at a later index
/// (img2img) behaves like diffusers' `set_begin_index`.
pub trait Scheduler: Send {
    /// Prepares `num_inference_steps` steps and clears the state of a previous run.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// The timestep to give the U-Net at each step (integral except for the Euler schedulers'
    /// `linspace` spacing). PNDM has one more than the number of inference steps.
    fn timesteps(&self) -> &[f64];

    /// The standard deviation of the initial noise: start sampling from `randn * init_noise_sigma`.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The U-Net input for the sample at step `step_index` (the sigma-parametrised schedulers
    /// scale it back to unit variance; the others return it unchanged).
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        check_step_index(step_index, self.timesteps().len())?;
        Ok(sample.shallow_clone())
    }

    /// One denoising step: the sample at the next timestep, from the U-Net's prediction at
    /// `step_index`.
    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor)
        -> Result<Tensor>;
}

/// Builds the scheduler called `name` (see [`SchedulerKind`]) from a diffusers config.
pub fn from_name(name: &str, config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    name.parse::<SchedulerKind>()
        .map_err(anyhow::Error::msg)?
        .build(config)
}

/// Errors unless `num_inference_steps` is in `1..=num_train_timesteps`.
fn check_num_steps(num_inference_steps: usize, num_train_timesteps: usize) -> Result<()> {
    ensure!(
        (1..=num_train_timesteps).contains(&num_inference_steps),
        "num_inference_steps must be between 1 and num_train_timesteps ({num_train_timesteps}), got {num_inference_steps}"
    );
    Ok(())
}

/// Errors unless `step_index` is a step of the current schedule of `len` steps.
fn check_step_index(step_index: usize, len: usize) -> Result<()> {
    ensure!(
        len > 0,
        "the scheduler has no timesteps: call set_timesteps first"
    );
    ensure!(
        step_index < len,
        "step index {step_index} is past the schedule's {len} steps"
    );
    Ok(())
}

/// Computation kind for a tensor: its own, upcast to at least f32 (half samples lose too much in
/// the scheduler's arithmetic).
fn upcast(t: &Tensor) -> Tensor {
    match t.kind() {
        Kind::Half | Kind::BFloat16 => t.to_kind(Kind::Float),
        _ => t.shallow_clone(),
    }
}

/// sqrt, ln and exp of f32 scalars as diffusers gets them: through libtorch's CPU kernels on 0-d
/// tensors, which are not always correctly rounded. Rust's own differ in the last bit for ~15% of
/// inputs, and last-bit differences in the step coefficients grow to ~1e-5 over a sampling run.
mod torch_f32 {
    use tch::Tensor;

    pub(super) fn sqrt(x: f32) -> f32 {
        Tensor::from(x).sqrt().double_value(&[]) as f32
    }

    pub(super) fn ln(x: f32) -> f32 {
        Tensor::from(x).log().double_value(&[]) as f32
    }

    pub(super) fn exp(x: f32) -> f32 {
        Tensor::from(x).exp().double_value(&[]) as f32
    }
}
