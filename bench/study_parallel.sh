#!/usr/bin/env bash
# The tiny preset's study several ways, interleaved, in one sitting: one process with all the
# cores as torch threads (`one`) and with one (`one1`), `compare --jobs 2`, two cooperating
# invocations on one folder (one thread each), and 2 torchrun ranks, run-parallel and
# data-parallel; wall time and load average of each, and which results.json files have identical
# science fields (every score, loss and chosen learning rate; not the timings).
# Usage: bench/study_parallel.sh OUT_DIR [ROUNDS]
# BUDGET=full runs the preset as it is; the default reduces it (the --set lines below) to
# minutes. MODES chooses the modes (default: all six).
set -euo pipefail
out=${1:?usage: bench/study_parallel.sh OUT_DIR [ROUNDS]}
rounds=${2:-1}
bin=${DIFFTUNE:-target/release/difftune}
[ -x "$bin" ] || bin=target/debug/difftune
reduced=(
  --set train.steps=10 --set pretrain.steps=20 --set model.tiny_vae.steps=5
  --set data.synthetic.train_per_class=12 --set data.synthetic.test_per_class=8
  --set study.runs=2 --set study.lr_search.steps=4 --set study.lr_search.validation_per_class=2
  --set 'eval.at_steps=[5]' --set eval.classifier.steps=10
  --set study.timing.rounds=1 --set study.timing.steps=2 --set study.timing.warmup=1
  --set sample.per_class=4 --set sample.steps=5 --set sample.batch_size=12
  --set eval.kid_subset_size=20 --set eval.kid_subsets=10 --set eval.bootstrap=50
)
budget=()
[ "${BUDGET:-reduced}" = full ] || budget=("${reduced[@]}")
modes=${MODES:-one one1 jobs2 coop2 torchrun-run2 torchrun-data2}
torchrun=${TORCHRUN:-$HOME/.cache/difftune/venv-torch-2.11.0/bin/torchrun}
cores=$(nproc)
mkdir -p "$out"
log="$out/times.tsv"
printf 'round\tmode\twall_s\tload_1m_before\tload_1m_after\n' > "$log"
load() { cut -d' ' -f1 /proc/loadavg; }
for round in $(seq 1 "$rounds"); do
  for mode in $modes; do
    dir="$out/r$round-$mode"
    rm -rf "$dir"
    before=$(load)
    start=$(date +%s.%N)
    case $mode in
      one) OMP_NUM_THREADS=$cores "$bin" compare --preset tiny "${budget[@]}" --out "$dir" >/dev/null 2>"$dir.log" ;;
      one1) OMP_NUM_THREADS=1 "$bin" compare --preset tiny "${budget[@]}" --out "$dir" >/dev/null 2>"$dir.log" ;;
      torchrun-run2|torchrun-data2)
        parallel=${mode#torchrun-}; parallel=${parallel%2}
        OMP_NUM_THREADS=$((cores / 2)) "$torchrun" --nproc-per-node 2 --no-python "$bin" compare --preset tiny \
          "${budget[@]}" --set "study.parallel=\"$parallel\"" --out "$dir" >/dev/null 2>"$dir.log" ;;
      jobs2) "$bin" compare --preset tiny "${budget[@]}" --out "$dir" --jobs 2 >/dev/null 2>"$dir.log" ;;
      coop2)
        OMP_NUM_THREADS=$((cores / 2)) "$bin" compare --preset tiny "${budget[@]}" --out "$dir" >/dev/null 2>"$dir.a.log" &
        a=$!
        OMP_NUM_THREADS=$((cores / 2)) "$bin" compare --preset tiny "${budget[@]}" --out "$dir" >/dev/null 2>"$dir.b.log" &
        b=$!
        wait "$a"; wait "$b" ;;
    esac
    end=$(date +%s.%N)
    printf '%s\t%s\t%.1f\t%s\t%s\n' "$round" "$mode" "$(echo "$end - $start" | bc)" "$before" "$(load)" | tee -a "$log"
  done
done
python3 - "$out" <<'PY'
import json, sys, glob, os
def science(path):
    r = json.load(open(path))
    for k in ["git_commit", "machine", "timing", "load_average", "wall_seconds", "invocations", "invocation_seconds", "world_size", "settings_toml"]:
        r.pop(k, None)
    if r.get("classifier"):
        r["classifier"].pop("weights", None); r["classifier"].pop("seconds", None)
    for p in r["curves"]:
        p.pop("full_steps", None)
    for row in r["rows"]:
        row.pop("sample_seconds", None)
        for t in [row] + row["runs"]:
            if t.get("train"):
                t["train"] = {k: v for k, v in t["train"].items() if k in ("steps", "final_loss")}
    return r
files = sorted(glob.glob(os.path.join(sys.argv[1], "*/results.json")))
groups = []
for f in files:
    r = science(f)
    for g in groups:
        if g[0] == r:
            g[1].append(f)
            break
    else:
        groups.append((r, [f]))
for i, (_, members) in enumerate(groups):
    print(f"identical science, group {i + 1}:", " ".join(os.path.basename(os.path.dirname(m)) for m in members))
PY
