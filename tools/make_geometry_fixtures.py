"""Builds tests/fixtures/pipeline_vae2/ for tests/sample.rs: a model whose VAE has two levels (a
downsampling factor of 2, not SD's 8), sampled by diffusers at its default size.

The U-Net, text encoder, tokenizer and scheduler are those of tests/fixtures/pipeline/model (built
by tools/make_pipeline_fixtures.py); only the VAE is new:
  vae/                 a random-weight 2-level AutoencoderKL (save_pretrained, safetensors)
  expected.safetensors `images`: StableDiffusionPipeline(prompt=PROMPT, num_inference_steps=3,
                       generator=torch.Generator("cpu").manual_seed(SEED), output_type="np") with
                       no height/width, i.e. diffusers' default unet.sample_size (8) x
                       vae_scale_factor (2) = 16 px, as [1, 3, 16, 16]

Usage: source tools/setup.sh && python tools/make_geometry_fixtures.py
Pinned: torch 2.11.0, diffusers 0.42.1, transformers 5.24.0.
"""
import os
import shutil
import sys

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_pipeline_fixtures import check_versions, randomise_  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
BASE = os.path.join(FIXTURES, "pipeline", "model")
OUT = os.path.join(FIXTURES, "pipeline_vae2")
PROMPT = "a photo of an astronaut riding a horse"
SEED = 7
VAE2 = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[8, 16],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=16,
    scaling_factor=0.18215,
)


def main():
    check_versions()
    shutil.rmtree(OUT, ignore_errors=True)
    vae = AutoencoderKL(**VAE2).eval()
    randomise_(vae, torch.Generator().manual_seed(2026))
    vae.save_pretrained(os.path.join(OUT, "vae"), safe_serialization=True)
    pipe = StableDiffusionPipeline.from_pretrained(BASE, vae=vae, safety_checker=None,
                                                   requires_safety_checker=False)
    assert pipe.vae_scale_factor == 2, pipe.vae_scale_factor
    with torch.no_grad():
        images = pipe(
            prompt=PROMPT,
            num_inference_steps=3,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="np",
        ).images
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    print(f"default-size images {tuple(images.shape)} mean {images.mean():.4f}")
    save_file({"images": images}, os.path.join(OUT, "expected.safetensors"))


if __name__ == "__main__":
    main()
