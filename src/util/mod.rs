//! Small shared utilities.
pub mod fs;
