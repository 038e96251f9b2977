"""The peer of `difftune bench`: the same training step in PyTorch with diffusers' U-Net.

For each method and batch size, after warm-up, the step difftune's trainer runs: DDPM noising of
random cached-latent-shaped inputs at random timesteps, the U-Net forward on a random 77-token
context, the epsilon MSE loss, backward, gradient-norm clipping at 1 and an AdamW step over the
method's parameters only; prints the same JSON as `difftune bench --json`. Peak memory is torch's
CUDA allocator peak, or on the CPU the process's peak resident memory (VmHWM, reset after warm-up).

Methods, placed as difftune places them by default:
  full     every U-Net weight
  lora     peft LoRA, rank 4, alpha 4, on attn2.to_q and attn2.to_k of every transformer block
  adapter  bottleneck MLP (width 49, GELU, residual) on each transformer block's feed-forward output
  prefix   10 learned key and value vectors per attn2, in the projected space, attended with a
           softmax of their own and added to the attention output (a custom attention processor)
  bitfit   the biases inside the transformer blocks

On CUDA: bf16 autocast, frozen weights in bf16 for the PEFT methods (fp32 for full fine-tuning),
SDPA attention, fused AdamW; `--compile` wraps the U-Net in torch.compile. `--channels-last` lays
the U-Net and its input out NHWC. `--profile DIR` runs one more step per method and batch under
torch.profiler and writes DIR/peer-<method>-b<batch>.json (a Chrome trace, as difftune's
`bench --profile`; bench/profile_summary.py summarises both). Every timed step's time is in the
JSON (`step_times_s`), for bench/run.sh's interleaved rounds.

Usage: python bench/peer/peer_bench.py --config-dir presets/configs/sd-v1-4 --methods all
         --batch 1,8 --resolution 512 [--device cuda] [--compile] --json
"""
import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock

METHODS = ["full", "adapter", "lora", "prefix", "bitfit"]  # difftune's order


class Adapter(torch.nn.Module):
    def __init__(self, dim: int, width: int):
        super().__init__()
        self.down = torch.nn.Linear(dim, width)
        self.up = torch.nn.Linear(width, dim)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(F.gelu(self.down(x)))


class PrefixProcessor(torch.nn.Module):
    """attn2 with learned key/value prefixes attended with a softmax of their own, the result added
    to the attention output (difftune's default `attention = "side"`): keys random, values zero, so
    the model starts exactly as the base."""

    def __init__(self, inner: int, length: int):
        super().__init__()
        self.key = torch.nn.Parameter(torch.randn(length, inner))
        self.value = torch.nn.Parameter(torch.zeros(length, inner))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        b, n, _ = hidden_states.shape
        heads = attn.heads
        q = attn.to_q(hidden_states)
        k = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        split = lambda t: t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2)
        q, k, v = split(q), split(k), split(v)
        out = F.scaled_dot_product_attention(q, k, v)
        pk = split(self.key.to(q.dtype).expand(b, -1, -1))
        pv = split(self.value.to(q.dtype).expand(b, -1, -1))
        out = out + F.scaled_dot_product_attention(q, pk, pv)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def apply_method(unet: UNet2DConditionModel, method: str) -> list:
    unet.requires_grad_(method == "full")
    if method == "full":
        return list(unet.parameters())
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    params = []
    if method == "lora":
        from peft import LoraConfig
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["attn2.to_q", "attn2.to_k"]))
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
    elif method == "adapter":
        for block in blocks:
            dim = block.norm3.normalized_shape[0]
            block.difftune_adapter = Adapter(dim, 49).to(unet.device)
            block.ff.register_forward_hook(
                lambda mod, inp, out, a=block.difftune_adapter: out + a(out))
            params += list(block.difftune_adapter.parameters())
    elif method == "prefix":
        for block in blocks:
            attn = block.attn2
            proc = PrefixProcessor(attn.inner_dim, 10).to(unet.device)
            attn.set_processor(proc)
            block.difftune_prefix = proc
            params += list(proc.parameters())
    elif method == "bitfit":
        for block in blocks:
            for name, p in block.named_parameters():
                if name.endswith("bias"):
                    p.requires_grad_(True)
                    params.append(p)
    else:
        raise SystemExit(f"unknown method {method}")
    return params


def reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), as difftune does.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def bench_one(args, method: str, batch: int) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = UNet2DConditionModel.load_config(os.path.join(args.config_dir, "unet_config.json"))
    unet = UNet2DConditionModel.from_config(config).to(device)
    cuda = device.type == "cuda"
    if cuda and method != "full":
        unet.to(torch.bfloat16)  # frozen base in bf16, as diffusers' PEFT training scripts do
    params = apply_method(unet, method)
    for p in params:
        p.data = p.data.float()
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, fused=cuda)
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    model = torch.compile(unet) if args.compile else unet
    latent = args.resolution // 8
    x = torch.randn(batch, 4, latent, latent, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.randn(batch, 77, config["cross_attention_dim"], device=device)
    scheduler = DDPMScheduler.from_config(
        DDPMScheduler.load_config(os.path.join(args.config_dir, "scheduler_config.json")))

    def step():
        noise = torch.randn_like(x)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        noisy = scheduler.add_noise(x, noise, t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            pred = model(noisy, t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            step()
        prof.export_chrome_trace(os.path.join(args.profile, f"peer-{method}-b{batch}.json"))
    return dict(method=method, batch=batch, resolution=args.resolution, median_step_s=median,
                samples_per_s=batch / median, peak_memory_bytes=peak, trainable_params=trainable,
                step_times_s=times, channels_last=args.channels_last)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config-dir", required=True)
    p.add_argument("--methods", default="all")
    p.add_argument("--batch", default="1")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--profile", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    methods = METHODS if args.methods == "all" else args.methods.split(",")
    results = [bench_one(args, m, int(b)) for m in methods for b in args.batch.split(",")]
    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if cuda else cpu_model()
    memory = ("peak CUDA memory allocated by torch" if cuda
              else "peak resident memory of the process (VmHWM, reset before each run)")
    report = dict(tool="diffusers+peft" + (" (torch.compile)" if args.compile else " (eager)"),
                  device=device, threads=torch.get_num_threads(), memory=memory,
                  torch=torch.__version__, results=results)
    if args.json:
        print(json.dumps(report))
    else:
        for r in results:
            print(f"{r['method']:8} batch {r['batch']:3} {r['median_step_s']*1000:9.1f} ms "
                  f"{r['samples_per_s']:7.2f} samples/s")


if __name__ == "__main__":
    main()
