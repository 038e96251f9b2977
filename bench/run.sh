#!/usr/bin/env bash
# Runs `difftune bench` and its diffusers+peft peer (bench/peer/peer_bench.py) on this machine,
# interleaved: ROUNDS rounds (default 4), each running both tools with the same arguments, in the
# order ABBA... (difftune first in even rounds, the peer first in odd ones) so that drift in the
# machine's speed (a shared VM's neighbours) falls on both alike. Prints the per-method ratio
# (difftune samples/s over the peer's: above 1 means difftune is faster) with its spread and
# writes bench/results/<machine>-<date>.{json,md} with the machine, versions and load.
#
#   bench/run.sh --methods all --batch 1,8,32 --resolution 512 [--device cuda] [--warmup N --steps N]
#
# The ratio of a round is the peer's median step time over difftune's; reported are the median
# of the rounds' ratios, their interquartile range, and a 95% bootstrap interval of that median
# (steps resampled within each round and tool, 2000 times).
# ROUNDS sets the rounds. CONFIG_DIR (default presets/configs/sd-v1-4) holds the configs;
# weights are random. RESULTS_NAME overrides the <machine>-<date> file name. DIFFTUNE_BIN uses an
# already built binary (e.g. one copied to a GPU machine) instead of `cargo build --release`;
# PYTHON (default: the venv of scripts/env.sh, or python3 with DIFFTUNE_BIN) must have torch,
# diffusers and peft.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG_DIR="${CONFIG_DIR:-presets/configs/sd-v1-4}"
ROUNDS="${ROUNDS:-4}"
if [[ -z "${DIFFTUNE_BIN:-}" ]]; then
  source scripts/env.sh
  cargo build --release --bin difftune >&2
  DIFFTUNE_BIN=target/release/difftune
fi
PYTHON="${PYTHON:-python3}"
machine="$(hostname -s)"
stamp="$(date -u +%Y-%m-%d)"
mkdir -p bench/results
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

ARGS="$*"
for ((round = 0; round < ROUNDS; round++)); do
  if ((round % 2 == 0)); then order=(difftune peer); else order=(peer difftune); fi
  for tool in "${order[@]}"; do
    echo "round $round: $tool $ARGS (load average $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    cut -d' ' -f1-3 /proc/loadavg >"$scratch/load-$round-$tool"
    if [[ "$tool" == difftune ]]; then
      "$DIFFTUNE_BIN" bench --config-dir "$CONFIG_DIR" --json "$@" >"$scratch/$round-difftune.json"
    else
      "$PYTHON" bench/peer/peer_bench.py --config-dir "$CONFIG_DIR" --json "$@" >"$scratch/$round-peer.json"
    fi
  done
done
cut -d' ' -f1-3 /proc/loadavg >"$scratch/load-end"

"$PYTHON" bench/ratio_report.py "$scratch" "$ROUNDS" "bench/results/${RESULTS_NAME:-$machine-$stamp}" "$ARGS"
