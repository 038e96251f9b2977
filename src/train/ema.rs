//! An exponential moving average of the trained tensors, as diffusers' `EMAModel` (the `--use_ema`
//! of its example scripts) keeps it: same decay schedule, same update, checked against it by
//! tools/make_ema_fixtures.py. Checkpoints keep it beside the optimizer state; the adapter file of
//! a run with EMA holds the averaged tensors.
use crate::model::weights::NamedTensors;
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// How the average's decay grows with the optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmaSettings {
    /// Upper bound of the decay.
    pub decay: f64,
    /// Lower bound of the decay, once updates have begun.
    pub min_decay: f64,
    /// Optimizer steps during which the average just copies the weights.
    pub update_after_step: usize,
    /// `1 - (1 + n / inv_gamma)^-power` (true) instead of `(1 + n) / (10 + n)` (false).
    pub warmup: bool,
    pub inv_gamma: f64,
    pub power: f64,
}

impl Default for EmaSettings {
    /// diffusers' defaults.
    fn default() -> Self {
        Self {
            decay: 0.9999,
            min_decay: 0.0,
            update_after_step: 0,
            warmup: false,
            inv_gamma: 1.0,
            power: 2.0 / 3.0,
        }
    }
}

impl EmaSettings {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (0.0..=1.0).contains(&self.decay) && (0.0..=self.decay).contains(&self.min_decay),
            "train.ema needs 0 <= min_decay <= decay <= 1 (got {} and {})",
            self.min_decay,
            self.decay
        );
        ensure!(
            self.inv_gamma > 0.0 && self.power > 0.0,
            "train.ema needs inv_gamma > 0 and power > 0"
        );
        Ok(())
    }

    /// The decay of the `optimization_step`-th update (1-based): 0 (a copy) until
    /// `update_after_step` has passed, then the schedule clamped to `[min_decay, decay]`.
    pub fn decay_at(&self, optimization_step: usize) -> f64 {
        let n = optimization_step.saturating_sub(self.update_after_step + 1) as f64;
        if n <= 0.0 {
            return 0.0;
        }
        let scheduled = if self.warmup {
            1.0 - (1.0 + n / self.inv_gamma).powf(-self.power)
        } else {
            (1.0 + n) / (10.0 + n)
        };
        scheduled.min(self.decay).max(self.min_decay)
    }
}

/// The averaged copies of a run's trained tensors.
pub struct Ema {
    settings: EmaSettings,
    shadow: Vec<(String, Tensor)>,
    updates: usize,
}

impl Ema {
    /// Starts the average at the tensors' current values.
    pub fn new(settings: EmaSettings, trained: &[(String, Tensor)]) -> Self {
        let shadow = trained
            .iter()
            .map(|(name, t)| (name.clone(), t.detach().copy()))
            .collect();
        Self {
            settings,
            shadow,
            updates: 0,
        }
    }

    /// Moves the average toward `trained` after an optimizer step:
    /// `shadow -= (1 - decay) * (shadow - value)`.
    pub fn update(&mut self, trained: &[(String, Tensor)]) {
        self.updates += 1;
        let one_minus_decay = 1.0 - self.settings.decay_at(self.updates);
        tch::no_grad(|| {
            for ((_, shadow), (_, value)) in self.shadow.iter_mut().zip(trained) {
                let step = (&*shadow - value) * one_minus_decay;
                let _ = shadow.g_sub_(&step);
            }
        });
    }

    /// The averaged tensors, under the trained tensors' names.
    pub fn tensors(&self) -> &[(String, Tensor)] {
        &self.shadow
    }

    /// Updates done, for the checkpoint.
    pub fn updates(&self) -> usize {
        self.updates
    }

    /// Continues an average saved in a checkpoint: `tensors` by name (read one at a time) and
    /// the updates done.
    pub fn restore(&mut self, tensors: &impl NamedTensors, updates: usize) -> Result<()> {
        tch::no_grad(|| {
            let shapes = tensors.shapes();
            for (name, shadow) in &mut self.shadow {
                let saved = shapes
                    .get(name.as_str())
                    .with_context(|| format!("the checkpoint has no EMA copy of {name}"))?;
                ensure!(
                    *saved == shadow.size(),
                    "the checkpoint's EMA copy of {name} has shape {saved:?}, the run {:?}",
                    shadow.size()
                );
                tensors.read_into(name, shadow)?;
            }
            Ok(())
        })?;
        self.updates = updates;
        Ok(())
    }
}
