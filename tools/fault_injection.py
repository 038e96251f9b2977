#!/usr/bin/env python3
"""Fault injection for difftune's train and cache, run as a user would (the real binary, the
built-in tiny model, a small generated image folder):

  kill     train killed with SIGKILL at a random moment (up to three times per cycle), then
           `--resume` until it finishes: the adapter must be bit-identical to an uninterrupted
           run's, the metrics log must hold each step once, and no temp file may be left.
  ckpt     a random file of the newest checkpoint damaged (bit flip, truncation, deletion, its
           SHA256SUMS removed): resuming must skip it and end bit-identical.
  cache    a random file of the latent cache damaged: the next `cache` must say so, rebuild it
           and end with the same checksums as before.
  lock     two `train` processes started on one folder at once: exactly one must be refused,
           naming the other's PID.
  diskfull train and cache on a small tmpfs filled to a random level (needs mount permission;
           skipped with a message otherwise): a clean error (never a panic), every checkpoint
           left verifies, and once space is freed `--resume` ends bit-identical.

Usage: tools/fault_injection.py --bin target/debug/difftune [--cycles 10] [--seed 0]
       [--scenarios kill,ckpt,cache,lock,diskfull] [--work DIR] [--keep]
Prints one line per cycle and the counts per scenario; exits non-zero if any cycle failed.
Only Pillow is needed beyond the standard library (tools/requirements.txt pins it).
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = 24
CHECKPOINT_EVERY = 4


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Bench:
    def __init__(self, binary, work, rng):
        self.bin = str(Path(binary).resolve())
        self.work = Path(work)
        self.rng = rng
        self.env = dict(os.environ, OMP_NUM_THREADS="1", RUST_BACKTRACE="0")
        self.kills = 0

    def run(self, *args, timeout=600):
        return subprocess.run([self.bin, *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout)

    def setup(self):
        """The tiny model, 16 images with captions, the run config, the reference run."""
        self.model = self.work / "model"
        out = self.run("init-tiny", "--out", str(self.model))
        assert out.returncode == 0, out.stderr
        self.data = self.work / "data"
        make_image_folder(self.data, self.rng)
        self.config = self.work / "run.toml"
        self.config.write_text(
            '[train]\n'
            f'steps = {STEPS}\nbatch_size = 4\nlearning_rate = 1e-3\nresolution = 64\n'
            f'checkpoint_every = {CHECKPOINT_EVERY}\nkeep_checkpoints = 2\ndevice = "cpu"\n'
            '[method]\nname = "lora"\n')
        self.cache = self.work / "cache"
        started = time.monotonic()
        ref = self.train(self.work / "reference", cache=self.cache)
        assert ref.returncode == 0, ref.stderr
        self.reference = sha256(self.work / "reference" / "adapter.safetensors")
        self.duration = time.monotonic() - started
        self.run_bytes, self.cache_bytes = du(self.work / "reference"), du(self.cache)
        print(f"reference run: {STEPS} steps in {self.duration:.1f} s", flush=True)

    def train_args(self, out, cache=None, resume=False, extra=()):
        args = ["train", "--model", str(self.model), "--data", str(self.data),
                "--config", str(self.config), "--out", str(out),
                "--cache", str(cache or self.cache), *extra]
        return args + (["--resume"] if resume else [])

    def train(self, out, **kw):
        return self.run(*self.train_args(out, **kw))

    def spawn_train(self, out, **kw):
        return subprocess.Popen([self.bin, *self.train_args(out, **kw)], env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def du(path):
    """Bytes of file-system blocks under `path`."""
    return sum(os.stat(os.path.join(root, f)).st_blocks * 512
               for root, _, files in os.walk(path) for f in files)


def make_image_folder(path, rng):
    from PIL import Image, ImageDraw
    path.mkdir(parents=True)
    lines = []
    for i in range(16):
        image = Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.randrange(48), rng.randrange(48)
            draw.ellipse([x, y, x + 16, y + 16], fill=tuple(rng.randrange(256) for _ in range(3)))
        name = f"{i:03d}.png"
        image.save(path / name)
        lines.append(json.dumps({"file_name": name, "text": f"a plate of food {i % 4}"}))
    (path / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def leftovers(out):
    """Temp files or folders of interrupted writes still in the run folder."""
    found = []
    for root, dirs, files in os.walk(out):
        for name in dirs + files:
            if name.startswith(".difftune-tmp-") or name.startswith(".tmp-"):
                found.append(os.path.join(root, name))
    return found


def finished_run_problems(bench, out):
    """What is wrong with a finished run folder (empty when nothing)."""
    problems = []
    adapter = out / "adapter.safetensors"
    if not adapter.is_file():
        return ["no adapter"]
    if sha256(adapter) != bench.reference:
        problems.append("adapter differs from the uninterrupted run")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    if steps != list(range(1, STEPS + 1)):
        problems.append(f"metrics steps {steps[:3]}..{steps[-3:]} ({len(steps)} lines)")
    if leftovers(out):
        problems.append(f"leftover temp files {leftovers(out)}")
    return problems


def resume_until_done(bench, out, kills_left):
    """`--resume` until the run finishes, killing it again at random while kills_left."""
    for _ in range(10):
        if kills_left > 0 and bench.rng.random() < 0.5:
            kill_at_random(bench, bench.spawn_train(out, resume=True))
            kills_left -= 1
            continue
        done = bench.train(out, resume=True)
        if done.returncode != 0:
            return f"resume failed: {done.stderr.strip()[-300:]}"
        if (out / "adapter.safetensors").is_file():
            return None
    return "did not finish after 10 resumes"


def kill_at_random(bench, child):
    time.sleep(bench.rng.uniform(0.0, bench.duration))
    if child.poll() is None:
        child.send_signal(signal.SIGKILL)
        bench.kills += 1
    child.wait()


def scenario_kill(bench, cycle):
    out = bench.work / f"kill-{cycle}"
    kill_at_random(bench, bench.spawn_train(out))
    error = resume_until_done(bench, out, kills_left=2)
    return [error] if error else finished_run_problems(bench, out)


def newest_checkpoint(out):
    steps = sorted((out / "checkpoints").glob("step-*"))
    return steps[-1] if steps else None


def damage(path, rng):
    """Damages one file in one of four ways; returns what was done."""
    kind = rng.choice(["flip", "truncate", "delete"])
    data = path.read_bytes()
    if kind == "flip" and data:
        i = rng.randrange(len(data))
        path.write_bytes(data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:])
    elif kind == "truncate":
        path.write_bytes(data[: rng.randrange(max(len(data), 1))])
    else:
        path.unlink()
    return f"{kind} {path.name}"


def scenario_ckpt(bench, cycle):
    out = bench.work / f"ckpt-{cycle}"
    stop = bench.rng.choice([8, 12, 16])
    part = bench.train(out, extra=("--stop-after", str(stop)))
    if part.returncode != 0:
        return [f"first part failed: {part.stderr.strip()[-300:]}"]
    newest = newest_checkpoint(out)
    victim = bench.rng.choice(sorted(p for p in newest.iterdir()))
    what = damage(victim, bench.rng)
    done = bench.train(out, resume=True)
    if done.returncode != 0:
        return [f"{what}: resume failed: {done.stderr.strip()[-300:]}"]
    problems = finished_run_problems(bench, out)
    if f"skipped checkpoint {newest}" not in done.stderr:
        problems.append(f"{what}: no message naming the skipped checkpoint")
    return [f"{what}: {p}" for p in problems]


def cache_checksums(cache):
    return {p.name: sha256(p) for p in sorted(cache.glob("*.safetensors"))}


def scenario_cache(bench, cycle):
    cache = bench.work / f"cache-{cycle}"
    shutil.copytree(bench.cache, cache)
    before = cache_checksums(cache)
    files = sorted(p for p in cache.iterdir() if not p.name.startswith("."))
    what = damage(bench.rng.choice(files), bench.rng)
    rebuilt = bench.run("cache", "--model", str(bench.model), "--data", str(bench.data),
                        "--out", str(cache), "--resolution", "64", "--device", "cpu")
    if rebuilt.returncode != 0:
        return [f"{what}: cache failed: {rebuilt.stderr.strip()[-300:]}"]
    problems = []
    if "0 file(s) encoded" in rebuilt.stdout:
        problems.append(f"{what}: the damage was not noticed")
    if cache_checksums(cache) != before:
        problems.append(f"{what}: the rebuilt cache differs")
    shutil.rmtree(cache)
    return problems


def scenario_lock(bench, cycle):
    out = bench.work / f"lock-{cycle}"
    first, second = bench.spawn_train(out), bench.spawn_train(out)
    # One of the two is refused at once; the other is stopped once that is seen.
    deadline = time.monotonic() + 120
    while first.poll() is None and second.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    refused = [p for p in (first, second) if p.poll() is not None]
    for p in (first, second):
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
    if len(refused) != 1:
        return [f"{len(refused)} of 2 runs ended on their own"]
    other = second if refused[0] is first else first
    stderr = refused[0].stderr.read()
    if f"PID {other.pid}" not in stderr:
        return [f"the refusal does not name PID {other.pid}: {stderr.strip()[-300:]}"]
    return []


def mount_tmpfs(path, size_mb):
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    return done.returncode == 0, done.stderr.strip()


def fill(path, leave_bytes):
    """Fills the file system of `path` but `leave_bytes`; returns the filler file."""
    filler = path / "filler"
    free = shutil.disk_usage(path).free
    with open(filler, "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        remaining = max(free - leave_bytes, 0)
        while remaining > 0:
            n = min(remaining, len(chunk))
            try:
                f.write(chunk[:n])
                f.flush()
            except OSError:
                break
            remaining -= n
    return filler


def scenario_diskfull(bench, cycle):
    mnt = bench.work / f"tmpfs-{cycle}"
    ok, why = mount_tmpfs(mnt, 64)
    if not ok:
        return "skip", f"cannot mount a tmpfs ({why})"
    try:
        out, cache = mnt / "run", mnt / "cache"
        needed = bench.run_bytes
        if bench.rng.random() < 0.5:
            shutil.copytree(bench.cache, cache)
        else:
            needed += bench.cache_bytes
        # Less room than the run (and the cache build) needs, so that the disk fills at a random
        # point of it: most cycles end in a full disk.
        filler = fill(mnt, bench.rng.randrange(0, needed))
        full = bench.train(out, cache=cache)
        problems = []
        if full.returncode == 101 or "panicked" in full.stderr:
            problems.append(f"panic on a full disk: {full.stderr.strip()[-300:]}")
        for ckpt in (out / "checkpoints").glob("step-*"):
            check = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=ckpt,
                                   capture_output=True, text=True)
            if check.returncode != 0:
                problems.append(f"{ckpt.name} does not verify after the disk filled")
        filler.unlink()
        error = [line for line in full.stderr.splitlines() if line.startswith("Error")] or [""]
        print(f"  diskfull {cycle}: exit {full.returncode} {error[0][:200]}", flush=True)
        if full.returncode == 0:
            return problems + finished_run_problems(bench, out)
        error = resume_until_done(bench, out, kills_left=0)
        return [error] if error else problems + finished_run_problems(bench, out)
    finally:
        subprocess.run(["umount", str(mnt)])


SCENARIOS = {"kill": scenario_kill, "ckpt": scenario_ckpt, "cache": scenario_cache,
             "lock": scenario_lock, "diskfull": scenario_diskfull}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", required=True, help="the difftune binary")
    parser.add_argument("--cycles", type=int, default=10, help="cycles per scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--work", help="working folder (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="difftune-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.bin, work, random.Random(args.seed))
    failed = 0
    try:
        bench.setup()
        for name in args.scenarios.split(","):
            counts = {"ok": 0, "failed": 0, "skipped": 0}
            for cycle in range(args.cycles):
                result = SCENARIOS[name](bench, cycle)
                if isinstance(result, tuple):
                    counts["skipped"] += 1
                    print(f"{name} {cycle}: skipped: {result[1]}", flush=True)
                    break
                if result:
                    counts["failed"] += 1
                    print(f"{name} {cycle}: FAILED: {'; '.join(result)}", flush=True)
                else:
                    counts["ok"] += 1
                    print(f"{name} {cycle}: ok", flush=True)
            failed += counts["failed"]
            if name == "kill":
                print(f"   ({bench.kills} SIGKILLs landed on a running train)", flush=True)
            print(f"== {name}: {counts['ok']} ok, {counts['failed']} failed, "
                  f"{counts['skipped']} skipped", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
