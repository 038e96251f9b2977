"""Writes a diffusers model folder with random weights from config files (unet_config.json,
vae_config.json, text_encoder_config.json, scheduler_config.json, e.g. the SD v1.4 configs), with
the tokenizer of another model folder (e.g. one `difftune init-tiny` wrote): the full-size peer
run of bench/peer/e2e.sh needs real-size models and nothing can be downloaded.

Usage: python bench/peer/random_model.py CONFIG_DIR TOKENIZER_MODEL_DIR OUT
"""
import json
import os
import shutil
import sys

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel


def main():
    config_dir, tokenizer_model, out = sys.argv[1:4]
    load = lambda name: json.load(open(os.path.join(config_dir, name)))
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(load("unet_config.json")).save_pretrained(os.path.join(out, "unet"))
    AutoencoderKL.from_config(load("vae_config.json")).save_pretrained(os.path.join(out, "vae"))
    text = {k: v for k, v in load("text_encoder_config.json").items() if not k.startswith("_")}
    CLIPTextModel(CLIPTextConfig(**text)).save_pretrained(os.path.join(out, "text_encoder"))
    DDPMScheduler.from_config(load("scheduler_config.json")).save_pretrained(os.path.join(out, "scheduler"))
    shutil.copytree(os.path.join(tokenizer_model, "tokenizer"), os.path.join(out, "tokenizer"))
    shutil.copy(os.path.join(tokenizer_model, "model_index.json"), os.path.join(out, "model_index.json"))
    print(f"wrote a random-weight model to {out}")


if __name__ == "__main__":
    main()
