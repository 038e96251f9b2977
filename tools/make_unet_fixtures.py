"""Builds tiny random-weight diffusers UNet2DConditionModels and saves weights, inputs and the
reference noise prediction under tests/fixtures/unet/<case>/, for tests/unet_parity.rs.

Cases:
  sd1_conv    conv proj_in/proj_out, one head count for all blocks (the SD 1.x layout)
  sd2_linear  linear projections, per-block head counts (the SD 2.x layout), and a latent size
              that is not a multiple of the downsampling factor (exercises forwarded upsample sizes)

Usage: source tools/setup.sh && python tools/make_unet_fixtures.py
"""
import json
import os

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "unet")

BASE = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=[16, 32, 32],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1,
    cross_attention_dim=16,
    norm_num_groups=4,
    sample_size=8,
)
CASES = {
    "sd1_conv": (dict(BASE, attention_head_dim=4), (2, 4, 8, 8)),
    "sd2_linear": (
        dict(BASE, attention_head_dim=[2, 4, 8], use_linear_projection=True),
        (2, 4, 10, 12),
    ),
}


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Every tensor random (norm scales around 1) so no parameter's role goes untested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


def main() -> None:
    for case, (config, shape) in CASES.items():
        gen = torch.Generator().manual_seed(0)
        model = UNet2DConditionModel(**config).eval()
        randomise(model, gen)
        sample = torch.randn(shape, generator=gen)
        timesteps = torch.tensor([17, 901])
        context = torch.randn(shape[0], 7, config["cross_attention_dim"], generator=gen)
        with torch.no_grad():
            out = model(sample, timesteps, encoder_hidden_states=context).sample
        d = os.path.join(OUT, case)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(dict(model.config), f, indent=1, default=list)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(d, "diffusion_pytorch_model.safetensors"))
        save_file({"sample": sample, "timesteps": timesteps, "context": context, "output": out},
                  os.path.join(d, "io.safetensors"))
        n = sum(p.numel() for p in model.parameters())
        print(f"{case}: {n} parameters, output std {out.std():.4f}")


if __name__ == "__main__":
    main()
