//! Training on the CPU with the built-in tiny model and a small synthetic Food101-layout dataset:
//! the loss falls for every method, a resumed run is bit-identical to an uninterrupted one,
//! frozen weights stay untouched, and the latent cache survives bad images and damaged shards.
#[path = "common/tiny_run.rs"]
mod tiny_run;

use difftune::data::cache::{build, CacheSettings, LatentCache, Manifest};
use difftune::model::source::ModelFiles;
use difftune::peft::MethodSettings;
use difftune::train::metrics::MetricsLog;
use difftune::train::optim::AdamW;
use difftune::train::step::{attach_method, forward_backward, Objective, StepInputs};
use difftune::train::trainer::{latest_trainable, METRICS_FILE};
use difftune::train::{train, Resume, TrainSummary};
use std::path::Path;
use tch::{Device, Kind, Tensor};
use tiny_run::{serial, TinyRun};

/// The tiny model and a 4-class dataset of 8 training images per class at 64 px.
fn fixture() -> TinyRun {
    TinyRun::new(4, 8)
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// Trains `method` for a few hundred steps and compares the mean loss of the first and last 20%.
fn loss_falls(method: &str, lr: f64) {
    loss_falls_with(method, toml::Table::new(), lr);
}

fn loss_falls_with(method: &str, settings: toml::Table, lr: f64) {
    let _guard = serial();
    let fx = fixture();
    let steps = 250;
    let mut config = fx.config(method, steps, lr);
    config.method = MethodSettings::new(method, settings).unwrap();
    let summary = train(&fx.options(config, "run")).unwrap();
    assert!(summary.finished && summary.adapter.as_ref().is_some_and(|p| p.is_file()));
    let losses: Vec<f64> = MetricsLog::read(&fx.root.join("run").join(METRICS_FILE))
        .unwrap()
        .iter()
        .map(|m| m.loss)
        .collect();
    assert_eq!(losses.len(), steps);
    let fifth = steps / 5;
    let (first, last) = (mean(&losses[..fifth]), mean(&losses[steps - fifth..]));
    println!(
        "{method}: {} trainable parameters, mean loss {first:.4} -> {last:.4}",
        summary.trainable_parameters
    );
    assert!(
        last < 0.9 * first,
        "{method}: mean loss went from {first:.4} to {last:.4}"
    );
}

#[test]
fn full_fine_tuning_lowers_the_loss() {
    loss_falls("full", 1e-3);
}

#[test]
fn lora_lowers_the_loss() {
    // The study's placement (cross-attention query and key) barely moves a random tiny model:
    // its prompts' embeddings are nearly alike, so re-weighting them changes little. Adapting
    // every attention projection shows that LoRA trains.
    let targets = ["*.to_q", "*.to_k", "*.to_v", "*.to_out.0"];
    let settings =
        toml::Table::from_iter([("targets".to_string(), toml::Value::from(targets.to_vec()))]);
    loss_falls_with("lora", settings, 2e-2);
}

#[test]
fn adapter_lowers_the_loss() {
    loss_falls("adapter", 2e-2);
}

#[test]
fn prefix_lowers_the_loss() {
    loss_falls("prefix", 2e-2);
}

#[test]
fn bitfit_lowers_the_loss() {
    loss_falls("bitfit", 2e-2);
}

/// The trainable tensors of a run's newest checkpoint, as raw bytes per name.
fn checkpoint_bytes(out: &Path) -> Vec<(String, Vec<u8>)> {
    latest_trainable(out)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let t = t.contiguous();
            let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
            t.copy_data_u8(&mut bytes, t.numel());
            (name, bytes)
        })
        .collect()
}

