//! Small shared utilities.
pub mod fs;
pub mod stats;
pub mod tensor;
