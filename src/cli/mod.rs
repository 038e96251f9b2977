//! The `difftune` command line: a thin layer that parses arguments and calls the library.
use anyhow::Result;
use clap::{Parser, Subcommand};

mod fid;
mod inspect;

#[derive(Parser, Debug)]
#[command(
    name = "difftune",
    version,
    about = "Parameter-efficient fine-tuning of Stable Diffusion v1.x, with evaluation built in"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Build models from configs (random weights) or a model folder and print parameter counts.
    Inspect(inspect::InspectArgs),
    /// FID (and KID) between two image folders or pytorch-fid .npz statistics, as pytorch-fid computes it.
    Fid(fid::FidArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Fid(args) => fid::run(args),
    }
}
