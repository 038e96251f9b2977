//! Link fixes for binaries and tests built against PyTorch's own libtorch (LIBTORCH_USE_PYTORCH=1),
//! and the C++ shim over PyTorch's c10d (csrc/dist.cpp) that src/dist reaches.
use std::path::{Path, PathBuf};

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
    build_dist_shim(Path::new(&lib_dir));
    build_autograd_shim(Path::new(&lib_dir));
}

/// Compiles csrc/dist.cpp against the wheel's headers: Gloo always, NCCL too when `nccl.h` and
/// the CUDA headers it needs (`crt/host_config.h`, `nv/target`) are found in the wheel's
/// `nvidia/` packages or in DIFFTUNE_NCCL_INCLUDE (colon-separated include folders).
fn build_dist_shim(lib_dir: &Path) {
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=DIFFTUNE_NCCL_INCLUDE");
    let torch_include = lib_dir.with_file_name("include");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .file("csrc/dist.cpp")
        .include("csrc/gloo_stubs")
        .include(&torch_include)
        .include(torch_include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        // torch's headers are not warning-clean; their warnings are not ours to fix.
        .warnings(false);
    let nccl_includes = nccl_include_dirs(lib_dir);
    if let Some(dirs) = &nccl_includes {
        build.includes(dirs).define("USE_C10D_NCCL", None);
        build.define("DIFFTUNE_WITH_NCCL", None);
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    } else {
        println!("cargo:warning=difftune: building distributed support without NCCL (Gloo only): nccl.h or CUDA headers not found");
    }
    build.compile("difftune_dist");
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// The include folders that provide every header the NCCL process group needs, if all are found.
fn nccl_include_dirs(lib_dir: &Path) -> Option<Vec<PathBuf>> {
    let site_packages = lib_dir.parent()?.parent()?;
    let nvidia = site_packages.join("nvidia");
    let mut candidates: Vec<PathBuf> = std::env::var("DIFFTUNE_NCCL_INCLUDE")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    candidates.extend([
        nvidia.join("nccl/include"),
        nvidia.join("cu13/include"),
        nvidia.join("cu13/include/cccl"),
    ]);
    let needed = [
        "nccl.h",
        "cuda_runtime_api.h",
        "crt/host_config.h",
        "nv/target",
    ];
    let mut dirs = Vec::new();
    for header in needed {
        let dir = candidates.iter().find(|d| d.join(header).exists())?;
        if !dirs.contains(dir) {
            dirs.push(dir.clone());
        }
    }
    Some(dirs)
}

/// Compiles csrc/autocast.cpp (bf16 autocast on the CPU and CUDA) and csrc/checkpoint.cpp
/// (activation checkpointing through a custom autograd Function) against the wheel's headers.
fn build_autograd_shim(lib_dir: &Path) {
    let torch_include = lib_dir.with_file_name("include");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("csrc/autocast.cpp")
        .file("csrc/checkpoint.cpp")
        .file("csrc/fused_adamw.cpp")
        .file("csrc/memory_format.cpp")
        .file("csrc/profiler.cpp")
        .include(&torch_include)
        .include(torch_include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("difftune_autograd");
}
