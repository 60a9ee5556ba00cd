"""Encode throughput on builtin:tiny: the PIL decoder (worker processes) vs DALI on the CPU, decode alone and
the whole encode stage (decode + tiny VAE + both text encoders + writing shards).

    .venv/bin/python tests/bench/bench_encode.py --images 300 --side 1024 --area 512

Not a test: figures go into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from shared.core.config import resolve
from shared.formats.plan import read_plan
from stages import bucket, encode, ingest
from stages.encode.decode import dali_batches, pil_batches
from stages.encode.writer import plan_shards
from tests.bench.bench_ingest import make_images


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--area", type=int, default=512, help="bucket area side: max_area = area*area")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    try:
        make_images(root / "src", args.images, args.side, 0)
        work = root / "w"
        ingest.run(resolve(ingest.Config, "ingest", {}, {"sources": (str(root / "src"),), "workdir": work}))
        bucket.run(resolve(bucket.Config, "bucket", {}, {"workdir": work, "max_area": args.area ** 2,
                                                         "min_side": 256, "max_side": 1024}))
        items = read_plan(work / "bucket")
        batches = [s.rows[i:i + args.batch] for s in plan_shards(items, 256)
                   for i in range(0, len(s.rows), args.batch)]
        for name, make in (("pil", lambda: pil_batches(batches, args.workers, pin=False)),
                           ("dali", lambda: dali_batches(batches, args.batch, args.workers, None))):
            t = time.perf_counter()
            n = sum(len(b) for b in make())
            print(f"decode only, {name}: {n / (time.perf_counter() - t):.1f} images/s ({n} images)")
        for name in ("pil", "dali"):
            t = time.perf_counter()
            encode.run(resolve(encode.Config, "encode", {}, {
                "workdir": work, "model": "builtin:tiny", "decoder": name, "workers": args.workers,
                "batch_size": args.batch, "output": work / f"encode-{name}"}))
            dt = time.perf_counter() - t
            print(f"encode stage, {name}: {len(items) / dt:.1f} images/s ({len(items)} images, {dt:.1f} s "
                  f"incl. model load)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
