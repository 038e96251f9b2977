//! bf16 mixed precision on the CPU, through the code CUDA runs: torch's autocast entered by the
//! shim, frozen weights stored in bf16, trained tensors and the loss in f32. Every registered
//! method trains, resumes exactly, validates and stays within a stated bound of f32.
#[path = "common/tiny_run.rs"]
mod tiny_run;
#[path = "common/tiny_step.rs"]
mod tiny_step;

use difftune::peft::{MethodSettings, METHODS};
use difftune::train::config::{Precision, RunConfig};
use difftune::train::metrics::MetricsLog;
use difftune::train::optim::{AdamW, AdamWConfig};
use difftune::train::precision::{autocast_kind, bf16_autocast};
use difftune::train::trainer::{latest_trainable, METRICS_FILE};
use difftune::train::{train, Resume, TrainOptions};
use std::collections::HashSet;
use tch::{Device, Kind, Tensor};
use tiny_run::{serial, TinyRun};
use tiny_step::{trainable, TinyStep};

/// Relative L2 distance the bf16 U-Net output may keep from the f32 one. bf16 keeps 8 significant
/// bits (a relative rounding error up to 2^-9 ≈ 2e-3 per value); over the tiny U-Net's dozens of
/// rounded matmuls and convolutions the measured distance is 1.3e-2 to 1.5e-2 for every method.
const BF16_OUTPUT_BOUND: f64 = 3e-2;

/// Optimizer steps on the fixed batch of the loss test.
const FIXED_BATCH_STEPS: usize = 40;

/// Fails if the shim's autocast setters stop resolving against the linked torch, or stop working.
#[test]
fn the_autocast_setters_resolve_and_cast_cpu_matmuls_to_bf16() {
    let _guard = serial();
    let a = Tensor::randn([4, 4], (Kind::Float, Device::Cpu));
    assert_eq!(autocast_kind(Device::Cpu), None);
    let (kind, inside) = bf16_autocast(Device::Cpu, || {
        (autocast_kind(Device::Cpu), a.matmul(&a).kind())
    });
    assert_eq!(kind, Some(Kind::BFloat16));
    assert_eq!(inside, Kind::BFloat16);
    // Left as it was found, also when nested.
    bf16_autocast(Device::Cpu, || bf16_autocast(Device::Cpu, || ()));
    assert_eq!(autocast_kind(Device::Cpu), None);
    assert_eq!(a.matmul(&a).kind(), Kind::Float);
}

#[test]
fn every_method_s_bf16_output_is_within_the_bound_of_f32() {
    let _guard = serial();
    let mut worst: f64 = 0.0;
    for method in METHODS.iter().map(|m| m.name) {
        let timesteps = Tensor::from_slice(&[10i64, 500]);
        let f32_step = TinyStep::new(method, false);
        let reference = tch::no_grad(|| {
            let i = &f32_step.inputs;
            f32_step.unet.forward(&i.latents, &timesteps, &i.context)
        });
        let step = TinyStep::new(method, true);
        let output = tch::no_grad(|| {
            bf16_autocast(Device::Cpu, || {
                let i = &step.inputs;
                step.unet.forward(&i.latents, &timesteps, &i.context)
            })
        });
        assert_eq!(output.kind(), Kind::BFloat16, "{method}");
        let distance =
            difftune::util::tensor::relative_l2(&output.to_kind(Kind::Float), &reference);
        println!("{method}: relative L2 distance of bf16 from f32 {distance:.2e}");
        assert!(distance > 0.0, "{method}: the output is not bf16-rounded");
        worst = worst.max(distance);
    }
    assert!(
        worst < BF16_OUTPUT_BOUND,
        "bf16 output is up to {worst:.3e} from f32"
    );
}

/// A bf16 step updates only the trained f32 tensors: every frozen weight is still bf16 and
/// bit-identical afterwards, and none was given a gradient.
#[test]
fn a_bf16_step_keeps_every_method_s_frozen_weights_in_bf16() {
    let _guard = serial();
    for method in METHODS.iter().map(|m| m.name) {
        let step = TinyStep::new(method, true);
        let trained: HashSet<usize> = step
            .tuned
            .trained
            .iter()
            .map(|(_, t)| t.data_ptr() as usize)
            .collect();
        let frozen: Vec<(String, Tensor)> = step
            .vs
            .variables()
            .into_iter()
            .filter(|(_, t)| !trained.contains(&(t.data_ptr() as usize)))
            .map(|(n, t)| (n, t.copy()))
            .collect();
        // Full fine-tuning trains every weight: nothing is frozen, everything stays f32.
        let mut optimizer = AdamW::new(trainable(&step.tuned), AdamWConfig::default()).unwrap();
        let (loss, _) = step.loss_and_grads();
        assert_eq!(loss.kind(), Kind::Float, "{method}: the loss is not f32");
        optimizer.step(1e-2, Some(1.0)).unwrap();
        let now = step.vs.variables();
        for (name, before) in &frozen {
            let t = &now[name];
            assert_eq!(t.kind(), Kind::BFloat16, "{method}: `{name}` left bf16");
            assert!(t.equal(before), "{method}: frozen `{name}` changed");
            assert!(
                !t.grad().defined(),
                "{method}: frozen `{name}` got a gradient"
            );
        }
        for (name, t) in &step.tuned.trained {
            assert_eq!(
                t.kind(),
                Kind::Float,
                "{method}: trained `{name}` is not f32"
            );
        }
    }
}

