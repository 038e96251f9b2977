//! The `difftune` command line: a thin layer that parses arguments and calls the library.
use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod cache;
mod compare;
mod convert;
mod dist_check;
mod export;
mod fid;
mod init_tiny;
mod inspect;
mod interrupt;
mod launch;
mod merge;
mod sample;
mod train;

pub use interrupt::{exit_code, Interrupted, Signal};

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
    /// Time the training step per tuning method and batch size (random weights, nothing downloaded).
    Bench(bench::BenchArgs),
    /// The study in one command: fine-tune with every method on the same data and budget, sample,
    /// score (FID/KID) and report the study's tables, plots and sample grids.
    Compare(compare::CompareArgs),
    /// Build models from configs (random weights) or a model folder and print parameter counts.
    Inspect(inspect::InspectArgs),
    /// Write the built-in tiny SD-architecture model (random weights) as a diffusers folder.
    InitTiny(init_tiny::InitTinyArgs),
    /// Encode a dataset's images (VAE) and captions (text encoder) once, into a latent cache.
    Cache(cache::CacheArgs),
    /// Fine-tune the U-Net with a tuning method.
    Train(train::TrainArgs),
    /// Convert between a diffusers folder and a single-file (LDM layout) checkpoint.
    Convert(convert::ConvertArgs),
    /// Bake an adapter file (LoRA, DoRA, BitFit or full fine-tune) into a complete U-Net safetensors.
    Merge(merge::MergeArgs),
    /// Write a difftune adapter file in another tool's LoRA format: kohya (ComfyUI, A1111),
    /// diffusers (`load_lora_weights`) or peft (`PeftModel`).
    Export(export::ExportArgs),
    /// FID (and KID) between two image folders or pytorch-fid .npz statistics, as pytorch-fid computes it.
    Fid(fid::FidArgs),
    /// Generate images from prompts, with an optional adapter file (PNGs with their parameters, a grid).
    Sample(sample::SampleArgs),
    /// Check a multi-process launch (torchrun, srun): verify every collective on every rank and
    /// time all-reduces.
    DistCheck(dist_check::DistCheckArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Bench(args) => bench::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::InitTiny(args) => init_tiny::run(args),
        Command::Cache(args) => cache::run(args),
        Command::Train(args) => train::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Export(args) => export::run(args),
        Command::Fid(args) => fid::run(args),
        Command::Sample(args) => sample::run(args),
        Command::DistCheck(args) => dist_check::run(args),
    }
}
