#!/usr/bin/env bash
# The test command: sets up the torch venv if needed, builds, and runs every test on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# Tests run in parallel threads; one intra-op thread each avoids oversubscribing small CI machines.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cargo test --locked "$@"
