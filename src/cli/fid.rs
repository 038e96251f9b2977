//! `difftune fid A B`: FID (and KID) between two image folders or saved statistics, as
//! pytorch-fid computes it.
use super::dist_check::DistArgs;
use super::launch;
use crate::dist::ProcessGroup;
use crate::eval::features::DEFAULT_BATCH_SIZE;
use crate::eval::fid::small_sample_warning;
use crate::eval::kid::{DEFAULT_SUBSETS, DEFAULT_SUBSET_SIZE};
use crate::eval::{
    frechet_distance, images, kid, resolve_weights, Bootstrap, Estimate, FidModel, Kid, Statistics,
};
use crate::util::device::DeviceChoice;
use crate::util::progress::Progress;
use anyhow::{bail, Context, Result};
use clap::Args;
use faer::Mat;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct FidArgs {
    /// A folder of images (png, jpg, webp) or a pytorch-fid `.npz` statistics file.
    pub a: PathBuf,
    /// The second folder or `.npz`; may be left out with --save-stats.
    pub b: Option<PathBuf>,
    /// Inception feature width: 64, 192, 768 or 2048 (the standard FID).
    #[arg(long, default_value_t = 2048)]
    pub dims: usize,
    /// Converted Inception weights (safetensors); default: difftune's cache folder.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE)]
    pub batch: usize,
    /// Also compute KID (needs image folders, not statistics).
    #[arg(long)]
    pub kid: bool,
    /// KID: number of random subsets.
    #[arg(long, default_value_t = DEFAULT_SUBSETS)]
    pub kid_subsets: usize,
    /// KID: subset size (capped at the smaller set's size).
    #[arg(long, default_value_t = DEFAULT_SUBSET_SIZE)]
    pub kid_subset_size: usize,
    /// KID: seed of the subset draws; also the seed of the bootstrap's draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Resample both feature sets with replacement N times and report each score's spread and
    /// 95% interval (needs image folders); 0: no bootstrap.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub bootstrap: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// cpu, cuda, cuda:N, or auto (cuda when available).
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Images with more pixels are refused (an error naming the file) before decoding; the default
    /// is Pillow's decompression-bomb limit.
    #[arg(long, default_value_t = crate::data::images::DEFAULT_MAX_IMAGE_PIXELS)]
    pub max_image_pixels: u64,
    /// Save A's statistics to this `.npz` (pytorch-fid's format); A must be a folder.
    #[arg(long)]
    pub save_stats: Option<PathBuf>,
    #[command(flatten)]
    pub dist: DistArgs,
}

/// One side of the comparison: its statistics, and its features when it came from images.
struct Side {
    stats: Statistics,
    features: Option<Mat<f64>>,
}

/// Under a launcher (torchrun, srun) every rank extracts the features of its share of each
/// folder; rank 0 alone writes and prints the results.
pub fn run(args: FidArgs) -> Result<()> {
    let inputs = check_inputs(&args)?;
    // Statistics files are read before any image is processed.
    let loaded: Vec<Option<Side>> = inputs
        .iter()
        .map(|p| is_npz(p).then(|| statistics_side(p, args.dims)).transpose())
        .collect::<Result<_>>()?;
    let (group, device) = launch::join(&args.dist, args.device.resolve()?)?;
    let model = if loaded.iter().any(Option::is_none) {
        let weights = resolve_weights(args.weights.as_deref())?;
        Some(
            FidModel::load(&weights, device, args.dims)?
                .with_batch_size(args.batch)
                .with_max_image_pixels(args.max_image_pixels),
        )
    } else {
        None
    };
    let sides: Vec<Side> = inputs
        .iter()
        .zip(loaded)
        .map(|(p, loaded)| match (loaded, &model) {
            (Some(side), _) => Ok(side),
            (None, Some(model)) => image_side(p, model, &group, args.json),
            (None, None) => unreachable!("a model is loaded whenever an input is a folder"),
        })
        .collect::<Result<_>>()?;
    let main = group.is_main();
    group.shutdown()?;
    if main {
        report(&args, &sides)?;
    }
    Ok(())
}

/// The inputs (A, then B if given), refused before any work when the flags cannot apply to them.
fn check_inputs(args: &FidArgs) -> Result<Vec<&Path>> {
    if args.b.is_none() && args.save_stats.is_none() {
        bail!("give two folders/.npz files to compare, or one folder with --save-stats OUT.npz");
    }
    if args.save_stats.is_some() && is_npz(&args.a) {
        bail!(
            "--save-stats saves the statistics of an image folder, but {} is already statistics",
            args.a.display()
        );
    }
    let inputs: Vec<&Path> = std::iter::once(args.a.as_path())
        .chain(args.b.as_deref())
        .collect();
    for (wanted, flag) in [(args.kid, "--kid"), (args.bootstrap > 0, "--bootstrap")] {
        if let Some(npz) = inputs.iter().find(|p| is_npz(p)).filter(|_| wanted) {
            bail!(
                "{flag} needs image folders: {} holds only statistics",
                npz.display()
            );
        }
    }
    if args.bootstrap == 1 {
        bail!("--bootstrap needs at least 2 resamples");
    }
    if let Some(p) = inputs.iter().find(|p| !is_npz(p) && !p.is_dir()) {
        bail!(
            "{} is neither an image folder nor a .npz statistics file",
            p.display()
        );
    }
    Ok(inputs)
}

