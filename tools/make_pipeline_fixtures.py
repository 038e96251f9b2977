"""Builds the sampling-pipeline parity fixtures under tests/fixtures/pipeline/ (pinned; rerun to
reproduce), for tests/sample.rs.

1. model/: a tiny random-weight diffusers StableDiffusionPipeline saved with save_pretrained (U-Net,
   VAE with SD's 8x downsampling, CLIP text encoder, the CLIP tokenizer files of
   tests/fixtures/clip/tokenizer, SD v1's PNDM scheduler config), no safety checker.
2. expected.safetensors: for each case, the initial latents given to the pipeline (`latents=`) and
   its `output_type="np"` images, transposed to [n, 3, H, W]:
     ddim_cfg       4 DDIM steps, guidance 7.5, two prompts
     pndm_cfg       3 PNDM steps, guidance 7.5, two prompts, a negative prompt
     ddim_no_cfg    4 DDIM steps, guidance 1.0 (no unconditional pass)
3. latents.safetensors: what diffusers' prepare_latents draws with
   `torch.Generator("cpu").manual_seed(S)`: `randn((n, 4, h/8, w/8))` for SEEDS below.

Usage: source tools/setup.sh && python tools/make_pipeline_fixtures.py
"""

import os
import shutil
import sys

import diffusers
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

EXPECTED = {"torch": "2.11.0", "diffusers": "0.42.1", "transformers": "5.24.0"}
HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")
OUT = os.path.join(FIXTURES, "pipeline")
SEED = 20251126
PROMPTS = ["a photo of an astronaut riding a horse", "a cute corgi dog, oil painting"]
NEGATIVE = "blurry, low quality"
# (seed, n, height, width) for the initial-latents fixture.
SEEDS = [(0, 1, 64, 64), (42, 2, 64, 96), (1234, 2, 256, 256)]

UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=[8, 16],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=4,
)
# Four blocks: three downsamplers, SD's factor of 8 between image and latent.
VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[8, 8, 16, 16],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.18215,
)
# SD v1's scheduler/scheduler_config.json (from_config keeps clip_sample, which DDIM reads).
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    clip_sample=False,
)


def check_versions():
    got = {
        "torch": torch.__version__.split("+")[0],
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    if got != EXPECTED:
        sys.exit(f"expected {EXPECTED}, found {got}: fixtures must come from the pinned stack")


def randomise_(model, gen):
    """Every parameter random (norm scales near 1), so the images depend on all of them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)


def build_pipeline():
    gen = torch.Generator().manual_seed(SEED)
    unet = UNet2DConditionModel(**UNET).eval()
    randomise_(unet, gen)
    vae = AutoencoderKL(**VAE).eval()
    randomise_(vae, gen)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(FIXTURES, "clip", "tokenizer"))
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config).eval()
    randomise_(text_encoder, gen)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def run(pipe, scheduler_cls, steps, guidance, prompts, negative, gen):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    latents = torch.randn((len(prompts), 4, 8, 8), generator=gen)
    images = pipe(
        prompt=prompts,
        negative_prompt=None if negative is None else [negative] * len(prompts),
        latents=latents,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="np",
    ).images
    return latents, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def main():
    check_versions()
    pipe = build_pipeline()
    model_dir = os.path.join(OUT, "model")
    shutil.rmtree(model_dir, ignore_errors=True)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; difftune reads the vocab.json/merges.txt layout of
    # the SD checkpoints on the hub, so the folder gets the source files.
    shutil.rmtree(os.path.join(model_dir, "tokenizer"))
    shutil.copytree(os.path.join(FIXTURES, "clip", "tokenizer"), os.path.join(model_dir, "tokenizer"))

    gen = torch.Generator().manual_seed(SEED + 1)
    expected = {}
    cases = {
        "ddim_cfg": (DDIMScheduler, 4, 7.5, PROMPTS, None),
        "pndm_cfg": (PNDMScheduler, 3, 7.5, PROMPTS, NEGATIVE),
        "ddim_no_cfg": (DDIMScheduler, 4, 1.0, PROMPTS[:1], None),
    }
    with torch.no_grad():
        for case, (cls, steps, guidance, prompts, negative) in cases.items():
            latents, images = run(pipe, cls, steps, guidance, prompts, negative, gen)
            expected[f"{case}.latents"] = latents
            expected[f"{case}.images"] = images
            print(f"{case}: images {tuple(images.shape)} mean {images.mean():.4f} std {images.std():.4f}")
    save_file(expected, os.path.join(OUT, "expected.safetensors"))

    drawn = {}
    for seed, n, h, w in SEEDS:
        g = torch.Generator("cpu").manual_seed(seed)
        drawn[f"seed{seed}_n{n}_{h}x{w}"] = torch.randn((n, 4, h // 8, w // 8), generator=g)
    save_file(drawn, os.path.join(OUT, "latents.safetensors"))


if __name__ == "__main__":
    main()
