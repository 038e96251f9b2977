//! Channels-last (NHWC) layout for the U-Net's convolutions (csrc/memory_format.cpp; tch has no
//! memory-format API): the same values with strides ordered so that torch's convolutions pick
//! their NHWC kernels and keep their outputs in that layout. Training (`train.channels_last`) and
//! `bench --channels-last` re-lay out every 4-D variable and the input latents with it; files are
//! always written in the standard (NCHW) order ([`crate::model::weights::save_tensors`]).
use tch::{nn, Tensor};

extern "C" {
    fn dt_channels_last(t: *const torch_sys::C_tensor) -> *mut torch_sys::C_tensor;
    fn dt_is_channels_last(t: *const torch_sys::C_tensor) -> i32;
}

/// A channels-last copy of the 4-D tensor `t` (`t` itself, shared, when it already is).
pub fn channels_last(t: &Tensor) -> Tensor {
    // SAFETY: `t` is a live tensor; the shim returns a new one that the result owns.
    unsafe { Tensor::from_ptr(dt_channels_last(t.as_ptr())) }
}

pub fn is_channels_last(t: &Tensor) -> bool {
    // SAFETY: `t` is a live tensor.
    unsafe { dt_is_channels_last(t.as_ptr()) != 0 }
}

/// Re-lays out every 4-D variable of `vs` (the convolution weights) channels-last, in place: the
/// model's handles share the variables, so they see the new layout.
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
