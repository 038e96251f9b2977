//! Small shared utilities.
pub mod cuda_memory;
pub mod device;
pub mod fs;
pub mod lock;
pub mod profiler;
pub mod progress;
pub mod shim;
pub mod stats;
pub mod tensor;
