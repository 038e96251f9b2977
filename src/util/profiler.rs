//! torch's own profiler around part of a run (csrc/profiler.cpp): every op the code runs, with
//! its input shapes, written as the Chrome trace torch.profiler writes for the Python peer, so
//! that `bench/profile_summary.py` summarises both tools alike and
//! [`crate::train::flops`] counts a training step's FLOPs from it.
use crate::util::shim;
use anyhow::{anyhow, Result};
use std::ffi::{c_char, CString};
use std::path::Path;
use std::sync::Mutex;

extern "C" {
    fn dt_profiler_start() -> *mut c_char;
    fn dt_profiler_stop(path: *const c_char) -> *mut c_char;
}

/// torch has one profiler per process: a second thread starting it while it runs fails (or stops
/// the first's), so profiled sections take turns.
static PROFILER: Mutex<()> = Mutex::new(());

/// Runs `f` under torch's profiler (CPU ops of this thread) and writes the trace to `trace`.
/// Profiled sections in other threads wait for this one.
pub fn profile<T>(trace: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let path = CString::new(trace.to_string_lossy().as_bytes())?;
    // The lock guards no data: one poisoned by a panicking section is as good.
    let _turn = PROFILER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // SAFETY: the shim's return value goes straight to `check`.
    unsafe { shim::check(dt_profiler_start()) }
        .map_err(|e| anyhow!("starting torch's profiler: {e}"))?;
    let result = f();
    // SAFETY: `path` is NUL-terminated and outlives the call.
    unsafe { shim::check(dt_profiler_stop(path.as_ptr())) }
        .map_err(|e| anyhow!("writing the profile {}: {e}", trace.display()))?;
    result
}
