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

/// The pip packages that provide the CUDA headers the torch wheel lacks, in the versions of its
/// CUDA 13.0 (scripts/env.sh installs them).
const CUDA_HEADER_PACKAGES: &str = "nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85";

/// Compiles csrc/dist.cpp (Gloo, and NCCL with a CUDA torch) and csrc/cuda_memory.cpp (the CUDA
/// caching allocator's statistics) against the wheel's headers.
///
/// A CUDA torch (libtorch_cuda.so beside libtorch_cpu.so, as PyPI's Linux wheel) must find the
/// CUDA headers, or the build fails: a binary built without them would run on a GPU machine yet
/// never train on several GPUs, found out only there. A CPU-only torch builds Gloo alone and no
/// CUDA code, with a warning.
fn build_dist_shim(lib_dir: &Path) {
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=DIFFTUNE_NCCL_INCLUDE");
    let torch_include = lib_dir.with_file_name("include");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .file("csrc/dist.cpp")
        .file("csrc/cuda_memory.cpp")
        .include("csrc/gloo_stubs")
        .include(&torch_include)
        .include(torch_include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        // torch's headers are not warning-clean; their warnings are not ours to fix.
        .warnings(false);
    if lib_dir.join("libtorch_cuda.so").exists() {
        let dirs = cuda_include_dirs(lib_dir).unwrap_or_else(|missing| {
            panic!(
                "difftune: building against a CUDA torch ({}) needs `{missing}` for NCCL \
                 (multi-GPU) support, and it was not found in the wheel's nvidia/ packages nor in \
                 DIFFTUNE_NCCL_INCLUDE. `source scripts/env.sh` installs the missing headers into \
                 its venv; for another venv: pip install {CUDA_HEADER_PACKAGES}",
                lib_dir.display()
            )
        });
        build
            .includes(&dirs)
            .define("USE_C10D_NCCL", None)
            .define("DIFFTUNE_WITH_NCCL", None)
            .define("DIFFTUNE_WITH_CUDA", None);
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    } else {
        println!(
            "cargo:warning=difftune: {} is a CPU-only torch: building distributed support with \
             Gloo only (no NCCL, no CUDA)",
            lib_dir.display()
        );
    }
    build.compile("difftune_dist");
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// The include folders that provide every header the NCCL process group and the CUDA allocator
/// need, or the first header not found. Each found header is watched, so that the build script
/// runs again when one changes.
fn cuda_include_dirs(lib_dir: &Path) -> Result<Vec<PathBuf>, &'static str> {
    let nvidia = lib_dir
        .parent()
        .and_then(Path::parent)
        .map(|site_packages| site_packages.join("nvidia"))
        .unwrap_or_default();
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
        let dir = candidates
            .iter()
            .find(|d| d.join(header).exists())
            .ok_or(header)?;
        println!("cargo:rerun-if-changed={}", dir.join(header).display());
        if !dirs.contains(dir) {
            dirs.push(dir.clone());
        }
    }
    Ok(dirs)
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
