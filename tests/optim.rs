//! torch's fused AdamW kernel, as `AdamW::use_fused` runs it, against the chunked update: the same
//! parameters and moments after several clipped steps with weight decay, up to float rounding.
use difftune::train::optim::{AdamW, AdamWConfig};
use tch::{Device, Kind, Tensor};

/// Two parameters (one without a gradient at odd steps) trained for 5 steps; returns them.
fn train(fused: bool) -> Vec<Tensor> {
    tch::manual_seed(3);
    let params = [
        Tensor::randn([3, 5], (Kind::Float, Device::Cpu)).set_requires_grad(true),
        Tensor::randn([7], (Kind::Float, Device::Cpu)).set_requires_grad(true),
    ];
    let mut optimizer = AdamW::new(
        params.iter().map(|p| p.shallow_clone()).collect(),
        AdamWConfig::default(),
    )
    .unwrap();
    if fused {
        optimizer.use_fused().unwrap();
    }
    for step in 0..5 {
        optimizer.zero_grad();
        let loss = params[0].square().sum(Kind::Float) * (step + 1) as f64;
        let loss = match step % 2 {
            0 => loss + params[1].sin().sum(Kind::Float),
            _ => loss,
        };
        loss.backward();
        optimizer.step(1e-2, Some(1.0)).unwrap();
    }
    let mut state: Vec<Tensor> = params.iter().map(|p| p.detach().copy()).collect();
    state.extend(optimizer.state().into_iter().map(|(_, t)| t.copy()));
    state
}

#[test]
fn fused_adamw_equals_the_chunked_update() {
    let (chunked, fused) = (train(false), train(true));
    for (a, b) in chunked.iter().zip(&fused) {
        let diff = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff <= 1e-6, "fused and chunked AdamW differ by {diff}");
    }
    // Not trivially equal: the steps moved the parameters.
    assert!(!chunked[0].allclose(&train_start(), 1e-3, 1e-3, false));
}

fn train_start() -> Tensor {
    tch::manual_seed(3);
    Tensor::randn([3, 5], (Kind::Float, Device::Cpu))
}
