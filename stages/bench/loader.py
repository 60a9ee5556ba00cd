"""`sdxl bench loader`: samples/s of training-ready batches from our shards (tar and zarr, through train's own
reader: index and manifest checks, every shard verified before use; two epochs, since the second reads
differently) against the common alternative on the same
samples, machine and run: kohya's per-image cache (a latents `.npz` + a text-encoder `.npz` per image) read by
a torch DataLoader with kohya's worker count, min(8, CPU count).

A training-ready batch is the same on every path: latents [B, C, h, w], text states [B, 77, 2048], pooled
[B, 1280] and time ids [B, 6] as torch tensors, in the stored dtype. Our path makes them on the consuming
thread (as the training loop does); the DataLoader makes them in its workers. With `latency_ms`, everything is
served by a localhost HTTP server that adds that latency to each request: our shards are read by URL (one
request per tar; one per zarr chunk), the per-file cache file by file.
"""
from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from shared.formats import location
from stages.bench.loader_data import Shapes


@dataclass(frozen=True)
class Result:
    path: str           # what was read
    samples: int
    seconds: float
    check: float        # a sum over every batch's latents (the paths must agree)
    cpu: float = 0.0    # CPU seconds of this process and its (finished) worker processes

    @property
    def rate(self) -> float:
        return self.samples / self.seconds


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (every thread) and of its children that have ended (the
    DataLoader's workers, joined at the end of an epoch)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def collate_samples(samples: list[Any]) -> dict[str, Any]:
    """Our samples as one training-ready batch (the tensors the DataLoader path yields)."""
    import torch

    return {"latents": torch.from_numpy(np.stack([s.latent for s in samples])),
            "te": torch.from_numpy(np.stack([s.te[0] for s in samples])),
            "pooled": torch.from_numpy(np.stack([s.pooled[0] for s in samples])),
            "time_ids": torch.from_numpy(np.array([s.time_ids for s in samples], np.float32))}


def fingerprint(batch: dict[str, Any]) -> float:
    """A cheap sum over the batch's latents (first row of every channel) to compare what the paths read."""
    return float(batch["latents"][:, :, 0, :].double().sum())


def read_ours(encoded: Path | str, source: str, batch: int, seed: int = 0, epochs: int = 2,
              server_cpu: Callable[[], float] = lambda: 0.0) -> list[Result]:
    """`epochs` epochs of train's stream over the encode output at `encoded` (folder or URL), made into batches
    by one reader, as a training run reads them; one Result per epoch. The first reads every shard into fresh
    buffers and hashes it; later ones reuse the buffers and, for local shards whose files are unchanged since
    their check, skip the hash (stages/train/reader.py). `server_cpu`: as for run_paths."""
    import itertools

    from stages.train import data as D
    from stages.train import feed

    def clock() -> tuple[float, float]:
        return time.perf_counter(), cpu_seconds() - server_cpu()

    start, cpu = clock()
    cfg = feed.DataConfig(input=encoded, shards=(), source=source, batch_size=batch, accumulate=1,
                          shuffle_buffer=256, epochs=epochs, max_steps=0, seed=seed, prefetch=4)
    data = feed.open_data(cfg)
    schedule = feed.plan(data, cfg, 1)
    where = " by URL" if location.is_url(str(encoded)) else ""
    out = []
    for epoch, steps in enumerate(schedule.steps):
        first = sum(schedule.steps[:epoch])
        count, check = 0, 0.0
        stream = itertools.islice(feed.micro_batches(data, schedule, cfg, 0, 1, first), steps)  # this epoch only
        for samples, _, _ in D.prefetch(stream, cfg.prefetch):
            tensors = collate_samples(samples)
            count, check = count + len(samples), check + fingerprint(tensors)
        label = f"{source}{where}" + (f", epoch {epoch + 1}" if epoch else "")
        now, spent = clock()
        out.append(Result(label, count, now - start, check, spent - cpu))
        start, cpu = clock()
    return out


class PerFileCache:
    """kohya's cache as a torch Dataset: item i = (latents, text states, pooled, time ids) of image i, read from
    its two `.npz` files (a folder or a base URL, fetched file by file)."""

    def __init__(self, where: Path | str, ids: list[str], shapes: Shapes):
        self.where, self.ids, self.side = where, ids, shapes.side
        self.fs: Any = None

    def __len__(self) -> int:
        return len(self.ids)

    def _load(self, name: str) -> Any:
        where = location.join(self.where, name)
        if not location.is_url(where):
            return np.load(where)
        if self.fs is None:  # one client per worker process, made there
            import fsspec

            self.fs = fsspec.filesystem("http")
        return np.load(io.BytesIO(self.fs.cat_file(str(where))))

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        key, side = self.ids[i], self.side
        with self._load(f"{key}_{side:04d}x{side:04d}_sdxl.npz") as z:
            latents, size, crop = z["latents"], z["original_size"], z["crop_ltrb"]
        with self._load(f"{key}_te_outputs.npz") as z:
            te = np.concatenate([z["hidden_state1"], z["hidden_state2"]], axis=-1)
            pooled = z["pool2"]
        time_ids = np.array([size[0], size[1], crop[1], crop[0], side, side], np.float32)
        return {"latents": torch.from_numpy(latents), "te": torch.from_numpy(te), "pooled": torch.from_numpy(pooled),
                "time_ids": torch.from_numpy(time_ids)}


def kohya_workers() -> int:
    """kohya's DataLoader worker count: min(max_data_loader_n_workers = 8, CPU count)."""
    import os

    return min(8, os.cpu_count() or 1)


def read_per_file(where: Path | str, ids: list[str], shapes: Shapes, batch: int, workers: int,
                  seed: int = 0) -> Result:
    """One epoch of the per-file cache through a torch DataLoader (shuffled, `workers` processes)."""
    import torch

    start, cpu = time.perf_counter(), cpu_seconds()
    loader = torch.utils.data.DataLoader(PerFileCache(where, ids, shapes), batch_size=batch, shuffle=True,
                                         num_workers=workers, generator=torch.Generator().manual_seed(seed))
    count, check = 0, 0.0
    for tensors in loader:
        count, check = count + len(tensors["latents"]), check + fingerprint(tensors)
    seconds = time.perf_counter() - start
    del loader  # its worker processes end and are joined (their CPU time counted) before the clock is read
    label = f"per-file .npz, DataLoader x{workers}{' by URL' if location.is_url(str(where)) else ''}"
    return Result(label, count, seconds, check, cpu_seconds() - cpu)


def run_paths(encoded: Path | str, cache: Path | str, ids: list[str], shapes: Shapes, batch: int,
              workers: int, sources: tuple[str, ...], server_cpu: Callable[[], float] = lambda: 0.0
              ) -> Iterator[Result]:
    """The per-file baseline first, then each of our sources (a Result per epoch), on the same samples.
    `server_cpu`: the CPU seconds an HTTP server in this process has spent so far, left out of each path's CPU
    time."""
    served = server_cpu()
    result = read_per_file(cache, ids, shapes, batch, workers)
    yield dataclasses.replace(result, cpu=result.cpu - (server_cpu() - served))
    for source in sources:
        yield from read_ours(encoded, source, batch, server_cpu=server_cpu)
