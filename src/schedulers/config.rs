//! diffusers' `scheduler_config.json`, shared by every scheduler. Like diffusers' `from_config`,
//! one file configures any scheduler: each reads the keys it knows and falls back to its own
//! defaults for absent ones (which is why every field is optional), and ignores the rest.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    /// The Glide cosine schedule (`betas_for_alpha_bar`).
    SquaredcosCapV2,
}

/// What the U-Net predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
}

/// How inference timesteps are spread over the training range (Table 2 of arXiv:2305.08891).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// The noise level after the last step of the sigma-based schedulers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmas {
    Zero,
    SigmaMin,
}

/// The keys of diffusers' scheduler configs that difftune reads. Options diffusers has but
/// difftune does not implement are read too, so that a config asking for them is an error
/// instead of being silently sampled differently.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct SchedulerConfig {
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<BetaSchedule>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<PredictionType>,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: Option<i64>,
    /// DDIM/PNDM: whether the step to "before t = 0" uses alpha_cumprod = 1 (else that of t = 0).
    pub set_alpha_to_one: Option<bool>,
    /// PNDM: run only the PLMS (linear multistep) part, as Stable Diffusion does.
    pub skip_prk_steps: Option<bool>,
    /// DDIM: clamp the predicted x0 to `[-clip_sample_range, clip_sample_range]`.
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    /// Euler / DPM-Solver.
    pub final_sigmas_type: Option<FinalSigmas>,
    /// DPM-Solver.
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,

    // Options difftune does not implement; each must be absent or at diffusers' default.
    pub thresholding: Option<bool>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub use_dynamic_shifting: Option<bool>,
    pub variance_type: Option<String>,
    /// diffusers' default is -inf, which its JSON writer spells `-Infinity`; see [`Self::from_json`].
    pub lambda_min_clipped: Option<f64>,
}

impl SchedulerConfig {
    /// Reads a diffusers `scheduler_config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json(&text)
            .with_context(|| format!("parsing the scheduler config {}", path.display()))
    }

    /// Parses a scheduler config. Python's JSON writer emits `Infinity`, `-Infinity` and `NaN`
    /// (diffusers saves `lambda_min_clipped: -Infinity`); they are read as absent, i.e. the
    /// default, which is what diffusers writes them for.
    pub fn from_json(text: &str) -> Result<Self> {
        Ok(serde_json::from_str(&python_non_finite_to_null(text))?)
    }

    /// SD v1.x's schedule, as in CompVis/stable-diffusion-v1-4's scheduler config.
    pub fn stable_diffusion_v1() -> Self {
        Self {
            num_train_timesteps: Some(1000),
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            beta_schedule: Some(BetaSchedule::ScaledLinear),
            set_alpha_to_one: Some(false),
            skip_prk_steps: Some(true),
            steps_offset: Some(1),
            clip_sample: Some(false),
            ..Self::default()
        }
    }

    pub(crate) fn num_train_timesteps(&self) -> usize {
        self.num_train_timesteps.unwrap_or(1000)
    }

    pub(crate) fn prediction_type(&self) -> PredictionType {
        self.prediction_type.unwrap_or(PredictionType::Epsilon)
    }

    pub(crate) fn steps_offset(&self) -> i64 {
        self.steps_offset.unwrap_or(0)
    }

    /// Errors when `scheduler` would need an option difftune does not implement.
    pub(crate) fn ensure_unsupported_at_defaults(
        &self,
        scheduler: &str,
        names: &[&str],
    ) -> Result<()> {
        for &name in names {
            let (value, default) = match name {
                "thresholding" => (self.thresholding.map(|v| v.to_string()), "false"),
                "rescale_betas_zero_snr" => {
                    (self.rescale_betas_zero_snr.map(|v| v.to_string()), "false")
                }
                "interpolation_type" => (self.interpolation_type.clone(), "linear"),
                "timestep_type" => (self.timestep_type.clone(), "discrete"),
                "use_karras_sigmas" => (self.use_karras_sigmas.map(|v| v.to_string()), "false"),
                "use_exponential_sigmas" => {
                    (self.use_exponential_sigmas.map(|v| v.to_string()), "false")
                }
                "use_beta_sigmas" => (self.use_beta_sigmas.map(|v| v.to_string()), "false"),
                "use_lu_lambdas" => (self.use_lu_lambdas.map(|v| v.to_string()), "false"),
                "use_flow_sigmas" => (self.use_flow_sigmas.map(|v| v.to_string()), "false"),
                "use_dynamic_shifting" => {
                    (self.use_dynamic_shifting.map(|v| v.to_string()), "false")
                }
                "variance_type" => (self.variance_type.clone(), "null"),
                "lambda_min_clipped" => (self.lambda_min_clipped.map(|v| v.to_string()), "-inf"),
                other => bail!("internal error: unknown scheduler option {other}"),
            };
            if let Some(value) = value {
                if value != default {
                    bail!("scheduler `{scheduler}`: `{name}: {value}` is not supported by difftune (only {default})");
                }
            }
        }
        Ok(())
    }
}

/// Replaces the bare tokens `Infinity`, `-Infinity` and `NaN` outside JSON strings with `null`.
fn python_non_finite_to_null(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .iter()
            .find(|t| rest.starts_with(**t))
        {
            out.push_str("null");
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_infinities_read_as_absent() {
        let config = SchedulerConfig::from_json(
            r#"{"lambda_min_clipped": -Infinity, "_class_name": "NaN Infinity", "steps_offset": 1}"#,
        )
        .unwrap();
        assert_eq!(config.lambda_min_clipped, None);
        assert_eq!(config.steps_offset, Some(1));
    }

    #[test]
    fn unsupported_options_are_errors() {
        let config =
            SchedulerConfig::from_json(r#"{"use_karras_sigmas": true, "thresholding": false}"#)
                .unwrap();
        assert!(config
            .ensure_unsupported_at_defaults("euler", &["thresholding"])
            .is_ok());
        let err = config
            .ensure_unsupported_at_defaults("euler", &["use_karras_sigmas"])
            .unwrap_err();
        assert!(err.to_string().contains("use_karras_sigmas"), "{err}");
    }
}
