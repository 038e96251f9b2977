"""Builds the SDXL parity fixtures under tests/fixtures/sdxl/ (pinned: tools/requirements.txt;
rerun to reproduce), for tests/sdxl.rs.

1. model/: a tiny random-weight diffusers StableDiffusionXLPipeline saved with save_pretrained:
   a U-Net of SDXL's layout (DownBlock2D then two CrossAttnDownBlock2D levels, two layers per
   block, transformer_layers_per_block [1, 1, 2], per-level heads, linear projections, the
   `text_time` added embedding), the VAE of tests/fixtures/pipeline (8x, force_upcast), a
   CLIPTextModel and a CLIPTextModelWithProjection of different widths (32 + 48 = 80-wide
   context) with SDXL's legacy `eos_token_id` 2 on the second, the fixture CLIP tokenizer twice
   (tokenizer_2 pads with `!` as SDXL's does), SDXL's Euler scheduler config, and
   `force_zeros_for_empty_prompt` (the pipeline's default, true). No watermarker.
2. expected.safetensors:
     tokens.{1,2}          both tokenizers' ids of TOKEN_PROMPTS
     te1.penultimate       text_encoder hidden_states[-2] of tokens.1
     te1.pooled            text_encoder pooler_output (no projection)
     te2.penultimate       text_encoder_2 hidden_states[-2] of tokens.2
     te2.last              text_encoder_2 last_hidden_state
     te2.text_embeds       text_encoder_2 pooled projection
     unet.*                the U-Net on a non-square latent with added conditions (two samples
                           with different size/crop time ids)
     <case>.latents/.images  the pipeline's `output_type="np"` images ([n, 3, H, W]) at 96x64
                           (width x height) from the given initial latents:
       euler_cfg              4 Euler steps, guidance 5, two prompts, no negative prompt
                              (force_zeros_for_empty_prompt: zero unconditional embeddings)
       ddim_cfg_negative      3 DDIM steps, guidance 7.5, a negative prompt
       dpmpp_no_cfg           4 DPM-Solver++ steps, guidance 1 (no unconditional pass)
       dpmpp_cfg_empty        4 DPM-Solver++ steps, guidance 6, force_zeros_for_empty_prompt
                              off: the empty prompt is encoded

3. single_file_manifest.json: difftune writes model/ as one LDM-layout file (`difftune convert`,
   fp32; `conditioner.embedders.0.transformer.*`, `conditioner.embedders.1.model.*` with fused
   in_proj and the transposed text_projection, the U-Net's label_emb). diffusers' own conversion
   (`StableDiffusionXLPipeline.from_single_file` with model/ as local config, offline) must give
   back every tensor of the folder exactly, and the same images; the file's manifest (name, dtype,
   shape, sha256 of the bytes) lets the Rust tests check that difftune still writes that file.

4. lora/: a peft LoRA on the U-Net (rank 4, the resnets' conv1 at rank 2, alpha 8, every LoRA
   weight random) over layers of every kind the LDM names differ for: attn2 to_q/to_k, attn1
   to_out.0, ff.net.0.proj, proj_in, conv1, conv_shortcut, time_emb_proj, the down- and
   upsamplers' convs, conv_in, time_embedding.linear_2 and add_embedding.linear_1:
     peft/                      peft's save_pretrained
     output.safetensors         the adapted U-Net on the unet.* inputs of expected.safetensors
     kohya.safetensors          the LoRA as sd-scripts writes SDXL LoRAs: `lora_unet_` + the LDM
                                name (diffusers' own single-file conversion tells it) with `_`,
                                lora_down/lora_up/alpha
     diffusers/pytorch_lora_weights.safetensors  `unet.<path>.lora_A/B.weight`, alpha / rank
                                folded into B
   Both files are loaded with StableDiffusionXLPipeline.load_lora_weights: every key must be used
   (no unconverted, unexpected or missing keys: one LoRA module per layer) and the U-Net must give
   peft's output. tests/sdxl.rs checks that difftune writes these files and reads them back.

Usage: source tools/setup.sh && python tools/make_sdxl_fixtures.py [--difftune target/debug/difftune]
(build difftune first: `cargo build`).
"""

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile

import diffusers
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

EXPECTED = {"torch": "2.11.0", "diffusers": "0.42.1", "transformers": "5.24.0"}
HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")
OUT = os.path.join(FIXTURES, "sdxl")
MODEL = os.path.join(OUT, "model")
SEED = 20251207
PROMPTS = ["a photo of an astronaut riding a horse", "a cute corgi dog, oil painting"]
NEGATIVE = "blurry, low quality"
TOKEN_PROMPTS = PROMPTS + ["", NEGATIVE, "a " * 90]
HEIGHT, WIDTH = 64, 96

UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=[8, 16, 16],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    layers_per_block=2,
    transformer_layers_per_block=[1, 1, 2],
    attention_head_dim=[2, 2, 4],
    cross_attention_dim=80,
    norm_num_groups=4,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    # text_encoder_2's projection (24) and six time ids embedded at 8 each.
    projection_class_embeddings_input_dim=24 + 6 * 8,
)
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
    scaling_factor=0.13025,
    force_upcast=True,
)
# SDXL base 1.0's scheduler/scheduler_config.json.
SCHEDULER = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    timestep_spacing="leading",
    trained_betas=None,
    use_karras_sigmas=False,
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
    """Every parameter random (norm scales near 1), so the outputs depend on all of them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)


def tokenizer_folders():
    """The fixture CLIP tokenizer as tokenizer/ and, padding with `!`, as tokenizer_2/."""
    source = os.path.join(FIXTURES, "clip", "tokenizer")
    folders = {}
    for name, pad in [("tokenizer", None), ("tokenizer_2", "!")]:
        dest = os.path.join(OUT, "sources", name)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source, dest)
        if pad is not None:
            for file in ["special_tokens_map.json", "tokenizer_config.json"]:
                path = os.path.join(dest, file)
                with open(path) as f:
                    config = json.load(f)
                config["pad_token"] = pad
                with open(path, "w") as f:
                    json.dump(config, f, indent=2)
        folders[name] = dest
    return folders


def text_config(tokenizer, hidden, layers, act, eos, projection=None):
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2 + 5,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=1,
        projection_dim=projection if projection else hidden,
    )


def build_pipeline(folders):
    gen = torch.Generator().manual_seed(SEED)
    unet = UNet2DConditionModel(**UNET).eval()
    randomise_(unet, gen)
    vae = AutoencoderKL(**VAE).eval()
    randomise_(vae, gen)
    tokenizer = CLIPTokenizer.from_pretrained(folders["tokenizer"])
    tokenizer_2 = CLIPTokenizer.from_pretrained(folders["tokenizer_2"])
    text_encoder = CLIPTextModel(text_config(tokenizer, 32, 2, "quick_gelu", tokenizer.eos_token_id)).eval()
    randomise_(text_encoder, gen)
    # SDXL's text_encoder_2 config carries the legacy eos_token_id 2 (pooling at the largest id).
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, 48, 3, "gelu", 2, projection=24)).eval()
    randomise_(text_encoder_2, gen)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def save_model(pipe, folders):
    shutil.rmtree(MODEL, ignore_errors=True)
    pipe.save_pretrained(MODEL, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; difftune reads the vocab.json/merges.txt layout of
    # the SD checkpoints on the hub, so the folders get the source files.
    for name, source in folders.items():
        shutil.rmtree(os.path.join(MODEL, name))
        shutil.copytree(source, os.path.join(MODEL, name))
    shutil.rmtree(os.path.join(OUT, "sources"))


def encoder_outputs(pipe):
    out = {}
    for i, tokenizer in [(1, pipe.tokenizer), (2, pipe.tokenizer_2)]:
        ids = tokenizer(TOKEN_PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out[f"tokens.{i}"] = ids.input_ids
    with torch.no_grad():
        first = pipe.text_encoder(out["tokens.1"], output_hidden_states=True)
        second = pipe.text_encoder_2(out["tokens.2"], output_hidden_states=True)
    out["te1.penultimate"] = first.hidden_states[-2]
    out["te1.pooled"] = first.pooler_output
    out["te2.penultimate"] = second.hidden_states[-2]
    out["te2.last"] = second.last_hidden_state
    out["te2.text_embeds"] = second.text_embeds
    return out


def unet_outputs(pipe, gen):
    sample = torch.randn((2, 4, 8, 12), generator=gen)
    timesteps = torch.tensor([999.0, 10.0])
    context = torch.randn((2, 77, 80), generator=gen)
    text_embeds = torch.randn((2, 24), generator=gen)
    time_ids = torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0], [1024.0, 768.0, 16.0, 32.0, 1024.0, 1024.0]])
    with torch.no_grad():
        output = pipe.unet(
            sample,
            timesteps,
            encoder_hidden_states=context,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
        ).sample
    return {
        "unet.sample": sample,
        "unet.timesteps": timesteps,
        "unet.context": context,
        "unet.text_embeds": text_embeds,
        "unet.time_ids": time_ids,
        "unet.output": output,
    }


def run(pipe, scheduler_cls, steps, guidance, prompts, negative, gen):
    pipe.scheduler = scheduler_cls.from_config(SCHEDULER)
    latents = torch.randn((len(prompts), 4, HEIGHT // 8, WIDTH // 8), generator=gen)
    images = pipe(
        prompt=prompts,
        negative_prompt=None if negative is None else [negative] * len(prompts),
        latents=latents,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="np",
    ).images
    return latents, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


CASES = {
    "euler_cfg": (EulerDiscreteScheduler, 4, 5.0, PROMPTS, None, True),
    "ddim_cfg_negative": (DDIMScheduler, 3, 7.5, PROMPTS, NEGATIVE, True),
    "dpmpp_no_cfg": (DPMSolverMultistepScheduler, 4, 1.0, PROMPTS[:1], None, True),
    "dpmpp_cfg_empty": (DPMSolverMultistepScheduler, 4, 6.0, PROMPTS[1:], None, False),
}


def manifest(path):
    out = {}
    for name, t in sorted(load_file(str(path)).items()):
        data = t.contiguous().view(torch.uint8).numpy().tobytes()
        out[name] = [str(t.dtype).replace("torch.", ""), list(t.shape), hashlib.sha256(data).hexdigest()]
    return out


COMPONENTS = ["unet", "vae", "text_encoder", "text_encoder_2"]


def images(pipe):
    pipe.scheduler = EulerDiscreteScheduler.from_config(SCHEDULER)
    generator = torch.Generator().manual_seed(0)
    out = pipe(["a photo of a cat"], num_inference_steps=3, height=HEIGHT, width=WIDTH, generator=generator, output_type="np")
    return out.images


def single_file_fixture(difftune, path):
    """diffusers reads difftune's SDXL single file at `path` as the folder, tensor for tensor."""
    folder = StableDiffusionXLPipeline.from_pretrained(MODEL, local_files_only=True, add_watermarker=False)
    subprocess.run([difftune, "convert", "--model", MODEL, "--out", path], check=True)
    from_file = StableDiffusionXLPipeline.from_single_file(
        path, config=MODEL, local_files_only=True, torch_dtype=torch.float32, add_watermarker=False
    )
    for component in COMPONENTS:
        ref = getattr(folder, component).state_dict()
        got = getattr(from_file, component).state_dict()
        differ = {k for k in set(ref) ^ set(got) if not k.endswith("position_ids")}
        assert not differ, f"{component}: names differ: {sorted(differ)[:8]}"
        for k, v in ref.items():
            if not k.endswith("position_ids"):
                assert torch.equal(got[k], v), f"{component}.{k} differs"
    image_diff = float(abs(images(folder) - images(from_file)).max())
    assert image_diff == 0.0, f"images differ by {image_diff}"
    with open(os.path.join(OUT, "single_file_manifest.json"), "w") as f:
        json.dump({"fp32": manifest(path)}, f, indent=0, sort_keys=True)
    print(f"diffusers reads difftune's SDXL single file exactly ({len(COMPONENTS)} components, images equal)")


