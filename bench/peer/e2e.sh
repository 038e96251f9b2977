#!/usr/bin/env bash
# End-to-end peer: trains LoRA with `difftune train` and with diffusers' own
# train_text_to_image_lora.py (bench/peer/ORIGIN.md) on the same model, the same image folder
# (raw images: difftune's time includes building its latent cache, the peer encodes every batch)
# for the same steps, batch and resolution, on the CPU, one after the other, and reports each
# tool's wall time and the ratio (the peer's time over difftune's: above 1, difftune is faster).
# Both use LoRA rank 4 on to_q, to_k, to_v and to_out.0 of every attention (the script's
# placement), learning rate 1e-4, constant schedule, fp32, seed 0.
#
#   bench/peer/e2e.sh                  # the tiny model (difftune init-tiny), 64 px, 32 images
#   MODEL=sd14 bench/peer/e2e.sh       # the SD v1.4 config with random weights, 256 px, 10 steps
#
# STEPS, BATCH, RESOLUTION, IMAGES override the defaults (tiny: 20, 4, 64, 32; sd14: 10, 1, 256,
# 16). CONFIG_DIR (default presets/configs/sd-v1-4) holds the sd14 configs. PEER_PYTHON
# must have the reference stack with `datasets` and torchvision (tools/setup.sh); default: the
# torch venv's python when it has `datasets`, else /tmp/peer-venv/bin/python. DIFFTUNE_BIN (default target/debug/difftune, built if absent). Writes
# bench/results/e2e-<model>-<machine>-<date>.md (RESULTS_NAME overrides the name).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL="${MODEL:-tiny}"
CONFIG_DIR="${CONFIG_DIR:-presets/configs/sd-v1-4}"
source scripts/env.sh
if [[ -z "${PEER_PYTHON:-}" ]]; then
  PEER_PYTHON=python
  python -c 'import datasets' 2>/dev/null || PEER_PYTHON=/tmp/peer-venv/bin/python
fi
if [[ -z "${DIFFTUNE_BIN:-}" ]]; then
  [[ -x target/debug/difftune ]] || cargo build --bin difftune >&2
  DIFFTUNE_BIN=target/debug/difftune
fi
case "$MODEL" in
  tiny) STEPS="${STEPS:-20}" BATCH="${BATCH:-4}" RESOLUTION="${RESOLUTION:-64}" IMAGES="${IMAGES:-32}" ;;
  sd14) STEPS="${STEPS:-10}" BATCH="${BATCH:-1}" RESOLUTION="${RESOLUTION:-256}" IMAGES="${IMAGES:-16}" ;;
  *) echo "MODEL must be tiny or sd14" >&2; exit 2 ;;
esac
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$DIFFTUNE_BIN" init-tiny --out "$work/tiny" >&2
if [[ "$MODEL" == sd14 ]]; then
  "$PEER_PYTHON" bench/peer/random_model.py "$CONFIG_DIR" "$work/tiny" "$work/model" >&2
else
  mv "$work/tiny" "$work/model"
fi
# An image folder as Hugging Face's imagefolder reads it: images and metadata.jsonl captions.
"$PEER_PYTHON" - "$work/data" "$IMAGES" "$RESOLUTION" <<'PY'
import json, os, sys
import numpy as np
from PIL import Image
out, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(out)
rng = np.random.default_rng(0)
with open(os.path.join(out, "metadata.jsonl"), "w") as f:
    for i in range(count):
        pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(out, f"{i:04d}.png"))
        f.write(json.dumps({"file_name": f"{i:04d}.png", "text": f"a photo of thing {i % 4}"}) + "\n")
PY

threads="$(python -c 'import torch; print(torch.get_num_threads())')"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s.%N)
"$DIFFTUNE_BIN" train --method lora --model "$work/model" --data "$work/data" --out "$work/difftune" \
  --steps "$STEPS" --batch "$BATCH" --lr 1e-4 --seed 0 --set train.gradient_accumulation_steps=1 \
  --set "train.resolution=$RESOLUTION" --set train.device='"cpu"' --set train.precision='"fp32"' \
  --set train.checkpoint_every=0 --set train.validation_every=0 \
  --set 'method.targets=["*.to_q", "*.to_k", "*.to_v", "*.to_out.0"]' >&2
ours=$(python -c "import time; print(time.time() - $start)")
load_between="$(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s.%N)
"$PEER_PYTHON" bench/peer/train_text_to_image_lora.py --pretrained_model_name_or_path "$work/model" \
  --train_data_dir "$work/data" --resolution "$RESOLUTION" --train_batch_size "$BATCH" \
  --max_train_steps "$STEPS" --learning_rate 1e-4 --lr_scheduler constant --lr_warmup_steps 0 \
  --seed 0 --rank 4 --dataloader_num_workers 0 --mixed_precision no --checkpointing_steps 1000000 \
  --output_dir "$work/peer" --report_to tensorboard >&2
peer=$(python -c "import time; print(time.time() - $start)")
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

mkdir -p bench/results
out="bench/results/${RESULTS_NAME:-e2e-$MODEL-$(hostname -s)-$(date -u +%Y-%m-%d)}.md"
cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
ratio=$(python -c "print(f'{$peer / $ours:.2f}')")
cat >"$out.tmp" <<MD
# End-to-end LoRA training: difftune vs diffusers' train_text_to_image_lora.py

- model: $MODEL ($( [[ $MODEL == tiny ]] && echo "difftune init-tiny" || echo "SD v1.4 configs, random weights")), $IMAGES raw images at ${RESOLUTION} px, $STEPS steps of batch $BATCH, LoRA rank 4 on to_q/to_k/to_v/to_out.0, fp32, CPU
- machine: $(hostname -s), $cpu, $(getconf _NPROCESSORS_ONLN) cores, torch threads: $threads; load average (1/5/15 min) before difftune $load_before, before the peer $load_between, after $load_after
- commit $(git rev-parse HEAD); peer script: diffusers commit 58eb52c0 (bench/peer/ORIGIN.md), diffusers $("$PEER_PYTHON" -c 'import diffusers; print(diffusers.__version__)'), datasets $("$PEER_PYTHON" -c 'import datasets; print(datasets.__version__)')
- wall time of each whole command (process start to exit; difftune's includes building its latent cache)

| tool | wall s |
|---|---:|
| difftune train | $(printf %.1f "$ours") |
| diffusers train_text_to_image_lora.py | $(printf %.1f "$peer") |
| ratio (peer / difftune; above 1: difftune is faster) | $ratio |
MD
mv "$out.tmp" "$out"
cat "$out"
