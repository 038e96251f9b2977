use super::dist_check::DistArgs;
use super::interrupt::{FirstSignal, Interrupt};
use crate::compare::config::{CompareConfig, Parallelism};
use crate::compare::presets::DEFAULT_PRESET;
use crate::compare::ranks::run_whole_units;
use crate::compare::runner::{check_world_size, run_in, CompareOptions, Outcome, REPORT_MD};
use crate::compare::teams;
use crate::compare::workers;
use crate::compare::StudyResults;
use crate::dist::Launch;
use anyhow::{bail, Result};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// A shipped run file: `tiny` (the default: minutes on a CPU, nothing downloaded),
    /// `sd14-food101` (the study's setup; needs --model and --data) or `sdxl-food101` (the study
    /// on SDXL at 1024 px; the same).
    #[arg(long, conflicts_with = "config")]
    pub preset: Option<String>,
    /// A run file (TOML); see presets/*.toml for the format.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output folder (default runs/compare-NAME). Running again with the same folder reuses or
    /// resumes what is there.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Base model: a diffusers folder or hub id (sets model.source).
    #[arg(long)]
    pub model: Option<String>,
    /// Dataset folder (sets data.source).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Override a run-file setting: train.steps=100, sample.per_class=4,
    /// methods.lora.settings.rank=8 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the resolved run file and exit (under a launcher, rank 0 prints).
    #[arg(long)]
    pub print_config: bool,
    /// Run K units of the study at once, as K processes on the output folder with an even share
    /// of the cores as torch threads each (not under a launcher). Other `compare` processes on
    /// the same folder (a job array, another terminal) join in the same way.
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub jobs: u32,
    #[command(flatten)]
    pub dist: DistArgs,
}

pub fn run(args: CompareArgs) -> Result<()> {
    let config = compare_config(&args)?;
    let launch = Launch::from_env()?;
    if args.print_config {
        // Under a launcher every rank resolves the same run file: rank 0 prints it.
        if launch.is_none_or(|launch| launch.rank == 0) {
            print!("{}", config.to_toml()?);
        }
        return Ok(());
    }
    // Run-parallel ranks: each method's width (the ranks a run of it spans). Every rank refuses
    // bad settings on its own, before the ranks join.
    let mut widths = None;
    if let Some(launch) = &launch {
        match config.study.parallel {
            Parallelism::Run => {
                let device = config.train.device.resolve()?;
                widths = Some(teams::widths(&config, launch, device)?);
            }
            Parallelism::Data => check_world_size(&config, launch.world_size)?,
        }
        if args.jobs > 1 {
            bail!("--jobs runs processes of its own: not under a launcher, which starts the ranks");
        }
    }
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from(format!("runs/compare-{}", config.name)));

    let interrupt = Interrupt::install(
        "compare",
        FirstSignal::Stop("stopping at the next checkpoint"),
    )?;
    // Under a launcher every rank runs every stage (see compare::runner), or whole units (see
    // compare::ranks); rank 0 prints the results.
    let (group, _) = super::launch::join(&args.dist, config.train.device.resolve()?)?;
    let workers = match args.jobs {
        1 => None,
        jobs => {
            let jobs = jobs as usize;
            let threads = workers::threads_per_worker(crate::compare::machine::cores(), jobs);
            eprintln!(
                "compare: {jobs} worker processes on {}, {threads} torch thread(s) each",
                out.display()
            );
            tch::set_num_threads(threads as i32);
            let args: Vec<_> = std::env::args_os().collect();
            Some(workers::Workers::spawn(&args, jobs, threads)?)
        }
    };
    let opts = CompareOptions {
        config,
        out: out.clone(),
        progress: true,
        interrupt: interrupt.flag(),
    };
    let outcome = match widths {
        Some(widths) => run_whole_units(&opts, &group, widths)?,
        None => run_in(&opts, &group)?,
    };
    group.shutdown()?;
    if let Some(workers) = workers {
        workers.wait()?;
    }
    match outcome {
        Outcome::Finished(results) => print_results(&results, &out),
        Outcome::FinishedOnMainRank => {}
        Outcome::Interrupted => {
            return Err(interrupt.stopped(format!(
                "interrupted, resume with --resume: run the same command again to resume from {}",
                out.display()
            )))
        }
    }
    Ok(())
}

/// The run file or preset with `--set`, `--model` and `--data` merged in, checked.
fn compare_config(args: &CompareArgs) -> Result<CompareConfig> {
    let mut overrides = args.set.clone();
    if let Some(model) = &args.model {
        overrides.push(format!(
            "model.source={}",
            toml::Value::String(model.clone())
        ));
    }
    if let Some(data) = &args.data {
        overrides.push(format!(
            "data.source={}",
            toml::Value::String(data.display().to_string())
        ));
    }
    match &args.config {
        Some(path) => crate::settings::compare::load(path, &overrides),
        None => crate::settings::compare::preset(
            args.preset.as_deref().unwrap_or(DEFAULT_PRESET),
            &overrides,
        ),
    }
}

/// Prints the study's tables and checks.
fn print_results(results: &StudyResults, out: &Path) {
    println!("Table 1. FID (lower is better)\n\n{}", results.table1());
    println!(
        "Table 2. Trained parameters and training cost relative to full fine-tuning\n\n{}",
        results.table2()
    );
    for check in &results.checks {
        println!(
            "{}: {}",
            if check.passed { "PASS" } else { "FAIL" },
            check.statement
        );
    }
    println!("\nreport: {}", out.join(REPORT_MD).display());
}
