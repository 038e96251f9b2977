//! A tuning method applied to a U-Net: what training, sampling and loading an adapter file all
//! hold once the method is attached.
use super::{InitSeed, TuningMethod};
use crate::model::unet::UNet2DConditionModel;
use anyhow::Result;
use tch::{nn, Tensor};

pub struct Tuned {
    pub method: Box<dyn TuningMethod>,
    /// The parameters the method added (LoRA factors, adapters, prefixes), kept alive here.
    pub params: nn::VarStore,
    /// The tensors the method trains, named as in its adapter file.
    pub trained: Vec<(String, Tensor)>,
}

impl Tuned {
    /// Attaches `method` to `unet`; its new parameters live in a store on the U-Net's device,
    /// initialised from `seed` (see [`InitSeed`]).
    pub fn attach(
        method: Box<dyn TuningMethod>,
        unet: &mut UNet2DConditionModel,
        unet_vs: &nn::VarStore,
        seed: u64,
    ) -> Result<Self> {
        let params = nn::VarStore::new(unet_vs.device());
        let init = InitSeed::new(seed, method.name());
        let trained = method.apply(unet, unet_vs, params.root(), &init)?;
        Ok(Self {
            method,
            params,
            trained,
        })
    }
}

impl std::fmt::Debug for Tuned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tuned")
            .field("method", &self.method)
            .field("trained", &self.trained.len())
            .finish()
    }
}
