"""The training benchmark of the GPU suite (run by tests/bench/gpu_suite.sh): per memory preset of pipeline.toml,
and for a LoRA of rank 32 and a full fine-tune, on builtin:sdxl-random at 1024x1024 in bf16: samples/s, MFU
(20.2 TFLOP per sample forward + backward, docs/methods.md, against the device's bf16 dense peak),
torch.cuda.max_memory_allocated next to the planner's prediction. Prints one Markdown table for BENCHMARKS.md.

    python3 tests/bench/gpu_suite.py [--cases lora-12gb,full] [--steps 8] [--warmup 2] [--budget 400]

Each case builds the UNet directly on the GPU (random weights; the same shapes and dtypes as training), makes it
trainable and steps it as training does (model.prepare, optim / fused, step.loss), on random latents and text
states of the largest bucket. Cases that would not finish inside --budget seconds are listed as skipped.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shared.core.config import resolve  # noqa: E402
from stages import train  # noqa: E402
from stages.train import fused, model as M, objective, offload as OF, optim as O, planner, quant  # noqa: E402
from stages.train import step as S  # noqa: E402

FLOP_PER_SAMPLE = 20.2e12
PEAKS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}
EXTRA = {"lora-r32": dict(method="lora", lora_rank=32, lora_alpha=32.0, weights_dtype="bfloat16",
                          mixed_precision="bf16", batch_size=1),
         # issue 12's memory savers: a quantized base (goal: LoRA <= 3 GB with nf4) and block swap + activation
         # offload (the swapped blocks' copies overlap compute on a side stream)
         "lora-r32-nf4": dict(method="lora", lora_rank=32, lora_alpha=32.0, weights_dtype="bfloat16",
                              mixed_precision="bf16", batch_size=1, gradient_checkpointing=True, quantize_base="nf4"),
         "lora-r32-fp8": dict(method="lora", lora_rank=32, lora_alpha=32.0, weights_dtype="bfloat16",
                              mixed_precision="bf16", batch_size=1, gradient_checkpointing=True, quantize_base="fp8"),
         "lora-r32-swap40-offload": dict(method="lora", lora_rank=32, lora_alpha=32.0, weights_dtype="bfloat16",
                                         mixed_precision="bf16", batch_size=1, blocks_to_swap=40,
                                         activation_offload=True),
         "full": dict(method="full", weights_dtype="bfloat16", mixed_precision="bf16", gradient_checkpointing=True,
                      batch_size=1, optimizer="adafactor", learning_rate=1e-5, fused_backward=True,
                      max_grad_norm=0.0)}


def peak_flops() -> float:
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"]) * 1e12
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAKS.items() if k in name), 989e12)


def cases() -> dict[str, dict]:
    found = planner.presets((ROOT / "pipeline.toml").read_text(encoding="utf-8"))
    return {**found, **EXTRA}


def build(cfg, device):
    from diffusers import UNet2DConditionModel

    with torch.device(device), planner.default_dtype(getattr(torch, cfg.weights_dtype)):
        unet = UNet2DConditionModel.from_config(planner.unet_config(cfg.model))
    unet = M.prepare(unet, cfg.unet)
    if cfg.quantize_base != "no":
        quant.quantize_base(unet, cfg.quantize_base)
        unet.to(device)   # bitsandbytes' layers quantize here
    return unet


def batch_of(unet, cfg, device, generator) -> S.Batch:
    c, b = unet.config, cfg.batch_size
    shape = (b, c.in_channels, 128, 128)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    g = dict(generator=generator, device=device)
    return S.Batch(latents=torch.randn(shape, **g), noise=torch.randn(shape, **g),
                   u=torch.rand(b, dtype=torch.float64, **g), te=torch.randn(b, 77, c.cross_attention_dim, **g),
                   pooled=torch.randn(b, pooled, **g), time_ids=torch.full((b, 6), 1024.0, device=device),
                   tag_weight=torch.ones(b, device=device))


def train_step(unet, opt, ema, cfg, batch, sigmas, precision, step: int, off) -> None:
    with off.forward():
        loss = S.loss(unet, batch, cfg.objective, sigmas, precision)[0]
    if isinstance(opt, fused.FusedBackward):
        opt.begin()
        loss.backward()
        opt.end()
    else:
        with off.backward():
            loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(step)


def run_case(name: str, values: dict, steps: int, warmup: int) -> dict:
    cfg = resolve(train.Config, "train", {"train": {"model": "builtin:sdxl-random", **values}})
    device = torch.device("cuda")
    predicted = planner.plan(cfg, (1024, 1024), cfg.batch_size).peak
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    unet = build(cfg, device)
    off = OF.install(cfg.offload, unet, device, 1)   # before the optimizer: swapped weights are stepped on the host
    torch.cuda.reset_peak_memory_stats()              # a quantized base passed through the device at full size
    groups = O.param_groups(cfg.optim, M.trainable_groups(unet, cfg.method))
    opt = O.make_stepper(cfg.optim, groups, cfg.seed, 1)
    params = [p for g in groups for p in g["params"]]
    ema = (O.EMA(None, params, cfg.ema_decay, cfg.ema_every, "cpu" if cfg.ema_device == "cpu" else None)
           if cfg.ema_decay else None)
    sigmas = objective.schedule(cfg.schedule).float().to(device)
    precision = S.Precision.make(cfg.weights_dtype, cfg.mixed_precision, "cuda")
    batch = batch_of(unet, cfg, device, torch.Generator(device).manual_seed(0))
    for i in range(warmup):
        train_step(unet, opt, ema, cfg, batch, sigmas, precision, i, off)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        train_step(unet, opt, ema, cfg, batch, sigmas, precision, warmup + i, off)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    measured = torch.cuda.max_memory_allocated()
    rate = steps * cfg.batch_size / seconds
    if isinstance(opt, fused.FusedBackward):
        opt.remove()
    if off.swap is not None:
        off.swap.remove()
    del unet, opt, ema, groups, params, batch, off
    return {"case": name, "batch": cfg.batch_size, "samples_s": rate, "mfu": rate * FLOP_PER_SAMPLE / peak_flops(),
            "measured": measured / 2 ** 30, "planned": predicted / 2 ** 30,
            "error": (predicted - measured) / measured}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget", type=float, default=400.0, help="seconds for all cases")
    args = parser.parse_args()
    chosen = {k: v for k, v in cases().items() if not args.cases or k in args.cases.split(",")}
    capacity = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    print(f"device: {torch.cuda.get_device_name()} ({capacity:.0f} GiB), torch {torch.__version__}, peak "
          f"{peak_flops() / 1e12:.0f} TFLOP/s bf16", flush=True)
    rows, started, worst = [], time.monotonic(), 0.0
    for name, values in chosen.items():
        if time.monotonic() - started > args.budget:
            rows.append(f"| {name} | | skipped: over the time budget | | | | |")
            continue
        try:
            r = run_case(name, values, args.steps, args.warmup)
        except torch.cuda.OutOfMemoryError:
            rows.append(f"| {name} | | out of memory on this card | | | | |")
            torch.cuda.empty_cache()
            continue
        worst = max(worst, abs(r["error"]))
        rows.append(f"| {name} | {r['batch']} | {r['samples_s']:.2f} | {100 * r['mfu']:.1f} % | {r['measured']:.2f} | "
                    f"{r['planned']:.2f} | {100 * r['error']:+.1f} % |")
        print(rows[-1], flush=True)
    print("\n| case | batch | samples/s | MFU | max allocated GiB | planned GiB | planner error |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"\nlargest planner error: {100 * worst:.1f} % (goal: within 10 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
