"""Decoding planned crops in batches, overlapped with the encoder: a DALI pipeline or PIL in worker processes.

Both paths compute the bucket plan's geometry: the upright image (EXIF orientation applied), resized with a
Lanczos filter (antialiased when shrinking) to the plan's `resize`, cropped at the plan's `crop` to the bucket.
They yield uint8 tensors [B, H, W, 3], pinned when headed for a GPU.

DALI's graph is the same on CPU and GPU; only the decoder's device differs ("cpu" or "mixed"). Items DALI does
not decode as PIL does (transparency composited on white, palettes, 16-bit grey, CMYK, GIF, AVIF) go through
PIL in either path, so the geometry and the colours agree per item whichever decoder runs.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
from typing import Any, Iterator, Sequence

import numpy as np

from shared.core.errors import ConfigError, DataError
from shared.core.ranks import die_with_parent
from shared.formats.plan import PlanRow
from shared.images import load_planned

#: what DALI decodes exactly as the PIL path does (anything else goes through PIL)
DALI_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "TIFF"}
DALI_MODES = {"RGB", "L"}


def dali_available() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` package at all (the dali extra is not installed)
        return False


def resolve_decoder(name: str) -> str:
    """`auto` -> dali when installed, else pil; an explicit dali without DALI is a config error."""
    if name == "auto":
        return "dali" if dali_available() else "pil"
    if name == "dali" and not dali_available():
        raise ConfigError("decoder dali: nvidia-dali is not installed (pip install 'sdxl-stages[dali]'), "
                          "or use --decoder pil")
    return name


def dali_can_decode(item: PlanRow) -> bool:
    return item.format in DALI_FORMATS and item.mode in DALI_MODES and item.frames == 1


def recorded_bytes(item: PlanRow) -> bytes:
    """The image file's bytes, once checked to be what ingest recorded (size and sha256)."""
    path = item.image
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); it changed since ingest? rerun ingest") from None
    if (item.bytes is not None and len(data) != item.bytes) or \
            (item.sha256 is not None and hashlib.sha256(data).hexdigest() != item.sha256):
        raise DataError(f"{path}: changed since ingest recorded it (size or sha256 differ); rerun ingest")
    return data


def pil_batch(items: Sequence[PlanRow]) -> np.ndarray:
    """One batch (all of one bucket) through PIL: uint8 [B, H, W, 3]."""
    out = []
    for item in items:
        data = recorded_bytes(item)
        try:
            out.append(load_planned(io.BytesIO(data), item.resize, item.crop, item.bucket))
        except (OSError, ValueError) as e:
            raise DataError(f"{item.image}: cannot decode ({e}); rerun ingest with --verify") from None
    return np.stack(out)


class _PilBatches:
    """Map-style dataset: index -> a whole decoded batch (so workers decode batches, not single images)."""

    def __init__(self, batches: Sequence[Sequence[PlanRow]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Any:
        import torch

        return torch.from_numpy(pil_batch(self.batches[i]))


def pil_batches(batches: Sequence[Sequence[PlanRow]], workers: int, pin: bool) -> Iterator[Any]:
    """Decoded batches in order, `workers` processes decoding ahead (0 = in this process)."""
    import torch

    if workers == 0:
        for b in batches:
            yield torch.from_numpy(pil_batch(b))
        return
    loader = torch.utils.data.DataLoader(_PilBatches(batches), batch_size=None, shuffle=False,
                                         num_workers=workers, pin_memory=pin, prefetch_factor=2,
                                         multiprocessing_context="spawn" if pin else None,
                                         worker_init_fn=die_with_parent)
    yield from loader


def dali_batches(batches: Sequence[Sequence[PlanRow]], batch_size: int, threads: int, gpu: int | None) -> Iterator[Any]:
    """Decoded batches in order through a DALI pipeline (decoder on GPU `gpu` with "mixed", else CPU).
    DALI runs ahead of the consumer (its prefetch queue); items DALI cannot match are decoded by PIL."""
    import torch

    plan: list[tuple[list[int], list[PlanRow]]] = []
    feed: list[list[PlanRow]] = []
    for b in batches:
        via_dali = [i for i, item in enumerate(b) if dali_can_decode(item)]
        plan.append((via_dali, list(b)))
        if via_dali:
            feed.append([b[i] for i in via_dali])
    outputs = _run_dali(feed, batch_size, threads, gpu)
    for via_dali, items in plan:
        decoded = next(outputs) if via_dali else None
        if len(via_dali) == len(items):
            yield decoded
            continue
        rest = sorted(set(range(len(items))) - set(via_dali))
        pil = torch.from_numpy(pil_batch([items[i] for i in rest]))
        if decoded is not None:
            pil = pil.to(decoded.device)
        merged = torch.empty((len(items),) + tuple(pil.shape[1:]), dtype=torch.uint8, device=pil.device)
        merged[rest] = pil
        if via_dali:
            merged[via_dali] = decoded
        yield merged


class _Feeder:
    """DALI external source: per call, the next batch's file bytes, resize [h, w], crop start [x, y] and
    crop shape [w, h]."""

    def __init__(self, batches: list[list[PlanRow]]):
        self.batches = batches
        self.i = 0

    def __iter__(self) -> "_Feeder":
        self.i = 0
        return self

    def __next__(self) -> tuple:
        if self.i >= len(self.batches):
            raise StopIteration
        b = self.batches[self.i]
        self.i += 1
        data = [np.frombuffer(recorded_bytes(item), dtype=np.uint8) for item in b]
        return (data,
                [np.array([it.resize[1], it.resize[0]], np.float32) for it in b],
                [np.array(it.crop, np.int32) for it in b],
                [np.array(it.bucket, np.int32) for it in b])


def _run_dali(feed: list[list[PlanRow]], batch_size: int, threads: int, gpu: int | None) -> Iterator[Any]:
    import torch
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=max(1, threads), device_id=gpu, prefetch_queue_depth=2,
                  exec_dynamic=True)
    def graph():  # identical on CPU and GPU but for the decoder's device
        data, size, start, shape = fn.external_source(source=_Feeder(feed), num_outputs=4, batch=True,
                                                      dtype=[types.UINT8, types.FLOAT, types.INT32, types.INT32])
        image = fn.decoders.image(data, device="mixed" if gpu is not None else "cpu", output_type=types.RGB)
        image = fn.resize(image, size=size, interp_type=types.INTERP_LANCZOS3, antialias=True)
        return fn.slice(image, start=start, shape=shape, axis_names="WH")

    pipe = graph()
    pipe.build()
    for _ in range(len(feed)):
        try:
            (out,) = pipe.run()
        except RuntimeError as e:
            raise DataError(f"DALI could not decode a batch ({str(e).splitlines()[0][:200]}); "
                            f"use --decoder pil to find the file") from None
        if gpu is not None:
            yield torch.from_dlpack(out.as_tensor()).clone()  # DALI reuses its buffers
        else:
            yield torch.from_numpy(np.stack([np.asarray(out[i]) for i in range(len(out))]))
