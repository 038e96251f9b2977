//! Small shared utilities.
pub mod device;
pub mod fs;
pub mod lock;
pub mod profiler;
pub mod shim;
pub mod stats;
pub mod tensor;
