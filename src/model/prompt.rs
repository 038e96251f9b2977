//! Prompts to the U-Net's text conditioning, as each family's diffusers pipeline encodes them:
//! SD 1.x/2.x take the text encoder's last hidden state; SDXL concatenates both encoders'
//! penultimate hidden states (768 + 1280 = 2048 wide) and takes the second encoder's pooled
//! projection for its added embedding.
use super::clip::ClipTextModel;
use super::conditioning::{AddedConditions, SizeConditions, TextConditioning};
use super::family::ModelFamily;
use super::files::{ComponentFiles, ModelFiles};
use super::tokenizer::ClipTokenizer;
use anyhow::{ensure, Context, Result};
use tch::{nn, Device, Kind, Tensor};

/// A tokenizer and the text encoder it feeds.
pub struct TextEncoder {
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextModel,
}

impl TextEncoder {
    /// `[n, seq]` ids of `prompts` on the encoder's device.
    fn ids<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Tensor> {
        let device = self.model.final_layer_norm.weight.device();
        Ok(self.tokenizer.input_ids(prompts)?.to_device(device))
    }

    /// SDXL's use of an encoder: `hidden_states[-2]` and the pooled output.
    fn penultimate_and_pooled<S: AsRef<str>>(&self, prompts: &[S]) -> Result<(Tensor, Tensor)> {
        let ids = self.ids(prompts)?;
        let layers = self.model.layers.len();
        ensure!(layers >= 2, "SDXL's text encoders need at least two layers");
        tch::no_grad(|| self.model.hidden_and_pooled(&ids, layers - 1))
    }
}

/// A batch of prompts encoded.
#[derive(Debug)]
pub struct PromptEmbeddings {
    /// `[n, seq, cross_attention_dim]`
    pub context: Tensor,
    /// SDXL: `[n, projection_dim]`, the second encoder's pooled projection.
    pub pooled: Option<Tensor>,
}

impl PromptEmbeddings {
    /// The U-Net's conditioning for these prompts generating images of `sizes` (used by SDXL
    /// only: SD 1.x/2.x are conditioned on text alone).
    pub fn conditioning(&self, sizes: &SizeConditions) -> TextConditioning {
        TextConditioning {
            context: self.context.shallow_clone(),
            added: self.pooled.as_ref().map(|pooled| AddedConditions {
                text_embeds: pooled.shallow_clone(),
                time_ids: sizes.time_ids(pooled.size()[0], pooled.device()),
            }),
        }
    }

    /// The same shapes, zero (SDXL's unconditional input under `force_zeros_for_empty_prompt`).
    pub fn zeros_like(&self) -> Self {
        Self {
            context: self.context.zeros_like(),
            pooled: self.pooled.as_ref().map(Tensor::zeros_like),
        }
    }
}

/// The tokenizers and text encoders of a model, frozen, on one device.
pub struct PromptEncoder {
    /// SD 1.x/2.x's text encoder, or SDXL's first (CLIP ViT-L/14).
    pub first: TextEncoder,
    /// SDXL's second: OpenCLIP ViT-bigG/14 with its projection.
    pub second: Option<TextEncoder>,
}

fn load_model(
    files: &ComponentFiles,
    spec: &str,
    device: Device,
    kind: Kind,
    projection: bool,
) -> Result<ClipTextModel> {
    let config = super::clip::ClipTextConfig::from_file(&files.config)?;
    let mut vs = nn::VarStore::new(device);
    let model = if projection {
        ClipTextModel::new_with_projection(vs.root(), &config)?
    } else {
        ClipTextModel::new(vs.root(), &config)?
    };
    ClipTextModel::load_weights(&vs, &files.weights).with_context(|| {
        format!(
            "loading the text encoder {} of {spec}",
            files.config.display()
        )
    })?;
    vs.freeze();
    if kind != Kind::Float {
        vs.set_kind(kind);
    }
    Ok(model)
}

impl PromptEncoder {
    /// The model's text encoders and tokenizers, weights in `kind`.
    pub fn load(files: &ModelFiles, device: Device, kind: Kind) -> Result<Self> {
        let first = TextEncoder {
            tokenizer: ClipTokenizer::from_dir(&files.tokenizer_dir)?,
            model: load_model(&files.text_encoder, &files.spec, device, kind, false)?,
        };
        let second = match files.family()? {
            ModelFamily::Sd1 | ModelFamily::Sd2 => None,
            ModelFamily::Sdxl => {
                let second = files
                    .text_encoder_2
                    .as_ref()
                    .expect("family checks the second text encoder");
                Some(TextEncoder {
                    tokenizer: ClipTokenizer::from_dir(&second.tokenizer_dir)?,
                    model: load_model(&second.encoder, &files.spec, device, kind, true)?,
                })
            }
        };
        Ok(Self { first, second })
    }

    /// The width of the pooled embedding (SDXL's second encoder's projection), if there is one.
    pub fn pooled_dim(&self) -> Option<i64> {
        let projection = self.second.as_ref()?.model.text_projection.as_ref()?;
        Some(projection.weight.size()[0])
    }

    /// The embeddings of `prompts` (padded to each tokenizer's length).
    pub fn encode<S: AsRef<str>>(&self, prompts: &[S]) -> Result<PromptEmbeddings> {
        let Some(second) = &self.second else {
            let ids = self.first.ids(prompts)?;
            return Ok(PromptEmbeddings {
                context: tch::no_grad(|| self.first.model.forward(&ids)),
                pooled: None,
            });
        };
        let (context_1, _) = self.first.penultimate_and_pooled(prompts)?;
        let (context_2, pooled) = second.penultimate_and_pooled(prompts)?;
        Ok(PromptEmbeddings {
            context: Tensor::cat(&[context_1, context_2], -1),
            pooled: Some(pooled),
        })
    }
}
