//! Full fine-tuning: every U-Net weight is trained (859,520,964 on SD v1.4).
use super::{merge_own_variables, own_variables, Registered, TuningMethod};
use crate::model::unet::UNet2DConditionModel;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::{nn, Tensor};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Full {}

impl Registered for Full {
    const NAME: &'static str = "full";
    const LABEL: &'static str = "Full fine-tuning";
}

impl TuningMethod for Full {
    fn apply(
        &self,
        _unet: &mut UNet2DConditionModel,
        unet_vs: &nn::VarStore,
        _params: nn::Path,
        _init: &super::InitSeed,
    ) -> Result<Vec<(String, Tensor)>> {
        Ok(own_variables(unet_vs, |_| true))
    }

    fn trains_every_weight(&self) -> bool {
        true
    }

    /// A full fine-tune is a complete U-Net: merging copies it in.
    fn merge(
        &self,
        unet: &mut UNet2DConditionModel,
        unet_vs: &nn::VarStore,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        merge_own_variables(self, unet, unet_vs, tensors, "the full fine-tune")
    }
}
