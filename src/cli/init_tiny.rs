use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InitTinyArgs {
    /// Folder to write the model to (must be absent or empty).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The VAE's downsampling factor (2, 4 or 8, SD's); the U-Net's sample size follows it.
    #[arg(long, default_value_t = crate::model::tiny::SD_VAE_DOWNSAMPLING)]
    pub vae_downsampling: u32,
}

pub fn run(args: InitTinyArgs) -> Result<()> {
    crate::model::tiny::write_tiny_model_with(
        &args.out,
        args.seed,
        crate::model::tiny::DEFAULT_IMAGE_SIZE,
        args.vae_downsampling,
        &Default::default(),
        &crate::data::synthetic::captions(),
    )?;
    println!("wrote the tiny model to {}", args.out.display());
    Ok(())
}
