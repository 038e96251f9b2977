use super::dist_check::DistArgs;
use super::interrupt::{FirstSignal, Interrupt};
use crate::dist::ProcessGroup;
use crate::settings::train::{TrainFlags, TrainSources};
use crate::train::config::RunConfig;
use crate::train::{train_in, Resume, TrainOptions, TrainSummary};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Tuning method (full, lora, adapter, prefix, bitfit); may come from the config's [method].
    #[arg(long)]
    pub method: Option<String>,
    /// Diffusers model folder or hub id.
    #[arg(long)]
    pub model: String,
    /// Dataset folder (cached into OUT/cache or --cache first) or a cache folder.
    #[arg(long)]
    pub data: PathBuf,
    /// Run config TOML: a [train] table and a [method] table.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a setting: train.KEY=VALUE, method.KEY=VALUE, or a bare KEY (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Output folder: run.toml, metrics.jsonl, checkpoints/, adapter.safetensors.
    #[arg(long)]
    pub out: PathBuf,
    /// Where to cache a dataset's latents (default OUT/cache).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Continue from the newest checkpoint in OUT.
    #[arg(long)]
    pub resume: bool,
    /// Continue from this checkpoint of OUT (`step-00000012`, or its step), setting the newer
    /// ones aside (`step-N.abandoned`): after a divergence that a lower learning rate did not fix.
    #[arg(long, value_name = "CHECKPOINT", value_parser = crate::train::checkpoint::parse_step)]
    pub resume_from: Option<usize>,
    /// Optimizer steps (train.steps).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Images per forward pass (train.batch_size).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Learning rate (train.learning_rate).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed (train.seed): 0 to 2^63-1, the range of a TOML integer (run.toml records it).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=i64::MAX as u64))]
    pub seed: Option<u64>,
    /// Recompute U-Net blocks in the backward pass to save memory (train.gradient_checkpointing).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Lay the U-Net's convolutions and latents out channels-last, NHWC (train.channels_last).
    #[arg(long)]
    pub channels_last: bool,
    /// Fail on an unreadable image instead of skipping it.
    #[arg(long)]
    pub strict: bool,
    /// Save a checkpoint and stop after this many steps of this invocation.
    #[arg(long)]
    pub stop_after: Option<usize>,
    #[command(flatten)]
    pub dist: DistArgs,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let config = run_config(&args)?;
    let device = config.train.device.resolve()?;
    let interrupt = Interrupt::install(
        "train",
        FirstSignal::Stop("saving a checkpoint after this step"),
    )?;
    let options = TrainOptions {
        model: args.model,
        data: args.data,
        cache: args.cache,
        out: args.out.clone(),
        config,
        resume: match (args.resume_from, args.resume) {
            (Some(step), _) => Resume::From(step),
            (None, true) => Resume::Newest,
            (None, false) => Resume::No,
        },
        strict: args.strict,
        stop_after: args.stop_after,
        interrupt: interrupt.flag(),
        progress: true,
    };
    // Before the ranks join, so that each refuses bad inputs on its own.
    options.check()?;
    // Under torchrun or SLURM: this process is one rank of a data-parallel run.
    let group = ProcessGroup::from_env(device, args.dist.timeout())?;
    let summary = train_in(&options, &group)?;
    let main = group.is_main();
    group.shutdown()?;
    if !main && !summary.interrupted {
        return Ok(());
    }
    report(&summary, &interrupt)
}

/// The run's settings: the run file, `--method`, `--set` and the flags, merged and checked.
fn run_config(args: &TrainArgs) -> Result<RunConfig> {
    crate::settings::train::run_config(&TrainSources {
        config: args.config.as_deref(),
        method: args.method.as_deref(),
        set: &args.set,
        flags: TrainFlags {
            steps: args.steps,
            batch_size: args.batch,
            learning_rate: args.lr,
            seed: args.seed,
            gradient_checkpointing: args.gradient_checkpointing,
            channels_last: args.channels_last,
        },
    })
}

/// Where the run ended: the adapter file, or the checkpoint to resume from.
fn report(summary: &TrainSummary, interrupt: &Interrupt) -> Result<()> {
    match (&summary.adapter, &summary.checkpoint) {
        (Some(adapter), _) => println!(
            "trained {} parameters for {} steps; adapter file: {}",
            summary.trainable_parameters,
            summary.step,
            adapter.display()
        ),
        (None, checkpoint) if summary.interrupted => {
            return Err(interrupt.stopped(format!(
                "interrupted, resume with --resume (stopped at step {}{})",
                summary.step,
                checkpoint
                    .as_ref()
                    .map(|c| format!("; checkpoint {}", c.display()))
                    .unwrap_or_default()
            )))
        }
        (None, Some(ckpt)) => println!(
            "stopped at step {}; checkpoint: {}",
            summary.step,
            ckpt.display()
        ),
        (None, None) => println!("stopped at step {}", summary.step),
    }
    Ok(())
}
