"""What the loop reads: encode's output opened (a folder or an fsspec URL; tar shards, shard URLs or zarr), the
step plan, and the stream of micro-batches from any step on (the plan is a function of the config, so a step is
a data position), its shards loaded ahead in background threads (reader.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from shared.core.errors import InputError
from shared.core.log import say
from shared.formats import samples
from shared.formats.samples import EmptyCaption, Sample
from shared.formats.shard_index import Index
from stages.train import data as D
from stages.train.reader import ShardReader


@dataclass(frozen=True)
class DataConfig:
    """Where the samples come from and how they are dealt into steps (flat keys of the same names)."""
    input: Path | str           # encode's output folder or URL (manifest, index.json, empty/, shards, zarr)
    shards: tuple[str, ...]     # tar shard URLs read instead of <input>/shards (matched by <bucket>/<NNNNNN>.tar)
    source: str                 # auto | wds | zarr
    batch_size: int             # samples per micro-batch per process (one bucket per batch)
    accumulate: int             # micro-batches per optimizer step
    shuffle_buffer: int         # samples in the seeded shuffle buffer (1 = stream order)
    epochs: int                 # epochs to train when max_steps is 0
    max_steps: int              # optimizer steps to train; 0 = `epochs` epochs
    seed: int                   # shard order per epoch and the shuffle buffer
    prefetch: int               # micro-batches read ahead by the loader thread
    decode_pixels: bool = True  # decode the crops' stored images (what the VAE target trains on; else unread)


@dataclass
class Data:
    folder: Path | str
    index: Index
    infos: list
    read: ShardReader
    empty: EmptyCaption


def open_data(cfg: DataConfig) -> Data:
    manifest = samples.require_encode(cfg.input)
    index, infos = D.read_index(cfg.input, manifest)
    source = cfg.source if cfg.source != "auto" else ("wds" if index.format in ("wds", "both") else "zarr")
    if source == "wds" and index.format == "zarr" or source == "zarr" and index.format == "wds":
        raise InputError(f"{cfg.input}: encode wrote format {index.format}, so --source {source} cannot be read")
    urls: dict[int, str] = {}
    if cfg.shards:
        if source == "zarr":
            raise InputError("--shards lists tar shards; it cannot be used with --source zarr")
        urls = D.match_urls(infos, D.expand_urls(cfg.shards))
        if len(urls) < len(infos):
            say(f"train: reading {len(urls)} of the {len(infos)} shards of {cfg.input} (those given by --shards)")
        infos, urls = D.select(infos, urls)
    return Data(cfg.input, index, infos, ShardReader(cfg.input, infos, source, urls, index.layout,
                                                      cfg.decode_pixels),
                D.load_empty(cfg.input, manifest))


def plan(data: Data, cfg: DataConfig, world: int) -> D.Schedule:
    """Optimizer steps per epoch, the same on every rank."""
    return D.Schedule.make(data.infos, world, cfg.seed, cfg.batch_size, cfg.accumulate, cfg.epochs, cfg.max_steps)


def check_shapes(unet: Any, index: Index, where: Path | str) -> None:
    c = unet.config
    want = {"latent channels": (c.in_channels, index.layout.latent_channels),
            "text width": (c.cross_attention_dim, index.layout.te_dim),
            "pooled + time ids width": (c.projection_class_embeddings_input_dim,
                                        index.layout.pooled_dim + 6 * c.addition_time_embed_dim)}
    bad = [f"{k}: UNet {a}, shards {b}" for k, (a, b) in want.items() if a != b]
    if bad:
        raise InputError(f"{where}: the shards do not fit this UNet ({'; '.join(bad)}); encode with this model")


def first_samples(data: Data, count: int, skip: set[str] = frozenset()) -> list[dict]:
    """The first `count` samples in index order whose ids are not in `skip` (the fixed evaluation set of
    training samples; `skip` is the held-out set), each with memory of its own (see holdout.with_samples)."""
    out: list[dict] = []
    if not count:
        return out
    for info in data.infos:
        for _, sample in data.read(info.number):
            if len(out) == count:
                return out
            if sample.key not in skip:
                out.append(sample.detached())
    return out


def micro_batches(data: Data, schedule: D.Schedule, cfg: DataConfig, rank: int, world: int, step: int
                  ) -> Iterator[tuple[list[dict], int, int]]:
    """(samples, step, micro-batch index) of this rank from optimizer step `step` to the end of the schedule."""
    epoch, in_epoch = schedule.locate(step)
    base = sum(schedule.steps[:epoch])
    for e in range(epoch, len(schedule.steps)):
        batches = D.epoch_plan(data.infos, rank, world, cfg.seed, e, cfg.batch_size,
                               cfg.shuffle_buffer)[:schedule.steps[e] * cfg.accumulate]
        first = in_epoch * cfg.accumulate if e == epoch else 0
        read = data.read.ahead(D.shard_order(batches[first:]))
        for i, samples in enumerate(D.stream_batches(batches[first:], read, Sample.detached), start=first):
            yield samples, base + i // cfg.accumulate, i % cfg.accumulate
        base += schedule.steps[e]


def dataset_extras(index: Index) -> dict:
    """What the manifest and a LoRA file's metadata say of the data: tag frequency, buckets, main resolution."""
    buckets = sorted(([*b.bucket, b.samples] for b in index.buckets), key=lambda b: -b[2])
    return {"tag_frequency": index.tag_frequency, "resolution": buckets[0][:2] if buckets else None,
            "buckets": buckets}
