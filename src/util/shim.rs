//! How the C++ shims in `csrc/` report failure (csrc/shim_error.h): an entry point returns NULL
//! on success or a malloc'd message that [`check`] turns into an error and frees.
use std::ffi::{c_char, CStr};

extern "C" {
    fn dt_free_message(message: *mut c_char);
}

/// Turns a shim's return value into a `Result`, freeing the message.
///
/// # Safety
/// `message` must be NULL or a message returned by a `dt_*` entry point, not yet freed.
pub unsafe fn check(message: *mut c_char) -> Result<(), String> {
    if message.is_null() {
        return Ok(());
    }
    let text = CStr::from_ptr(message).to_string_lossy().into_owned();
    dt_free_message(message);
    Err(text)
}
