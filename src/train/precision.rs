//! bf16 mixed precision, as diffusers' training scripts run it: frozen weights stored in bf16,
//! trainable weights in f32, the forward under autocast in bf16, the loss in f32. One code path on
//! the CPU and on CUDA; only the autocast device type differs.
use std::collections::HashSet;
use tch::{nn, Device, Kind, Tensor};

#[repr(C)]
struct AutocastState {
    enabled: bool,
    dtype: i8,
}

// csrc/autocast.cpp: torch's C++ autocast setters, compiled against the pinned torch's headers.
extern "C" {
    fn dt_autocast_enter(cuda: i32, saved: *mut AutocastState);
    fn dt_autocast_exit(cuda: i32, saved: *const AutocastState);
    fn dt_autocast_dtype(cuda: i32) -> i32;
}

/// Restores the autocast state it saved when dropped, also when the forward panics.
struct AutocastGuard {
    cuda: i32,
    saved: AutocastState,
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // SAFETY: `saved` was filled by the matching `dt_autocast_enter`.
        unsafe { dt_autocast_exit(self.cuda, &self.saved) };
    }
}

/// Runs `f` under autocast in bf16 for `device`'s type (CPU or CUDA), this thread only.
pub fn bf16_autocast<T>(device: Device, f: impl FnOnce() -> T) -> T {
    let cuda = i32::from(device.is_cuda());
    let mut guard = AutocastGuard {
        cuda,
        saved: AutocastState {
            enabled: false,
            dtype: 0,
        },
    };
    // SAFETY: `saved` is a valid out-pointer; the setters only change thread-local state.
    unsafe { dt_autocast_enter(cuda, &mut guard.saved) };
    let result = f();
    drop(guard);
    result
}

/// The dtype autocast casts to on `device`'s type, or `None` when autocast is off there.
pub fn autocast_kind(device: Device) -> Option<Kind> {
    // SAFETY: a plain getter of thread-local state.
    let code = unsafe { dt_autocast_dtype(i32::from(device.is_cuda())) };
    // c10::ScalarType values of the kinds autocast can use.
    match code {
        5 => Some(Kind::Half),
        6 => Some(Kind::Float),
        15 => Some(Kind::BFloat16),
        _ => None,
    }
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
