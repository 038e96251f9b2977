"""Builds the FID/KID parity fixtures under tests/fixtures/fid/, for tests/fid_parity.rs.

The reference is pytorch-fid 0.3.0 itself: its InceptionV3 (FID variant, built by
`pytorch_fid.inception.fid_inception_v3` with the weight download monkeypatched to return our
state dict), its `get_activations` image pipeline (PIL -> ToTensor -> bilinear resize to 299 inside
the model), `np.mean`/`np.cov` statistics and `calculate_frechet_distance`.

The real weights (~95 MB) cannot be committed, and random weights for 23.8M parameters are as big,
so the weights are split in two:
  * every `*.conv.weight` is computed from a formula that Rust reproduces bit for bit (integers
    only until one final division, so no transcendental function can differ between languages):
        P = 2^31 - 1
        seed = FNV-1a 32-bit hash of the parameter name (UTF-8) mod P
        for the flat (C-order) element index i:
            a = (i * 48271 + seed) mod P
            b = (a * a + 12345) mod P
            c = (b * b + 67890) mod P
            w = float32((2 * c / P - 1) * (sqrt(3) / sqrt(fan_in)))     (all in float64)
    i.e. a pseudo-random uniform with variance 1/fan_in;
  * the BatchNorm tensors (17k channels, ~270 KB) are stored in inception_bn.safetensors. Their
    running statistics are calibrated on smooth random images (one pass in train mode with
    cumulative averaging), so every layer's activations stay well scaled instead of vanishing or
    exploding through the 94 layers.
`num_batches_tracked` and `fc.*` are not stored; the Rust test adds them when it writes the full
weights file, as the real file has them.

Outputs (tests/fixtures/fid/):
  a/*.png, b/*.png          two image folders, sizes 299x299, smaller, larger, non-square
  inception_bn.safetensors  BatchNorm weight/bias/running_mean/running_var
  reference.safetensors     pytorch-fid features for dims 64/192/768/2048 (float32, rows in
                            sorted file-name order), FID of a vs b per dims, KID of a vs b at
                            dims 2048 (the one subset being both whole sets), and a
                            well-conditioned feature pair with pytorch-fid's FID of it
  stats_a_64.npz            pytorch-fid's stats of folder a at dims 64, written like
                            `pytorch-fid --save-stats` (np.savez_compressed)
  stats_a_64_f32_fortran.npz  the same in float32, sigma in Fortran order, uncompressed

Usage: source tools/setup.sh && python tools/make_fid_fixtures.py
"""
import math
import os
import shutil
from unittest import mock

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import pytorch_fid.inception as pfi
from pytorch_fid.fid_score import calculate_frechet_distance, get_activations

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "fid")
P = 2**31 - 1
DIMS = (64, 192, 768, 2048)
# (folder, width, height): 299x299, smaller, larger and non-square images in both folders.
IMAGES = {
    "a": [(299, 299), (299, 299), (128, 96), (480, 360), (200, 320), (64, 64)],
    "b": [(299, 299), (160, 160), (350, 410), (256, 192), (320, 120), (299, 150)],
}


def fnv1a32(text: str) -> int:
    h = 0x811C9DC5
    for byte in text.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def formula_conv_weight(name: str, shape) -> torch.Tensor:
    numel = math.prod(shape)
    seed = np.uint64(fnv1a32(name) % P)
    i = np.arange(numel, dtype=np.uint64)
    a = (i * np.uint64(48271) + seed) % np.uint64(P)
    b = (a * a + np.uint64(12345)) % np.uint64(P)
    c = (b * b + np.uint64(67890)) % np.uint64(P)
    scale = math.sqrt(3.0) / math.sqrt(math.prod(shape[1:]))
    w = ((2.0 * (c.astype(np.float64) / P) - 1.0) * scale).astype(np.float32)
    return torch.from_numpy(w.reshape(shape))


def smooth_image(rng: np.random.Generator, width: int, height: int, bright: float) -> np.ndarray:
    """Low-frequency colour fields plus a few stripes and blobs: enough structure for every layer
    to respond, and PNGs that compress well."""
    grid = rng.uniform(0, 255, size=(rng.integers(3, 7), rng.integers(3, 7), 3))
    base = Image.fromarray(grid.astype(np.uint8)).resize((width, height), Image.BICUBIC)
    img = np.asarray(base, dtype=np.float64)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(3):
        freq = rng.uniform(0.02, 0.2)
        angle = rng.uniform(0, math.pi)
        wave = np.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)))
        img += rng.uniform(10, 40) * wave[..., None] * rng.uniform(-1, 1, size=3)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(5, 60)
        blob = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[blob] = rng.uniform(0, 255, size=3)
    return np.clip(img * bright, 0, 255).round().astype(np.uint8)


