//! `difftune compare` end to end on the tiny preset with a very small budget: every artefact is
//! written, the numbers agree with each other and with the peft module, a comparison interrupted
//! inside any of its stages resumes, a finished one is reused, and a changed setting redoes only
//! what depends on it.
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
        // Two runs per method, two learning rates to choose from for two of the methods (the
        // others train at the configured rate), the scores along the budget, a short timing pass
        // and content classifier.
        "study.runs=2",
        "study.lr_search.candidates=[]",
        "methods.full.lr_candidates=[1e-3, 3e-3]",
        "methods.lora.lr_candidates=[1e-3, 1e-2]",
        "methods.prefix.lr_candidates=[]",
        "methods.bitfit.lr_candidates=[]",
        "study.lr_search.steps=2",
        "study.lr_search.validation_per_class=1",
        "study.lr_search.samples_per_class=2",
        "eval.at_steps=[1, 2]",
        "study.timing.rounds=2",
        "study.timing.steps=2",
        "study.timing.warmup=1",
        "eval.classifier.steps=10",
    ];
    compare_config(&text, &overrides.map(String::from)).unwrap()
}

/// Sets `options`' interrupt flag (from another thread) once `out/path` exists: the comparison
/// stops at the next safe point of the stage that wrote it. The stages write their state file
/// before they start working, and every training run, sampling and timing pass takes longer to
/// set up than the watcher takes to see it.
fn interrupt_when(options: &CompareOptions, path: &str) -> std::thread::JoinHandle<()> {
    let flag = options.interrupt.clone();
    let file = options.out.join(path);
    std::thread::spawn(move || {
        let started = Instant::now();
        while !file.exists() && started.elapsed().as_secs() < 600 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        flag.store(true, Ordering::SeqCst);
    })
}

