//! Training SDXL on the CPU with the tiny random SDXL of `tests/fixtures/sdxl/model` and a few
//! images of several sizes: the cache holds both encoders' states, the pooled embedding and each
//! image's size and crop conditions (mirrored for flipped latents); those conditions reach the
//! U-Net; a resumed run is bit-identical to an uninterrupted one; every method trains at its
//! SDXL placements with one seed giving one result; a kohya export has sd-scripts' LDM names and
//! reads back to the trained adapter; an SD v1 cache has no SDXL field; `compare` runs the study
//! end to end and `bench` times an SDXL U-Net.
#[path = "common/tiny_run.rs"]
mod tiny_run;

use difftune::data::cache::{build, CacheSettings, LatentCache, Manifest, MANIFEST_FILE};
use difftune::data::epochs::{CaptionChoice, Draw};
use difftune::model::conditioning::SizeConditions;
use difftune::model::pipeline::{load_scheduler_config, load_unet};
use difftune::model::prompt::PromptEncoder;
use difftune::model::source::ModelFiles;
use difftune::peft::export::AdapterFormat;
use difftune::peft::formats::load_adapter;
use difftune::peft::freeze;
use difftune::train::config::{DeviceChoice, RunConfig, TrainConfig};
use difftune::train::metrics::MetricsLog;
use difftune::train::step::{forward_backward, Objective, StepInputs};
use difftune::train::trainer::{latest_trainable, METRICS_FILE};
use difftune::train::{train, Resume, TrainOptions};
use difftune::util::tensor::relative_l2;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use tiny_run::serial;

const RESOLUTION: u32 = 64;
/// `(width, height)` of the dataset's images: wider, taller and square, one 81 wide so that its
/// centre crop is not symmetric (left 8, right 9).
const SIZES: [(u32, u32); 8] = [
    (81, 64),
    (64, 96),
    (100, 100),
    (72, 64),
    (64, 64),
    (130, 70),
    (64, 80),
    (90, 64),
];

fn sdxl_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdxl/model")
}

/// The tiny SDXL and an image folder (`metadata.jsonl`) of [`SIZES`] in a temp folder.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let data = root.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let mut metadata = String::new();
        for (i, &(w, h)) in SIZES.iter().enumerate() {
            let image = image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([(x * 3 + i as u32 * 29) as u8, (y * 5) as u8, (x ^ y) as u8])
            });
            image.save(data.join(format!("{i}.png"))).unwrap();
            metadata.push_str(&format!(
                "{{\"file_name\": \"{i}.png\", \"text\": \"a photo of dish {i}, red, blue\"}}\n"
            ));
        }
        std::fs::write(data.join("metadata.jsonl"), metadata).unwrap();
        Self {
            _dir: dir,
            root,
            data,
        }
    }

    fn files(&self) -> ModelFiles {
        ModelFiles::resolve(&sdxl_model().display().to_string(), None).unwrap()
    }

    /// `steps` steps of `method` on the CPU at batch 2, buckets, flips and caption dropout on.
    fn config(&self, method: &str, steps: usize) -> RunConfig {
        let mut config = RunConfig::for_method(method).unwrap();
        let t = &mut config.train;
        t.steps = steps;
        t.batch_size = 2;
        t.gradient_accumulation_steps = 1;
        t.learning_rate = 1e-3;
        t.resolution = RESOLUTION;
        t.bucket = true;
        t.bucket_step = 16;
        t.random_flip = true;
        t.caption_dropout_rate = 0.2;
        t.checkpoint_every = steps;
        t.device = DeviceChoice::Cpu;
        config
    }

    fn options(&self, config: RunConfig, out: &str) -> TrainOptions {
        tiny_run::train_options(&sdxl_model(), &self.data, &self.root, config, out)
    }

    /// A square cache at [`RESOLUTION`] with flips, in `name`.
    fn cache(&self, name: &str) -> PathBuf {
        let dir = self.root.join(name);
        let settings = CacheSettings {
            resolution: RESOLUTION,
            flip: true,
            batch_size: 4,
            ..CacheSettings::default()
        };
        build(&self.files(), &self.data, &settings, &dir).unwrap();
        dir
    }
}

