//! `train.channels_last` on the tiny model: the same training as the standard layout up to float
//! rounding (full fine-tuning and LoRA, the latter through `difftune train --channels-last`), a
//! bit-exact resume, checkpoints that do not depend on the layout, and files written in the
//! standard order whatever the layout in memory.
#[path = "common/tiny_run.rs"]
mod tiny_run;

use difftune::dist::ProcessGroup;
use difftune::model::memory_format::is_channels_last;
use difftune::model::weights::read_all;
use difftune::peft::MethodSettings;
use difftune::train::config::RunConfig;
use difftune::train::metrics::MetricsLog;
use difftune::train::trainer::{latest_trainable, Trainer, METRICS_FILE};
use difftune::train::{train, Resume, TrainOptions};
use std::collections::BTreeMap;
use tch::{Kind, Tensor};
use tiny_run::{serial, TinyRun};

/// Relative difference of the losses of two runs in the standard layout and in channels-last, over
/// a few steps in f32: what torch's NCHW and NHWC convolution kernels change by summing in another
/// order (measured 1.3e-6).
const LOSS_TOLERANCE: f64 = 1e-5;
/// ... and of their trained weights (`‖a - b‖ / ‖b‖`): AdamW turns the rounding noise of the
/// gradients that are nearly zero (the biases that a GroupNorm follows) into steps of full size,
/// so a few values differ by up to the learning rate (measured 4.7e-5 for full fine-tuning,
/// 3.8e-5 for LoRA, 5.5e-5 resumed in the other layout; gradients gathered in the wrong order
/// give 3.6e-2, moments restored in the wrong order 1.4e-2).
const WEIGHT_TOLERANCE: f64 = 1e-3;

/// The tiny model and 2 classes of 4 images: enough for a few steps at batch 4.
fn fixture() -> TinyRun {
    TinyRun::new(2, 4)
}

fn losses(fx: &TinyRun, run: &str) -> Vec<f64> {
    let log = MetricsLog::read(&fx.root.join(run).join(METRICS_FILE)).unwrap();
    log.iter().map(|m| m.loss).collect()
}

/// The difference of two sets of tensors, relative: `‖a - b‖ / ‖b‖` over all their values.
fn relative_difference(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let squares = |t: Tensor| {
        t.to_kind(Kind::Double)
            .square()
            .sum(Kind::Double)
            .double_value(&[])
    };
    let (difference, norm) = a.iter().fold((0.0, 0.0), |(d, n), (name, t)| {
        (
            d + squares(t - &b[name]),
            n + squares(b[name].shallow_clone()),
        )
    });
    (difference / norm).sqrt()
}

/// The largest relative difference of two runs' losses and final trainable tensors.
fn runs_differ_by(fx: &TinyRun, a: &str, b: &str) -> (f64, f64) {
    let (la, lb) = (losses(fx, a), losses(fx, b));
    assert_eq!(la.len(), lb.len());
    let loss = la
        .iter()
        .zip(&lb)
        .map(|(x, y)| (x - y).abs() / y.abs())
        .fold(0.0, f64::max);
    let weights = relative_difference(
        &latest_trainable(&fx.root.join(a)).unwrap(),
        &latest_trainable(&fx.root.join(b)).unwrap(),
    );
    (loss, weights)
}

fn channels_last(mut config: RunConfig) -> RunConfig {
    config.train.channels_last = true;
    config
}

#[test]
fn channels_last_trains_as_the_standard_layout() {
    let _guard = serial();
    let fx = fixture();
    let config = fx.config("full", 3, 1e-3);
    train(&fx.options(config.clone(), "full-nchw")).unwrap();
    train(&fx.options(channels_last(config), "full-nhwc")).unwrap();
    let (loss, weights) = runs_differ_by(&fx, "full-nchw", "full-nhwc");
    println!("full: channels-last differs by {loss:.1e} (losses), {weights:.1e} (weights)");
    assert!(loss <= LOSS_TOLERANCE && weights <= WEIGHT_TOLERANCE);

    // LoRA on every convolution and attention projection, the channels-last run by the CLI.
    let mut config = fx.config("lora", 3, 1e-2);
    let targets = ["*.to_q", "*.to_k", "*.to_v", "*.to_out.0", "*conv*"];
    let settings =
        toml::Table::from_iter([("targets".to_string(), toml::Value::from(targets.to_vec()))]);
    config.method = MethodSettings::new("lora", settings).unwrap();
    train(&fx.options(config.clone(), "lora-nchw")).unwrap();
    let file = fx.root.join("lora.toml");
    std::fs::write(&file, config.to_toml().unwrap()).unwrap();
    let out = fx.cli(&file, "lora-nhwc").arg("--channels-last").output();
    let out = out.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recorded = RunConfig::load(&fx.root.join("lora-nhwc/run.toml")).unwrap();
    assert!(
        recorded.train.channels_last,
        "--channels-last did not set train.channels_last"
    );
    let (loss, weights) = runs_differ_by(&fx, "lora-nchw", "lora-nhwc");
    println!("lora: channels-last differs by {loss:.1e} (losses), {weights:.1e} (weights)");
    assert!(loss <= LOSS_TOLERANCE && weights <= WEIGHT_TOLERANCE);
}