#[test]
fn resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let _guard = serial();
    let fx = fixture();
    let mut config = fx.config("bitfit", 9, 1e-3);
    // 3 x 2 = 6 samples per step over 32 cached ones: the run crosses an epoch boundary.
    config.train.batch_size = 3;
    config.train.gradient_accumulation_steps = 2;
    config.train.lr_schedule = difftune::train::optim::LrSchedule::Cosine;
    config.train.lr_warmup_steps = 2;
    config.train.snr_gamma = 5.0;
    config.train.noise_offset = 0.05;

    let whole = train(&fx.options(config.clone(), "whole")).unwrap();
    assert!(whole.finished);

    let mut first = fx.options(config.clone(), "parts");
    first.stop_after = Some(4);
    let part: TrainSummary = train(&first).unwrap();
    assert!(!part.finished && part.step == 4 && part.adapter.is_none());
    let mut rest = fx.options(config.clone(), "parts");
    rest.resume = Resume::Newest;
    let resumed = train(&rest).unwrap();
    assert!(resumed.finished && resumed.step == 9);

    let (a, b) = (
        checkpoint_bytes(&fx.root.join("whole")),
        checkpoint_bytes(&fx.root.join("parts")),
    );
    assert_eq!(a.len(), b.len());
    for ((name_a, bytes_a), (name_b, bytes_b)) in a.iter().zip(&b) {
        assert_eq!(name_a, name_b);
        assert!(
            bytes_a == bytes_b,
            "`{name_a}` differs between the resumed and the uninterrupted run"
        );
    }
    let log = MetricsLog::read(&fx.root.join("parts").join(METRICS_FILE)).unwrap();
    assert_eq!(
        log.iter().map(|m| m.step).collect::<Vec<_>>(),
        (1..=9).collect::<Vec<_>>()
    );
    let whole_log = MetricsLog::read(&fx.root.join("whole").join(METRICS_FILE)).unwrap();
    let losses = |log: &[difftune::train::metrics::StepMetrics]| {
        log.iter().map(|m| m.loss).collect::<Vec<_>>()
    };
    assert_eq!(losses(&log), losses(&whole_log));

    // A checkpoint is never continued with other settings.
    let mut other = fx.options(fx.config("bitfit", 12, 1e-3), "parts");
    other.resume = Resume::Newest;
    let err = format!("{:#}", train(&other).unwrap_err());
    assert!(err.contains("training settings differ"), "{err}");
    let mut other_method = fx.options(fx.config("full", 12, 1e-3), "parts");
    other_method.resume = Resume::Newest;
    let err = format!("{:#}", train(&other_method).unwrap_err());
    assert!(err.contains("method `bitfit`"), "{err}");
    // Nor is an existing run silently overwritten.
    let err = format!("{:#}", train(&fx.options(config, "parts")).unwrap_err());
    assert!(err.contains("--resume"), "{err}");
}

/// Every registered method: two runs with one seed end bit-identical, however torch's global
/// generator was left before each (as in `compare`, where earlier methods and stages draw from
/// it, or in a process that resumes a run killed before its first checkpoint).
#[test]
fn one_seed_gives_bit_identical_runs_for_every_method() {
    let _guard = serial();
    let fx = fixture();
    for method in difftune::peft::method_names() {
        let run = |name: &str, disturbance: i64| {
            tch::manual_seed(disturbance);
            let _ = Tensor::randn([97], (Kind::Float, Device::Cpu));
            let summary = train(&fx.options(fx.config(method, 3, 1e-3), name)).unwrap();
            assert!(summary.finished);
            checkpoint_bytes(&fx.root.join(name))
        };
        let (a, b) = (
            run(&format!("{method}-a"), 1),
            run(&format!("{method}-b"), 2),
        );
        assert_eq!(a.len(), b.len());
        for ((name, bytes_a), (_, bytes_b)) in a.iter().zip(&b) {
            assert!(
                bytes_a == bytes_b,
                "{method}: `{name}` differs between two runs of one seed"
            );
        }
    }
}

