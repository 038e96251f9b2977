"""Builds the EMA fixture under tests/fixtures/ema/, for tests/ema.rs: diffusers' EMAModel
(training_utils, the `--use_ema` of its example scripts) followed over a seeded trajectory of two
trained tensors, with and without its warm-up schedule.

Outputs (tests/fixtures/ema/trajectory.safetensors):
  param.{a,b}.{k}            the trained tensors after optimizer step k (k = 0: initial values)
  {case}.shadow.{a,b}.{k}    EMAModel's shadow after its k-th step()
  {case}.decay               the decay EMAModel used at each step (float64)
Cases: plain   decay=0.99, update_after_step=2
       warmup  decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=2/3

Usage: source tools/setup.sh && python tools/make_ema_fixtures.py
Pinned: diffusers 0.42.1, torch 2.11.0 (tools/requirements.txt).
"""
import pathlib

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ema"
STEPS = 12
CASES = {
    "plain": dict(decay=0.99, update_after_step=2),
    "warmup": dict(decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3),
}


def main() -> None:
    torch.manual_seed(0)
    params = {"a": torch.nn.Parameter(torch.randn(3, 4)), "b": torch.nn.Parameter(torch.randn(5))}
    trajectory = [{k: p.detach().clone() for k, p in params.items()}]
    for _ in range(STEPS):
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn_like(p) * 0.1)
        trajectory.append({k: p.detach().clone() for k, p in params.items()})

    out = {}
    for k, values in enumerate(trajectory):
        for name, value in values.items():
            out[f"param.{name}.{k}"] = value
    for case, settings in CASES.items():
        live = {n: torch.nn.Parameter(v.clone()) for n, v in trajectory[0].items()}
        ema = EMAModel(list(live.values()), **settings)
        decays = []
        for k in range(1, STEPS + 1):
            with torch.no_grad():
                for name, p in live.items():
                    p.copy_(trajectory[k][name])
            ema.step(list(live.values()))
            decays.append(ema.cur_decay_value)
            for name, shadow in zip(live, ema.shadow_params):
                out[f"{case}.shadow.{name}.{k}"] = shadow.detach().clone()
        out[f"{case}.decay"] = torch.tensor(decays, dtype=torch.float64)
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(out, OUT / "trajectory.safetensors")


if __name__ == "__main__":
    main()
