#!/usr/bin/env python3
"""On-demand check that difftune's LoHa, LoKr and OFT exports load in peft and in LyCORIS loaders
as difftune computes them.

Runs the real binary as a user would: writes the built-in tiny model, trains each case below for a
few steps on a small generated image folder, on every Linear and Conv2d kind of layer (attention,
feed-forward, proj_in/proj_out and conv_shortcut 1x1, resnet conv1/conv2 3x3, time_emb_proj), with
`export = ["peft", "kohya"]` (OFT: ["peft"]), and merges the adapter into the U-Net (`difftune
merge`). Then, against that merged U-Net (relative L2 errors, TOLERANCE 1e-5 as for LoRA):

- peft (pinned in tools/requirements.txt) loads the peft folder with its documented path,
  `PeftModel.from_pretrained(unet, folder)`; every tensor of the file must be one peft uses
  (`get_peft_model_state_dict` gives back the same keys and values). Compared: the adapted U-Net's
  output (peft's unmerged forward), and peft's `merge_and_unload()` weights, the weight deltas
  against difftune's merged deltas. OFT on 3x3 convolutions: peft 0.21.2's unmerged forward rotates
  unfolded patches and sums overlapping ones (docs/methods.md); difftune, like peft's merge, rotates
  the filters. So OFT's unmerged output is compared with the 3x3 layers left out of the folder and
  reset to the base weights in the merged U-Net; its merged weights include them. OFT keeps
  TOLERANCE: difftune's merge and peft both use the Cayley-Neumann series with the same number of
  terms (the setting is exported), so the forms agree exactly and only float32 rounding remains.
- The kohya file (LoHa, LoKr): every key must be `lora_unet_<diffusers path with . as _>.<part>`
  of a Linear/Conv2d of the U-Net (sd-scripts' SD 1.x naming, which ComfyUI and A1111 map), its
  parts LyCORIS' (hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, hada_t1, hada_t2; lokr_w1,
  lokr_w1_a, lokr_w1_b, lokr_w2, lokr_w2_a, lokr_w2_b, lokr_t2) and one `alpha` per layer. The
  weight deltas are rebuilt in numpy with the formulas of ComfyUI's comfy/weight_adapter/loha.py
  and lokr.py (A1111's network_hada.py/network_lokr.py agree): LoHa (w1_a w1_b) * (w2_a w2_b) *
  alpha / rank(w1_b), Tucker factors through the einsum `ijkl,jr,ip->prkl`; LoKr kron(w1, w2) with
  each factor full or a product (Tucker for w2), scaled by alpha / rank of the last decomposed
  factor (w2_b before w1_b), by 1 when both are full. They must equal difftune's merged deltas,
  layer by layer, and the U-Net with them must give the merged output. diffusers 0.42.1 has a
  loader for LyCORIS LoKr files (written for Z-Image: `ZImageLoraLoaderMixin.lora_state_dict`,
  which bakes alpha / rank as above, then `load_lora_adapter`, which infers a peft LoKrConfig); it
  is applied to the Linear layers, the keys renamed to diffusers paths: its config inference reads
  every factor as a matrix, so a convolution's 4-D lokr_w2 fails there (a diffusers limit, not
  the file's). diffusers and peft have no loader for LyCORIS LoHa files.

A layer's delta error is relative to its delta, and the merged file holds base + delta in float32:
a layer that barely moves (Tucker LoHa's 3x3 convolutions move by ~1e-4 of their weight) shows a
relative error of ~1e-5 from that rounding alone. So each layer is bounded by TOLERANCE of its
delta plus 2 float32 epsilons of its weight; all layers together, and the outputs, by TOLERANCE.

Result (difftune 0.1.0, peft 0.21.2, diffusers 0.42.1, torch 2.11.0 CPU; 2-core VM, ~2 min): no
mismatch. Worst relative L2 1.1e-6 (peft's unmerged LoHa output); peft's merge_and_unload equals
difftune's merge bit for bit for LoHa, LoKr and OFT (5e-8 for LoKr with Tucker factors); the
ComfyUI formulas on the kohya files give the merged deltas within 3.2e-7 (all layers) and the
merged output within 8.3e-7; every peft and kohya key is used. The loaders' LoKr scale rank is
w2_b's before w1_b's, difftune's export reads w1_b's first (src/peft/lycoris.rs,
lokr_loader_rank): the same number, as peft gives both factors of a layer one rank.

Prints the errors and key counts; exits non-zero above the bounds.

Usage: source tools/setup.sh && python tools/check_lycoris_exports.py --bin target/debug/difftune
"""
import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.lora_pipeline import ZImageLoraLoaderMixin
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from export_checks import image_folder, output, run
from safetensors.torch import load_file, save_file

