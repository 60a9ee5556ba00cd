"""The loader benchmark's runs: data made once per sample count (reused from `--dir`), then the per-file path
and each of our sources on the same samples — from local files or through the latency server."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

from shared.core.errors import ConfigError, DataError
from shared.formats import shards
from shared.formats.samples import ENCODE_VERSION
from stages.bench import loader, loader_data
from stages.bench.loader_data import Shapes
from stages.bench.server import LatencyServer

HEADERS = ("samples", "path", "read", "seconds", "samples/s", "x per-file", "CPU ms/sample", "x per-file (CPU)")


def prepare(root: Path, count: int, shapes: Shapes, shard_samples: int) -> list[str]:
    """`root/encode` and `root/per-file` for `count` samples (reused when a previous run made the same)."""
    stamp = root / "made.json"
    want = {"count": count, "shapes": repr(shapes), "shard_samples": shard_samples, "version": ENCODE_VERSION,
            "zarr": list(loader_data.encode_compression()), "digests": list(shards.DIGESTS)}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return [f"{i:08d}" for i in range(count)]
    need = 3.1 * count * shapes.sample_bytes()  # tar + zarr + npz, and their overheads
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < need:
        raise ConfigError(f"{root}: {count} samples need ~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB are free; "
                          f"lower --samples or give --dir on a larger disk")
    for sub in ("encode", "per-file"):
        shutil.rmtree(root / sub, ignore_errors=True)
    loader_data.write_encode_output(root / "encode", count, shapes, shard_samples, digests=shards.DIGESTS)
    ids = loader_data.write_per_file_cache(root / "per-file", count, shapes)
    stamp.write_text(json.dumps(want))
    return ids


@contextlib.contextmanager
def served(root: Path, latency_ms: float, count: int) -> Iterator[tuple[str, str, Callable[[], float]]]:
    """(encode output, per-file cache, the server's CPU seconds so far) as paths, or as URLs of a latency server
    over `root`."""
    if not latency_ms:
        yield str(root / "encode"), str(root / "per-file"), lambda: 0.0
        return
    budget = 4 * count + 20_000  # per-file: 2 files a sample; ours: ~10 objects a shard; a few runs
    server = LatencyServer(root, latency_ms, max_requests=budget, max_seconds=3600)
    with server as url:
        yield f"{url}/encode", f"{url}/per-file", lambda: server.cpu


def measure(root: Path, counts: tuple[int, ...], latency_ms: float, batch: int, workers: int, shapes: Shapes,
            shard_samples: int, sources: tuple[str, ...], repeat: int = 1) -> tuple[list[tuple], str]:
    """Rows of (count, path, read, seconds, samples/s, ratio), the best of `repeat` interleaved runs each."""
    side = shapes.side
    workers = workers or loader.kohya_workers()
    bad = [s for s in sources if s not in ("wds", "zarr")]
    if bad:
        raise ConfigError(f"--source {bad[0]}: expected wds or zarr")
    rows = []
    for count in counts:
        ids = prepare(root / f"{count}-{side}", count, shapes, shard_samples)
        with served(root / f"{count}-{side}", latency_ms, count * repeat) as (encoded, cache, server_cpu):
            runs = [list(loader.run_paths(encoded, cache, ids, shapes, batch, workers, sources, server_cpu))
                    for _ in range(repeat)]  # interleaved, so a busy moment does not hit one path only
        results = [min(same, key=lambda r: r.seconds) for same in zip(*runs)]
        base = results[0]
        for r in results:
            if r.samples != base.samples or abs(r.check - base.check) > 1e-6 * max(1.0, abs(base.check)):
                raise DataError(f"{r.path} read other samples than the per-file path ({r.samples} samples, "
                                f"check {r.check} vs {base.samples}, {base.check})")
            rows.append((count, r.path, "local" if not latency_ms else f"HTTP +{latency_ms:g} ms",
                         round(r.seconds, 2), r.rate, round(r.rate / base.rate, 1),
                         round(1000 * r.cpu / r.samples, 2), round(base.cpu / r.cpu, 1) if r.cpu else 0.0))
    notes = (f"Samples: latent {shapes.channels}x{side // 8}x{side // 8}, text states 77x{sum(shapes.te_dims)}, "
             f"pooled {shapes.pooled}, {shapes.dtype} ({shapes.sample_bytes() / 1e3:.0f} kB a sample); batch "
             f"{batch}; shards of {shard_samples}; per-file: DataLoader with {workers} workers (kohya: "
             f"min(8, CPUs)), shuffled, re-reading every file each epoch; best of {repeat} interleaved runs per "
             f"path; ours: train's reader (index + manifest checked), seeded shuffle buffer 256, two epochs by "
             f"one reader as a training run reads them: in the first every shard is read into fresh buffers and "
             f"hashed whole before use (BLAKE3, which encode records beside sha256 since 2026-12); in the "
             f"second (\"epoch 2\") buffers are reused and a local shard whose files are unchanged since its "
             f"check (same inode, size, modification and change time) is not hashed again (by URL it is). Every "
             f"path read the same samples (count and a latent checksum agree). CPU: user + system seconds of "
             f"the process (all threads, less the HTTP server's) and of its DataLoader workers, per sample; the "
             f"last column is the per-file path's CPU per sample over this path's, a ratio that other load on "
             f"the machine does not move.")
    return rows, notes
