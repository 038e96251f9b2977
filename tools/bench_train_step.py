"""CPU training-step time of each tuning method, difftune next to diffusers + peft, in one run.

The model is the full-size SD v1.4 U-Net (../shared/reference/sd-v1-4/unet_config.json) with random
weights; one step is a forward at RESOLUTION/8 latents (batch 1, 77x768 context), the MSE loss,
backward and an AdamW update of the method's parameters only. difftune's side is the ignored test
`bench_train_step_sd14` in tests/train.rs (the same `train::step` function training uses); the
reference side is bench/peer/peer_bench.py (diffusers' U-Net, peft LoRA, hand-written hooks for
adapter, prefix and BitFit). Both use the same number of CPU threads. Prints the median step time
per method and the ratio difftune / reference (below 1: difftune is faster), and writes the
numbers as JSON when --json-out is given.

Full fine-tuning holds weights, gradients and two AdamW moments of 860M parameters: ~15 GB each
side (they run one after the other).

Usage: source tools/setup.sh && python tools/bench_train_step.py [--methods all] [--resolution 256]
         [--steps 3] [--threads 2] [--config-dir DIR] [--json-out FILE]
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIG_DIR = os.path.join(ROOT, "..", "shared", "reference", "sd-v1-4")
METHODS = ["full", "lora", "adapter", "prefix", "bitfit"]


def difftune_times(config_dir, methods, resolution, steps, threads):
    env = dict(os.environ,
               DIFFTUNE_BENCH_UNET_CONFIG=os.path.join(config_dir, "unet_config.json"),
               DIFFTUNE_BENCH_METHODS=",".join(methods),
               DIFFTUNE_BENCH_RESOLUTION=str(resolution),
               DIFFTUNE_BENCH_STEPS=str(steps),
               DIFFTUNE_BENCH_THREADS=str(threads),
               OMP_NUM_THREADS=str(threads))
    out = subprocess.run(
        ["cargo", "test", "--test", "train", "bench_train_step_sd14", "--", "--ignored", "--nocapture"],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    results = [json.loads(line[len("BENCH "):]) for line in out.splitlines() if line.startswith("BENCH ")]
    return {r["method"]: r for r in results}


def reference_times(config_dir, methods, resolution, steps, threads):
    import torch
    torch.set_num_threads(threads)
    sys.path.insert(0, os.path.join(ROOT, "bench", "peer"))
    import peer_bench

    args = argparse.Namespace(config_dir=config_dir, resolution=resolution, device="cpu",
                              warmup=1, steps=steps, compile=False)
    return {m: peer_bench.bench_one(args, m, 1) for m in methods}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config-dir", default=CONFIG_DIR, help="folder with SD v1.4's unet_config.json")
    p.add_argument("--methods", default="all")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json-out")
    args = p.parse_args()
    methods = METHODS if args.methods == "all" else args.methods.split(",")
    ours = difftune_times(args.config_dir, methods, args.resolution, args.steps, args.threads)
    theirs = reference_times(args.config_dir, methods, args.resolution, args.steps, args.threads)
    print(f"SD v1.4 U-Net, random weights, {args.resolution}x{args.resolution} "
          f"({args.resolution // 8}x{args.resolution // 8} latents), batch 1, CPU, {args.threads} threads, "
          f"median of {args.steps} steps")
    print(f"{'method':8} {'trainable':>12} {'difftune s':>11} {'diffusers s':>12} {'ratio':>6}")
    rows = []
    for m in methods:
        a, b = ours[m]["median_step_s"], theirs[m]["median_step_s"]
        print(f"{m:8} {ours[m]['trainable_params']:12,} {a:11.2f} {b:12.2f} {a / b:6.2f}")
        rows.append(dict(method=m, difftune_s=a, reference_s=b, ratio=a / b,
                         trainable_difftune=ours[m]["trainable_params"],
                         trainable_reference=theirs[m]["trainable_params"]))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(dict(resolution=args.resolution, threads=args.threads, steps=args.steps, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
