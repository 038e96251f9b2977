//! Link fixes for binaries and tests built against PyTorch's own libtorch (LIBTORCH_USE_PYTORCH=1).
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    // The binary finds torch's shared libraries without LD_LIBRARY_PATH. RUNPATH (the linker's
    // default) still lets LD_LIBRARY_PATH point at another machine's torch, as on the GPU host.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    if Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
        // Nothing references libtorch_cuda.so directly (its kernels register themselves at load
        // time), so `--as-needed` would drop it and CUDA would silently be unavailable.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
