//! Torch's CUDA caching allocator, for peak-memory measurements (csrc/cuda_memory.cpp): what
//! `torch.cuda.empty_cache`, `torch.cuda.reset_peak_memory_stats` and
//! `torch.cuda.max_memory_allocated` do in Python. Only for CUDA devices: the CPU path never
//! calls into CUDA code.
use super::shim::check;
use anyhow::{anyhow, Result};
use std::ffi::{c_char, c_int};

extern "C" {
    fn dt_cuda_memory_reset(device: c_int) -> *mut c_char;
    fn dt_cuda_memory_peak_allocated(device: c_int, bytes: *mut u64) -> *mut c_char;
}

/// Returns the allocator's cached, unused blocks to the driver and resets CUDA device `index`'s
/// peak statistics: the next [`peak_allocated`] is the peak from here on.
pub fn reset_peak(index: usize) -> Result<()> {
    // SAFETY: no pointers; errors come back as a message.
    unsafe { check(dt_cuda_memory_reset(index as c_int)) }
        .map_err(|e| anyhow!("resetting the CUDA memory statistics of cuda:{index}: {e}"))
}

/// The most memory allocated to tensors on CUDA device `index` since [`reset_peak`], in bytes.
pub fn peak_allocated(index: usize) -> Result<u64> {
    let mut bytes = 0u64;
    // SAFETY: `bytes` outlives the call, which writes it on success.
    unsafe { check(dt_cuda_memory_peak_allocated(index as c_int, &mut bytes)) }
        .map_err(|e| anyhow!("reading the CUDA memory statistics of cuda:{index}: {e}"))?;
    Ok(bytes)
}
