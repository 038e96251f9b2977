//! Small shared utilities.
pub mod fs;
pub mod tensor;
