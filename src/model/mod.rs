//! The Stable Diffusion model stack, with parameter names identical to diffusers/transformers.
pub mod attention;
pub mod clip;
pub mod layers;
pub mod resnet;
pub mod source;
pub mod tokenizer;
pub mod transformer;
pub mod unet;
pub mod vae;
pub mod visit;
pub mod weights;
