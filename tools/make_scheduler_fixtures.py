"""Builds the scheduler parity fixtures (tests/fixtures/schedulers/) from diffusers 0.42.1.

Each sampling case runs a diffusers scheduler for a few steps the way StableDiffusionPipeline
does (init_noise_sigma, scale_model_input, step), with a "model" that is a fixed deterministic
function of its input and timestep, and records the timesteps, every model input and every
step's output. tests/scheduler_parity.rs replays the same loop with difftune's schedulers.
Also recorded: timestep (and sigma) tables for many step counts and spacings, alphas_cumprod
for each beta schedule, and the training-side add_noise / get_velocity / compute_snr.

Usage: source tools/setup.sh && python tools/make_scheduler_fixtures.py
"""

import json
import math
import os

import diffusers
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.training_utils import compute_snr
from safetensors.torch import save_file

assert diffusers.__version__ == "0.42.1", diffusers.__version__
assert torch.__version__.startswith("2.11.0"), torch.__version__

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "schedulers")

# CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json, verbatim.
SD_V1_4 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.7.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

CLASSES = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
}

# name, scheduler, config overrides on top of SD v1.4's, steps, seed for ancestral noise.
CASES = [
    ("ddim_sd", "ddim", {}, 10, None),
    ("ddim_sd_v", "ddim", {"prediction_type": "v_prediction"}, 10, None),
    (
        "ddim_linear_trailing_clip",
        "ddim",
        {
            "beta_schedule": "linear",
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "timestep_spacing": "trailing",
            "clip_sample": True,
            "set_alpha_to_one": True,
        },
        10,
        None,
    ),
    ("pndm_sd", "pndm", {}, 10, None),
    ("pndm_sd_v", "pndm", {"prediction_type": "v_prediction"}, 10, None),
    ("euler_sd", "euler", {}, 10, None),
    ("euler_sd_v", "euler", {"prediction_type": "v_prediction"}, 10, None),
    ("euler_leading_sigma_min", "euler", {"timestep_spacing": "leading", "final_sigmas_type": "sigma_min"}, 10, None),
    ("euler_ancestral_sd", "euler_ancestral", {}, 10, 1234),
    ("euler_ancestral_sd_v", "euler_ancestral", {"prediction_type": "v_prediction"}, 10, 99),
    ("dpmpp_sd", "dpmsolver++", {}, 10, None),
    ("dpmpp_sd_v", "dpmsolver++", {"prediction_type": "v_prediction"}, 10, None),
    ("dpmpp_sd_20", "dpmsolver++", {}, 20, None),
    ("dpmpp_sd_heun", "dpmsolver++", {"solver_type": "heun"}, 10, None),
    ("dpmpp_sd_order1", "dpmsolver++", {"solver_order": 1}, 10, None),
    (
        "dpmpp_linear_trailing_sigma_min",
        "dpmsolver++",
        {
            "beta_schedule": "linear",
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "timestep_spacing": "trailing",
            "final_sigmas_type": "sigma_min",
        },
        10,
        None,
    ),
]

# The other schedulers' scale_model_input is the identity.
SCALES_MODEL_INPUT = ("euler", "euler_ancestral")
SHAPE = (2, 4, 8, 8)
TABLE_STEPS = [1, 2, 3, 4, 6, 7, 10, 25, 50, 100, 333]


def make(kind, overrides):
    config = {**SD_V1_4, **overrides}
    return CLASSES[kind].from_config(config)


def model(pattern, x, t):
    """The stand-in for the U-Net: a fixed function of its input, the timestep and a fixed pattern,
    crudely denoiser-like (mostly "the input is noise" at high t) so samples stay O(1)."""
    t = float(t)
    return 0.95 * math.sqrt(t / 1000.0) * x + 0.3 * math.cos(t / 300.0) * pattern


def main():
    os.makedirs(OUT, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    pattern = torch.randn(SHAPE, generator=gen)
    initial_noise = torch.randn(SHAPE, generator=gen)
    tensors = {"model_pattern": pattern, "initial_noise": initial_noise}
    cases = []

    for name, kind, overrides, steps, seed in CASES:
        sched = make(kind, overrides)
        sched.set_timesteps(steps)
        tensors[f"{name}.timesteps"] = sched.timesteps.clone()
        tensors[f"{name}.init_noise_sigma"] = torch.tensor([float(sched.init_noise_sigma)], dtype=torch.float64)
        x = initial_noise * sched.init_noise_sigma
        if seed is not None:
            torch.manual_seed(seed)
        for i, t in enumerate(sched.timesteps):
            model_input = sched.scale_model_input(x, t)
            x = sched.step(model(pattern, model_input, t), t, x).prev_sample
            if kind in SCALES_MODEL_INPUT:
                tensors[f"{name}.model_input.{i}"] = model_input.clone()
            tensors[f"{name}.prev_sample.{i}"] = x.contiguous()
        cases.append({"name": name, "scheduler": kind, "config": overrides, "steps": steps, "seed": seed})

    tables = []
    for kind in CLASSES:
        for spacing in ["leading", "trailing", "linspace"]:
            for steps in TABLE_STEPS:
                sched = make(kind, {"timestep_spacing": spacing})
                sched.set_timesteps(steps)
                key = f"table.{kind}.{spacing}.{steps}"
                tensors[f"{key}.timesteps"] = sched.timesteps.clone()
                if kind in ("euler", "euler_ancestral", "dpmsolver++"):
                    tensors[f"{key}.sigmas"] = sched.sigmas.clone()
                tables.append({"key": key, "scheduler": kind, "config": {"timestep_spacing": spacing}, "steps": steps})

    schedules = {
        "sd": {},
        "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        "cosine": {"beta_schedule": "squaredcos_cap_v2"},
        "trained": {"num_train_timesteps": 10, "trained_betas": [0.01 * (i + 1) for i in range(10)]},
    }
    for label, overrides in schedules.items():
        tensors[f"alphas_cumprod.{label}"] = DDPMScheduler.from_config({**SD_V1_4, **overrides}).alphas_cumprod

    ddpm = DDPMScheduler.from_config(SD_V1_4)
    x0 = torch.randn((4, 4, 8, 8), generator=gen)
    noise = torch.randn((4, 4, 8, 8), generator=gen)
    timesteps = torch.tensor([0, 1, 500, 999], dtype=torch.int64)
    tensors.update(
        {
            "training.x0": x0,
            "training.noise": noise,
            "training.timesteps": timesteps,
            "training.noisy": ddpm.add_noise(x0, noise, timesteps),
            "training.velocity": ddpm.get_velocity(x0, noise, timesteps),
            "training.snr": compute_snr(ddpm, timesteps),
        }
    )

    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "schedulers.safetensors"))
    index = {
        "base_config": SD_V1_4,
        "cases": cases,
        "tables": tables,
        "schedules": schedules,
    }
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    print(f"wrote {len(tensors)} tensors, {len(cases)} sampling cases, {len(tables)} timestep tables")


if __name__ == "__main__":
    main()
