"""Ingest throughput: header probing vs --verify (full decode), on generated JPEG/PNG/WebP images.

    .venv/bin/python tests/bench/bench_ingest.py --images 2000 --side 1024 --workers 2

Prints images/s per mode and the peak RSS of the main process. Not a test: figures go into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from shared.core.config import build
from stages.synthetic import Sample, render
from stages import ingest


def render_unique(sample: Sample, salt: float):
    """The synthetic picture plus a smooth random texture, so every file is distinct and photo-sized."""
    import numpy as np
    from PIL import Image

    img = render(sample)
    rng = np.random.default_rng(int(salt * 2**32))
    texture = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "RGB")
    return Image.blend(img, texture.resize(img.size, Image.BICUBIC), 0.35)


def make_images(folder: Path, count: int, side: int, seed: int) -> int:
    import random

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--modes", default="header,verify")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--min-side", type=int, default=64)
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    data = root / "data"
    if not data.exists():
        t = time.perf_counter()
        size = make_images(data, args.images, args.side, 0)
        print(f"generated {args.images} images ({size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f}s")
    for mode in args.modes.split(","):
        out = root / f"out-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = build(ingest.Config, {"sources": (str(data),), "output": out, "workers": args.workers,
                                    "verify": mode == "verify", "min_side": args.min_side}, "[ingest]")
        t = time.perf_counter()
        m = ingest.run(cfg)
        dt = time.perf_counter() - t
        n = m.counts["in"] - m.counts["captions"]
        print(f"{mode}: {n} images ({m.counts['out']} accepted) in {dt:.2f}s = {n / dt:.0f} images/s "
              f"(workers={args.workers}, cores={os.cpu_count()})")
    print(f"peak RSS of the main process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
