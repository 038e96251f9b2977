use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A folder holding unet_config.json (and optionally vae_config.json, text_encoder_config.json).
    #[arg(long)]
    pub config_dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let dir = args.config_dir.unwrap_or_else(|| PathBuf::from("."));
    let config = crate::model::unet::UNetConfig::from_file(&dir.join("unet_config.json"))?;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _unet = crate::model::unet::UNet2DConditionModel::new(vs.root(), &config)?;
    let count: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
    if args.json {
        println!("{}", serde_json::json!({ "unet": count }));
    } else {
        println!("unet {count}");
    }
    Ok(())
}
