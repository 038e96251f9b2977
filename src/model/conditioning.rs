//! What the U-Net is conditioned on besides the noisy latents and the timestep: the text
//! encoders' hidden states its cross-attention reads and, for SDXL, the added conditions of its
//! `text_time` embedding (the pooled text embedding and six size and crop numbers). One type for
//! every model family, so the trainer and the sampler pass it without knowing which model they
//! drive.
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

/// The U-Net's conditioning for a batch of `b` samples.
#[derive(Debug)]
pub struct TextConditioning {
    /// `[b, seq, cross_attention_dim]`: what the cross-attention keys and values are computed from.
    pub context: Tensor,
    /// SDXL's added conditions; `None` for SD 1.x/2.x, whose U-Nets have no added embedding.
    pub added: Option<AddedConditions>,
}

/// The inputs of SDXL's `text_time` added embedding (diffusers' `added_cond_kwargs`).
#[derive(Debug)]
pub struct AddedConditions {
    /// `[b, projection_dim]`: the second text encoder's pooled, projected embedding.
    pub text_embeds: Tensor,
    /// `[b, 6]`: [`SizeConditions::time_ids`] of each sample.
    pub time_ids: Tensor,
}

impl AddedConditions {
    fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        Self {
            text_embeds: f(&self.text_embeds),
            time_ids: f(&self.time_ids),
        }
    }
}

impl TextConditioning {
    /// Conditioning by text alone (SD 1.x/2.x).
    pub fn text(context: Tensor) -> Self {
        Self {
            context,
            added: None,
        }
    }

    fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        Self {
            context: f(&self.context),
            added: self.added.as_ref().map(|a| a.map(&f)),
        }
    }

    pub fn shallow_clone(&self) -> Self {
        self.map(Tensor::shallow_clone)
    }

    /// A one-sample conditioning repeated for `n` samples (as views).
    pub fn expand(&self, n: i64) -> Self {
        self.map(|t| {
            let mut shape = vec![n];
            shape.extend(std::iter::repeat_n(-1, t.dim() - 1));
            t.expand(shape.as_slice(), false)
        })
    }

    /// `parts` one after the other along the batch, e.g. `[uncond, cond]` for guidance. All must
    /// have added conditions or none.
    pub fn cat(parts: &[&TextConditioning]) -> Result<Self> {
        ensure!(!parts.is_empty(), "no conditioning to concatenate");
        let cat = |tensors: Vec<&Tensor>| Tensor::cat(&tensors, 0);
        let added = match parts
            .iter()
            .map(|p| p.added.as_ref())
            .collect::<Option<Vec<_>>>()
        {
            Some(all) => Some(AddedConditions {
                text_embeds: cat(all.iter().map(|a| &a.text_embeds).collect()),
                time_ids: cat(all.iter().map(|a| &a.time_ids).collect()),
            }),
            None => {
                ensure!(
                    parts.iter().all(|p| p.added.is_none()),
                    "conditionings with and without added conditions cannot share a batch"
                );
                None
            }
        };
        Ok(Self {
            context: cat(parts.iter().map(|p| &p.context).collect()),
            added,
        })
    }
}

/// SD 1.x/2.x callers hand the U-Net its context tensor alone.
impl From<&Tensor> for TextConditioning {
    fn from(context: &Tensor) -> Self {
        Self::text(context.shallow_clone())
    }
}

impl From<&TextConditioning> for TextConditioning {
    fn from(conditioning: &TextConditioning) -> Self {
        conditioning.shallow_clone()
    }
}

/// SDXL's micro-conditioning of one image, in pixels, heights first (as diffusers' `(h, w)`
/// tuples): the size of the image before it was resized, the top-left corner of the crop taken
/// from it, and the size generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SizeConditions {
    pub original_size: (i64, i64),
    pub crop_top_left: (i64, i64),
    pub target_size: (i64, i64),
}

impl SizeConditions {
    /// What diffusers' SDXL pipeline passes by default for a `height` x `width` image: an
    /// uncropped original of the target's size.
    pub fn uncropped(height: i64, width: i64) -> Self {
        Self {
            original_size: (height, width),
            crop_top_left: (0, 0),
            target_size: (height, width),
        }
    }

    /// The six numbers in the order of diffusers' `add_time_ids`.
    pub fn values(&self) -> [f32; 6] {
        let (a, b, c) = (self.original_size, self.crop_top_left, self.target_size);
        [a.0, a.1, b.0, b.1, c.0, c.1].map(|v| v as f32)
    }

    /// `[n, 6]` f32 time ids, this image's repeated for `n` samples.
    pub fn time_ids(&self, n: i64, device: Device) -> Tensor {
        Tensor::from_slice(&self.values())
            .view([1, 6])
            .repeat([n, 1])
            .to_device(device)
    }
}
