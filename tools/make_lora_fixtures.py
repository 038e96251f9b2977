"""Applies HF peft LoRA (and DoRA) to the tiny diffusers U-Net of tests/fixtures/unet/sd1_conv and saves
the adapters as peft writes them, plus the adapted U-Net's output on that fixture's inputs, under
tests/fixtures/lora/<case>/, for tests/lora_parity.rs.

Cases (every LoRA weight random and non-zero, so the adapters change the output):
  r4_alpha4   attn2 to_q/to_k, rank 4, alpha 4 (the study's placement); also saved in the diffusers
              format (diffusers/pytorch_lora_weights.safetensors, `unet.`-prefixed keys)
  r4_alpha8   the same placement with alpha 8 (scale 2); also saved in the diffusers format with
              diffusers' `lora_adapter_metadata` header carrying the alpha
  dora_conv   DoRA on attn2 to_q/to_k, the resnets' conv1 and the 1x1 proj_in convolutions, rank 4
              with conv1 at rank 2 (`rank_pattern`), alpha 8, random magnitudes

Usage: source tools/setup.sh && python tools/make_lora_fixtures.py
"""
import json
import os

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
UNET = os.path.join(ROOT, "unet", "sd1_conv")
OUT = os.path.join(ROOT, "lora")

CASES = {
    "r4_alpha4": dict(r=4, lora_alpha=4, target_modules=["attn2.to_q", "attn2.to_k"]),
    "r4_alpha8": dict(r=4, lora_alpha=8, target_modules=["attn2.to_q", "attn2.to_k"]),
    "dora_conv": dict(
        r=4,
        lora_alpha=8,
        target_modules=["attn2.to_q", "attn2.to_k", "conv1", "proj_in"],
        rank_pattern={"conv1": 2},
        use_dora=True,
    ),
}
DIFFUSERS_COPIES = {"r4_alpha4": False, "r4_alpha8": True}  # case -> with adapter metadata


def randomise_lora(model: torch.nn.Module, gen: torch.Generator) -> None:
    """peft initialises B to zero (no effect); random A, B and magnitudes make the test meaningful."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))


def main() -> None:
    io = load_file(os.path.join(UNET, "io.safetensors"))
    for case, config in CASES.items():
        gen = torch.Generator().manual_seed(0)
        unet = UNet2DConditionModel.from_pretrained(UNET).eval()
        model = get_peft_model(unet, LoraConfig(**config))
        randomise_lora(model, gen)
        with torch.no_grad():
            out = unet(io["sample"], io["timesteps"], encoder_hidden_states=io["context"]).sample
        d = os.path.join(OUT, case)
        model.save_pretrained(d)
        os.remove(os.path.join(d, "README.md"))  # peft's generated model card; not a fixture
        save_file({"output": out.contiguous()}, os.path.join(d, "output.safetensors"))
        if case in DIFFUSERS_COPIES:
            layers = get_peft_model_state_dict(unet)
            meta = LoraConfig(**config).to_dict() if DIFFUSERS_COPIES[case] else None
            StableDiffusionPipeline.save_lora_weights(
                os.path.join(d, "diffusers"), unet_lora_layers=layers, unet_lora_adapter_metadata=meta
            )
        keys = sorted(load_file(os.path.join(d, "adapter_model.safetensors")))
        print(f"{case}: {len(keys)} tensors (e.g. {keys[0]}), output std {out.std():.4f}")
    with open(os.path.join(OUT, "r4_alpha4", "adapter_config.json")) as f:
        print("peft config keys:", sorted(json.load(f)))


if __name__ == "__main__":
    main()
