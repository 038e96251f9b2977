//! BitFit (Ben Zaken et al. 2021): train the U-Net's existing biases, add nothing. The study trains
//! the biases inside the transformer blocks (LayerNorm, attention output, feed-forward): 174,720 on
//! SD v1.4.
use super::{merge_own_variables, own_variables, Registered, TuningMethod};
use crate::model::unet::UNet2DConditionModel;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::{nn, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BitFitScope {
    /// Biases inside the `transformer_blocks` (the study's choice).
    TransformerBlocks,
    /// Every bias of the U-Net.
    All,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BitFit {
    /// Which biases are trained. Default `transformer_blocks`.
    pub scope: BitFitScope,
}

impl Default for BitFit {
    fn default() -> Self {
        Self {
            scope: BitFitScope::TransformerBlocks,
        }
    }
}

impl BitFit {
    fn selects(&self, name: &str) -> bool {
        name.ends_with(".bias")
            && (self.scope == BitFitScope::All || name.contains(".transformer_blocks."))
    }
}

impl Registered for BitFit {
    const NAME: &'static str = "bitfit";
    const LABEL: &'static str = "BitFit";
}

impl TuningMethod for BitFit {
    fn apply(
        &self,
        _unet: &mut UNet2DConditionModel,
        unet_vs: &nn::VarStore,
        _params: nn::Path,
        _init: &super::InitSeed,
    ) -> Result<Vec<(String, Tensor)>> {
        let trained = own_variables(unet_vs, |name| self.selects(name));
        if trained.is_empty() {
            bail!("the U-Net has no biases in scope {:?}", self.scope);
        }
        Ok(trained)
    }

    /// The trained biases are the U-Net's own: merging writes them into it.
    fn merge(
        &self,
        unet: &mut UNet2DConditionModel,
        unet_vs: &nn::VarStore,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        merge_own_variables(self, unet, unet_vs, tensors, "the BitFit adapter")
    }
}