/// Runs `config` into `out`, interrupted once `path` exists; the comparison must stop early.
fn interrupted_at(config: &CompareConfig, out: &Path, path: &str) {
    let options = options(config, out);
    let watcher = interrupt_when(&options, path);
    let outcome = run(&options).unwrap();
    watcher.join().unwrap();
    assert!(
        matches!(outcome, Outcome::Interrupted),
        "the comparison did not stop inside the stage that wrote {path}"
    );
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

    // Interrupted inside each new stage in turn, each invocation resuming the last: a learning
    // rate candidate's run (while the target's test images are away: the search must not read
    // them), a final run that keeps its weights along the budget, the timing pass and the
    // sampling along the budget.
    let test_images = target_test_images(&config, &out);
    interrupted_at(&config, &out, "state/run-full-lr1e-3.json");
    hide(&test_images, true);
    interrupted_at(&config, &out, "state/run-full.json");
    hide(&test_images, false);
    interrupted_at(&config, &out, "state/run-lora-r1.json");
    interrupted_at(&config, &out, "state/timing.json");
    interrupted_at(&config, &out, "state/samples-full-step1.json");

    let started = Instant::now();
    let results = finished(run(&options(&config, &out)).unwrap());
    let first_seconds = started.elapsed().as_secs_f64();
    check_the_study_s_parts(&config, &out, &results);

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
    // Full fine-tuning is the reference of time, FLOPs and wall time.
    assert!(table2.contains("(100%) | 100% | ["), "{table2}");
    assert!(table2.contains("FLOP (100%) | 100% |"), "{table2}");
    let report = std::fs::read_to_string(out.join(REPORT_MD)).unwrap();
    assert!(report.contains(&table1) && report.contains(&table2));
    assert!(report.contains(&results.differences_table()));
    // FID, KID, precision, recall and the content score's two shares.
    assert!(
        table1
            .lines()
            .skip(2)
            .all(|l| l.matches(" ± ").count() == 6),
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
    assert_eq!(again.lr_search, results.lr_search);
    assert_eq!(again.curves, results.curves);
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

    // A third run per method and a third candidate for full fine-tuning: only the new units run.
    let mut more = config.clone();
    more.study.runs = 3;
    let full = more
        .methods
        .iter_mut()
        .find(|m| m.name() == "full")
        .unwrap();
    full.lr_candidates.as_mut().unwrap().push(1e-4);
    let kept: Vec<_> = [
        "runs/full-lr1e-3",
        "runs/full-lr3e-3",
        "runs/lora-lr1e-2",
        "runs/lora-r1",
    ]
    .iter()
    .map(|run| out.join(run).join("adapter.safetensors"))
    .collect();
    let kept_stamps: Vec<_> = kept.iter().map(|p| modified(p)).collect();
    let started = Instant::now();
    let grown = finished(run(&options(&more, &out)).unwrap());
    println!(
        "with a run and a candidate more: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        kept.iter().map(|p| modified(p)).collect::<Vec<_>>(),
        kept_stamps
    );
    assert!(out.join("runs/full-lr1e-4/adapter.safetensors").is_file());
    assert!(grown.methods().all(|row| row.runs.len() == 3));
}

/// The test images of the synthetic target domain (the files of its test listing).
fn target_test_images(config: &CompareConfig, out: &Path) -> Vec<std::path::PathBuf> {
    let s = &config.data.synthetic;
    let listing = std::fs::read_to_string(out.join("data/target/meta/test.txt"));
    // The data is generated by the first (interrupted) invocation.
    let listing = listing.expect("the target domain is generated by now");
    let files: Vec<_> = listing
        .lines()
        .map(|entry| out.join("data/target/images").join(format!("{entry}.jpg")))
        .collect();
    assert_eq!(files.len(), s.classes * s.test_per_class);
    files
}

/// Moves `files` aside (`hidden`) or back.
fn hide(files: &[std::path::PathBuf], hidden: bool) {
    for file in files {
        let aside = file.with_extension("jpg.away");
        let (from, to) = if hidden {
            (file, &aside)
        } else {
            (&aside, file)
        };
        std::fs::rename(from, to).unwrap();
    }
}

/// The parts a study with several runs, a learning-rate search, scores along the budget, a timing
/// pass and a content classifier adds to the results.
fn check_the_study_s_parts(config: &CompareConfig, out: &Path, results: &StudyResults) {
    // Every method's two runs, with their seeds, in results.json.
    for row in results.methods() {
        let seeds: Vec<u64> = row.runs.iter().map(|r| r.seed).collect();
        assert_eq!(
            seeds,
            [config.train.seed, config.train.seed + 1],
            "{}",
            row.method
        );
        assert!(row
            .runs
            .iter()
            .all(|r| r.fid.is_finite() && r.kid.is_finite()));
        let mean = row.runs.iter().map(|r| r.fid).sum::<f64>() / 2.0;
        assert!(
            (mean - row.fid).abs() < 1e-12,
            "{}: {} against {mean}",
            row.method,
            row.fid
        );
        for share in [
            row.precision,
            row.recall,
            row.class_accuracy,
            row.target_share,
        ] {
            let share = share.expect("a score of every row").value;
            assert!((0.0..=1.0).contains(&share), "{}: {share}", row.method);
        }
    }
    // The learning rates: each searching method's rate is its lowest validation KID, and its runs
    // trained at it (their run config says so); the others kept theirs.
    let search = results.lr_search.as_ref().expect("the search's results");
    assert_eq!(search.methods.len(), 2);
    for choice in &search.methods {
        let best = choice
            .candidates
            .iter()
            .min_by(|a, b| a.kid.unwrap().value.total_cmp(&b.kid.unwrap().value))
            .unwrap();
        assert_eq!(choice.chosen, best.learning_rate, "{}", choice.method);
        let row = results
            .rows
            .iter()
            .find(|r| r.method == choice.method)
            .unwrap();
        assert_eq!(row.learning_rate, Some(choice.chosen));
        let run = std::fs::read_to_string(out.join(format!("runs/{}-r1/run.toml", choice.method)));
        let run = difftune::train::RunConfig::from_toml(&run.unwrap()).unwrap();
        assert_eq!(run.train.learning_rate, choice.chosen);
        assert_eq!(run.train.seed, config.train.seed + 1);
    }
    let adapter = results.rows.iter().find(|r| r.method == "adapter").unwrap();
    assert_eq!(adapter.learning_rate, Some(config.train.learning_rate));
    // The candidates trained on the training images less one per class, and were scored on those.
    let fit = std::fs::read_to_string(out.join("data/target-validation/meta/train.txt")).unwrap();
    let held = std::fs::read_to_string(out.join("data/target-validation/meta/test.txt")).unwrap();
    let s = &config.data.synthetic;
    assert_eq!(held.lines().count(), s.classes);
    assert_eq!(fit.lines().count(), s.classes * (s.train_per_class - 1));

    // Scores along the budget, from the weights the runs kept there: the adapter file at step 1
    // holds the checkpoint of step 1 (still kept at this budget), and steps 1, 2 and the end are
    // scored for every method.
    let at_one = difftune::model::weights::read_all(
        &out.join("runs/lora-r1/adapter-step-00000001.safetensors"),
    )
    .unwrap();
    let checkpoint = out.join("runs/lora-r1/checkpoints/step-00000001");
    let trained = difftune::train::checkpoint::Checkpoint::open_verified(&checkpoint)
        .unwrap()
        .trainable()
        .unwrap();
    assert_eq!(at_one.len(), trained.len());
    for (name, tensor) in &trained {
        assert!(at_one[name].equal(tensor), "{name}");
    }
    for row in results.methods() {
        let steps: Vec<usize> = results
            .curves
            .iter()
            .filter(|p| p.method == row.method)
            .map(|p| p.step)
            .collect();
        assert_eq!(steps, [0, 1, 2, config.train.steps], "{}", row.method);
    }
    // Stopping at steps 1 and 2 and resuming trains what one uninterrupted run trains.
    check_the_run_continues_exactly(config, out);

    // The timing pass: every method timed in every round, a finite ratio inside its interval, and
    // full fine-tuning's step more FLOPs than the study's PEFT methods' (which add little to the
    // forward pass and compute no gradient of the frozen weights). The methods that rebuild their
    // weight every step (SVDiff's U diag(s) V^T, OFT's rotation, LoHa's and LoKr's products) can
    // count more than full fine-tuning at the tiny U-Net's size, where a step's activations are
    // small beside its weights (SVDiff: 0.73 GFLOP).
    let timing = results.timing.as_ref().expect("the timing pass");
    let full = timing.methods.iter().find(|m| m.method == "full").unwrap();
    assert_eq!(full.ratio, 1.0);
    for row in &timing.methods {
        assert_eq!(row.round_ratios.len(), 2, "{}", row.method);
        assert!(
            row.ratio_low <= row.ratio && row.ratio <= row.ratio_high,
            "{row:?}"
        );
        assert!(row.flops_per_step > 0.0, "{row:?}");
        if ["adapter", "lora", "prefix", "bitfit"].contains(&row.method.as_str()) {
            assert!(row.flops_per_step < full.flops_per_step, "{row:?}");
        }
    }
    let classifier = results.classifier.as_ref().expect("the content classifier");
    assert_eq!(classifier.test_images, 2 * s.classes * s.test_per_class);
    for plot in ["lr_search", "fid_curves"] {
        assert_png(&out.join(format!("plots/{plot}.png")));
    }
}

/// LoRA's run 1, trained by the study in three pieces (to steps 1 and 2, then on), against the
/// same run trained in one piece: the same weights.
fn check_the_run_continues_exactly(config: &CompareConfig, out: &Path) {
    let lora = config.methods.iter().find(|m| m.name() == "lora").unwrap();
    let mut run = difftune::train::RunConfig::from_toml(
        &std::fs::read_to_string(out.join("runs/lora-r1/run.toml")).unwrap(),
    )
    .unwrap();
    assert_eq!(run.method, lora.run.method);
    run.train.keep_checkpoints = 1;
    let dir = tempfile::tempdir().unwrap();
    let options = difftune::train::TrainOptions {
        model: out.join("model/base").display().to_string(),
        data: out.join("data/target"),
        cache: Some(out.join("cache/target")),
        out: dir.path().join("lora"),
        config: run,
        resume: difftune::train::Resume::No,
        strict: false,
        stop_after: None,
        interrupt: Arc::new(AtomicBool::new(false)),
        progress: false,
    };
    let summary = difftune::train::train(&options).unwrap();
    let straight = difftune::model::weights::read_all(&summary.adapter.unwrap()).unwrap();
    let pieces =
        difftune::model::weights::read_all(&out.join("runs/lora-r1/adapter.safetensors")).unwrap();
    for (name, tensor) in &straight {
        assert!(pieces[name].equal(tensor), "{name}");
    }
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

/// The content classifier, trained as the preset trains it on the preset's two domains, reads the
/// held-out test images of both: their dish and their domain (the content score of every sample set
/// rests on this).
#[test]
fn tiny_preset_classifier_reads_the_test_images() {
    let _guard = serial();
    use difftune::data::synthetic::{generate_food101_like, Domain};
    use difftune::data::{Dataset, DatasetOptions, ImageSource, Split};
    use difftune::eval::classifier::{ContentClassifier, LabelledImages, TARGET_DOMAIN};
    let config = preset("tiny", &[]).unwrap();
    let settings = config
        .eval
        .classifier
        .clone()
        .expect("the preset's classifier");
    let dir = tempfile::tempdir().unwrap();
    let s = &config.data.synthetic;
    let domains: Vec<_> = [
        (Domain::Source, 1 - TARGET_DOMAIN),
        (Domain::Target, TARGET_DOMAIN),
    ]
    .into_iter()
    .map(|(domain, label)| {
        let path = dir.path().join(format!("{domain:?}"));
        generate_food101_like(&path, &s.spec(domain)).unwrap();
        (path, label)
    })
    .collect();
    let labelled = |split: Split| {
        let mut items: Vec<(ImageSource, i64, i64)> = Vec::new();
        for (path, domain) in &domains {
            let options = DatasetOptions {
                split,
                ..Default::default()
            };
            for sample in Dataset::open(path, &options).unwrap().samples {
                items.push((sample.image, sample.label.unwrap() as i64, *domain));
            }
        }
        LabelledImages::load(&items, settings.image_size).unwrap()
    };
    let started = Instant::now();
    let classifier =
        ContentClassifier::train(&labelled(Split::Train), s.classes, &settings).unwrap();
    let test = labelled(Split::Test);
    let classes = Vec::<i64>::try_from(&test.classes).unwrap();
    let domains = Vec::<i64>::try_from(&test.domains).unwrap();
    let (score, domain_accuracy) = classifier.score_loaded(&test.images, &classes, Some(&domains));
    let domain_accuracy = domain_accuracy.unwrap();
    println!(
        "classifier: {:.3} of the dishes, {domain_accuracy:.3} of the domains in {:.1} s",
        score.class_accuracy,
        started.elapsed().as_secs_f64()
    );
    assert!(score.class_accuracy > 0.9, "{score:?}");
    assert!(domain_accuracy > 0.95, "{domain_accuracy}");
    assert!((score.target_share - 0.5).abs() < 0.05, "{score:?}");
}
