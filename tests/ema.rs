//! EMA of the trained tensors against diffusers' EMAModel (tools/make_ema_fixtures.py).
use difftune::model::weights::read_all;
use difftune::train::ema::{Ema, EmaSettings};
use std::collections::BTreeMap;
use tch::Tensor;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/ema/trajectory.safetensors"
);
const STEPS: usize = 12;

fn cases() -> [(&'static str, EmaSettings); 2] {
    [
        (
            "plain",
            EmaSettings {
                decay: 0.99,
                update_after_step: 2,
                ..EmaSettings::default()
            },
        ),
        (
            "warmup",
            EmaSettings {
                decay: 0.999,
                warmup: true,
                ..EmaSettings::default()
            },
        ),
    ]
}

fn at(fixture: &BTreeMap<String, Tensor>, prefix: &str, k: usize) -> Vec<(String, Tensor)> {
    ["a", "b"]
        .iter()
        .map(|n| (n.to_string(), fixture[&format!("{prefix}.{n}.{k}")].copy()))
        .collect()
}

#[test]
fn decay_schedule_and_averages_equal_diffusers_ema_model() {
    let fixture = read_all(std::path::Path::new(FIXTURE)).unwrap();
    for (case, settings) in cases() {
        settings.validate().unwrap();
        let decays = Vec::<f64>::try_from(&fixture[&format!("{case}.decay")]).unwrap();
        for (k, expected) in decays.iter().enumerate() {
            let got = settings.decay_at(k + 1);
            assert!(
                (got - expected).abs() <= 1e-15,
                "{case} step {}: {got} vs {expected}",
                k + 1
            );
        }
        let mut ema = Ema::new(settings, &at(&fixture, "param", 0));
        for k in 1..=STEPS {
            ema.update(&at(&fixture, "param", k));
            for ((name, got), (_, expected)) in
                ema.tensors()
                    .iter()
                    .zip(at(&fixture, &format!("{case}.shadow"), k))
            {
                let err = (got - &expected).abs().max().double_value(&[]);
                assert!(err <= 1e-7, "{case} step {k} {name}: max error {err:.2e}");
            }
        }
        assert_eq!(ema.updates(), STEPS);
    }
}

#[test]
fn restore_continues_the_average_and_checks_shapes() {
    let fixture = read_all(std::path::Path::new(FIXTURE)).unwrap();
    let (_, settings) = cases()[0];
    let mut straight = Ema::new(settings, &at(&fixture, "param", 0));
    for k in 1..=STEPS {
        straight.update(&at(&fixture, "param", k));
    }
    let mut first = Ema::new(settings, &at(&fixture, "param", 0));
    for k in 1..=5 {
        first.update(&at(&fixture, "param", k));
    }
    let saved: BTreeMap<String, Tensor> = first
        .tensors()
        .iter()
        .map(|(n, t)| (n.clone(), t.copy()))
        .collect();
    let mut resumed = Ema::new(settings, &at(&fixture, "param", 5));
    resumed.restore(&saved, first.updates()).unwrap();
    for k in 6..=STEPS {
        resumed.update(&at(&fixture, "param", k));
    }
    for ((_, a), (_, b)) in straight.tensors().iter().zip(resumed.tensors()) {
        assert!(a.equal(b));
    }

    let mut wrong: BTreeMap<String, Tensor> =
        saved.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    wrong.insert(
        "b".into(),
        Tensor::zeros([4], (tch::Kind::Float, tch::Device::Cpu)),
    );
    let err = resumed.restore(&wrong, 5).unwrap_err().to_string();
    assert!(err.contains("shape"), "{err}");
    wrong.remove("b");
    let err = resumed.restore(&wrong, 5).unwrap_err().to_string();
    assert!(err.contains("no EMA copy of b"), "{err}");
    let bad = EmaSettings {
        min_decay: 0.5,
        decay: 0.4,
        ..EmaSettings::default()
    };
    assert!(bad.validate().is_err());
}
