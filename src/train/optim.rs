//! AdamW over one flat buffer: every trainable tensor is re-pointed at a slice of a single
//! contiguous f32 master tensor, so the update and state checkpointing are a handful of kernels
//! per chunk of the buffer regardless of how many tensors a method trains (the effect of torch's
//! fused/foreach AdamW, which tch does not expose), with temporaries bounded by the chunk size.
//! Each tensor keeps its memory layout as a view (channels-last convolution weights stay
//! channels-last: their slice holds the values in NHWC order), while the optimizer state it
//! hands to checkpoints is in the standard order, so a checkpoint does not depend on the layout.
use crate::model::weights::NamedTensors;
use crate::util::shim;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::ffi::c_char;
use tch::{Kind, Tensor};

// csrc/fused_adamw.cpp: torch's fused AdamW kernel (`at::_fused_adamw_`) on one slice.
extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn dt_fused_adamw(
        param: *mut torch_sys::C_tensor,
        grad: *mut torch_sys::C_tensor,
        exp_avg: *mut torch_sys::C_tensor,
        exp_avg_sq: *mut torch_sys::C_tensor,
        step: *mut torch_sys::C_tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> *mut c_char;
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch.optim.AdamW's defaults except weight decay, which diffusers' training scripts set to 1e-2 too.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// Elements per chunk of the update: bounds the temporaries of a step to two chunks, so full
/// fine-tuning of an 860M-parameter U-Net needs no full-size copies of its gradients.
const CHUNK: i64 = 1 << 24;

pub struct AdamW {
    pub config: AdamWConfig,
    params: Vec<Tensor>,
    /// Where and how each parameter lies in the flat buffers.
    slots: Vec<Slot>,
    flat: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: i64,
    /// The gradients of a data-parallel run, flat, with room for the values that ride along:
    /// allocated by the first [`AdamW::flat_grads`], then every parameter's gradient is a view
    /// of it.
    grad_buffer: Option<Tensor>,
    /// Update with torch's fused AdamW kernel instead of the chunked one ([`AdamW::use_fused`]).
    fused: bool,
}

/// A parameter's place in the flat buffers: its offset and its layout (sizes and strides, as the
/// parameter had them), so that its slice, viewed with that layout, is the parameter.
struct Slot {
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
    /// The dimensions from the outermost in memory to the innermost (`[0, 2, 3, 1]` for NHWC).
    order: Vec<i64>,
}

impl Slot {
    /// The slot of `p` at `offset`: its own layout when it is dense (every element once, no gaps,
    /// as a contiguous or channels-last tensor is), else the standard contiguous one.
    fn new(p: &Tensor, offset: i64) -> Self {
        let size = p.size();
        let mut stride = p.stride();
        let mut order: Vec<i64> = (0..size.len() as i64).collect();
        // Outermost first; a stable sort keeps the standard order among equal strides.
        order.sort_by_key(|&d| std::cmp::Reverse(stride[d as usize]));
        let mut expected = 1;
        let mut dense = true;
        for &d in order.iter().rev() {
            let d = d as usize;
            if size[d] != 1 {
                dense &= stride[d] == expected;
                expected *= size[d];
            }
        }
        if !dense {
            stride = contiguous_strides(&size);
            order = (0..size.len() as i64).collect();
        }
        Self {
            offset,
            size,
            stride,
            order,
        }
    }

    fn numel(&self) -> i64 {
        self.size.iter().product()
    }

    /// This slot's slice of the flat buffer `flat`, viewed with the parameter's layout.
    fn view(&self, flat: &Tensor) -> Tensor {
        flat.narrow(0, self.offset, self.numel()).as_strided(
            self.size.as_slice(),
            self.stride.as_slice(),
            None,
        )
    }

    /// The values of `t` (the parameter's shape) flat, in the order the slot stores them: a view
    /// when `t` has the parameter's layout.
    fn storage_order(&self, t: &Tensor) -> Tensor {
        t.permute(self.order.as_slice()).reshape([-1])
    }

    /// Whether the slot stores its values in the standard (row-major) order.
    fn is_standard(&self) -> bool {
        self.order.iter().enumerate().all(|(i, &d)| i as i64 == d)
    }
}

fn contiguous_strides(size: &[i64]) -> Vec<i64> {
    let mut strides = vec![1; size.len()];
    for d in (0..size.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * size[d + 1].max(1);
    }
    strides
}

/// The moments and parameters of one chunk of the flat buffers, updated in place.
struct Slices {
    param: Tensor,
    grad: Tensor,
    m: Tensor,
    v: Tensor,
}

impl AdamW {
    /// Takes ownership of the trainable tensors' storage: after this call each tensor (and every
    /// shallow clone of it held by the model) is a view into the optimizer's flat f32 buffer,
    /// with the memory layout it had (a channels-last weight stays channels-last).
    pub fn new(params: Vec<Tensor>, config: AdamWConfig) -> Result<Self> {
        if params.is_empty() {
            bail!("nothing to optimise: the tuning method made no parameter trainable");
        }
        let device = params[0].device();
        let total: i64 = params.iter().map(|p| p.numel() as i64).sum();
        let flat = Tensor::zeros([total], (Kind::Float, device));
        let mut slots = Vec::with_capacity(params.len());
        let mut offset = 0;
        tch::no_grad(|| {
            for p in &params {
                let slot = Slot::new(p, offset);
                let mut p = p.shallow_clone();
                let mut view = slot.view(&flat);
                view.copy_(&p.detach());
                p.set_data(&view);
                offset += slot.numel();
                slots.push(slot);
            }
        });
        let exp_avg = flat.zeros_like();
        let exp_avg_sq = flat.zeros_like();
        Ok(Self {
            config,
            params,
            slots,
            flat,
            exp_avg,
            exp_avg_sq,
            step: 0,
            grad_buffer: None,
            fused: false,
        })
    }

    /// Updates with torch's fused AdamW kernel (`_fused_adamw_`, as `torch.optim.AdamW(fused=True)`)
    /// instead of the chunked update below; the same update up to float rounding. An opt-in for
    /// CUDA until it measures faster there; errors if the kernel does not run on this device.
    pub fn use_fused(&mut self) -> Result<()> {
        let probe = |t: &Tensor| t.narrow(0, 0, 1).zeros_like();
        let (mut p, mut g) = (probe(&self.flat), probe(&self.flat));
        let (mut m, mut v) = (probe(&self.flat), probe(&self.flat));
        let mut step = Tensor::ones([], (Kind::Float, self.flat.device()));
        fused_adamw(&mut p, &mut g, &mut m, &mut v, &mut step, 0.0, &self.config)
            .context("torch's fused AdamW kernel does not run here")?;
        self.fused = true;
        Ok(())
    }

    pub fn numel(&self) -> i64 {
        self.flat.numel() as i64
    }

    pub fn step_count(&self) -> i64 {
        self.step
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// The trainable values as one flat buffer (every parameter is a view of it): for a
    /// data-parallel group to broadcast in place.
    pub fn flat_params_mut(&mut self) -> &mut Tensor {
        &mut self.flat
    }

    /// All gradients as one flat f32 buffer with the values of the 1-D tensor `extra` appended:
    /// what a data-parallel step all-reduces in one call, in place. The buffer is allocated once
    /// per run and every parameter's gradient is made a view of it (a parameter without a
    /// gradient gets zeros first), so autograd accumulates into it and no step allocates or
    /// copies gradients; what is written into the returned buffer is the gradients.
    pub fn flat_grads(&mut self, extra: &Tensor) -> Tensor {
        for p in &self.params {
            if !p.grad().defined() {
                // Define it as zeros, so that every rank hands back the same set of gradients.
                (p.sum(Kind::Float) * 0.0).backward();
            }
        }
        let total = self.numel();
        let extra_len = extra.numel() as i64;
        let device = self.flat.device();
        let buffer = self
            .grad_buffer
            .get_or_insert_with(|| Tensor::zeros([total + extra_len], (Kind::Float, device)))
            .shallow_clone();
        assert_eq!(
            buffer.numel() as i64,
            total + extra_len,
            "the values riding along the gradients change size"
        );
        tch::no_grad(|| {
            for (p, slot) in self.params.iter().zip(&self.slots) {
                let mut grad = p.grad();
                let mut view = slot.view(&buffer);
                // Once per run (or again should autograd ever replace a gradient tensor): move
                // the gradient into the buffer, in the parameter's layout, and point the
                // parameter's gradient at it.
                if grad.data_ptr() != view.data_ptr() || grad.stride() != view.stride() {
                    view.copy_(&grad);
                    grad.set_data(&view);
                }
            }
            buffer
                .narrow(0, total, extra_len)
                .copy_(&extra.to_kind(Kind::Float).to_device(device));
        });
        buffer
    }

    /// The global L2 norm of all gradients (parameters without one count as zero), as a 0-d f32
    /// tensor on the parameters' device (reading it is left to the caller: one transfer).
    pub fn grad_norm(&self) -> Tensor {
        let squares: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| p.grad())
            .filter(|g| g.defined())
            .map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float))
            .collect();
        if squares.is_empty() {
            return Tensor::zeros([], (Kind::Float, self.flat.device()));
        }
        Tensor::stack(&squares, 0).sum(Kind::Float).sqrt()
    }

    /// Copies the gradients of the parameters in flat range `start..start + len` into `buffer`
    /// (zeros where a parameter got none), in the order the flat buffer stores each parameter,
    /// scaled by `scale`.
    fn gather_grads(&self, buffer: &mut Tensor, start: i64, len: i64, scale: f64) {
        let _ = buffer.zero_();
        for (p, slot) in self.params.iter().zip(&self.slots) {
            let offset = slot.offset;
            let (lo, hi) = (offset.max(start), (offset + slot.numel()).min(start + len));
            if lo >= hi {
                continue;
            }
            let g = p.grad();
            if g.defined() {
                let src = slot
                    .storage_order(&g.detach())
                    .narrow(0, lo - offset, hi - lo);
                buffer.narrow(0, lo - start, hi - lo).copy_(&src);
            }
        }
        if scale != 1.0 {
            *buffer *= scale;
        }
    }

    /// One AdamW update at learning rate `lr`; clips the global gradient norm to `max_grad_norm`
    /// when given (as torch's `clip_grad_norm_`). Returns the gradient norm before clipping. A
    /// non-finite norm is an error and the parameters are left untouched.
    pub fn step(&mut self, lr: f64, max_grad_norm: Option<f64>) -> Result<f64> {
        let norm = tch::no_grad(|| self.grad_norm()).double_value(&[]);
        if !norm.is_finite() {
            bail!("gradient norm is {norm}: refusing to update (lower the learning rate or check the data)");
        }
        self.apply(lr, norm, max_grad_norm);
        Ok(norm)
    }

    /// The AdamW update of [`AdamW::step`] given the gradients' (finite) global norm `norm`.
    pub fn apply(&mut self, lr: f64, norm: f64, max_grad_norm: Option<f64>) {
        tch::no_grad(|| {
            let scale = match max_grad_norm {
                Some(max) if norm > max => max / (norm + 1e-6),
                _ => 1.0,
            };
            let c = self.config.clone();
            self.step += 1;
            let bias1 = 1.0 - c.beta1.powi(self.step as i32);
            let bias2 = 1.0 - c.beta2.powi(self.step as i32);
            let total = self.numel();
            let buffer = Tensor::zeros([CHUNK.min(total)], (Kind::Float, self.flat.device()));
            let mut start = 0;
            while start < total {
                let len = CHUNK.min(total - start);
                let mut grad = buffer.narrow(0, 0, len);
                self.gather_grads(&mut grad, start, len, scale);
                let slices = Slices {
                    param: self.flat.narrow(0, start, len),
                    grad,
                    m: self.exp_avg.narrow(0, start, len),
                    v: self.exp_avg_sq.narrow(0, start, len),
                };
                match self.fused {
                    true => {
                        let step = self.step as f64;
                        update_fused(slices, lr, step, &c).expect("probed by use_fused");
                    }
                    false => update_chunk(slices, lr, (bias1, bias2), &c),
                }
                start += len;
            }
        })
    }

    /// The optimizer state for checkpoints: moments and step count. The moments are flat with
    /// each parameter's values in the standard (row-major) order, whatever its layout here.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        vec![
            (
                "optimizer.exp_avg".into(),
                self.standard_order(&self.exp_avg),
            ),
            (
                "optimizer.exp_avg_sq".into(),
                self.standard_order(&self.exp_avg_sq),
            ),
            ("optimizer.step".into(), Tensor::from(self.step)),
        ]
    }

    /// The flat buffer `flat` with each parameter's values in the standard order (`flat` itself
    /// when every parameter is stored so).
    fn standard_order(&self, flat: &Tensor) -> Tensor {
        if self.slots.iter().all(Slot::is_standard) {
            return flat.shallow_clone();
        }
        let parts: Vec<Tensor> = self
            .slots
            .iter()
            .map(|slot| slot.view(flat).contiguous().reshape([-1]))
            .collect();
        Tensor::cat(&parts, 0)
    }

    /// Copies `standard` (a flat buffer in the standard order of [`AdamW::state`]) into the flat
    /// buffer `flat`, each parameter's values in the layout it has here.
    fn copy_from_standard(&self, flat: &mut Tensor, standard: &Tensor) {
        for slot in &self.slots {
            let values = standard.narrow(0, slot.offset, slot.numel());
            slot.view(flat).copy_(&values.view(slot.size.as_slice()));
        }
    }

    /// Takes the state [`AdamW::state`] saved, reading one moment buffer at a time.
    pub fn load_state(&mut self, state: &impl NamedTensors) -> Result<()> {
        let get = |k: &str| {
            state
                .read(k)?
                .ok_or_else(|| anyhow::anyhow!("checkpoint has no `{k}`"))
        };
        let buffers = [
            ("optimizer.exp_avg", self.exp_avg.shallow_clone()),
            ("optimizer.exp_avg_sq", self.exp_avg_sq.shallow_clone()),
        ];
        // Both checked before either is written.
        let shapes = state.shapes();
        for (name, flat) in &buffers {
            let saved = shapes
                .get(*name)
                .with_context(|| format!("checkpoint has no `{name}`"))?;
            if *saved != flat.size() {
                bail!(
                    "checkpoint optimizer state has {saved:?} elements, this run trains {}: different method or settings",
                    self.numel()
                );
            }
        }
        let standard = self.slots.iter().all(Slot::is_standard);
        for (name, mut flat) in buffers {
            if standard {
                state.read_into(name, &mut flat)?;
            } else {
                let saved = get(name)?.to_device(flat.device());
                tch::no_grad(|| self.copy_from_standard(&mut flat, &saved));
            }
        }
        self.step = get("optimizer.step")?.int64_value(&[]);
        Ok(())
    }
}

