//! Channels-last (NHWC) layout for the U-Net's convolutions (csrc/memory_format.cpp; tch has no
//! memory-format API): every 4-D weight of the model and the input latents are re-laid out, and
//! torch's convolutions keep their outputs in that layout.
use tch::{nn, Tensor};

extern "C" {
    fn dt_channels_last(t: *const torch_sys::C_tensor) -> *mut torch_sys::C_tensor;
    fn dt_is_channels_last(t: *const torch_sys::C_tensor) -> i32;
}

/// A channels-last copy of the 4-D tensor `t`.
pub fn channels_last(t: &Tensor) -> Tensor {
    // SAFETY: `t` is a live tensor; the shim returns a new one that the result owns.
    unsafe { Tensor::from_ptr(dt_channels_last(t.as_ptr())) }
}

pub fn is_channels_last(t: &Tensor) -> bool {
    // SAFETY: `t` is a live tensor.
    unsafe { dt_is_channels_last(t.as_ptr()) != 0 }
}

/// Re-lays out every 4-D variable of `vs` (the convolution weights) channels-last, in place.
pub fn to_channels_last(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (_, mut t) in vs.variables() {
            if t.dim() == 4 {
                let relaid = channels_last(&t);
                t.set_data(&relaid);
            }
        }
    });
}