fn draw(sample: usize, flipped: bool) -> Draw {
    Draw {
        sample,
        caption: CaptionChoice::Variant(0),
        flipped,
    }
}

#[test]
fn the_cache_holds_both_encoders_the_pooled_embedding_and_each_images_crop() {
    let _guard = serial();
    let fx = Fixture::new();
    let cache = LatentCache::open(&fx.cache("cache")).unwrap();
    let (mean, _, conditioning) = cache.read(&[draw(0, false), draw(5, false)]).unwrap();
    assert_eq!(mean.size(), [2, 4, 8, 8]);
    let encoder = PromptEncoder::load(&fx.files(), Device::Cpu, Kind::Float).unwrap();
    let direct = encoder
        .encode(&[
            "a photo of dish 0, red, blue",
            "a photo of dish 5, red, blue",
        ])
        .unwrap();
    // The cache encodes all eight prompts in one batch: the projection's matrix product may
    // round differently from this batch of two.
    let close = |a: &Tensor, b: &Tensor| relative_l2(a, b) <= 1e-6;
    assert!(close(&conditioning.context, &direct.context));
    let added = conditioning.added.as_ref().unwrap();
    let pooled = direct.pooled.as_ref().unwrap();
    assert_eq!(added.text_embeds.size(), [2, 24]);
    assert!(
        close(&added.text_embeds, pooled),
        "{}",
        relative_l2(&added.text_embeds, pooled)
    );
    // 81x64 resized to 81x64, centre crop left round(17 / 2) = 8; 130x70 to 118x64, left 27.
    let expected = |original, left| SizeConditions {
        original_size: original,
        crop_top_left: (0, left),
        target_size: (64, 64),
    };
    let rows = Tensor::stack(
        &[
            Tensor::from_slice(&expected((64, 81), 8).values()),
            Tensor::from_slice(&expected((70, 130), 27).values()),
        ],
        0,
    );
    assert!(added.time_ids.equal(&rows), "{}", added.time_ids);
    // A flipped latent's crop is measured in the mirrored image: 17 - 8 = 9 from its left.
    let (_, _, flipped) = cache.read(&[draw(0, true)]).unwrap();
    let ids = &flipped.added.unwrap().time_ids;
    assert_eq!(Vec::<f32>::try_from(ids.view([-1])).unwrap()[3], 9.0);
}

/// The loss of one seeded step on the cache's first two samples with a fresh U-Net.
fn first_loss(files: &ModelFiles, cache: &Path) -> f64 {
    let cache = LatentCache::open(cache).unwrap();
    let (mean, _, conditioning) = cache.batch(&[0, 1]).unwrap();
    let (_vs, unet) = load_unet(files, Device::Cpu).unwrap();
    let scheduler = load_scheduler_config(files).unwrap();
    let objective = Objective::new(&scheduler, &TrainConfig::default()).unwrap();
    tch::manual_seed(0);
    let latents = mean * 0.13025;
    let (noise, timesteps) = objective.draw(&latents).unwrap();
    let inputs = StepInputs {
        latents,
        conditioning,
        noise,
        timesteps,
    };
    forward_backward(&unet, &objective, &inputs, false, 1.0)
        .unwrap()
        .double_value(&[])
}

#[test]
fn a_cached_crop_coordinate_changes_the_loss() {
    let _guard = serial();
    let fx = Fixture::new();
    let dir = fx.cache("cache");
    let files = fx.files();
    let before = first_loss(&files, &dir);
    assert_eq!(first_loss(&files, &dir), before, "the step is not seeded");
    let mut manifest = Manifest::read(&dir).unwrap();
    let sample = &mut manifest.shards[0].samples[0];
    sample.size.as_mut().unwrap().crop_top_left = (0, 9);
    difftune::util::fs::write_json(&dir.join(MANIFEST_FILE), &manifest).unwrap();
    let after = first_loss(&files, &dir);
    println!("loss with crop left 8: {before:.6}, with 9: {after:.6}");
    assert_ne!(after, before);
}

