"""`sdxl bench encode`: encode's throughput per decoder (PIL worker processes, DALI where installed) — decode
alone and the whole stage (decode + VAE + both text encoders + shards) — and the VAE alone on ready tensors."""
from __future__ import annotations

import time
from pathlib import Path

from shared.core.config import resolve
from shared.formats.plan import read_plan
from stages import bucket, encode, ingest
from stages.bench.ingest_speed import make_images
from stages.encode.decode import dali_available, dali_batches, pil_batches
from stages.encode.writer import plan_shards

HEADERS = ("what", "decoder", "images", "seconds", "images/s")


def decoders() -> list[str]:
    return ["pil"] + (["dali"] if dali_available() else [])


def measure(root: Path, images: int, side: int, area: int, workers: int, batch: int, model: str) -> list[tuple]:
    make_images(root / "src", images, side, 0)
    work = root / "w"
    ingest.run(resolve(ingest.Config, "ingest", {}, {"sources": (str(root / "src"),), "workdir": work,
                                                    "workers": workers, "min_side": 16}))
    bucket.run(resolve(bucket.Config, "bucket", {}, {"workdir": work, "max_area": area ** 2, "min_side": 64,
                                                    "max_side": max(area * 2, 64)}))
    items = read_plan(work / "bucket")
    batches = [s.rows[i:i + batch] for s in plan_shards(items, 256) for i in range(0, len(s.rows), batch)]
    rows = []
    for name in decoders():
        make = (lambda: pil_batches(batches, workers, pin=False)) if name == "pil" else \
            (lambda: dali_batches(batches, batch, workers, None))
        t = time.perf_counter()
        n = sum(len(b) for b in make())
        dt = time.perf_counter() - t
        rows.append(("decode only", name, n, round(dt, 2), n / dt))
    for name in decoders():
        t = time.perf_counter()
        encode.run(resolve(encode.Config, "encode", {}, {
            "workdir": work, "model": model, "decoder": name, "workers": workers, "batch_size": batch,
            "output": work / f"encode-{name}"}))
        dt = time.perf_counter() - t
        rows.append(("encode stage (incl. model load)", name, len(items), round(dt, 2), len(items) / dt))
    rows.append(vae_alone(model, area, batch, max(len(items), batch)))
    return rows


def vae_alone(model: str, side: int, batch: int, images: int) -> tuple:
    """The model's VAE encoding ready [batch, 3, side, side] tensors (GPU when present, float32)."""
    import torch

    from shared.models import loading

    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = loading.load_model(model, ("vae",)).vae.to(device).eval()
    x = torch.rand((batch, 3, side, side), generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    steps = max(1, images // batch)
    with torch.no_grad():
        vae.encode(x)  # warm up
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            vae.encode(x).latent_dist.mean
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
    return (f"VAE alone, {side}x{side}, {device}", "-", steps * batch, round(dt, 2), steps * batch / dt)
