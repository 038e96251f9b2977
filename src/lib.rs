//! difftune: parameter-efficient fine-tuning of Stable Diffusion v1.x, with evaluation built in.
pub mod bench;
pub mod cli;
pub mod compare;
pub mod data;
pub mod dist;
pub mod error;
pub mod eval;
pub mod model;
pub mod peft;
pub mod sample;
pub mod schedulers;
pub mod settings;
pub mod train;
pub mod util;