TOLERANCE = 1e-5
TARGETS = ("['*.attn1.to_q', '*.attn1.to_k', '*.attn1.to_v', '*.attn1.to_out.0', '*.attn2.to_q', "
           "'*.attn2.to_k', '*.attn2.to_v', '*.attn2.to_out.0', '*.ff.net.0.proj', '*.ff.net.2', "
           "'*.proj_in', '*.proj_out', '*.conv1', '*.conv2', '*.conv_shortcut', '*.time_emb_proj']")
# name, method, settings, kohya export
CASES = [
    ("loha", "loha", ["rank=4", "alpha=8"], True),
    ("loha-tucker", "loha", ["rank=2", "alpha=4", "effective_conv2d=true"], True),
    ("lokr", "lokr", ["rank=4", "alpha=8"], True),
    ("lokr-both-tucker", "lokr",
     ["rank=2", "alpha=4", "decompose_both=true", "effective_conv2d=true"], True),
    ("oft", "oft", ["blocks.size=4"], False),
]
LOHA_PARTS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
LOKR_PARTS = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}


def relative(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                 / np.linalg.norm(np.asarray(b, np.float64)))


def delta_error(weights: dict, base: dict, merged: dict) -> tuple[float, float, int]:
    """Against the merge's weight deltas: the relative L2 of all deltas together; the worst layer's
    (a layer that barely moves has a large one from float32 rounding alone: the merged file holds
    base + delta in float32); how many layers differ by more than TOLERANCE of their delta plus
    2 float32 epsilons of their weight (that rounding)."""
    names = [n for n in sorted(base) if not torch.equal(weights[n], base[n])
             or not torch.equal(merged[n], base[n])]
    got = {n: (weights[n].double() - base[n].double()).numpy() for n in names}
    want = {n: (merged[n].double() - base[n].double()).numpy() for n in names}
    total = relative(np.concatenate([got[n].ravel() for n in names]),
                     np.concatenate([want[n].ravel() for n in names]))
    worst = max((relative(got[n], want[n]) for n in names), default=0.0)
    eps = float(torch.finfo(torch.float32).eps)
    outside = sum(np.linalg.norm(got[n] - want[n]) > TOLERANCE * np.linalg.norm(want[n])
                  + 2 * eps * float(merged[n].double().norm()) for n in names)
    return total, worst, outside


def is_3x3(unet: UNet2DConditionModel, path: str) -> bool:
    module = unet.get_submodule(path)
    return isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)


def peft_folder_without(folder: Path, paths: set, into: Path) -> Path:
    """A copy of a peft folder with the layers `paths` removed from its config and weights."""
    into.mkdir()
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = [p for p in config["target_modules"] if p not in paths]
    (into / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model."
    tensors = {k: v for k, v in load_file(folder / "adapter_model.safetensors").items()
               if k.removeprefix(prefix).rsplit(".oft_R", 1)[0] not in paths}
    save_file(tensors, into / "adapter_model.safetensors")
    return into


def load_peft(unet_dir: Path, folder: Path) -> tuple[PeftModel, int]:
    """peft's documented load; checks that it uses every tensor of the file, unchanged."""
    model = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(unet_dir).eval(),
                                      str(folder))
    written = load_file(folder / "adapter_model.safetensors")
    used = get_peft_model_state_dict(model)
    if set(used) != set(written):
        differ = sorted(set(used) ^ set(written))
        raise SystemExit(f"{folder}: peft and the file differ in {len(differ)} keys: {differ[:4]}")
    for key, t in written.items():
        if not torch.equal(used[key], t):
            raise SystemExit(f"{folder}: peft holds another value for {key}")
    return model, len(written)


def reset_output(unet_dir, base, merged, paths, inputs) -> torch.Tensor:
    """The merged U-Net's output with the layers `paths` reset to the base weights."""
    state = dict(merged)
    for path in paths:
        state[f"{path}.weight"] = base[f"{path}.weight"]
    return output(unet_with(unet_dir, state), inputs)