/// The chunked AdamW update of one slice, with the step's bias corrections `(bias1, bias2)`.
fn update_chunk(s: Slices, lr: f64, (bias1, bias2): (f64, f64), c: &AdamWConfig) {
    let Slices {
        mut param,
        mut grad,
        mut m,
        mut v,
    } = s;
    if c.weight_decay != 0.0 {
        param *= 1.0 - lr * c.weight_decay;
    }
    let _ = m.lerp_(&grad, 1.0 - c.beta1);
    // v = beta2 v + (1 - beta2) g², with g pre-scaled so no temporary is needed.
    grad *= (1.0 - c.beta2).sqrt();
    v *= c.beta2;
    let _ = v.addcmul_(&grad, &grad);
    if lr > 0.0 {
        // p -= lr / bias1 * m / (sqrt(v / bias2) + eps), the denominator built in `grad`.
        grad.copy_(&v);
        let _ = grad.sqrt_();
        grad *= 1.0 / bias2.sqrt();
        grad += c.eps;
        grad *= -bias1 / lr;
        let _ = param.addcdiv_(&m, &grad);
    }
}

/// The same update of one slice by torch's fused kernel, at (1-based) step `step`.
fn update_fused(s: Slices, lr: f64, step: f64, c: &AdamWConfig) -> Result<()> {
    let Slices {
        mut param,
        mut grad,
        mut m,
        mut v,
    } = s;
    let mut step = Tensor::from(step as f32).to_device(param.device());
    fused_adamw(&mut param, &mut grad, &mut m, &mut v, &mut step, lr, c)
}

