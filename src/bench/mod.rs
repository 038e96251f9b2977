//! `difftune bench`: speed and memory of the training step per tuning method and batch size, on
//! random weights and random cached-latent-shaped inputs (nothing is downloaded). The step is the
//! trainer's own: the method registry attaches the method, `train::step::forward_backward` runs
//! the forward, loss and backward, the flat AdamW updates. `bench/peer/peer_bench.py` runs the same
//! step with diffusers + peft and prints the same JSON, with every timed step's time, so that
//! `bench/run.sh` can interleave the two tools and state the ratio with its spread.
use crate::compare::machine::{MachineInfo, PeakMemory};
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::vae::VaeConfig;
use crate::peft::MethodSettings;
use crate::sample::LatentGeometry;
use crate::schedulers::SchedulerConfig;
use crate::train::config::TrainConfig;
use crate::train::step::Objective;
use crate::train::timed_step::{StepShape, TimedStep};
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;
use tch::{nn, Device};

/// Length of the text context the U-Net cross-attends to (CLIP's 77 tokens).
pub const CONTEXT_TOKENS: i64 = crate::model::tokenizer::DEFAULT_MAX_LENGTH as i64;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// A folder holding `unet_config.json` (and optionally `scheduler_config.json`).
    pub config_dir: PathBuf,
    pub methods: Vec<String>,
    pub batches: Vec<i64>,
    /// Image side in pixels; the latents are `resolution / f` on a side, for the VAE's factor f
    /// (from `vae_config.json` beside the U-Net config, else SD's 8).
    pub resolution: i64,
    pub device: Device,
    /// Steps run before timing (allocator and kernel selection warm-up).
    pub warmup: usize,
    /// Timed steps; the median is reported.
    pub steps: usize,
    /// Also measure every method and batch with activation checkpointing.
    pub gradient_checkpointing: bool,
    /// Lay the U-Net's convolution weights and inputs out channels-last (NHWC).
    pub channels_last: bool,
    /// Update with torch's fused AdamW kernel ([`AdamW::use_fused`]).
    pub fused_adamw: bool,
    /// Profile one more step per measurement with torch's profiler, writing
    /// `difftune-<method>-b<batch>.json` (a Chrome trace) into this folder.
    pub profile: Option<PathBuf>,
}

/// One method at one batch size.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BenchResult {
    pub method: String,
    pub batch: i64,
    pub resolution: i64,
    pub median_step_s: f64,
    pub samples_per_s: f64,
    /// Peak memory over the timed steps (see [`BenchReport::memory`]); `None` where unmeasurable.
    pub peak_memory_bytes: Option<u64>,
    pub trainable_params: i64,
    /// Whether the U-Net recomputed its blocks in the backward pass (absent from the peer's JSON).
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Every timed step's time, in order.
    #[serde(default)]
    pub step_times_s: Vec<f64>,
    #[serde(default)]
    pub channels_last: bool,
    #[serde(default)]
    pub fused_adamw: bool,
}

/// What `difftune bench --json` prints (and the peer script too).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BenchReport {
    pub tool: String,
    pub device: String,
    /// Intra-op threads libtorch ran with.
    pub threads: i64,
    /// What `peak_memory_bytes` measures.
    pub memory: String,
    /// The scaled-dot-product-attention kernels torch picks for the first batch size's step.
    #[serde(default)]
    pub sdpa: String,
    pub results: Vec<BenchResult>,
}