/// SIGTERM mid-run of the real binary: a checkpoint, exit status 143 (128 + SIGTERM) with a
/// message that says how to go on, and `--resume` ends bit-identical to an uninterrupted run.
#[test]
fn sigterm_saves_a_checkpoint_exits_143_and_resumes_bit_identically() {
    let _guard = serial();
    let fx = fixture();
    let steps = 150;
    let config_file = fx.root.join("config.toml");
    std::fs::write(
        &config_file,
        fx.config("bitfit", steps, 1e-3).to_toml().unwrap(),
    )
    .unwrap();
    let cli = |out: &str, resume: bool| {
        let mut command = fx.cli(&config_file, out);
        if resume {
            command.arg("--resume");
        }
        command
    };
    let whole = cli("whole", false).output().unwrap();
    assert!(
        whole.status.success(),
        "{}",
        String::from_utf8_lossy(&whole.stderr)
    );

    let mut child = cli("parts", false).spawn().unwrap();
    let metrics = fx.root.join("parts").join(METRICS_FILE);
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 3 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before the signal"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    send("-TERM", &child);
    let interrupted = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&interrupted.stderr);
    assert_eq!(interrupted.status.code(), Some(143), "{stderr}");
    assert!(
        stderr.contains("interrupted, resume with --resume"),
        "{stderr}"
    );
    let saved = MetricsLog::read(&metrics).unwrap().len();
    assert!(saved < steps, "stopped at {saved} of {steps}");
    assert!(!checkpoint_bytes(&fx.root.join("parts")).is_empty());

    let resumed = cli("parts", true).output().unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert!(checkpoint_bytes(&fx.root.join("whole")) == checkpoint_bytes(&fx.root.join("parts")));
}

