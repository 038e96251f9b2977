//! The Stable Diffusion model stack, with parameter names identical to diffusers/transformers.
pub mod attention;
pub mod clip;
pub mod clip_vocab;
pub mod layers;
pub mod ldm;
pub mod pipeline;
pub mod resnet;
pub mod single_file;
pub mod source;
pub mod tiny;
pub mod tokenizer;
pub mod torch_file;
pub mod transformer;
pub mod unet;
pub mod vae;
pub mod visit;
pub mod weights;