/// The tiny model and a 2-class dataset of 8 training images per class at 64 px.
fn fixture() -> TinyRun {
    TinyRun::new(2, 8)
}

/// A bf16 run of `method` for `steps` steps into `out`.
fn bf16_options(fx: &TinyRun, method: &str, steps: usize, out: &str) -> TrainOptions {
    let lr = RunConfig::for_method(method).unwrap().train.learning_rate;
    let mut config = fx.config(method, steps, lr);
    config.train.precision = Precision::Bf16;
    if method == "lora" {
        // The default placement barely moves a random tiny model (see tests/train.rs).
        let targets = ["*.to_q", "*.to_k", "*.to_v", "*.to_out.0"];
        let settings =
            toml::Table::from_iter([("targets".into(), toml::Value::from(targets.to_vec()))]);
        config.method = MethodSettings::new(method, settings).unwrap();
    }
    fx.options(config, out)
}

fn losses(fx: &TinyRun, out: &str) -> Vec<f64> {
    MetricsLog::read(&fx.root.join(out).join(METRICS_FILE))
        .unwrap()
        .iter()
        .map(|m| m.loss)
        .collect()
}

/// bf16 training lowers every method's loss: AdamW steps on one fixed batch (fixed latents, noise
/// and timesteps: the loss is deterministic, so any fall is training) through the step the trainer
/// runs in bf16. The trainer's own bf16 loop is exercised by the resume and validation tests.
#[test]
fn bf16_training_lowers_every_method_s_loss_on_a_fixed_batch() {
    let _guard = serial();
    for method in METHODS.iter().map(|m| m.name) {
        let step = TinyStep::new(method, true);
        let mut optimizer = AdamW::new(trainable(&step.tuned), AdamWConfig::default()).unwrap();
        let lr = if method == "full" { 1e-3 } else { 2e-2 };
        let mut losses = vec![];
        for _ in 0..=FIXED_BATCH_STEPS {
            let (loss, _) = step.loss_and_grads();
            let loss = loss.double_value(&[]);
            assert!(loss.is_finite(), "{method}: loss {loss}");
            losses.push(loss);
            optimizer.step(lr, Some(1.0)).unwrap();
        }
        let (first, last) = (losses[0], losses[FIXED_BATCH_STEPS]);
        println!("{method} (bf16): loss {first:.4} -> {last:.4}");
        assert!(last < 0.9 * first, "{method}: loss went {losses:?}");
    }
}

#[test]
fn a_resumed_bf16_run_is_bit_identical_to_an_uninterrupted_one() {
    let _guard = serial();
    let fx = fixture();
    let whole = bf16_options(&fx, "bitfit", 6, "whole");
    assert!(train(&whole).unwrap().finished);
    let mut first = bf16_options(&fx, "bitfit", 6, "parts");
    first.stop_after = Some(3);
    assert!(!train(&first).unwrap().finished);
    let mut rest = bf16_options(&fx, "bitfit", 6, "parts");
    rest.resume = Resume::Newest;
    assert!(train(&rest).unwrap().finished);
    let bytes = |out: &str| -> Vec<(String, Vec<u8>)> {
        latest_trainable(&fx.root.join(out))
            .unwrap()
            .into_iter()
            .map(|(name, t)| {
                assert_eq!(t.kind(), Kind::Float, "`{name}` is saved in {:?}", t.kind());
                let mut b = vec![0u8; t.numel() * 4];
                t.contiguous().copy_data_u8(&mut b, t.numel());
                (name, b)
            })
            .collect()
    };
    assert!(
        bytes("whole") == bytes("parts"),
        "the resumed bf16 run differs"
    );
    assert_eq!(losses(&fx, "whole"), losses(&fx, "parts"));
}

#[test]
fn bf16_validation_samples_finite_images() {
    let _guard = serial();
    let fx = fixture();
    let mut opts = bf16_options(&fx, "lora", 2, "validated");
    opts.config.train.validation_every = 2;
    opts.config.train.validation_images = 2;
    opts.config.train.validation_steps = 2;
    assert!(train(&opts).unwrap().finished);
    for image in ["00.png", "01.png"] {
        let path = fx
            .root
            .join("validated/validation/step-00000002")
            .join(image);
        let decoded = image::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .to_rgb8();
        assert_eq!(decoded.dimensions(), (64, 64));
        // A NaN latent decodes to one flat colour.
        let first = decoded.get_pixel(0, 0);
        assert!(decoded.pixels().any(|p| p != first), "{image} is flat");
    }
}