/// Sends `signal` (as `kill` names it) to `child`.
fn send(signal: &str, child: &std::process::Child) {
    let sent = std::process::Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Two SIGINTs a few milliseconds apart (the second arriving while the first's checkpoint is
/// written, or while the process exits) end the run with 130 every time, never a panic from a
/// torch torn down under a running op.
#[test]
fn a_double_sigint_exits_130_without_a_panic() {
    let _guard = serial();
    let fx = fixture();
    let config_file = fx.root.join("config.toml");
    std::fs::write(
        &config_file,
        fx.config("lora", 100_000, 1e-3).to_toml().unwrap(),
    )
    .unwrap();
    for attempt in 0..20 {
        let out = format!("run-{attempt}");
        let mut child = fx.cli(&config_file, &out).spawn().unwrap();
        let metrics = fx.root.join(&out).join(METRICS_FILE);
        while !std::fs::read_to_string(&metrics).is_ok_and(|t| !t.is_empty()) {
            assert!(child.try_wait().unwrap().is_none(), "the run ended early");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        send("-INT", &child);
        std::thread::sleep(std::time::Duration::from_millis(attempt % 5 * 5));
        send("-INT", &child);
        let ended = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&ended.stderr);
        assert_eq!(
            ended.status.code(),
            Some(130),
            "attempt {attempt}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "attempt {attempt}: {stderr}");
    }
}

/// With stderr going to a pipe (a log file, SLURM, CI), training and the cache build print plain
/// progress lines: at each tenth of the work by default, at every step with a zero
/// DIFFTUNE_PROGRESS_INTERVAL.
#[test]
fn progress_goes_to_a_log_as_plain_lines() {
    let _guard = serial();
    let fx = fixture();
    let config_file = fx.root.join("config.toml");
    std::fs::write(
        &config_file,
        fx.config("bitfit", 20, 1e-3).to_toml().unwrap(),
    )
    .unwrap();
    let lines = |out: &str, interval: Option<&str>| {
        let mut command = fx.cli(&config_file, out);
        if let Some(seconds) = interval {
            command.env("DIFFTUNE_PROGRESS_INTERVAL", seconds);
        }
        let output = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        assert!(output.status.success(), "{stderr}");
        stderr
            .lines()
            .filter(|l| l.starts_with("difftune train: ") || l.starts_with("difftune cache: "))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let tenths = lines("tenths", None);
    let train: Vec<&String> = tenths.iter().filter(|l| l.contains(" steps ")).collect();
    assert_eq!(train.len(), 10, "{tenths:#?}");
    assert!(
        train[4].starts_with("difftune train: 10/20 steps (50%), ")
            && train[4].contains(" steps/s, ")
            && train[4].contains(" left, loss "),
        "{tenths:#?}"
    );
    assert!(
        tenths
            .iter()
            .any(|l| l.starts_with("difftune cache: 32/32 images (100%), ")),
        "{tenths:#?}"
    );
    let every_step = lines("every-step", Some("0"));
    let steps = every_step.iter().filter(|l| l.contains(" steps ")).count();
    assert_eq!(steps, 20, "{every_step:#?}");
}

#[test]
fn only_the_method_parameters_change() {
    let _guard = serial();
    let fx = fixture();
    let files = fx.files();
    let (mut unet_vs, mut unet) =
        difftune::model::pipeline::load_unet(&files, Device::Cpu).unwrap();
    let before: Vec<(String, Tensor)> = unet_vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect();
    let config = fx.config("bitfit", 3, 1e-2);
    let tuned = attach_method(&mut unet, &mut unet_vs, &config.method, config.train.seed).unwrap();
    let mut optimizer = AdamW::new(
        tuned
            .trained
            .iter()
            .map(|(_, t)| t.shallow_clone())
            .collect(),
        config.train.optimizer.clone(),
    )
    .unwrap();
    let scheduler = difftune::model::pipeline::load_scheduler_config(&files).unwrap();
    let objective = Objective::new(&scheduler, &config.train).unwrap();
    tch::manual_seed(0);
    for _ in 0..3 {
        optimizer.zero_grad();
        let latents = Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu));
        let (noise, timesteps) = objective.draw(&latents).unwrap();
        let inputs = StepInputs {
            latents,
            context: Tensor::randn([2, 77, 32], (Kind::Float, Device::Cpu)),
            noise,
            timesteps,
        };
        let _ = forward_backward(&unet, &objective, &inputs, false, 1.0).unwrap();
        optimizer.step(1e-2, Some(1.0)).unwrap();
    }
    let trainable: Vec<&str> = tuned.trained.iter().map(|(n, _)| n.as_str()).collect();
    let after = unet_vs.variables();
    let (mut changed, mut frozen) = (0, 0);
    for (name, old) in &before {
        let same = after[name].equal(old);
        if trainable.contains(&name.as_str()) {
            changed += usize::from(!same);
        } else {
            assert!(same, "frozen weight `{name}` changed");
            frozen += 1;
        }
    }
    assert!(
        changed > 0 && frozen > 0,
        "{changed} trainable tensors changed, {frozen} frozen checked"
    );
}

#[test]
fn bad_images_are_reported_and_skipped_and_strict_mode_keeps_finished_shards() {
    let _guard = serial();
    let fx = fixture();
    let files = fx.files();
    let listing = std::fs::read_to_string(fx.data.join("meta/train.txt")).unwrap();
    let entries: Vec<&str> = listing.lines().collect();
    // Shards hold 8 listing entries: damage images in the third and fourth shards.
    let corrupt = fx.data.join("images").join(format!("{}.jpg", entries[18]));
    std::fs::write(&corrupt, b"\xFF\xD8\xFF\xE0 this is not a JPEG").unwrap();
    let truncated = fx.data.join("images").join(format!("{}.jpg", entries[27]));
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let dir = fx.root.join("cache");

    let strict = CacheSettings {
        strict: true,
        ..fx.cache_settings()
    };
    let err = format!("{:#}", build(&files, &fx.data, &strict, &dir).unwrap_err());
    assert!(err.contains(&corrupt.display().to_string()), "{err}");
    let partial = Manifest::read(&dir).unwrap();
    assert!(!partial.complete);
    assert_eq!(
        partial.shards.len(),
        2,
        "the two shards before the bad image are kept"
    );
    for shard in &partial.shards {
        assert!(dir.join(&shard.file.file).is_file());
    }

    let (manifest, report) = build(&files, &fx.data, &fx.cache_settings(), &dir).unwrap();
    assert_eq!(
        report.reused_files, 3,
        "prompt embeddings and two shards reused: {report:?}"
    );
    let skipped: Vec<&str> = manifest.skipped.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        skipped,
        [
            corrupt.display().to_string(),
            truncated.display().to_string()
        ]
    );
    assert!(
        manifest.skipped[1].error.contains("truncated"),
        "{:?}",
        manifest.skipped[1]
    );
    assert_eq!(manifest.len(), 30);
    let cache = LatentCache::open(&dir).unwrap();
    assert_eq!(cache.len(), 30);
    let (mean, logvar, context) = cache.batch(&[0, 29]).unwrap();
    assert_eq!(mean.size(), [2, 4, 8, 8]);
    assert_eq!(logvar.size(), [2, 4, 8, 8]);
    assert_eq!(context.size(), [2, 77, 32]);
}

#[test]
fn damaged_or_stale_caches_are_rebuilt_never_used() {
    let _guard = serial();
    let fx = fixture();
    let files = fx.files();
    let dir = fx.root.join("cache");
    let (manifest, _) = build(&files, &fx.data, &fx.cache_settings(), &dir).unwrap();
    let shard = dir.join(&manifest.shards[1].file.file);
    let original = std::fs::read(&shard).unwrap();

    let mut damaged = original.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 0x55;
    std::fs::write(&shard, &damaged).unwrap();
    let err = format!(
        "{:#}",
        LatentCache::open(&dir)
            .err()
            .expect("a damaged cache must not open")
    );
    assert!(err.contains("checksum"), "{err}");
    let (_, report) = build(&files, &fx.data, &fx.cache_settings(), &dir).unwrap();
    assert_eq!(
        report.written_files, 1,
        "only the damaged shard is re-encoded: {report:?}"
    );
    assert!(
        report.discarded[0].contains(&shard.display().to_string()),
        "{:?}",
        report.discarded
    );
    assert_eq!(
        std::fs::read(&shard).unwrap(),
        original,
        "re-encoding is deterministic"
    );

    std::fs::write(&shard, &original[..original.len() / 3]).unwrap();
    let (_, report) = build(&files, &fx.data, &fx.cache_settings(), &dir).unwrap();
    assert_eq!(
        report.written_files, 1,
        "a truncated shard is re-encoded: {report:?}"
    );

    // Another model's VAE and text encoder make the whole cache stale.
    let other = fx.root.join("other-model");
    difftune::model::tiny::write_tiny_model(&other, 7, &difftune::data::synthetic::captions())
        .unwrap();
    let other_files = ModelFiles::resolve(&other.display().to_string(), None).unwrap();
    let (_, report) = build(&other_files, &fx.data, &fx.cache_settings(), &dir).unwrap();
    assert!(
        report.discarded[0].contains("stale"),
        "{:?}",
        report.discarded
    );
    assert!(
        report.discarded[0].contains("VAE"),
        "{:?}",
        report.discarded
    );
    assert_eq!(report.reused_files, 0);
    assert_eq!(report.written_files, 5);
}

#[test]
fn tiny_model_loads_through_the_standard_path() {
    let fx = fixture();
    let files = fx.files();
    let tokenizer = difftune::model::pipeline::load_tokenizer(&files).unwrap();
    let ids = tokenizer
        .encode("a photo of tomato soup, a type of food")
        .unwrap();
    assert_eq!(ids.len(), 77);
    // bos, one token per word and the comma, eos: what transformers' CLIPTokenizer gives for
    // the generated vocab.json and merges.txt.
    let expected = [620, 320, 559, 546, 602, 585, 267, 320, 605, 546, 541, 621];
    assert_eq!(ids[..expected.len()], expected, "{ids:?}");
    let encoder = difftune::model::pipeline::load_text_encoder(&files, Device::Cpu).unwrap();
    let hidden = tch::no_grad(|| encoder.forward(&Tensor::from_slice(&ids).view([1, 77])));
    assert_eq!(hidden.size(), [1, 77, 32]);
    let vae = difftune::model::pipeline::load_vae(&files, Device::Cpu).unwrap();
    let posterior =
        tch::no_grad(|| vae.encode(&Tensor::zeros([1, 3, 64, 64], (Kind::Float, Device::Cpu))));
    assert_eq!(posterior.mean.size(), [1, 4, 8, 8]);
    let (_, unet) = difftune::model::pipeline::load_unet(&files, Device::Cpu).unwrap();
    let out = tch::no_grad(|| unet.forward(&posterior.mean, &Tensor::from(10i64), &hidden));
    assert_eq!(out.size(), [1, 4, 8, 8]);
}

#[test]
fn adamw_matches_torch_on_a_first_step_and_clips() {
    let _guard = serial();
    let weight = Tensor::from_slice(&[1.0f32, -2.0, 3.0]).set_requires_grad(true);
    let config = difftune::train::optim::AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    let mut optimizer = AdamW::new(vec![weight.shallow_clone()], config).unwrap();
    (&weight * Tensor::from_slice(&[0.5f32, -4.0, 0.0]))
        .sum(Kind::Float)
        .backward();
    let norm = optimizer.step(0.01, Some(1.0)).unwrap();
    assert!((norm - (0.25f64 + 16.0).sqrt()).abs() < 1e-6);
    // torch.optim.AdamW's first step: decay, then -lr * g / (|g| + eps) whatever the clipping.
    let expected = [1.0 * 0.999 - 0.01, -2.0 * 0.999 + 0.01, 3.0 * 0.999];
    let got = Vec::<f32>::try_from(&weight.detach()).unwrap();
    for (g, e) in got.iter().zip(expected) {
        assert!((f64::from(*g) - e).abs() < 1e-6, "{got:?} vs {expected:?}");
    }
    assert_eq!(optimizer.step_count(), 1);
}

#[test]
fn validation_images_are_written_and_leave_training_unchanged() {
    let _guard = serial();
    let fx = fixture();
    let plain = fx.config("bitfit", 4, 1e-2);
    let mut validated = plain.clone();
    validated.train.validation_every = 2;
    validated.train.validation_images = 2;
    validated.train.validation_steps = 2;
    train(&fx.options(plain, "plain")).unwrap();
    train(&fx.options(validated, "validated")).unwrap();
    for step in ["step-00000002", "step-00000004"] {
        for image in ["00.png", "01.png"] {
            let path = fx.root.join("validated/validation").join(step).join(image);
            assert!(path.is_file(), "{} is missing", path.display());
        }
    }
    assert_eq!(
        checkpoint_bytes(&fx.root.join("plain")),
        checkpoint_bytes(&fx.root.join("validated")),
        "sampling validation images changed what was trained"
    );
}

#[test]
fn tensorboard_log_holds_every_step_once_after_a_resume_and_the_validation_images() {
    use difftune::train::tensorboard::{event_files, read_events, EventKind, ValueKind};
    let _guard = serial();
    let fx = fixture();
    let mut config = fx.config("lora", 5, 1e-3);
    config.train.validation_every = 4;
    config.train.validation_images = 1;
    config.train.validation_steps = 1;
    let mut first = fx.options(config.clone(), "tb");
    first.stop_after = Some(3);
    train(&first).unwrap();
    let mut resumed = fx.options(config, "tb");
    resumed.resume = Resume::Newest;
    train(&resumed).unwrap();

    let out = fx.root.join("tb");
    let metrics = MetricsLog::read(&out.join("metrics.jsonl")).unwrap();
    let files = event_files(&out).unwrap();
    assert_eq!(files.len(), 2, "one event file per start: {files:?}");
    // TensorBoard's reading: a session start at step S drops earlier-written steps above S.
    let mut losses = std::collections::BTreeMap::new();
    let mut images = Vec::new();
    for file in &files {
        for event in read_events(file).unwrap() {
            if let Some(EventKind::SessionLog(_)) = event.kind {
                losses.retain(|&step, _| step < event.step);
            }
            if let Some(EventKind::Summary(summary)) = &event.kind {
                for value in &summary.value {
                    if let Some(ValueKind::Image(image)) = &value.value {
                        images.push((event.step, value.tag.clone(), image.width));
                    }
                }
            }
            for (tag, value) in event.scalar_values() {
                if tag == "train/loss" {
                    losses.insert(event.step, value);
                }
            }
        }
    }
    let expected: std::collections::BTreeMap<i64, f32> = metrics
        .iter()
        .map(|m| (m.step as i64, m.loss as f32))
        .collect();
    assert_eq!(losses, expected);
    let width = 64;
    assert_eq!(
        images,
        vec![
            (4, "validation/00".to_string(), width),
            (5, "validation/00".to_string(), width)
        ]
    );
}

#[test]
fn ema_is_the_average_of_the_steps_resumes_exactly_and_is_the_adapter() {
    use difftune::train::ema::{Ema, EmaSettings};
    let _guard = serial();
    let fx = fixture();
    let mut config = fx.config("bitfit", 4, 1e-2);
    let settings = EmaSettings {
        decay: 0.8,
        ..EmaSettings::default()
    };
    config.train.ema = Some(settings);
    config.train.checkpoint_every = 1;
    config.train.keep_checkpoints = 10;
    train(&fx.options(config.clone(), "ema")).unwrap();
    let mut first = fx.options(config.clone(), "ema-resumed");
    first.stop_after = Some(2);
    train(&first).unwrap();
    let mut resumed = fx.options(config.clone(), "ema-resumed");
    resumed.resume = Resume::Newest;
    train(&resumed).unwrap();
    let adapter = |run: &str| std::fs::read(fx.root.join(run).join("adapter.safetensors")).unwrap();
    assert!(
        adapter("ema") == adapter("ema-resumed"),
        "resume changed the EMA"
    );

    // The average replayed over the checkpoints of every step (the first update copies).
    let step = |k: usize| -> Vec<(String, Tensor)> {
        let dir = fx.root.join(format!("ema/checkpoints/step-{k:08}"));
        difftune::model::weights::read_all(&dir.join("trainable.safetensors"))
            .unwrap()
            .into_iter()
            .collect()
    };
    let mut replay = Ema::new(settings, &step(1));
    for k in 1..=4 {
        replay.update(&step(k));
    }
    let method = MethodSettings::defaults("bitfit").unwrap();
    let expected = fx.root.join("expected.safetensors");
    difftune::peft::file::save_adapter(&expected, method.method(), replay.tensors(), "base")
        .unwrap();
    let read = |p: &Path| difftune::model::weights::read_all(p).unwrap();
    let (got, want) = (
        read(&fx.root.join("ema/adapter.safetensors")),
        read(&expected),
    );
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, t) in &got {
        let err = (t - &want[name]).abs().max().double_value(&[]);
        assert!(
            err <= 1e-6,
            "{name}: EMA differs from the replay by {err:.2e}"
        );
    }
    // ... and not the last weights.
    let last: std::collections::BTreeMap<String, Tensor> = step(4).into_iter().collect();
    assert!(replay.tensors().iter().any(|(n, t)| !t.equal(&last[n])));
}
