//! Sampling against diffusers' StableDiffusionPipeline on the tiny random model of
//! tests/fixtures/pipeline (built by tools/make_pipeline_fixtures.py).
use difftune::model::source::ModelFiles;
use difftune::model::weights::read_all;
use difftune::sample::png::{read_png_text, write_png};
use difftune::sample::{
    generate, initial_latents, per_image_latents, GenerateOptions, LatentGeometry, SdModels,
};
use difftune::schedulers::{self, SchedulerConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{Device, Tensor};

/// Image-space tolerance (pixels in [0, 1]).
const TOLERANCE: f64 = 1e-3;

/// SD's latent space: 4 channels, 8x downsampling.
const SD: LatentGeometry = LatentGeometry {
    channels: 4,
    scale_factor: 8,
};

/// Building models draws their initial weights from libtorch's global CPU generator, which
/// `initial_latents` seeds: the tests that do either must not run at the same time.
static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn lock_rng() -> std::sync::MutexGuard<'static, ()> {
    GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline")
}

fn read(file: &str) -> BTreeMap<String, Tensor> {
    read_all(&fixtures().join(file)).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

const PROMPTS: [&str; 2] = [
    "a photo of an astronaut riding a horse",
    "a cute corgi dog, oil painting",
];

#[test]
fn matches_diffusers_pipeline() {
    let _rng = lock_rng();
    let model_dir = fixtures().join("model");
    let files = ModelFiles::resolve(model_dir.to_str().unwrap(), None).unwrap();
    let models = SdModels::load(&files, Device::Cpu).unwrap();
    let config = SchedulerConfig::load(&files.scheduler_config).unwrap();
    let expected = read("expected.safetensors");
    let cases = [
        ("ddim_cfg", "ddim", 4, 7.5, 2, None, 2),
        (
            "pndm_cfg",
            "pndm",
            3,
            7.5,
            2,
            Some("blurry, low quality"),
            1,
        ),
        ("ddim_no_cfg", "ddim", 4, 1.0, 1, None, 1),
    ];
    for (case, scheduler, steps, guidance, n, negative, batch_size) in cases {
        let mut scheduler = schedulers::from_name(scheduler, &config).unwrap();
        let prompts: Vec<String> = PROMPTS[..n].iter().map(|p| p.to_string()).collect();
        let opts = GenerateOptions {
            steps,
            guidance_scale: guidance,
            negative_prompt: negative.map(str::to_string),
            batch_size,
        };
        let mut evaluations = 0;
        let images = generate(
            &models,
            scheduler.as_mut(),
            &prompts,
            &expected[&format!("{case}.latents")],
            &opts,
            &mut || evaluations += 1,
        )
        .unwrap();
        let err = max_abs_diff(&images, &expected[&format!("{case}.images")]);
        println!("{case}: max abs error {err:.2e}");
        assert!(err <= TOLERANCE, "{case}: max abs error {err}");
        // One U-Net evaluation per timestep (PNDM has one more than `steps`) and batch.
        let per_batch = scheduler.timesteps().len();
        assert_eq!(evaluations, per_batch * n.div_ceil(batch_size), "{case}");
    }
}

#[test]
fn initial_latents_match_torch_generator() {
    let _rng = lock_rng();
    let expected = read("latents.safetensors");
    for (seed, n, h, w) in [(0, 1, 64, 64), (42, 2, 64, 96), (1234, 2, 256, 256)] {
        let key = format!("seed{seed}_n{n}_{h}x{w}");
        let drawn = initial_latents(seed, n, h, w, SD, Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&drawn, &expected[&key]), 0.0, "{key}");
    }
    // Image i of a run uses seed S + i alone.
    let per_image = per_image_latents(41, 2, 64, 96, SD, Device::Cpu).unwrap();
    let second = initial_latents(42, 1, 64, 96, SD, Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&per_image.narrow(0, 1, 1), &second), 0.0);
    let err = initial_latents(0, 1, 60, 64, SD, Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("multiple of 8"), "{err}");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// tests/fixtures/pipeline's model with the 2-level VAE of tools/make_geometry_fixtures.py.
fn two_level_vae_model(dir: &std::path::Path) -> PathBuf {
    let model = dir.join("model");
    copy_dir(&fixtures().join("model"), &model);
    std::fs::remove_dir_all(model.join("vae")).unwrap();
    copy_dir(&fixtures().join("../pipeline_vae2/vae"), &model.join("vae"));
    model
}

