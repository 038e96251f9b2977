"""What the on-demand export checks (check_lora_exports.py, check_lycoris_exports.py) share:
running the difftune binary, the small image folder they train on, and the U-Net's output on
seeded inputs."""
import subprocess
from pathlib import Path

import torch
from PIL import Image


def run(*args: str) -> None:
    """Runs a command; on failure, exits naming it with its stderr."""
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr}")


def image_folder(path: Path) -> None:
    """Eight seeded 64x64 noise images with tag captions."""
    path.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(8):
        pixels = (torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(path / f"{i}.png")
        (path / f"{i}.txt").write_text(f"thing{i}, red")


def output(unet: torch.nn.Module, inputs) -> torch.Tensor:
    """The U-Net's prediction for (latents, timestep, context)."""
    with torch.no_grad():
        return unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
