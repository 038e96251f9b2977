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
}

pub fn run(args: InitTinyArgs) -> Result<()> {
    crate::model::tiny::write_tiny_model(&args.out, args.seed)?;
    println!("wrote the tiny model to {}", args.out.display());
    Ok(())
}
