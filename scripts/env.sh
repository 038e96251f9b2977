# Sourced by the other scripts: creates (or reuses) the PyTorch venv that libtorch comes from and
# exports what cargo needs to build tch against it. The venv lives outside the clone so that CI
# and fresh clones on the same machine reuse it.
DIFFTUNE_CACHE="${DIFFTUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/difftune}"
DIFFTUNE_VENV="$DIFFTUNE_CACHE/venv-torch-2.11.0"
if ! "$DIFFTUNE_VENV/bin/python" -c 'import torch, sys; sys.exit(not torch.__version__.startswith("2.11.0"))' 2>/dev/null; then
  echo "difftune: creating the torch venv in $DIFFTUNE_VENV (one-off, a few minutes)" >&2
  mkdir -p "$DIFFTUNE_CACHE"
  python3 -m venv "$DIFFTUNE_VENV"
  "$DIFFTUNE_VENV/bin/pip" install --quiet --upgrade pip
  "$DIFFTUNE_VENV/bin/pip" install --quiet torch==2.11.0 numpy
fi
# NCCL (multi-GPU training) and the CUDA memory statistics compile against nccl.h and the CUDA
# headers the torch wheel brings, plus two it lacks (crt/host_config.h, nv/target), from the CUDA
# 13.0 releases that match the wheel's: installed here, also into a venv made before they were
# needed. build.rs refuses to build against a CUDA torch without them (docs/building.md).
DIFFTUNE_CUDA_INCLUDE="$(echo "$DIFFTUNE_VENV"/lib/python3*/site-packages/nvidia/cu13/include)"
if [ ! -f "$DIFFTUNE_CUDA_INCLUDE/crt/host_config.h" ] || [ ! -e "$DIFFTUNE_CUDA_INCLUDE/nv/target" ]; then
  echo "difftune: installing the CUDA headers NCCL support compiles against (one-off, ~19 MB)" >&2
  "$DIFFTUNE_VENV/bin/pip" install --quiet nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
fi
unset DIFFTUNE_CUDA_INCLUDE
export PATH="$DIFFTUNE_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
# JPEGs are decoded by libjpeg-turbo, built by the turbojpeg-sys crate from its vendored source:
# that build needs cmake and nasm.
if ! command -v cmake >/dev/null || ! command -v nasm >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "difftune: installing cmake and nasm (one-off) to build libjpeg-turbo" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake nasm >/dev/null
  else
    echo "difftune: building libjpeg-turbo needs cmake and nasm (e.g. sudo apt-get install cmake nasm)" >&2
  fi
fi
