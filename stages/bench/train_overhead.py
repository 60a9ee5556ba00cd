"""`sdxl bench train-overhead`: the `train` stage's time per optimizer step against a bare torch loop (same
UNet, same LoRA, same AdamW, the same batches held in memory, noise drawn in the loop), on builtin:tiny.

The stage's per-step time is its steady state: the log windows (10 steps each, timed by the stage itself) after
the first, which holds the first shard reads and kernel warm-up; the bare loop is timed after 5 warm-up steps.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from shared.core.config import resolve
from stages import train

HEADERS = ("steps", "batch", "stage s/step", "bare s/step", "ratio", "stage wall s")


def stage_seconds_per_step(work: Path, out: Path, steps: int, batch: int) -> tuple[float, float]:
    """(steady-state seconds per step, wall seconds of the whole stage run)."""
    cfg = resolve(train.Config, "train", {}, {"workdir": work, "output": out, "model": "builtin:tiny",
                                              "max_steps": steps, "batch_size": batch, "eval_samples": 0,
                                              "checkpoint_every": 10 ** 6, "tensorboard": False, "log_every": 10})
    start = time.perf_counter()
    train.run(cfg, force=True)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["steps_per_s"] for r in rows if "steps_per_s" in r]
    rates = rates[1:] or rates
    return sum(1 / r for r in rates) / len(rates), wall


def bare_seconds_per_step(work: Path, steps: int, batch: int) -> float:
    import torch

    from stages.train import data as D, feed, model as M, objective, step as S

    cfg = resolve(train.Config, "train", {}, {"workdir": work, "model": "builtin:tiny", "batch_size": batch})
    data = feed.open_data(cfg.data)
    plan = D.epoch_plan(data.infos, 0, 1, 0, 0, batch, 256)
    batches = [S.assemble(s, 0, 0, data.empty, cfg.objective) for s in D.stream_batches(plan, data.read)]
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


def encode_demo_data(root: Path, images: int) -> None:
    """The demo's synthetic images through ingest, bucket and encode, with the demo's settings."""
    from stages import bucket, encode, ingest
    from stages.synthetic import generate_dataset

    data = generate_dataset(root / "data", count=images, seed=0)
    ingest.run(resolve(ingest.Config, "ingest", {}, {"sources": (str(data),), "min_side": 128, "workdir": root}))
    bucket.run(resolve(bucket.Config, "bucket", {}, {"max_area": 256 * 256, "min_side": 128, "max_side": 512,
                                                    "max_upscale": 4.0, "min_bucket_items": 4, "workdir": root}))
    encode.run(resolve(encode.Config, "encode", {}, {"model": "builtin:tiny", "caption_variants": 2, "flip": True,
                                                    "format": "both", "workdir": root}))


def measure(root: Path, images: int, steps: int, batch: int) -> list[tuple]:
    encode_demo_data(root, images)
    stage, wall = stage_seconds_per_step(root, root / "t", steps, batch)
    bare = bare_seconds_per_step(root, steps, batch)
    return [(steps, batch, round(stage, 4), round(bare, 4), round(stage / bare, 3), round(wall, 2))]
