"""`sdxl bench ingest`: ingest's header probing against `--verify` (full decode) on generated JPEG / PNG / WebP
images (the demo's shapes blended with a smooth random texture, so every file is distinct and photo-sized)."""
from __future__ import annotations

import random
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from shared.core.config import build
from stages import ingest
from stages.synthetic import Sample, render


def render_unique(sample: Sample, salt: float) -> Any:
    """The synthetic picture plus a smooth random texture, so every file is distinct and photo-sized."""
    import numpy as np
    from PIL import Image

    img = render(sample)
    rng = np.random.default_rng(int(salt * 2**32))
    texture = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "RGB")
    return Image.blend(img, texture.resize(img.size, Image.BICUBIC), 0.35)


def make_images(folder: Path, count: int, side: int, seed: int) -> int:
    """`count` captioned images of long side `side` in folders of 1000; returns their total bytes."""
    rng = random.Random(seed)
    total = 0
    for i in range(count):
        aspect = rng.choice([1.0, 0.75, 1.333, 0.5625, 1.777])
        w, h = (side, round(side / aspect)) if aspect >= 1 else (round(side * aspect), side)
        ext, fmt = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")][i % 3] if side >= 256 else ("png", "PNG")
        s = Sample(f"{i:06d}", rng.choice(["circle", "square", "triangle"]), "red", "blue", rng.random() < .5,
                   w, h, ext, fmt)
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{s.name}.{ext}"
        render_unique(s, rng.random()).save(path, fmt, **({"quality": 90} if fmt != "PNG" else {}))
        path.with_suffix(".txt").write_text(s.caption)
        total += path.stat().st_size
    return total


HEADERS = ("mode", "workers", "images", "accepted", "seconds", "images/s", "peak RSS (main process, MB)")


def measure(root: Path, images: int, side: int, workers: int, modes: tuple[str, ...], min_side: int
            ) -> list[tuple]:
    """One row per mode (header, verify); the images are made under `root/data` unless already there."""
    data = root / "data"
    if not data.exists():
        make_images(data, images, side, 0)
    rows = []
    for mode in modes:
        out = root / f"out-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = build(ingest.Config, {"sources": (str(data),), "output": out, "workers": workers,
                                    "verify": mode == "verify", "min_side": min_side}, "[ingest]")
        t = time.perf_counter()
        m = ingest.run(cfg)
        dt = time.perf_counter() - t
        n = m.counts["in"] - m.counts["captions"]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append((mode, workers, n, m.counts["out"], round(dt, 2), n / dt, round(rss)))
    return rows
