//! bf16 mixed precision on CUDA, as diffusers' training scripts run it: frozen weights stored in
//! bf16, trainable weights in f32, the forward under autocast.
use std::collections::HashSet;
use tch::{nn, Kind, Tensor};

extern "C" {
    // `void at::autocast::set_autocast_dtype(at::DeviceType, at::ScalarType)`, exported by
    // libtorch_cpu. tch only toggles autocast, whose CUDA dtype defaults to f16; the study trained
    // in bf16. Both enums are `int8_t`-backed and passed by value like C integers.
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn at_autocast_set_autocast_dtype(device_type: i8, dtype: i8);
}

/// c10::DeviceType::CUDA
const DEVICE_TYPE_CUDA: i8 = 1;
/// c10::ScalarType::BFloat16
const SCALAR_TYPE_BFLOAT16: i8 = 15;

/// Runs `f` under CUDA autocast in bf16 (a no-op without CUDA, as `tch::autocast` is).
pub fn bf16_autocast<T>(f: impl FnOnce() -> T) -> T {
    if tch::Cuda::is_available() {
        // SAFETY: a plain setter of a thread-local/global enum value; both arguments are valid
        // enumerators of the declared C++ enums.
        unsafe { at_autocast_set_autocast_dtype(DEVICE_TYPE_CUDA, SCALAR_TYPE_BFLOAT16) };
    }
    tch::autocast(true, f)
}

/// Stores every variable of `vs` that is not trainable in bf16 (in place: the model's handles
/// share the variables' storage), halving the frozen model's memory as diffusers does with
/// `unet.to(weight_dtype)` for everything it does not train.
pub fn freeze_to_bf16(vs: &nn::VarStore, trainable: &[Tensor]) {
    let keep: HashSet<usize> = trainable.iter().map(|t| t.data_ptr() as usize).collect();
    tch::no_grad(|| {
        for (_, mut var) in vs.variables() {
            if !keep.contains(&(var.data_ptr() as usize)) && var.kind() == Kind::Float {
                let bf16 = var.to_kind(Kind::BFloat16);
                var.set_data(&bf16);
            }
        }
    });
}
