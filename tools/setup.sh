#!/usr/bin/env bash
# Installs the pinned reference stack (diffusers, transformers, peft, pytorch-fid, datasets) into the torch venv,
# for the parity scripts in tools/ and the peer benchmark. Usage: source tools/setup.sh
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
python -c 'import diffusers, transformers, peft, pytorch_fid, tensorboard, datasets, prdc' 2>/dev/null \
  || pip install --quiet -r "$root/tools/requirements.txt"