def check_peft(name, folder, unet_dir, inputs, base, merged, merged_out):
    model, keys = load_peft(unet_dir, folder)
    note = ""
    if name == "oft":
        unet = UNet2DConditionModel.from_pretrained(unet_dir)
        skipped = {p for p in json.loads((folder / "adapter_config.json").read_text())
                   ["target_modules"] if is_3x3(unet, p)}
        partial = peft_folder_without(folder, skipped, folder.parent / "adapter-peft-no3x3")
        unmerged = relative(output(load_peft(unet_dir, partial)[0], inputs).numpy(),
                            reset_output(unet_dir, base, merged, skipped, inputs).numpy())
        note = f" (without its {len(skipped)} 3x3 convolutions)"
    else:
        unmerged = relative(output(model, inputs).numpy(), merged_out.numpy())
    merged_unet = model.merge_and_unload()
    total, worst, outside = delta_error(merged_unet.state_dict(), base, merged)
    merged_error = relative(output(merged_unet, inputs).numpy(), merged_out.numpy())
    print(f"  peft: {keys} keys, all used; unmerged output{note} {unmerged:.2e}; "
          f"merge_and_unload: weight deltas {total:.2e} (worst layer {worst:.2e}, "
          f"{outside} outside the bound), output {merged_error:.2e}")
    return [unmerged, total, merged_error], outside


def unet_with(unet_dir: Path, state: dict) -> UNet2DConditionModel:
    unet = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    unet.load_state_dict(state)
    return unet


def tucker(t, b, a):
    return np.einsum("ijkl,jr,ip->prkl", t, b, a)


def lycoris_delta(parts: dict, shape) -> np.ndarray:
    """A layer's weight delta from its LyCORIS tensors, as ComfyUI/A1111 compute it."""
    p = {k: v.double().numpy() for k, v in parts.items()}
    alpha = float(p["alpha"])
    if "hada_w1_a" in p:
        if "hada_t1" in p:
            m1 = tucker(p["hada_t1"], p["hada_w1_b"], p["hada_w1_a"])
            m2 = tucker(p["hada_t2"], p["hada_w2_b"], p["hada_w2_a"])
        else:
            m1, m2 = p["hada_w1_a"] @ p["hada_w1_b"], p["hada_w2_a"] @ p["hada_w2_b"]
        return (m1 * m2 * (alpha / p["hada_w1_b"].shape[0])).reshape(shape)
    rank = None
    w1 = p.get("lokr_w1")
    if w1 is None:
        rank, w1 = p["lokr_w1_b"].shape[0], p["lokr_w1_a"] @ p["lokr_w1_b"]
    w2 = p.get("lokr_w2")
    if w2 is None:
        rank = p["lokr_w2_b"].shape[0]
        w2 = (tucker(p["lokr_t2"], p["lokr_w2_b"], p["lokr_w2_a"]) if "lokr_t2" in p
              else p["lokr_w2_a"] @ p["lokr_w2_b"])
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    scale = alpha / rank if rank is not None else 1.0
    return (np.kron(w1, w2) * scale).reshape(shape)


def kohya_layers(file: Path, unet: UNet2DConditionModel, family: set) -> dict:
    """The file's tensors by diffusers path; checks its key layout."""
    paths = {"lora_unet_" + n.replace(".", "_"): n for n, m in unet.named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    layers: dict = {}
    for key, t in load_file(file).items():
        stem, _, part = key.partition(".")
        if stem not in paths:
            raise SystemExit(f"{file.name}: `{stem}` is no lora_unet_<path> of a U-Net layer")
        if part not in family | {"alpha"}:
            raise SystemExit(f"{file.name}: `{key}`: `{part}` is not a LyCORIS part of this method")
        layers.setdefault(paths[stem], {})[part] = t
    missing = [p for p, parts in layers.items() if "alpha" not in parts]
    if missing:
        raise SystemExit(f"{file.name}: no alpha for {missing[:3]}")
    return layers


def check_kohya(file, method, unet_dir, inputs, base, merged, merged_out):
    unet = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    layers = kohya_layers(file, unet, LOHA_PARTS if method == "loha" else LOKR_PARTS)
    rebuilt = dict(base)
    for path, parts in layers.items():
        weight = base[f"{path}.weight"]
        rebuilt[f"{path}.weight"] = weight + torch.from_numpy(
            lycoris_delta(parts, tuple(weight.shape))).to(weight.dtype)
    total, worst, outside = delta_error(rebuilt, base, merged)
    out_error = relative(output(unet_with(unet_dir, rebuilt), inputs).numpy(), merged_out.numpy())
    counts: dict = {}
    for parts in layers.values():
        for part in parts:
            counts[part] = counts.get(part, 0) + 1
    print(f"  kohya: {sum(counts.values())} keys on {len(layers)} layers "
          f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}); ComfyUI formulas: "
          f"weight deltas {total:.2e} (worst layer {worst:.2e}, {outside} outside the bound), "
          f"output {out_error:.2e}")
    errors = [total, out_error]
    if method == "lokr":
        errors.append(check_diffusers_lokr(layers, unet_dir, inputs, base, merged))
    return errors, outside