#[test]
fn two_level_vae_samples_at_diffusers_default_size() {
    let _rng = lock_rng();
    let dir = tempfile::tempdir().unwrap();
    let model = two_level_vae_model(dir.path());
    let files = ModelFiles::resolve(model.to_str().unwrap(), None).unwrap();
    let models = SdModels::load(&files, Device::Cpu).unwrap();
    let geometry = models.geometry();
    assert_eq!(
        geometry,
        LatentGeometry {
            channels: 4,
            scale_factor: 2
        }
    );
    // diffusers: unet.config.sample_size (8) x vae_scale_factor (2).
    let size = models.default_size();
    assert_eq!(size, 16);
    let expected = read_all(&fixtures().join("../pipeline_vae2/expected.safetensors")).unwrap();
    let latents = per_image_latents(7, 1, size, size, geometry, Device::Cpu).unwrap();
    let config = SchedulerConfig::load(&files.scheduler_config).unwrap();
    let mut scheduler = schedulers::from_name("pndm", &config).unwrap();
    let opts = GenerateOptions {
        steps: 3,
        guidance_scale: 7.5,
        negative_prompt: None,
        batch_size: 1,
    };
    let prompts = vec![PROMPTS[0].to_string()];
    let images = generate(
        &models,
        scheduler.as_mut(),
        &prompts,
        &latents,
        &opts,
        &mut || {},
    )
    .unwrap();
    let err = max_abs_diff(&images, &expected["images"]);
    println!("2-level VAE, default size: max abs error {err:.2e}");
    assert!(err <= TOLERANCE, "max abs error {err}");
    let err = initial_latents(0, 1, 15, 16, geometry, Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("multiple of 2"), "{err}");

    // The CLI's default size is the same.
    let out = dir.path().join("out");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_difftune"))
        .args([
            "sample",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            PROMPTS[0],
        ])
        .args([
            "--steps",
            "3",
            "--seed",
            "7",
            "--out",
            out.to_str().unwrap(),
        ])
        .env("OMP_NUM_THREADS", "1")
        .status()
        .unwrap();
    assert!(status.success());
    let png = image::open(out.join("00000.png")).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), (16, 16));
    let reference = &expected["images"].get(0);
    let pixel = png.get_pixel(5, 9);
    for c in 0..3 {
        let want = reference.double_value(&[c, 9, 5]) * 255.0;
        assert!((f64::from(pixel[c as usize]) - want).abs() <= 0.5 + 255.0 * TOLERANCE);
    }
}

#[test]
fn png_text_chunks_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sample.png");
    let image = Tensor::rand([3, 5, 7], (tch::Kind::Float, Device::Cpu));
    let text = [
        ("prompt", "a bowl of ramen, 85mm".to_string()),
        ("negative_prompt", "café crème".to_string()),
        ("note", "ラーメン".to_string()),
        ("seed", "42".to_string()),
    ];
    write_png(&path, &image, &text).unwrap();
    let read = read_png_text(&path).unwrap();
    for (keyword, value) in &text {
        assert!(
            read.iter().any(|(k, v)| k == keyword && v == value),
            "{keyword} not read back from {read:?}"
        );
    }
    let decoded = image::open(&path).unwrap().to_rgb8();
    assert_eq!(decoded.dimensions(), (7, 5));
    let pixel = decoded.get_pixel(2, 1);
    let expected: Vec<u8> = (0..3)
        .map(|c| (image.double_value(&[c, 1, 2]) * 255.0).round() as u8)
        .collect();
    assert_eq!(pixel.0.to_vec(), expected);
}

fn run_cli(out: &std::path::Path, prompts: &std::path::Path, batch: &str) {
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_difftune"))
        .args(["sample", "--model"])
        .arg(fixtures().join("model"))
        .arg("--prompts")
        .arg(prompts)
        .args(["--seed", "7", "--steps", "2", "--scheduler", "ddim"])
        .args(["--width", "64", "--height", "64", "--batch", batch, "--out"])
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn cli_writes_seeded_pngs_and_grid() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "a red apple\n\na bowl of ramen\nthe moon\n").unwrap();
    let (batched, single) = (dir.path().join("batched"), dir.path().join("single"));
    run_cli(&batched, &prompts, "2");
    run_cli(&single, &prompts, "1");
    let text = read_png_text(&batched.join("00002.png")).unwrap();
    for (keyword, value) in [("prompt", "the moon"), ("seed", "9"), ("scheduler", "ddim")] {
        assert!(
            text.contains(&(keyword.to_string(), value.to_string())),
            "{text:?}"
        );
    }
    // Image i depends on its prompt and seed 7 + i only, not on the batch it was denoised in.
    for i in 0..3 {
        let name = format!("{i:05}.png");
        let a = image::open(batched.join(&name)).unwrap().to_rgb8();
        let b = image::open(single.join(&name)).unwrap().to_rgb8();
        let diff = a.iter().zip(b.iter()).map(|(x, y)| x.abs_diff(*y)).max();
        assert!(
            diff <= Some(1),
            "{name}: batched and single differ by {diff:?}"
        );
    }
    let grid = image::open(batched.join("grid.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (128, 128));
}

#[test]
fn a_non_finite_guidance_is_refused() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_difftune"))
        .args([
            "sample",
            "--model",
            "no-such-model",
            "--prompt",
            "a",
            "--guidance",
            "nan",
        ])
        .args(["--out", "unused"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("--guidance: NaN must be a finite number"),
        "{stderr}"
    );
}

/// With stderr going to a pipe (a log file, SLURM, CI) `sample` prints plain progress lines, at
/// the interval DIFFTUNE_PROGRESS_INTERVAL sets; SIGTERM exits at once with 143 (128 + SIGTERM)
/// and says so.
#[test]
fn progress_lines_in_a_log_and_sigterm_exits_143() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_difftune"))
        .args(["sample", "--model"])
        .arg(fixtures().join("model"))
        .args([
            "--prompt",
            "a red apple",
            "--steps",
            "500",
            "--scheduler",
            "ddim",
        ])
        .args(["--width", "64", "--height", "64", "--out"])
        .arg(dir.path().join("out"))
        .env("DIFFTUNE_PROGRESS_INTERVAL", "0")
        .env("OMP_NUM_THREADS", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = stderr
        .by_ref()
        .map(Result::unwrap)
        .find(|line| line.starts_with("difftune sample: "))
        .expect("a progress line");
    assert!(
        first.starts_with("difftune sample: 1/500 U-Net steps (0%), ")
            && first.contains(" U-Net steps/s, ")
            && first.ends_with(" left"),
        "{first}"
    );
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let rest: Vec<String> = stderr.map(Result::unwrap).collect();
    assert_eq!(child.wait().unwrap().code(), Some(143), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.starts_with("difftune sample: SIGTERM received, exiting now")),
        "{rest:?}"
    );
}