/// The trainable tensors of a run's newest checkpoint.
fn checkpoint(out: &Path) -> Vec<(String, Tensor)> {
    latest_trainable(out).unwrap().into_iter().collect()
}

fn assert_bit_identical(a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for ((name_a, a), (name_b, b)) in a.iter().zip(b) {
        assert_eq!(name_a, name_b);
        assert!(a.equal(b), "{what}: `{name_a}` differs");
    }
}

#[test]
fn a_resumed_sdxl_run_is_bit_identical_to_an_uninterrupted_one() {
    let _guard = serial();
    let fx = Fixture::new();
    let mut config = fx.config("lora", 7);
    // 2 x 2 = 4 samples per step over 8 images in buckets: the run crosses epochs.
    config.train.gradient_accumulation_steps = 2;
    config.train.snr_gamma = 5.0;
    let whole = train(&fx.options(config.clone(), "whole")).unwrap();
    assert!(whole.finished);
    let mut first = fx.options(config.clone(), "parts");
    first.stop_after = Some(3);
    assert!(!train(&first).unwrap().finished);
    let mut rest = fx.options(config, "parts");
    rest.resume = Resume::Newest;
    assert!(train(&rest).unwrap().finished);
    assert_bit_identical(
        &checkpoint(&fx.root.join("whole")),
        &checkpoint(&fx.root.join("parts")),
        "resumed",
    );
    let losses = |out: &str| -> Vec<f64> {
        MetricsLog::read(&fx.root.join(out).join(METRICS_FILE))
            .unwrap()
            .iter()
            .map(|m| m.loss)
            .collect()
    };
    assert_eq!(losses("whole"), losses("parts"));
}

/// Every registered method trains on SDXL at its default placements, and one seed gives one
/// result (each run draws its own caches' order, flips and dropout from the seed).
#[test]
fn every_method_trains_on_sdxl_and_one_seed_gives_one_result() {
    let _guard = serial();
    let fx = Fixture::new();
    for method in difftune::peft::method_names() {
        let run = |name: &str| {
            let summary = train(&fx.options(fx.config(method, 2), name)).unwrap();
            assert!(summary.finished && summary.trainable_parameters > 0);
            checkpoint(&fx.root.join(name))
        };
        let (a, b) = (run(&format!("{method}-a")), run(&format!("{method}-b")));
        assert_bit_identical(&a, &b, method);
    }
}

#[test]
fn a_kohya_export_of_sdxl_training_has_ldm_names_and_reads_back() {
    let _guard = serial();
    let fx = Fixture::new();
    let mut config = fx.config("lora", 3);
    config.train.export = vec![AdapterFormat::Kohya];
    let summary = train(&fx.options(config, "run")).unwrap();
    let adapter = summary.adapter.unwrap();
    let kohya = AdapterFormat::Kohya.beside(&adapter);
    let keys: Vec<String> = difftune::model::weights::read_all(&kohya)
        .unwrap()
        .into_keys()
        .collect();
    assert!(!keys.is_empty());
    for key in &keys {
        assert!(
            [
                "lora_unet_input_blocks_",
                "lora_unet_middle_block_",
                "lora_unet_output_blocks_"
            ]
            .iter()
            .any(|p| key.starts_with(p)),
            "{key} is not an LDM name"
        );
    }
    // The tiny SDXL's second level, as sd-scripts names it (diffusers' down_blocks.1.attentions.0).
    let q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q.lora_down.weight";
    assert!(keys.iter().any(|k| k == q), "{keys:?}");

    let files = fx.files();
    let output = |path: &Path, base: &str| {
        let (vs, mut unet) = load_unet(&files, Device::Cpu).unwrap();
        freeze(&vs);
        let _tuned = load_adapter(path, &mut unet, &vs, base).unwrap();
        tch::manual_seed(1);
        let sample = Tensor::randn([1, 4, 8, 8], (Kind::Float, Device::Cpu));
        let conditioning = difftune::model::conditioning::TextConditioning {
            context: Tensor::randn([1, 77, 80], (Kind::Float, Device::Cpu)),
            added: Some(difftune::model::conditioning::AddedConditions {
                text_embeds: Tensor::randn([1, 24], (Kind::Float, Device::Cpu)),
                time_ids: SizeConditions::uncropped(64, 64).time_ids(1, Device::Cpu),
            }),
        };
        tch::no_grad(|| unet.forward(&sample, &Tensor::from_slice(&[500i64]), &conditioning))
    };
    let base = files.unet_identity().unwrap();
    let (trained, exported) = (output(&adapter, &base), output(&kohya, "imported"));
    let err = relative_l2(&exported, &trained);
    assert!(err <= 1e-6, "the kohya export differs by {err:.2e}");
}