def check_diffusers_lokr(layers, unet_dir, inputs, base, merged) -> float:
    """diffusers' LyCORIS LoKr loader on the Linear layers (its config inference reads factors as
    matrices: a convolution's 4-D lokr_w2 fails in _create_lokr_config)."""
    unet = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    linear = {p for p in layers if isinstance(unet.get_submodule(p), torch.nn.Linear)}
    renamed = {f"diffusion_model.{path}.{part}": t
               for path in sorted(linear) for part, t in layers[path].items()}
    state = ZImageLoraLoaderMixin.lora_state_dict(dict(renamed))
    unet.load_lora_adapter(state, prefix="transformer", adapter_name="kohya")
    reference = reset_output(unet_dir, base, merged, set(layers) - linear, inputs)
    error = relative(output(unet, inputs).numpy(), reference.numpy())
    print(f"  diffusers' LyCORIS LoKr loader, on the {len(linear)} Linear layers (keys renamed to "
          f"diffusers paths): {len(renamed)} keys, {len(state)} after its alpha baking; "
          f"output {error:.2e}")
    return error


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="difftune-lycoris-exports-"))
    model = work / "model"
    run(args.bin, "init-tiny", "--out", str(model))
    image_folder(work / "data")
    unet_dir = model / "unet"
    config = UNet2DConditionModel.load_config(unet_dir)
    side = config["sample_size"]
    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 4, side, side, generator=gen), torch.tensor([10, 700]),
              torch.randn(2, 77, config["cross_attention_dim"], generator=gen))
    base = load_file(unet_dir / "diffusion_pytorch_model.safetensors")
    base_out = output(unet_with(unet_dir, base), inputs)
    worst, outside = 0.0, 0
    for name, method, settings, kohya in CASES:
        run_dir = work / name
        exports = '["peft", "kohya"]' if kohya else '["peft"]'
        sets = [a for s in settings for a in ("--set", s)]
        run(args.bin, "train", "--method", method, "--model", str(model),
            "--data", str(work / "data"), "--out", str(run_dir), "--steps", "5", "--lr", "1e-2",
            "--batch", "2", "--set", 'device="cpu"', "--set", "resolution=64",
            "--set", "gradient_accumulation_steps=1", "--set", f"targets={TARGETS}",
            "--set", f"export={exports}", *sets)
        merged_file = work / f"{name}-merged.safetensors"
        run(args.bin, "merge", "--model", str(model),
            "--adapter", str(run_dir / "adapter.safetensors"), "--out", str(merged_file))
        merged = load_file(merged_file)
        merged_out = output(unet_with(unet_dir, merged), inputs)
        print(f"{name} ({' '.join(settings)}): the adapter moves the output by "
              f"{relative(merged_out.numpy(), base_out.numpy()):.2e}")
        errors, out = check_peft(name, run_dir / "adapter-peft", unet_dir, inputs, base, merged,
                                 merged_out)
        if kohya:
            more, more_out = check_kohya(run_dir / "adapter-kohya.safetensors", method, unet_dir,
                                         inputs, base, merged, merged_out)
            errors, out = errors + more, out + more_out
        worst, outside = max(worst, *errors), outside + out
    shutil.rmtree(work)
    print(f"worst relative L2 error {worst:.2e} (tolerance {TOLERANCE:.0e}); "
          f"{outside} layers outside the per-layer bound")
    if worst > TOLERANCE or outside:
        raise SystemExit(f"an export differs from difftune's merge: {worst:.3e}, {outside} layers")


if __name__ == "__main__":
    main()