/// Runs every method at every batch size, each on a fresh random-weight U-Net.
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    ensure!(opts.steps > 0, "--steps must be at least 1");
    let config = UNetConfig::from_file(&opts.config_dir.join("unet_config.json"))?;
    let vae_path = opts.config_dir.join("vae_config.json");
    let scale_factor = if vae_path.exists() {
        LatentGeometry::of_vae(&VaeConfig::from_file(&vae_path)?).scale_factor
    } else {
        8
    };
    ensure!(
        opts.resolution > 0 && opts.resolution % scale_factor == 0,
        "--resolution must be a positive multiple of {scale_factor} (the VAE's downsampling), got {}",
        opts.resolution
    );
    let scheduler_path = opts.config_dir.join("scheduler_config.json");
    let scheduler = if scheduler_path.exists() {
        SchedulerConfig::load(&scheduler_path)?
    } else {
        SchedulerConfig::stable_diffusion_v1()
    };
    if let Some(dir) = &opts.profile {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let latent = opts.resolution / scale_factor;
    let first_batch = opts.batches.first().copied().unwrap_or(1);
    let sdpa = crate::model::sdpa::describe(
        &config,
        first_batch,
        latent,
        opts.device,
        opts.device.is_cuda(),
    )?;
    let mut results = Vec::new();
    let mut memory_kind = None;
    let checkpointing: &[bool] = if opts.gradient_checkpointing {
        &[false, true]
    } else {
        &[false]
    };
    for method in &opts.methods {
        for (&batch, &recompute) in opts
            .batches
            .iter()
            .flat_map(|b| checkpointing.iter().map(move |c| (b, c)))
        {
            ensure!(batch > 0, "batch sizes must be positive, got {batch}");
            let step = StepSetup {
                method,
                batch,
                scale_factor,
                gradient_checkpointing: recompute,
            };
            let (result, kind) = bench_one(opts, &config, &scheduler, &step)
                .with_context(|| format!("benchmarking `{method}` at batch {batch}"))?;
            eprintln!(
                "{method:8} batch {batch:3}{}: {:.3} s/step, {:.2} samples/s",
                if recompute { " (checkpointed)" } else { "" },
                result.median_step_s,
                result.samples_per_s
            );
            results.push(result);
            memory_kind = Some(kind);
        }
    }
    let machine = MachineInfo::detect(opts.device);
    Ok(BenchReport {
        tool: "difftune".into(),
        device: if machine.gpus.is_empty() {
            machine.cpu_model
        } else {
            machine.gpus.join(", ")
        },
        threads: tch::get_num_threads() as i64,
        sdpa,
        memory: memory_kind
            .map(|k| k.describe().to_string())
            .unwrap_or_default(),
        results,
    })
}

/// What one measurement trains.
struct StepSetup<'a> {
    method: &'a str,
    batch: i64,
    /// The VAE's downsampling factor.
    scale_factor: i64,
    gradient_checkpointing: bool,
}

/// One method's training step on a random-weight U-Net (seed 0) and random inputs.
fn timed_step(
    opts: &BenchOptions,
    config: &UNetConfig,
    objective: Objective,
    setup: &StepSetup,
) -> Result<TimedStep> {
    let device = opts.device;
    tch::manual_seed(0);
    let unet_vs = nn::VarStore::new(device);
    let mut unet = UNet2DConditionModel::new(unet_vs.root(), config)?;
    unet.gradient_checkpointing = setup.gradient_checkpointing;
    let method = MethodSettings::defaults(setup.method)?;
    let shape = StepShape {
        batch: setup.batch,
        resolution: opts.resolution,
        latent: opts.resolution / setup.scale_factor,
        context_tokens: CONTEXT_TOKENS,
        // bf16 autocast with frozen weights in bf16 on CUDA, as the trainer's `precision = "auto"`.
        autocast: device.is_cuda(),
        channels_last: opts.channels_last,
        fused_adamw: opts.fused_adamw,
    };
    TimedStep::new(unet_vs, unet, &method, objective, &shape)
}

fn bench_one(
    opts: &BenchOptions,
    config: &UNetConfig,
    scheduler: &SchedulerConfig,
    setup: &StepSetup,
) -> Result<(BenchResult, crate::compare::machine::MemoryKind)> {
    let objective = Objective::new(scheduler, &TrainConfig::default())?;
    let mut bench = timed_step(opts, config, objective, setup)?;
    for _ in 0..opts.warmup {
        bench.step()?;
    }
    let probe = PeakMemory::start(opts.device);
    let mut times = Vec::with_capacity(opts.steps);
    for _ in 0..opts.steps {
        let started = Instant::now();
        bench.step()?;
        times.push(started.elapsed().as_secs_f64());
    }
    let (kind, peak_memory_bytes) = probe.finish();
    if let Some(dir) = &opts.profile {
        let trace = dir.join(format!("difftune-{}-b{}.json", setup.method, setup.batch));
        crate::util::profiler::profile(&trace, || bench.step())?;
    }
    let step_times_s = times.clone();
    let median_step_s = crate::util::stats::median(&mut times);
    Ok((
        BenchResult {
            method: setup.method.to_string(),
            batch: setup.batch,
            resolution: opts.resolution,
            median_step_s,
            samples_per_s: setup.batch as f64 / median_step_s,
            peak_memory_bytes,
            trainable_params: bench.trainable_params,
            gradient_checkpointing: setup.gradient_checkpointing,
            step_times_s,
            channels_last: opts.channels_last,
            fused_adamw: opts.fused_adamw,
        },
        kind,
    ))
}
