//! torch's fused AdamW kernel, as `AdamW::use_fused` runs it, against the chunked update: the same
//! parameters and moments after several clipped steps with weight decay, up to float rounding; and
//! channels-last weights in the flat buffer.
use difftune::train::optim::{AdamW, AdamWConfig};
use tch::{Device, Kind, Tensor};

/// Two parameters (one without a gradient at odd steps) trained from copies of `initial` for 5
/// steps; returns them and the optimizer's state.
fn train(initial: &[Tensor], fused: bool) -> Vec<Tensor> {
    let params: Vec<Tensor> = initial
        .iter()
        .map(|t| t.copy().set_requires_grad(true))
        .collect();
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
    // Drawn once: torch's generator is global, and the other test draws from it concurrently.
    tch::manual_seed(3);
    let initial = [
        Tensor::randn([3, 5], (Kind::Float, Device::Cpu)),
        Tensor::randn([7], (Kind::Float, Device::Cpu)),
    ];
    let (chunked, fused) = (train(&initial, false), train(&initial, true));
    for (a, b) in chunked.iter().zip(&fused) {
        let diff = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff <= 1e-6, "fused and chunked AdamW differ by {diff}");
    }
    // Not trivially equal: the steps moved the parameters.
    assert!(!chunked[0].allclose(&initial[0], 1e-3, 1e-3, false));
}

/// A channels-last weight stays channels-last in the optimizer: a view of its flat buffer (an
/// update through the buffer moves it), its gradient a channels-last view of the data-parallel
/// gradient buffer that later steps do not copy again; the moments it checkpoints are in the
/// standard order, whatever the layout of the optimizer that loads them.
#[test]
fn channels_last_weights_stay_channels_last_views_of_the_flat_buffer() {
    use difftune::model::memory_format::{channels_last, is_channels_last};
    let relaid = |t: &Tensor| is_channels_last(t) && !t.is_contiguous();
    tch::manual_seed(5);
    let randn = |size: &[i64]| Tensor::randn(size, (Kind::Float, Device::Cpu));
    let weight = channels_last(&randn(&[4, 3, 3, 3])).set_requires_grad(true);
    let bias = randn(&[4]).set_requires_grad(true);
    let before = weight.detach().copy();
    let params = vec![bias.shallow_clone(), weight.shallow_clone()];
    let mut optimizer = AdamW::new(params, AdamWConfig::default()).unwrap();
    assert!(relaid(&weight) && weight.equal(&before));
    let _ = tch::no_grad(|| optimizer.flat_params_mut().g_add_scalar_(1.0));
    assert!(
        weight.equal(&(&before + 1.0)),
        "the weight is not a view of the flat buffer"
    );

    let input = channels_last(&randn(&[2, 3, 5, 5]));
    let step = |optimizer: &mut AdamW| {
        optimizer.zero_grad();
        let output = input.conv2d(&weight, Some(&bias), [1, 1], [1, 1], [1, 1], 1);
        output.square().sum(Kind::Float).backward();
        optimizer.flat_grads(&Tensor::zeros([1], (Kind::Float, Device::Cpu)))
    };
    let buffer = step(&mut optimizer);
    let grad = weight.grad().copy();
    assert!(relaid(&weight.grad()));
    let _ = tch::no_grad(|| buffer.shallow_clone().g_mul_scalar_(2.0));
    assert!(
        weight.grad().equal(&(&grad * 2.0)),
        "the gradient is not a view of the gradient buffer"
    );
    let pointer = weight.grad().data_ptr();
    let _ = step(&mut optimizer);
    assert_eq!(
        weight.grad().data_ptr(),
        pointer,
        "a later step moved the gradient"
    );
    assert!(relaid(&weight.grad()));

    // The first update's moment is (1 - beta1) g, checkpointed in the standard order.
    optimizer.step(1e-2, None).unwrap();
    let standard = |t: &Tensor| t.contiguous().reshape([-1]);
    let expected = Tensor::cat(&[standard(&bias.grad()), standard(&weight.grad())], 0) * 0.1;
    let state: std::collections::BTreeMap<String, Tensor> = optimizer.state().into_iter().collect();
    let exp_avg = &state["optimizer.exp_avg"];
    assert!(
        exp_avg.allclose(&expected, 1e-6, 1e-7, false),
        "exp_avg is not in the standard order"
    );
    for layout in [channels_last as fn(&Tensor) -> Tensor, Tensor::contiguous] {
        let params = vec![bias.detach().copy(), layout(&weight.detach())];
        let mut reloaded = AdamW::new(params, AdamWConfig::default()).unwrap();
        reloaded.load_state(&state).unwrap();
        for (name, t) in reloaded.state() {
            assert!(
                t.equal(&state[&name]),
                "{name} changed through a load and a save"
            );
        }
    }
}
