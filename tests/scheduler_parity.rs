//! Parity of difftune's schedulers with diffusers 0.42.1, against the fixtures written by
//! tools/make_scheduler_fixtures.py: every step of a 10-20 step sampling loop per scheduler and
//! config, timestep/sigma tables for many step counts and spacings, alphas_cumprod, and the
//! training-side add_noise / velocity / SNR.
use difftune::model::weights::read_all;
use difftune::schedulers::{
    self, DpmSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
    NoiseSchedule, Scheduler, SchedulerConfig,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{Kind, Tensor};

/// Max abs error allowed on each step's output (samples are O(1), up to ~30 for the Euler ones).
/// On the machine that wrote the fixtures every step matches bit for bit; the margin is for
/// libtorch's ISA-dependent rounding (see [`close`]).
const STEP_TOLERANCE: f64 = 1e-5;

struct Fixtures {
    index: Value,
    tensors: BTreeMap<String, Tensor>,
}

impl Fixtures {
    fn load() -> Self {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers");
        let index = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
            .unwrap();
        let tensors = read_all(&dir.join("schedulers.safetensors")).unwrap();
        Self { index, tensors }
    }

    fn tensor(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture tensor `{key}` missing"))
    }

    fn values(&self, key: &str) -> Vec<f64> {
        Vec::<f64>::try_from(&self.tensor(key).to_kind(Kind::Double)).unwrap()
    }

    /// SD v1.4's scheduler config with `overrides` applied.
    fn config(&self, overrides: &Value) -> SchedulerConfig {
        let mut config = self.index["base_config"].clone();
        for (key, value) in overrides.as_object().unwrap() {
            config[key] = value.clone();
        }
        SchedulerConfig::from_json(&config.to_string()).unwrap()
    }
}

/// Equal up to libtorch's rounding on another CPU (the fixtures match bit for bit on the one that
/// wrote them, but libtorch's vectorised sqrt/log/exp are not correctly rounded and differ by ISA).
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * b.abs()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// The stand-in U-Net of make_scheduler_fixtures.py.
fn model(pattern: &Tensor, x: &Tensor, t: f64) -> Tensor {
    x * (0.95 * (t / 1000.0).sqrt()) + pattern * (0.3 * (t / 300.0).cos())
}

#[test]
fn sampling_matches_diffusers_at_every_step() {
    let fx = Fixtures::load();
    let pattern = fx.tensor("model_pattern");
    let mut report = Vec::new();
    for case in fx.index["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let kind = case["scheduler"].as_str().unwrap();
        let mut scheduler = schedulers::from_name(kind, &fx.config(&case["config"])).unwrap();
        scheduler
            .set_timesteps(case["steps"].as_u64().unwrap() as usize)
            .unwrap();
        assert_eq!(
            scheduler.timesteps(),
            fx.values(&format!("{name}.timesteps")),
            "{name}: timesteps"
        );
        let init_sigma = fx.values(&format!("{name}.init_noise_sigma"))[0];
        assert!(
            close(scheduler.init_noise_sigma(), init_sigma),
            "{name}: init_noise_sigma {}",
            scheduler.init_noise_sigma()
        );

        let mut x = fx.tensor("initial_noise") * scheduler.init_noise_sigma();
        if let Some(seed) = case["seed"].as_i64() {
            tch::manual_seed(seed);
        }
        let timesteps = scheduler.timesteps().to_vec();
        let mut worst = 0.0f64;
        for (i, &t) in timesteps.iter().enumerate() {
            let input = scheduler.scale_model_input(&x, i).unwrap();
            if kind.starts_with("euler") {
                let err = max_abs_diff(&input, fx.tensor(&format!("{name}.model_input.{i}")));
                assert!(
                    err <= STEP_TOLERANCE,
                    "{name} step {i}: model input differs by {err:e}"
                );
            }
            x = scheduler.step(&model(pattern, &input, t), i, &x).unwrap();
            let err = max_abs_diff(&x, fx.tensor(&format!("{name}.prev_sample.{i}")));
            assert!(
                err <= STEP_TOLERANCE,
                "{name} step {i} (t = {t}): sample differs by {err:e}"
            );
            worst = worst.max(err);
        }
        report.push(format!(
            "{name}: {} steps, max abs error {worst:.2e}",
            timesteps.len()
        ));
    }
    println!("{}", report.join("\n"));
}

#[test]
fn timestep_and_sigma_tables_match_diffusers() {
    let fx = Fixtures::load();
    for table in fx.index["tables"].as_array().unwrap() {
        let key = table["key"].as_str().unwrap();
        let kind = table["scheduler"].as_str().unwrap();
        let config = fx.config(&table["config"]);
        let steps = table["steps"].as_u64().unwrap() as usize;
        let expected_timesteps = fx.values(&format!("{key}.timesteps"));
        let sigmas: Option<Vec<f32>> = match kind {
            "euler" => {
                let mut s = EulerDiscreteScheduler::new(&config).unwrap();
                s.set_timesteps(steps).unwrap();
                assert_eq!(s.timesteps(), expected_timesteps, "{key}");
                Some(s.sigmas().to_vec())
            }
            "euler_ancestral" => {
                let mut s = EulerAncestralDiscreteScheduler::new(&config).unwrap();
                s.set_timesteps(steps).unwrap();
                assert_eq!(s.timesteps(), expected_timesteps, "{key}");
                Some(s.sigmas().to_vec())
            }
            "dpmsolver++" => {
                let mut s = DpmSolverMultistepScheduler::new(&config).unwrap();
                s.set_timesteps(steps).unwrap();
                assert_eq!(s.timesteps(), expected_timesteps, "{key}");
                Some(s.sigmas().to_vec())
            }
            _ => {
                let mut s = schedulers::from_name(kind, &config).unwrap();
                s.set_timesteps(steps).unwrap();
                assert_eq!(s.timesteps(), expected_timesteps, "{key}");
                None
            }
        };
        if let Some(sigmas) = sigmas {
            let expected = fx.values(&format!("{key}.sigmas"));
            assert_eq!(sigmas.len(), expected.len(), "{key}: sigmas");
            for (i, (&s, &e)) in sigmas.iter().zip(&expected).enumerate() {
                assert!(
                    close(s as f64, e),
                    "{key}: sigma {i} is {s}, diffusers has {e}"
                );
            }
        }
    }
}

#[test]
fn alphas_cumprod_match_diffusers() {
    let fx = Fixtures::load();
    for (label, overrides) in fx.index["schedules"].as_object().unwrap() {
        let schedule = NoiseSchedule::from_config(&fx.config(overrides)).unwrap();
        let err = max_abs_diff(
            schedule.alphas_cumprod(),
            fx.tensor(&format!("alphas_cumprod.{label}")),
        );
        assert!(err <= 1e-7, "alphas_cumprod ({label}) differs by {err:e}");
    }
}

#[test]
fn training_noise_matches_diffusers() {
    let fx = Fixtures::load();
    let schedule =
        NoiseSchedule::from_config(&fx.config(&Value::Object(Default::default()))).unwrap();
    let (x0, noise, t) = (
        fx.tensor("training.x0"),
        fx.tensor("training.noise"),
        fx.tensor("training.timesteps"),
    );
    let noisy = schedule.add_noise(x0, noise, t).unwrap();
    let velocity = schedule.velocity(x0, noise, t).unwrap();
    let snr = schedule.snr(t).unwrap();
    let errors = [
        (
            "add_noise",
            max_abs_diff(&noisy, fx.tensor("training.noisy")),
        ),
        (
            "velocity",
            max_abs_diff(&velocity, fx.tensor("training.velocity")),
        ),
        // relative: the SNR spans 1e-3..1e3
        (
            "snr",
            max_abs_diff(&(&snr / fx.tensor("training.snr")), &snr.ones_like()),
        ),
    ];
    println!("{errors:?}");
    for (what, err) in errors {
        assert!(err <= 1e-6, "{what} differs by {err:e}");
    }
}

#[test]
fn stable_diffusion_config_file_reads_as_the_builtin_one() {
    let fx = Fixtures::load();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scheduler_config.json");
    std::fs::write(&path, fx.index["base_config"].to_string()).unwrap();
    assert_eq!(
        SchedulerConfig::load(&path).unwrap(),
        SchedulerConfig::stable_diffusion_v1()
    );

    std::fs::write(&path, r#"{"beta_schedule": "sigmoid"}"#).unwrap();
    let err = format!("{:#}", SchedulerConfig::load(&path).unwrap_err());
    assert!(
        err.contains("scheduler_config.json") && err.contains("sigmoid"),
        "{err}"
    );
}

#[test]
fn bad_input_is_an_error() {
    let sd = SchedulerConfig::stable_diffusion_v1();
    let err = |r: anyhow::Result<()>| format!("{:#}", r.unwrap_err());
    assert!(err(schedulers::from_name("lms", &sd).map(|_| ())).contains("unknown scheduler `lms`"));
    let prk = SchedulerConfig {
        skip_prk_steps: None,
        ..sd.clone()
    };
    assert!(err(schedulers::from_name("pndm", &prk).map(|_| ())).contains("skip_prk_steps"));
    let karras = SchedulerConfig {
        use_karras_sigmas: Some(true),
        ..sd.clone()
    };
    assert!(err(schedulers::from_name("euler", &karras).map(|_| ())).contains("use_karras_sigmas"));
    // DDIM ignores Euler-only options, as diffusers does.
    assert!(schedulers::from_name("ddim", &karras).is_ok());
    let short = SchedulerConfig {
        trained_betas: Some(vec![0.1; 3]),
        ..sd.clone()
    };
    assert!(
        err(NoiseSchedule::from_config(&short).map(|_| ())).contains("trained_betas has 3 values")
    );

    let mut ddim = schedulers::from_name("ddim", &sd).unwrap();
    let x = Tensor::zeros([1, 4, 2, 2], (Kind::Float, tch::Device::Cpu));
    assert!(err(ddim.step(&x, 0, &x).map(|_| ())).contains("call set_timesteps first"));
    assert!(err(ddim.set_timesteps(0)).contains("num_inference_steps"));
    assert!(err(ddim.set_timesteps(1001)).contains("num_inference_steps"));
    ddim.set_timesteps(5).unwrap();
    assert!(err(ddim.step(&x, 5, &x).map(|_| ())).contains("step index 5"));

    let schedule = NoiseSchedule::from_config(&sd).unwrap();
    let float_t = Tensor::from_slice(&[1.0f32]);
    assert!(err(schedule.add_noise(&x, &x, &float_t).map(|_| ())).contains("int64"));
    let two_t = Tensor::from_slice(&[1i64, 2]);
    assert!(err(schedule.add_noise(&x, &x, &two_t).map(|_| ())).contains("2 timesteps"));
    let past_end = Tensor::from_slice(&[1000i64]);
    assert!(schedule.add_noise(&x, &x, &past_end).is_err());
}
