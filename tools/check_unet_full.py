"""On-demand parity and speed check of the full-size SD v1.4 U-Net (too big for CI).

Builds diffusers' UNet2DConditionModel from presets/configs/sd-v1-4/unet_config.json with
seeded random weights, runs one forward at 64x64 latents (batch 1, 77x768 context) on the CPU,
saves weights, inputs and output to a scratch folder, then runs the ignored Rust test
`full_size_sd14_matches_diffusers` on the same files, which prints its error and forward time.

Usage: source tools/setup.sh && python tools/check_unet_full.py [SCRATCH_DIR]
"""
import os
import subprocess
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIG = os.path.join(ROOT, "presets", "configs", "sd-v1-4", "unet_config.json")


def main() -> None:
    scratch = sys.argv[1] if len(sys.argv) > 1 else "/tmp/difftune-unet-full"
    os.makedirs(scratch, exist_ok=True)
    torch.manual_seed(0)
    config = UNet2DConditionModel.load_config(CONFIG)
    model = UNet2DConditionModel.from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 64, 64, generator=gen)
    timesteps = torch.tensor([500])
    context = torch.randn(1, 77, 768, generator=gen)
    with torch.no_grad():
        model(sample, timesteps, encoder_hidden_states=context)  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            out = model(sample, timesteps, encoder_hidden_states=context).sample
            times.append(time.perf_counter() - start)
    times.sort()
    print(f"diffusers forward (CPU, {torch.get_num_threads()} threads): median {times[1]:.3f} s")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(scratch, "diffusion_pytorch_model.safetensors"))
    save_file({"sample": sample, "timesteps": timesteps, "context": context, "output": out},
              os.path.join(scratch, "io.safetensors"))
    del model
    env = dict(os.environ, DIFFTUNE_FULL_UNET_DIR=scratch)
    subprocess.run(
        ["cargo", "test", "--test", "unet_parity", "full_size_sd14_matches_diffusers",
         "--", "--ignored", "--nocapture"],
        cwd=ROOT, env=env, check=True)


if __name__ == "__main__":
    main()