/// Saves the statistics asked for and prints the scores (text or JSON): the main rank's part.
fn report(args: &FidArgs, sides: &[Side]) -> Result<()> {
    if let Some(out) = &args.save_stats {
        sides[0].stats.write_npz(out)?;
        if !args.json {
            println!(
                "saved the statistics of {} to {}",
                args.a.display(),
                out.display()
            );
        }
    }
    let [a, b] = sides else {
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "n_a": sides[0].features.as_ref().map(|f| f.nrows()) })
            );
        }
        return Ok(());
    };
    let fid = frechet_distance(&a.stats, &b.stats)?;
    let scores = match (&a.features, &b.features) {
        (Some(fa), Some(fb)) => scores(args, fa, fb)?,
        _ => Scores::default(),
    };
    if args.json {
        let report = serde_json::json!({
            "fid": fid,
            "fid_bootstrap": scores.fid,
            "kid_mean": scores.kid.map(|k| k.mean),
            "kid_std": scores.kid.map(|k| k.std),
            "kid_bootstrap": scores.kid_bootstrap,
            "n_a": a.features.as_ref().map(|f| f.nrows()),
            "n_b": b.features.as_ref().map(|f| f.nrows()),
        });
        println!("{report}");
        return Ok(());
    }
    match &scores.fid {
        Some(e) => println!("FID: {}", describe(e)),
        None => println!("FID: {fid}"),
    }
    if let Some(k) = scores.kid {
        println!("KID: {} ± {} (subsets of {})", k.mean, k.std, k.subset_size);
    }
    if let Some(e) = &scores.kid_bootstrap {
        println!("KID: {}", describe(e));
    }
    Ok(())
}

/// What is computed from both sides' features: KID and the bootstrap, when asked for.
#[derive(Default)]
struct Scores {
    fid: Option<BootstrapSummary>,
    kid: Option<Kid>,
    kid_bootstrap: Option<BootstrapSummary>,
}

/// A bootstrap estimate without its resampled values, as printed.
#[derive(serde::Serialize)]
struct BootstrapSummary {
    value: f64,
    std: f64,
    low: f64,
    high: f64,
    resamples: usize,
    seed: u64,
}

impl BootstrapSummary {
    fn new(e: Estimate, bootstrap: &Bootstrap) -> Self {
        Self {
            value: e.value,
            std: e.std,
            low: e.low,
            high: e.high,
            resamples: bootstrap.resamples,
            seed: bootstrap.seed,
        }
    }
}

fn scores(args: &FidArgs, fa: &Mat<f64>, fb: &Mat<f64>) -> Result<Scores> {
    let (a, b) = (fa.as_ref(), fb.as_ref());
    let (subsets, size, seed) = (args.kid_subsets, args.kid_subset_size, args.seed);
    if args.bootstrap == 0 {
        let kid = args
            .kid
            .then(|| kid(a, b, subsets, size, seed))
            .transpose()?;
        return Ok(Scores {
            kid,
            ..Scores::default()
        });
    }
    let bootstrap = Bootstrap {
        resamples: args.bootstrap,
        seed,
    };
    let fid = BootstrapSummary::new(bootstrap.fid(b, a)?, &bootstrap);
    let (kid, kid_bootstrap) = match args.kid {
        true => {
            let (kid, estimate) = bootstrap.kid(b, a, subsets, size, seed)?;
            (Some(kid), Some(BootstrapSummary::new(estimate, &bootstrap)))
        }
        false => (None, None),
    };
    Ok(Scores {
        fid: Some(fid),
        kid,
        kid_bootstrap,
    })
}

fn describe(e: &BootstrapSummary) -> String {
    format!(
        "{} ± {} (95% interval [{}, {}]; bootstrap over both sets, {} resamples, seed {})",
        e.value, e.std, e.low, e.high, e.resamples, e.seed
    )
}

fn is_npz(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npz"))
}

fn statistics_side(path: &Path, dims: usize) -> Result<Side> {
    let stats = Statistics::read_npz(path)?;
    if stats.dims() != dims {
        bail!(
            "{} holds {}-dimensional statistics but --dims is {dims}",
            path.display(),
            stats.dims()
        );
    }
    Ok(Side {
        stats,
        features: None,
    })
}

fn image_side(dir: &Path, model: &FidModel, group: &ProcessGroup, quiet: bool) -> Result<Side> {
    let files = images::list_images(dir)?;
    if files.len() < 2 {
        bail!(
            "{} holds {} image(s); FID needs at least 2",
            dir.display(),
            files.len()
        );
    }
    // Rank 0 speaks for the job: the warning, its share's progress and the timing.
    let quiet = quiet || !group.is_main();
    if let Some(warning) = small_sample_warning(files.len(), model.dims()) {
        if group.is_main() {
            eprintln!("warning: {}: {warning}", dir.display());
        }
    }
    let bar = Progress::new("fid", files.len() as u64, "images", !quiet);
    bar.set_message(dir.display().to_string());
    let start = std::time::Instant::now();
    let features = model.features(&images::image_files(&files), group, |done, share| {
        bar.set_length(share as u64);
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    if !quiet {
        let seconds = start.elapsed().as_secs_f64();
        eprintln!(
            "{}: features of {} images in {seconds:.2} s ({:.2} images/s, {} rank(s))",
            dir.display(),
            files.len(),
            files.len() as f64 / seconds,
            group.world_size()
        );
    }
    let stats = Statistics::from_features(features.as_ref())
        .with_context(|| format!("statistics of {}", dir.display()))?;
    Ok(Side {
        stats,
        features: Some(features),
    })
}
