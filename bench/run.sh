#!/usr/bin/env bash
# Runs `difftune bench` and its diffusers+peft peer (bench/peer/peer_bench.py) on this machine in
# one invocation, with the same arguments, prints the per-method ratio table (difftune samples/s
# over the peer's: above 1 means difftune is faster) and writes
# bench/results/<machine>-<date>.{json,md} with the machine, versions and load.
#
#   bench/run.sh --methods all --batch 1,8,32 --resolution 512 [--device cuda] [--warmup N --steps N]
#
# CONFIG_DIR (default ../shared/reference/sd-v1-4) holds the configs; weights are random.
# RESULTS_NAME overrides the <machine>-<date> file name. DIFFTUNE_BIN uses an already built
# binary (e.g. one copied to a GPU machine) instead of `cargo build --release`; PYTHON (default: the venv of scripts/env.sh, or python3 with
# DIFFTUNE_BIN) must have torch, diffusers and peft.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG_DIR="${CONFIG_DIR:-../shared/reference/sd-v1-4}"
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

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
echo "difftune bench $* (load average $load_before)" >&2
"$DIFFTUNE_BIN" bench --config-dir "$CONFIG_DIR" --json "$@" >"$scratch/difftune.json"
load_between="$(cut -d' ' -f1-3 /proc/loadavg)"
echo "peer $* (load average $load_between)" >&2
"$PYTHON" bench/peer/peer_bench.py --config-dir "$CONFIG_DIR" --json "$@" >"$scratch/peer.json"
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

"$PYTHON" - "$scratch" "bench/results/${RESULTS_NAME:-$machine-$stamp}" "$*" "$load_before" "$load_between" "$load_after" <<'PY'
import json, os, platform, subprocess, sys
import diffusers, peft, torch

scratch, out, args, *loads = sys.argv[1:]
ours = json.load(open(os.path.join(scratch, "difftune.json")))
peer = json.load(open(os.path.join(scratch, "peer.json")))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
by_key = {(r["method"], r["batch"]): r for r in peer["results"]}
rows = []
for r in ours["results"]:
    p = by_key.get((r["method"], r["batch"]))
    rows.append(dict(method=r["method"], batch=r["batch"], resolution=r["resolution"],
                     difftune_step_s=r["median_step_s"], peer_step_s=p and p["median_step_s"],
                     ratio=p and r["samples_per_s"] / p["samples_per_s"],
                     difftune_peak_bytes=r["peak_memory_bytes"], peer_peak_bytes=p and p["peak_memory_bytes"],
                     trainable_params=r["trainable_params"], peer_trainable_params=p and p["trainable_params"]))
machine = dict(hostname=platform.node(), cpu_model=cpu, cores=os.cpu_count(), device=ours["device"],
               torch=torch.__version__, diffusers=diffusers.__version__, peft=peft.__version__,
               commit=commit, load_average=dict(before=loads[0], between=loads[1], after=loads[2]))
report = dict(args=args, machine=machine, memory=ours["memory"], ratios=rows, difftune=ours, peer=peer)
with open(out + ".json.tmp", "w") as f:
    json.dump(report, f, indent=1)
os.replace(out + ".json.tmp", out + ".json")

mib = lambda b: "-" if b is None else f"{b / 2**20:.0f}"
lines = [f"# difftune bench vs diffusers+peft on {machine['hostname']}", "",
         f"- arguments: `{args}`",
         f"- device: {ours['device']} ({cpu}, {machine['cores']} cores, {ours['threads']} torch threads)",
         f"- torch {machine['torch']}, diffusers {machine['diffusers']}, peft {machine['peft']}, commit {commit}",
         f"- load average (1/5/15 min) before difftune {loads[0]}, before the peer {loads[1]}, after {loads[2]}",
         f"- memory: {ours['memory']}",
         "- ratio: difftune samples/s over the peer's (above 1: difftune is faster)", "",
         "| method | batch | difftune s/step | peer s/step | ratio | difftune peak MiB | peer peak MiB | trainable params |",
         "|---|---:|---:|---:|---:|---:|---:|---:|"]
for r in rows:
    peer_s = "-" if r["peer_step_s"] is None else f"{r['peer_step_s']:.2f}"
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
    lines.append(f"| {r['method']} | {r['batch']} | {r['difftune_step_s']:.2f} | {peer_s} | {ratio} | "
                 f"{mib(r['difftune_peak_bytes'])} | {mib(r['peer_peak_bytes'])} | {r['trainable_params']:,} |")
with open(out + ".md.tmp", "w") as f:
    f.write("\n".join(lines) + "\n")
os.replace(out + ".md.tmp", out + ".md")
print("\n".join(lines[8:]))
print(f"\nwrote {out}.json and {out}.md")
PY
