"""Train loop overhead on builtin:tiny (CPU): the `train` stage's time per optimizer step against a bare torch
loop (same UNet, same LoRA, same AdamW, the same batches held in memory, noise drawn in the loop).

    PYTHONPATH=. .venv/bin/python tests/bench/bench_train.py --images 64 --steps 60

The stage's per-step time is its steady state: the log windows (10 steps each, timed by the stage itself)
after the first, which holds the first shard reads and kernel warm-up; the bare loop is timed after 5 warm-up
steps. Not a test: figures go into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from shared.core.config import resolve
from shared.formats import samples
from stages import pipeline, train
from stages.train import data as D, model as M, objective, step as S


def stage_seconds_per_step(work: Path, out: Path, steps: int, batch: int) -> tuple[float, float]:
    """(steady-state seconds per step, wall seconds of the whole stage run)."""
    cfg = resolve(train.Config, "train", {}, {"workdir": work, "output": out, "model": "builtin:tiny",
                                              "max_steps": steps, "batch_size": batch, "eval_samples": 0,
                                              "checkpoint_every": 10 ** 6, "tensorboard": False, "log_every": 10})
    start = time.perf_counter()
    train.run(cfg, force=True)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["steps_per_s"] for r in rows if "steps_per_s" in r][1:]
    return sum(1 / r for r in rates) / len(rates), wall


def bare_seconds_per_step(work: Path, steps: int, batch: int) -> float:
    cfg = resolve(train.Config, "train", {}, {"workdir": work, "model": "builtin:tiny", "batch_size": batch})
    manifest = samples.require_encode(cfg.input)
    index, infos = D.read_index(cfg.input, manifest)
    reader = D.ShardReader(cfg.input, infos, "wds", {})
    empty = D.load_empty(cfg.input, manifest)
    plan = D.epoch_plan(infos, 0, 1, 0, 0, batch, 256)
    batches = [S.assemble(s, 0, 0, empty, cfg.objective) for s in D.stream_batches(plan, reader)]
    unet = M.build_unet(cfg.unet, torch.device("cpu"))
    params = M.trainable(unet)
    opt = torch.optim.AdamW(params, lr=1e-4)
    sigmas = objective.schedule("sdxl").float()
    g = torch.Generator().manual_seed(0)

    def one(b: S.Batch) -> None:
        t = torch.randint(0, 1000, (len(b.latents),), generator=g)
        noise = torch.randn(b.latents.shape, generator=g)
        s = sigmas[t].view(-1, 1, 1, 1)
        x = (b.latents + s * noise) / (s ** 2 + 1).sqrt()
        pred = unet(x, t, encoder_hidden_states=b.te, added_cond_kwargs={"text_embeds": b.pooled,
                                                                          "time_ids": b.time_ids}).sample
        torch.nn.functional.mse_loss(pred, noise).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for k in range(5):  # warm up
        one(batches[k % len(batches)])
    start = time.perf_counter()
    for k in range(steps):
        one(batches[k % len(batches)])
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        pipeline.demo(root, args.images, 0, steps=1)  # synthetic data through encode (and a 1-step train)
        stage, wall = stage_seconds_per_step(root, root / "t", args.steps, args.batch)
        bare = bare_seconds_per_step(root, args.steps, args.batch)
        print(json.dumps({"steps": args.steps, "batch": args.batch, "stage_s_per_step": round(stage, 4),
                          "bare_s_per_step": round(bare, 4), "overhead_ratio": round(stage / bare, 3),
                          "stage_wall_s": round(wall, 2)}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
