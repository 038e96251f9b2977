//! The C entry points of csrc/dist.cpp and a safe call wrapper for their error convention
//! (NULL on success, else a malloc'd message that [`check`] copies and frees).
use std::ffi::{c_char, c_int, c_void};
use torch_sys::C_tensor;

extern "C" {
    pub fn dt_has_nccl() -> c_int;
    #[allow(clippy::too_many_arguments)]
    pub fn dt_group_new(
        backend: c_int,
        host: *const c_char,
        port: u16,
        listen_fd: c_int,
        rank: c_int,
        world: c_int,
        prefix: *const c_char,
        timeout_ms: i64,
        gloo_device_kind: c_int,
        gloo_device_name: *const c_char,
        device_index: c_int,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    pub fn dt_group_sub(
        parent: *mut c_void,
        prefix: *const c_char,
        rank: c_int,
        world: c_int,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    pub fn dt_allreduce_sum(group: *mut c_void, tensor: *mut C_tensor) -> *mut c_char;
    pub fn dt_broadcast(group: *mut c_void, tensor: *mut C_tensor, root: c_int) -> *mut c_char;
    pub fn dt_allgather(
        group: *mut c_void,
        input: *mut C_tensor,
        outputs: *mut *mut C_tensor,
        n: c_int,
    ) -> *mut c_char;
    pub fn dt_barrier(group: *mut c_void) -> *mut c_char;
    pub fn dt_store_set(
        group: *mut c_void,
        key: *const c_char,
        value: *const c_char,
    ) -> *mut c_char;
    pub fn dt_store_check(
        group: *mut c_void,
        key: *const c_char,
        present: *mut c_int,
    ) -> *mut c_char;
    pub fn dt_shutdown(group: *mut c_void) -> *mut c_char;
    pub fn dt_group_free(group: *mut c_void);
}

pub use crate::util::shim::check;
