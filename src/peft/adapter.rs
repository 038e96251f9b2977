//! Bottleneck adapters (Houlsby et al. 2019) in every transformer block: `up(act(down(h)))` with
//! `down` `[width, dim]` and `up` `[dim, width]` (both with biases), reading the block's stream at
//! one site and adding to it at another (Xiang et al. 2023's design space). The study's placement
//! is after the feed-forward (input = output = `ff_out`: a residual adapter on the FF output);
//! Xiang et al.'s best is `input = "attn2_out"`, `output = "ff_in"`. `up` starts at zero, so the
//! output starts unchanged; `down` has nn.Linear's default init.
//!
//! Count on SD v1.4: 24,976 * width + 12,480; the default width 49 gives 1,236,304, the closest to
//! the study's 1.23M.
use super::{nested, Registered, TuningMethod};
use crate::model::transformer::{BlockExtension, BlockSite};
use crate::model::unet::UNet2DConditionModel;
use crate::model::visit::{ModuleMut, VisitModules};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Gelu,
    Relu,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Adapter {
    /// Bottleneck width. Default 49.
    pub width: i64,
    /// Non-linearity between the projections. Default `gelu`.
    pub activation: Activation,
    /// Where the adapter reads the block's stream. Default `ff_out`.
    pub input: BlockSite,
    /// Where its output is added (not before `input`). Default `ff_out`.
    pub output: BlockSite,
}

impl Default for Adapter {
    fn default() -> Self {
        Self {
            width: 49,
            activation: Activation::Gelu,
            input: BlockSite::FfOut,
            output: BlockSite::FfOut,
        }
    }
}

#[derive(Debug)]
struct Bottleneck {
    down: (Tensor, Tensor),
    up: (Tensor, Tensor),
    activation: Activation,
    input: BlockSite,
    output: BlockSite,
}

impl BlockExtension for Bottleneck {
    fn input_site(&self) -> BlockSite {
        self.input
    }

    fn output_site(&self) -> BlockSite {
        self.output
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let k = x.kind();
        let h = x.linear(&self.down.0.to_kind(k), Some(&self.down.1.to_kind(k)));
        let h = match self.activation {
            Activation::Gelu => h.gelu("none"),
            Activation::Relu => h.relu(),
        };
        h.linear(&self.up.0.to_kind(k), Some(&self.up.1.to_kind(k)))
    }
}

fn site_order(site: BlockSite) -> usize {
    BlockSite::ALL
        .iter()
        .position(|&s| s == site)
        .expect("every site is in ALL")
}

impl Registered for Adapter {
    const NAME: &'static str = "adapter";
    const LABEL: &'static str = "Adapter";
}

impl TuningMethod for Adapter {
    fn validate(&self) -> Result<()> {
        if self.width < 1 {
            bail!("width {} must be at least 1", self.width);
        }
        if site_order(self.output) < site_order(self.input) {
            bail!(
                "output site `{}` comes before input site `{}` in the block (order: {})",
                self.output.name(),
                self.input.name(),
                BlockSite::ALL.map(|s| s.name()).join(", ")
            );
        }
        Ok(())
    }

    fn apply(
        &self,
        unet: &mut UNet2DConditionModel,
        _unet_vs: &nn::VarStore,
        params: nn::Path,
        init: &super::InitSeed,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut trained = Vec::new();
        unet.visit_modules(&mut |m| {
            let ModuleMut::TransformerBlock(block) = m else {
                return;
            };
            let dim = block.dim();
            let module = nested(&params, &block.path) / "adapter";
            let bound = 1.0 / (dim as f64).sqrt();
            let uniform = nn::Init::Uniform {
                lo: -bound,
                up: bound,
            };
            let down = (
                init.var(&(&module / "down"), "weight", &[self.width, dim], uniform),
                init.var(&(&module / "down"), "bias", &[self.width], uniform),
            );
            let up = (
                (&module / "up").var("weight", &[dim, self.width], nn::Init::Const(0.0)),
                (&module / "up").var("bias", &[dim], nn::Init::Const(0.0)),
            );
            for (part, (weight, bias)) in [("down", &down), ("up", &up)] {
                trained.push((
                    format!("{}.adapter.{part}.weight", block.path),
                    weight.shallow_clone(),
                ));
                trained.push((
                    format!("{}.adapter.{part}.bias", block.path),
                    bias.shallow_clone(),
                ));
            }
            block.extensions.push(Box::new(Bottleneck {
                down,
                up,
                activation: self.activation,
                input: self.input,
                output: self.output,
            }));
        });
        if trained.is_empty() {
            bail!("the U-Net has no transformer blocks to put adapters in");
        }
        Ok(trained)
    }
}
