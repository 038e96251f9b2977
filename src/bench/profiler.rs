//! torch's own profiler around part of a benchmark (csrc/profiler.cpp): every op the step runs,
//! written as the Chrome trace torch.profiler writes for the Python peer, so that
//! `bench/profile_summary.py` summarises both tools alike.
use anyhow::{bail, Result};
use std::ffi::{c_char, CStr, CString};
use std::path::Path;

extern "C" {
    fn dt_profiler_start(error: *mut c_char, len: usize) -> i32;
    fn dt_profiler_stop(path: *const c_char, error: *mut c_char, len: usize) -> i32;
}

/// The message the shim left in `error` when `status` is non-zero.
fn check(status: i32, error: &[c_char], what: &str) -> Result<()> {
    if status != 0 {
        // SAFETY: on failure the shim wrote a NUL-terminated message into `error`.
        let message = unsafe { CStr::from_ptr(error.as_ptr()) };
        bail!("{what}: {}", message.to_string_lossy());
    }
    Ok(())
}

/// Runs `f` under torch's profiler (CPU ops of this thread) and writes the trace to `trace`.
pub fn profile<T>(trace: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let path = CString::new(trace.to_string_lossy().as_bytes())?;
    let mut error = [0 as c_char; 512];
    // SAFETY: `error` holds `len` bytes.
    let status = unsafe { dt_profiler_start(error.as_mut_ptr(), error.len()) };
    check(status, &error, "starting torch's profiler")?;
    let result = f();
    // SAFETY: `path` is NUL-terminated; `error` holds `len` bytes.
    let status = unsafe { dt_profiler_stop(path.as_ptr(), error.as_mut_ptr(), error.len()) };
    check(
        status,
        &error,
        &format!("writing the profile {}", trace.display()),
    )?;
    result
}
