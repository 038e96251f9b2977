"""Fixtures for single-file (LDM layout) checkpoints, the restricted torch-pickle reader and the
shipped CLIP vocabulary. Pinned versions: tools/requirements.txt (diffusers 0.42.1, transformers,
torch). Offline.

1. difftune writes the tiny test model (tests/fixtures/pipeline/model) as one LDM-layout file
   (`difftune convert`, fp32). diffusers' own LDM -> diffusers conversion (the wheel's
   single_file_utils, through `StableDiffusionPipeline.from_single_file` with the folder as local
   config, offline) must give back every tensor of the folder exactly, and the same images; the
   file's manifest (name, dtype, shape, sha256 of the bytes) is written so the Rust tests check that
   difftune still writes exactly the file diffusers accepted. The same check runs on an fp16 copy.
2. Small torch.save files (zip and legacy formats: f32/f16/bf16/i64, a transposed view, a view at an
   offset into a shared storage, a Lightning-style nesting) with the expected tensors, and a .ckpt
   whose pickle calls os.system.
3. transformers' CLIPTokenizer over the vocabulary built from difftune's shipped merges: the ids of
   a few prompts.

Usage: python tools/make_single_file_fixtures.py [--difftune target/debug/difftune]
"""

import argparse
import collections
import gzip
import hashlib
import io
import json
import os
import pickle
import subprocess
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests/fixtures/pipeline/model"
OUT = ROOT / "tests/fixtures/single_file"
MERGES = ROOT / "assets/clip/bpe_simple_vocab_16e6.merges.txt.gz"
PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT!!",
    "an astronaut riding a horse on mars, highly detailed, 8k",
    "café déjà vu — naïve résumé",
    "it's the dog's toy; they'll've gone",
    "  multiple   spaces\tand\ttabs\nnewline  ",
    "<|startoftext|> special tokens <|endoftext|> inline",
    "emoji 🐱🚀 and CJK 猫の写真",
    "numbers 1234567890 and 3.14159",
    "hyphen-ated words and under_scores",
    "a " * 100,
]


def manifest(path):
    out = {}
    for name, t in sorted(load_file(str(path)).items()):
        data = t.contiguous().view(torch.uint8).numpy().tobytes()
        out[name] = [str(t.dtype).replace("torch.", ""), list(t.shape), hashlib.sha256(data).hexdigest()]
    return out


def folder_state_dicts():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, local_files_only=True)
    return pipe, {
        "unet": pipe.unet.state_dict(),
        "vae": pipe.vae.state_dict(),
        "text_encoder": pipe.text_encoder.state_dict(),
    }


def check_diffusers_reads(path, reference, dtype):
    """diffusers' from_single_file (local config, offline) gives every tensor of the folder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(MODEL), local_files_only=True, safety_checker=None, torch_dtype=torch.float32
    )
    worst = 0.0
    for component, ref in reference.items():
        got = getattr(pipe, component).state_dict()
        missing = set(ref) ^ set(got)
        missing = {k for k in missing if not k.endswith("position_ids")}
        assert not missing, f"{component}: names differ: {sorted(missing)[:8]}"
        for k, v in ref.items():
            if k.endswith("position_ids"):
                continue
            expected = v.to(dtype).float()
            diff = (got[k].float() - expected).abs().max().item()
            assert diff == 0.0, f"{component}.{k}: max abs diff {diff}"
            worst = max(worst, diff)
    return pipe


def images(pipe):
    generator = torch.Generator().manual_seed(0)
    out = pipe(
        ["a photo of a cat"], num_inference_steps=3, height=64, width=64, generator=generator, output_type="np"
    )
    return out.images


def single_file_fixtures(difftune):
    pipe, reference = folder_state_dicts()
    with tempfile.TemporaryDirectory() as tmp:
        ldm = Path(tmp) / "tiny.safetensors"
        subprocess.run([difftune, "convert", "--model", str(MODEL), "--out", str(ldm)], check=True)
        from_file = check_diffusers_reads(ldm, reference, torch.float32)
        a, b = images(pipe), images(from_file)
        image_diff = float(np.abs(a - b).max())
        assert image_diff == 0.0, f"images differ by {image_diff}"
        half = Path(tmp) / "tiny_fp16.safetensors"
        subprocess.run(
            [difftune, "convert", "--model", str(MODEL), "--out", str(half), "--precision", "fp16"], check=True
        )
        check_diffusers_reads(half, reference, torch.float16)
        fixture = {"fp32": manifest(ldm), "fp16": manifest(half)}
    with open(OUT / "tiny_ldm_manifest.json", "w") as f:
        json.dump(fixture, f, indent=0, sort_keys=True)
    print(f"diffusers reads difftune's single files exactly; image max abs diff {image_diff}")


def torch_file_fixtures():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    shared = torch.arange(20, dtype=torch.float32)
    state = collections.OrderedDict(
        [
            ("f32", base),
            ("f16", torch.randn(3, 2, generator=g).half()),
            ("bf16", torch.randn(5, generator=g).bfloat16()),
            ("i64", torch.arange(7, dtype=torch.int64)),
            ("transposed", base.t()),
            ("shared_a", shared[2:8].view(2, 3)),
            ("shared_b", shared[10:14]),
            ("scalar", torch.tensor(3.5)),
            ("empty", torch.zeros(0, 3)),
        ]
    )
    checkpoint = {"state_dict": state, "global_step": 110000, "epoch": 3, "name": "tiny"}
    torch.save(checkpoint, OUT / "torch_zip.ckpt")
    torch.save(checkpoint, OUT / "torch_legacy.ckpt", _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in state.items()}, OUT / "torch_expected.safetensors")

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch difftune-pickle-was-executed",))

    # A torch zip archive whose data.pkl runs a shell command when unpickled by Python.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"state_dict": Exploit()}, protocol=2))
        z.writestr("archive/version", "3\n")
    (OUT / "malicious.ckpt").write_bytes(buf.getvalue())


def tokenizer_fixture():
    from transformers import CLIPTokenizer

    merges = gzip.open(MERGES).read().decode("utf-8").split("\n")[1:-1]
    assert len(merges) == 48894
    # The vocabulary as CLIP builds it from its merges (GPT-2's byte-to-unicode table first).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    symbols = [chr(c) for c in cs]
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/vocab.json", "w") as f:
            json.dump({t: i for i, t in enumerate(vocab)}, f)
        with open(f"{tmp}/merges.txt", "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt", pad_token="<|endoftext|>")
        tok.model_max_length = 77
        ids = {p: tok(p, padding="max_length", max_length=77, truncation=True).input_ids for p in PROMPTS}
        vocab_sha = hashlib.sha256(open(f"{tmp}/vocab.json", "rb").read()).hexdigest()
    with open(OUT / "clip_vocab_ids.json", "w") as f:
        json.dump({"vocab_size": len(vocab), "ids": ids}, f, ensure_ascii=False)
    print(f"CLIP vocab: {len(vocab)} tokens, vocab.json sha256 {vocab_sha}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--difftune", default=str(ROOT / "target/debug/difftune"))
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch_file_fixtures()
    tokenizer_fixture()
    single_file_fixtures(args.difftune)


if __name__ == "__main__":
    main()
