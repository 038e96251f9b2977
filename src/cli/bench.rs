use crate::bench::{BenchOptions, BenchReport};
use crate::util::device::DeviceChoice;
use anyhow::{ensure, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A folder holding unet_config.json (and optionally scheduler_config.json); weights are random.
    #[arg(long)]
    pub config_dir: PathBuf,
    /// Comma-separated tuning methods, or `all`.
    #[arg(long, default_value = "all")]
    pub methods: String,
    /// Comma-separated batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch: Vec<i64>,
    /// Image side in pixels (latents are a eighth of it).
    #[arg(long, default_value_t = 512)]
    pub resolution: i64,
    /// `auto` (CUDA when available), `cpu` or `cuda`. On CUDA the step runs as the trainer's
    /// default precision does: bf16 autocast, frozen weights stored in bf16.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Untimed steps before measuring.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Measure every method and batch also with activation checkpointing (time and memory of
    /// train.gradient_checkpointing).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Lay the U-Net's convolution weights and inputs out channels-last (NHWC).
    #[arg(long)]
    pub channels_last: bool,
    /// Update with torch's fused AdamW kernel (CUDA only until it is measured faster there).
    #[arg(long)]
    pub fused_adamw: bool,
    /// Profile one more step per method and batch with torch's profiler; writes
    /// difftune-<method>-b<batch>.json (Chrome traces, see bench/profile_summary.py) here.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let methods = if args.methods == "all" {
        crate::peft::method_names().map(String::from).collect()
    } else {
        args.methods
            .split(',')
            .map(|m| m.trim().to_string())
            .collect()
    };
    let device = args.device.resolve()?;
    ensure!(
        !args.fused_adamw || device.is_cuda(),
        "--fused-adamw is a CUDA option (torch's fused kernel is only worth measuring there)"
    );
    let report = crate::bench::run(&BenchOptions {
        config_dir: args.config_dir,
        methods,
        batches: args.batch,
        resolution: args.resolution,
        device,
        warmup: args.warmup,
        steps: args.steps,
        gradient_checkpointing: args.gradient_checkpointing,
        channels_last: args.channels_last,
        fused_adamw: args.fused_adamw,
        profile: args.profile,
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).context("serialising the report")?
        );
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(report: &BenchReport) {
    println!(
        "{} on {} ({} threads); memory: {}",
        report.tool, report.device, report.threads, report.memory
    );
    println!("scaled dot-product attention: {}", report.sdpa);
    println!(
        "{:8} {:>5} {:>5} {:>12} {:>10} {:>12} {:>14}",
        "method", "batch", "ckpt", "step ms", "samples/s", "peak MiB", "trainable"
    );
    for r in &report.results {
        let peak = r
            .peak_memory_bytes
            .map(|b| format!("{:.0}", b as f64 / (1u64 << 20) as f64))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:8} {:>5} {:>5} {:>12.1} {:>10.2} {:>12} {:>14}",
            r.method,
            r.batch,
            if r.gradient_checkpointing {
                "yes"
            } else {
                "no"
            },
            r.median_step_s * 1e3,
            r.samples_per_s,
            peak,
            r.trainable_params
        );
    }
}