/// Raw bytes of the trainable tensors of a run's newest checkpoint.
fn checkpoint_bytes(fx: &TinyRun, run: &str) -> Vec<(String, Vec<u8>)> {
    latest_trainable(&fx.root.join(run))
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
            t.copy_data_u8(&mut bytes, t.numel());
            (name, bytes)
        })
        .collect()
}

/// Runs `config` for `first` steps into `run`, then resumes it to the end with `resumed`.
fn in_two_parts(fx: &TinyRun, run: &str, config: RunConfig, first: usize, resumed: RunConfig) {
    let mut opts: TrainOptions = fx.options(config, run);
    opts.stop_after = Some(first);
    assert!(!train(&opts).unwrap().finished);
    let mut rest = fx.options(resumed, run);
    rest.resume = Resume::Newest;
    assert!(train(&rest).unwrap().finished);
}

#[test]
fn channels_last_resumes_exactly_and_its_checkpoints_resume_without_it() {
    let _guard = serial();
    let fx = fixture();
    // Full fine-tuning: the optimizer's moments of channels-last weights are in its checkpoint.
    let config = fx.config("full", 4, 1e-3);
    let nhwc = channels_last(config.clone());
    train(&fx.options(nhwc.clone(), "nhwc")).unwrap();
    in_two_parts(&fx, "nhwc-parts", nhwc.clone(), 2, nhwc.clone());
    assert!(
        checkpoint_bytes(&fx, "nhwc") == checkpoint_bytes(&fx, "nhwc-parts"),
        "a channels-last run resumed is not bit-identical to the uninterrupted one"
    );
    assert_eq!(losses(&fx, "nhwc"), losses(&fx, "nhwc-parts"));

    // Written channels-last, continued in the standard layout: the same run up to rounding.
    train(&fx.options(config.clone(), "nchw")).unwrap();
    in_two_parts(&fx, "switched", nhwc, 2, config);
    let (loss, weights) = runs_differ_by(&fx, "nchw", "switched");
    println!(
        "resumed without channels-last: differs by {loss:.1e} (losses), {weights:.1e} (weights)"
    );
    assert!(loss <= LOSS_TOLERANCE && weights <= WEIGHT_TOLERANCE);
}

/// Every file a channels-last run writes holds the weights in the standard order: the checkpoint,
/// its EMA copies and the adapter (here the full fine-tuned weights) equal the channels-last
/// tensors in memory read back in NCHW.
#[test]
fn channels_last_runs_write_standard_files() {
    let _guard = serial();
    let fx = fixture();
    let mut config = channels_last(fx.config("full", 2, 1e-3));
    // A decay of 0: the average is the last weights (up to rounding).
    config.train.ema = Some(difftune::train::ema::EmaSettings {
        decay: 0.0,
        ..Default::default()
    });
    let opts = fx.options(config, "run");
    let group = ProcessGroup::single();
    let files = opts.check().unwrap();
    let mut trainer = Trainer::setup(&opts, &files, &group).unwrap();
    trainer.restore().unwrap();
    for _ in 0..2 {
        trainer.step().unwrap();
    }
    let checkpoint = trainer.save().unwrap().unwrap();
    let in_memory: BTreeMap<String, Tensor> = trainer
        .trained()
        .iter()
        .map(|(n, t)| (n.clone(), t.detach().copy()))
        .collect();
    // The test means something only if weights are laid out in another order in memory.
    let relaid = in_memory
        .values()
        .filter(|t| is_channels_last(t) && !t.is_contiguous())
        .count();
    assert!(relaid > 0, "no trained weight is channels-last");

    let saved = read_all(&checkpoint.join("trainable.safetensors")).unwrap();
    for (name, t) in &in_memory {
        assert!(
            saved[name].equal(t),
            "checkpoint: `{name}` differs from memory"
        );
    }
    let ema: BTreeMap<String, Tensor> = read_all(&checkpoint.join("optimizer.safetensors"))
        .unwrap()
        .into_iter()
        .filter_map(|(n, t)| n.strip_prefix("ema.").map(|n| (n.to_string(), t)))
        .collect();
    assert!(
        relative_difference(&ema, &in_memory) <= 1e-6,
        "checkpoint: EMA"
    );
    let adapter = trainer.finish().unwrap().adapter.unwrap();
    assert!(relative_difference(&read_all(&adapter).unwrap(), &in_memory) <= 1e-6);
}
