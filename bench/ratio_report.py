"""The ratio report of bench/run.sh: reads the rounds' JSON (ROUND-difftune.json, ROUND-peer.json)
and load averages from the scratch folder, and writes OUT.json and OUT.md.

Per method and batch, the ratio of a round is the peer's median step time over difftune's
(difftune's samples/s over the peer's: above 1, difftune is faster). Reported: the median of the
rounds' ratios, their interquartile range, and a 95% bootstrap interval of that median (each
tool's steps resampled within each round, 2000 times, seeded).

Usage: python bench/ratio_report.py SCRATCH ROUNDS OUT ARGS
"""
import json
import os
import platform
import random
import statistics
import subprocess
import sys

import diffusers
import peft
import torch

BOOTSTRAP = 2000


def quartiles(values):
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def round_ratio(ours, peer):
    return statistics.median(peer) / statistics.median(ours)


def bootstrap(rounds, rng):
    """95% interval of the median over rounds of the per-round ratio, resampling steps."""
    medians = []
    for _ in range(BOOTSTRAP):
        ratios = [round_ratio(rng.choices(o, k=len(o)), rng.choices(p, k=len(p))) for o, p in rounds]
        medians.append(statistics.median(ratios))
    # The 2.5th and 97.5th percentiles, interpolated as numpy's default (difftune's
    # util::stats::interval_95).
    cuts = statistics.quantiles(medians, n=40, method="inclusive")
    return cuts[0], cuts[-1]


def main():
    scratch, rounds, out, args = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    read = lambda name: json.load(open(os.path.join(scratch, name)))
    runs = [(read(f"{r}-difftune.json"), read(f"{r}-peer.json")) for r in range(rounds)]
    loads = {name: open(os.path.join(scratch, name)).read().strip()
             for name in sorted(os.listdir(scratch)) if name.startswith("load-")}
    rng = random.Random(0)
    rows = []
    for i, first in enumerate(runs[0][0]["results"]):
        key = (first["method"], first["batch"])
        per_round = []
        for ours, peer in runs:
            o = ours["results"][i]
            p = next(x for x in peer["results"] if (x["method"], x["batch"]) == key)
            per_round.append((o["step_times_s"], p["step_times_s"]))
        ratios = [round_ratio(o, p) for o, p in per_round]
        q1, q3 = quartiles(ratios)
        lo, hi = bootstrap(per_round, rng)
        ours_all = [t for o, _ in per_round for t in o]
        peer_all = [t for _, p in per_round for t in p]
        rows.append(dict(method=key[0], batch=key[1], resolution=first["resolution"],
                         difftune_step_s=statistics.median(ours_all),
                         peer_step_s=statistics.median(peer_all),
                         ratio=statistics.median(ratios), ratio_iqr=[q1, q3],
                         ratio_95=[lo, hi], round_ratios=ratios,
                         difftune_peak_bytes=max(r[0]["results"][i]["peak_memory_bytes"] or 0 for r in runs),
                         peer_peak_bytes=max(next(x for x in r[1]["results"] if (x["method"], x["batch"]) == key)["peak_memory_bytes"] or 0 for r in runs),
                         trainable_params=first["trainable_params"]))
    ours0 = runs[0][0]
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    machine = dict(hostname=platform.node(), cpu_model=cpu, cores=os.cpu_count(), device=ours0["device"],
                   torch=torch.__version__, diffusers=diffusers.__version__, peft=peft.__version__,
                   commit=commit, load_average=loads)
    report = dict(args=args, rounds=rounds, machine=machine, memory=ours0["memory"],
                  sdpa=ours0.get("sdpa", ""), ratios=rows, runs=[dict(difftune=o, peer=p) for o, p in runs])
    with open(out + ".json.tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(out + ".json.tmp", out + ".json")

    steps = len(rows[0]["round_ratios"]) and len(runs[0][0]["results"][0]["step_times_s"])
    mib = lambda b: f"{b / 2**20:.0f}" if b else "-"
    load_values = sorted(float(v.split()[0]) for v in loads.values())
    lines = [f"# difftune bench vs diffusers+peft on {machine['hostname']}", "",
             f"- arguments: `{args}`; {rounds} rounds interleaved ABBA, {steps} timed steps per tool per round",
             f"- device: {ours0['device']} ({cpu}, {machine['cores']} cores, {ours0['threads']} torch threads)",
             f"- torch {machine['torch']}, diffusers {machine['diffusers']}, peft {machine['peft']}, commit {commit}",
             f"- load average (1 min) over the runs: {load_values[0]:.2f} to {load_values[-1]:.2f}",
             f"- attention (difftune): {report['sdpa']}",
             f"- memory: {ours0['memory']}",
             "- ratio: the peer's median step time over difftune's per round (above 1: difftune is faster); "
             "median over rounds, interquartile range of the rounds, 95% bootstrap interval", "",
             "| method | batch | difftune s/step | peer s/step | ratio | IQR | 95% interval | rounds | difftune peak MiB | peer peak MiB | trainable params |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        rounds_text = " ".join(f"{x:.2f}" for x in r["round_ratios"])
        lines.append(f"| {r['method']} | {r['batch']} | {r['difftune_step_s']:.2f} | {r['peer_step_s']:.2f} | "
                     f"{r['ratio']:.2f} | {r['ratio_iqr'][0]:.2f}–{r['ratio_iqr'][1]:.2f} | "
                     f"{r['ratio_95'][0]:.2f}–{r['ratio_95'][1]:.2f} | {rounds_text} | "
                     f"{mib(r['difftune_peak_bytes'])} | {mib(r['peer_peak_bytes'])} | {r['trainable_params']:,} |")
    with open(out + ".md.tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(out + ".md.tmp", out + ".md")
    print("\n".join(lines[10:]))
    print(f"\nwrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