/// An SD v1 cache is written as before SDXL training: no size conditions, no second encoder in
/// its key, prompt embeddings alone (the bytes were checked against the previous release's
/// `difftune cache` once; this keeps the format).
#[test]
fn an_sd_cache_has_no_sdxl_fields() {
    let _guard = serial();
    let fx = tiny_run::TinyRun::new(2, 2);
    let dir = fx.root.join("cache");
    build(&fx.files(), &fx.data, &fx.cache_settings(), &dir).unwrap();
    let manifest = std::fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap();
    for field in ["\"size\"", "text_encoder_2", "pooled"] {
        assert!(!manifest.contains(field), "{field} in {manifest}");
    }
    let prompts = difftune::model::weights::read_all(&dir.join("prompts.safetensors")).unwrap();
    assert_eq!(prompts.keys().collect::<Vec<_>>(), ["embeddings"]);
    let cache = LatentCache::open(&dir).unwrap();
    assert!(cache.batch(&[0]).unwrap().2.added.is_none());
}

/// `difftune compare` end to end on the tiny SDXL (a synthetic dataset, the five methods, a few
/// steps each): every method trains, samples through SDXL's pipeline and is scored.
#[test]
fn compare_runs_the_study_on_a_tiny_sdxl() {
    let dir = tempfile::tempdir().unwrap();
    let run_file = dir.path().join("tiny-sdxl.toml");
    let text = format!(
        r#"name = "tiny-sdxl"
[model]
source = {model:?}
[data]
source = "synthetic"
[data.synthetic]
classes = 2
train_per_class = 4
test_per_class = 4
resolution = 64
[train]
steps = 3
learning_rate = 1e-3
batch_size = 2
resolution = 64
checkpoint_every = 3
caption_dropout_rate = 0.1
bucket = true
bucket_step = 16
[[methods]]
name = "full"
[[methods]]
name = "adapter"
settings = {{ width = 4 }}
[[methods]]
name = "lora"
[[methods]]
name = "prefix"
[[methods]]
name = "bitfit"
[sample]
per_class = 2
scheduler = "euler"
steps = 3
guidance_scale = 5.0
batch_size = 4
grid_classes = 2
grid_seeds = 2
[eval]
feature_weights = "auto"
dims = 64
kid_subsets = 2
kid_subset_size = 2
bootstrap = 2
"#,
        model = sdxl_model().display().to_string()
    );
    std::fs::write(&run_file, text).unwrap();
    let out = dir.path().join("out");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_difftune"))
        .arg("compare")
        .args(["--config", run_file.to_str().unwrap()])
        .args(["--out", out.to_str().unwrap()])
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for label in ["Full fine-tuning", "Adapter", "LoRA", "Prefix", "BitFit"] {
        assert!(report.contains(label), "{label} missing from {report}");
    }
    assert!(report.contains("PASS"), "{report}");
}

/// `difftune bench` on the tiny SDXL's U-Net config: the step gets random added conditions (the
/// U-Net refuses a conditioning without them).
#[test]
fn bench_times_an_sdxl_unet() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        sdxl_model().join("unet/config.json"),
        dir.path().join("unet_config.json"),
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_difftune"))
        .arg("bench")
        .args(["--config-dir", dir.path().to_str().unwrap()])
        .args(["--methods", "lora", "--batch", "2", "--resolution", "64"])
        .args(["--warmup", "0", "--steps", "1", "--device", "cpu", "--json"])
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(
        report.to_string().contains("\"trainable_params\":8704"),
        "{report}"
    );
}
