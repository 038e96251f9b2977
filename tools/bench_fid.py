"""Speed of the FID feature pass (dims 2048): `difftune fid` next to pytorch-fid, on the same
images, the same weights and the same device, alternating runs to even out machine noise.

Both sides run the FID InceptionV3 with the random-weight recipe of tools/make_fid_fixtures.py
(formula conv weights + the fixture's calibrated BatchNorm tensors), saved once in the real
file's layout: speed does not depend on the weight values, and calibrated activations avoid
denormal slow paths. Timed on each side: image decoding + resizing + the network for all images
(pytorch-fid's `get_activations` with its CLI's default data-loader workers; difftune's own
timing line for the feature pass); model loading and statistics are not in the wall time.

Two rates are reported: images per wall-clock second, and images per CPU-second (process user +
system time; for difftune the whole process, model loading and statistics included, so that
number is conservative). On a machine shared with other jobs the wall-clock rate also reflects
how the scheduler treats each process; the CPU rate measures the work alone.

Usage (after `cargo build`, which the tests also do):
  source tools/setup.sh && python tools/bench_fid.py [--images 64] [--size 256] [--batch 16]
      [--rounds 3] [--device cpu] [--binary target/debug/difftune]
"""
import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fid_fixtures as fixtures  # noqa: E402
import pytorch_fid.inception as pfi  # noqa: E402
from pytorch_fid.fid_score import get_activations  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def weights_state() -> dict:
    bn = load_file(os.path.join(fixtures.OUT, "inception_bn.safetensors"))
    state = {}
    for key, shape in fixtures.fid_inception_shapes().items():
        if key.endswith("conv.weight"):
            state[key] = fixtures.formula_conv_weight(key, shape)
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=torch.long)
        elif key.startswith("fc."):
            state[key] = torch.zeros(shape)
        else:
            state[key] = bn[key]
    return state


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def pytorch_fid_rate(state: dict, files, batch: int, device: str):
    """(images per second, images per CPU-second), data-loader workers' CPU time included."""
    with mock.patch.object(pfi, "load_state_dict_from_url", return_value=state):
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device)
    workers = min(len(os.sched_getaffinity(0)), 8)  # pytorch-fid's CLI default
    cpu = cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    get_activations(files, model, batch_size=batch, dims=2048, device=device, num_workers=workers)
    wall = time.perf_counter() - start
    cpu = cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN) - cpu
    return len(files) / wall, len(files) / cpu


def difftune_rate(binary: str, weights: str, folder: str, batch: int, device: str):
    """(images per second of the feature pass, images per CPU-second of the whole process)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [binary, "fid", folder, "--save-stats", os.path.join(out, "s.npz"), "--weights", weights,
               "--batch", str(batch), "--device", device, "--dims", "2048"]
        cpu = cpu_seconds(resource.RUSAGE_CHILDREN)
        done = subprocess.run(cmd, capture_output=True, text=True)
        cpu = cpu_seconds(resource.RUSAGE_CHILDREN) - cpu
    if done.returncode != 0:
        sys.exit(f"difftune failed:\n{done.stderr}")
    match = re.search(r"features of (\d+) images in .*\(([0-9.]+) images/s\)", done.stderr)
    return float(match.group(2)), int(match.group(1)) / cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--binary", default=os.path.join(ROOT, "target", "debug", "difftune"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        files = []
        for k in range(args.images):
            path = os.path.join(folder, f"{k:04d}.png")
            Image.fromarray(fixtures.smooth_image(rng, args.size, args.size, 1.0)).save(path)
            files.append(path)
        state = weights_state()
        weights = os.path.join(tmp, "inception.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, weights)

        rates = {"pytorch-fid": [], "difftune": []}
        runs = {
            "pytorch-fid": lambda: pytorch_fid_rate(state, files, args.batch, args.device),
            "difftune": lambda: difftune_rate(args.binary, weights, folder, args.batch, args.device),
        }
        for round_ in range(args.rounds):
            # Alternate which side goes first, so slow drifts in machine load hit both alike.
            for name in sorted(runs, reverse=round_ % 2 == 1):
                rates[name].append(runs[name]())
            print(f"round {round_ + 1}: " + ", ".join(
                f"{name} {r[-1][0]:.2f} images/s ({r[-1][1]:.2f} per CPU-s)" for name, r in rates.items()), flush=True)

    print(f"{args.images} images {args.size}x{args.size}, batch {args.batch}, dims 2048, {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    medians = {}
    for name, r in rates.items():
        medians[name] = [statistics.median(x[k] for x in r) for k in (0, 1)]
        print(f"  {name:12s} median {medians[name][0]:.2f} images/s, {medians[name][1]:.2f} images/CPU-s")
    wall, cpu = (medians["difftune"][k] / medians["pytorch-fid"][k] for k in (0, 1))
    print(f"  ratio difftune / pytorch-fid (medians): {wall:.2f} wall-clock, {cpu:.2f} per CPU-second")


if __name__ == "__main__":
    main()
