#!/usr/bin/env bash
# The test command: sets up the torch venv if needed, builds, and runs every test on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo test --locked "$@"
