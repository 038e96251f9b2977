//! Full fine-tuning: every U-Net weight is trained (859,520,964 on SD v1.4).
use super::{copy_named, freeze_named, TuningMethod};
use crate::model::unet::UNet2DConditionModel;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::{nn, Tensor};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Full {}

impl TuningMethod for Full {
    fn name(&self) -> &'static str {
        "full"
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({})
    }

    fn apply(
        &self,
        _unet: &mut UNet2DConditionModel,
        unet_vs: &nn::VarStore,
        _params: nn::Path,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut trained: Vec<(String, Tensor)> = unet_vs.variables().into_iter().collect();
        trained.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, t) in &trained {
            let _ = t.set_requires_grad(true);
        }
        Ok(trained)
    }

    /// A full fine-tune is a complete U-Net: merging copies it in.
    fn merge(
        &self,
        unet: &mut UNet2DConditionModel,
        unet_vs: &nn::VarStore,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let scratch = nn::VarStore::new(unet_vs.device());
        let trained = self.apply(unet, unet_vs, scratch.root())?;
        freeze_named(&trained);
        copy_named(&trained, tensors, "the full fine-tune")
    }
}