fn fused_adamw(
    param: &mut Tensor,
    grad: &mut Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    step: &mut Tensor,
    lr: f64,
    c: &AdamWConfig,
) -> Result<()> {
    // SAFETY: every pointer is a live tensor for the call; the result goes straight to `check`.
    unsafe {
        shim::check(dt_fused_adamw(
            param.as_mut_ptr(),
            grad.as_mut_ptr(),
            m.as_mut_ptr(),
            v.as_mut_ptr(),
            step.as_mut_ptr(),
            lr,
            c.beta1,
            c.beta2,
            c.weight_decay,
            c.eps,
        ))
    }
    .map_err(|e| anyhow::anyhow!("_fused_adamw_: {e}"))?;
    Ok(())
}

/// Learning-rate schedules, as diffusers' `get_scheduler` names and computes them.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    #[default]
    Constant,
    ConstantWithWarmup,
    Cosine,
}

impl LrSchedule {
    /// Whether the schedule reads `lr_warmup_steps` (the constant schedule ignores it).
    pub fn warms_up(self) -> bool {
        self != LrSchedule::Constant
    }

    /// The learning rate for optimizer step `step` (0-based) of `total`. Warm-up rises linearly
    /// from 0 at step 0, as in diffusers (its `LambdaLR` gives the first update `lr * 0 / warmup`).
    pub fn lr(self, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
        let warming = step < warmup;
        let warm = step as f64 / warmup.max(1) as f64;
        match self {
            LrSchedule::Constant => base,
            LrSchedule::ConstantWithWarmup if warming => base * warm,
            LrSchedule::ConstantWithWarmup => base,
            LrSchedule::Cosine if warming => base * warm,
            LrSchedule::Cosine => {
                let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
                base * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_diffusers() {
        let s = LrSchedule::ConstantWithWarmup;
        assert_eq!(
            [
                s.lr(1.0, 0, 4, 10),
                s.lr(1.0, 2, 4, 10),
                s.lr(1.0, 4, 4, 10)
            ],
            [0.0, 0.5, 1.0]
        );
        let c = LrSchedule::Cosine;
        assert_eq!(c.lr(2.0, 1, 2, 10), 1.0);
        assert!((c.lr(2.0, 6, 2, 10) - 1.0).abs() < 1e-12);
        assert!(c.lr(2.0, 10, 2, 10).abs() < 1e-12);
        assert_eq!(LrSchedule::Constant.lr(3.0, 7, 5, 10), 3.0);
    }
}
