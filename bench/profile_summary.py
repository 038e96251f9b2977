"""Summarises torch profiler Chrome traces of one training step, as `difftune bench --profile` and
`bench/peer/peer_bench.py --profile` write them, side by side: per op, calls and self time (its
time minus that of the ops it called); and per trace, the step's span, the time inside top-level
ops and the rest (time spent outside torch's ops: the tool's own code, Python or Rust).

Usage: python bench/profile_summary.py difftune-lora-b1.json peer-lora-b1.json [--top 25]
"""
import argparse
import collections
import json


def summarise(path):
    events = [e for e in json.load(open(path))["traceEvents"]
              if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[e["tid"]].append(e)
    calls, self_us = collections.Counter(), collections.Counter()
    top_level_us, start, end = 0.0, float("inf"), 0.0
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []  # (end, name, children's time)
        for e in thread:
            ts, dur = e["ts"], e["dur"]
            start, end = min(start, ts), max(end, ts + dur)
            while stack and stack[-1][0] <= ts:
                _, name, child, own = stack.pop()
                self_us[name] += own - child
            if stack:
                stack[-1][2] += dur
            else:
                top_level_us += dur
            calls[e["name"]] += 1
            stack.append([ts + dur, e["name"], 0.0, dur])
        while stack:
            _, name, child, own = stack.pop()
            self_us[name] += own - child
    return dict(calls=calls, self_us=self_us, ops=sum(calls.values()), span_us=end - start,
                top_level_us=top_level_us)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("traces", nargs="+")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    summaries = [summarise(t) for t in args.traces]
    names = [t.rsplit("/", 1)[-1] for t in args.traces]
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    rows = [("op calls", lambda s: f"{s['ops']:,}"),
            ("step span ms", lambda s: f"{s['span_us'] / 1e3:.0f}"),
            ("in top-level ops ms", lambda s: f"{s['top_level_us'] / 1e3:.0f}"),
            ("outside ops ms", lambda s: f"{(s['span_us'] - s['top_level_us']) / 1e3:.0f}")]
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(s) for s in summaries) + " |")
    total = collections.Counter()
    for s in summaries:
        total.update(s["self_us"])
    print()
    print("| op | " + " | ".join(f"{n} calls | self ms" for n in names) + " |")
    print("|---|" + "---:|---:|" * len(names))
    for name, _ in total.most_common(args.top):
        cells = " | ".join(f"{s['calls'][name]} | {s['self_us'][name] / 1e3:.1f}" for s in summaries)
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