def fid_inception_shapes() -> dict:
    """The key layout and shapes of pytorch-fid's FID Inception (the real file's 566 keys)."""
    with mock.patch.object(pfi, "load_state_dict_from_url", return_value=None), mock.patch.object(
        torch.nn.Module, "load_state_dict", lambda self, *args, **kwargs: None
    ):
        model = pfi.fid_inception_v3()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def initial_state_dict() -> dict:
    """Formula conv weights, random BN affine, identity BN stats, zero `fc`."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in fid_inception_shapes().items():
        if key.endswith("conv.weight"):
            state[key] = formula_conv_weight(key, shape)
        elif key.endswith("bn.weight"):
            state[key] = 0.8 + 0.4 * torch.rand(shape, generator=gen)
        elif key.endswith("bn.bias"):
            state[key] = -0.1 + 0.4 * torch.rand(shape, generator=gen)
        elif key.endswith("running_mean"):
            state[key] = torch.zeros(shape)
        elif key.endswith("running_var"):
            state[key] = torch.ones(shape)
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=torch.long)
        elif key.startswith("fc."):
            state[key] = torch.zeros(shape)
        else:
            raise KeyError(f"unexpected key {key}")
    assert len(state) == 566, len(state)
    return state


def calibrate(state: dict, images: torch.Tensor) -> dict:
    """Sets every BN's running stats to its input's statistics on `images`, layer after layer
    (train mode normalises with the batch statistics as it records them)."""
    with mock.patch.object(pfi, "load_state_dict_from_url", return_value=state):
        inception = pfi.fid_inception_v3()
    # InceptionV3 shares the inception's modules, so calibrating it calibrates `inception`.
    with mock.patch.object(pfi, "fid_inception_v3", return_value=inception):
        model = pfi.InceptionV3([3])
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: after one batch, the batch statistics
    model.train()
    with torch.no_grad():
        model(images)
    return {k: v.detach().clone() for k, v in inception.state_dict().items()}


def pytorch_fid_features(state: dict, files, dims: int) -> np.ndarray:
    with mock.patch.object(pfi, "load_state_dict_from_url", return_value=state):
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    # batch 1: pytorch-fid's DataLoader can only batch images of one size.
    return get_activations(files, model, batch_size=1, dims=dims, device="cpu", num_workers=0)


def stats(features: np.ndarray):
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def kid_one_subset(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel, as clean-fid's kernel_distance (one subset
    holding all of both sets, so no random choice is involved)."""
    d = x.shape[1]
    m = x.shape[0]
    a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
    b = (x @ y.T / d + 1) ** 3
    return float((a.sum() - np.diag(a).sum()) / (m - 1) / m - b.sum() * 2 / m / m)


def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(2024)
    shutil.rmtree(OUT, ignore_errors=True)
    files = {}
    for folder, sizes in IMAGES.items():
        os.makedirs(os.path.join(OUT, folder))
        files[folder] = []
        for k, (w, h) in enumerate(sizes):
            path = os.path.join(OUT, folder, f"{k:02d}_{w}x{h}.png")
            Image.fromarray(smooth_image(rng, w, h, 1.0 if folder == "a" else 1.2)).save(path)
            files[folder].append(path)

    calib = np.stack([smooth_image(rng, 299, 299, rng.uniform(0.8, 1.2)) for _ in range(16)])
    calib = torch.from_numpy(calib).permute(0, 3, 1, 2).float() / 255
    state = calibrate(initial_state_dict(), calib)
    save_file(
        {k: v.contiguous() for k, v in state.items() if ".bn." in k and "num_batches" not in k},
        os.path.join(OUT, "inception_bn.safetensors"),
    )

    ref = {}
    for dims in DIMS:
        fa = pytorch_fid_features(state, files["a"], dims)
        fb = pytorch_fid_features(state, files["b"], dims)
        # float32 loses nothing: pytorch-fid's float64 array holds the network's float32 outputs.
        ref[f"features_a_{dims}"] = torch.from_numpy(fa.astype(np.float32))
        ref[f"features_b_{dims}"] = torch.from_numpy(fb.astype(np.float32))
        (mu_a, sigma_a), (mu_b, sigma_b) = stats(fa), stats(fb)
        fid = calculate_frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
        ref[f"fid_{dims}"] = torch.tensor([float(fid)], dtype=torch.float64)
        print(f"dims {dims}: feature std {fa.std():.3g}, FID {fid:.6f}")
        if dims == 64:
            np.savez_compressed(os.path.join(OUT, "stats_a_64.npz"), mu=mu_a, sigma=sigma_a)
            np.savez(
                os.path.join(OUT, "stats_a_64_f32_fortran.npz"),
                mu=mu_a.astype(np.float32),
                sigma=np.asfortranarray(sigma_a.astype(np.float32)),
            )
        if dims == 2048:
            ref["kid_2048"] = torch.tensor([kid_one_subset(fa, fb)], dtype=torch.float64)
            print(f"KID {ref['kid_2048'].item():.6e}")

    # A well-conditioned pair (n >> d, correlated, different means) for the Frechet distance
    # alone, where scipy's sqrtm is accurate to ~1e-12.
    gen = np.random.default_rng(7)
    mix_x = gen.normal(size=(48, 48))
    mix_y = mix_x + 0.5 * gen.normal(size=(48, 48))
    x = (gen.normal(size=(400, 48)) @ mix_x).astype(np.float32).astype(np.float64)
    y = (gen.normal(size=(300, 48)) @ mix_y + 0.3).astype(np.float32).astype(np.float64)
    ref["wellcond_x"] = torch.from_numpy(x.astype(np.float32))
    ref["wellcond_y"] = torch.from_numpy(y.astype(np.float32))
    fid = calculate_frechet_distance(*stats(x), *stats(y))
    ref["wellcond_fid"] = torch.tensor([float(fid)], dtype=torch.float64)
    print(f"well-conditioned FID {fid:.9f}")
    save_file(ref, os.path.join(OUT, "reference.safetensors"))


if __name__ == "__main__":
    main()
