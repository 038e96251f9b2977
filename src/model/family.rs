//! The Stable Diffusion generations difftune runs, told apart by a diffusers folder's configs (or,
//! for single files, by their tensors: see [`super::single_file::detect`]).
use super::clip::ClipTextConfig;
use super::unet::{AddedEmbedding, UNetConfig};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFamily {
    /// SD v1.x: OpenAI's CLIP ViT-L/14 text encoder, 768-wide cross-attention.
    Sd1,
    /// SD v2.x: OpenCLIP's ViT-H/14 text encoder, 1024-wide cross-attention.
    Sd2,
    /// SDXL: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (their penultimate hidden states
    /// concatenated, 2048 wide) and the `text_time` added embedding of the second one's pooled
    /// projection and six size/crop conditions.
    Sdxl,
}

impl ModelFamily {
    /// From a folder's U-Net and (first) text encoder configs. SD v2.x's text encoder is told by
    /// OpenCLIP ViT-H's exact-GELU, 1024-wide tower; any other single encoder is read as SD v1.x's
    /// kind (the built-in tiny model and test models are).
    pub fn of_configs(unet: &UNetConfig, text_encoder: &ClipTextConfig) -> Result<Self> {
        match unet.added_embedding()? {
            Some(AddedEmbedding::TextTime { .. }) => Ok(Self::Sdxl),
            None if text_encoder.hidden_act == "gelu" && text_encoder.hidden_size == 1024 => {
                Ok(Self::Sd2)
            }
            None => Ok(Self::Sd1),
        }
    }

    /// Whether the model has SDXL's second text encoder (and tokenizer).
    pub fn has_second_text_encoder(self) -> bool {
        self == Self::Sdxl
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Sd1 => "SD v1.x",
            Self::Sd2 => "SD v2.x",
            Self::Sdxl => "SDXL",
        }
    }

    /// Refuses a text-encoder count that does not fit the family.
    pub fn check_text_encoders(self, second: bool) -> Result<()> {
        match (self.has_second_text_encoder(), second) {
            (true, false) => bail!(
                "the U-Net has SDXL's text_time added embedding but the model has no text_encoder_2/ and tokenizer_2/"
            ),
            (false, true) => bail!(
                "the model has a text_encoder_2/ but its U-Net is {}'s, without SDXL's text_time added embedding",
                self.name()
            ),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
