//! Text-to-image sampling: the generation loop shared by `difftune sample`, the study runner and
//! training-time validation, initial noise drawn as diffusers draws it, and PNG/grid output.
pub mod grid;
pub mod pipeline;
pub mod png;

pub use pipeline::{
    generate, initial_latents, per_image_latents, GenerateOptions, LatentGeometry, SdModels,
};
