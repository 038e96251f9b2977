"""Applies HF peft's LoHa, LoKr and OFT (peft 0.21.2, tools/requirements.txt) to the tiny diffusers
U-Net of tests/fixtures/unet/sd1_conv and saves, under tests/fixtures/lycoris/<case>/, for
tests/lycoris_parity.rs:
  adapter_model.safetensors, adapter_config.json   the adapter as peft writes it (random weights)
  output.safetensors   `output`: the adapted U-Net's output on the U-Net fixture's inputs (for OFT on
                       3x3 convolutions, the merged model's: peft's unmerged forward sums overlapping
                       patches there, see src/peft/oft.rs); `target`: the fixed training target
  trained.safetensors  the adapter's tensors after STEPS AdamW steps (lr LR, weight decay 1e-2) on
                       the MSE between that output and `target`, the inputs fixed (not for
                       oft_conv, whose peft training runs the unmerged forward). LoHa's Tucker
                       form trains with autograd through peft's forward: peft's hand-written
                       backward for it (HadaWeightCP) gives hada_w1_a and hada_w2_a wrong gradients
                       (relative error ~2, printed by check_tucker_backward) and difftune
                       differentiates the forward exactly

Cases (every adapter tensor random and non-zero, so each changes the output):
  loha        attn2 to_q/to_k, r 4, alpha 8 (scale 2)
  loha_conv   attn2 to_q, conv1 (3x3, Tucker form: use_effective_conv2d) and proj_in (1x1), r 2,
              alpha 4, conv1 at r 1 (rank_pattern)
  lokr        attn2 to_k and conv1, r 2, alpha 4, decompose_both, use_effective_conv2d: full,
              low-rank and Tucker factors on the tiny U-Net's widths
  oft         attn2 to_q/to_k and proj_in, block size 4, Cayley-Neumann (peft's default)
  oft_coft    attn2 to_q and proj_in, r 2 blocks, COFT (eps 0.5), exact Cayley
  oft_conv    conv1 (3x3), block size 8: compared with peft's merged model

Usage: source tools/setup.sh && python tools/make_lycoris_fixtures.py
"""
import os

import torch
from diffusers import UNet2DConditionModel
from peft import LoHaConfig, LoKrConfig, OFTConfig, get_peft_model
from peft.tuners.loha import layer as loha_layer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
UNET = os.path.join(ROOT, "unet", "sd1_conv")
OUT = os.path.join(ROOT, "lycoris")
STEPS = 3
LR = 1e-3

CASES = {
    "loha": LoHaConfig(r=4, alpha=8, target_modules=["attn2.to_q", "attn2.to_k"]),
    "loha_conv": LoHaConfig(
        r=2,
        alpha=4,
        target_modules=["attn2.to_q", "conv1", "proj_in"],
        rank_pattern={"conv1": 1},
        use_effective_conv2d=True,
    ),
    "lokr": LoKrConfig(
        r=2,
        alpha=4,
        target_modules=["attn2.to_k", "conv1"],
        decompose_both=True,
        use_effective_conv2d=True,
    ),
    "oft": OFTConfig(oft_block_size=4, target_modules=["attn2.to_q", "attn2.to_k", "proj_in"]),
    "oft_coft": OFTConfig(
        r=2,
        oft_block_size=0,
        coft=True,
        eps=0.5,
        use_cayley_neumann=False,
        target_modules=["attn2.to_q", "proj_in"],
    ),
    "oft_conv": OFTConfig(oft_block_size=8, target_modules=["conv1"]),
}
MERGED_REFERENCE = {"oft_conv"}  # OFT on 3x3 convolutions: peft's merged model is the reference


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """peft zero-initialises one factor (no effect); random values make the test meaningful."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


def tucker_weight(t1, w1a, w1b, t2, w2a, w2b, scale):
    """peft's LoHa Tucker-form weight, differentiated by autograd."""
    rebuild1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
    rebuild2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
    return rebuild1 * rebuild2 * scale


def check_tucker_backward() -> None:
    """Prints how far peft's HadaWeightCP gradients are from autograd's of the same forward."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 2, 3, 3), (2, 6), (2, 5), (2, 2, 3, 3), (2, 6), (2, 5)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]
    grad = torch.randn(6, 5, 3, 3, generator=gen, dtype=torch.float64)
    scale = torch.tensor(1.0, dtype=torch.float64)
    peft = torch.autograd.grad(loha_layer.HadaWeightCP.apply(*params, scale), params, grad)
    exact = torch.autograd.grad(tucker_weight(*params, scale), params, grad)
    errors = {n: ((a - b).norm() / b.norm()).item() for n, a, b in zip(["t1", "w1a", "w1b", "t2", "w2a", "w2b"], peft, exact)}
    print("peft HadaWeightCP gradient relative errors:", {n: f"{e:.2g}" for n, e in errors.items()})


def forward(unet, io):
    return unet(io["sample"], io["timesteps"], encoder_hidden_states=io["context"]).sample


def main() -> None:
    check_tucker_backward()
    loha_layer.make_weight_cp = tucker_weight
    io = load_file(os.path.join(UNET, "io.safetensors"))
    for case, config in CASES.items():
        gen = torch.Generator().manual_seed(0)
        unet = UNet2DConditionModel.from_pretrained(UNET).eval()
        model = get_peft_model(unet, config)
        randomise(model, gen)
        d = os.path.join(OUT, case)
        model.save_pretrained(d)
        os.remove(os.path.join(d, "README.md"))  # peft's generated model card; not a fixture
        with torch.no_grad():
            if case in MERGED_REFERENCE:
                merged = UNet2DConditionModel.from_pretrained(UNET).eval()
                merged = get_peft_model(merged, config)
                merged.load_state_dict(model.state_dict())
                out = forward(merged.merge_and_unload(), io)
            else:
                out = forward(unet, io)
        target = torch.randn(out.shape, generator=gen)
        save_file({"output": out.contiguous(), "target": target}, os.path.join(d, "output.safetensors"))
        if case in MERGED_REFERENCE:
            print(f"{case}: output std {out.std():.4f} (merged)")
            continue

        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=LR, weight_decay=1e-2)
        for _ in range(STEPS):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(forward(unet, io), target)
            loss.backward()
            optimizer.step()
        state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(state, os.path.join(d, "trained.safetensors"))
        print(f"{case}: {len(state)} tensors, output std {out.std():.4f}, loss after {loss.item():.4f}")


if __name__ == "__main__":
    main()
