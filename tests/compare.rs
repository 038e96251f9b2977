//! `difftune compare` end to end on the tiny preset with a very small budget: every artefact is
//! written, the numbers agree with each other and with the peft module, an interrupted comparison
//! resumes, and a finished one is reused.
#[path = "common/tiny_run.rs"]
mod tiny_run;

use difftune::compare::presets::preset_text;
use difftune::compare::report::Metric;
use difftune::compare::runner::{REPORT_MD, RESULTS_CSV, RESULTS_JSON};
use difftune::compare::{run, CompareConfig, CompareOptions, Outcome, StudyResults};
use difftune::model::source::ModelFiles;
use difftune::settings::compare::{compare_config, preset};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tiny_run::serial;

/// Every registered method, in the study's order.
fn methods() -> Vec<&'static str> {
    difftune::peft::method_names().collect()
}

/// The tiny preset cut down to seconds per stage, with every registered method (those the preset
/// does not name with their default settings).
fn small_tiny() -> CompareConfig {
    let mut text = preset_text("tiny").unwrap().to_string();
    let listed = preset("tiny", &[]).unwrap().methods;
    for name in methods() {
        if !listed.iter().any(|m| m.name() == name) {
            text += &format!("\n[[methods]]\nname = \"{name}\"\n");
        }
    }
    let overrides = [
        "data.synthetic.classes=3",
        "data.synthetic.train_per_class=4",
        "data.synthetic.test_per_class=4",
        "data.synthetic.resolution=32",
        // The VAE's quality has its own test below; here its training need only run.
        "model.tiny_vae.steps=10",
        "train.resolution=32",
        "train.batch_size=4",
        "train.steps=3",
        "train.device=\"cpu\"",
        "pretrain.steps=3",
        "sample.per_class=3",
        "sample.steps=2",
        "sample.grid_classes=2",
        "sample.grid_seeds=2",
        "eval.dims=64",
        "eval.feature_weights=\"random\"",
        "eval.kid_subsets=5",
        "eval.bootstrap=20",
    ];
    compare_config(&text, &overrides.map(String::from)).unwrap()
}

fn options(config: &CompareConfig, out: &Path) -> CompareOptions {
    CompareOptions {
        config: config.clone(),
        out: out.to_path_buf(),
        progress: false,
        interrupt: Arc::new(AtomicBool::new(false)),
    }
}

fn finished(outcome: Outcome) -> StudyResults {
    match outcome {
        Outcome::Finished(results) => *results,
        Outcome::Interrupted => panic!("the comparison stopped early"),
        Outcome::FinishedOnMainRank => panic!("a single process is rank 0"),
    }
}

fn assert_png(path: &Path) {
    let image = image::open(path)
        .unwrap_or_else(|e| panic!("{} is not a readable image: {e}", path.display()));
    assert!(
        image.width() > 16 && image.height() > 16,
        "{} is {}x{}",
        path.display(),
        image.width(),
        image.height()
    );
}