LORA = dict(
    r=4,
    lora_alpha=8,
    rank_pattern={"conv1": 2},
    target_modules=[
        "attn2.to_q",
        "attn2.to_k",
        "attn1.to_out.0",
        "ff.net.0.proj",
        "proj_in",
        "conv1",
        "conv_shortcut",
        "time_emb_proj",
        "downsamplers.0.conv",
        "upsamplers.0.conv",
        "conv_in",
        "time_embedding.linear_2",
        "add_embedding.linear_1",
    ],
)


def ldm_names(single_file):
    """diffusers U-Net name -> LDM name, from diffusers' own conversion of tagged tensors."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    keys = sorted(k for k in load_file(single_file) if k.startswith("model.diffusion_model."))
    shapes = {k: v.shape for k, v in load_file(single_file).items()}
    tagged = {k: torch.full(shapes[k], float(i)) for i, k in enumerate(keys)}
    config = UNet2DConditionModel.load_config(os.path.join(MODEL, "unet"))
    converted = convert_ldm_unet_checkpoint(tagged, config)
    return {name: keys[int(t.flatten()[0])][len("model.diffusion_model.") :] for name, t in converted.items()}


def randomise_lora_(unet, gen):
    """peft starts B at zero (no effect); random A and B make the test meaningful."""
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)


def unet_io(unet, expected):
    with torch.no_grad():
        return unet(
            expected["unet.sample"],
            expected["unet.timesteps"],
            encoder_hidden_states=expected["unet.context"],
            added_cond_kwargs={"text_embeds": expected["unet.text_embeds"], "time_ids": expected["unet.time_ids"]},
        ).sample


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def diffusers_loads(path, layers, reference, expected):
    """StableDiffusionXLPipeline.load_lora_weights uses every key of `path` and gives `reference`."""
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL, local_files_only=True, add_watermarker=False)
    records = Records()
    for name in ["diffusers", "peft"]:
        logging.getLogger(name).addHandler(records)
    pipe.load_lora_weights(path)
    for name in ["diffusers", "peft"]:
        logging.getLogger(name).removeHandler(records)
    # A U-Net LoRA leaves the text encoders without keys, which diffusers mentions; anything else
    # about keys (unexpected, missing, not renamed) is a failure.
    complaints = [m for m in records.messages if "key" in m.lower() and "No LoRA keys associated" not in m]
    assert not complaints, complaints
    modules = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.unet.named_parameters() if ".lora_A." in n}
    assert modules == set(layers), sorted(set(layers) ^ modules)[:8]
    err = ((unet_io(pipe.unet, expected) - reference).norm() / reference.norm()).item()
    assert err < 1e-5, f"{path}: relative error {err}"
    return err


def lora_fixture(single_file, expected):
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    out = os.path.join(OUT, "lora")
    shutil.rmtree(out, ignore_errors=True)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(MODEL, "unet")).eval()
    model = get_peft_model(unet, LoraConfig(**LORA))
    randomise_lora_(unet, torch.Generator().manual_seed(SEED + 2))
    reference = unet_io(unet, expected)
    model.save_pretrained(os.path.join(out, "peft"))
    os.remove(os.path.join(out, "peft", "README.md"))  # peft's generated model card; not a fixture
    save_file({"output": reference.contiguous()}, os.path.join(out, "output.safetensors"))

    state = get_peft_model_state_dict(unet)
    layers = sorted(k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight"))
    ldm = ldm_names(single_file)
    kohya, diffusers_format = {}, {}
    for layer in layers:
        a, b = state[f"{layer}.lora_A.weight"], state[f"{layer}.lora_B.weight"]
        alpha = float(LORA["lora_alpha"])
        stem = "lora_unet_" + ldm[f"{layer}.weight"][: -len(".weight")].replace(".", "_")
        kohya[f"{stem}.lora_down.weight"] = a.contiguous()
        kohya[f"{stem}.lora_up.weight"] = b.contiguous()
        kohya[f"{stem}.alpha"] = torch.tensor(alpha)
        diffusers_format[f"unet.{layer}.lora_A.weight"] = a.contiguous()
        diffusers_format[f"unet.{layer}.lora_B.weight"] = (b * (alpha / a.shape[0])).contiguous()
    kohya_path = os.path.join(out, "kohya.safetensors")
    save_file(kohya, kohya_path)
    os.makedirs(os.path.join(out, "diffusers"))
    diffusers_path = os.path.join(out, "diffusers", "pytorch_lora_weights.safetensors")
    save_file(diffusers_format, diffusers_path, metadata={"format": "pt"})
    for path in [kohya_path, diffusers_path]:
        err = diffusers_loads(path, layers, reference, expected)
        print(f"{os.path.relpath(path, OUT)}: {len(layers)} layers, diffusers' output within {err:.1e} of peft's")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--difftune", default=os.path.join(HERE, "..", "target", "debug", "difftune"))
    args = parser.parse_args()
    check_versions()
    folders = tokenizer_folders()
    pipe = build_pipeline(folders)
    save_model(pipe, folders)
    gen = torch.Generator().manual_seed(SEED + 1)
    expected = encoder_outputs(pipe)
    expected.update(unet_outputs(pipe, gen))
    with torch.no_grad():
        for case, (cls, steps, guidance, prompts, negative, force_zeros) in CASES.items():
            pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
            latents, images = run(pipe, cls, steps, guidance, prompts, negative, gen)
            expected[f"{case}.latents"] = latents
            expected[f"{case}.images"] = images
            print(f"{case}: images {tuple(images.shape)} mean {images.mean():.4f} std {images.std():.4f}")
    pipe.register_to_config(force_zeros_for_empty_prompt=True)
    save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(OUT, "expected.safetensors"))
    print("tokens.2 of the empty prompt:", expected["tokens.2"][2, :4].tolist())
    with tempfile.TemporaryDirectory() as tmp:
        single_file = os.path.join(tmp, "tiny_sdxl.safetensors")
        single_file_fixture(args.difftune, single_file)
        lora_fixture(single_file, expected)


if __name__ == "__main__":
    main()
