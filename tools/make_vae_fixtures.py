"""Builds the VAE parity fixtures in tests/fixtures/vae/ from a tiny random-weight diffusers AutoencoderKL.

Pinned: torch 2.11.0, diffusers 0.42.1 (see tools/requirements.txt). Usage:
    source tools/setup.sh && python tools/make_vae_fixtures.py

Writes:
  config.json          the AutoencoderKL config (diffusers' own save_config output)
  weights.safetensors  the state dict, with diffusers' parameter names
  io.safetensors       images [2,3,32,32] in [-1,1], their encoder mean/logvar, a posterior
                       sample drawn after torch.manual_seed(SAMPLE_SEED), a latent and its decoding
"""

import json
import os
import sys

import diffusers
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

EXPECTED = {"torch": "2.11.0", "diffusers": "0.42.1"}
SEED = 20240607
SAMPLE_SEED = 1234

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "vae")

CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    # Three blocks: two downsamplers, one block that widens (conv_shortcut) and one that does not.
    block_out_channels=[16, 32, 32],
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    layers_per_block=1,
    # 8 groups keep several channels per group, so the grouping itself is tested.
    norm_num_groups=8,
    act_fn="silu",
    sample_size=32,
    scaling_factor=0.18215,
)


def check_versions():
    got = {"torch": torch.__version__.split("+")[0], "diffusers": diffusers.__version__}
    if got != EXPECTED:
        sys.exit(f"expected {EXPECTED}, found {got}: fixtures must come from the pinned stack")


def randomise_(model):
    """Moves every parameter away from its init so that norms and biases are tested too."""
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.add_(0.02 * noise)
            if ".conv1." in name:
                # Shrinks what every resnet's norm2 normalises to a variance near the norms' eps
                # (1e-6), so that a wrong eps shows up in the outputs, not only at 1e-5 relative.
                p.mul_(0.01)


def main():
    check_versions()
    torch.manual_seed(SEED)
    vae = AutoencoderKL(**CONFIG).eval()
    randomise_(vae)

    gen = torch.Generator().manual_seed(SEED + 2)
    images = torch.rand(2, 3, 32, 32, generator=gen) * 2.0 - 1.0
    latents = torch.randn(2, 4, 8, 8, generator=gen)

    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        torch.manual_seed(SAMPLE_SEED)
        sample = posterior.sample()
        decoded = vae.decode(latents).sample

    os.makedirs(OUT, exist_ok=True)
    vae.save_config(OUT)
    with open(os.path.join(OUT, "config.json")) as f:
        saved = json.load(f)
    assert saved["block_out_channels"] == CONFIG["block_out_channels"]

    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(state, os.path.join(OUT, "weights.safetensors"))
    io = {
        "images": images,
        "mean": posterior.mean,
        "logvar": posterior.logvar,
        "sample": sample,
        "latents": latents,
        "decoded": decoded,
    }
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(OUT, "io.safetensors"),
              metadata={"sample_seed": str(SAMPLE_SEED)})
    params = sum(p.numel() for p in vae.parameters())
    print(f"wrote {OUT}: {params} parameters, mean |decoded| {decoded.abs().mean():.4f}, "
          f"mean std {posterior.std.mean():.4f}")


if __name__ == "__main__":
    main()
