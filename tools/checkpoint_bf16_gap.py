"""Measures how far PyTorch's own activation checkpointing moves a training step's gradients under
CPU bf16 autocast, on diffusers' U-Net with the built-in tiny config (src/model/tiny.rs): the
reference for the bound of tests/checkpointing.rs, whose checkpoint (csrc/checkpoint.cpp) is
PyTorch's reentrant one, recomputing each block inside its own backward call.

For each case (LoRA on the attention projections with frozen weights in bf16, as difftune's bf16
runs store them; full fine-tuning in f32 weights), it prints the largest gradient difference of the
checkpointed step from the plain one, relative to the largest gradient, for
`torch.utils.checkpoint(use_reentrant=True)` and for the non-reentrant variant (saved-tensor hooks:
Python only, no C++ API). The losses are identical in every case.

Usage: source tools/setup.sh && python tools/checkpoint_bf16_gap.py
"""
import functools

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

TINY_UNET = dict(
    act_fn="silu",
    attention_head_dim=4,
    block_out_channels=[32, 64],
    cross_attention_dim=32,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=8,
)


def build(method):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).train()
    if method == "lora":
        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        )
        torch.manual_seed(1)
        for name, p in unet.named_parameters():
            if "lora_B" in name:  # off zero, so that LoRA's own computation shows
                p.data.normal_(0, 0.05)
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    return unet


def loss_and_grads(unet, checkpointing):
    unet.zero_grad(set_to_none=True)
    if checkpointing is None:
        unet.disable_gradient_checkpointing()
    else:
        unet.enable_gradient_checkpointing(
            functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=checkpointing)
        )
    torch.manual_seed(2)
    # The reentrant checkpoint drops the first block's parameters' gradients unless an input
    # needs one (difftune adds an empty one; here the latents do).
    latents = torch.randn(2, 4, 8, 8).requires_grad_()
    context, target = torch.randn(2, 7, 32), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 700])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(latents, timesteps, context).sample
    loss = torch.nn.functional.mse_loss(out.float(), target)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    return loss.item(), grads


def main():
    torch.set_num_threads(1)
    for method in ["lora", "full"]:
        unet = build(method)
        plain_loss, plain = loss_and_grads(unet, None)
        scale = max(g.abs().max().item() for g in plain.values())
        for reentrant in [True, False]:
            loss, grads = loss_and_grads(unet, reentrant)
            worst, name = max(((grads[n] - plain[n]).abs().max().item(), n) for n in plain)
            print(
                f"{method:4s} use_reentrant={str(reentrant):5s} |dloss| {abs(loss - plain_loss):.1e} "
                f"max |dgrad| / max |grad| = {worst / scale:.2e} ({name})"
            )


if __name__ == "__main__":
    main()
