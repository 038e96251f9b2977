#!/usr/bin/env python3
"""On-demand check that difftune's LoRA exports load in diffusers as difftune computes them.

Runs the real binary as a user would: writes the built-in tiny model, trains a LoRA on every
layer kind for a few steps on a small generated image folder with `export = ["kohya",
"diffusers"]`, and merges the adapter into the U-Net (`difftune merge`). Then diffusers (pinned in
tools/requirements.txt) loads the base U-Net and applies each export with its own LoRA loader
(`lora_state_dict`, which converts kohya's keys, and `load_lora_into_unet`), and compares the
U-Net's output on seeded inputs with the merged U-Net's. Prints the relative L2 errors and how
many of each file's keys diffusers used; exits non-zero above 1e-5.

Usage: source tools/setup.sh && python tools/check_lora_exports.py --bin target/debug/difftune
"""
import argparse
import tempfile
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from export_checks import image_folder, output, run
from safetensors.torch import load_file

TARGETS = ("['*.attn1.to_q', '*.attn1.to_k', '*.attn1.to_v', '*.attn1.to_out.0', '*.attn2.to_q', "
           "'*.attn2.to_k', '*.attn2.to_v', '*.attn2.to_out.0', '*.ff.net.0.proj', '*.ff.net.2', "
           "'*.proj_in', '*.proj_out', '*.conv1', '*.conv2', '*.time_emb_proj']")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="difftune-lora-exports-"))
    model, run_dir = work / "model", work / "run"
    run(args.bin, "init-tiny", "--out", str(model))
    image_folder(work / "data")
    run(args.bin, "train", "--method", "lora", "--model", str(model), "--data", str(work / "data"),
        "--out", str(run_dir), "--steps", "5", "--lr", "1e-2", "--batch", "2",
        "--set", 'device="cpu"', "--set", "resolution=64", "--set", "gradient_accumulation_steps=1",
        "--set", f"targets={TARGETS}", "--set", "rank=4", "--set", "alpha=8",
        "--set", 'export=["kohya", "diffusers"]')
    merged_file = work / "merged.safetensors"
    run(args.bin, "merge", "--model", str(model), "--adapter", str(run_dir / "adapter.safetensors"),
        "--out", str(merged_file))

    gen = torch.Generator().manual_seed(1)
    unet_dir = model / "unet"
    config = UNet2DConditionModel.load_config(unet_dir)
    side = config["sample_size"]
    inputs = (torch.randn(2, 4, side, side, generator=gen), torch.tensor([10, 700]),
              torch.randn(2, 77, config["cross_attention_dim"], generator=gen))
    base = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    base_out = output(base, inputs)
    merged = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    merged.load_state_dict(load_file(merged_file))
    expected = output(merged, inputs)
    print(f"the LoRA moves the output by {relative(expected, base_out):.3e} (relative L2)")
    worst = 0.0
    for name, path in [("kohya", run_dir / "adapter-kohya.safetensors"),
                       ("diffusers", run_dir / "adapter-diffusers")]:
        unet = UNet2DConditionModel.from_pretrained(unet_dir).eval()
        state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet, adapter_name=name)
        error = relative(output(unet, inputs), expected)
        worst = max(worst, error)
        keys = len(load_file(path if path.is_file() else path / "pytorch_lora_weights.safetensors"))
        print(f"{name}: {keys} keys, {len(state)} after diffusers' conversion; "
              f"output vs difftune merge: relative L2 {error:.3e}")
    if worst > 1e-5:
        raise SystemExit(f"an export differs from the merge by {worst:.3e}")


if __name__ == "__main__":
    main()