fn modified(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

#[test]
fn tiny_compare_writes_consistent_artefacts_resumes_and_reuses() {
    let _guard = serial();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("compare");
    let config = small_tiny();
    let test_started = Instant::now();

    // Interrupted at once: the first training run stops after its first step.
    let interrupted = options(&config, &out);
    interrupted.interrupt.store(true, Ordering::SeqCst);
    assert!(matches!(run(&interrupted).unwrap(), Outcome::Interrupted));
    assert!(!out.join(RESULTS_JSON).exists());

    let started = Instant::now();
    let results = finished(run(&options(&config, &out)).unwrap());
    let first_seconds = started.elapsed().as_secs_f64();

    // Every artefact.
    for file in [RESULTS_JSON, RESULTS_CSV, REPORT_MD] {
        assert!(out.join(file).is_file(), "{file} is missing");
    }
    for plot in ["fid_vs_params", "train_time", "loss_curves"] {
        assert_png(&out.join(format!("plots/{plot}.png")));
    }
    for grid in ["comparison", "base"].into_iter().chain(methods()) {
        assert_png(&out.join(format!("grids/{grid}.png")));
    }
    let saved: StudyResults =
        serde_json::from_str(&std::fs::read_to_string(out.join(RESULTS_JSON)).unwrap()).unwrap();
    assert_eq!(saved, results);

    // Every method starts from the same base model with its new parameters at a setting that
    // leaves the U-Net's output unchanged, and every run draws the same first batch, so each
    // run's first loss (computed before any update) is the base model's, bit for bit. A run that
    // started from another U-Net, other latents or an adapter that is not neutral at
    // initialisation breaks this.
    let first_loss = |method: &str| -> f64 {
        let metrics =
            std::fs::read_to_string(out.join(format!("runs/{method}/metrics.jsonl"))).unwrap();
        let first: serde_json::Value =
            serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
        first["loss"].as_f64().unwrap()
    };
    let full_first = first_loss("full");
    for method in methods() {
        assert_eq!(first_loss(method), full_first, "{method}'s first loss");
    }

    // The rows: base first, then every method, each scored on the same number of images.
    let names: Vec<&str> = results.rows.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(names[0], "base");
    assert_eq!(names[1..], methods());
    for row in &results.rows {
        assert!(
            row.fid.is_finite() && row.fid >= 0.0,
            "{}: FID {}",
            row.method,
            row.fid
        );
        assert!(
            row.kid_mean.is_finite(),
            "{}: KID {}",
            row.method,
            row.kid_mean
        );
        assert_eq!(row.images, 3 * 3, "{}", row.method);
        assert_eq!(row.train.is_some(), row.method != "base");
        // Every score carries a bootstrap uncertainty around it.
        for (name, value, u) in [
            ("FID", row.fid, row.fid_uncertainty),
            ("KID", row.kid_mean, row.kid_uncertainty),
        ] {
            assert!(
                u.std.is_finite() && u.std > 0.0 && u.low < value && value < u.high,
                "{} {name}: {value} with {u:?}",
                row.method
            );
        }
    }
    // Each method is judged against the base row on both scores, and the report says which
    // differences are within their uncertainty.
    for method in methods() {
        for metric in [Metric::Fid, Metric::Kid] {
            assert!(
                results
                    .differences
                    .iter()
                    .any(|d| d.first == method && d.second == "base" && d.metric == metric),
                "no {metric:?} difference of {method} against base"
            );
        }
    }
    assert!(results.uncertainty.contains("20 resamples"));
    assert!(results
        .checks
        .iter()
        .any(|c| c.statement.contains("finite") && c.passed));

    // The preset's v-prediction reached the model's scheduler config, which training and
    // sampling both read.
    let scheduler: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model/base/scheduler/scheduler_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(scheduler["prediction_type"], "v_prediction");

    // The base model samples, by default, at the size it was trained at.
    let files = ModelFiles::resolve(&out.join("model/base").display().to_string(), None).unwrap();
    let models = difftune::sample::pipeline::SdModels::load(&files, tch::Device::Cpu).unwrap();
    assert_eq!(models.default_size(), config.train.resolution as usize);

    // Trainable parameters as the peft module counts them on the same base U-Net.
    let (vs, mut unet) = difftune::model::pipeline::load_unet(&files, tch::Device::Cpu).unwrap();
    let unet_params: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
    for (entry, row) in config.methods.iter().zip(results.methods()) {
        let method = entry.run.method.method();
        let expected = difftune::peft::trainable_parameter_count(method, &mut unet, &vs).unwrap();
        assert_eq!(
            row.trainable_params,
            Some(expected as u64),
            "{}",
            entry.name()
        );
        assert_eq!(row.unet_params, unet_params as u64);
    }
    assert_eq!(
        results.full().unwrap().trainable_params,
        Some(unet_params as u64)
    );

    // Both tables list every method in the study's format; the CSV has one line per row.
    let table1 = results.table1();
    let table2 = results.table2();
    for row in results.methods() {
        assert!(table1.contains(&format!("| {} |", row.label)), "{table1}");
        assert!(table2.contains(&format!("| {} |", row.label)), "{table2}");
    }
    assert!(table2.contains("(100%) | 100% | 100% |"), "{table2}");
    let report = std::fs::read_to_string(out.join(REPORT_MD)).unwrap();
    assert!(report.contains(&table1) && report.contains(&table2));
    assert!(report.contains(&results.differences_table()));
    assert!(
        table1
            .lines()
            .skip(2)
            .all(|l| l.matches(" ± ").count() == 2),
        "{table1}"
    );
    assert!(
        report.contains("random initialisation"),
        "the report must say which FID features it used"
    );
    assert_eq!(
        std::fs::read_to_string(out.join(RESULTS_CSV))
            .unwrap()
            .lines()
            .count(),
        1 + results.rows.len()
    );

    // A second invocation reuses everything: no dataset, model or run is written again.
    let outputs: Vec<_> = [
        "data/target/meta/train.json",
        "data/source/meta/train.json",
        "model/tiny/vae/diffusion_pytorch_model.safetensors",
        "model/base/unet/diffusion_pytorch_model.safetensors",
        "eval/reference-features.safetensors",
    ]
    .into_iter()
    .map(|p| out.join(p))
    .chain(
        methods()
            .into_iter()
            .map(|m| out.join(format!("runs/{m}/adapter.safetensors"))),
    )
    .collect();
    let stamps: Vec<_> = outputs.iter().map(|p| modified(p)).collect();
    let before_second = test_started.elapsed().as_secs_f64();
    let started = Instant::now();
    let again = finished(run(&options(&config, &out)).unwrap());
    let second_seconds = started.elapsed().as_secs_f64();
    assert_eq!(
        outputs.iter().map(|p| modified(p)).collect::<Vec<_>>(),
        stamps
    );
    let fids = |r: &StudyResults| r.rows.iter().map(|row| row.fid).collect::<Vec<_>>();
    assert_eq!(fids(&again), fids(&results));
    // The report's wall time covers every invocation, the reusing one included.
    assert_eq!(again.invocations, results.invocations + 1);
    // The earlier invocations' time was kept: at least what the first report said, at most the
    // time the test had run before the second invocation.
    let earlier = again.wall_seconds - again.invocation_seconds;
    assert!(
        earlier >= results.wall_seconds && earlier <= before_second,
        "earlier invocations {earlier:.2} s, first report {:.2} s, elapsed {before_second:.2} s",
        results.wall_seconds
    );
    println!("first run {first_seconds:.1} s, reusing run {second_seconds:.1} s");
}

/// The tiny preset's VAE, trained as the preset trains it on the preset's two domains,
/// reconstructs the held-out test images within the bound docs/tiny-preset.md states: mean
/// squared error below 0.05 (images in [-1, 1]; 0.031 measured, against 0.125 for the 8x VAE of
/// 64 px images the preset used before).
#[test]
fn tiny_preset_vae_reconstructs_the_test_images() {
    // The VAE's training draws from torch's global generator: the other test must not draw in
    // between, or the weights (and the MSE) change.
    let _guard = serial();
    use difftune::compare::tiny_vae::train_tiny_vae;
    use difftune::data::synthetic::{generate_food101_like, Domain};
    let config = preset("tiny", &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = &config.data.synthetic;
    let domains: Vec<_> = [Domain::Target, Domain::Source]
        .into_iter()
        .map(|domain| {
            let path = dir.path().join(format!("{domain:?}"));
            let spec = s.spec(domain);
            generate_food101_like(&path, &spec).unwrap();
            path
        })
        .collect();
    let model = dir.path().join("model");
    let vae = &config.model.tiny_vae;
    config
        .model
        .write_tiny_model(&model, config.train.resolution)
        .unwrap();
    let paths: Vec<&Path> = domains.iter().map(|p| p.as_path()).collect();
    let started = Instant::now();
    let report = train_tiny_vae(
        &model,
        &paths,
        config.train.resolution,
        vae,
        tch::Device::Cpu,
        false,
    )
    .unwrap();
    println!(
        "tiny VAE: {report:?} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(vae.downsampling, 4);
    assert!(report.test_mse < 0.05, "{report:?}");
}
